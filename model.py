"""
A tiny GPT (nanoGPT-shaped: pre-LayerNorm blocks, learned absolute positions, tied embeddings) with what RLHF
needs on top:
  * a forward that takes an attention mask and position ids, so a left-padded and an unpadded sequence
    give the same logits (position ids = cumsum(mask) - 1, the rule every stage uses; see position_ids());
  * `generate`: batched sampling for left-padded prompts with a KV cache (temperature, optional top-k;
    a row stops at EOS and is padded with PAD afterwards);
  * `ScalarHeadGPT`: the same backbone with a Linear(n_embd, 1) head, one value per position, used for the
    reward model (score read at the last real token) and, later, the PPO critic;

References: GPT-2 (Radford et al. 2019), nanoGPT (Karpathy) for the layout.

Deliberate choices:
  1. Padding never changes a real token's output: pads are masked out as keys and the positions of real
     tokens do not count pads. A pad *query* attends to itself only, so its (unused) output stays finite.
  2. Attention is torch's scaled_dot_product_attention with a boolean mask (flash kernels are skipped
     when a mask is given; at this size that does not matter).
  3. PAD is not a word: its logit is set to -1e9 in GPT.logits, so it is never sampled and every stage sees
     the same distribution.
  4. No torch.compile, no DDP, no weight init tricks beyond GPT-2's (std 0.02, scaled residual projections).
     GPT-2's own weights load into this GPT from a local Hugging Face file (external/gpt2.py).
  5. Sampling inverts the CDF with one uniform number per row (sample_categorical): the distribution of
     torch.multinomial without its B·V exponential draws, which dominated CPU generation time.
  6. The output heads (LM head, scalar head) compute in fp32 even under bf16 autocast (fp32_linear): what they
     return becomes log-probs, ratios, KLs, values and scores. Emulated on CPU at GPT-2-like logit offsets, a
     bf16 LM head gave per-token log-prob errors of 0.094 nats on average, 0.35 at most; the fp32 head
     0.00057 and 0.0021 (tests/test_perf.py).

Shape legend (used in comments throughout):
  B  batch            T  sequence length (query positions)     S  key positions (cache + new)
  C  n_embd           nh n_head     hs C // nh (head size)      V  vocab size
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
    """
    Boolean (B, 1, q_len, S) "may attend" for the last q_len queries over S = mask.shape[1] keys:
    causal AND key is real, OR the key is the query itself (so a pad query never sees an empty row).
    """
    S = mask.shape[1]
    q_pos = torch.arange(S - q_len, S, device=mask.device)[:, None]      # (q_len, 1) absolute query positions
    k_pos = torch.arange(S, device=mask.device)[None, :]                  # (1, S)
    causal = k_pos <= q_pos                                               # (q_len, S)
    allowed = causal[None] & mask.bool()[:, None, :]                      # (B, q_len, S)
    allowed = allowed | (k_pos == q_pos)[None]                            # (B, q_len, S) self always allowed
    return allowed[:, None]                                               # (B, 1, q_len, S)


PAD_LOGIT = -1e9  # finite, so softmax gives exactly 0 and p * log p stays 0 (not nan)


def fp32_linear(x, weight):
    """
    x @ weight.T computed in fp32 even inside a bf16 autocast region: the output heads (LM head, scalar head).
    Their outputs become log-probs, ratios, KLs, values and scores, and bf16 keeps 8 bits of mantissa: at
    GPT-2's logit magnitudes (32-128) its spacing is 0.25-0.5, noise as large as the log-ratios PPO clips.
    The body's matmuls may stay bf16; only the last projection must not round.
    """
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
        """
        idx (B, T) token ids; mask (B, S) 1 = real token, 0 = pad, covering cache + idx (default all ones);
        pos (B, T) position ids (default from mask); caches: list of per-layer dicts for generation.
        Returns the final hidden states (B, T, C) after ln_f.
        """
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
        """Hidden (..., C) -> fp32 logits (..., V), also under autocast (fp32_linear). PAD gets a huge negative
        logit: its probability is exactly 0 in every stage (sampling, SFT loss, PPO logprobs alike), while
        log-probs and entropies stay finite."""
        logits = fp32_linear(h, self.lm_head.weight)                           # (..., V) fp32
        if self.cfg.pad_id >= 0:
            logits[..., self.cfg.pad_id] = PAD_LOGIT
        return logits

    def forward(self, idx, mask=None, pos=None, keep=slice(None)):
        """Logits (B, T, V) for next-token prediction at every position; `keep` (a slice of positions) limits
        them to those positions, (B, T', V): only they reach the LM head."""
        return self.logits(self.hidden(idx, mask, pos)[:, keep])               # (B, T', V)

    def new_caches(self, B, max_len):
        """Empty KV cache for B rows and up to max_len positions: one {k, v, shape, len} dict per layer; the
        (B, nh, max_len, hs) buffers are allocated by the first forward that writes them."""
        shape = (B, self.cfg.n_head, max_len, self.cfg.n_embd // self.cfg.n_head)  # (B, nh, S_max, hs)
        return [{"k": None, "v": None, "shape": shape, "len": 0} for _ in self.h]

    @torch.no_grad()
    def generate(self, prompt, prompt_mask, max_new_tokens, eos_id, pad_id, temperature=1.0, top_k=None,
                 generator=None, use_cache=True, return_logprobs=False):
        """
        Sample continuations of left-padded prompts.
        prompt (B, Tp) ids, left-padded with pad_id; prompt_mask (B, Tp) 1 on real tokens.
        temperature 0 means greedy (argmax). A row that emits eos_id is finished: later positions get pad_id;
        eos_id=None never stops (every row gets exactly max_new_tokens: the benchmark's fixed workload).
        Returns a Generation: response ids (B, Tr), Tr <= max_new_tokens (it stops early once every row finished).
        use_cache=False recomputes the whole sequence each step (slow; the reference the cache is tested against).
        return_logprobs=True also fills its logprobs (B, Tr) and entropy (B, Tr) of the sampled tokens under
        softmax(logits / temperature), the distribution PPO's forward pass scores (0 at padding), so PPO can skip
        a second forward pass of the policy (ppo_rlhf.rollout, --fast_rollout). It cannot be combined with
        top_k: the tokens would be sampled from the truncated distribution but scored under the full one.
        """
        B, Tp = prompt.shape
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if return_logprobs and temperature == 0:
            raise ValueError("return_logprobs needs temperature > 0 (greedy decoding has no sampling distribution)")
        if return_logprobs and top_k is not None:
            raise ValueError(f"return_logprobs cannot be combined with top_k={top_k}: the log-probs would score the "
                             f"full distribution while the tokens come from the top-k one (an off-policy ratio)")
        if Tp + max_new_tokens > self.cfg.block_size:
            raise ValueError(f"prompt length {Tp} + max_new_tokens {max_new_tokens} exceeds block_size "
                             f"{self.cfg.block_size}")
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
    """
    One token per row from probs (B, V), by inverting the CDF with one uniform number per row: the first index
    whose cumulative probability exceeds u·total. The same distribution as torch.multinomial(probs, 1), which
    draws B·V exponential numbers instead of B and took over half of CPU generation time. The CDF is summed in
    float64, so rounding moves no probability mass that matters; zero-probability tokens (PAD) are never drawn.
    """
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
# What every RL stage asks of a model about the responses it sampled (PPO, RLOO, RAFT, DPO, A-LoL, evaluate)

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
