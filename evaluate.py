"""
One evaluation for every policy: sample on held-out test prompts with fixed seeds and report, per checkpoint,

    gold       mean gold reward (the true reward of the toy task, data.gold_reward)
    rm         mean reward-model score (what the policy was optimised for)
    win_vs_sft win rate against the SFT policy judged by the gold reward, prompt by prompt (tie = ½)
    kl_sft     KL(π || π_SFT) per response: Σ_t log π(y_t) - log π_SFT(y_t) on the policy's own samples (k1)
    length     response tokens (incl. EOS); eos_rate: share of responses that ended
    distinct2  distinct word bigrams / all word bigrams over all responses (diversity; collapse lowers it)

Any checkpoint that holds a policy works: every training stage writes the same format (sft, ppo, rloo, raft,
dpo, alol), so nothing here is method-specific.

Run (writes out/eval.md, out/eval.jsonl and out/eval_reward_kl.png):
    python evaluate.py --policies out/sft.pt out/ppo.pt
    python evaluate.py --policies out/sft.pt out/ppo.pt out/vanilla/ppo.pt --n_prompts 1024

Deliberate choices:
  1. One sample per prompt at the training temperature (1.0), the same generator seed for every policy,
     and the SFT policy's samples as the win-rate opponent (the paper's "win rate vs SFT", judged by gold
     instead of humans or GPT-4).
  2. The KL is the k1 estimate on samples from π at temperature τ, the quantity PPO's penalty controls.

Shape legend: B prompts in a batch, Tp prompt length, Tr response length, V vocab.
"""
import argparse
import math
import os
import random

import torch

import data
import tokenizer as tok
from external import hh_rlhf
from model import ScalarHeadGPT, logprobs_from_logits, response_logits
from reward_model import score_texts
from checkpoints import load_checkpoint, load_policy, load_weights, make_out_dir, without_dropout
from utils import (TRUNCATIONS, check_options, fit_prompt, json_line, masked_mean, masked_var, pad_batch, pick_device,
                   run_main, table)


def distinct_n(texts, n):
    """Distinct word n-grams / all word n-grams over all texts (1.0 = no n-gram repeats anywhere)."""
    grams = [tuple(w[i:i + n]) for w in (t.replace(data.EOS_TEXT, "").split() for t in texts)
             for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


@torch.no_grad()
def sample_and_score(policy, sft, rm, enc, prompts, max_new_tokens, temperature, device, seed, batch_size=128):
    """Per prompt: response text, RM score, KL(π||π_SFT) estimate and length; one generator seed for all."""
    gen = torch.Generator(device=device).manual_seed(seed)
    policy.eval()
    out = dict(texts=[], rm=[], kl=[], length=[])
    for i in range(0, len(prompts), batch_size):
        room = policy.cfg.block_size - max_new_tokens                       # a long (HH) prompt keeps its end
        p_ids, p_mask = pad_batch([fit_prompt(tok.encode(enc, p), room, True, f"prompt {p[:40]!r}")
                                   for p in prompts[i:i + batch_size]], tok.pad_id(enc), left=True)
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)                 # (B, Tp)
        resp = policy.generate(p_ids, p_mask, max_new_tokens, tok.eos_id(enc), tok.pad_id(enc),
                               temperature=temperature, generator=gen).tokens  # (B, Tr)
        mask = (resp != tok.pad_id(enc)).long()                             # (B, Tr)
        seq, seq_mask = torch.cat([p_ids, resp], 1), torch.cat([p_mask, mask], 1)  # (B, T)
        Tp = p_ids.shape[1]
        lp = logprobs_from_logits(response_logits(policy, seq, seq_mask, Tp, temperature), resp)  # (B, Tr)
        lp_sft = logprobs_from_logits(response_logits(sft, seq, seq_mask, Tp, temperature), resp)  # (B, Tr)
        out["kl"] += ((lp - lp_sft) * mask).sum(1).tolist()
        out["rm"] += rm.score(seq, seq_mask).tolist()
        out["length"] += mask.sum(1).tolist()
        out["texts"] += [tok.decode(enc, r) for r in resp.tolist()]
    return out


# ----------------------------------------------------------------------------------------------------
# Monitors the RL stages use during training

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


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over masked tokens (1 = perfect critic, ≤ 0 = useless)."""
    var_r = masked_var(returns, mask)
    return (1 - masked_var(returns - values, mask) / var_r.clamp(min=1e-8)).item()


def iteration_metrics(ro, scores, gold, ended, advantages, returns, running):
    """The paper's §5.2 metrics of one iteration (RM score, KL, length, perplexity) and the critic's fit."""
    mask, n_tokens = ro.mask, ro.mask.sum()
    k1 = (ro.old_logprobs - ro.ref_logprobs) * mask                       # (B, Tr) the penalty's estimator
    log_rho = -k1                                                         # log π_ref/π_old
    k3 = (torch.exp(log_rho) - 1 - log_rho) * mask                        # (B, Tr)
    row = dict(score_raw=ro.scores.mean().item(), score_raw_std=ro.scores.std().item(),
               scores_raw=[round(x, 3) for x in ro.scores.tolist()],      # the distribution (paper Fig. 13)
               score=scores.mean().item(), gold=gold.mean().item(),
               kl_seq=k1.sum(1).mean().item(), kl_token=(k1.sum() / n_tokens).item(),
               kl_k3_seq=k3.sum(1).mean().item(),
               length=mask.sum(1).float().mean().item(), eos_rate=ended.float().mean().item(),
               perplexity=math.exp(-(ro.old_logprobs.sum() / n_tokens).item()),
               entropy=(ro.entropy.sum() / n_tokens).item(),
               **({} if ro.exact_kl is None else {"kl_exact_seq": ro.exact_kl.sum(1).mean().item()}),
               adv_mean=masked_mean(advantages, mask).item(), return_mean=masked_mean(returns, mask).item(),
               value_mean=masked_mean(ro.values, mask).item(),
               explained_var=explained_variance(ro.values, returns, mask),
               running_mean=running.mean, running_std=running.std)
    return row


def minibatch_means(update_stats):
    """The update's statistics averaged over its minibatches (ratio_max: the largest)."""
    out = {}
    for k in update_stats[0]:
        values = [s[k] for s in update_stats if k in s]
        out[k] = max(values) if k == "ratio_max" else sum(values) / len(values)
    return out


# ---------------------------------------------------------------------------------------------- the samples log

def keep_samples(log, it, enc, prompts, texts, ro, gold, per_token, followed=()):
    """
    At an eval interval of an RL stage: print the best, median and worst rollout of the batch by RM score, and
    append them to the samples log (`log`, {stage}_samples.jsonl) with their per-token quantities (`per_token`:
    {name: (B, Tr)} tensors of the batch), followed by the rows of the followed validation prompts (`followed`).
    """
    order = torch.argsort(ro.scores, descending=True).tolist()
    picks = dict(best=order[0], median=order[len(order) // 2], worst=order[-1])
    k1 = (ro.old_logprobs - ro.ref_logprobs) * ro.mask                     # (B, Tr)
    print(table([(prompts[i].strip(), texts[i], ro.scores[i].item(), float(gold[i]), k1[i].sum().item())
                 for i in picks.values()], ["prompt", "response", "RM", "gold", "KL"], [30, 70, 5, 5, 5]))
    for row in sample_rows(it, enc, prompts, ro, gold, per_token, picks) + list(followed):
        log.write(**row)


def clipped_tokens(ratio, advantages, clip_low, clip_high):
    """1.0 where the clip binds, 0.0 elsewhere: ratio (B, Tr) above 1 + clip_high where the advantage (B, Tr) is
    positive, or below 1 - clip_low where it is negative; there the token gets no policy gradient."""
    return (((ratio > 1 + clip_high) & (advantages > 0)) | ((ratio < 1 - clip_low) & (advantages < 0))).float()


def sample_rows(it, enc, prompts, ro, gold, per_token, picks):
    """Rows of the samples log for the rollouts `picks` ({label: row index}): prompt, response tokens decoded one by
    one, RM score, gold reward, and every per-token quantity cut to the response's length (so a view can colour
    each token by any of them)."""
    rows = []
    for label, i in picks.items():
        n = int(ro.mask[i].sum())
        rows.append(dict(iter=it, sample=label, prompt=prompts[i],
                         tokens=tok.decode_pieces(enc, ro.response[i, :n].tolist()),
                         rm_score=ro.scores[i].item(), gold=float(gold[i]),
                         per_token={name: [round(v, 5) for v in values[i, :n].float().tolist()]
                                    for name, values in per_token.items()}))
    return rows


@torch.no_grad()
def follow_prompts(it, policy, ref, rm, critic, enc, prompts, max_new_tokens, temperature, seed, has_gold, device):
    """
    The same validation prompts at every eval interval, sampled with the same seed, so one prompt can be followed
    over training: rows like sample_rows's ("val_0", "val_1", ...) with what a fresh rollout has: k1 to the
    reference, the entropy, and the critic's value when there is a critic. Its own generator: training's random
    streams are untouched.
    """
    from ppo_rlhf import encode_prompts, rollout  # (ppo_rlhf imports this module)
    ids, mask = encode_prompts(enc, prompts, policy.cfg.block_size - max_new_tokens, True)  # (n, Tp) each
    ro = rollout(policy, ref, rm, critic, ids.to(device), mask.to(device), max_new_tokens, temperature,
                 tok.eos_id(enc), tok.pad_id(enc), torch.Generator(device=device).manual_seed(seed))
    texts = [tok.decode(enc, r) for r in ro.response.tolist()]
    gold = [data.gold_reward(p, t) if has_gold else float("nan") for p, t in zip(prompts, texts)]
    per_token = dict(k1=(ro.old_logprobs - ro.ref_logprobs) * ro.mask, entropy=ro.entropy,
                     **({"value": ro.values} if critic is not None else {}))
    return sample_rows(it, enc, prompts, ro, gold, per_token, {f"val_{i}": i for i in range(len(prompts))})


def verified_rates(prompts, texts, has_gold):
    """The share of responses data.verify confirms, over all prompts and over the math ones (the RLVR measure);
    empty without the toy task's rules."""
    if not has_gold:
        return {}
    ok = [data.verify(p, t) for p, t in zip(prompts, texts)]
    on_math = [v for p, v in zip(prompts, ok) if data.task_of(p).kind == "math"]
    return dict(verified=sum(ok) / len(ok), math_acc=sum(on_math) / max(len(on_math), 1))


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate policy checkpoints on held-out test prompts.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policies", nargs="+", default=["out/sft.pt", "out/ppo.pt"], help="policy checkpoints")
    p.add_argument("--sft_ckpt", default="out/sft.pt", help="the SFT policy: win-rate opponent and KL reference")
    p.add_argument("--rm_ckpt", default="out/rm.pt", help="the reward model whose score is reported")
    p.add_argument("--out_dir", default="out", help="where eval.md, eval.jsonl and eval_reward_kl.png go")
    p.add_argument("--data", default="toy", help="toy, or the HH-RLHF file(s) the stages trained on: their test "
                   "split is used, and without a gold reward the win rate is judged by the reward model")
    p.add_argument("--n_prompts", type=int, default=512, help="test prompts (drawn with the task's kind weights)")
    p.add_argument("--max_new_tokens", type=int, default=48, help="longest response")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="prompt draw and sampling seed (the same for every policy)")
    p.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, mps")
    p.add_argument("--log_truncations", action="store_true", help="print one warning line per truncated prompt "
                   "(without it: one summary line)")
    a = p.parse_args(argv)
    check_options(a)
    device = pick_device(a.device)
    TRUNCATIONS.reset(a.log_truncations)

    # every input and the output folder are checked before any sampling: a bad last --policies entry or an
    # unwritable --out_dir is found in seconds, not after the other policies were evaluated
    sft, sft_ckpt = load_policy(a.sft_ckpt, ("sft",))
    for path in a.policies:
        ckpt = load_checkpoint(path, None, sft_ckpt["tokenizer_id"])
        if ckpt["stage"] == "rm":
            raise ValueError(f"{path}: is a reward-model checkpoint, not a policy")
    make_out_dir(a.out_dir)
    enc = tok.get_tokenizer(sft_ckpt["tokenizer"])
    rm_ckpt = load_checkpoint(a.rm_ckpt, "rm", sft_ckpt["tokenizer_id"])
    rm = ScalarHeadGPT(without_dropout(rm_ckpt["model_config"]))
    load_weights(rm, rm_ckpt["model"], a.rm_ckpt)
    sft, rm = sft.to(device).eval(), rm.to(device).eval()
    has_gold = a.data == "toy"
    if has_gold:
        prompts = data.sample_prompts(data.prompt_splits(sft_ckpt["config"]["seed"])["test"], a.n_prompts,
                                      random.Random(a.seed))
    else:  # the HH test split, as the stages cut it; every prompt once
        prompts = hh_rlhf.prompt_splits(a.data, sft_ckpt["config"]["seed"])["test"]["hh"][:a.n_prompts]
        print(f"{a.data}: no gold reward; 'win_vs_sft' is judged by the reward model (the policy's own judge)")
    args = (enc, prompts, a.max_new_tokens, a.temperature, device, a.seed)

    base = sample_and_score(sft, sft, rm, *args)
    rows = []
    for path in a.policies:
        policy, ckpt = load_policy(path)  # any stage that writes a policy
        res = sample_and_score(policy.to(device), sft, rm, *args)
        gold = [data.gold_reward(q, r) if has_gold else float("nan") for q, r in zip(prompts, res["texts"])]
        n = len(prompts)
        win = (data.gold_win_rate(prompts, res["texts"], base["texts"]) if has_gold else
               rm_win_rate(rm, enc, prompts, res["texts"], base["texts"], device))
        rows.append(dict(policy=path, stage=ckpt["stage"], gold=sum(gold) / n, rm=sum(res["rm"]) / n,
                         win_vs_sft=win, win_judge="gold" if has_gold else "reward model", kl_sft=sum(res["kl"]) / n,
                         length=sum(res["length"]) / n, eos_rate=sum(t.endswith(data.EOS_TEXT) for t in res["texts"]) / n,
                         distinct2=distinct_n(res["texts"], 2), n_prompts=n, **verified_rates(prompts, res["texts"], has_gold),
                         samples=[(prompts[i], res["texts"][i], gold[i]) for i in range(min(3, n))]))

    keys = (["gold", "verified", "math_acc"] if has_gold else []) + ["rm", "win_vs_sft", "kl_sft", "length", "eos_rate",
                                                                    "distinct2"]
    md = ["| policy | stage | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    md += [f"| {r['policy']} | {r['stage']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in rows]
    with open(os.path.join(a.out_dir, "eval.md"), "w") as f:
        f.write(f"{len(prompts)} test prompts, temperature {a.temperature}, seed {a.seed}; win rate vs SFT judged by "
                f"{'the gold reward' if has_gold else 'the reward model (no gold reward for this data)'}\n\n"
                + "\n".join(md) + "\n")
    with open(os.path.join(a.out_dir, "eval.jsonl"), "w") as f:
        for r in rows:
            f.write(json_line(r))
    for r in rows:
        print(table([(q[-100:].strip(), t, g) for q, t, g in r["samples"]], ["prompt", f"{r['policy']}", "gold"], [34, 70, 5]))
    print("\n".join(md))
    TRUNCATIONS.summary("evaluate")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        if has_gold:
            ax.scatter(r["kl_sft"], r["gold"], label=f"{r['policy']} (gold)", marker="o")
        ax.scatter(r["kl_sft"], r["rm"], marker="x", label=f"{r['policy']} (RM)",
                   **({"color": ax.collections[-1].get_facecolor()[0]} if has_gold else {}))
    ax.set_xlabel("KL(π || π_SFT) per response (nats)")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Reward vs KL to SFT (o gold, x reward model)")
    fig.tight_layout()
    fig.savefig(os.path.join(a.out_dir, "eval_reward_kl.png"), dpi=100)
    plt.close(fig)
    return rows


if __name__ == "__main__":
    run_main(main)
