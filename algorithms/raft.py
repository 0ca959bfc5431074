"""
RAFT: Reward rAnked FineTuning, i.e. best-of-k rejection sampling + supervised fine-tuning (Dong et al. 2023),
the baseline that "Back to Basics" (Ahmadian et al. 2024, §2 and §5) compares RLOO against.

One iteration:
  1. rollout   B prompts × k samples, prompt-major (ppo_rlhf.rollout, no critic)
  2. rank      R = score - β·KL_seq (the same KL-shaped reward as RLOO; --rank_by score ignores the KL)
  3. select    the best of each prompt's k samples: B examples
  4. update    the SFT loss (mean token NLL over response tokens, EOS included) on the selected examples,
               `minibatches` steps per iteration (Back to Basics: 2)
The k-1 other samples are thrown away: the paper's explanation for why RLOO, which learns from all of them,
is more sample-efficient.

Run (after train_sft.py and reward_model.py; writes out/raft.pt, out/raft_log.jsonl, out/raft_curves.png;
raft.pt also every --ckpt_interval iterations, for --resume true):
    python -m algorithms.raft
    python -m algorithms.raft --k 8 --rank_by score
    python -m algorithms.raft --help

Deliberate choices:
  1. Samples per iteration match PPO's and RLOO's defaults (16 prompts × k = 4 = 64).
  2. The NLL uses temperature 1 (it is the SFT loss), while sampling uses --temperature.

Shape legend: B prompts, k samples per prompt, N = B·k rollouts, Tr response length, V vocab.
"""
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

import data
import tokenizer as tok
from model import logprobs_from_logits, response_logits
from ppo_rlhf import encode_prompts, rollout
from algorithms.rloo import kl_shaped_rewards
from evaluate import follow_prompts, keep_samples
from train_sft import sample_responses
from checkpoints import (RunState, check_fresh_start, claim_out_dir, input_fingerprints, load_models, release_out_dir,
                         resume_run, save_run, stop_here)
from utils import (TRUNCATIONS, JsonlLog, Progress, check_finite, field, lines_up_to, masked_mean, parse_config,
                   pick_device, plot_curves, read_jsonl, run_main, seed_everything)


@dataclass
class Config:
    sft_ckpt: str = field("out/sft.pt", "SFT checkpoint: initial policy and frozen reference")
    rm_ckpt: str = field("out/rm.pt", "reward-model checkpoint (frozen)")
    out_dir: str = field("out", "where raft.pt, raft_log.jsonl and raft_curves.png are written")
    seed: int = field(0, "seeds prompts, sampling and minibatch order")
    device: str = field("auto", "auto (cuda -> mps -> cpu), cpu, cuda, mps")
    n_iters: int = field(150, "iterations (sample, rank, fine-tune)")
    prompts_per_iter: int = field(16, "B prompts per iteration; N = B·k samples")
    k: int = field(4, "samples per prompt; the best one is kept")
    rank_by: str = field("R", "R (score - β·KL_seq) or score (the --reward score alone, no KL)")
    kl_coef: float = field(0.1, "β in R (as PPO-max and RLOO)")
    reward: str = field("rm", "rm (the reward model's score), or a rule in its place: verifier (RLVR: data.verify) "
                              "or gold (the true reward, an oracle)")
    tasks: str = field("all", "prompt kinds to train on: all, or comma-separated of math, fact, harmful, open")
    max_new_tokens: int = field(48, "longest response")
    temperature: float = field(1.0, "sampling temperature")
    minibatches: int = field(2, "fine-tuning steps per iteration")
    lr: float = field(3e-5, "learning rate (AdamW)")
    grad_clip: float = field(1.0, "grad-norm clip (0 = off)")
    truncate_prompts: bool = field(True, "cut over-long prompts from the left, with one summary warning at "
                                         "the end of the stage (false: error)")
    log_truncations: bool = field(False, "also print one warning line per truncated prompt")
    eval_interval: int = field(10, "every N iterations: win rate vs SFT on val prompts and a sample table")
    n_eval_prompts: int = field(64, "val prompts for the win rate during training")
    ckpt_interval: int = field(25, "also write raft.pt (with optimizer and RNG state) every N iterations")
    resume: bool = field(False, "continue from out_dir/raft.pt written by an interrupted run")
    overwrite: bool = field(False, "start over although out_dir holds an unfinished run of this stage")
    stop_after: int = field(0, "stop after this many iterations as if killed (to test --resume); 0 = off")


PRESETS = {
    "default": {},
    "tiny": dict(n_iters=3, prompts_per_iter=4, k=2, max_new_tokens=12, eval_interval=2, n_eval_prompts=8),
}


def best_of_k(rewards, k):
    """Prompt-major rewards (N,) = (B·k,) -> row index (B,) of each prompt's best sample (first one on ties)."""
    return rewards.view(-1, k).argmax(1) + torch.arange(0, rewards.numel(), k, device=rewards.device)


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    TRUNCATIONS.reset(cfg.log_truncations)
    claim_out_dir(cfg.out_dir)                        # one run per folder at a time
    ckpt_path, log_path = os.path.join(cfg.out_dir, "raft.pt"), os.path.join(cfg.out_dir, "raft_log.jsonl")
    check_fresh_start(ckpt_path, cfg)
    if cfg.prompts_per_iter % cfg.minibatches:
        raise ValueError(f"minibatches {cfg.minibatches} must divide prompts_per_iter {cfg.prompts_per_iter}")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    policy, ref, rm, sft, rm_ckpt = load_models(cfg.sft_ckpt, cfg.rm_ckpt, device)
    enc = tok.get_tokenizer(sft["tokenizer"])
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    print(f"device={device} config={asdict(cfg)}")

    splits = data.only_kinds(data.prompt_splits(sft["config"]["seed"]), cfg.tasks)
    rng = random.Random(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eval_prompts = data.sample_prompts(splits["val"], cfg.n_eval_prompts, random.Random(cfg.seed + 1))
    sft_eval = sample_responses(ref, enc, eval_prompts, cfg.max_new_tokens, cfg.temperature, device,
                                torch.Generator(device=device).manual_seed(cfg.seed + 1))
    state = RunState(opt, rng, gen, inputs=input_fingerprints(cfg))
    start = resume_run(ckpt_path, "raft", cfg, sft["tokenizer_id"], state, dict(model=policy)) + 1 if cfg.resume else 1
    log, progress = JsonlLog(log_path, state.log_lines), Progress(cfg.n_iters)
    samples_path = os.path.join(cfg.out_dir, "raft_samples.jsonl")      # rollouts with per-token quantities
    samples = JsonlLog(samples_path, lines_up_to(samples_path, "iter", start - 1) if cfg.resume else None)
    t_start = time.time() - state.train_time_s
    meta = dict(model_config=sft["model_config"], tokenizer=sft["tokenizer"], tokenizer_id=sft["tokenizer_id"],
                sft_ckpt=cfg.sft_ckpt, rm_ckpt=cfg.rm_ckpt)
    for it in range(start, cfg.n_iters + 1):
        t_it = time.time()
        # 1. rollout, 2. rank
        prompts = [p for p in data.sample_prompts(splits["train"], cfg.prompts_per_iter, rng) for _ in range(cfg.k)]
        prompt_ids, prompt_mask = encode_prompts(enc, prompts, policy.cfg.block_size - cfg.max_new_tokens,
                                                 cfg.truncate_prompts)                    # (N, Tp) each
        ro = rollout(policy, ref, rm, None, prompt_ids.to(device), prompt_mask.to(device), cfg.max_new_tokens,
                     cfg.temperature, tok.eos_id(enc), tok.pad_id(enc), gen)
        mask = ro.mask                                                 # (N, Tr)
        texts = [tok.decode(enc, r) for r in ro.response.tolist()]
        gold = torch.tensor([data.gold_reward(p, r) for p, r in zip(prompts, texts)])
        check_finite(f"RAFT iteration {it}", rm_score=ro.scores.sum())
        score = ro.scores if cfg.reward == "rm" else torch.tensor(data.rule_rewards(cfg.reward, prompts, texts),
                                                                  device=device)  # (N,) what is optimised
        rewards, kl_seq = kl_shaped_rewards(score, ro.old_logprobs, ro.ref_logprobs, mask, cfg.kl_coef)
        # 3. select the best sample of each prompt
        best = best_of_k(rewards if cfg.rank_by == "R" else score.float(), cfg.k)  # (B,)
        # 4. SFT loss on the selected samples
        t_train = time.time()
        policy.train()
        perm = best[torch.randperm(len(best), generator=torch.Generator().manual_seed(rng.randrange(2**31))).to(device)]
        losses = []
        for idx in perm.chunk(cfg.minibatches):
            logits = response_logits(policy, ro.seq[idx], ro.seq_mask[idx], ro.n_prompt, 1.0)  # (b, Tr, V)
            loss = -masked_mean(logprobs_from_logits(logits, ro.response[idx]), mask[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            check_finite(f"RAFT iteration {it}", loss=loss.item(), grad_norm=gnorm.item())
            opt.step()
            losses.append(loss.item())
        row = dict(iter=it, score_raw=ro.scores.mean().item(), score_selected=ro.scores[best].mean().item(),
                   gold=gold.mean().item(), gold_selected=gold[best.cpu()].mean().item(), reward=rewards.mean().item(),
                   best_minus_mean=(rewards[best].mean() - rewards.mean()).item(), kl_seq=kl_seq.mean().item(),
                   length=mask.sum(1).float().mean().item(),
                   eos_rate=(ro.response == tok.eos_id(enc)).any(1).float().mean().item(),
                   nll_selected=sum(losses) / len(losses), lr=cfg.lr, t_generate=ro.t_generate,
                   t_score=ro.t_score, t_train=time.time() - t_train, t_iter=time.time() - t_it)
        if it % cfg.eval_interval == 0 or it == cfg.n_iters:
            outs = sample_responses(policy, enc, eval_prompts, cfg.max_new_tokens, cfg.temperature, device,
                                    torch.Generator(device=device).manual_seed(cfg.seed + 1))
            row["win_rate_vs_sft"] = data.gold_win_rate(eval_prompts, outs, sft_eval)
            selected = torch.zeros_like(mask)
            selected[best] = 1                                             # (N, Tr) 1 on the fine-tuned responses
            per_token = dict(k1=(ro.old_logprobs - ro.ref_logprobs) * mask, entropy=ro.entropy, selected=selected * mask)
            keep_samples(samples, it, enc, prompts, texts, ro, gold, per_token, follow_prompts(
                it, policy, ref, rm, None, enc, eval_prompts[:2], cfg.max_new_tokens, cfg.temperature, cfg.seed + 2,
                True, device))
        log.write(**row)
        if it % cfg.ckpt_interval == 0 and it < cfg.n_iters:
            save_run(ckpt_path, "raft", it, cfg, state, dict(model=policy), log, t_start, **meta)
        print(progress.line(it, f"RM {row['score_raw']:+.2f} (selected {row['score_selected']:+.2f}) gold "
                                f"{row['gold']:+.3f} KL {row['kl_seq']:.2f} len {row['length']:.1f}"))
        if stop_here(cfg, it, cfg.n_iters, "iteration"):
            return None

    total = time.time() - t_start
    metrics = {k: row[k] for k in ("score_raw", "gold", "kl_seq", "length", "eos_rate")}
    metrics.update(train_time_s=total, win_rate_vs_sft=row.get("win_rate_vs_sft", float("nan")))
    plot_curves(os.path.join(cfg.out_dir, "raft_curves.png"), read_jsonl(log_path), "iter",
                [["score_raw", "score_selected"], ["gold", "gold_selected"], ["kl_seq"], ["length"],
                 ["nll_selected"], ["win_rate_vs_sft"]], f"RAFT (best of k={cfg.k})")
    save_run(ckpt_path, "raft", cfg.n_iters, cfg, state, dict(model=policy), log, t_start, metrics, **meta)
    TRUNCATIONS.summary("RAFT")
    print(f"RAFT done in {total:.0f}s: gold {metrics['gold']:.3f}, RM {metrics['score_raw']:.2f}, KL "
          f"{metrics['kl_seq']:.2f}, win rate vs SFT {metrics['win_rate_vs_sft']:.2f} -> {ckpt_path}")
    release_out_dir(cfg.out_dir)
    return metrics


if __name__ == "__main__":
    run_main(main)
