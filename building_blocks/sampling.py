"""
Sampling responses and scoring them, for every method that samples: response strings for evaluations and
win rates (sample_responses), reward-model scores of strings (score_texts), and one scored batch of samples
with the log-probs a policy-gradient method needs (sample_and_score -> Samples). PPO writes its own rollout
(ppo_rlhf.rollout: the same steps plus the critic's values and an exact-KL path).

Shape legend: B rows, Tp prompt length (left-padded), Tr response length (right-padded with PAD after EOS),
T = Tp + Tr.
"""
import time
from dataclasses import dataclass, fields, replace

import torch

import tokenizer as tok
from building_blocks.sequences import encode_prompts
from model import logprobs_from_logits, response_logits
from utils import fit_prompt, pad_batch


@torch.no_grad()
def sample_responses(model, enc, prompts, max_new_tokens, temperature, device, generator=None, batch_size=64):
    """Sample one response per prompt (left-padded batches, KV cache) -> data.Replies: each text (EOS kept as its
    marker text) and whether the model emitted the EOS token."""
    model.eval()
    rows = []
    for i in range(0, len(prompts), batch_size):
        room = model.cfg.block_size - max_new_tokens                      # a long (HH) prompt keeps its end
        ids, mask = encode_prompts(enc, prompts[i:i + batch_size], room, True)   # (b, Tp) each
        resp = model.generate(ids.to(device), mask.to(device), max_new_tokens, tok.eos_id(enc), tok.pad_id(enc),
                              temperature=temperature, generator=generator).tokens   # (b, Tr)
        rows += resp.tolist()
    return tok.decode_replies(enc, rows)


def score_texts(rm, enc, prompts, responses, device, truncate=True):
    """RM scores (n,) of prompt + response strings (a response ends with EOS when it finished), one batch.
    A prompt too long for the context is cut from the left (truncate=True) or is an error. `rm` may be the
    DDP wrapper of the model in training (its forward averages gradients; only its config is read through it)."""
    block_size = getattr(rm, "module", rm).cfg.block_size
    seqs = []
    for p, r in zip(prompts, responses):
        resp = tok.encode(enc, r)[: 3 * block_size // 4]  # a (real-data) response this long is cut off
        seqs.append(fit_prompt(tok.encode(enc, p), block_size - len(resp), truncate, f"prompt {p[:40]!r}") + resp)
    ids, mask = pad_batch(seqs, tok.pad_id(enc), left=False)                 # (n, T) each
    return rm(ids.to(device), mask.to(device), last=True)                     # (n,) the RM score


@dataclass
class Samples:
    """One batch of sampled responses, scored; every tensor is per row (B, ...)."""
    seq: torch.Tensor            # (B, T) prompt (left-padded) + response (right-padded) ids
    seq_mask: torch.Tensor       # (B, T) 1 on real tokens
    response: torch.Tensor       # (B, Tr) sampled ids, PAD after EOS
    mask: torch.Tensor           # (B, Tr) 1 on real response tokens, up to and including EOS
    old_logprobs: torch.Tensor   # (B, Tr) log π_old(a_t|s_t) at τ, from the sampling loop: the ratio's denominator
    ref_logprobs: torch.Tensor   # (B, Tr) log π_ref(a_t|s_t) at τ: the KL's reference
    scores: torch.Tensor         # (B,) RM score at the last real token
    entropy: torch.Tensor        # (B, Tr) entropy of π_old(·|s_t) at τ (monitoring)
    n_prompt: int                # Tp: the response starts at seq[:, Tp]
    t_generate: float = 0.0      # seconds spent sampling
    t_score: float = 0.0         # seconds spent on the reference's log-probs and the RM's scores

    def rows(self, idx):
        """The same Samples for rows idx (n,): every per-row tensor sliced alike."""
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


@torch.no_grad()
def sample_and_score(policy, ref, rm, prompt_ids, prompt_mask, max_new_tokens, temperature, eos_id, pad_id,
                     generator):
    """
    Sample one response per left-padded prompt (B, Tp) with the KV cache (pure temperature; a row that emits EOS
    is padded with PAD after it), keep log π_old and the entropy the sampling loop computed, then one no-grad
    pass of the frozen reference (log π_ref) and of the reward model (the score at the last real token).
    """
    policy.eval()
    t0 = time.time()
    sample = policy.generate(prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature=temperature,
                             generator=generator, return_logprobs=True)
    t_generate = time.time() - t0
    response = sample.tokens                                              # (B, Tr)
    mask = (response != pad_id).long()                                    # (B, Tr) 1 up to and incl. EOS
    seq = torch.cat([prompt_ids, response], dim=1)                        # (B, T)
    seq_mask = torch.cat([prompt_mask, mask], dim=1)                      # (B, T)
    n_prompt = prompt_ids.shape[1]
    ref_logits = response_logits(ref, seq, seq_mask, n_prompt, temperature)    # (B, Tr, V)
    ref_logprobs = logprobs_from_logits(ref_logits, response) * mask      # (B, Tr)
    del ref_logits
    scores = rm.score(seq, seq_mask).float()                              # (B,) at the last real token
    return Samples(seq, seq_mask, response, mask, sample.logprobs * mask, ref_logprobs, scores,
                   sample.entropy * mask, n_prompt, t_generate, time.time() - t0 - t_generate)
