"""
RAFT: Reward rAnked FineTuning, i.e. best-of-k rejection sampling + supervised fine-tuning (Dong et al. 2023),
the baseline that "Back to Basics" (Ahmadian et al. 2024, §2 and §5) compares RLOO against.

One iteration:
  1. rollout   B prompts × k samples, prompt-major (runs.sample_and_score)
  2. rank      R = score - β·KL_seq (the same KL-shaped reward as RLOO; --rank_by score ignores the KL)
  3. select    the best of each prompt's k samples: B examples
  4. update    the SFT loss (mean token NLL over response tokens, EOS included) on the selected examples,
               `minibatches` steps per iteration (Back to Basics: 2)
The k-1 other samples are thrown away: the paper's explanation for why RLOO, which learns from all of them,
is more sample-efficient.

Run (after train_sft.py and reward_model.py; writes out/raft.pt, out/raft_log.jsonl, out/raft_curves.png;
raft.pt also every --ckpt_interval iterations, for --resume true):
    python -m algorithms.raft
    python -m algorithms.raft --samples_per_prompt 8 --rank_by score
    python -m algorithms.raft --help

Deliberate choices:
  1. Samples per iteration match PPO's and RLOO's defaults (16 prompts × k = 4 = 64).
  2. The NLL uses temperature 1 (it is the SFT loss), while sampling uses --temperature.

Shape legend: B prompts, k = --samples_per_prompt samples per prompt, N = B·k rollouts, Tr response length, V vocab.
"""
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

import data
import tokenizer as tok
from model import k1, logprobs_from_logits, masked_mean, response_logits
from runs import (Run, RunOptions, ValidationMonitor, check_finite, field, load_models, parse_config, plot_curves,
                  read_jsonl, run_main, run_meta, sample_and_score)
from tokenizer import encode_prompts


@dataclass
class Config(RunOptions):
    sft_ckpt: str = field("out/sft.pt", "SFT checkpoint: initial policy and frozen reference", input_file=True)
    rm_ckpt: str = field("out/rm.pt", "reward-model checkpoint (frozen)", input_file=True)
    n_iters: int = field(150, "iterations (sample, rank, fine-tune)", range="[1, inf)")
    prompts_per_iter: int = field(16, "B prompts per iteration; N = B·k samples", range="[1, inf)", global_batch=True)
    samples_per_prompt: int = field(4, "k: responses sampled per prompt; the best one is kept", range="[1, inf)")
    rank_by: str = field("R", "R (score - β·KL_seq) or score (the --reward score alone, no KL)", choices=('R', 'score'))
    kl_coef: float = field(0.1, "β in R (as PPO-max and RLOO)", range="[0, inf)")
    reward: str = field("rm", "rm (the reward model's score), or a rule in its place: verifier (RLVR: data.verify) "
                              "or gold (the true reward, an oracle)", choices=('rm', 'verifier', 'gold'))
    tasks: str = field("all", "prompt kinds to train on: all, or comma-separated of math, fact, harmful, open")
    max_new_tokens: int = field(48, "longest response", range="[1, inf)")
    temperature: float = field(1.0, "sampling temperature", range="(0, inf)")
    minibatches: int = field(2, "fine-tuning steps per iteration", range="[1, inf)")
    lr: float = field(3e-5, "learning rate (AdamW)", range="(0, inf)")
    grad_clip: float = field(1.0, "grad-norm clip (0 = off)", range="[0, inf)")
    eval_interval: int = field(10, "every N iterations: win rate vs SFT on val prompts and a sample table",
                               range="[1, inf)")
    n_eval_prompts: int = field(64, "val prompts for the win rate during training", range="[1, inf)")


PRESETS = {
    "default": {},
    "tiny": dict(n_iters=3, prompts_per_iter=4, samples_per_prompt=2, max_new_tokens=12, eval_interval=2, n_eval_prompts=8),
    # debug: for stepping through in a debugger (docs/debugging.md): 2 prompts × 2 samples, one fine-tuning step
    "debug": dict(n_iters=3, prompts_per_iter=2, samples_per_prompt=2, minibatches=1, max_new_tokens=12,
                  eval_interval=3, n_eval_prompts=4),
}


def kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef):
    """R = score - β·KL_seq with KL_seq = Σ_t (old_logprobs - ref_logprobs)_t over response tokens (k1), as RLOO's
    reward. scores (N,), the others (N, Tr) -> (R, KL_seq), both (N,) and constants."""
    kl_seq = k1(old_logprobs, ref_logprobs, mask).sum(1)               # (N,)
    return scores.float() - kl_coef * kl_seq, kl_seq


def best_of_k(rewards, k):
    """Prompt-major rewards (N,) = (B·k,) -> row index (B,) of each prompt's best sample (first one on ties)."""
    return rewards.view(-1, k).argmax(1) + torch.arange(0, rewards.numel(), k, device=rewards.device)


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    if cfg.prompts_per_iter % cfg.minibatches:
        raise ValueError(f"minibatches {cfg.minibatches} must divide prompts_per_iter {cfg.prompts_per_iter}")
    k = cfg.samples_per_prompt
    with Run(cfg, "raft") as run:
        device = run.device
        policy, ref, rm, sft, rm_ckpt = load_models(cfg.sft_ckpt, cfg.rm_ckpt, device, cfg.max_new_tokens)
        enc = tok.get_tokenizer(sft["tokenizer"])
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        print(f"device={device} config={asdict(cfg)}")
        splits = data.only_kinds(data.prompt_splits(sft["config"]["seed"]), cfg.tasks)
        rng = random.Random(cfg.seed)                                     # prompt draws, minibatch order
        gen = torch.Generator(device=device).manual_seed(cfg.seed)        # token sampling
        run.begin(opt, dict(model=policy), run_meta(sft, cfg), cfg.n_iters, rng, gen, samples=True)
        monitor = ValidationMonitor(enc, ref, rm, None, data.sample_prompts(
            splits["val"], cfg.n_eval_prompts, random.Random(cfg.seed + 1)), cfg.max_new_tokens, cfg.temperature,
            cfg.seed, run.samples, device)
        for it in range(run.start, cfg.n_iters + 1):
            t_it = time.time()
            # 1. rollout, 2. rank
            prompts = [p for p in data.sample_prompts(splits["train"], cfg.prompts_per_iter, rng) for _ in range(k)]
            prompt_ids, prompt_mask = encode_prompts(enc, prompts, policy.cfg.block_size - cfg.max_new_tokens,
                                                     cfg.truncate_prompts)                    # (N, Tp) each
            ro = sample_and_score(policy, ref, rm, prompt_ids.to(device), prompt_mask.to(device), cfg.max_new_tokens,
                                  cfg.temperature, tok.eos_id(enc), tok.pad_id(enc), gen)
            mask = ro.mask                                                # (N, Tr)
            replies = tok.decode_replies(enc, ro.response.tolist())       # texts and EOS flags
            texts, gold = replies.texts, torch.tensor(replies.golds(prompts))  # gold (N,): monitoring only
            check_finite(f"RAFT iteration {it}", rm_score=ro.scores.sum())
            score = ro.scores if cfg.reward == "rm" else torch.tensor(data.rule_rewards(cfg.reward, prompts, texts, replies.ended),
                                                                      device=device)  # (N,) what is optimised
            rewards, kl_seq = kl_shaped_rewards(score, ro.old_logprobs, ro.ref_logprobs, mask, cfg.kl_coef)
            # 3. select the best sample of each prompt
            best = best_of_k(rewards if cfg.rank_by == "R" else score.float(), k)  # (B,)
            # 4. SFT loss on the selected samples
            t_train = time.time()
            policy.train()
            order = torch.randperm(len(best), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
            losses = []
            for idx in best[order.to(device)].chunk(cfg.minibatches):
                logits = response_logits(policy, ro.seq[idx], ro.seq_mask[idx], ro.n_prompt, 1.0)  # (b, Tr, V)
                loss = -masked_mean(logprobs_from_logits(logits, ro.response[idx]), mask[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
                check_finite(f"RAFT iteration {it}", loss=loss.item(), grad_norm=gnorm.item())
                opt.step()
                losses.append(loss.item())
            row = dict(iter=it, score_raw=ro.scores.mean().item(), score_selected=ro.scores[best].mean().item(),
                       gold=gold.mean().item(), gold_selected=gold[best.cpu()].mean().item(),
                       reward=rewards.mean().item(), best_minus_mean=(rewards[best].mean() - rewards.mean()).item(),
                       kl_seq=kl_seq.mean().item(), length=mask.sum(1).float().mean().item(),
                       eos_rate=(ro.response == tok.eos_id(enc)).any(1).float().mean().item(),
                       nll_selected=sum(losses) / len(losses), lr=cfg.lr, t_generate=ro.t_generate,
                       t_score=ro.t_score, t_train=time.time() - t_train, t_iter=time.time() - t_it)
            if it % cfg.eval_interval == 0 or it == cfg.n_iters:
                row["win_rate_vs_sft"] = monitor.win_rate(policy)
                selected = torch.zeros_like(mask)
                selected[best] = 1                                        # (N, Tr) 1 on the fine-tuned responses
                per_token = dict(k1=k1(ro.old_logprobs, ro.ref_logprobs, mask), entropy=ro.entropy,
                                 selected=selected * mask)
                monitor.keep_samples(it, policy, ro, prompts, texts, gold, per_token)
            run.log.write(**row)
            print(run.progress.line(it, f"RM {row['score_raw']:+.2f} (selected {row['score_selected']:+.2f}) gold "
                                        f"{row['gold']:+.3f} KL {row['kl_seq']:.2f} len {row['length']:.1f}"))
            run.save(it)

        metrics = {key: row[key] for key in ("score_raw", "gold", "kl_seq", "length", "eos_rate")}
        metrics.update(train_time_s=run.train_time(), win_rate_vs_sft=row.get("win_rate_vs_sft", float("nan")))
        plot_curves(os.path.join(cfg.out_dir, "raft_curves.png"), read_jsonl(run.log_path), "iter",
                    [["score_raw", "score_selected"], ["gold", "gold_selected"], ["kl_seq"], ["length"],
                     ["nll_selected"], ["win_rate_vs_sft"]], f"RAFT (best of k={k})")
        run.finish(metrics, responses_generated=cfg.n_iters * cfg.prompts_per_iter * k,
                   policy_steps=cfg.n_iters * cfg.minibatches)
        print(f"RAFT done in {metrics['train_time_s']:.0f}s: gold {metrics['gold']:.3f}, RM {metrics['score_raw']:.2f}, "
              f"KL {metrics['kl_seq']:.2f}, win rate vs SFT {metrics['win_rate_vs_sft']:.2f} -> {run.ckpt_path}")
        return metrics


if __name__ == "__main__":
    run_main(main)
