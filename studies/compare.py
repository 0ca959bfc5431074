"""
Train every RLHF method from the same SFT policy and reward model, with several seeds, and compare them on one
evaluation (studies/evaluate.py): gold reward, RM score, gold win rate vs SFT, KL to SFT, length, distinct-2, wall time.

The budget rule (each method's own defaults, matched by data seen, not by optimizer steps):
  online  (PPO-max, RLOO, RAFT, GRPO family): 150 iterations × 64 sampled responses = 9,600 generated responses
          each (DAPO's dynamic sampling generates more: the groups it drops)
  offline (DPO, A-LoL): one pass over the reward model's 10,000 training pairs (A-LoL: over the chosen responses
          with a positive advantage), no generation during training
The table states, for every run, the responses it generated and the policy's optimizer steps (training_budget),
read from its checkpoint's config, so a difference in steps is visible rather than hidden in the defaults.
Seeds change the RL stage only (prompt order, sampling, minibatches); SFT and RM are shared.

Run (after pipeline.py, which writes out/sft.pt and out/rm.pt; writes out/compare/compare.md, compare.jsonl and
compare_reward_kl.png):
    python -m studies.compare                                  # 5 methods × 3 seeds, about 35 minutes on 2 CPU cores
    python -m studies.compare --methods ppo_max rloo --seeds 0 # a subset
    python -m studies.compare --quick --sft_ckpt out/tiny/sft.pt --rm_ckpt out/tiny/rm.pt --out_dir out/tiny/compare
Run again after a kill, the same command continues the study: finished method runs are kept (when made with
these options), an interrupted one resumes from its last checkpoint, the rest are trained; --overwrite trains
every run again.
"""
import argparse
import os
import statistics

from runs import holding, json_line, load_checkpoint, replaced, run_main
from studies.kept_runs import the_checkpoint, train_or_keep
from studies import evaluate
import ppo_rlhf
from algorithms import alol, dpo, grpo, raft, rloo

# method -> (module, extra arguments, training data); each run's checkpoint is the one it writes in its folder
METHODS = {
    "ppo_max": (ppo_rlhf, ["--preset", "ppo_max"], "own samples"),
    "rloo": (rloo, ["--baseline", "loo", "--samples_per_prompt", "4"], "own samples"),
    "raft": (raft, ["--samples_per_prompt", "4"], "own samples"),
    "grpo": (grpo, ["--preset", "grpo"], "own samples"),
    "dr_grpo": (grpo, ["--preset", "dr_grpo"], "own samples"),
    "dapo": (grpo, ["--preset", "dapo"], "own samples"),
    "gspo": (grpo, ["--preset", "gspo"], "own samples"),
    # the RLVR study: GRPO on the math prompts only, optimising the reward model, the verifier or the gold reward
    "grpo_math_rm": (grpo, ["--tasks", "math", "--reward", "rm"], "own samples, math, RM"),
    "grpo_math_verifier": (grpo, ["--tasks", "math", "--reward", "verifier"], "own samples, math, verifier"),
    "grpo_math_gold": (grpo, ["--tasks", "math", "--reward", "gold"], "own samples, math, gold"),
    "dpo": (dpo, [], "RM pairs"),
    "alol": (alol, ["--variant", "alol"], "RM pairs, A > 0"),
    "alol_ref_free": (alol, ["--variant", "ref_free"], "RM pairs, A > 0"),
    "alol_seq": (alol, ["--variant", "seq"], "RM pairs, A > 0"),
    "alol_kl": (alol, ["--variant", "kl"], "RM pairs, A > 0"),
}
KEYS = ["gold", "math_acc", "rm", "win_vs_sft", "kl_sft", "length", "distinct2"]


def training_budget(ckpt):
    """(responses generated during training, policy optimizer steps) of a finished run: what the run wrote in its
    checkpoint (runs.Run.finish), whatever its stage."""
    return ckpt["training_budget"]["responses_generated"], ckpt["training_budget"]["policy_steps"]


def summarize(rows):
    """{method: {key: (mean, spread)}} from studies/evaluate.py rows tagged with method; spread = the sample standard deviation
    over the seeds (÷ n-1; nan for one seed)."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == m]
        out[m] = {k: (statistics.mean(r[k] for r in group),
                      statistics.stdev([r[k] for r in group]) if len(group) > 1 else float("nan")) for k in KEYS + ["time_s"]}
        out[m]["n"] = len(group)
    return out


def plot_compare(rows, summary, path):
    """Gold reward against KL to SFT: one point per seed, mean ± std per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (m, s) in enumerate(summary.items()):
        color, marker = f"C{i % 10}", "o^sD"[i // 10 % 4]        # ten colours, then the next marker
        pts = [r for r in rows if r["method"] == m]
        ax.scatter([r["kl_sft"] for r in pts], [r["gold"] for r in pts], color=color, marker=marker, alpha=0.35, s=14)
        ax.errorbar(s["kl_sft"][0], s["gold"][0], xerr=s["kl_sft"][1], yerr=s["gold"][1], fmt=marker, color=color,
                    capsize=3, label=m)
    ax.set_xlabel("KL(π || π_SFT) per response (nats)")
    ax.set_ylabel("gold reward (test prompts)")
    ax.set_title("Gold reward vs KL to SFT (mean ± std; dots: seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replaced(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Train every method from the same SFT + RM and compare them.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["ppo_max", "rloo", "raft", "dpo", "alol"], choices=list(METHODS),
                   help="methods to train")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="RL-stage seeds")
    p.add_argument("--sft_ckpt", default="out/sft.pt", help="the shared SFT policy")
    p.add_argument("--rm_ckpt", default="out/rm.pt", help="the shared reward model")
    p.add_argument("--out_dir", default="out/compare", help="one sub-folder per method and seed, plus the summary")
    p.add_argument("--n_prompts", type=int, default=512, help="test prompts for the evaluation")
    p.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, mps")
    p.add_argument("--quick", action="store_true", help="tiny presets (seconds; for the tests)")
    p.add_argument("--overwrite", action="store_true", help="train every method run again, even a finished one")
    a = p.parse_args(argv)
    with holding(a.out_dir):               # the study's folder is this process's until the summary is written
        return compare(a)


def compare(a):
    """main()'s study: every method and seed trained (or kept, or resumed), one evaluation, the table, the plot."""
    runs = []
    for seed in a.seeds:
        for m in a.methods:
            module, extra, _ = METHODS[m]
            out = os.path.join(a.out_dir, f"{m}_s{seed}")
            print("=" * 20, f"{m}, seed {seed}", "=" * 20)
            train_or_keep(module, extra + ["--seed", str(seed), "--out_dir", out, "--sft_ckpt", a.sft_ckpt,
                                           "--rm_ckpt", a.rm_ckpt, "--device", a.device]
                          + (["--preset", "tiny"] if a.quick else []), out, a.overwrite)
            ckpt = the_checkpoint(out)
            done = load_checkpoint(ckpt, None)
            generated, steps = training_budget(done)
            runs.append(dict(method=m, seed=seed, ckpt=ckpt, time_s=done["metrics"]["train_time_s"],
                             generated=generated, policy_steps=steps))

    rows = evaluate.main(["--policies"] + [r["ckpt"] for r in runs] + [
        "--sft_ckpt", a.sft_ckpt, "--rm_ckpt", a.rm_ckpt, "--out_dir", a.out_dir, "--device", a.device,
        "--n_prompts", str(8 if a.quick else a.n_prompts)] + (["--max_new_tokens", "12"] if a.quick else []))
    for run, row in zip(runs, rows):
        row.update(method=run["method"], seed=run["seed"], time_s=run["time_s"], generated=run["generated"],
                   policy_steps=run["policy_steps"])
        row.pop("samples", None)
    with replaced(os.path.join(a.out_dir, "compare.jsonl")) as f:
        for r in rows:
            f.write(json_line(r))
    summary = summarize(rows)
    md = [f"{rows[0]['n_prompts']} test prompts; mean ± sample std over seeds {a.seeds}; SFT: see eval.md", "",
          "| method | trains on | responses generated | policy optimizer steps | seeds | gold reward | math accuracy | "
          "RM score | gold win rate vs SFT | KL to SFT | length | distinct-2 | training time (s) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        cells = " | ".join(f"{s[k][0]:.3f} ± {s[k][1]:.3f}" if k != "time_s" else f"{s[k][0]:.0f} ± {s[k][1]:.0f}"
                           for k in KEYS + ["time_s"])
        budget = sorted({(r["generated"], r["policy_steps"]) for r in rows if r["method"] == m})
        md.append(f"| {m} | {METHODS[m][2]} | {' / '.join(f'{g:,}' for g, _ in budget)} | "
                  f"{' / '.join(f'{n:,}' for _, n in budget)} | {s['n']} | {cells} |")
    with replaced(os.path.join(a.out_dir, "compare.md")) as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))

    plot_compare(rows, summary, os.path.join(a.out_dir, "compare_reward_kl.png"))
    return summary


if __name__ == "__main__":
    run_main(main)
