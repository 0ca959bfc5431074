"""
Rerun the ablations of "Secrets of RLHF Part I: PPO" (Zheng et al. 2023, arXiv 2307.04964) on the toy task, then
draw the paper-style figures and a table of measured numbers from the runs' JSONL logs.

Every run is ppo_rlhf.py itself (called in-process with command-line flags), from the same SFT policy and reward
model, with the same seed, so two runs differ only in the switches listed in EXPERIMENTS:

  paper §5.3.1, Fig. 6   score reparameterisation: vanilla, reward scaling, reward norm + clip (δ 0.3 and 0.8),
                         advantage whitening + clip
  paper §5.3.2, Figs. 7, 15, 16   policy constraints: per-token KL penalty β 0.05 / 0.1 / 0.2, entropy bonus
  paper §5.3.3, Fig. 8   initialisation: policy from a random init instead of SFT; critic from the RM or from
                         SFT, with and without critic pre-training
  paper §5.4, Fig. 9     PPO-max for 300 iterations (4× the iteration at which vanilla collapses here), with the
                         default β = 0.1 and with β = 0.2

Run (after pipeline.py, which writes out/sft.pt and out/rm.pt):
    python -m studies.experiments                         # all runs (about 65 min on 2 CPU cores), then the figures
    python -m studies.experiments --only vanilla kl_0.1   # some runs
    python -m studies.experiments --plot_only             # redraw figures and tables from the existing logs
    python -m studies.experiments --fig_dir docs/experiments   # where the committed figures come from
    python -m studies.experiments --quick --sft_ckpt out/tiny/sft.pt --rm_ckpt out/tiny/rm.pt --out_dir out/tiny/exp

Outputs in out_dir: <run>/ppo_log.jsonl (+ ppo.pt, ppo_curves.png) per run, summary.md and summary.json; in
fig_dir: one PNG per figure of FIGURES, reward_distribution.png (paper Fig. 13) and summary.md again.

Deliberate deviations from the paper's ablations:
  1. The "no SFT" policy is a randomly initialised GPT (our toy has no pre-trained LM without SFT); the
     reference stays the SFT model, as in the paper's Fig. 8.
  2. Ablations run 150 iterations of 64 rollouts (the paper: 1000 steps of 128) and one seed each.
  3. The KL and entropy ablations add one switch to vanilla (no other trick), so each isolates one effect.
"""
import argparse
import json
import os

import ppo_rlhf
from utils import read_jsonl, run_main

VANILLA = {k: str(v) for k, v in ppo_rlhf.PRESETS["vanilla"].items()}  # no KL, no score norm, no clips

# run name -> (ppo_rlhf.py flags on top of its ppo_max defaults, what the run tests)
EXPERIMENTS = {
    "vanilla": (VANILLA, "vanilla PPO: no KL penalty, no score processing, no value/grad clip"),
    "scale": ({**VANILLA, "score_norm": "scale"}, "vanilla + reward scaling (÷ running std)"),
    "norm_clip_0.3": ({**VANILLA, "score_norm": "norm_clip", "score_clip": "0.3"}, "vanilla + reward norm, clip δ=0.3"),
    "norm_clip_0.8": ({**VANILLA, "score_norm": "norm_clip", "score_clip": "0.8"}, "vanilla + reward norm, clip δ=0.8"),
    "adv_norm_clip": ({**VANILLA, "adv_whiten": "true", "adv_clip": "0.5"}, "vanilla + advantage whitening, clip 0.5"),
    "kl_0.05": ({**VANILLA, "kl_coef": "0.05"}, "vanilla + token-level KL penalty β=0.05"),
    "kl_0.1": ({**VANILLA, "kl_coef": "0.1"}, "vanilla + token-level KL penalty β=0.1"),
    "kl_0.2": ({**VANILLA, "kl_coef": "0.2"}, "vanilla + token-level KL penalty β=0.2"),
    "entropy": ({**VANILLA, "entropy_coef": "0.01"}, "vanilla + entropy bonus 0.01"),
    "ppo_max_long": ({"n_iters": "300"}, "PPO-max (the ppo_rlhf.py default), 300 iterations"),
    "ppo_max_long_kl0.2": ({"n_iters": "300", "kl_coef": "0.2"}, "PPO-max with β=0.2, 300 iterations"),
    "policy_random": ({"policy_init": "random"}, "PPO-max with a randomly initialised policy (no SFT)"),
    "critic_rm_nopre": ({"critic_pretrain_iters": "0"}, "PPO-max, critic from the RM, no critic pre-training"),
    "critic_sft_pre": ({"critic_init": "sft"}, "PPO-max, critic from SFT (fresh head), critic pre-training"),
    "critic_sft_nopre": ({"critic_init": "sft", "critic_pretrain_iters": "0"},
                         "PPO-max, critic from SFT (fresh head), no critic pre-training"),
}
# The 150-iteration PPO-max run of the figures is the first half of ppo_max_long: nothing in an iteration depends
# on n_iters, so the two are the same run (the test suite checks this on the tiny preset).
ALIASES = {"ppo_max": "ppo_max_long"}

# figure file -> (title, runs, paper figure); panels are PANELS for every figure
FIGURES = {
    "score_reparam": ("Score reparameterisation (paper §5.3.1, Fig. 6)",
                      ["vanilla", "scale", "norm_clip_0.3", "norm_clip_0.8", "adv_norm_clip", "ppo_max"]),
    "policy_constraints": ("Policy constraints (paper §5.3.2, Figs. 7, 15, 16)",
                           ["vanilla", "kl_0.05", "kl_0.1", "kl_0.2", "entropy", "ppo_max"]),
    "initialisation": ("Initialisation (paper §5.3.3, Fig. 8)",
                       ["ppo_max", "critic_rm_nopre", "critic_sft_pre", "critic_sft_nopre", "policy_random"]),
    "ppo_max_long": ("PPO-max for 300 iterations vs vanilla (paper §5.4, Fig. 9)",
                     ["vanilla", "ppo_max_long", "ppo_max_long_kl0.2"]),
}
PANELS = [("score_raw", "RM score"), ("gold", "gold reward"), ("kl_seq", "KL to SFT (per response)"),
          ("perplexity", "perplexity"), ("length", "response length"), ("win_rate_vs_sft", "win rate vs SFT (gold)")]


def run_log(out_dir, name, n_iters=None):
    """The JSONL rows of one run (an alias is its source run cut to `n_iters`); [] when it has not run."""
    src = ALIASES.get(name, name)
    path = os.path.join(out_dir, src, "ppo_log.jsonl")
    rows = read_jsonl(path) if os.path.exists(path) else []
    if name in ALIASES and n_iters:
        rows = [r for r in rows if r["iter"] <= n_iters]
    return rows


def first_warning(rows):
    """Iteration of the first collapse warning in a log, or None."""
    return next((r["iter"] for r in rows if r.get("collapse_warning")), None)


def summarize_run(rows, window=10):
    """Metrics of one log: means over its last `window` iterations, first collapse warning, win-rate peak."""
    last = rows[-window:]
    avg = lambda k: sum(r[k] for r in last) / len(last)
    wins = [(r["iter"], r["win_rate_vs_sft"]) for r in rows if "win_rate_vs_sft" in r]
    peak_it, peak = max(wins, key=lambda w: w[1]) if wins else (None, float("nan"))
    return dict(iters=rows[-1]["iter"], rm=avg("score_raw"), gold=avg("gold"), kl=avg("kl_seq"),
                perplexity=avg("perplexity"), length=avg("length"), eos_rate=avg("eos_rate"),
                win_final=wins[-1][1] if wins else float("nan"), win_peak=peak, win_peak_iter=peak_it,
                gold_peak=max(r["gold"] for r in rows), collapse_iter=first_warning(rows))


def plot_figure(path, title, logs, panels=PANELS):
    """One paper-style figure: a panel per metric, a line per run (logs: {run: rows})."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (key, label) in zip(axes.flat, panels):
        for name, rows in logs.items():
            pts = [(r["iter"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=name, marker="." if key == "win_rate_vs_sft" else None)
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_reward_distribution(path, logs, n_snapshots=5):
    """Paper Fig. 13: the distribution of RM scores of the rollouts at a few iterations, one panel per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = {k: v for k, v in logs.items() if v and "scores_raw" in v[0]}
    fig, axes = plt.subplots(1, max(1, len(logs)), figsize=(5.5 * max(1, len(logs)), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes.flat, logs.items()):
        picks = sorted({rows[round(i * (len(rows) - 1) / (n_snapshots - 1))]["iter"] for i in range(n_snapshots)})
        for r in rows:
            if r["iter"] in picks:
                ax.hist(r["scores_raw"], bins=20, histtype="step", density=True, linewidth=1.5, label=f"iter {r['iter']}")
        ax.set_title(f"{name}: RM score of the rollouts")
        ax.set_xlabel("RM score")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary_markdown(summary, notes):
    """Markdown table of summarize_run outputs, one row per run."""
    lines = ["| run | what it tests | iters | RM | gold | KL | ppl | length | EOS | win final | win peak (iter) | "
             "first collapse warning |", "|" + "---|" * 12]
    f = lambda x: "–" if x is None or x != x else f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"
    for name, s in summary.items():
        lines.append(f"| {name} | {notes.get(name, '')} | {s['iters']} | {f(s['rm'])} | {f(s['gold'])} | {f(s['kl'])} | "
                     f"{f(s['perplexity'])} | {s['length']:.1f} | {s['eos_rate']:.2f} | {f(s['win_final'])} | "
                     f"{f(s['win_peak'])} ({s['win_peak_iter']}) | {s['collapse_iter'] or 'none'} |")
    return "\n".join(lines) + "\n\nRM, gold, KL, perplexity, length and EOS rate: means over the last 10 iterations " \
                              "(on the rollouts); win rate: gold win rate vs SFT on 64 val prompts, every 10 iterations.\n"


def report(out_dir, fig_dir, n_iters=150):
    """Draw every figure and write summary.md / summary.json from the logs in out_dir."""
    os.makedirs(fig_dir, exist_ok=True)
    names = list(dict.fromkeys([n for _, runs in FIGURES.values() for n in runs] + list(EXPERIMENTS)))
    logs = {n: run_log(out_dir, n, n_iters) for n in names}
    for fname, (title, runs) in FIGURES.items():
        have = {n: logs[n] for n in runs if logs[n]}
        if have:
            plot_figure(os.path.join(fig_dir, f"{fname}.png"), title, have)
    plot_reward_distribution(os.path.join(fig_dir, "reward_distribution.png"),
                             {n: logs[n] for n in ("vanilla", "ppo_max_long")})
    notes = {n: d for n, (_, d) in EXPERIMENTS.items()}
    notes["ppo_max"] = "PPO-max, first 150 iterations of ppo_max_long"
    summary = {n: summarize_run(rows) for n, rows in logs.items() if rows}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    md = summary_markdown(summary, notes)
    for d in dict.fromkeys([out_dir, fig_dir]):  # the table also goes beside the figures
        with open(os.path.join(d, "summary.md"), "w") as f:
            f.write(md)
    print(md)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft_ckpt", default="out/sft.pt", help="SFT checkpoint shared by every run")
    p.add_argument("--rm_ckpt", default="out/rm.pt", help="reward-model checkpoint shared by every run")
    p.add_argument("--out_dir", default="out/experiments", help="one sub-folder per run, plus summary.md/json")
    p.add_argument("--fig_dir", default=None, help="where the figures go (default: out_dir)")
    p.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="run only these")
    p.add_argument("--quick", action="store_true", help="ppo_rlhf.py's tiny preset (4 iterations): checks the wiring")
    p.add_argument("--plot_only", action="store_true", help="no training: redraw from the logs in out_dir")
    p.add_argument("--skip_existing", action="store_true", help="skip runs that finished (their ppo_curves.png exists)")
    p.add_argument("--seed", type=int, default=0, help="the seed of every run")
    p.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, mps")
    args = p.parse_args(argv)
    fig_dir = args.fig_dir or args.out_dir
    if not args.plot_only:
        for name in args.only or EXPERIMENTS:
            flags, what = EXPERIMENTS[name]
            if args.quick and "n_iters" in flags:  # the long run stays longer than the others
                flags = {**flags, "n_iters": "8"}
            run_dir = os.path.join(args.out_dir, name)
            if args.skip_existing and os.path.exists(os.path.join(run_dir, "ppo_curves.png")):  # written at the end
                print(f"== {name}: exists, skipped")
                continue
            print(f"== {name}: {what}")
            argv_run = ["--preset", "tiny" if args.quick else "ppo_max", "--sft_ckpt", args.sft_ckpt,
                        "--rm_ckpt", args.rm_ckpt, "--out_dir", run_dir, "--seed", str(args.seed),
                        "--device", args.device]
            for k, v in flags.items():
                argv_run += [f"--{k}", v]
            ppo_rlhf.main(argv_run)
    return report(args.out_dir, fig_dir, n_iters=4 if args.quick else 150)


if __name__ == "__main__":
    run_main(main)
