"""
Stage 3: token-level PPO with GAE and a per-token KL penalty to the frozen SFT reference, with every trick of
the PPO-max recipe as a switch (Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO",
arXiv 2307.04964, "the paper"; "the code" is its released MOSS-RLHF trainer).

One PPO iteration, as numbered in main():
  1-2. rollout    responses to left-padded prompts (pure temperature, KV cache) with old_logprobs (the policy
                  that sampled), ref_logprobs (frozen SFT), the RM score at the last real token, the critic's
                  values                                                                  §3.1, §3.2, §5.3.3
  3. score        none | scale (÷ running std) | norm_clip (running mean/std, clip ±δ)            §5.3.1 eq. 18
  4. reward       r_t = -β·(old_logprobs - ref_logprobs)_t on every response token, r_T += score    eqs. 3, 19
  5. GAE          δ_t = r_t + γV_{t+1} - V_t, A_t = Σ (γλ)^l δ_{t+l}, returns = A + V                eqs. 7-11
  6. update       clipped surrogate + clipped value loss (+ entropy, + PTX) over epochs × minibatches,
                  one global grad-norm clip over policy and critic                           eqs. 15-17, §5.4
The per-token penalty is k1 (model.py: its sum over a response is an unbiased estimate of KL(π‖π_ref)); k3 and
the exact KL are logged too; every log-prob is taken at the sampling temperature.

Run (after train_sft.py and reward_model.py; writes out/ppo.pt, out/ppo_log.jsonl, out/ppo_curves.png):
    python ppo_rlhf.py                                           # --preset ppo_max, the default
    python ppo_rlhf.py --preset vanilla --out_dir out/vanilla    # no KL, no score norm, no clips: collapses
    python ppo_rlhf.py --preset vanilla_pg --out_dir out/vanilla_pg   # Back to Basics' vanilla policy gradient
    python ppo_rlhf.py --kl_coef 0.1 --score_norm scale          # any switch on its own
    python ppo_rlhf.py --data hh/train.jsonl.gz --sft_ckpt out/gpt2_hh/sft.pt --rm_ckpt out/gpt2_hh/rm.pt
    torchrun --standalone --nproc_per_node 2 ppo_rlhf.py         # data parallel (docs/data_parallel.md)

Where the paper and its code disagree, or we differ from both (docs/ppo.md has the reasons and measurements):
  1. Score processing: the paper's norm + clip (eq. 18) is the default; the code's scripts only scale.
  2. GAE λ = 0.95 and γ = 1 as in the code (the paper's App. C.3 says λ = 0.9).
  3. Critic pre-training (§5.3.3, §5.4): the first critic_pretrain_iters update only the critic (not in the code).
  4. PTX (§5.4, eq. 17) is a switch with weight 0, as in the code's scripts; its data are the SFT demonstrations.
  5. old_logprobs come from the sampling loop (--fast_rollout): a second forward up to rounding; under bf16
     autocast the second forward always runs.
  6. Tiny-model learning rates (policy 3e-5, critic 1e-4); β = 0.1 (the code's zh script); one optimiser with
     two parameter groups and one global grad-norm clip, as the code; dropout off in every model.

Shape legend: B rollouts per iteration, Tp prompt length (left-padded), Tr response length (right-padded with
PAD after EOS), T = Tp + Tr, V vocab, b minibatch size. `mask` (B, Tr) is 1 on real response tokens (EOS too).
"""
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

import data
import tokenizer as tok
from model import (entropy_from_logits, k1, last_token_index, logprobs_from_logits, masked_mean, masked_whiten,
                   response_logits, response_values)
from runs import (Run, RunOptions, SanityChecks, ValidationMonitor, autocast, check_finite, clipped_tokens,
                  collapse_signature, data_parallel, field, gather_rows, global_masked_moments, load_critic,
                  load_models, metrics_over_ranks, minibatch_means, parse_config, plot_curves, ppo_iteration_metrics,
                  rank, read_jsonl, run_main, run_meta, sample_and_score, share_of_global_tokens, uses_bf16,
                  world_size)
from tokenizer import collate, encode_demos, encode_prompts
from train_sft import sft_loss


@dataclass
class Config(RunOptions):
    sft_ckpt: str = field("out/sft.pt", "SFT checkpoint: initial policy and frozen reference", input_file=True)
    rm_ckpt: str = field("out/rm.pt", "reward-model checkpoint (frozen); also the critic's init", input_file=True)
    data: str = field("toy", "toy (the built-in task, with a gold reward), or HH-RLHF .jsonl/.jsonl.gz file(s), "
                             "comma-separated (no gold: the RM judges the win rate)", input_file=True)
    # rollout
    n_iters: int = field(150, "PPO iterations (rollout + update), critic pre-training included", range="[1, inf)")
    rollout_batch: int = field(64, "prompts (= responses) per iteration", range="[1, inf)", global_batch=True)
    max_new_tokens: int = field(48, "longest response; hitting it without EOS is truncation", range="[1, inf)")
    temperature: float = field(1.0, "sampling temperature, used for every log-prob too", range="(0, inf)")
    fast_rollout: bool = field(True, "old_logprobs from the sampling loop (false: a second policy forward, which "
                                     "also logs the exact KL over the vocabulary)")
    # score and reward (paper §5.3.1, eq. 18; §3.1 eq. 3)
    reward: str = field("rm", "rm (the RM's score), or a rule of the toy task in its place: verifier (RLVR: "
                              "data.verify) or gold (the true reward)", choices=("rm", "verifier", "gold"))
    tasks: str = field("all", "prompt kinds (toy task): all, or comma-separated of math, fact, harmful, open")
    score_norm: str = field("norm_clip", "scale: ÷ running std; norm_clip: running mean/std, clip ±score_clip",
                            choices=("none", "scale", "norm_clip"))
    score_clip: float = field(0.8, "δ for norm_clip", range="(0, inf)")
    missing_eos_penalty: float = field(0.0, "subtracted from the score of responses without EOS", range="[0, inf)")
    kl_coef: float = field(0.1, "β of the per-token KL penalty (paper 0.05-0.2)", range="[0, inf)")
    # GAE (§3.1 eqs. 7-11)
    gamma: float = field(1.0, "discount", range="[0, 1]")
    lam: float = field(0.95, "GAE λ (code 0.95; paper App. C.3 0.9)", range="[0, 1]")
    adv_whiten: bool = field(False, "whiten advantages per minibatch (off in PPO-max)")
    adv_clip: float = field(0.0, "clip advantages to ±adv_clip after whitening (0 = off)", range="[0, inf)")
    # losses (eqs. 15-17)
    ratio_clip: float = field(0.2, "ε: the ratio π/π_old is clipped to [1-ε, 1+ε] (eq. 15)", range="(0, 1)")
    vf_clip: float = field(0.2, "value clip ε_v around the rollout values (0 = unclipped)", range="[0, inf)")
    vf_coef: float = field(1.0, "value-loss weight", range="[0, inf)")
    entropy_coef: float = field(0.0, "entropy bonus weight (paper: use the KL penalty instead)", range="[0, inf)")
    ptx_coef: float = field(0.0, "weight of the SFT cross-entropy (PPO-ptx) term", range="[0, inf)")
    ptx_batch: int = field(16, "SFT demonstrations per minibatch for the PTX term", range="[1, inf)",
                           global_batch=True)
    # optimisation
    epochs: int = field(1, "passes over each batch of rollouts (the released code: 1)", range="[1, inf)")
    minibatches: int = field(2, "optimizer steps per pass, each on rollout_batch / minibatches rows",
                             range="[1, inf)")
    policy_lr: float = field(3e-5, "policy learning rate", range="(0, inf)")
    critic_lr: float = field(1e-4, "critic learning rate", range="(0, inf)")
    grad_clip: float = field(1.0, "global grad-norm clip over policy + critic (0 = off)", range="[0, inf)")
    critic_init: str = field("rm", "rm (a copy of the RM) or sft (SFT backbone, fresh head)", choices=("rm", "sft"))
    policy_init: str = field("sft", "sft, or not from SFT (paper §5.3.3 Fig. 8; the reference stays SFT): random, "
                                    "or GPT-2 weights (gpt2 | a local file/folder)", input_file=True)
    critic_pretrain_iters: int = field(10, "first iterations update only the critic (§5.3.3)", range="[0, inf)")
    # monitoring
    eval_interval: int = field(10, "every N iterations: win rate vs SFT, sample table", range="[1, inf)")
    n_eval_prompts: int = field(64, "val prompts for the win rate during training", range="[1, inf)")
    collapse_window: int = field(10, "iterations compared by the collapse warning", range="[1, inf)")
    amp: bool = field(True, "bf16 autocast on CUDA (CPU and MPS always run fp32)")


PRESETS = {
    "ppo_max": {},
    "vanilla": dict(kl_coef=0.0, score_norm="none", vf_clip=0.0, grad_clip=0.0, critic_pretrain_iters=0),
    # Back to Basics eq. 9 "vanilla policy gradient": token-level return-to-go (γ = λ = 1) minus a learned
    # baseline (the critic), one gradient step per rollout batch, so ρ = 1 and the clip never acts
    "vanilla_pg": dict(gamma=1.0, lam=1.0, epochs=1, minibatches=1, vf_clip=0.0, score_norm="none",
                       critic_pretrain_iters=0),
    "small": dict(n_iters=80, rollout_batch=32, max_new_tokens=32, policy_lr=1e-4, critic_pretrain_iters=5,
                  eval_interval=10, n_eval_prompts=32, collapse_window=5),
    "tiny": dict(n_iters=4, rollout_batch=8, minibatches=2, max_new_tokens=12, critic_pretrain_iters=1,
                 eval_interval=2, n_eval_prompts=8, collapse_window=2, ptx_batch=4),
    # debug (docs/debugging.md): 4 rollouts, one minibatch, the policy updated from iteration 1 (no critic-only
    # warm-up), so from iteration 2 on the KL reward of step 4 is not 0
    "debug": dict(n_iters=3, rollout_batch=4, minibatches=1, max_new_tokens=12, critic_pretrain_iters=0,
                  eval_interval=3, n_eval_prompts=4, collapse_window=2, ptx_batch=4),
}


# ----------------------------------------------------------------------------------------------------
# Step 2's last part, and steps 3-6, as functions (imported by the tests and the notebooks)

@torch.no_grad()
def critic_values(critic, ro):
    """The critic's V(s_t) (B, Tr) of the state before each response token of the rollouts `ro`; 0 at padding."""
    critic.eval()
    return response_values(critic, ro.seq, ro.seq_mask, ro.n_prompt).float() * ro.mask  # (B, Tr)


# Steps 3-6, pure

def compute_gae(rewards, values, mask, gamma, lam):
    """
    Generalised advantage estimation over response tokens (paper eqs. 7-11), right-padded (B, T) tensors:
        δ_t = r_t + γ·V_{t+1} - V_t,   A_t = δ_t + γλ·A_{t+1},   returns_t = A_t + V_t
    Values and rewards at padding are zeroed first, so the value after a response's last token is 0 (terminal).
    Returns (advantages, returns), both (B, T) and 0 at padding.
    """
    # [assignment: gae]
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
    # [end assignment: gae]


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, ratio_clip):
    """Clipped surrogate (paper eq. 15): mean over tokens of max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)), ρ = π/π_old,
    ε = ratio_clip; logprobs (b, Tr) carry the gradient, old_logprobs and advantages (b, Tr) are constants.
    Returns (loss, stats): the stats are floats over the tokens where mask is 1 — clipfrac (the share where the
    clipped term is the larger), approx_kl (k3 between π_old and π: mean of (ρ - 1) - log ρ), ratio_mean, ratio_max."""
    # [assignment: ppo_policy_loss]
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
    # [end assignment: ppo_policy_loss]


def ppo_value_loss(values, old_values, returns, mask, vf_clip):
    """Clipped value loss (eq. 16): ½·mean over tokens of max((V - R)², (clip(V, V_old ± ε_v) - R)²), ε_v = vf_clip;
    vf_clip 0 = plain ½·MSE. values (b, Tr) carry the gradient; old_values, returns (b, Tr) are constants.
    Returns (loss, stats): stats["vf_clipfrac"], the share of masked tokens where the clipped error is the larger
    (0.0 when vf_clip is 0)."""
    # [assignment: ppo_value_loss]
    err = (values - returns) ** 2                                         # (b, Tr)
    if vf_clip > 0:
        v_clip = old_values + torch.clamp(values - old_values, -vf_clip, vf_clip)
        err_clip = (v_clip - returns) ** 2                                # (b, Tr)
        loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)
        clipfrac = masked_mean((err_clip > err).float(), mask).item()
    else:
        loss, clipfrac = 0.5 * masked_mean(err, mask), 0.0
    return loss, dict(vf_clipfrac=clipfrac)
    # [end assignment: ppo_value_loss]


class RunningMoments:
    """Running mean and std of every score seen so far (parallel-variance update, as the paper's code)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, x):
        """x (n,): fold a batch in; under torchrun, every rank's batch (the statistics are global, alike on all).
        The batch's n, mean m and population variance v (÷ n) merge with the running (count, mean, var) by the
        parallel-variance rule: total = count + n, δ = m - mean, mean += δ·n/total,
        var = (var·count + v·n + δ²·count·n/total) / total, count = total."""
        x = gather_rows(x)                                                # [DDP] (N·n,) every rank's scores
        # [assignment: running_moments]
        n, m, v = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        delta, total = m - self.mean, self.count + n
        m2 = self.var * self.count + v * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total
        # [end assignment: running_moments]

    @property
    def std(self):
        return math.sqrt(max(self.var, 1e-16))


def process_scores(scores, running, mode, clip):
    """Raw RM scores (B,) -> processed (B,): `none` (unchanged, the moments not updated), `scale` (÷ running std),
    `norm_clip` (eq. 18: (score - running mean) / running std, clipped to [-clip, clip]). `scale` and `norm_clip`
    fold the batch into `running` first, so a batch is normalised with moments that include it."""
    # [assignment: running_moments]
    if mode == "none":
        return scores
    running.update(scores)
    if mode == "scale":
        return scores / running.std
    if mode == "norm_clip":
        return torch.clamp((scores - running.mean) / running.std, -clip, clip)
    # [end assignment: running_moments]
    raise ValueError(f"unknown score_norm {mode!r}; expected none, scale or norm_clip")


def kl_rewards(old_logprobs, ref_logprobs, mask, scores, kl_coef):
    """Per-token reward (B, Tr) (eq. 3): -β·k1 on every response token (k1 = old_logprobs - ref_logprobs where mask
    is 1, model.k1), plus the score (B,) on each response's last real token (last_token_index(mask));
    0 at padding. β = kl_coef."""
    # [assignment: kl_reward]
    rewards = -kl_coef * k1(old_logprobs, ref_logprobs, mask)          # (B, Tr)
    last = last_token_index(mask)                                         # (B,) EOS position, or the last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards
    # [end assignment: kl_reward]


# ----------------------------------------------------------------------------------------------------
# Step 6: the update

def ppo_update(policy, critic, opt, ro, values, advantages, returns, cfg, update_policy, generator, ptx_data=None):
    """
    Step 6 (paper eqs. 15-17): cfg.epochs passes over the rollouts `ro` (Samples) in cfg.minibatches shuffled
    minibatches, each one optimizer step on
        loss = pg_loss + vf_coef·vf_loss - entropy_coef·entropy + ptx_coef·ptx_loss
    (token means over the minibatch), one global grad-norm clip over policy and critic. values, advantages and
    returns are (B, Tr); update_policy=False trains only the critic (§5.3.3). Returns one stats dict per minibatch.
    """
    policy.train()
    critic.train()
    params = [p for group in opt.param_groups for p in group["params"]]
    all_stats = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(advantages), generator=generator).to(advantages.device)   # (B,)
        for rows in order.split(len(advantages) // cfg.minibatches):       # (b,) this rank's rows of a minibatch
            batch, adv = ro.rows(rows), advantages[rows]                    # (b, Tr) each
            if cfg.adv_whiten:                                              # over the whole minibatch
                adv = masked_whiten(adv, batch.mask, moments=global_masked_moments(adv, batch.mask))
            if cfg.adv_clip > 0:
                adv = torch.clamp(adv, -cfg.adv_clip, cfg.adv_clip)
            opt.zero_grad(set_to_none=True)
            with autocast(ro.seq.device, cfg.amp):
                # eq. 16: the clipped value loss on the critic's new values
                new_values = response_values(critic, batch.seq, batch.seq_mask, batch.n_prompt)   # (b, Tr)
                vf_loss, value_stats = ppo_value_loss(new_values, values[rows], returns[rows], batch.mask,
                                                      cfg.vf_clip)
                loss = cfg.vf_coef * vf_loss
                stats = dict(vf_loss=vf_loss.item(), **value_stats)
                if update_policy:                                          # eq. 15: the clipped surrogate
                    logits = response_logits(policy, batch.seq, batch.seq_mask, batch.n_prompt,
                                             cfg.temperature)              # (b, Tr, V)
                    logprobs = logprobs_from_logits(logits, batch.response)  # (b, Tr)
                    pg_loss, policy_stats = ppo_policy_loss(logprobs, batch.old_logprobs, adv, batch.mask,
                                                            cfg.ratio_clip)
                    loss = loss + pg_loss
                    stats.update(pg_loss=pg_loss.item(), **policy_stats)
                    if cfg.entropy_coef > 0:
                        loss = loss - cfg.entropy_coef * masked_mean(entropy_from_logits(logits), batch.mask)
            # under torchrun a rank's token mean is weighted so that DDP's gradient average is the global mean
            (share_of_global_tokens(batch.mask.sum(), batch.mask.sum()) * loss).backward()
            if update_policy and cfg.ptx_coef > 0:                         # PPO-ptx (eq. 17): one SFT batch
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
    """PPO-ptx (eq. 17): the SFT loss on cfg.ptx_batch demonstrations drawn at random (this rank's share under
    torchrun), and its weight among every rank's demonstration tokens (1 in one process)."""
    device = next(policy.parameters()).device
    demos = [ptx_data[i] for i in torch.randint(len(ptx_data), (cfg.ptx_batch // world_size(),), generator=generator)]
    ids, attn_mask, loss_mask = collate(demos, getattr(policy, "module", policy).cfg.pad_id, device)  # (p, T') each
    with autocast(device, cfg.amp):
        loss = sft_loss(policy(ids, attn_mask), ids, loss_mask)
    tokens = loss_mask[:, 1:].sum()                                       # the tokens sft_loss averages over
    return loss, share_of_global_tokens(tokens, tokens)


@torch.no_grad()
def ratios_after_update(policy, ro, temperature):
    """π_θ/π_old per token (B, Tr) once the iteration's update is done (1 at padding): the samples log's view of
    how far the update moved each sampled token."""
    logits = response_logits(policy, ro.seq, ro.seq_mask, ro.n_prompt, temperature)      # (B, Tr, V)
    return torch.exp((logprobs_from_logits(logits, ro.response) - ro.old_logprobs) * ro.mask)  # (B, Tr)


# ----------------------------------------------------------------------------------------------------
# Plumbing for main(): models, prompts, config checks, the monitoring (main() itself holds the algorithm)

def load_prompts(cfg, sft, enc, order_rng):
    """{"train"|"val"|"test": {kind: [prompt]}} of the toy task, or of HH-RLHF files split as SFT and RM split
    them, and the SFT demonstrations for the PTX term (None when ptx_coef is 0)."""
    seed = sft["config"]["seed"]
    splits = data.only_kinds(data.prompt_splits(seed), cfg.tasks) if cfg.data == "toy" else data.hh_prompt_splits(cfg.data, seed)
    if cfg.ptx_coef == 0:
        return splits, None
    demos = (data.make_demonstrations(data.sample_prompts(splits["train"], 4000, order_rng), cfg.seed + 2)
             if cfg.data == "toy" else [(r["prompt"], r["chosen"]) for r in data.hh_splits(cfg.data, seed)["train"]])
    return splits, encode_demos(enc, demos, sft["model_config"]["block_size"])


def check_config(cfg):
    """One-line errors for option combinations that cannot work (each value alone: its field's rule)."""
    if (cfg.rollout_batch // world_size()) % cfg.minibatches:     # [DDP] of each rank's equal share of the rollouts
        raise ValueError(f"--minibatches {cfg.minibatches} must divide --rollout_batch {cfg.rollout_batch}"
                         + (f" / {world_size()} processes" if world_size() > 1 else ""))
    if cfg.data != "toy" and (cfg.reward != "rm" or cfg.tasks != "all"):
        raise ValueError(f"--reward {cfg.reward} / --tasks {cfg.tasks}: the rules and kinds exist for the toy task only")


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    check_config(cfg)
    with Run(cfg, "ppo", data_parallel=True) as run:
        device = run.device
        # the policy and the critic train; the reference (a copy of SFT) and the reward model stay frozen
        policy, ref, rm, sft, rm_ckpt = load_models(cfg.sft_ckpt, cfg.rm_ckpt, device, cfg.max_new_tokens,
                                                    cfg.policy_init)   # policy_init: the Fig. 8 ablation
        critic = load_critic(cfg.critic_init, sft, rm_ckpt, cfg.sft_ckpt, cfg.rm_ckpt).to(device)
        train_policy = data_parallel(policy)           # under torchrun: gradients averaged over the processes
        train_critic = data_parallel(critic)
        enc = tok.get_tokenizer(sft["tokenizer"])
        has_gold = cfg.data == "toy"                   # HH-RLHF: no gold reward
        eos_id, pad_id = tok.eos_id(enc), tok.pad_id(enc)
        room = policy.cfg.block_size - cfg.max_new_tokens
        second_forward = not cfg.fast_rollout or uses_bf16(device, cfg.amp)   # choice 5
        opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": cfg.policy_lr},
                                 {"params": critic.parameters(), "lr": cfg.critic_lr}], weight_decay=0.0,
                                betas=(0.9, 0.95), eps=1e-8)
        print(f"device={device} config={asdict(cfg)}")
        rank_seed = cfg.seed + 1000 * rank()            # under torchrun each process its own prompts and samples
        order_rng = random.Random(rank_seed)            # prompt draws, minibatch order, PTX demonstrations
        sampling_gen = torch.Generator(device=device).manual_seed(rank_seed)  # token sampling in the rollouts
        running = RunningMoments()                      # score statistics (step 3)
        sanity = SanityChecks("PPO")
        splits, ptx_data = load_prompts(cfg, sft, enc, order_rng)
        restored = run.begin(opt, dict(model=policy, critic=critic), run_meta(sft, cfg), cfg.n_iters, order_rng,
                             sampling_gen, samples=True, state=dict(running=[0.0, 1.0, 1e-24], history=[],
                                                                    warned=False))
        running.mean, running.var, running.count = restored["running"]
        history, warned = restored["history"], restored["warned"]   # metrics so far, the collapse warning
        val_prompts = data.sample_prompts(splits["val"], cfg.n_eval_prompts, random.Random(cfg.seed + 1))
        monitor = ValidationMonitor(enc, ref, rm, critic, val_prompts, cfg.max_new_tokens, cfg.temperature,
                                    cfg.seed, run.samples, device, has_gold)
        for it in range(run.start, cfg.n_iters + 1):
            t_iter = time.time()
            # 1-2. rollout: responses with old_logprobs, ref_logprobs and RM scores, then the critic's values
            prompts = data.sample_prompts(splits["train"], cfg.rollout_batch // world_size(), order_rng)
            prompt_ids, prompt_mask = encode_prompts(enc, prompts, room, cfg.truncate_prompts)  # (B, Tp) each
            with torch.no_grad(), autocast(device, cfg.amp):
                ro = sample_and_score(policy, ref, rm, prompt_ids.to(device), prompt_mask.to(device),
                                      cfg.max_new_tokens, cfg.temperature, eos_id, pad_id, sampling_gen,
                                      second_forward)
                values = critic_values(critic, ro)                          # (B, Tr)
            replies = tok.decode_replies(enc, ro.response.tolist())       # texts and EOS flags
            gold = torch.tensor(replies.golds(prompts) if has_gold else [math.nan] * len(prompts))  # (B,)
            check_finite(f"PPO iteration {it}", rm_score=ro.scores.sum(), value=values.sum())
            # 3. score processing with running statistics over every score so far (eq. 18); --reward: a rule's
            if cfg.reward == "rm":
                raw = ro.scores.float()                                     # (B,)
            else:
                raw = torch.tensor(data.rule_rewards(cfg.reward, prompts, replies.texts, replies.ended),
                                   device=device)                           # (B,)
            scores = process_scores(raw, running, cfg.score_norm, cfg.score_clip)  # (B,)
            ended = (ro.response == eos_id).any(1)                               # (B,)
            scores = scores - cfg.missing_eos_penalty * (~ended).float()
            # 4. per-token rewards: -β·k1 on every token, the score on the last real one (eqs. 3, 19)
            rewards = kl_rewards(ro.old_logprobs, ro.ref_logprobs, ro.mask, scores, cfg.kl_coef)   # (B, Tr)
            # 5. GAE over response tokens; returns = advantages + values are the critic's targets (eqs. 7-11)
            advantages, returns = compute_gae(rewards, values, ro.mask, cfg.gamma, cfg.lam)   # (B, Tr) each
            # 6. clipped PPO update, `epochs` passes over shuffled minibatches (eqs. 15-17)
            t_train, update_policy = time.time(), it > cfg.critic_pretrain_iters
            minibatch_gen = torch.Generator().manual_seed(order_rng.randrange(2**31))   # this update's shuffles
            update_stats = ppo_update(train_policy, train_critic, opt, ro, values, advantages, returns, cfg,
                                      update_policy, minibatch_gen, ptx_data)
            t_train = time.time() - t_train
            # the classic silent failures, each a plain-English warning once per run (runs.py)
            sanity.rollout(it, k1(ro.old_logprobs, ro.ref_logprobs, ro.mask).sum(1), ended)
            sanity.advantages(it, advantages, ro.mask)
            if update_policy:
                sanity.first_ratio(it, update_stats[0]["ratio_mean"], update_stats[0]["ratio_max"],
                                   uses_bf16(device, cfg.amp))
            # monitoring: the paper's §5.2 metrics, PPO diagnostics, win rate vs SFT, the collapse warning
            row = metrics_over_ranks(dict(                                   # under torchrun: the global batch's
                iter=it, policy_updated=update_policy,
                **ppo_iteration_metrics(ro, values, scores, gold, ended, advantages, returns, running),
                policy_lr=cfg.policy_lr, critic_lr=cfg.critic_lr, t_generate=ro.t_generate, t_score=ro.t_score,
                t_train=t_train, t_iter=time.time() - t_iter, **minibatch_means(update_stats)))
            if it % cfg.eval_interval == 0 or it == cfg.n_iters:
                row["win_rate_vs_sft"] = monitor.win_rate(policy)
                ratios = ratios_after_update(policy, ro, cfg.temperature)   # (B, Tr) for the samples log
                clipped = clipped_tokens(ratios, advantages, cfg.ratio_clip, cfg.ratio_clip) * ro.mask
                monitor.keep_samples(it, policy, ro, prompts, replies.texts, gold, {
                    "k1": k1(ro.old_logprobs, ro.ref_logprobs, ro.mask), "reward": rewards, "value": values,
                    "advantage": advantages, "return": returns, "entropy": ro.entropy, "ratio": ratios,
                    "clipped": clipped})
            history.append(row)
            reasons = collapse_signature(history, cfg.max_new_tokens, cfg.collapse_window)
            row["collapse_warning"] = bool(reasons)
            if reasons and not warned:
                print(f"WARNING: pattern collapse signature at iteration {it} (paper §5.2): {'; '.join(reasons)}")
                warned = True
            run.log.write(**row)
            print(run.progress.line(it, f"RM {row['score_raw']:+.2f} gold {row['gold']:+.3f} KL {row['kl_seq']:.2f} "
                                        f"len {row['length']:.1f} eos {row['eos_rate']:.2f} vf {row['vf_loss']:.3f}"
                                        + ("" if update_policy else " (critic pre-training)")))
            run.save(it, running=[running.mean, running.var, running.count], history=history, warned=warned)
        return finish(cfg, run, history[-1], warned)


def finish(cfg, run, last, warned):
    """The curves, the final checkpoint (last), the summary line; returns the metrics of the `last` iteration."""
    metrics = {k: last[k] for k in ("score_raw", "gold", "kl_seq", "length", "eos_rate")}
    metrics.update(train_time_s=run.train_time(), collapse_warning=warned,
                   win_rate_vs_sft=last.get("win_rate_vs_sft", float("nan")))
    plot_curves(os.path.join(cfg.out_dir, "ppo_curves.png"), read_jsonl(run.log_path), "iter",
                [["score_raw"], ["gold"], ["kl_seq", "kl_k3_seq"], ["length"], ["perplexity"], ["win_rate_vs_sft"]],
                f"PPO (β={cfg.kl_coef}, scores {cfg.score_norm}): RM score, gold reward, KL to SFT, length, "
                f"perplexity, win rate vs SFT")
    run.finish(metrics, responses_generated=cfg.n_iters * cfg.rollout_batch,
               policy_steps=(cfg.n_iters - min(cfg.critic_pretrain_iters, cfg.n_iters)) * cfg.epochs * cfg.minibatches)
    print(f"PPO done in {metrics['train_time_s']:.0f}s: gold {metrics['gold']:.3f}, RM {metrics['score_raw']:.2f}, KL "
          f"{metrics['kl_seq']:.2f}, win rate vs SFT {metrics['win_rate_vs_sft']:.2f}"
          f"{', COLLAPSE WARNING' if warned else ''} -> {run.ckpt_path}")
    return metrics


if __name__ == "__main__":
    run_main(main)
