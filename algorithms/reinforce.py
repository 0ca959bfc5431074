"""
REINFORCE with a batch-mean baseline (Williams 1992; the baseline is the simplest of those "Back to Basics",
Ahmadian et al. 2024, §3 compares): the worked example of docs/adding_an_algorithm.md, written as a new
method is added to this project: one file, the iteration in main(), building blocks from the library, the
run's plumbing behind runs.Run.

The whole completion is one action. One iteration:
  1. sample    B prompts, one response each, with log π_old and log π_ref per token (runs.sample_and_score)
  2. reward    R = score - β·KL_seq,  KL_seq = Σ_t k1_t = Σ_t (log π_old - log π_ref)_t   (a constant)
  3. baseline  b = mean of this batch's R;  A_i = R_i - b   (biased by 1/B: R_i is part of its own baseline; RLOO
               removes that bias by leaving it out)
  4. update    loss = -mean_i A_i · Σ_t log π(y_i,t), one optimizer step per iteration

Run (after train_sft.py and reward_model.py; writes out/reinforce/reinforce.pt, reinforce_log.jsonl,
reinforce_samples.jsonl, reinforce_curves.png):
    python -m algorithms.reinforce --out_dir out/reinforce
    python -m studies.report out/reinforce          # its page, with no other edit
    python -m algorithms.reinforce --help

Deliberate choices:
  1. One response per prompt and one optimizer step per iteration: on-policy, so no ratio is needed.
  2. The summed (not averaged) token log-prob, as RLOO: a longer response gets a larger gradient.

Shape legend: B prompts = responses per iteration, Tp prompt length, Tr response length, V vocab.
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
from runs import (Run, RunOptions, ValidationMonitor, check_finite, field, load_models, parse_config, plot_curves,
                  read_jsonl, run_main, run_meta, sample_and_score)
from tokenizer import encode_prompts


@dataclass
class Config(RunOptions):
    sft_ckpt: str = field("out/sft.pt", "SFT checkpoint: initial policy and frozen reference", input_file=True)
    rm_ckpt: str = field("out/rm.pt", "reward-model checkpoint (frozen)", input_file=True)
    n_iters: int = field(150, "iterations (sample, reward, one update)", range="[1, inf)")
    prompts_per_iter: int = field(64, "B prompts per iteration, one response each", range="[2, inf)")
    kl_coef: float = field(0.1, "β of the sequence KL penalty in the reward", range="[0, inf)")
    max_new_tokens: int = field(48, "longest response", range="[1, inf)")
    temperature: float = field(1.0, "sampling temperature, used for every log-prob too", range="(0, inf)")
    lr: float = field(3e-5, "policy learning rate (AdamW)", range="(0, inf)")
    grad_clip: float = field(1.0, "grad-norm clip (0 = off)", range="[0, inf)")
    eval_interval: int = field(10, "every N iterations: win rate vs SFT on val prompts and a sample table",
                               range="[1, inf)")
    n_eval_prompts: int = field(64, "val prompts for the win rate during training", range="[1, inf)")


PRESETS = {
    "default": {},
    "tiny": dict(n_iters=3, prompts_per_iter=8, max_new_tokens=12, eval_interval=2, n_eval_prompts=8),
    # debug: for stepping through in a debugger (docs/debugging.md): 4 prompts, one sample each
    "debug": dict(n_iters=3, prompts_per_iter=4, max_new_tokens=12, eval_interval=3, n_eval_prompts=4),
}


def batch_mean_advantages(rewards):
    """Step 3: A_i = R_i - mean_j R_j over the batch (B,) -> (B,); the advantages sum to 0."""
    return rewards - rewards.mean()


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    with Run(cfg, "reinforce") as run:
        device = run.device
        policy, ref, rm, sft, _ = load_models(cfg.sft_ckpt, cfg.rm_ckpt, device, cfg.max_new_tokens)
        enc = tok.get_tokenizer(sft["tokenizer"])
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        print(f"device={device} config={asdict(cfg)}")
        splits = data.prompt_splits(sft["config"]["seed"])
        rng = random.Random(cfg.seed)                                     # prompt draws
        gen = torch.Generator(device=device).manual_seed(cfg.seed)        # token sampling
        run.begin(opt, dict(model=policy), run_meta(sft, cfg), cfg.n_iters, rng, gen, samples=True)
        monitor = ValidationMonitor(enc, ref, rm, None, data.sample_prompts(
            splits["val"], cfg.n_eval_prompts, random.Random(cfg.seed + 1)), cfg.max_new_tokens, cfg.temperature,
            cfg.seed, run.samples, device)
        for it in range(run.start, cfg.n_iters + 1):
            t_it = time.time()
            # 1. sample one response per prompt, with log π_old, log π_ref and the RM score
            prompts = data.sample_prompts(splits["train"], cfg.prompts_per_iter, rng)
            prompt_ids, prompt_mask = encode_prompts(enc, prompts, policy.cfg.block_size - cfg.max_new_tokens,
                                                     cfg.truncate_prompts)                    # (B, Tp) each
            ro = sample_and_score(policy, ref, rm, prompt_ids.to(device), prompt_mask.to(device), cfg.max_new_tokens,
                                  cfg.temperature, tok.eos_id(enc), tok.pad_id(enc), gen)
            replies = tok.decode_replies(enc, ro.response.tolist())       # texts and EOS flags
            texts, gold = replies.texts, torch.tensor(replies.golds(prompts))  # gold (B,): monitoring only
            check_finite(f"REINFORCE iteration {it}", rm_score=ro.scores.sum())
            # 2. the KL-shaped sequence reward, a constant
            kl_seq = k1(ro.old_logprobs, ro.ref_logprobs, ro.mask).sum(1)                # (B,)
            rewards = ro.scores - cfg.kl_coef * kl_seq                                      # (B,)
            # 3. the batch-mean baseline
            adv = batch_mean_advantages(rewards)                                            # (B,)
            # 4. one REINFORCE step on the summed log-probs of the sampled responses
            policy.train()
            logits = response_logits(policy, ro.seq, ro.seq_mask, ro.n_prompt, cfg.temperature)   # (B, Tr, V)
            seq_logprobs = (logprobs_from_logits(logits, ro.response) * ro.mask).sum(1)    # (B,)
            loss = -(adv.detach() * seq_logprobs).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
            check_finite(f"REINFORCE iteration {it}", loss=loss.item(), grad_norm=grad_norm.item())
            opt.step()

            n_tok = ro.mask.sum()
            row = dict(iter=it, score_raw=ro.scores.mean().item(), gold=gold.mean().item(),
                       reward=rewards.mean().item(), kl_seq=kl_seq.mean().item(),
                       length=ro.mask.sum(1).float().mean().item(),
                       eos_rate=(ro.response == tok.eos_id(enc)).any(1).float().mean().item(),
                       perplexity=math.exp(-(ro.old_logprobs.sum() / n_tok).item()), adv_std=adv.std().item(),
                       loss=loss.item(), grad_norm=grad_norm.item(), t_iter=time.time() - t_it)
            if it % cfg.eval_interval == 0 or it == cfg.n_iters:
                row["win_rate_vs_sft"] = monitor.win_rate(policy)
                monitor.keep_samples(it, policy, ro, prompts, texts, gold, dict(
                    k1=k1(ro.old_logprobs, ro.ref_logprobs, ro.mask), entropy=ro.entropy,
                    advantage=adv[:, None] * ro.mask))                                     # (B, Tr) each
            run.log.write(**row)
            print(run.progress.line(it, f"RM {row['score_raw']:+.2f} gold {row['gold']:+.3f} KL {row['kl_seq']:.2f} "
                                        f"len {row['length']:.1f} loss {row['loss']:+.3f}"))
            run.save(it)

        metrics = {key: row[key] for key in ("score_raw", "gold", "kl_seq", "length", "eos_rate")}
        metrics.update(train_time_s=run.train_time(), win_rate_vs_sft=row["win_rate_vs_sft"])
        plot_curves(os.path.join(cfg.out_dir, "reinforce_curves.png"), read_jsonl(run.log_path), "iter",
                    [["score_raw"], ["gold"], ["kl_seq"], ["length"], ["perplexity"], ["win_rate_vs_sft"]],
                    "REINFORCE (batch-mean baseline)")
        run.finish(metrics, responses_generated=cfg.n_iters * cfg.prompts_per_iter, policy_steps=cfg.n_iters)
        print(f"REINFORCE done in {metrics['train_time_s']:.0f}s: gold {metrics['gold']:.3f}, RM "
              f"{metrics['score_raw']:.2f}, KL {metrics['kl_seq']:.2f}, win rate vs SFT {metrics['win_rate_vs_sft']:.2f} "
              f"-> {run.ckpt_path}")
        return metrics


if __name__ == "__main__":
    run_main(main)
