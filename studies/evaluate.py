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
    python -m studies.evaluate --policies out/sft.pt out/ppo.pt
    python -m studies.evaluate --policies out/sft.pt out/ppo.pt out/vanilla/ppo.pt --n_prompts 1024

Deliberate choices:
  1. One sample per prompt at the training temperature (1.0), the same generator seed for every policy,
     and the SFT policy's samples as the win-rate opponent (the paper's "win rate vs SFT", judged by gold
     instead of humans or GPT-4).
  2. The KL is the k1 estimate on samples from π at temperature τ, the quantity PPO's penalty controls.

Shape legend: B prompts in a batch, Tp prompt length, Tr response length, V vocab.
"""
import os
import random
from dataclasses import dataclass

import torch

import data
import tokenizer as tok
from model import ScalarHeadGPT, k1, logprobs_from_logits, response_logits
from runs import (check_rm_context, device_field, field, holding, json_line, load_checkpoint, load_policy, load_weights,
                  parse_config, pick_device, replaced, rm_win_rate, run_main, table, without_dropout)
from tokenizer import TRUNCATIONS, encode_prompts


def distinct_n(texts, n):
    """Distinct word n-grams / all word n-grams over all texts (1.0 = no n-gram repeats anywhere)."""
    grams = [tuple(w[i:i + n]) for w in (t.replace(data.EOS_TEXT, "").split() for t in texts)
             for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


@torch.no_grad()
def sample_for_evaluation(policy, sft, rm, enc, prompts, max_new_tokens, temperature, device, seed, batch_size=128):
    """Per prompt: response text and EOS flag (and both as data.Replies), RM score, KL(π||π_SFT) estimate and
    length; one generator seed for all."""
    gen = torch.Generator(device=device).manual_seed(seed)
    policy.eval()
    out = dict(rows=[], rm=[], kl=[], length=[])
    for i in range(0, len(prompts), batch_size):
        room = policy.cfg.block_size - max_new_tokens                       # a long (HH) prompt keeps its end
        p_ids, p_mask = encode_prompts(enc, prompts[i:i + batch_size], room, True)
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)                 # (B, Tp)
        resp = policy.generate(p_ids, p_mask, max_new_tokens, tok.eos_id(enc), tok.pad_id(enc),
                               temperature=temperature, generator=gen).tokens  # (B, Tr)
        mask = (resp != tok.pad_id(enc)).long()                             # (B, Tr)
        seq, seq_mask = torch.cat([p_ids, resp], 1), torch.cat([p_mask, mask], 1)  # (B, T)
        Tp = p_ids.shape[1]
        lp = logprobs_from_logits(response_logits(policy, seq, seq_mask, Tp, temperature), resp)  # (B, Tr)
        lp_sft = logprobs_from_logits(response_logits(sft, seq, seq_mask, Tp, temperature), resp)  # (B, Tr)
        out["kl"] += k1(lp, lp_sft, mask).sum(1).tolist()
        out["rm"] += rm.score(seq, seq_mask).tolist()
        out["length"] += mask.sum(1).tolist()
        out["rows"] += resp.tolist()
    replies = tok.decode_replies(enc, out.pop("rows"))
    return dict(out, texts=replies.texts, ended=replies.ended, replies=replies)


def verified_rates(prompts, replies, has_gold):
    """The share of responses data.verify confirms, over all prompts and over the math ones (the RLVR measure);
    empty without the toy task's rules."""
    if not has_gold:
        return {}
    ok = data.rule_rewards("verifier", prompts, replies.texts, replies.ended)
    on_math = [v for p, v in zip(prompts, ok) if data.task_of(p).kind == "math"]
    return dict(verified=sum(ok) / len(ok), math_acc=sum(on_math) / max(len(on_math), 1))


@dataclass
class Config:
    policies: list = field(["out/sft.pt", "out/ppo.pt"], "policy checkpoints")
    sft_ckpt: str = field("out/sft.pt", "the SFT policy: win-rate opponent and KL reference")
    rm_ckpt: str = field("out/rm.pt", "the reward model whose score is reported")
    out_dir: str = field("out", "where eval.md, eval.jsonl and eval_reward_kl.png go")
    data: str = field("toy", "toy, or the HH-RLHF file(s) the stages trained on: their test split is used, and "
                             "without a gold reward the win rate is judged by the reward model")
    n_prompts: int = field(512, "test prompts (drawn with the task's kind weights)", range="[1, inf)")
    max_new_tokens: int = field(48, "longest response", range="[1, inf)")
    temperature: float = field(1.0, "sampling temperature", range="(0, inf)")
    seed: int = field(0, "prompt draw and sampling seed (the same for every policy)")
    device: str = device_field()
    log_truncations: bool = field(False, "print one warning line per truncated prompt (false: one summary line)")


PRESETS = {  # the sizes of pipeline.py's presets (the default evaluation is the field defaults)
    "default": {},
    "small": dict(n_prompts=256, max_new_tokens=32),
    "tiny": dict(n_prompts=16, max_new_tokens=12),
}


def main(argv=None):
    a = parse_config(Config, PRESETS, argv, description="Evaluate policy checkpoints on held-out test prompts.")
    with holding(a.out_dir):      # the folder's owner while it writes eval.*: no stage runs into it meanwhile
        return evaluate_policies(a)


def evaluate_policies(a):
    """main()'s work: every policy of a.policies sampled on the same test prompts, the table and the plot."""
    device = pick_device(a.device)
    TRUNCATIONS.reset(a.log_truncations)

    # every input and the output folder are checked before any sampling: a bad last --policies entry or an
    # unwritable --out_dir is found in seconds, not after the other policies were evaluated
    sft, sft_ckpt = load_policy(a.sft_ckpt, ("sft",))
    for path in a.policies:
        ckpt = load_checkpoint(path, None, sft_ckpt["tokenizer_id"])
        if ckpt["stage"] == "rm":
            raise ValueError(f"{path}: is a reward-model checkpoint, not a policy")
    enc = tok.get_tokenizer(sft_ckpt["tokenizer"])
    rm_ckpt = load_checkpoint(a.rm_ckpt, "rm", sft_ckpt["tokenizer_id"])
    check_rm_context(rm_ckpt, sft_ckpt, a.rm_ckpt, a.sft_ckpt)
    if a.max_new_tokens >= sft.cfg.block_size:
        raise ValueError(f"--max_new_tokens {a.max_new_tokens} leaves no room for a prompt in block_size "
                         f"{sft.cfg.block_size} ({a.sft_ckpt})")
    rm = ScalarHeadGPT(without_dropout(rm_ckpt["model_config"]))
    load_weights(rm, rm_ckpt["model"], a.rm_ckpt)
    sft, rm = sft.to(device).eval(), rm.to(device).eval()
    has_gold = a.data == "toy"
    if has_gold:
        prompts = data.sample_prompts(data.prompt_splits(sft_ckpt["config"]["seed"])["test"], a.n_prompts,
                                      random.Random(a.seed))
    else:  # the HH test split, as the stages cut it; every prompt once
        prompts = data.hh_prompt_splits(a.data, sft_ckpt["config"]["seed"])["test"]["hh"][:a.n_prompts]
        print(f"{a.data}: no gold reward; 'win_vs_sft' is judged by the reward model (the policy's own judge)")
    args = (enc, prompts, a.max_new_tokens, a.temperature, device, a.seed)

    base = sample_for_evaluation(sft, sft, rm, *args)
    rows = []
    for path in a.policies:
        policy, ckpt = load_policy(path)  # any stage that writes a policy
        res = sample_for_evaluation(policy.to(device), sft, rm, *args)
        gold = res["replies"].golds(prompts) if has_gold else [float("nan")] * len(prompts)
        n = len(prompts)
        win = (data.gold_win_rate(prompts, res["replies"], base["replies"]) if has_gold else
               rm_win_rate(rm, enc, prompts, res["texts"], base["texts"], device))
        rows.append(dict(policy=path, stage=ckpt["stage"], gold=sum(gold) / n, rm=sum(res["rm"]) / n,
                         win_vs_sft=win, win_judge="gold" if has_gold else "reward model", kl_sft=sum(res["kl"]) / n,
                         length=sum(res["length"]) / n, eos_rate=sum(res["ended"]) / n,
                         distinct2=distinct_n(res["texts"], 2), n_prompts=n, **verified_rates(prompts, res["replies"], has_gold),
                         samples=[(prompts[i], res["texts"][i], gold[i]) for i in range(min(3, n))]))

    keys = (["gold", "verified", "math_acc"] if has_gold else []) + ["rm", "win_vs_sft", "kl_sft", "length", "eos_rate",
                                                                    "distinct2"]
    md = ["| policy | stage | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    md += [f"| {r['policy']} | {r['stage']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in rows]
    with replaced(os.path.join(a.out_dir, "eval.md")) as f:
        f.write(f"{len(prompts)} test prompts, temperature {a.temperature}, seed {a.seed}; win rate vs SFT judged by "
                f"{'the gold reward' if has_gold else 'the reward model (no gold reward for this data)'}\n\n"
                + "\n".join(md) + "\n")
    with replaced(os.path.join(a.out_dir, "eval.jsonl")) as f:
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
    with replaced(os.path.join(a.out_dir, "eval_reward_kl.png"), "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return rows


if __name__ == "__main__":
    run_main(main)
