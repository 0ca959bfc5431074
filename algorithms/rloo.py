"""
REINFORCE-style RLHF: RLOO (REINFORCE Leave-One-Out) and REINFORCE with a moving-average baseline, as in
"Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs"
(Ahmadian et al. 2024, "the paper" below), on the same toy task, SFT policy and reward model as PPO.

The whole completion is one action (the bandit view, paper §2-3): no critic, no GAE, no ratio clipping.
One iteration:
  1. rollout   B prompts, each repeated k times (prompt-major rows b·k + j); sample with the KV cache and
               record old_logprobs and ref_logprobs (runs.sample_and_score)
  2. reward    R = score - β·KL_seq,  KL_seq = Σ_t (old_logprobs - ref_logprobs)_t  (k1, paper eq. 3);
               a constant: no gradient flows through it
  3. baseline  loo:        A_i = R_i - mean_{j≠i} R_j  over the k samples of the same prompt (paper §2.3)
               moving_avg: A = R - b, b = mean of every R of *earlier* iterations (paper eq. 8; use k = 1)
               none:       A = R (plain REINFORCE, a diagnostic)
  4. update    loss = -mean_i A_i · Σ_t log π(y_i,t)  over `minibatches` shuffled minibatches, one pass

Run (after train_sft.py and reward_model.py; writes out/rloo.pt, out/rloo_log.jsonl, out/rloo_curves.png;
rloo.pt also every --ckpt_interval iterations, for --resume true):
    python -m algorithms.rloo                                            # RLOO, k = 4
    python -m algorithms.rloo --baseline moving_avg --samples_per_prompt 1 --out_dir out/reinforce_ma
    python ppo_rlhf.py --preset vanilla_pg --out_dir out/vanilla_pg   # the paper's "vanilla PG" (eq. 9): PPO's
                                    # token-level path with γ = λ = 1, one step per batch, no clipping at work
    python -m algorithms.rloo --help

Deliberate choices:
  1. Samples per iteration match PPO's default (16 prompts × k = 4 = 64 rollouts), so a comparison can
     match the number of generated samples.
  2. The log-probability of a completion is the *sum* over its tokens, as in the paper; longer completions
     therefore get larger gradients (length is logged).
  3. No advantage normalisation (the paper does not use it).
  4. The `minibatches` steps of an iteration reuse its samples with no importance ratio (REINFORCE has none), so
     every minibatch after the first is slightly off-policy: its responses were sampled before the first step.
     How far off, measured (`python -m studies.rloo_second_minibatch`): docs/algorithms.md; a reweighting small
     next to the noise of a 4-sample baseline, so no ratio is applied.

Shape legend: B prompts, k = --samples_per_prompt samples per prompt, N = B·k rollouts, Tr response length, n minibatch rows.
"""
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

import data
import tokenizer as tok
from model import k1, logprobs_from_logits, response_logits
from runs import (Run, RunOptions, SanityChecks, ValidationMonitor, check_finite, field, load_models, parse_config,
                  plot_curves, read_jsonl, run_main, run_meta, sample_and_score)
from tokenizer import encode_prompts


@dataclass
class Config(RunOptions):
    sft_ckpt: str = field("out/sft.pt", "SFT checkpoint: initial policy and frozen reference", input_file=True)
    rm_ckpt: str = field("out/rm.pt", "reward-model checkpoint (frozen)", input_file=True)
    n_iters: int = field(150, "iterations (rollout + one pass of updates)", range="[1, inf)")
    prompts_per_iter: int = field(16, "B prompts per iteration; N = B·k rollouts", range="[1, inf)", global_batch=True)
    samples_per_prompt: int = field(4, "k: responses sampled per prompt (loo needs 2 or more)", range="[1, inf)")
    baseline: str = field("loo", "loo | moving_avg | none", choices=('loo', 'moving_avg', 'none'))
    kl_coef: float = field(0.1, "β of the sequence KL penalty in the reward (as PPO-max; the paper: 0.03-0.1)",
                           range="[0, inf)")
    reward: str = field("rm", "rm (the reward model's score), or a rule in its place: verifier (RLVR: data.verify) "
                              "or gold (the true reward, an oracle)", choices=('rm', 'verifier', 'gold'))
    tasks: str = field("all", "prompt kinds to train on: all, or comma-separated of math, fact, harmful, open")
    max_new_tokens: int = field(48, "longest response", range="[1, inf)")
    temperature: float = field(1.0, "sampling temperature, used for every log-prob too", range="(0, inf)")
    minibatches: int = field(2, "optimizer steps per iteration (the paper: 2)", range="[1, inf)")
    lr: float = field(3e-5, "policy learning rate (AdamW)", range="(0, inf)")
    grad_clip: float = field(1.0, "grad-norm clip (0 = off)", range="[0, inf)")
    eval_interval: int = field(10, "every N iterations: win rate vs SFT on val prompts and a sample table",
                               range="[1, inf)")
    n_eval_prompts: int = field(64, "val prompts for the win rate during training", range="[1, inf)")


PRESETS = {
    "default": {},
    "tiny": dict(n_iters=3, prompts_per_iter=4, samples_per_prompt=2, max_new_tokens=12, eval_interval=2, n_eval_prompts=8),
    # debug: for stepping through in a debugger (docs/debugging.md): 2 prompts × 2 samples, one minibatch
    "debug": dict(n_iters=3, prompts_per_iter=2, samples_per_prompt=2, minibatches=1, max_new_tokens=12,
                  eval_interval=3, n_eval_prompts=4),
}


# ----------------------------------------------------------------------------------------------------
# Pure functions

def loo_advantages(rewards, k):
    """
    Leave-one-out advantages for prompt-major rewards (N,) = (B·k,): A_i = R_i - mean_{j≠i} R_j within each
    prompt's k samples, equivalently k/(k-1)·(R_i - mean_j R_j). Each group's advantages sum to 0.
    """
    if k < 2:
        raise ValueError(f"the leave-one-out baseline needs k >= 2 samples per prompt, got k={k}")
    g = rewards.view(-1, k)                                               # (B, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)                     # (B, k) mean of the others
    return (g - baseline).view(-1)                                        # (N,)


class MovingAverageBaseline:
    """b = mean of all rewards seen in earlier iterations (paper eq. 8); 0 before the first update."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def advantages(self, rewards):
        """A = R - b with b from earlier batches only; then fold this batch in."""
        b = self.total / self.count if self.count else 0.0
        self.total += rewards.sum().item()
        self.count += rewards.numel()
        return rewards - b, b


def kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef):
    """
    Paper eq. 3: R = score - β·KL_seq with KL_seq = Σ_t (old_logprobs - ref_logprobs)_t over response tokens (k1).
    scores (N,), the others (N, Tr) -> (R, KL_seq), both (N,) and constants (computed from no-grad rollouts).
    """
    kl_seq = k1(old_logprobs, ref_logprobs, mask).sum(1)               # (N,)
    return scores.float() - kl_coef * kl_seq, kl_seq


def reinforce_loss(seq_logprobs, advantages):
    """-mean_i A_i · log π(y_i | x_i); seq_logprobs (n,) are summed token log-probs, advantages (n,) constants."""
    return -(advantages.detach() * seq_logprobs).mean()


# ----------------------------------------------------------------------------------------------------

def rloo_update(policy, opt, ro, adv, cfg, generator, where="RLOO update"):
    """Step 4: one pass over the rollout in cfg.minibatches shuffled minibatches, one REINFORCE step each
    (eq. 6 with the sequence log-prob). adv (N,). Returns the per-minibatch losses and grad norms."""
    policy.train()
    N, mask = len(adv), ro.mask
    perm = torch.randperm(N, generator=generator).to(adv.device)
    losses, gnorms = [], []
    for idx in perm.chunk(cfg.minibatches):
        logits = response_logits(policy, ro.seq[idx], ro.seq_mask[idx], ro.n_prompt, cfg.temperature)
        seq_logp = (logprobs_from_logits(logits, ro.response[idx]) * mask[idx]).sum(1)  # (n,)
        loss = reinforce_loss(seq_logp, adv[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        check_finite(where, loss=loss.item(), grad_norm=gnorm.item())
        opt.step()
        losses.append(loss.item())
        gnorms.append(gnorm.item())
    return losses, gnorms


def check_config(cfg):
    """One-line errors for option combinations that cannot work (each value alone: its field's rule)."""
    if cfg.baseline == "loo" and cfg.samples_per_prompt < 2:
        raise ValueError(f"--baseline loo needs --samples_per_prompt >= 2 (got {cfg.samples_per_prompt})")
    N = cfg.prompts_per_iter * cfg.samples_per_prompt
    if N % cfg.minibatches:
        raise ValueError(f"minibatches {cfg.minibatches} must divide the {N} rollouts (prompts_per_iter × "
                         f"samples_per_prompt)")


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    check_config(cfg)
    k = cfg.samples_per_prompt
    with Run(cfg, "rloo") as run:
        device = run.device
        policy, ref, rm, sft, rm_ckpt = load_models(cfg.sft_ckpt, cfg.rm_ckpt, device, cfg.max_new_tokens)
        enc = tok.get_tokenizer(sft["tokenizer"])
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        print(f"device={device} config={asdict(cfg)}")
        splits = data.only_kinds(data.prompt_splits(sft["config"]["seed"]), cfg.tasks)
        rng = random.Random(cfg.seed)                                     # prompt draws, minibatch order
        gen = torch.Generator(device=device).manual_seed(cfg.seed)        # token sampling
        moving, sanity = MovingAverageBaseline(), SanityChecks("RLOO")
        restored = run.begin(opt, dict(model=policy), run_meta(sft, cfg), cfg.n_iters, rng, gen, samples=True,
                             state=dict(moving=[moving.total, moving.count]))
        moving.total, moving.count = restored["moving"]
        monitor = ValidationMonitor(enc, ref, rm, None, data.sample_prompts(
            splits["val"], cfg.n_eval_prompts, random.Random(cfg.seed + 1)), cfg.max_new_tokens, cfg.temperature,
            cfg.seed, run.samples, device)
        for it in range(run.start, cfg.n_iters + 1):
            t_it = time.time()
            # 1. rollout: each prompt k times, prompt-major
            prompts = [p for p in data.sample_prompts(splits["train"], cfg.prompts_per_iter, rng) for _ in range(k)]
            prompt_ids, prompt_mask = encode_prompts(enc, prompts, policy.cfg.block_size - cfg.max_new_tokens,
                                                     cfg.truncate_prompts)                    # (N, Tp) each
            ro = sample_and_score(policy, ref, rm, prompt_ids.to(device), prompt_mask.to(device), cfg.max_new_tokens,
                                  cfg.temperature, tok.eos_id(enc), tok.pad_id(enc), gen)
            mask = ro.mask                                                # (N, Tr)
            replies = tok.decode_replies(enc, ro.response.tolist())       # texts and EOS flags
            texts, gold = replies.texts, torch.tensor(replies.golds(prompts))  # gold (N,): monitoring only
            check_finite(f"RLOO iteration {it}", rm_score=ro.scores.sum())
            score = ro.scores if cfg.reward == "rm" else torch.tensor(data.rule_rewards(cfg.reward, prompts, texts, replies.ended),
                                                                      device=device)  # (N,) what is optimised
            # 2. KL-shaped sequence reward (a constant)
            rewards, kl_seq = kl_shaped_rewards(score, ro.old_logprobs, ro.ref_logprobs, mask, cfg.kl_coef)
            # 3. baseline -> advantages
            b = float("nan")
            if cfg.baseline == "loo":
                adv = loo_advantages(rewards, k)                          # (N,)
            elif cfg.baseline == "moving_avg":
                adv, b = moving.advantages(rewards)
            else:
                adv = rewards
            # the classic silent failures, each a plain-English warning once per run (runs.py)
            sanity.rollout(it, kl_seq, torch.tensor(replies.ended))
            if cfg.baseline == "loo":
                sanity.tied_groups(it, rewards, k)
            sanity.advantages(it, adv)
            # 4. one pass of REINFORCE updates over shuffled minibatches
            t_train = time.time()
            losses, gnorms = rloo_update(policy, opt, ro, adv, cfg,
                                         torch.Generator().manual_seed(rng.randrange(2**31)), f"RLOO iteration {it}")
            n_tok = mask.sum()
            row = dict(iter=it, score_raw=ro.scores.mean().item(), gold=gold.mean().item(),
                       reward=rewards.mean().item(), kl_seq=kl_seq.mean().item(), kl_token=(kl_seq.sum() / n_tok).item(),
                       length=mask.sum(1).float().mean().item(),
                       eos_rate=(ro.response == tok.eos_id(enc)).any(1).float().mean().item(),
                       perplexity=math.exp(-(ro.old_logprobs.sum() / n_tok).item()),
                       entropy=(ro.entropy.sum() / n_tok).item(), adv_mean=adv.mean().item(), adv_std=adv.std().item(),
                       adv_min=adv.min().item(), adv_max=adv.max().item(), baseline=b, loss=sum(losses) / len(losses),
                       grad_norm=sum(gnorms) / len(gnorms), lr=cfg.lr, t_generate=ro.t_generate, t_score=ro.t_score,
                       t_train=time.time() - t_train, t_iter=time.time() - t_it)
            if k > 1:
                row["frac_reward_zero_std"] = (score.view(-1, k).std(1) == 0).float().mean().item()
            if it % cfg.eval_interval == 0 or it == cfg.n_iters:
                row["win_rate_vs_sft"] = monitor.win_rate(policy)
                per_token = dict(k1=k1(ro.old_logprobs, ro.ref_logprobs, mask), entropy=ro.entropy,
                                 advantage=adv[:, None].float() * mask)   # (N, Tr) each; A on every token
                monitor.keep_samples(it, policy, ro, prompts, texts, gold, per_token)
            run.log.write(**row)
            print(run.progress.line(it, f"RM {row['score_raw']:+.2f} gold {row['gold']:+.3f} KL {row['kl_seq']:.2f} "
                                        f"len {row['length']:.1f} loss {row['loss']:+.3f}"))
            run.save(it, moving=[moving.total, moving.count])

        metrics = {key: row[key] for key in ("score_raw", "gold", "kl_seq", "length", "eos_rate")}
        metrics.update(train_time_s=run.train_time(), win_rate_vs_sft=row.get("win_rate_vs_sft", float("nan")))
        plot_curves(os.path.join(cfg.out_dir, "rloo_curves.png"), read_jsonl(run.log_path), "iter",
                    [["score_raw"], ["gold"], ["kl_seq"], ["length"], ["perplexity"], ["win_rate_vs_sft"]],
                    f"REINFORCE ({cfg.baseline} baseline, k={k})")
        run.finish(metrics, responses_generated=cfg.n_iters * cfg.prompts_per_iter * k,
                   policy_steps=cfg.n_iters * cfg.minibatches)
        print(f"RLOO done in {metrics['train_time_s']:.0f}s: gold {metrics['gold']:.3f}, RM {metrics['score_raw']:.2f}, "
              f"KL {metrics['kl_seq']:.2f}, win rate vs SFT {metrics['win_rate_vs_sft']:.2f} -> {run.ckpt_path}")
        return metrics


if __name__ == "__main__":
    run_main(main)
