"""
Stage 3: token-level PPO with GAE and a per-token KL penalty to the frozen SFT reference, with every trick of
the PPO-max recipe as a switch (Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO",
arXiv 2307.04964; "the paper" below; "the code" is its released MOSS-RLHF trainer).

One PPO iteration, as numbered in main():
  1. rollout      sample responses to a batch of left-padded prompts (pure temperature, KV cache)    paper §3.1
  2. logprobs     old_logprobs (policy at rollout time, for the ratio), ref_logprobs (frozen SFT, for
                  the KL), values (critic), and the RM score at the last real token                  §3.2, §5.3.3
  3. score        processing: none | scale (÷ running std) | norm_clip (running mean/std, clip ±δ)   §5.3.1 eq. 18
  4. reward       r_t = -β·(old_logprobs - ref_logprobs)_t on every response token, r_T += score     §3.1 eq. 3, eq. 19
  5. GAE          δ_t = r_t + γV_{t+1} - V_t, A_t = Σ (γλ)^l δ_{t+l}, returns = A + V             §3.1 eqs. 7-11
  6. update       clipped surrogate + clipped value loss (+ entropy, + PTX) over ppo_epochs × minibatches
                  (one pass, as the code), one global grad-norm clip over policy and critic         eqs. 15-17, §5.4

KL, in one place: the per-token penalty uses the k1 estimator  k1_t = log π_old(a_t|s_t) - log π_ref(a_t|s_t)
(positive when the policy puts more mass than the reference on what it sampled); its sum over a response is
an unbiased estimate of KL(π || π_ref). We also log k3 = (ρ - 1) - log ρ with ρ = π_ref/π_old (≥ 0 per
token, same expectation) and the exact per-position KL over the vocabulary. All are computed at the sampling
temperature, as every log-prob in this file is.

Run (after train_sft.py and reward_model.py; writes out/ppo.pt, out/ppo_log.jsonl, out/ppo_curves.png):
    python ppo_rlhf.py                       # --preset ppo_max, the default
    python ppo_rlhf.py --preset vanilla --out_dir out/vanilla   # no KL, no score norm, no clips: collapses
    python ppo_rlhf.py --kl_coef 0.1 --score_norm scale         # any switch on its own
    python ppo_rlhf.py --preset vanilla_pg --out_dir out/vanilla_pg  # Back to Basics' vanilla policy gradient
    python ppo_rlhf.py --data hh/train.jsonl.gz --sft_ckpt out/gpt2_hh/sft.pt --rm_ckpt out/gpt2_hh/rm.pt  # HH-RLHF
    python ppo_rlhf.py --help
On CUDA the forward passes run under bf16 autocast (`--amp`); CPU and MPS run fp32.

Deliberate choices (where the paper and its code disagree, see shared notes §1.5):
  1. Score processing: the paper's norm + clip (eq. 18) is the PPO-max default; the code's shipped scripts
     use scaling only (`--score_norm scale`).
  2. GAE λ = 0.95 and γ = 1 as in the code (the paper's App. C.3 says λ = 0.9).
  3. Critic pre-training (paper §5.3.3, §5.4) is implemented: `critic_pretrain_iters` iterations that update
     only the critic before the policy moves. The released code does not have it.
  4. PTX loss (paper §5.4, eq. 17) is a switch with weight 0 by default, as in the released scripts; our
     "pre-training data" is the SFT demonstrations.
  5. Old log-probs come from the sampling loop, which already computed softmax(logits / τ) at every response
     position (`--fast_rollout true`; the same numbers as a second forward pass up to float rounding, so the
     first-minibatch ratio is 1 ± 1e-6; `--fast_rollout false` runs that forward, giving a ratio of exactly 1 and
     the exact KL over the vocabulary as a metric). Under autocast (bf16 on CUDA) the second forward always runs:
     the sampling loop's one-token steps and the update's full forward may round bf16 matmuls differently, and
     the first ratio must be 1 (measured under CPU bf16 autocast: 1 within 1e-5 through rollout and update,
     tests/test_perf.py; not measured on a GPU). Log-probs use the sampling temperature everywhere (the code
     scores with raw logits after sampling with τ = 0.8, top-p and a repetition penalty).
  6. A tiny model trains with tiny-model learning rates (policy 1e-5... see Config), not the 7B ones.
  7. One optimiser with two parameter groups (policy, critic) and one global grad-norm clip, as the code does.
  8. β = 0.1 (the code's zh script; the middle of the paper's Fig. 15 hierarchy). With the paper's 0.05, one of
     three seeds on the toy task drifted into the collapse signature at iteration ~130 of 150.
  9. Dropout is off in the policy, reference, critic and RM (without_dropout), whatever SFT and the RM trained
     with: with an SFT dropout of 0.1 left in, the first-minibatch ratio was 0.992 on average (1.135 at most)
     and the critic's values moved by up to 1.1 between train and eval mode.

Shape legend: B rollouts per iteration, Tp prompt length (left-padded), Tr response length (right-padded with
PAD after EOS), T = Tp + Tr, V vocab, b minibatch size. Per-token tensors are (B, Tr) over response positions;
`mask` is 1 on real response tokens (up to and including EOS).
"""
import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import data
import tokenizer as tok
from external import hh_rlhf
from external.gpt2 import load_gpt2
from model import GPT, GPTConfig, ScalarHeadGPT, last_token_index
from reward_model import score_texts
from train_sft import collate, encode_demos, sample_responses, sft_loss
from utils import (TRUNCATIONS, JsonlLog, Progress, autocast, check_finite, check_resume, field, fit_prompt,
                   load_checkpoint, load_weights, pad_batch, parse_config, pick_device, plot_curves, read_jsonl,
                   rng_state, run_main, save_checkpoint, seed_everything, set_rng_state, table)


@dataclass
class Config:
    sft_ckpt: str = field("out/sft.pt", "SFT checkpoint: initial policy and frozen reference")
    rm_ckpt: str = field("out/rm.pt", "reward-model checkpoint (frozen); also the critic's init")
    out_dir: str = field("out", "where ppo.pt, ppo_log.jsonl and ppo_curves.png are written")
    preset: str = field("ppo_max", "the preset this config came from (set by --preset)")
    data: str = field("toy", "toy (the built-in task, with a gold reward), or HH-RLHF .jsonl/.jsonl.gz file(s), "
                             "comma-separated: PPO on their prompts; no gold, the win rate is judged by the RM")
    seed: int = field(0, "seeds prompts, sampling and minibatch order")
    device: str = field("auto", "auto (cuda -> mps -> cpu), cpu, cuda, mps")
    # rollout
    n_iters: int = field(150, "PPO iterations (rollout + update), critic pre-training included")
    rollout_batch: int = field(64, "prompts (= responses) per iteration")
    max_new_tokens: int = field(48, "longest response; hitting it without EOS is truncation")
    temperature: float = field(1.0, "sampling temperature, used for every log-prob too")
    fast_rollout: bool = field(True, "old_logprobs from the sampling loop (false: a second policy forward, which "
                                     "also logs the exact KL over the vocabulary)")
    # score and reward (paper §5.3.1, eq. 18; §3.1 eq. 3)
    score_norm: str = field("norm_clip", "none | scale (÷ running std) | norm_clip (running mean/std, clip ±score_clip)")
    score_clip: float = field(0.8, "δ for norm_clip")
    missing_eos_penalty: float = field(0.0, "subtracted from the processed score of responses without EOS")
    kl_coef: float = field(0.1, "β of the per-token KL penalty (paper figs 0.05-0.2; code 0.01 en / 0.1 zh)")
    # GAE (§3.1 eqs. 7-11)
    gamma: float = field(1.0, "discount")
    lam: float = field(0.95, "GAE λ (code 0.95; paper App. C.3 0.9)")
    adv_whiten: bool = field(False, "whiten advantages per minibatch (off in PPO-max)")
    adv_clip: float = field(0.0, "clip advantages to ±adv_clip after whitening (0 = off)")
    # losses (eqs. 15-17)
    clip_eps: float = field(0.2, "PPO ratio clip ε")
    vf_clip: float = field(0.2, "value clip ε_v around the rollout values (0 = unclipped)")
    vf_coef: float = field(1.0, "value-loss weight")
    entropy_coef: float = field(0.0, "entropy bonus weight (paper: use the KL penalty instead)")
    ptx_coef: float = field(0.0, "weight of the SFT cross-entropy (PPO-ptx) term")
    ptx_batch: int = field(16, "SFT demonstrations per minibatch for the PTX term")
    # optimisation
    ppo_epochs: int = field(1, "passes over each rollout batch (the released code: 1)")
    minibatch: int = field(32, "rollouts per gradient step")
    micro_batch: int = field(0, "rows per forward/backward inside a minibatch (gradient accumulation; 0 = all)")
    policy_lr: float = field(3e-5, "policy learning rate")
    critic_lr: float = field(1e-4, "critic learning rate")
    grad_clip: float = field(1.0, "global grad-norm clip over policy + critic (0 = off)")
    critic_init: str = field("rm", "rm (copy of the reward model) or sft (SFT backbone, fresh head)")
    policy_init: str = field("sft", "sft, or a policy not initialised from SFT (paper §5.3.3 Fig. 8; the reference "
                                    "stays SFT): random, or GPT-2 weights (gpt2 | a local file/folder, external/gpt2.py)")
    critic_pretrain_iters: int = field(10, "first iterations update only the critic (paper §5.3.3)")
    # monitoring
    eval_interval: int = field(10, "every N iterations: win rate vs SFT on val prompts, sample table")
    n_eval_prompts: int = field(64, "val prompts for the win rate during training")
    collapse_window: int = field(10, "iterations compared by the collapse warning")
    # reliability
    truncate_prompts: bool = field(True, "cut over-long prompts from the left, with one summary warning at "
                                         "the end of the stage (false: error)")
    log_truncations: bool = field(False, "also print one warning line per truncated prompt")
    ckpt_interval: int = field(25, "also write ppo.pt (with optimizer, RNG and running stats) every N iterations")
    resume: bool = field(False, "continue from out_dir/ppo.pt written by an interrupted run")
    stop_after: int = field(0, "stop after this many iterations as if killed (to test --resume); 0 = off")
    amp: bool = field(True, "bf16 autocast on CUDA (CPU and MPS always run fp32)")


PRESETS = {
    "ppo_max": {},
    "vanilla": dict(kl_coef=0.0, score_norm="none", vf_clip=0.0, grad_clip=0.0, critic_pretrain_iters=0),
    # Back to Basics eq. 9 "vanilla policy gradient": token-level return-to-go (γ = λ = 1) minus a learned
    # baseline (the critic), one gradient step per rollout batch, so ρ = 1 and the clip never acts
    "vanilla_pg": dict(gamma=1.0, lam=1.0, ppo_epochs=1, minibatch=64, vf_clip=0.0, score_norm="none",
                       critic_pretrain_iters=0),
    "tiny": dict(n_iters=4, rollout_batch=8, minibatch=4, max_new_tokens=12, critic_pretrain_iters=1,
                 eval_interval=2, n_eval_prompts=8, collapse_window=2, ptx_batch=4),
}


# ----------------------------------------------------------------------------------------------------
# Pure functions (imported by tests, notebooks and the other algorithms)

def logprobs_from_logits(logits, tokens):
    """log π(tokens) under `logits`: (B, T, V), (B, T) -> (B, T). (log_softmax + gather measured faster on CPU
    than logit - logsumexp or cross_entropy, forward and backward.)"""
    logp = F.log_softmax(logits.float(), dim=-1)                          # (B, T, V)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)                 # (B, T)


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1 (over `dim`, or everything)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask):
    """Unbiased variance of x over mask."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def masked_whiten(x, mask, shift_mean=True):
    """(x - μ) / σ over masked positions (shift_mean=False keeps the mean: (x - μ)/σ + μ). Padding stays 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def compute_gae(rewards, values, mask, gamma, lam):
    """
    Generalised advantage estimation over response tokens (paper eqs. 7-11), right-padded (B, T) tensors:
        δ_t = r_t + γ·V_{t+1} - V_t,   A_t = δ_t + γλ·A_{t+1},   returns_t = A_t + V_t
    Values and rewards at padding are zeroed first, so the value after a response's last token is 0 (terminal).
    Returns (advantages, returns), both (B, T) and 0 at padding.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask                       # (B, T) no leaks from padding
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)                                       # (B, T)
    last = torch.zeros_like(rewards[:, 0])                                # (B,) A_{t+1}
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)  # (B,)
        delta = rewards[:, t] + gamma * next_v - values[:, t]             # (B,)
        last = delta + gamma * lam * last                                 # (B,)
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask                                     # (B, T), (B, T)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    """
    Clipped surrogate (paper eq. 15): mean over tokens of max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)), ρ = π/π_old.
    Returns (loss, stats) with clipfrac, approx_kl (k3 between π_old and π), ratio mean and max.
    """
    log_ratio = (logprobs - old_logprobs) * mask                          # (b, Tr)
    ratio = torch.exp(log_ratio)                                          # (b, Tr)
    pg1 = -advantages * ratio                                             # (b, Tr)
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    with torch.no_grad():
        stats = dict(clipfrac=masked_mean((pg2 > pg1).float(), mask).item(),
                     approx_kl=masked_mean((ratio - 1) - log_ratio, mask).item(),
                     ratio_mean=masked_mean(ratio, mask).item(),
                     ratio_max=ratio.masked_fill(mask == 0, 0).max().item())
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip_eps):
    """
    Clipped value loss: ½·mean over tokens of max((V - R)², (clip(V, V_old ± ε_v) - R)²); clip_eps 0 = plain
    ½·MSE. Returns (loss, stats) with vf_clipfrac.
    """
    err = (values - returns) ** 2                                         # (b, Tr)
    if clip_eps > 0:
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        err_clip = (v_clip - returns) ** 2                                # (b, Tr)
        loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)
        clipfrac = masked_mean((err_clip > err).float(), mask).item()
    else:
        loss, clipfrac = 0.5 * masked_mean(err, mask), 0.0
    return loss, dict(vf_clipfrac=clipfrac)


class RunningMoments:
    """Running mean and std of every score seen so far (parallel-variance update, as the paper's code)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, x):
        """x (n,): fold a batch in."""
        n, m, v = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        delta, total = m - self.mean, self.count + n
        m2 = self.var * self.count + v * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self):
        return math.sqrt(max(self.var, 1e-16))


def process_scores(scores, running, mode, clip):
    """Raw RM scores (B,) -> processed (B,): `none`, `scale` (÷ running std), `norm_clip` (eq. 18)."""
    if mode == "none":
        return scores
    running.update(scores)
    if mode == "scale":
        return scores / running.std
    if mode == "norm_clip":
        return torch.clamp((scores - running.mean) / running.std, -clip, clip)
    raise ValueError(f"unknown score_norm {mode!r}; expected none, scale or norm_clip")


def kl_rewards(old_logprobs, ref_logprobs, mask, scores, kl_coef):
    """Per-token reward (B, Tr): -β·k1 on every response token, plus the score on the last real one (eq. 3)."""
    rewards = -kl_coef * (old_logprobs - ref_logprobs) * mask             # (B, Tr)
    last = last_token_index(mask)                                         # (B,) EOS position, or the last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def response_logits(model, seq, mask, n_prompt, temperature):
    """Logits (B, Tr, V) / τ that predicted each response token: only those positions reach the LM head."""
    h = model.hidden(seq, mask)                                           # (B, T, C)
    logits = model.logits(h[:, n_prompt - 1:-1])                         # (B, Tr, V)
    return logits if temperature == 1 else logits / temperature           # x / 1 = x: skip the pass


def response_values(critic, seq, mask, n_prompt):
    """Critic values (B, Tr) of the state before each response token."""
    return critic(seq, mask)[:, n_prompt - 1:-1]                          # (B, Tr)


def entropy_from_logits(logits):
    """Per-position entropy (B, T) of softmax(logits)."""
    logp = F.log_softmax(logits.float(), dim=-1)                          # (B, T, V)
    return -(logp.exp() * logp).sum(-1)                                   # (B, T)


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over masked tokens (1 = perfect critic, ≤ 0 = useless)."""
    var_r = masked_var(returns, mask)
    return (1 - masked_var(returns - values, mask) / var_r.clamp(min=1e-8)).item()


def collapse_signature(history, max_new_tokens, window):
    """
    The paper's pattern-collapse signature (§5.2, Fig. 4) in the last `window` iterations of `history`
    (list of metric dicts), compared with the window before: returns the reasons found, [] if none.
      length heading to the max (mean length ≥ 90% of max_new_tokens, or EOS rate < 50%),
      KL rising while the RM score rises and the gold reward falls.
    """
    if len(history) < 2 * window:
        return []
    now, before = history[-window:], history[-2 * window:-window]
    avg = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    reasons = []
    if avg(now, "length") >= 0.9 * max_new_tokens or avg(now, "eos_rate") < 0.5:
        reasons.append(f"length {avg(now, 'length'):.1f}/{max_new_tokens}, EOS rate {avg(now, 'eos_rate'):.2f}")
    if (avg(now, "kl_seq") > avg(before, "kl_seq") + 0.5 and avg(now, "score_raw") > avg(before, "score_raw")
            and avg(now, "gold") < avg(before, "gold") - 0.05):
        reasons.append(f"KL {avg(before, 'kl_seq'):.2f}->{avg(now, 'kl_seq'):.2f}, RM score up "
                       f"{avg(before, 'score_raw'):.2f}->{avg(now, 'score_raw'):.2f}, gold down "
                       f"{avg(before, 'gold'):.2f}->{avg(now, 'gold'):.2f}")
    return reasons


@torch.no_grad()
def rm_win_rate(rm, enc, prompts, responses, opponents, device, batch_size=64):
    """Win rate of `responses` over `opponents` on the same prompts judged by the reward model (tie = ½): the
    judge when there is no gold reward (real data). Say so wherever it is reported: the policy is trained on
    this very judge."""
    scores = lambda texts: [x for i in range(0, len(prompts), batch_size)
                            for x in score_texts(rm, enc, prompts[i:i + batch_size], texts[i:i + batch_size],
                                                 device).tolist()]
    return data.win_rate(scores(responses), scores(opponents))


def without_dropout(model_config):
    """A checkpoint's model_config -> GPTConfig with dropout 0. Every model after SFT and the RM (policy,
    reference, critic, frozen RM; RL, DPO, A-LoL, evaluation) runs without dropout, whatever the SFT stage
    trained with: dropout in the update's forward would make the first-minibatch ratio != 1 and the critic's
    rollout values differ from the values it is trained against."""
    return GPTConfig(**{**model_config, "dropout": 0.0})


def load_policy(path, stages=None):
    """A finished policy checkpoint -> (GPT without dropout, checkpoint dict); stages=None accepts every stage
    but the RM's."""
    ckpt = load_checkpoint(path, stages)
    if ckpt["stage"] == "rm":
        raise ValueError(f"{path}: is a reward-model checkpoint, not a policy")
    model = GPT(without_dropout(ckpt["model_config"]))
    load_weights(model, ckpt["model"], path)
    return model, ckpt


def load_models(sft_path, rm_path, device):
    """The start of every RL stage: the SFT policy (to train), a frozen copy of it (the reference) and the frozen
    reward model, on `device`; plus both checkpoint dicts. The RM must share the policy's vocabulary."""
    policy, sft = load_policy(sft_path, ("sft",))
    rm_ckpt = load_checkpoint(rm_path, "rm", sft["tokenizer_id"])
    for k in ("vocab_size", "pad_id"):
        if rm_ckpt["model_config"][k] != sft["model_config"][k]:
            raise ValueError(f"{rm_path}: model_config {k}={rm_ckpt['model_config'][k]} but {sft_path} has "
                             f"{sft['model_config'][k]}; the RM must score the policy's tokens")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = ScalarHeadGPT(without_dropout(rm_ckpt["model_config"]))
    load_weights(rm, rm_ckpt["model"], rm_path)
    rm.eval().requires_grad_(False)
    return policy.to(device), ref.to(device), rm.to(device), sft, rm_ckpt


def load_critic(init, sft, rm_ckpt, sft_path, rm_path):
    """The trainable critic (paper §5.3.3), without dropout: a copy of the reward model (init="rm") or the SFT
    backbone with a fresh scalar head (init="sft"), from the loaded checkpoint dicts."""
    critic = ScalarHeadGPT(without_dropout((rm_ckpt if init == "rm" else sft)["model_config"]))
    if init == "rm":
        load_weights(critic, rm_ckpt["model"], rm_path)
    else:
        load_weights(critic.backbone, sft["model"], sft_path)
    return critic


# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def rollout(policy, ref, rm, critic, enc, prompts, cfg, device, generator, fast=True):
    """Steps 1-2 for prompt strings: encode and left-pad them, then rollout_ids. (critic may be None)"""
    room = policy.cfg.block_size - cfg.max_new_tokens
    p_ids, p_mask = pad_batch([fit_prompt(tok.encode(enc, p), room, cfg.truncate_prompts, f"prompt {p[:40]!r}")
                               for p in prompts], tok.pad_id(enc), left=True)  # (B, Tp)
    return rollout_ids(policy, ref, rm, critic, p_ids.to(device), p_mask.to(device), cfg, tok.eos_id(enc),
                       tok.pad_id(enc), generator, fast)


@torch.no_grad()
def rollout_ids(policy, ref, rm, critic, p_ids, p_mask, cfg, eos_id, pad_id, generator, fast=True):
    """
    Steps 1-2: sample responses to left-padded prompt ids (B, Tp), then score them with one no-grad pass per
    model (critic may be None: RLOO, RAFT). eos_id=None samples exactly max_new_tokens (the benchmark).
    fast=True takes old_logprobs and the entropy from the sampling loop, which already computed
    softmax(logits / τ) at every response position: the same numbers as a second forward pass of the policy
    (up to float rounding; tests/test_perf.py), for one fewer full forward. fast=False runs that forward and
    also returns the exact per-position KL(π || π_ref) over the vocabulary (a monitoring metric).
    Under autocast the second forward always runs (fast is ignored): the sampling loop's one-token-at-a-time
    bf16 forward rounds differently from the update's full forward, so its log-probs would move the
    first-minibatch ratio away from 1 (tests/test_perf.py measures both).
    """
    policy.eval()
    if critic is not None:
        critic.eval()
    fast = fast and not torch.is_autocast_enabled(p_ids.device.type)
    t0 = time.time()
    response, gen_logprobs, gen_entropy = policy.generate(
        p_ids, p_mask, cfg.max_new_tokens, eos_id, pad_id, temperature=cfg.temperature, generator=generator,
        return_logprobs=True)                                             # (B, Tr) each
    t_gen = time.time() - t0
    mask = (response != pad_id).long()                                    # (B, Tr) 1 up to and incl. EOS
    seq = torch.cat([p_ids, response], dim=1)                             # (B, T)
    seq_mask = torch.cat([p_mask, mask], dim=1)                           # (B, T)
    Tp = p_ids.shape[1]
    ref_logits = response_logits(ref, seq, seq_mask, Tp, cfg.temperature)  # (B, Tr, V)
    ref_logprobs = logprobs_from_logits(ref_logits, response) * mask      # (B, Tr)
    out = dict(exact_kl=None)
    if fast:
        old_logprobs, entropy = gen_logprobs * mask, gen_entropy * mask   # (B, Tr) each
    else:
        logits = response_logits(policy, seq, seq_mask, Tp, cfg.temperature)  # (B, Tr, V)
        old_logprobs = logprobs_from_logits(logits, response) * mask      # (B, Tr) as the update computes it
        logp, ref_logp = F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1)  # (B, Tr, V)
        entropy = entropy_from_logits(logits) * mask                      # (B, Tr)
        out["exact_kl"] = (logp.exp() * (logp - ref_logp)).sum(-1) * mask  # (B, Tr) KL(π||π_ref) per position
        del logits, logp, ref_logp
    del ref_logits                                                        # no full-vocab tensor outlives its use
    values = (response_values(critic, seq, seq_mask, Tp).float() * mask if critic is not None
              else torch.zeros_like(old_logprobs))                        # (B, Tr); no critic: zeros (RLOO, RAFT)
    scores = rm.score(seq, seq_mask).float()                              # (B,) at the last real token
    out.update(seq=seq, seq_mask=seq_mask, response=response, mask=mask, n_prompt=Tp,
               old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, values=values, scores=scores,
               entropy=entropy, t_gen=t_gen, t_score=time.time() - t0 - t_gen)
    return out


def ppo_losses(policy, critic, ro, idx, adv, returns, cfg, update_policy):
    """
    The PPO losses on rollout rows `idx` (n,) with their (whitened/clipped) advantages `adv` (n, Tr):
        loss = vf_coef·vf_loss [+ pg_loss - entropy_coef·entropy]     (token means over these rows)
    Returns (loss, stats).
    """
    Tp, m = ro["n_prompt"], ro["mask"][idx]                               # (n, Tr)
    seq, seq_mask = ro["seq"][idx], ro["seq_mask"][idx]                   # (n, T)
    values = response_values(critic, seq, seq_mask, Tp)                   # (n, Tr)
    vf_loss, vstats = ppo_value_loss(values, ro["values"][idx], returns[idx], m, cfg.vf_clip)
    loss = cfg.vf_coef * vf_loss
    st = dict(vf_loss=vf_loss.item(), **vstats)
    if update_policy:
        logits = response_logits(policy, seq, seq_mask, Tp, cfg.temperature)    # (n, Tr, V)
        logprobs = logprobs_from_logits(logits, ro["response"][idx])            # (n, Tr)
        pg_loss, pstats = ppo_policy_loss(logprobs, ro["old_logprobs"][idx], adv, m, cfg.clip_eps)
        loss = loss + pg_loss
        st.update(pg_loss=pg_loss.item(), **pstats)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * masked_mean(entropy_from_logits(logits), m)
    return loss, st


def ppo_update(policy, critic, opt, ro, advantages, returns, cfg, update_policy, generator, ptx_data=None,
               pad_id=None, where="PPO update"):
    """
    Step 6 (paper eqs. 15-17): cfg.ppo_epochs passes over the rollout `ro` in shuffled minibatches of
    cfg.minibatch; each minibatch takes one optimizer step on
        loss = pg_loss + vf_coef·vf_loss - entropy_coef·entropy + ptx_coef·ptx_loss
    with one global grad-norm clip over policy and critic. With update_policy=False only the critic learns
    (critic pre-training, §5.3.3). cfg.micro_batch > 0 accumulates a minibatch's gradient over micro-batches of
    that many rows, each weighted by its share of the minibatch's tokens, so the step is the same (up to float
    summation order) with less memory. Returns one stats dict per minibatch.
    """
    policy.train()
    critic.train()
    params = [p for g in opt.param_groups for p in g["params"]]
    device, B = ro["seq"].device, ro["seq"].shape[0]
    stats = []
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=generator).to(device)
        for start in range(0, B, cfg.minibatch):
            idx = perm[start:start + cfg.minibatch]                       # (b,)
            m = ro["mask"][idx]                                           # (b, Tr)
            adv = advantages[idx]                                         # (b, Tr)
            if cfg.adv_whiten:                                            # over the whole minibatch
                adv = masked_whiten(adv, m)
            if cfg.adv_clip > 0:
                adv = torch.clamp(adv, -cfg.adv_clip, cfg.adv_clip)
            opt.zero_grad(set_to_none=True)
            micro = cfg.micro_batch or len(idx)
            n_tok, total, st = m.sum(), 0.0, {}
            for c in range(0, len(idx), micro):                           # gradient accumulation
                sl = slice(c, c + micro)
                w = (m[sl].sum() / n_tok).item()                          # this chunk's share of the tokens
                with autocast(device, cfg.amp):  # bf16 matmuls on CUDA; a no-op on CPU and MPS
                    loss, st_c = ppo_losses(policy, critic, ro, idx[sl], adv[sl], returns, cfg, update_policy)
                (w * loss).backward()
                total += w * loss.item()
                for k, v in st_c.items():                                 # token-weighted means, the max of maxes
                    st[k] = max(st.get(k, v), v) if k == "ratio_max" else st.get(k, 0.0) + w * v
            if update_policy and cfg.ptx_coef > 0:                        # PPO-ptx (eq. 17): one SFT batch
                batch = [ptx_data[i] for i in torch.randint(len(ptx_data), (cfg.ptx_batch,), generator=generator)]
                ids, amask, lmask = collate(batch, pad_id, device)        # (p, T') each
                with autocast(device, cfg.amp):
                    ptx = sft_loss(policy(ids, amask), ids, lmask)
                (cfg.ptx_coef * ptx).backward()
                total += cfg.ptx_coef * ptx.item()
                st.update(ptx_loss=ptx.item())
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            check_finite(where, loss=total, grad_norm=gnorm.item())
            opt.step()
            st["grad_norm"] = gnorm.item()
            stats.append(st)
    return stats


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    TRUNCATIONS.reset(cfg.log_truncations)
    if cfg.rollout_batch % cfg.minibatch:
        raise ValueError(f"minibatch {cfg.minibatch} must divide rollout_batch {cfg.rollout_batch}")
    if cfg.score_norm not in ("none", "scale", "norm_clip"):
        raise ValueError(f"--score_norm {cfg.score_norm!r}: expected none, scale or norm_clip")
    if cfg.critic_init not in ("rm", "sft"):
        raise ValueError(f"--critic_init {cfg.critic_init!r}: expected rm or sft")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)

    # 0. models: policy and reference are SFT copies; the RM is frozen; the critic is a trainable RM copy
    policy, ref, rm, sft, rm_ckpt = load_models(cfg.sft_ckpt, cfg.rm_ckpt, device)
    if cfg.policy_init == "random":  # the ablation of Fig. 8: same architecture, fresh GPT init, SFT reference
        policy = GPT(without_dropout(sft["model_config"])).to(device)
    elif cfg.policy_init != "sft":  # Fig. 8's "pre-trained, no SFT" policy: GPT-2 weights of the SFT model's shape
        mc = policy.cfg
        policy = load_gpt2(cfg.policy_init, mc.block_size, mc.vocab_size, mc.pad_id).to(device)
        if asdict(policy.cfg) != asdict(mc):
            raise ValueError(f"--policy_init {cfg.policy_init}: GPT-2 of shape {asdict(policy.cfg)} but the SFT "
                             f"policy (and its reference) has {asdict(mc)}")
    enc = tok.get_tokenizer(sft["tokenizer"])
    if cfg.max_new_tokens >= policy.cfg.block_size:
        raise ValueError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in block_size "
                         f"{policy.cfg.block_size}")
    critic = load_critic(cfg.critic_init, sft, rm_ckpt, cfg.sft_ckpt, cfg.rm_ckpt).to(device)
    opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": cfg.policy_lr},
                             {"params": critic.parameters(), "lr": cfg.critic_lr}], weight_decay=0.0,
                            betas=(0.9, 0.95), eps=1e-8)
    print(f"device={device} config={asdict(cfg)}")

    has_gold = cfg.data == "toy"
    if has_gold:
        splits = data.prompt_splits(sft["config"]["seed"])
    else:  # HH-RLHF records split as the SFT and RM stages split them; PPO needs only their prompts
        hh = hh_rlhf.hh_splits(cfg.data, sft["config"]["seed"])
        splits = {k: data.prompts_of(v) for k, v in hh.items()}
    rng = random.Random(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eval_prompts = data.sample_prompts(splits["val"], cfg.n_eval_prompts, random.Random(cfg.seed + 1))
    sft_eval = sample_responses(ref, enc, eval_prompts, cfg.max_new_tokens, cfg.temperature, device,
                                torch.Generator(device=device).manual_seed(cfg.seed + 1))
    ptx_data = None
    if cfg.ptx_coef > 0:
        demos = (data.make_demonstrations(data.sample_prompts(splits["train"], 4000, rng), cfg.seed + 2) if has_gold
                 else [(r["prompt"], r["chosen"]) for r in hh["train"]])
        ptx_data = encode_demos(enc, demos, policy.cfg.block_size)

    running = RunningMoments()
    os.makedirs(cfg.out_dir, exist_ok=True)
    log_path, ckpt_path = os.path.join(cfg.out_dir, "ppo_log.jsonl"), os.path.join(cfg.out_dir, "ppo.pt")
    history, warned, start, keep, t_before = [], False, 1, None, 0.0
    if cfg.resume:  # restore both networks, the optimizer, the running score statistics and every RNG
        ck = load_checkpoint(ckpt_path, "ppo", sft["tokenizer_id"], finished=False)
        check_resume(ck, cfg, ckpt_path)
        load_weights(policy, ck["model"], ckpt_path)
        load_weights(critic, ck["critic"], ckpt_path)
        opt.load_state_dict(ck["optimizer"])
        running.mean, running.var, running.count = ck["running"]
        set_rng_state(ck["rng"], rng, gen)
        history, warned, start = ck["history"], ck["warned"], ck["step"] + 1
        keep, t_before = ck["log_lines"], ck["train_time_s"]
        print(f"resuming from {ckpt_path} after iteration {ck['step']}")
    log = JsonlLog(log_path, keep)
    progress = Progress(cfg.n_iters)
    t_start = time.time() - t_before

    def save(it, metrics=None):
        """Policy weights for evaluate.py and the next stages, plus everything --resume needs."""
        save_checkpoint(ckpt_path, stage="ppo", model=policy.state_dict(), model_config=sft["model_config"],
                        critic=critic.state_dict(), tokenizer=sft["tokenizer"], tokenizer_id=sft["tokenizer_id"],
                        step=it, done=metrics is not None, metrics=metrics or {}, config=asdict(cfg),
                        sft_ckpt=cfg.sft_ckpt, rm_ckpt=cfg.rm_ckpt, optimizer=opt.state_dict(),
                        running=[running.mean, running.var, running.count], rng=rng_state(rng, gen),
                        history=history, warned=warned, log_lines=log.n_lines, train_time_s=time.time() - t_start)

    for it in range(start, cfg.n_iters + 1):
        if cfg.stop_after and it == cfg.stop_after + 1:
            print(f"stopping after iteration {cfg.stop_after} as asked (--stop_after); continue with --resume true")
            return None
        t_it = time.time()
        # 1-2. rollout and scoring
        prompts = data.sample_prompts(splits["train"], cfg.rollout_batch, rng)
        with autocast(device, cfg.amp):
            ro = rollout(policy, ref, rm, critic, enc, prompts, cfg, device, gen, cfg.fast_rollout)
        mask = ro["mask"]                                                 # (B, Tr)
        texts = [tok.decode(enc, r) for r in ro["response"].tolist()]
        gold = torch.tensor([data.gold_reward(p, r) if has_gold else float("nan") for p, r in zip(prompts, texts)])
        check_finite(f"PPO iteration {it}", rm_score=ro["scores"].sum(), value=ro["values"].sum())
        # 3. score processing (running statistics over all scores seen so far)
        scores = process_scores(ro["scores"].float(), running, cfg.score_norm, cfg.score_clip)  # (B,)
        ended = (ro["response"] == tok.eos_id(enc)).any(1)                # (B,)
        scores = scores - cfg.missing_eos_penalty * (~ended).float()
        # 4. per-token rewards: -β·k1 everywhere, the score on the last real token
        rewards = kl_rewards(ro["old_logprobs"], ro["ref_logprobs"], mask, scores, cfg.kl_coef)  # (B, Tr)
        # 5. GAE over response tokens; returns are the value targets (un-whitened)
        advantages, returns = compute_gae(rewards, ro["values"], mask, cfg.gamma, cfg.lam)      # (B, Tr) each
        # 6. PPO update: ppo_epochs passes over shuffled minibatches
        t_train = time.time()
        update_policy = it > cfg.critic_pretrain_iters
        stats = ppo_update(policy, critic, opt, ro, advantages, returns, cfg, update_policy,
                           torch.Generator().manual_seed(rng.randrange(2**31)), ptx_data, tok.pad_id(enc),
                           where=f"PPO iteration {it}")
        t_train = time.time() - t_train

        # monitoring (paper §5.2 "action space modeling metrics" + the usual PPO diagnostics)
        k1 = (ro["old_logprobs"] - ro["ref_logprobs"]) * mask            # (B, Tr)
        log_rho = -k1                                                     # log π_ref/π_old
        k3 = (torch.exp(log_rho) - 1 - log_rho) * mask                    # (B, Tr)
        n_tok = mask.sum()
        row = dict(iter=it, policy_updated=update_policy,
                   score_raw=ro["scores"].mean().item(), score_raw_std=ro["scores"].std().item(),
                   scores_raw=[round(x, 3) for x in ro["scores"].tolist()],   # the distribution (paper Fig. 13)
                   score=scores.mean().item(), gold=gold.mean().item(),
                   kl_seq=k1.sum(1).mean().item(), kl_token=(k1.sum() / n_tok).item(),
                   kl_k3_seq=k3.sum(1).mean().item(),
                   length=mask.sum(1).float().mean().item(), eos_rate=ended.float().mean().item(),
                   perplexity=math.exp(-(ro["old_logprobs"].sum() / n_tok).item()),
                   entropy=(ro["entropy"].sum() / n_tok).item(),
                   **({} if ro["exact_kl"] is None else {"kl_exact_seq": ro["exact_kl"].sum(1).mean().item()}),
                   adv_mean=masked_mean(advantages, mask).item(), return_mean=masked_mean(returns, mask).item(),
                   value_mean=masked_mean(ro["values"], mask).item(),
                   explained_var=explained_variance(ro["values"], returns, mask),
                   running_mean=running.mean, running_std=running.std,
                   policy_lr=cfg.policy_lr, critic_lr=cfg.critic_lr,
                   t_generate=ro["t_gen"], t_score=ro["t_score"], t_train=t_train, t_iter=time.time() - t_it)
        for k in stats[0]:
            vals = [s[k] for s in stats if k in s]
            row[k] = max(vals) if k == "ratio_max" else sum(vals) / len(vals)
        if it % cfg.eval_interval == 0 or it == cfg.n_iters:
            outs = sample_responses(policy, enc, eval_prompts, cfg.max_new_tokens, cfg.temperature, device,
                                    torch.Generator(device=device).manual_seed(cfg.seed + 1))
            row["win_rate_vs_sft"] = (data.gold_win_rate(eval_prompts, outs, sft_eval) if has_gold else
                                      rm_win_rate(rm, enc, eval_prompts, outs, sft_eval, device))
            order = torch.argsort(ro["scores"], descending=True).tolist()
            show = [order[0], order[len(order) // 2], order[-1]]          # best, median, worst RM score
            print(table([(prompts[i].strip(), texts[i], ro["scores"][i].item(), gold[i].item(), k1[i].sum().item())
                          for i in show], ["prompt", "response", "RM", "gold", "KL"], [30, 70, 5, 5, 5]))
        history.append(row)
        reasons = collapse_signature(history, cfg.max_new_tokens, cfg.collapse_window)
        row["collapse_warning"] = bool(reasons)
        if reasons and not warned:
            print(f"WARNING: pattern collapse signature at iteration {it} (paper §5.2): {'; '.join(reasons)}")
            warned = True
        log.write(**row)
        if it % cfg.ckpt_interval == 0 and it < cfg.n_iters:
            save(it)
        print(progress.line(it, f"RM {row['score_raw']:+.2f} gold {row['gold']:+.3f} KL {row['kl_seq']:.2f} "
                                f"len {row['length']:.1f} eos {row['eos_rate']:.2f} vf {row['vf_loss']:.3f}"
                                + ("" if update_policy else " (critic pre-training)")))

    total = time.time() - t_start
    metrics = {k: history[-1][k] for k in ("score_raw", "gold", "kl_seq", "length", "eos_rate")}
    metrics.update(train_time_s=total, collapse_warning=warned,
                   win_rate_vs_sft=history[-1].get("win_rate_vs_sft", float("nan")))
    save(cfg.n_iters, metrics)
    rows = read_jsonl(log_path)
    plot_curves(os.path.join(cfg.out_dir, "ppo_curves.png"), rows, "iter",
                [["score_raw"], ["gold"], ["kl_seq", "kl_k3_seq"], ["length"], ["perplexity"], ["win_rate_vs_sft"]],
                f"PPO ({cfg.preset}): RM score, gold reward, KL to SFT, length, perplexity, win rate vs SFT")
    TRUNCATIONS.summary("PPO")
    print(f"PPO done in {total:.0f}s: gold {metrics['gold']:.3f}, RM {metrics['score_raw']:.2f}, KL "
          f"{metrics['kl_seq']:.2f}, win rate vs SFT {metrics['win_rate_vs_sft']:.2f}"
          f"{', COLLAPSE WARNING' if warned else ''} -> {ckpt_path}")
    return metrics


if __name__ == "__main__":
    run_main(main)
