"""
Stage 2: a pairwise Bradley-Terry reward model (RM) trained on simulated preference pairs.

The RM is the SFT model with its language-model head replaced by a scalar head (model.ScalarHeadGPT). Its
score r(x, y) is the head's output at the last real token of prompt + response: the EOS when the answer
ended, so the RM can see whether it ended (Secrets of RLHF Part I §3.2 and its code: score at the last
position of the sequence). Training minimises the Bradley-Terry negative log-likelihood of the annotators'
choice (InstructGPT, Ouyang et al. 2022, eq. 1; Secrets of RLHF Part I eq. 2):

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))

The annotators are simulated from the gold reward with noise and a mild length bias (data.py), so we can
report what real data cannot tell: accuracy against the *gold* ordering, not just against noisy labels,
and how well the RM score correlates with the gold reward (Pearson and Spearman) on held-out responses.

Run (after train_sft.py; writes out/rm.pt, out/rm_log.jsonl, out/rm_loss.png):
    python reward_model.py
    python reward_model.py --preset tiny --sft_ckpt out/tiny/sft.pt --out_dir out/tiny
    python reward_model.py --sft_ckpt out/gpt2_hh/sft.pt --data hh/train.jsonl.gz --out_dir out/gpt2_hh  # HH-RLHF
    torchrun --standalone --nproc_per_node 2 reward_model.py  # data parallel (docs/data_parallel.md)
    python reward_model.py --help

Deliberate choices:
  1. One epoch over the pairs (InstructGPT §C.2: more epochs overfit); chosen and rejected sequences go
     through the model in one batch of 2B rows.
  2. Both responses of a pair are different candidates for the same prompt (data.CANDIDATE style, wider than
     the demonstrations) and some are cut off without EOS, so "ended" is a feature the RM can learn.
  3. No reward normalisation here: PPO normalises the scores itself (ppo_rlhf.process_scores, paper eq. 18).
  4. Plain-numpy Pearson and Spearman (average ranks for ties) to avoid a scipy dependency.
  5. Real data (`--data` HH-RLHF): the human label is the only judgement, so only loss, accuracy vs labels and the
     length correlation are reported. `--init gpt2` starts from GPT-2's weights instead of the SFT model's.

Shape legend: B pairs in a batch, T sequence length (prompt + response), P held-out pairs.
"""
import os
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

import data
import tokenizer as tok
from runs import (Run, RunOptions, autocast, check_finite, ckpt_interval_field, data_parallel, field, gather_rows,
                  load_checkpoint, load_gpt2, load_weights, parse_config, plot_curves, read_jsonl, run_main,
                  score_texts, shard, sum_over_ranks, table, world_size)
from model import GPTConfig, ScalarHeadGPT


@dataclass
class Config(RunOptions):
    ckpt_interval: int = ckpt_interval_field(100)
    sft_ckpt: str = field("out/sft.pt", "the SFT checkpoint the RM starts from (its tokenizer; its weights unless --init)",
                          input_file=True)
    init: str = field("sft", "sft (the SFT checkpoint's weights), or GPT-2 weights: gpt2 | ... | a local file/folder",
                      input_file=True)
    # simulated annotators (data.py)
    n_train: int = field(10000, "preference pairs on train prompts (one epoch)", range="[1, inf)")
    n_val: int = field(500, "pairs on val prompts (accuracy during training)", range="[1, inf)")
    n_test: int = field(1000, "pairs on test prompts (final accuracy and correlations)", range="[1, inf)")
    tau: float = field(data.ANNOTATOR_TAU, "annotator noise temperature: P(a>b) = sigmoid((u_a-u_b)/tau)",
                       range="(0, inf)")
    length_bias: float = field(data.ANNOTATOR_LENGTH_BIAS, "annotator utility bonus per word (spurious)")
    data: str = field("toy", "toy (simulated annotators), or HH-RLHF .jsonl/.jsonl.gz file(s), comma-separated",
                      input_file=True)
    # (`data` comes after tau and length_bias: in the class body it would hide the data module from them)
    # optimisation
    batch_size: int = field(32, "pairs per micro-batch, over all processes under torchrun (each takes an equal share)",
                            range="[1, inf)", global_batch=True)
    grad_accum: int = field(1, "micro-batches per optimizer step (gradient accumulation)", range="[1, inf)")
    amp: bool = field(True, "bf16 autocast on CUDA (CPU and MPS always run fp32)")
    lr: float = field(3e-4, "learning rate (AdamW), linear warm-up then constant", range="(0, inf)")
    warmup_iters: int = field(20, "linear warm-up steps", range="[1, inf)")
    weight_decay: float = field(0.0, "AdamW weight decay", range="[0, inf)")
    grad_clip: float = field(1.0, "global grad-norm clip (0 = off)", range="[0, inf)")
    eval_interval: int = field(50, "validate every this many steps", range="[1, inf)")
    # reliability


PRESETS = {
    "default": {},
    # small: lr 1e-3 on 6,000 pairs, not 3e-4 on 3,000: accuracy vs gold 0.69 -> 0.78 on seed 1's small SFT, and
    # PPO on that SFT then gained gold instead of losing it
    "small": dict(n_train=6000, n_val=200, n_test=500, eval_interval=25, lr=1e-3),
    "tiny": dict(n_train=128, n_val=32, n_test=64, batch_size=16, warmup_iters=2, eval_interval=4),
}


# ----------------------------------------------------------------------------------------------------
# Pure functions (imported by tests, notebooks and PPO)

def pairwise_loss(r_chosen, r_rejected):
    """Bradley-Terry NLL, mean over pairs: -log sigmoid(r_c - r_r). r_chosen, r_rejected (B,)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pair_scores(rm, enc, pairs, device, truncate=True):
    """(r_chosen (B,), r_rejected (B,)) for [{"prompt", "chosen", "rejected"}], both halves in one forward."""
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    r = score_texts(rm, enc, prompts, responses, device, truncate)            # (2B,)
    return r[: len(pairs)], r[len(pairs):]                                    # (B,), (B,)


def ranks(x):
    """Average ranks (1-based) of a 1-D array, ties sharing the mean of their ranks."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):  # average over ties
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def pearson(x, y):
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x, y):
    return pearson(ranks(x), ranks(y))


@torch.no_grad()
def evaluate_rm(rm, enc, pairs, device, batch_size=64, gold=True):
    """
    Held-out metrics on [{"prompt", "chosen", "rejected"}] (gold=False for real data: only loss, acc_labels,
    length_corr_rm and the score statistics):
      acc_labels  RM prefers the annotator's choice
      acc_gold    RM orders the pair as the gold reward does (pairs whose gold rewards differ)
      pearson / spearman   correlation of RM score and gold reward over all 2P responses
      length_corr_rm / length_corr_gold   Pearson with the response's word count (the spurious feature)
    """
    rm.eval()
    rc, rr = [], []
    for i in range(0, len(pairs), batch_size):
        a, b = pair_scores(rm, enc, pairs[i:i + batch_size], device)
        rc.append(a.float().cpu())
        rr.append(b.float().cpu())
    rc, rr = torch.cat(rc).numpy(), torch.cat(rr).numpy()                    # (P,), (P,)
    rm_all = np.concatenate([rc, rr])                                         # (2P,)
    words = np.array([len(p[k].replace(data.EOS_TEXT, "").split()) for k in ("chosen", "rejected") for p in pairs])
    metrics = dict(loss=float(np.mean(np.logaddexp(0.0, -(rc - rr)))),  # -log sigmoid(x) = log(1 + e^-x), stable
                   acc_labels=float(np.mean(rc > rr)), length_corr_rm=pearson(rm_all, words),
                   score_mean=float(rm_all.mean()), score_std=float(rm_all.std()))
    if not gold:
        return metrics
    gold_of = lambda p, k: data.gold_reward(p["prompt"], p[k], data.marked_end(p[k]))   # strings data.py wrote
    gc = np.array([gold_of(p, "chosen") for p in pairs])
    gr = np.array([gold_of(p, "rejected") for p in pairs])
    differ = gc != gr
    gold_all = np.concatenate([gc, gr])                                       # (2P,)
    return dict(metrics, acc_gold=float(np.mean((rc > rr)[differ] == (gc > gr)[differ])),
                pearson=pearson(rm_all, gold_all), spearman=spearman(rm_all, gold_all),
                length_corr_gold=pearson(gold_all, words))


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    with Run(cfg, "rm", unit="step", data_parallel=True) as run:
        device = run.device
        sft = load_checkpoint(cfg.sft_ckpt, "sft")  # also checks that its tokenizer is unchanged
        enc = tok.get_tokenizer(sft["tokenizer"])
        print(f"device={device} tokenizer={sft['tokenizer_id']} config={asdict(cfg)}")

        # model: SFT backbone (or GPT-2's weights) + fresh scalar head
        mcfg = GPTConfig(**sft["model_config"])
        rm = ScalarHeadGPT(mcfg)
        if cfg.init == "sft":
            load_weights(rm.backbone, sft["model"], cfg.sft_ckpt)
        else:
            load_weights(rm.backbone, load_gpt2(cfg.init, mcfg.block_size, mcfg.vocab_size, mcfg.pad_id).state_dict(), cfg.init)
        rm.to(device)

        # data: pairs on disjoint prompt splits (the SFT run's splits, so test prompts stay unseen)
        gold = cfg.data == "toy"
        if gold:
            splits = data.prompt_splits(sft["config"]["seed"])
            train = data.sample_preference_pairs(splits["train"], cfg.n_train, cfg.seed + 10, cfg.tau, cfg.length_bias)
            val = data.sample_preference_pairs(splits["val"], cfg.n_val, cfg.seed + 20, cfg.tau, cfg.length_bias)
            test = data.sample_preference_pairs(splits["test"], cfg.n_test, cfg.seed + 30, cfg.tau, cfg.length_bias)
        else:  # HH-RLHF: the human labels are the only judgement
            splits = data.hh_splits(cfg.data, sft["config"]["seed"])
            train, val, test = splits["train"][:cfg.n_train], splits["val"][:cfg.n_val], splits["test"][:cfg.n_test]
        per_step = cfg.batch_size * cfg.grad_accum
        n_iters = len(train) // per_step  # one epoch
        if n_iters == 0:
            raise ValueError(f"{len(train)} training pairs is less than one step of batch_size x grad_accum = {per_step}")
        print(f"{len(train)} train / {len(val)} val / {len(test)} test pairs; {n_iters} steps (1 epoch)")

        opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        train_rm = data_parallel(rm)                      # torchrun: gradients averaged over the processes
        # the batch order is fixed by the seed, so weights, optimizer and step are all --resume needs
        meta = dict(model_config=asdict(mcfg), tokenizer=sft["tokenizer"], tokenizer_id=sft["tokenizer_id"],
                    sft_ckpt=cfg.sft_ckpt)
        run.begin(opt, dict(model=rm), meta, n_iters)
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)

        def validate(step):
            m = evaluate_rm(rm, enc, val, device, gold=gold)
            run.log.write(step=step, val_loss=m["loss"], val_acc_labels=m["acc_labels"], time=run.train_time(),
                          **({"val_acc_gold": m["acc_gold"]} if gold else {}))
            print(run.progress.line(step, f"val loss {m['loss']:.4f} acc(labels) {m['acc_labels']:.3f}"
                                          + (f" acc(gold) {m['acc_gold']:.3f}" if gold else "")))

        if run.start == 1:
            validate(0)
        for step in range(run.start, n_iters + 1):        # the step-th optimizer step
            batch = shard([train[i] for i in order[(step - 1) * per_step:step * per_step]])  # torchrun: a share
            micro = cfg.batch_size // world_size()                            # rows per micro-batch here
            rm.train()
            lr = cfg.lr * min(1.0, step / cfg.warmup_iters)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss, r_c, r_r = 0.0, [], []
            for i in range(0, len(batch), micro):                             # grad_accum micro-batches of equal size
                with autocast(device, cfg.amp):
                    a, b = pair_scores(train_rm, enc, batch[i:i + micro], device, cfg.truncate_prompts)  # (B,), (B,)
                    part = pairwise_loss(a.float(), b.float()) / cfg.grad_accum
                part.backward()                    # gradients add up over micro-batches (DDP: and processes)
                loss, r_c, r_r = loss + part.detach(), r_c + [a.detach()], r_r + [b.detach()]
            loss = sum_over_ranks(loss) / world_size()                        # the global batch's loss
            r_c, r_r = gather_rows(torch.cat(r_c)), gather_rows(torch.cat(r_r))  # (B * grad_accum,) each, all ranks
            gnorm = torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.grad_clip or float("inf"))
            check_finite(f"RM step {step}", train_loss=loss.item(), grad_norm=gnorm.item())
            opt.step()
            run.log.write(step=step, train_loss=loss.item(), train_acc=(r_c > r_r).float().mean().item(),
                          lr=lr, grad_norm=gnorm.item(), time=run.train_time())
            if step % cfg.eval_interval == 0 or step == n_iters:
                validate(step)
            run.save(step)                                # every ckpt_interval steps, the checkpoint
        train_time = run.train_time()

        # held-out test pairs: agreement with labels and gold, correlation with gold, length sensitivity
        metrics = evaluate_rm(rm, enc, test, device, gold=gold)
        metrics["train_time_s"] = train_time
        run.log.write(step=n_iters, **{f"test_{k}": v for k, v in metrics.items()})
        with torch.no_grad():
            rm.eval()
            show = test[:8]
            sc, sr = pair_scores(rm, enc, show, device)
        g = (lambda p, r: data.gold_reward(p, r, data.marked_end(r))) if gold else (lambda p, r: "-")  # none: real data
        rows = [(p["prompt"][-100:].strip(), p["chosen"], a, g(p["prompt"], p["chosen"]), p["rejected"], b,
                 g(p["prompt"], p["rejected"])) for p, a, b in zip(show, sc.tolist(), sr.tolist())]
        print(table(rows, ["test prompt", "chosen", "RM", "gold", "rejected", "RM", "gold"], [30, 44, 5, 5, 44, 5, 5]))
        print(table([(k, v) for k, v in metrics.items()], ["test metric", "value"], [18, 8]))

        plot_curves(os.path.join(cfg.out_dir, "rm_loss.png"), read_jsonl(run.log_path), "step",
                    [["train_loss", "val_loss"], ["train_acc", "val_acc_labels", "val_acc_gold"]],
                    "Reward model: Bradley-Terry loss and pairwise accuracy")
        run.finish(metrics, responses_generated=0, policy_steps=0)
        vs_gold = (f", vs gold {metrics['acc_gold']:.3f}; Spearman with gold {metrics['spearman']:.3f}, Pearson "
                   f"{metrics['pearson']:.3f}" if gold else " (no gold reward for this data)")
        print(f"RM done in {train_time:.0f}s: test accuracy vs labels {metrics['acc_labels']:.3f}{vs_gold} -> "
              f"{run.ckpt_path}")
        return metrics


if __name__ == "__main__":
    run_main(main)
