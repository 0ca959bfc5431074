"""
Stage 3: token-level PPO with GAE and a per-token KL penalty to the frozen SFT reference, every
trick of the PPO-max recipe a switch: Zheng et al. 2023, "Secrets of RLHF in Large Language Models
Part I: PPO", arXiv 2307.04964 ("the paper"; "the code" is its released MOSS-RLHF trainer).

One PPO iteration, as numbered in main():
  1-2. rollout  responses to left-padded prompts (KV cache) with old_logprobs (the policy that
                sampled), ref_logprobs (frozen SFT), the RM score and the critic's values  §3.1-3.2
  3. score      none | scale (÷ running std) | norm_clip (running mean/std, clip ±δ)     eq. 18
  4. reward     r_t = -β·(old_logprobs - ref_logprobs)_t on every token, r_T += score   eqs. 3, 19
  5. GAE        δ_t = r_t + γV_{t+1} - V_t, A_t = Σ (γλ)^l δ_{t+l}, returns = A + V    eqs. 7-11
  6. update     clipped surrogate + clipped value loss (+ entropy, + PTX), epochs × minibatches,
                one global grad-norm clip over policy and critic                 eqs. 15-17, §5.4
The penalty's k1 sums to an unbiased estimate of KL(π‖π_ref) (model.py); every log-prob is at the
sampling temperature.

Run (after train_sft.py and reward_model.py; writes out/ppo.pt, ppo_log.jsonl, ppo_curves.png):
    python ppo_rlhf.py                                         # --preset ppo_max, the default
    python ppo_rlhf.py --preset vanilla --out_dir out/vanilla  # no KL, no score norm, no clips
    python ppo_rlhf.py --preset vanilla_pg --out_dir out/vpg   # Back to Basics' vanilla PG
    python ppo_rlhf.py --kl_coef 0.1 --score_norm scale        # any switch on its own
    torchrun --standalone --nproc_per_node 2 ppo_rlhf.py       # docs/data_parallel.md

Where the paper and its code disagree, or we differ from both (docs/ppo.md says why):
  1. Score processing: the paper's norm + clip (eq. 18) by default; the code's scripts only scale.
  2. GAE λ = 0.95 and γ = 1, as the code (the paper's App. C.3: λ = 0.9).
  3. Critic pre-training (§5.3.3): the first critic_pretrain_iters update only the critic.
  4. PTX (eq. 17) is a switch of weight 0, as the code's scripts; its data: the demonstrations.
  5. old_logprobs come from the sampling loop (--fast_rollout); a second forward under bf16.
  6. Tiny-model learning rates; β = 0.1 (the code's zh script); one optimiser, two parameter
     groups, one global grad-norm clip, as the code; dropout off in every model.

Shape legend: B rollouts, Tp prompt length (left-padded), Tr response length (right-padded with
PAD after EOS), T = Tp + Tr, V vocab, b minibatch rows. `mask` (B, Tr): 1 on real response tokens.
"""
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

import data
import tokenizer as tok
from model import (entropy_from_logits, k1, last_token_index, logprobs_from_logits, masked_mean,
                   response_logits, response_values)
from runs import (Run, RunOptions, SanityChecks, ValidationMonitor, autocast, check_finite,
                  data_parallel, field, gather_rows, global_masked_moments, load_critic,
                  load_models, log_ppo_iteration, metrics_over_ranks, minibatch_means, parse_config,
                  plot_curves, ppo_iteration_metrics, rank, read_jsonl, run_main, run_meta,
                  sample_and_score, share_of_global_tokens, uses_bf16, world_size)
from tokenizer import collate, encode_demos, encode_prompts
from train_sft import sft_loss


@dataclass
class Config(RunOptions):
    sft_ckpt: str = field("out/sft.pt", "SFT checkpoint: policy and frozen reference", input_file=True)
    rm_ckpt: str = field("out/rm.pt", "reward-model checkpoint (frozen; the critic's init)",
                         input_file=True)
    data: str = field("toy", "toy (with a gold reward), or HH-RLHF .jsonl/.jsonl.gz file(s), "
                             "comma-separated (the RM judges the win rate)", input_file=True)
    # rollout
    n_iters: int = field(150, "iterations, critic pre-training included", range="[1, inf)")
    rollout_batch: int = field(64, "prompts (= responses) per iteration", range="[1, inf)",
                               global_batch=True)
    max_new_tokens: int = field(48, "longest response (no EOS by then: cut)", range="[1, inf)")
    temperature: float = field(1.0, "sampling temperature, also of every log-prob", range="(0, inf)")
    fast_rollout: bool = field(True, "old_logprobs from the sampling loop (false: a second forward, "
                                     "which also logs the exact KL)")
    # score and reward (paper §5.3.1, eq. 18; §3.1 eq. 3)
    reward: str = field("rm", "rm, or a rule of the toy task in its place: verifier (RLVR) or gold",
                        choices=("rm", "verifier", "gold"))
    tasks: str = field("all", "prompt kinds (toy): all, or some of math,fact,harmful,open")
    score_norm: str = field("norm_clip", "scale: ÷ running std; norm_clip: running mean/std, clip",
                            choices=("none", "scale", "norm_clip"))
    score_clip: float = field(0.8, "δ for norm_clip", range="(0, inf)")
    missing_eos_penalty: float = field(0.0, "subtracted from scores without EOS", range="[0, inf)")
    kl_coef: float = field(0.1, "β of the per-token KL penalty (paper 0.05-0.2)", range="[0, inf)")
    # GAE (§3.1 eqs. 7-11)
    gamma: float = field(1.0, "discount", range="[0, 1]")
    lam: float = field(0.95, "GAE λ (code 0.95; paper App. C.3 0.9)", range="[0, 1]")
    adv_whiten: bool = field(False, "whiten advantages per minibatch (off in PPO-max)")
    adv_clip: float = field(0.0, "clip advantages to ±adv_clip (0 = off)", range="[0, inf)")
    # losses (eqs. 15-17)
    ratio_clip: float = field(0.2, "ε: π/π_old clipped to [1-ε, 1+ε] (eq. 15)", range="(0, 1)")
    vf_clip: float = field(0.2, "value clip ε_v around the rollout values (0 = off)", range="[0, inf)")
    vf_coef: float = field(1.0, "value-loss weight", range="[0, inf)")
    entropy_coef: float = field(0.0, "entropy bonus weight (the paper: 0)", range="[0, inf)")
    ptx_coef: float = field(0.0, "weight of the SFT loss term (PPO-ptx)", range="[0, inf)")
    ptx_batch: int = field(16, "SFT demonstrations per minibatch (PTX)", range="[1, inf)",
                           global_batch=True)
    # optimisation
    epochs: int = field(1, "passes over each batch of rollouts (the code: 1)", range="[1, inf)")
    minibatches: int = field(2, "optimizer steps per pass", range="[1, inf)")
    policy_lr: float = field(3e-5, "policy learning rate", range="(0, inf)")
    critic_lr: float = field(1e-4, "critic learning rate", range="(0, inf)")
    grad_clip: float = field(1.0, "global grad-norm clip (0 = off)", range="[0, inf)")
    critic_init: str = field("rm", "rm (a copy of the RM) or sft (SFT body, new head)",
                             choices=("rm", "sft"))
    policy_init: str = field("sft", "sft, or (§5.3.3 Fig. 8; the reference stays SFT) random, or "
                                    "GPT-2 weights: gpt2 or a local file/folder", input_file=True)
    critic_pretrain_iters: int = field(10, "first iterations train only the critic (§5.3.3)",
                                       range="[0, inf)")
    # monitoring
    eval_interval: int = field(10, "every N iterations: win rate vs SFT, samples", range="[1, inf)")
    n_eval_prompts: int = field(64, "val prompts for the win rate", range="[1, inf)")
    collapse_window: int = field(10, "iterations the collapse warning compares", range="[1, inf)")
    amp: bool = field(True, "bf16 autocast on CUDA (CPU and MPS run fp32)")


PRESETS = {
    "ppo_max": {},
    "vanilla": dict(kl_coef=0.0, score_norm="none", vf_clip=0.0, grad_clip=0.0,
                    critic_pretrain_iters=0),
    # Back to Basics eq. 9: return-to-go (γ = λ = 1) minus the critic, one step per batch (ρ = 1)
    "vanilla_pg": dict(gamma=1.0, lam=1.0, epochs=1, minibatches=1, vf_clip=0.0, score_norm="none",
                       critic_pretrain_iters=0),
    "small": dict(n_iters=80, rollout_batch=32, max_new_tokens=32, policy_lr=1e-4,
                  critic_pretrain_iters=5, eval_interval=10, n_eval_prompts=32, collapse_window=5),
    "tiny": dict(n_iters=4, rollout_batch=8, minibatches=2, max_new_tokens=12,
                 critic_pretrain_iters=1, eval_interval=2, n_eval_prompts=8, collapse_window=2,
                 ptx_batch=4),
    # debug (docs/debugging.md): 4 rollouts, one minibatch, the policy trained from iteration 1,
    # so from iteration 2 on step 4's KL reward is not 0
    "debug": dict(n_iters=3, rollout_batch=4, minibatches=1, max_new_tokens=12,
                  critic_pretrain_iters=0, eval_interval=3, n_eval_prompts=4, collapse_window=2,
                  ptx_batch=4),
}


# -------------------------------------------------------------------------------------------
# Step 2's values and steps 3-6 as functions (the tests, the notebooks and the course use them)

@torch.no_grad()
def critic_values(critic, ro):
    """The critic's V(s_t) (B, Tr) before each response token of the rollouts ro; 0 at padding."""
    critic.eval()
    return response_values(critic, ro.seq, ro.seq_mask, ro.n_prompt).float() * ro.mask  # (B, Tr)


def compute_gae(rewards, values, mask, gamma, lam):
    """
    Generalised advantage estimation over response tokens (eqs. 7-11), right-padded (B, T):
        δ_t = r_t + γ·V_{t+1} - V_t,   A_t = δ_t + γλ·A_{t+1},   returns_t = A_t + V_t
    Values and rewards at padding are zeroed first, so the value after the last token is 0.
    Returns (advantages, returns), both (B, T) and 0 at padding.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask  # (B, T) no leaks from padding
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


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, ratio_clip):
    """
    Clipped surrogate (eq. 15): mean over tokens of max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)), ρ = π/π_old,
    ε = ratio_clip; logprobs (b, Tr) carry the gradient, old_logprobs and advantages are constants.
    Returns (loss, stats), floats over the tokens where mask is 1: clipfrac (share where the
    clipped term is the larger), approx_kl (k3 of π_old to π: mean of (ρ - 1) - log ρ),
    ratio_mean, ratio_max.
    """
    log_ratio = (logprobs - old_logprobs) * mask                          # (b, Tr)
    ratio = torch.exp(log_ratio)                                          # (b, Tr)
    pg1 = -advantages * ratio                                             # (b, Tr)
    pg2 = -advantages * torch.clamp(ratio, 1.0 - ratio_clip, 1.0 + ratio_clip)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    with torch.no_grad():
        stats = dict(clipfrac=masked_mean((pg2 > pg1).float(), mask).item(),
                     approx_kl=masked_mean((ratio - 1) - log_ratio, mask).item(),
                     ratio_mean=masked_mean(ratio, mask).item(),
                     ratio_max=ratio.masked_fill(mask == 0, 0).max().item())
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, vf_clip):
    """
    Clipped value loss (eq. 16): ½·mean over tokens of max((V - R)², (clip(V, V_old ± ε_v) - R)²),
    ε_v = vf_clip (0: plain ½·MSE). values (b, Tr) carry the gradient; old_values, returns do not.
    Returns (loss, stats): stats["vf_clipfrac"], the share of tokens where the clipped error is
    the larger (0.0 when vf_clip is 0).
    """
    err = (values - returns) ** 2                                         # (b, Tr)
    if vf_clip > 0:
        v_clip = old_values + torch.clamp(values - old_values, -vf_clip, vf_clip)
        err_clip = (v_clip - returns) ** 2                                # (b, Tr)
        loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)
        clipfrac = masked_mean((err_clip > err).float(), mask).item()
    else:
        loss, clipfrac = 0.5 * masked_mean(err, mask), 0.0
    return loss, dict(vf_clipfrac=clipfrac)


class RunningMoments:
    """Running mean and std of every score so far (parallel-variance update, as the paper's code)."""

    def __init__(self, mean=0.0, var=1.0, count=1e-24):
        self.mean, self.var, self.count = mean, var, count

    def update(self, x):
        """
        x (n,): fold a batch in (under torchrun every process's, x = runs.gather_rows(x) first: the
        statistics are global). The batch's n, mean m and population variance v merge with (count,
        mean, var): total = count + n, δ = m - mean, mean += δ·n/total,
        var = (var·count + v·n + δ²·count·n/total) / total.
        """
        x = gather_rows(x)                                   # (N·n,) every process's scores
        n, m, v = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        delta, total = m - self.mean, self.count + n
        m2 = self.var * self.count + v * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self):
        return math.sqrt(max(self.var, 1e-16))


def process_scores(scores, running, mode, clip):
    """
    Raw RM scores (B,) -> processed (B,): none (unchanged, moments not updated), scale (÷ running
    std), norm_clip (eq. 18: (score - running mean) / running std, clipped to [-clip, clip]).
    scale and norm_clip fold the batch into `running` first: its own moments normalise it.
    """
    if mode == "none":
        return scores
    running.update(scores)
    if mode == "scale":
        return scores / running.std
    if mode == "norm_clip":
        return torch.clamp((scores - running.mean) / running.std, -clip, clip)
    raise ValueError(f"unknown score_norm {mode!r}; expected none, scale or norm_clip")


def kl_rewards(old_logprobs, ref_logprobs, mask, scores, kl_coef):
    """Per-token reward (B, Tr) (eq. 3): -β·k1 on every response token (model.k1), plus the score
    (B,) on each response's last real token (last_token_index); 0 at padding. β = kl_coef."""
    rewards = -kl_coef * k1(old_logprobs, ref_logprobs, mask)          # (B, Tr)
    last = last_token_index(mask)  # (B,) EOS position, or the last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def masked_var(x, mask):
    """Unbiased variance (a scalar) over the n masked positions: Σ mask·(x - μ)² / max(n - 1, 1), μ = masked_mean."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, moments=None):
    """(x - μ) / σ over masked positions (shift_mean=False keeps the mean: (x - μ)/σ + μ). Padding stays 0.
    moments: (μ, σ²) when they come from elsewhere (under torchrun every process's rows: global_masked_moments)."""
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


# -------------------------------------------------------------------------------------------
# Step 6: the update

def ppo_update(policy, critic, opt, ro, values, advantages, returns, cfg, update_policy, generator,
               ptx_data=None):
    """
    Step 6 (eqs. 15-17): cfg.epochs passes over the rollouts ro in cfg.minibatches shuffled
    minibatches, each one optimizer step on
        loss = pg_loss + vf_coef·vf_loss - entropy_coef·entropy + ptx_coef·ptx_loss
    (token means), one global grad-norm clip over policy and critic. values, advantages and
    returns are (B, Tr); update_policy=False trains only the critic (§5.3.3). Returns one stats
    dict per minibatch.
    """
    policy.train()
    critic.train()
    params = [p for group in opt.param_groups for p in group["params"]]
    all_stats = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(advantages), generator=generator).to(advantages.device)  # (B,)
        for rows in order.split(len(advantages) // cfg.minibatches):  # (b,)
            batch, adv = ro.rows(rows), advantages[rows]              # b rollouts; (b, Tr)
            if cfg.adv_whiten:                                        # over the whole minibatch
                moments = global_masked_moments(adv, batch.mask)      # every process's rows
                adv = masked_whiten(adv, batch.mask, moments=moments)
            if cfg.adv_clip > 0:
                adv = torch.clamp(adv, -cfg.adv_clip, cfg.adv_clip)
            opt.zero_grad(set_to_none=True)
            with autocast(ro.seq.device, cfg.amp):
                # eq. 16: the clipped value loss on the critic's new values
                new_values = response_values(critic, batch.seq, batch.seq_mask, batch.n_prompt)
                vf_loss, value_stats = ppo_value_loss(new_values, values[rows], returns[rows],
                                                      batch.mask, cfg.vf_clip)
                loss = cfg.vf_coef * vf_loss
                stats = dict(vf_loss=vf_loss.item(), **value_stats)
                if update_policy:                                     # eq. 15: the surrogate
                    logits = response_logits(policy, batch.seq, batch.seq_mask, batch.n_prompt,
                                             cfg.temperature)         # (b, Tr, V)
                    logprobs = logprobs_from_logits(logits, batch.response)  # (b, Tr)
                    pg_loss, policy_stats = ppo_policy_loss(logprobs, batch.old_logprobs, adv,
                                                            batch.mask, cfg.ratio_clip)
                    loss = loss + pg_loss
                    stats.update(pg_loss=pg_loss.item(), **policy_stats)
                    if cfg.entropy_coef > 0:
                        entropy = masked_mean(entropy_from_logits(logits), batch.mask)
                        loss = loss - cfg.entropy_coef * entropy
            # under torchrun a process's token mean weighs so that DDP's average is the global one
            (share_of_global_tokens(batch.mask.sum(), batch.mask.sum()) * loss).backward()
            if update_policy and cfg.ptx_coef > 0:                    # PPO-ptx (eq. 17)
                ptx_loss, share = ptx_batch_loss(policy, ptx_data, cfg, generator)
                (share * cfg.ptx_coef * ptx_loss).backward()
                loss = loss + cfg.ptx_coef * ptx_loss.detach()
                stats.update(ptx_loss=ptx_loss.item())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
            check_finite("PPO update", loss=loss.item(), grad_norm=grad_norm.item())
            opt.step()
            stats["grad_norm"] = grad_norm.item()
            all_stats.append(stats)
    return all_stats


def ptx_batch_loss(policy, ptx_data, cfg, generator):
    """PPO-ptx (eq. 17): the SFT loss on cfg.ptx_batch random demonstrations (this process's share
    under torchrun), and its weight among every process's demonstration tokens (1 in one)."""
    device = next(policy.parameters()).device
    draws = torch.randint(len(ptx_data), (cfg.ptx_batch // world_size(),), generator=generator)
    demos = [ptx_data[i] for i in draws]
    pad_id = getattr(policy, "module", policy).cfg.pad_id
    ids, attn_mask, loss_mask = collate(demos, pad_id, device)        # (p, T') each
    with autocast(device, cfg.amp):
        loss = sft_loss(policy(ids, attn_mask), ids, loss_mask)
    tokens = loss_mask[:, 1:].sum()                                   # the tokens sft_loss averages
    return loss, share_of_global_tokens(tokens, tokens)


# -------------------------------------------------------------------------------------------
# Plumbing for main(), safe to skip: prompts, option checks, the end of a run

def load_prompts(cfg, sft, enc, order_rng):
    """{"train"|"val"|"test": {kind: [prompt]}} of the toy task, or of HH-RLHF files split as SFT
    and RM split them; and the SFT demonstrations for the PTX term (None when ptx_coef is 0)."""
    seed = sft["config"]["seed"]
    if cfg.data == "toy":
        splits = data.only_kinds(data.prompt_splits(seed), cfg.tasks)
        demos = data.make_demonstrations(data.sample_prompts(splits["train"], 4000, order_rng),
                                         cfg.seed + 2) if cfg.ptx_coef else None
    else:
        splits = data.hh_prompt_splits(cfg.data, seed)
        demos = [(r["prompt"], r["chosen"]) for r in data.hh_splits(cfg.data, seed)["train"]
                 ] if cfg.ptx_coef else None
    return splits, demos and encode_demos(enc, demos, sft["model_config"]["block_size"])


def check_config(cfg):
    """One-line errors for option combinations that cannot work (each value: its field's rule)."""
    if (cfg.rollout_batch // world_size()) % cfg.minibatches:   # each process's equal share
        raise ValueError(f"--minibatches {cfg.minibatches} must divide --rollout_batch "
                         f"{cfg.rollout_batch}"
                         + (f" / {world_size()} processes" if world_size() > 1 else ""))
    if cfg.data != "toy" and (cfg.reward != "rm" or cfg.tasks != "all"):
        raise ValueError(f"--reward {cfg.reward} / --tasks {cfg.tasks}: the rules and kinds exist "
                         f"for the toy task only")


def finish(cfg, run, last, warned):
    """The curves, the final checkpoint, the summary line; returns the last iteration's metrics."""
    metrics = {k: last[k] for k in ("score_raw", "gold", "kl_seq", "length", "eos_rate")}
    metrics.update(train_time_s=run.train_time(), collapse_warning=warned,
                   win_rate_vs_sft=last.get("win_rate_vs_sft", float("nan")))
    plot_curves(os.path.join(cfg.out_dir, "ppo_curves.png"), read_jsonl(run.log_path), "iter",
                [["score_raw"], ["gold"], ["kl_seq", "kl_k3_seq"], ["length"], ["perplexity"],
                 ["win_rate_vs_sft"]],
                f"PPO (β={cfg.kl_coef}, scores {cfg.score_norm}): RM score, gold reward, KL to "
                f"SFT, length, perplexity, win rate vs SFT")
    policy_iters = cfg.n_iters - min(cfg.critic_pretrain_iters, cfg.n_iters)
    run.finish(metrics, responses_generated=cfg.n_iters * cfg.rollout_batch,
               policy_steps=policy_iters * cfg.epochs * cfg.minibatches)
    print(f"PPO done in {metrics['train_time_s']:.0f}s: gold {metrics['gold']:.3f}, RM "
          f"{metrics['score_raw']:.2f}, KL {metrics['kl_seq']:.2f}, win rate vs SFT "
          f"{metrics['win_rate_vs_sft']:.2f}{', COLLAPSE WARNING' if warned else ''} -> "
          f"{run.ckpt_path}")
    return metrics


# -------------------------------------------------------------------------------------------
# The algorithm

def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    check_config(cfg)
    with Run(cfg, "ppo", data_parallel=True) as run:
        device = run.device
        # the policy and the critic train; the reference (a copy of SFT) and the RM stay frozen
        policy, ref, rm, sft, rm_ckpt = load_models(cfg.sft_ckpt, cfg.rm_ckpt, device,
                                                    cfg.max_new_tokens, cfg.policy_init)
        critic = load_critic(cfg.critic_init, sft, rm_ckpt, cfg.sft_ckpt, cfg.rm_ckpt).to(device)
        train_policy, train_critic = data_parallel(policy), data_parallel(critic)  # torchrun: DDP
        enc = tok.get_tokenizer(sft["tokenizer"])
        eos_id, pad_id, room = tok.eos_id(enc), tok.pad_id(enc), policy.cfg.block_size - cfg.max_new_tokens
        second_forward = not cfg.fast_rollout or uses_bf16(device, cfg.amp)   # choice 5
        opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": cfg.policy_lr},
                                 {"params": critic.parameters(), "lr": cfg.critic_lr}],
                                weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
        print(f"device={device} config={asdict(cfg)}")
        rank_seed = cfg.seed + 1000 * rank()          # under torchrun: each its own prompts
        order_rng = random.Random(rank_seed)          # prompts, minibatch order, PTX draws
        sampling_gen = torch.Generator(device=device).manual_seed(rank_seed)   # the tokens
        sanity = SanityChecks("PPO")
        splits, ptx_data = load_prompts(cfg, sft, enc, order_rng)
        restored = run.begin(opt, dict(model=policy, critic=critic), run_meta(sft, cfg),
                             cfg.n_iters, order_rng, sampling_gen, samples=True,
                             state=dict(running=[0.0, 1.0, 1e-24], history=[], warned=False))
        running = RunningMoments(*restored["running"])               # score statistics (step 3)
        history, warned = restored["history"], restored["warned"]   # metrics, collapse warning
        val_prompts = data.sample_prompts(splits["val"], cfg.n_eval_prompts, random.Random(cfg.seed + 1))
        monitor = ValidationMonitor(enc, ref, rm, critic, val_prompts, cfg.max_new_tokens,
                                    cfg.temperature, cfg.seed, run.samples, device, cfg.data == "toy")
        for it in range(run.start, cfg.n_iters + 1):
            t_iter = time.time()
            # 1-2. rollout: responses, old_logprobs, ref_logprobs, RM scores; the critic's values
            prompts = data.sample_prompts(splits["train"], cfg.rollout_batch // world_size(), order_rng)
            prompt_ids, prompt_mask = encode_prompts(enc, prompts, room, cfg.truncate_prompts)
            with torch.no_grad(), autocast(device, cfg.amp):
                ro = sample_and_score(policy, ref, rm, prompt_ids.to(device), prompt_mask.to(device),
                                      cfg.max_new_tokens, cfg.temperature, eos_id, pad_id,
                                      sampling_gen, second_forward)
                values = critic_values(critic, ro)                     # (B, Tr)
            replies = tok.decode_replies(enc, ro.response.tolist())   # texts and EOS flags
            gold = torch.tensor(replies.golds(prompts) if cfg.data == "toy" else [math.nan] * len(ro.scores))
            check_finite(f"PPO iteration {it}", rm_score=ro.scores.sum(), value=values.sum())
            # 3. the score, processed with running statistics of every score so far (eq. 18)
            raw = ro.scores.float() if cfg.reward == "rm" else torch.tensor(  # (B,); or a rule's
                data.rule_rewards(cfg.reward, prompts, replies.texts, replies.ended), device=device)
            scores = process_scores(raw, running, cfg.score_norm, cfg.score_clip)   # (B,)
            ended = (ro.response == eos_id).any(1)                                    # (B,)
            scores = scores - cfg.missing_eos_penalty * (~ended).float()
            # 4. per-token rewards: -β·k1 on every token, the score on the last one (eqs. 3, 19)
            rewards = kl_rewards(ro.old_logprobs, ro.ref_logprobs, ro.mask, scores, cfg.kl_coef)
            # 5. GAE; returns = advantages + values are the critic's targets (eqs. 7-11)
            advantages, returns = compute_gae(rewards, values, ro.mask, cfg.gamma, cfg.lam)
            # 6. the clipped PPO update, `epochs` passes over shuffled minibatches (eqs. 15-17)
            t_train, update_policy = time.time(), it > cfg.critic_pretrain_iters
            minibatch_gen = torch.Generator().manual_seed(order_rng.randrange(2**31))
            update_stats = ppo_update(train_policy, train_critic, opt, ro, values, advantages,
                                      returns, cfg, update_policy, minibatch_gen, ptx_data)
            t_train = time.time() - t_train
            # the classic silent failures, each a plain-English warning once per run
            k1_tokens = k1(ro.old_logprobs, ro.ref_logprobs, ro.mask)  # (B, Tr)
            sanity.rollout(it, k1_tokens.sum(1), ended)
            sanity.advantages(it, advantages, ro.mask)
            if update_policy:
                sanity.first_ratio(it, update_stats[0]["ratio_mean"], update_stats[0]["ratio_max"],
                                   uses_bf16(device, cfg.amp))
            # monitoring: the paper's §5.2 metrics, PPO's diagnostics (over every process's rows)
            row = metrics_over_ranks(dict(
                iter=it, policy_updated=update_policy, **ppo_iteration_metrics(
                    ro, values, scores, gold, ended, advantages, returns, running),
                policy_lr=cfg.policy_lr, critic_lr=cfg.critic_lr, t_generate=ro.t_generate,
                t_score=ro.t_score, t_train=t_train, t_iter=time.time() - t_iter,
                **minibatch_means(update_stats)))
            per_token = {"k1": k1_tokens, "reward": rewards, "value": values,
                         "advantage": advantages, "return": returns, "entropy": ro.entropy}
            warned = log_ppo_iteration(run, cfg, monitor, history, warned, it, policy, ro, prompts,
                                       replies, gold, per_token, row, update_policy)
            running_state = [running.mean, running.var, running.count]
            run.save(it, running=running_state, history=history, warned=warned)   # every ckpt_interval
        return finish(cfg, run, history[-1], warned)


if __name__ == "__main__":
    run_main(main)
