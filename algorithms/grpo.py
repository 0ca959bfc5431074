"""
The group-relative family: GRPO (Shao et al. 2024, DeepSeekMath §4.1), Dr. GRPO (Liu et al. 2025), DAPO (Yu et
al. 2025) and GSPO (Zheng et al. 2025), on the same toy task, SFT policy, reward model and evaluation as PPO.
Each variant is a preset; every difference between them is one switch below.

What GRPO drops from PPO-max: the critic and GAE (the baseline is the mean reward of G samples of the same
prompt), and the per-token KL reward (the KL to the reference is a term of the loss instead, so the advantage is
one number per response, the same on each of its tokens). One iteration (DSM Algorithm 1 with M = 1):
  1. sample   P prompts, G responses each (prompt-major rows p·G + j) from π_old = π_θ, with log π_old and
              log π_ref per token (runs.sample_and_score); reward r_i per response from the reward
              model, the rule-based verifier (RLVR) or the gold reward (--reward). DAPO: groups whose rewards are
              all equal are dropped and new prompts sampled in their place (dynamic sampling, DAPO §3.2, eq. 11);
              a soft penalty for responses near max_new_tokens (DAPO §3.4, eq. 13).
  2. advantage Â_i = (r_i - mean_group) / (std_group + eps) on every token of o_i (DSM §4.1.2); Dr. GRPO:
              r_i - mean_group (DRG §3.2); "batch": group mean, std over the whole batch.
  3. update   μ passes (--epochs) over shuffled minibatches of the clipped surrogate plus β·k3 (DSM eq. 3-4):
                ℓ_t = -min(ρ_t·Â, clip(ρ_t, 1-ε_low, 1+ε_high)·Â) + β·k3_t,   ρ_t = π_θ/π_old,
                k3_t = exp(d) - 1 - d with d = log π_ref - log π_θ   (DSM eq. 4: its value estimates KL(π_θ‖π_ref);
              as a loss term its expected gradient is that of KL(π_ref‖π_θ), the reverse: model.py)
              aggregated over tokens by --loss_agg; GSPO: ρ is the length-normalised sequence ratio (GSPO eq. 7).

Presets (the papers' choices; `python -m algorithms.grpo --preset NAME`):
  grpo     (= default) scale group, seq-mean-token-mean (DSM eq. 3), β = 0.04 (DSM §4.2), ε = 0.2
  dr_grpo  scale none, seq-mean-token-sum-norm with the generation budget as the constant (DRG §3.2), β = 0
  dapo     ε_low 0.2 / ε_high 0.28 (§3.1), dynamic sampling (§3.2), token-mean (§3.3), soft overlong
           punishment (§3.4), β = 0 (§2.3)
  gspo     sequence-level ratio and clipping, ε 3e-4 / 4e-4, four minibatches per rollout (GSPO §5.1), β = 0

Run (after train_sft.py and reward_model.py; writes out/grpo.pt, out/grpo_log.jsonl, out/grpo_curves.png; grpo.pt
also every --ckpt_interval iterations, for --resume true):
    python -m algorithms.grpo                                             # GRPO
    python -m algorithms.grpo --preset dapo --out_dir out/dapo
    python -m algorithms.grpo --reward verifier --tasks math --out_dir out/rlvr   # RLVR on the math prompts
    torchrun --standalone --nproc_per_node 2 -m algorithms.grpo  # data parallel (docs/data_parallel.md)
    python -m algorithms.grpo --help

Deliberate choices:
  1. G = 4 samples × 16 prompts = 64 responses per iteration and 2 minibatches (one pass, μ = 1): PPO's and
     RLOO's budget, so compare.py can match responses generated and optimizer steps. With μ = 1 and one
     minibatch the ratio would be exactly 1 and clipping would never bind (DSM's own setting, §4.2: then GRPO is
     REINFORCE with a group baseline); the second minibatch is the first place it can.
  2. The group std is the sample std (÷ G-1, Bessel), as TRL, verl, OpenRLHF and the CS336 tests compute it;
     eps = 1e-6 (verl) is added to it. Group statistics are computed in float64, and a group whose rewards are
     all equal gets Â = 0 exactly (detected as max = min, not as a small std: in float32, seven copies of 0.95
     have a mean of 0.94999993 and a std of 6.4e-8, and (r - mean)/(std + 1e-6) gives |Â| = 0.056 of pure noise;
     tests/test_grpo.py).
  3. k3 is computed as expm1(d) - d (the same value, without float32 cancellation for small d).
  4. "seq-mean-token-sum-norm" divides by the generation budget max_new_tokens (Dr. GRPO's L_max); the pure
     function's default is the batch's padded width.
  5. The learning rate is RLOO's 3e-5 (the papers' 1e-6 is for billion-parameter models).

Shape legend: P prompts, G samples per prompt, N = P·G responses, Tr response length, n minibatch rows.
"""
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F

import data
import tokenizer as tok
from model import k1, k3, logprobs_from_logits, masked_mean, response_logits
from runs import (Run, RunOptions, Samples, SanityChecks, ValidationMonitor, check_finite, clipped_tokens,
                  data_parallel, field, global_masked_moments, load_models, metrics_over_ranks, minibatch_means,
                  parse_config, plot_curves, rank, read_jsonl, run_main, run_meta, sample_and_score,
                  share_of_global_tokens, sum_over_ranks, world_size)
from tokenizer import encode_prompts


@dataclass
class Config(RunOptions):
    sft_ckpt: str = field("out/sft.pt", "SFT checkpoint: initial policy and frozen reference", input_file=True)
    rm_ckpt: str = field("out/rm.pt", "reward-model checkpoint (frozen; scored and logged whatever --reward is)",
                         input_file=True)
    n_iters: int = field(150, "iterations (sample, score, update)", range="[1, inf)")
    prompts_per_iter: int = field(16, "P prompts per iteration; N = P·G responses", range="[1, inf)", global_batch=True)
    samples_per_prompt: int = field(4, "G: responses sampled per prompt (at least 2)", range="[2, inf)")
    reward: str = field("rm", "rm (the reward model), verifier (a rule: data.verify; RLVR), gold (the true reward)",
                        choices=('rm', 'verifier', 'gold'))
    tasks: str = field("all", "prompt kinds to train on: all, or comma-separated of math, fact, harmful, open")
    scale: str = field("group", "advantage: group ((r - mean)/(std + eps) per group), batch (std over the batch), "
                                "none (r - group mean; Dr. GRPO)", choices=('group', 'batch', 'none'))
    loss_agg: str = field("seq-mean-token-mean", "token-mean (DAPO), seq-mean-token-mean (GRPO), "
                                                 "seq-mean-token-sum-norm (Dr. GRPO)",
                          choices=('token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum-norm'))
    ratio_level: str = field("token", "token (GRPO) or sequence (GSPO: length-normalised sequence ratio)",
                             choices=('token', 'sequence'))
    ratio_clip_low: float = field(0.2, "ε_low: ratios below 1 - ε_low are clipped (for Â < 0)", range="[0, 1)")
    ratio_clip_high: float = field(0.2, "ε_high: ratios above 1 + ε_high are clipped (for Â > 0); DAPO 0.28",
                                   range="[0, inf)")
    kl_coef: float = field(0.04, "β of the k3 KL term in the loss (DSM 0.04; Dr. GRPO, DAPO, GSPO 0)", range="[0, inf)")
    dynamic_sampling: bool = field(False, "drop groups whose rewards are all equal and sample new prompts instead")
    max_sample_rounds: int = field(3, "dynamic sampling: at most this many sampling rounds per iteration",
                                   range="[1, inf)")
    overlong_cache: int = field(0, "soft overlong punishment over the last N tokens of max_new_tokens (0 = off)",
                                range="[0, inf)")
    max_new_tokens: int = field(48, "longest response (the generation budget)", range="[1, inf)")
    temperature: float = field(1.0, "sampling temperature, used for every log-prob too", range="(0, inf)")
    epochs: int = field(1, "μ: passes over each batch of samples (the update's epochs)", range="[1, inf)")
    minibatches: int = field(2, "optimizer steps per pass", range="[1, inf)")
    lr: float = field(3e-5, "policy learning rate (AdamW)", range="(0, inf)")
    grad_clip: float = field(1.0, "grad-norm clip (0 = off)", range="[0, inf)")
    eval_interval: int = field(10, "every N iterations: win rate vs SFT on val prompts and a sample table",
                               range="[1, inf)")
    n_eval_prompts: int = field(64, "val prompts for the win rate during training", range="[1, inf)")


PRESETS = {
    "default": {},
    "grpo": {},
    "dr_grpo": dict(scale="none", loss_agg="seq-mean-token-sum-norm", kl_coef=0.0),
    "dapo": dict(ratio_clip_high=0.28, loss_agg="token-mean", kl_coef=0.0, dynamic_sampling=True, overlong_cache=12),
    "gspo": dict(ratio_level="sequence", ratio_clip_low=3e-4, ratio_clip_high=4e-4, kl_coef=0.0, minibatches=4),
    "tiny": dict(n_iters=3, prompts_per_iter=4, samples_per_prompt=2, max_new_tokens=16, eval_interval=2, n_eval_prompts=8),
    # debug: for stepping through in a debugger (docs/debugging.md): 2 prompts × 2 samples, one minibatch
    "debug": dict(n_iters=3, prompts_per_iter=2, samples_per_prompt=2, minibatches=1, max_new_tokens=12,
                  eval_interval=3, n_eval_prompts=4),
}
STD_EPS = 1e-6  # added to the std (choice 2)


# ----------------------------------------------------------------------------------------------------
# Pure functions (imported by the tests and notebooks)

def group_advantages(rewards, group_size, scale):
    """
    Step 2. rewards (N,) prompt-major, G = group_size consecutive samples per prompt -> advantages (N,):
      group  (r - group mean) / (group std + eps)         (DSM §4.1.2)
      batch  (r - group mean) / (std of the whole batch + eps)
      none   r - group mean                                 (Dr. GRPO §3.2)
    std is the sample std (÷ G-1), eps = 1e-6; a group whose rewards are all equal gets exactly 0 (choice 2).
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale {scale!r}: must be one of group, batch, none")
    r = rewards.double().view(-1, group_size)                            # (P, G)
    adv = r - r.mean(1, keepdim=True)                                     # (P, G)
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + STD_EPS)                    # (P, G)
    elif scale == "batch":                                               # torchrun: the std of every rank's batch
        std = r.std() if world_size() == 1 else global_masked_moments(r, torch.ones_like(r))[1].sqrt()
        adv = adv / (std + STD_EPS)
    flat = r.max(1, keepdim=True).values == r.min(1, keepdim=True).values  # (P, 1) no spread: no signal
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    return adv.masked_fill(flat, 0.0).view(-1).to(dtype)                  # (N,)


def aggregate_loss(loss_per_token, mask, mode, norm_len=None):
    """
    Per-token losses (B, Tr) -> one number, over the tokens where mask (B, Tr) is 1:
      token-mean               Σ m·ℓ / Σ m over the whole batch                (DAPO eq. 12)
      seq-mean-token-mean      (1/B) Σ_i (Σ_t m·ℓ / Σ_t m)                      (DSM eq. 3)
      seq-mean-token-sum-norm  (1/B) Σ_i Σ_t m·ℓ / norm_len                     (Dr. GRPO §3.2)
    norm_len defaults to the padded width Tr. The three weigh a token of a short response against one of a long
    response differently: per-sequence means give short responses' tokens more weight (the length bias).
    """
    m = mask.bool()
    masked = torch.where(m, loss_per_token, torch.zeros_like(loss_per_token))  # (B, Tr) NaN-safe (NaN·0 = NaN)
    if mode == "token-mean":
        return masked.sum() / m.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return (masked.sum(1) / m.sum(1).clamp(min=1)).mean()
    if mode == "seq-mean-token-sum-norm":
        return (masked.sum(1) / (norm_len or mask.shape[1])).mean()
    raise ValueError(f"loss_agg {mode!r}: must be one of token-mean, seq-mean-token-mean, seq-mean-token-sum-norm")


def grpo_policy_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_low, clip_high, kl_coef, loss_agg,
                     norm_len=None, ratio_level="token"):
    """
    Step 3, DSM eq. 3 with DAPO's two clip ranges: per token
        ℓ_t = -min(ρ_t·A, clip(ρ_t, 1 - clip_low, 1 + clip_high)·A) + kl_coef·k3_t,   ρ_t = exp(logprobs - old_logprobs)
    logprobs (B, Tr) of the policy being trained, old_logprobs / ref_logprobs (B, Tr) constants from the rollout,
    advantages (B,) one per sequence, mask (B, Tr). ratio_level="sequence" (GSPO eq. 7): every token of o_i uses
    s_i = exp(mean_t log ρ_t), so whole responses are clipped. Aggregated by aggregate_loss(loss_agg).
    Returns (loss, stats).
    """
    m = mask.bool()
    # padding first set to 0 in every input: a PAD position's log-prob is about -1e9 (model.PAD_LOGIT: the model never predicts PAD),
    # and exp of it in k3 would turn the masked-out gradient into inf·0 = NaN
    logprobs, old_logprobs, ref_logprobs = (torch.where(m, x, torch.zeros_like(x))
                                            for x in (logprobs, old_logprobs, ref_logprobs))  # (B, Tr) each
    ratio = importance_ratio(logprobs, old_logprobs, mask, ratio_level)   # (B, Tr)
    adv = advantages[:, None].to(ratio.dtype)                             # (B, 1) the same on every token
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)                    # (B, Tr)
    policy_term = -torch.min(ratio * adv, clipped * adv)                  # (B, Tr)
    kl_tokens = k3(logprobs, ref_logprobs)                            # (B, Tr)
    loss = aggregate_loss(policy_term + kl_coef * kl_tokens, mask, loss_agg, norm_len)
    with torch.no_grad():
        clip_low_hit = (ratio < 1 - clip_low) & (adv < 0)                 # (B, Tr) where the clip binds
        clip_high_hit = (ratio > 1 + clip_high) & (adv > 0)
        stats = dict(policy_loss=aggregate_loss(policy_term, mask, loss_agg, norm_len).item(),
                     kl_k3=masked_mean(kl_tokens, mask).item(), ratio=masked_mean(ratio, mask).item(),
                     clipfrac_low=masked_mean(clip_low_hit.float(), mask).item(),
                     clipfrac_high=masked_mean(clip_high_hit.float(), mask).item())
    return loss, stats


def importance_ratio(logprobs, old_logprobs, mask, ratio_level):
    """π_θ/π_old per token (B, Tr), log-ratio clamped to ±20 before exp; "sequence" (GSPO eq. 7): every token of
    a response gets exp(mean_t log ρ_t), the length-normalised sequence ratio."""
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs)).clamp(-20, 20)
    if ratio_level == "sequence":
        length = mask.sum(1, keepdim=True).clamp(min=1)                   # (B, 1)
        log_ratio = (log_ratio.sum(1, keepdim=True) / length).expand_as(log_ratio)
    return torch.exp(log_ratio)


def overlong_penalty(lengths, max_len, cache):
    """
    DAPO eq. 13, the soft overlong punishment added to the reward; lengths (N,) in tokens:
        0 up to max_len - cache, then falling linearly to -1 at max_len, and -1 beyond.
    """
    start = max_len - cache
    return (-(lengths.float() - start) / cache).clamp(-1.0, 0.0)          # (N,)


def groups_with_spread(rewards, group_size):
    """Dynamic sampling's filter (DAPO eq. 11): (P,) True for the groups whose rewards are not all equal."""
    r = rewards.view(-1, group_size)                                      # (P, G)
    return r.max(1).values != r.min(1).values


# ----------------------------------------------------------------------------------------------------
# Step 1: sampling and scoring

@dataclass
class Groups:
    """One iteration's scored groups (prompt-major rows p·G + j)."""
    rollout: Samples             # (N, ...) the responses with log π_old, log π_ref and RM scores
    prompts: list                # N prompt strings
    texts: list                  # N response strings
    rewards: torch.Tensor        # (N,) the training reward (overlong penalty included)
    gold: torch.Tensor           # (N,) gold reward
    verified: torch.Tensor       # (N,) 1.0 where data.verify confirms the response
    frac_zero_std: float         # share of the first round's groups whose rewards were all equal
    dropped: int                 # groups dropped by dynamic sampling
    rounds: int                  # sampling rounds
    generated: int               # responses sampled, kept or not


def join_rollouts(parts, pad_id):
    """
    Several Rollouts as one (dynamic sampling refills a batch from new rounds): prompts re-padded on the left to
    the longest prompt, responses on the right to the longest response. The model's position ids and attention
    mask make extra padding invisible (tests/test_model.py), so every log-prob stays valid.
    """
    if len(parts) == 1:
        return parts[0]
    Tp, Tr = max(p.n_prompt for p in parts), max(p.response.shape[1] for p in parts)

    def pad(x, left, right, value):
        return F.pad(x, (left, right), value=value)
    joined = {}
    for f in fields(Samples):
        values = [getattr(p, f.name) for p in parts]
        if f.name in ("seq", "seq_mask"):
            fill = pad_id if f.name == "seq" else 0
            values = [pad(torch.cat([pad(v[:, :p.n_prompt], Tp - p.n_prompt, 0, fill), v[:, p.n_prompt:]], 1),
                          0, Tr - (v.shape[1] - p.n_prompt), fill) for v, p in zip(values, parts)]
        elif isinstance(values[0], torch.Tensor) and values[0].dim() == 2:  # (n, Tr) per response token
            fill = pad_id if f.name == "response" else 0
            values = [pad(v, 0, Tr - v.shape[1], fill) for v in values]
        if isinstance(values[0], torch.Tensor):
            joined[f.name] = torch.cat(values)
    return replace(parts[0], **joined, n_prompt=Tp, t_generate=sum(p.t_generate for p in parts),
                   t_score=sum(p.t_score for p in parts))


def sample_groups(policy, ref, rm, enc, train_prompts, cfg, order_rng, generator, device):
    """Step 1: P prompts × G responses, scored; with dynamic sampling, zero-spread groups are replaced by new
    prompts' groups (up to max_sample_rounds rounds; the batch may end up smaller). Returns Groups."""
    G, eos_id, pad_id = cfg.samples_per_prompt, tok.eos_id(enc), tok.pad_id(enc)
    P = cfg.prompts_per_iter // world_size()                              # torchrun: this rank's share of the prompts
    room = policy.cfg.block_size - cfg.max_new_tokens
    parts, prompts, texts, ended, base, frac_zero, dropped, rounds, generated = [], [], [], [], [], 0.0, 0, 0, 0
    while rounds < (cfg.max_sample_rounds if cfg.dynamic_sampling else 1) and len(prompts) < P * G:
        rounds += 1
        batch = [p for p in data.sample_prompts(train_prompts, P, order_rng) for _ in range(G)]
        prompt_ids, prompt_mask = encode_prompts(enc, batch, room, cfg.truncate_prompts)   # (N, Tp) each
        ro = sample_and_score(policy, ref, rm, prompt_ids.to(device), prompt_mask.to(device), cfg.max_new_tokens,
                     cfg.temperature, eos_id, pad_id, generator)
        batch_replies = tok.decode_replies(enc, ro.response.tolist())             # texts and EOS flags
        generated += len(batch)
        reward = (ro.scores.float().cpu() if cfg.reward == "rm" else
                  torch.tensor(data.rule_rewards(cfg.reward, batch, batch_replies.texts, batch_replies.ended)))  # (N,)
        spread = groups_with_spread(reward, G)                                       # (P,)
        if rounds == 1:
            frac_zero = 1.0 - spread.float().mean().item()
        keep = spread if cfg.dynamic_sampling else torch.ones_like(spread)
        dropped += int((~keep).sum())
        room_left = P - len(prompts) // G
        rows = (torch.nonzero(keep).view(-1)[:room_left, None] * G + torch.arange(G)).view(-1)  # (kept·G,)
        parts.append(ro.rows(rows.to(ro.seq.device)))
        prompts += [batch[i] for i in rows.tolist()]
        texts += [batch_replies.texts[i] for i in rows.tolist()]
        ended += [batch_replies.ended[i] for i in rows.tolist()]
        base.append(reward[rows])
    ro = join_rollouts(parts, pad_id)
    rewards = torch.cat(base)                                                        # (N,)
    if cfg.overlong_cache:
        rewards = rewards + overlong_penalty(ro.mask.sum(1).cpu(), cfg.max_new_tokens, cfg.overlong_cache)
    gold = torch.tensor(data.rule_rewards("gold", prompts, texts, ended))             # (N,)
    verified = torch.tensor(data.rule_rewards("verifier", prompts, texts, ended))     # (N,)
    return Groups(ro, prompts, texts, rewards.to(device), gold, verified, frac_zero, dropped, rounds, generated)


# ----------------------------------------------------------------------------------------------------

def grpo_update(policy, opt, ro, adv, cfg, generator, where="GRPO update", token_ratios=None):
    """Step 3: μ = epochs passes over the batch in `minibatches` shuffled minibatches, one optimizer step each.
    adv (N,). Returns one stats dict per optimizer step; token_ratios, an (N, Tr) tensor if given, receives each
    token's ratio as the last pass saw it (the samples log shows it)."""
    policy.train()
    steps = []
    for epoch in range(cfg.epochs):
        for idx in torch.randperm(len(adv), generator=generator).to(adv.device).chunk(cfg.minibatches):
            logits = response_logits(policy, ro.seq[idx], ro.seq_mask[idx], ro.n_prompt, cfg.temperature)
            logprobs = logprobs_from_logits(logits, ro.response[idx])    # (n, Tr)
            if token_ratios is not None and epoch == cfg.epochs - 1:
                token_ratios[idx] = importance_ratio(logprobs.detach(), ro.old_logprobs[idx], ro.mask[idx],
                                                     cfg.ratio_level).float()
            loss, stats = grpo_policy_loss(logprobs, ro.old_logprobs[idx], ro.ref_logprobs[idx], adv[idx],
                                           ro.mask[idx], cfg.ratio_clip_low, cfg.ratio_clip_high, cfg.kl_coef, cfg.loss_agg,
                                           cfg.max_new_tokens, cfg.ratio_level)
            if cfg.loss_agg == "token-mean":                     # torchrun: one mean over every rank's tokens (1 alone)
                loss = loss * share_of_global_tokens(ro.mask[idx].sum(), ro.mask[idx].sum())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            check_finite(where, loss=loss.item(), grad_norm=gnorm.item())
            opt.step()
            steps.append(dict(stats, loss=loss.item(), grad_norm=gnorm.item()))
    return steps


def check_config(cfg):
    """One-line errors for option combinations (each value alone: runs.check_options)."""
    if (cfg.prompts_per_iter * cfg.samples_per_prompt) % cfg.minibatches:
        raise ValueError(f"--minibatches {cfg.minibatches} must divide the {cfg.prompts_per_iter * cfg.samples_per_prompt} "
                         f"responses (prompts_per_iter × samples_per_prompt)")
    n_ranks = world_size()                            # torchrun: every rank takes the same number of optimizer steps
    if n_ranks > 1 and cfg.dynamic_sampling:
        raise ValueError("--dynamic_sampling: not under torchrun (ranks would keep different numbers of groups and "
                         "take different numbers of steps); run it in one process")
    if (cfg.prompts_per_iter // n_ranks * cfg.samples_per_prompt) % cfg.minibatches:
        raise ValueError(f"--minibatches {cfg.minibatches} must divide each of the {n_ranks} processes' "
                         f"{cfg.prompts_per_iter // n_ranks * cfg.samples_per_prompt} responses")
    if cfg.overlong_cache >= cfg.max_new_tokens:
        raise ValueError(f"--overlong_cache {cfg.overlong_cache}: must be less than --max_new_tokens {cfg.max_new_tokens}")


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    check_config(cfg)
    with Run(cfg, "grpo", data_parallel=True) as run:
        device = run.device
        policy, ref, rm, sft, rm_ckpt = load_models(cfg.sft_ckpt, cfg.rm_ckpt, device, cfg.max_new_tokens)
        train_policy = data_parallel(policy)          # torchrun: the update's forward goes through it: gradients averaged
        enc = tok.get_tokenizer(sft["tokenizer"])
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        print(f"device={device} config={asdict(cfg)}")
        splits = data.only_kinds(data.prompt_splits(sft["config"]["seed"]), cfg.tasks)
        rank_seed = cfg.seed + 1000 * rank()          # torchrun: each rank its own prompts and samples (rank 0: seed)
        order_rng = random.Random(rank_seed)                                  # prompt draws, minibatch order
        sampling_gen = torch.Generator(device=device).manual_seed(rank_seed)  # token sampling
        budget = dict(generated=0, policy_steps=0)    # responses generated, optimizer steps taken: saved with the run
        sanity = SanityChecks("GRPO")
        budget.update(run.begin(opt, dict(model=policy), run_meta(sft, cfg), cfg.n_iters, order_rng, sampling_gen,
                                samples=True, state=budget))
        monitor = ValidationMonitor(enc, ref, rm, None, data.sample_prompts(
            splits["val"], cfg.n_eval_prompts, random.Random(cfg.seed + 1)), cfg.max_new_tokens, cfg.temperature,
            cfg.seed, run.samples, device)
        for it in range(run.start, cfg.n_iters + 1):
            t_it = time.time()
            # 1. G responses per prompt from π_old, scored (DAPO: zero-spread groups replaced)
            g = sample_groups(policy, ref, rm, enc, splits["train"], cfg, order_rng, sampling_gen, device)
            ro = g.rollout
            check_finite(f"GRPO iteration {it}", reward=g.rewards.sum())
            # 2. group-relative advantages, one per response (DSM §4.1.2; Dr. GRPO §3.2)
            adv = group_advantages(g.rewards, cfg.samples_per_prompt, cfg.scale)   # (N,)
            # 3. clipped surrogate + β·k3 over μ passes of minibatches (DSM eq. 3; DAPO eq. 10, 12; GSPO eq. 5)
            t_train = time.time()
            minibatch_gen = torch.Generator().manual_seed(order_rng.randrange(2**31))
            ratios = torch.ones_like(ro.old_logprobs)                      # (N, Tr) filled by the update
            steps = (grpo_update(train_policy, opt, ro, adv, cfg, minibatch_gen, f"GRPO iteration {it}", ratios)
                     if len(adv) else [])
            if not steps:
                print(f"iteration {it}: every sampled group had equal rewards in {g.rounds} rounds; no update")
            budget["generated"] += int(sum_over_ranks(torch.tensor(g.generated)))   # torchrun: every rank's
            budget["policy_steps"] += len(steps)
            n_tok = ro.mask.sum()
            kl_seq = k1(ro.old_logprobs, ro.ref_logprobs, ro.mask).sum(1)  # (N,) k1, logged as for PPO and RLOO
            ended = (ro.response == tok.eos_id(enc)).any(1)                  # (N,)
            # the classic silent failures, each a plain-English warning once per run (runs.py)
            sanity.rollout(it, kl_seq, ended)
            sanity.tied_groups(it, g.rewards, cfg.samples_per_prompt)
            sanity.advantages(it, adv)
            if steps:
                sanity.first_ratio(it, steps[0]["ratio"])                   # GRPO runs in fp32 on every device
            row = dict(iter=it, reward=g.rewards.mean().item(), reward_std=g.rewards.std().item(),
                       score_raw=ro.scores.mean().item(), gold=g.gold.mean().item(), verified=g.verified.mean().item(),
                       kl_seq=kl_seq.mean().item(), length=ro.mask.sum(1).float().mean().item(),
                       eos_rate=ended.float().mean().item(),
                       perplexity=math.exp(-(ro.old_logprobs.sum() / n_tok).item()),
                       entropy=(ro.entropy.sum() / n_tok).item(), frac_reward_zero_std=g.frac_zero_std,
                       groups=len(adv) // cfg.samples_per_prompt, groups_dropped=g.dropped, sample_rounds=g.rounds,
                       adv_abs_mean=adv.abs().mean().item(), **(minibatch_means(steps) if steps else {}),
                       lr=cfg.lr, t_generate=ro.t_generate, t_score=ro.t_score, t_train=time.time() - t_train,
                       t_iter=time.time() - t_it)
            row = metrics_over_ranks(row, sums=("groups", "groups_dropped"))  # torchrun: the global batch's metrics
            row["truncated_rate"] = 1.0 - row["eos_rate"]
            if it % cfg.eval_interval == 0 or it == cfg.n_iters:
                row["win_rate_vs_sft"] = monitor.win_rate(policy)
                if g.prompts:
                    token_adv = adv[:, None].float() * ro.mask            # (N, Tr) the same on every token
                    per_token = dict(k1=k1(ro.old_logprobs, ro.ref_logprobs, ro.mask), entropy=ro.entropy,
                                     k3=k3(ro.old_logprobs, ro.ref_logprobs) * ro.mask, advantage=token_adv,
                                     ratio=ratios, clipped=clipped_tokens(ratios, token_adv, cfg.ratio_clip_low,
                                                                          cfg.ratio_clip_high) * ro.mask)
                    monitor.keep_samples(it, policy, ro, g.prompts, g.texts, g.gold, per_token)
            run.log.write(**row)
            print(run.progress.line(it, f"reward {row['reward']:+.3f} RM {row['score_raw']:+.2f} gold {row['gold']:+.3f} "
                                        f"verified {row['verified']:.2f} KL {row['kl_seq']:.2f} len {row['length']:.1f} "
                                        f"clip {row.get('clipfrac_low', 0):.2f}/{row.get('clipfrac_high', 0):.2f}"
                                        + (f" dropped {g.dropped}" if cfg.dynamic_sampling else "")))
            run.save(it, **budget)

        metrics = {key: row[key] for key in ("reward", "score_raw", "gold", "verified", "kl_seq", "length", "eos_rate")}
        metrics.update(train_time_s=run.train_time(), win_rate_vs_sft=row.get("win_rate_vs_sft", float("nan")),
                       responses_generated=budget["generated"], policy_steps=budget["policy_steps"])
        plot_curves(os.path.join(cfg.out_dir, "grpo_curves.png"), read_jsonl(run.log_path), "iter",
                    [["reward"], ["score_raw"], ["gold", "verified"], ["kl_seq", "kl_k3"], ["length"],
                     ["clipfrac_low", "clipfrac_high", "frac_reward_zero_std"], ["entropy"], ["win_rate_vs_sft"]],
                    f"GRPO family (reward {cfg.reward}, scale {cfg.scale}, {cfg.loss_agg}, ε {cfg.ratio_clip_low}/"
                    f"{cfg.ratio_clip_high}, β {cfg.kl_coef}, {cfg.ratio_level} ratio"
                    f"{', dynamic sampling' if cfg.dynamic_sampling else ''})")
        run.finish(metrics, budget["generated"], budget["policy_steps"])
        print(f"GRPO done in {metrics['train_time_s']:.0f}s: gold {metrics['gold']:.3f}, verified {metrics['verified']:.2f}, "
              f"RM {metrics['score_raw']:.2f}, KL {metrics['kl_seq']:.2f}, win rate vs SFT {metrics['win_rate_vs_sft']:.2f} "
              f"-> {run.ckpt_path}")
        return metrics


if __name__ == "__main__":
    run_main(main)
