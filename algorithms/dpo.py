"""
DPO: Direct Preference Optimization (Rafailov et al. 2023, "the paper" below) on the same preference pairs the
reward model was trained on, from the same SFT policy: no reward model, no sampling during training.

For a pair (x, y_w chosen, y_l rejected), with log π(y|x) the SUM of the response tokens' log-probs (EOS included
when the response ended) and π_ref the frozen SFT policy:
    h    = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)]
    loss = -log σ(β·h)                                       (paper eq. 7)
    conservative DPO (label smoothing ε): -(1-ε)·log σ(β·h) - ε·log σ(-β·h)
The implicit reward is r̂(x, y) = β·(log π(y|x) - log π_ref(y|x)); we log its value on chosen and rejected
responses, the margin and the share of pairs it orders like the labels. At step 0, π = π_ref: h = 0, loss = ln 2.

Run (after train_sft.py and reward_model.py; writes out/dpo.pt, out/dpo_log.jsonl, out/dpo_curves.png;
dpo.pt also every --ckpt_interval steps, for --resume true):
    python -m algorithms.dpo
    python -m algorithms.dpo --beta 0.3 --label_smoothing 0.1 --out_dir out/cdpo
    python -m algorithms.dpo --help

Deliberate choices:
  1. The pairs are regenerated from the reward-model checkpoint's config (same seed, n_train, τ and length
     bias), so DPO and the RM-based methods learn from exactly the same simulated human signal.
  2. Reference log-probs are computed on the fly (no-grad) for each batch, with the same masks as the policy's.
  3. AdamW with linear warm-up, one epoch (the paper uses RMSprop; on this tiny model AdamW is the stage default).
  4. Policy and reference run without dropout whatever the SFT stage trained with (runs.load_policy), so
     the first step's loss is ln 2 exactly; with an SFT dropout of 0.1 left in, it was 0.6925.

Shape legend: B pairs per batch, T sequence length (prompt + response, right-padded), V vocab.
"""
import copy
import os
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import data
import tokenizer as tok
from runs import (Run, RunOptions, check_finite, ckpt_interval_field, field, load_checkpoint, load_policy, parse_config,
                  plot_curves, read_jsonl, run_main, run_meta, sample_responses, table)
from tokenizer import build_sft_example, collate, fit_prompt
from model import logprobs_from_logits


@dataclass
class Config(RunOptions):
    ckpt_interval: int = ckpt_interval_field(100)
    sft_ckpt: str = field("out/sft.pt", "SFT checkpoint: initial policy and frozen reference", input_file=True)
    rm_ckpt: str = field("out/rm.pt", "reward-model checkpoint: its config says which pairs it was trained on",
                         input_file=True)
    beta: float = field(0.1, "β: strength of the implicit KL constraint (paper: 0.1)", range="(0, inf)")
    label_smoothing: float = field(0.0, "ε of conservative DPO (0 = plain DPO)", range="[0, 0.5)")
    epochs: int = field(1, "passes over the preference pairs", range="[1, inf)")
    batch_size: int = field(32, "pairs per step", range="[1, inf)", global_batch=True)
    lr: float = field(3e-5, "learning rate (AdamW)", range="(0, inf)")
    warmup_iters: int = field(20, "linear warm-up steps", range="[1, inf)")
    grad_clip: float = field(1.0, "grad-norm clip (0 = off)", range="[0, inf)")
    eval_interval: int = field(50, "validation-pair metrics every N steps", range="[1, inf)")
    n_val: int = field(256, "validation pairs", range="[1, inf)")
    n_eval_prompts: int = field(64, "val prompts for the final win rate vs SFT", range="[1, inf)")
    max_new_tokens: int = field(48, "longest sampled response in the final win-rate check", range="[1, inf)")


PRESETS = {
    "default": {},
    "tiny": dict(batch_size=16, warmup_iters=2, eval_interval=4, n_val=16, n_eval_prompts=8, max_new_tokens=12),
    # debug: for stepping through in a debugger (docs/debugging.md): batches of 4 pairs; the steps are one pass
    # over the pairs the RM was trained on (seconds from the tiny pipeline's RM)
    "debug": dict(batch_size=4, warmup_iters=1, eval_interval=4, n_val=8, n_eval_prompts=4, max_new_tokens=12),
}


# ----------------------------------------------------------------------------------------------------
# Pure functions

def sequence_logprobs(model, ids, mask, loss_mask):
    """Σ over response tokens of log π(token | prefix): ids, mask, loss_mask (B, T) right-padded -> (B,)."""
    logits = model(ids, mask)[:, :-1]                                     # (B, T-1, V) position t predicts t+1
    logp = logprobs_from_logits(logits, ids[:, 1:])                       # (B, T-1)
    return (logp * loss_mask[:, 1:]).sum(1)                               # (B,)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """
    (loss, stats) of DPO (paper eq. 7) on summed log-probs, each (B,); label_smoothing ε gives conservative DPO.
    stats: implicit rewards of chosen / rejected, their margin, and the accuracy (margin > 0).
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)   # (B,)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    r_c, r_r = beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()
    return loss.mean(), dict(rewards_chosen=r_c.mean().item(), rewards_rejected=r_r.mean().item(),
                             margin=(r_c - r_r).mean().item(), accuracy=(r_c > r_r).float().mean().item())


def encode_pairs(enc, pairs, block_size, truncate):
    """[{"prompt", "chosen", "rejected"}] -> [(chosen (ids, loss_mask), rejected (ids, loss_mask))]."""
    out = []
    for i, p in enumerate(pairs):
        both = []
        for key in ("chosen", "rejected"):
            resp = tok.encode(enc, p[key])
            prompt = fit_prompt(tok.encode(enc, p["prompt"]), block_size - len(resp), truncate, f"pair {i}")
            both.append(build_sft_example(prompt, resp))
        out.append(tuple(both))
    return out


def pair_logprobs(model, batch, pad_id, device):
    """Summed log-probs (B,), (B,) of the chosen and rejected halves of encoded pairs, in one forward."""
    ids, mask, loss_mask = collate([c for c, _ in batch] + [r for _, r in batch], pad_id, device)  # (2B, T)
    lp = sequence_logprobs(model, ids, mask, loss_mask)                   # (2B,)
    return lp[: len(batch)], lp[len(batch):]


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    with Run(cfg, "dpo", unit="step") as run:
        device = run.device
        policy, sft = load_policy(cfg.sft_ckpt, ("sft",))
        enc = tok.get_tokenizer(sft["tokenizer"])
        rm_ckpt = load_checkpoint(cfg.rm_ckpt, "rm", sft["tokenizer_id"])
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
        policy, ref = policy.to(device), ref.to(device)
        print(f"device={device} config={asdict(cfg)}")

        # the RM's own training pairs (data.sample_preference_pairs with its seeds and annotator settings)
        rcfg = rm_ckpt["config"]
        splits = data.prompt_splits(sft["config"]["seed"])
        pairs = data.sample_preference_pairs(splits["train"], rcfg["n_train"], rcfg["seed"] + 10, rcfg["tau"],
                                             rcfg["length_bias"])
        val_pairs = data.sample_preference_pairs(splits["val"], cfg.n_val, rcfg["seed"] + 20, rcfg["tau"],
                                                 rcfg["length_bias"])
        train = encode_pairs(enc, pairs, policy.cfg.block_size, cfg.truncate_prompts)
        val = encode_pairs(enc, val_pairs, policy.cfg.block_size, cfg.truncate_prompts)
        steps_per_epoch = len(train) // cfg.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"{len(train)} pairs is less than one batch of {cfg.batch_size}")
        n_iters = cfg.epochs * steps_per_epoch
        print(f"{len(train)} training pairs (the RM's), {len(val)} val pairs; {n_iters} steps")

        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        pad = tok.pad_id(enc)
        rng = random.Random(cfg.seed)
        # the epoch's remaining pairs, popped per batch (kept in the checkpoints)
        order = run.begin(opt, dict(model=policy), run_meta(sft, cfg), n_iters, rng, state=dict(order=[]))["order"]

        @torch.no_grad()
        def validate():
            policy.eval()
            stats = []
            for i in range(0, len(val), 64):
                b = val[i:i + 64]
                _, st = dpo_loss(*pair_logprobs(policy, b, pad, device), *pair_logprobs(ref, b, pad, device),
                                 cfg.beta, cfg.label_smoothing)
                stats.append(st)
            return {f"val_{k}": sum(s[k] for s in stats) / len(stats) for k in stats[0]}

        def log_validation(step):
            v = validate()
            run.log.write(step=step, **v, time=run.train_time())
            print(run.progress.line(step, f"val accuracy {v['val_accuracy']:.3f} margin {v['val_margin']:+.3f}"))
            return v

        if run.start == 1:
            v = log_validation(0)
        for step in range(run.start, n_iters + 1): # the step-th optimizer step
            if len(order) < cfg.batch_size:
                order[:] = range(len(train))
                rng.shuffle(order)
            batch = [train[order.pop()] for _ in range(cfg.batch_size)]
            with torch.no_grad():
                ref_c, ref_r = pair_logprobs(ref, batch, pad, device)         # (B,), (B,)
            policy.train()
            lr = cfg.lr * min(1.0, step / cfg.warmup_iters)
            for g in opt.param_groups:
                g["lr"] = lr
            pol_c, pol_r = pair_logprobs(policy, batch, pad, device)          # (B,), (B,)
            loss, st = dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.beta, cfg.label_smoothing)   # eq. 7
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
            check_finite(f"DPO step {step}", loss=loss.item(), grad_norm=gnorm.item())
            opt.step()
            run.log.write(step=step, loss=loss.item(), **st, logps_chosen=pol_c.mean().item(),
                          logps_rejected=pol_r.mean().item(), lr=lr, grad_norm=gnorm.item(), time=run.train_time())
            if step % cfg.eval_interval == 0 or step == n_iters:
                v = log_validation(step)
            run.save(step, order=order)
        train_time = run.train_time()

        # final check on val prompts: gold win rate vs SFT samples (studies/evaluate.py does the full evaluation)
        prompts = data.sample_prompts(splits["val"], cfg.n_eval_prompts, random.Random(cfg.seed + 1))
        g = lambda m: sample_responses(m, enc, prompts, cfg.max_new_tokens, 1.0, device,
                                       torch.Generator(device=device).manual_seed(cfg.seed + 1))
        outs, base = g(policy), g(ref)
        win = data.gold_win_rate(prompts, outs, base)
        golds = outs.golds(prompts)
        print(table([(p.strip(), o, g) for p, o, g in zip(prompts[:4], outs.texts, golds)],
                    ["val prompt", "DPO sample", "gold"], [34, 70, 5]))
        metrics = dict(**v, win_rate_vs_sft=win, train_time_s=train_time, gold=sum(golds) / len(prompts))
        run.log.write(step=n_iters, **metrics)
        plot_curves(os.path.join(cfg.out_dir, "dpo_curves.png"), read_jsonl(run.log_path), "step",
                    [["loss"], ["rewards_chosen", "rewards_rejected", "val_margin"], ["accuracy", "val_accuracy"]],
                    f"DPO (β={cfg.beta}): loss, implicit rewards, accuracy")
        run.finish(metrics, responses_generated=0, policy_steps=n_iters)
        print(f"DPO done in {train_time:.0f}s: val accuracy {v['val_accuracy']:.3f}, margin {v['val_margin']:+.3f}, "
              f"win rate vs SFT {win:.2f} -> {run.ckpt_path}")
        return metrics


if __name__ == "__main__":
    run_main(main)
