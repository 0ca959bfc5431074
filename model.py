"""
A tiny GPT (nanoGPT-shaped: pre-LayerNorm blocks, learned absolute positions, tied embeddings) with what RLHF
needs on top: a forward that takes an attention mask and position ids (cumsum(mask) - 1), so left-padded and
unpadded sequences give the same logits; `generate`, batched sampling for left-padded prompts with a KV cache
(a row stops at EOS and is padded with PAD after it); `ScalarHeadGPT`, the same backbone with one value per
position (the reward model, read at the last real token, and the PPO critic); and the per-token math every RL
stage does on what it sampled: log-probs, entropies, values, masked means and the KL estimators, written once.

References: GPT-2 (Radford et al. 2019), nanoGPT (Karpathy) for the layout. Deliberate choices:
  1. Padding never changes a real token's output: pads are masked out as keys and do not count in positions;
     a pad *query* attends to itself only, so its (unused) output stays finite.
  2. torch's scaled_dot_product_attention with a boolean mask (no flash kernel then; at this size no matter).
  3. PAD is not a word: its logit is -1e9 (GPT.logits), so it is never sampled and every stage sees the same
     distribution.
  4. No torch.compile, no DDP, GPT-2's init (std 0.02, scaled residual projections); GPT-2's own weights load
     from a local Hugging Face file (runs.load_gpt2).
  5. Sampling inverts the CDF, one uniform number per row (sample_categorical): torch.multinomial's
     distribution without its B·V draws. 6. The output heads compute in fp32 under bf16 autocast
     (fp32_linear): they give the log-probs, ratios, KLs, values and scores (docs/performance.md).

Shape legend: B batch, T sequence length (queries), S keys (cache + new), C n_embd, nh n_head, hs C // nh, V vocab.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 1101  # the toy tokenizer's n_vocab (incl. EOS and PAD); 50258 for gpt2 + PAD
    block_size: int = 128   # longest sequence (prompt + response) the position table covers
    n_layer: int = 4        # transformer blocks
    n_head: int = 4         # attention heads per block
    n_embd: int = 128       # model width C
    dropout: float = 0.0    # 0 keeps the PPO ratio exactly 1 on the first minibatch
    bias: bool = True       # biases in Linear and LayerNorm, as GPT-2
    pad_id: int = -1        # the PAD token, which the model may never predict (logit masked); -1 = none


def position_ids(mask):
    """(B, T) 0/1 attention mask -> (B, T) position ids: 0, 1, 2, ... over real tokens; pads get 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def attention_bias(mask, q_len):
    """Boolean (B, 1, q_len, S) "may attend" for the last q_len queries over S = mask.shape[1] keys: causal AND
    key is real, OR the key is the query itself (so a pad query never sees an empty row)."""
    S = mask.shape[1]
    q_pos = torch.arange(S - q_len, S, device=mask.device)[:, None]      # (q_len, 1) absolute query positions
    k_pos = torch.arange(S, device=mask.device)[None, :]                  # (1, S)
    causal = k_pos <= q_pos                                               # (q_len, S)
    allowed = causal[None] & mask.bool()[:, None, :]                      # (B, q_len, S)
    allowed = allowed | (k_pos == q_pos)[None]                            # (B, q_len, S) self always allowed
    return allowed[:, None]                                               # (B, 1, q_len, S)


PAD_LOGIT = -1e9  # finite, so softmax gives exactly 0 and p * log p stays 0 (not nan)


def fp32_linear(x, weight):
    """x @ weight.T in fp32 even inside a bf16 autocast region, for the output heads: bf16's 8-bit mantissa at
    GPT-2's logit magnitudes (32-128) is noise as large as the log-ratios PPO clips. The body may stay bf16."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())                            # (..., out) fp32


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, bias, cache=None):
        """x (B, T, C); bias (B, 1, T, S) bool; cache: None or dict(k, v, len) filled in place."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                          # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # (B, nh, T, hs)
        if cache is not None:  # write the new keys/values into the preallocated buffers, attend over all so far
            if cache["k"] is None:  # allocated on first use, in k's dtype (bf16 under CUDA autocast, else fp32)
                cache["k"], cache["v"] = k.new_empty(cache["shape"]), v.new_empty(cache["shape"])
            n = cache["len"]
            cache["k"][:, :, n:n + T] = k
            cache["v"][:, :, n:n + T] = v
            k, v = cache["k"][:, :, :n + T], cache["v"][:, :, :n + T]     # (B, nh, S, hs), S = n + T
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                  # (B, T, C) heads side by side
        return F.dropout(self.c_proj(y), drop, self.training)             # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, bias, cache=None):
        x = x + self.attn(self.ln_1(x), bias, cache)  # (B, T, C) pre-LN residual
        return x + self.mlp(self.ln_2(x))             # (B, T, C)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token embedding, tied with lm_head
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned absolute positions
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (GPT-2)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def hidden(self, idx, mask=None, pos=None, caches=None):
        """Final hidden states (B, T, C) after ln_f of idx (B, T); mask (B, S) 1 = real token, covering cache + idx
        (default all ones); pos (B, T) position ids (default from mask); caches: per-layer dicts (generate)."""
        B, T = idx.shape
        if mask is None:
            mask = torch.ones(B, T if caches is None else caches[0]["len"] + T, dtype=torch.long, device=idx.device)
        if pos is None:
            pos = position_ids(mask)[:, -T:]                                   # (B, T)
        if int(pos.max()) >= self.cfg.block_size:
            raise ValueError(f"sequence needs position {int(pos.max())} but block_size is {self.cfg.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(pos))                          # (B, T, C)
        bias = attention_bias(mask, T)                                        # (B, 1, T, S)
        for i, block in enumerate(self.h):
            x = block(x, bias, None if caches is None else caches[i])         # (B, T, C)
        if caches is not None:
            for c in caches:
                c["len"] += T
        return self.ln_f(x)                                                   # (B, T, C)

    def logits(self, h):
        """Hidden (..., C) -> fp32 logits (..., V), also under autocast. PAD's logit is -1e9: probability exactly
        0 in every stage (sampling, SFT loss, PPO log-probs alike), log-probs and entropies finite."""
        logits = fp32_linear(h, self.lm_head.weight)                           # (..., V) fp32
        if self.cfg.pad_id >= 0:
            logits[..., self.cfg.pad_id] = PAD_LOGIT
        return logits

    def forward(self, idx, mask=None, pos=None, keep=slice(None)):
        """Next-token logits (B, T', V) at the positions `keep` (a slice; all by default): only they reach the head."""
        return self.logits(self.hidden(idx, mask, pos)[:, keep])               # (B, T', V)

    def new_caches(self, B, max_len):
        """Empty KV cache, one {k, v, shape, len} dict per layer (buffers allocated by the first write)."""
        shape = (B, self.cfg.n_head, max_len, self.cfg.n_embd // self.cfg.n_head)  # (B, nh, S_max, hs)
        return [{"k": None, "v": None, "shape": shape, "len": 0} for _ in self.h]

    @torch.no_grad()
    def generate(self, prompt, prompt_mask, max_new_tokens, eos_id, pad_id, temperature=1.0, top_k=None,
                 generator=None, use_cache=True, return_logprobs=False):
        """
        Sample continuations of left-padded prompts (B, Tp), prompt_mask (B, Tp); temperature 0 is greedy. A row
        that emits eos_id gets pad_id after it (eos_id=None: exactly max_new_tokens). Returns a Generation, ids
        (B, Tr); use_cache=False recomputes the whole sequence each step (the cache's reference). return_logprobs:
        also the sampled tokens' log-probs and the entropies (B, Tr) under softmax(logits / τ), so PPO can skip a
        second forward (--fast_rollout); not with top_k, whose tokens come from another distribution.
        """
        B, Tp = prompt.shape
        if max_new_tokens < 1 or Tp + max_new_tokens > self.cfg.block_size:
            raise ValueError(f"prompt length {Tp} + max_new_tokens {max_new_tokens}: needs 1 to "
                             f"{self.cfg.block_size - Tp} new tokens (block_size {self.cfg.block_size})")
        if return_logprobs and (temperature == 0 or top_k is not None):
            raise ValueError(f"return_logprobs needs the full sampling distribution: temperature > 0 (got "
                             f"{temperature}) and no top_k (got {top_k})")
        mask = prompt_mask.long()                                              # (B, Tp) grows to (B, Tp + t)
        seq = prompt                                                           # (B, Tp) grows likewise
        pos = position_ids(mask)                                               # (B, Tp)
        caches = self.new_caches(B, Tp + max_new_tokens) if use_cache else None
        step_in = prompt                                                       # (B, Tp), then (B, 1)
        finished = torch.zeros(B, dtype=torch.bool, device=prompt.device)     # (B,)
        out, out_logp, out_ent = [], [], []
        for _ in range(max_new_tokens):
            if use_cache:
                h = self.hidden(step_in, mask, pos, caches)[:, -1]             # (B, C) last position only
            else:
                h = self.hidden(seq, mask, position_ids(mask))[:, -1]          # (B, C)
            logits = self.logits(h)                                            # (B, V) fp32
            if temperature not in (0, 1):
                logits = logits / temperature                                  # (B, V)
            probs = None
            if return_logprobs:  # the tempered distribution, as response_logits gives it
                logp = F.log_softmax(logits, dim=-1)                           # (B, V)
                probs = logp.exp()                                             # (B, V) reused for sampling
                entropy = -(probs * logp).sum(-1)                              # (B,)
            if temperature == 0:
                nxt = logits.argmax(-1)                                        # (B,)
            else:
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
                    probs = F.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)  # (B, V)
                elif probs is None:
                    probs = F.softmax(logits, dim=-1)                          # (B, V)
                nxt = sample_categorical(probs, generator)                     # (B,)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)     # (B,) finished rows emit PAD
            out.append(nxt)
            if return_logprobs:
                out_logp.append(logp.gather(-1, nxt[:, None])[:, 0].masked_fill(finished, 0.0))  # (B,)
                out_ent.append(entropy.masked_fill(finished, 0.0))            # (B,)
            if eos_id is not None:
                finished |= nxt == eos_id
                if bool(finished.all()):
                    break
            step_in = nxt[:, None]                                             # (B, 1)
            seq = torch.cat([seq, step_in], dim=1)                             # (B, T + 1)
            pos = pos[:, -1:] + 1                                              # (B, 1) next position per row
            mask = torch.cat([mask, torch.ones_like(step_in)], dim=1)          # (B, S + 1)
        if not return_logprobs:
            return Generation(torch.stack(out, 1))
        return Generation(torch.stack(out, 1), torch.stack(out_logp, 1), torch.stack(out_ent, 1))  # (B, Tr) each


@dataclass
class Generation:
    """What GPT.generate returns."""
    tokens: torch.Tensor                      # (B, Tr) sampled ids, pad_id after a row's EOS
    logprobs: Optional[torch.Tensor] = None   # (B, Tr) log-prob of each sampled token at τ (return_logprobs)
    entropy: Optional[torch.Tensor] = None    # (B, Tr) entropy of the sampling distribution (return_logprobs)


def sample_categorical(probs, generator=None):
    """One token per row from probs (B, V): the first index whose float64 cumulative probability exceeds
    u·total, one uniform u per row (torch.multinomial's distribution; PAD, at probability 0, is never drawn)."""
    cdf = probs.double().cumsum(-1)                                           # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)  # (B, 1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)               # (B, 1) first cdf > u·total
    return idx[:, 0].clamp(max=probs.shape[1] - 1)                            # (B,)


def last_token_index(mask):
    """(B, T) 0/1 mask -> (B,) index of the last real token of each row (left or right padding alike)."""
    T = mask.shape[1]
    return T - 1 - mask.long().flip(-1).argmax(-1)                             # (B,)


class ScalarHeadGPT(nn.Module):
    """GPT backbone + Linear(C, 1) head: one scalar per position. Reward model (read at the last real token) and critic."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = GPT(cfg)
        self.head = nn.Linear(cfg.n_embd, 1, bias=False)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(cfg.n_embd + 1))

    @property
    def cfg(self):
        return self.backbone.cfg

    def forward(self, idx, mask=None, pos=None, last=False):
        """Values (B, T), one per position; last=True: only each row's value at its last real token, (B,)."""
        values = fp32_linear(self.backbone.hidden(idx, mask, pos), self.head.weight).squeeze(-1)  # (B, T) fp32
        return values.gather(1, last_token_index(mask)[:, None]).squeeze(1) if last else values  # (B,) or (B, T)

    def score(self, idx, mask):
        """Reward-model score (B,): the value at each row's last real token (EOS when the answer ended)."""
        return self(idx, mask, last=True)                                      # (B,)


# ----------------------------------------------------------------------------------------------------
# What every RL stage asks of a model about the responses it sampled, and the per-token math it does on them

def response_logits(model, seq, mask, n_prompt, temperature):
    """Logits (B, Tr, V) / τ that predicted each response token of seq (B, T), whose first n_prompt positions
    are the (left-padded) prompt: only those positions reach the LM head."""
    logits = model(seq, mask, keep=slice(n_prompt - 1, -1))               # (B, Tr, V) via forward (so DDP sees it)
    return logits if temperature == 1 else logits / temperature           # (B, Tr, V)


def logprobs_from_logits(logits, tokens):
    """log π(tokens) under `logits`: (B, T, V), (B, T) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)                          # (B, T, V)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)                 # (B, T)


def entropy_from_logits(logits):
    """Per-position entropy (B, T) of softmax(logits)."""
    logp = F.log_softmax(logits.float(), dim=-1)                          # (B, T, V)
    return -(logp.exp() * logp).sum(-1)                                   # (B, T)


def response_values(critic, seq, mask, n_prompt):
    """A critic's values (B, Tr) of the state before each response token of seq (B, T)."""
    return critic(seq, mask)[:, n_prompt - 1:-1]                          # (B, Tr)


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1 (over `dim`, or everything)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


# The KL estimators on a response sampled from π, r_t = π_ref/π at y_t: k1_t = -log r_t sums to an unbiased
# KL(π‖π_ref) (negative on some tokens: PPO's penalty, eq. 3); k3_t = (r_t - 1) - log r_t is never negative, the
# same expectation (Schulman's "Approximating KL divergence"; DeepSeekMath eq. 4). In a loss (GRPO) k3's expected
# gradient is the reverse KL(π_ref‖π)'s: E_{y~π}[∇k3] = -Σ_y π_ref(y) ∇log π(y) (tests/test_grpo.py checks it).

def k1(logprobs, ref_logprobs, mask):
    """k1 per token (B, Tr): log π - log π_ref on real response tokens, 0 at padding."""
    return (logprobs - ref_logprobs) * mask


def k3(logprobs, ref_logprobs):
    """k3 per token (B, Tr): exp(d) - 1 - d with d = log π_ref - log π, written expm1(d) - d so that a small d
    loses no float32 precision to cancellation. Mask it where padding must be 0."""
    d = ref_logprobs - logprobs
    return torch.expm1(d) - d


def exact_kl(logits, ref_logits):
    """KL(π‖π_ref) summed over the vocabulary at each position: logits (B, Tr, V) each -> (B, Tr)."""
    logp, ref_logp = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)  # (B, Tr, V) each
    return (logp.exp() * (logp - ref_logp)).sum(-1)                       # (B, Tr)
