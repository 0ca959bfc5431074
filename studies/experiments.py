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
    python -m studies.experiments                         # every run at the horizon, then the figures and tables
    python -m studies.experiments --only vanilla kl_0.1   # some runs (every seed of each)
    python -m studies.experiments --plot_only             # redraw figures and tables from the existing logs
    python -m studies.experiments --quick --sft_ckpt out/tiny/sft.pt --rm_ckpt out/tiny/rm.pt --out_dir out/tiny/exp
Run it again after a kill: finished runs are kept, an interrupted one resumes from its checkpoint.
studies/reproduce.py (part ablations) runs this study for the pages and keeps what each run measured.

Outputs in out_dir: <run>_s<seed>/ (ppo_log.jsonl, ppo.pt, ppo_curves.png) per run, summary.md, claims.md and
summary.json; in fig_dir: one PNG per figure of FIGURES, seeds.png, reward_distribution.png (paper Fig. 13).

Deliberate deviations from the paper's ablations:
  1. The "no SFT" policy is a randomly initialised GPT (our toy has no pre-trained LM without SFT); the
     reference stays the SFT model, as in the paper's Fig. 8.
  2. Runs are HORIZON iterations of 64 rollouts (the paper: 1000 steps of 128); vanilla and PPO-max with 3 seeds,
     every other run with seed 0. The initialisation runs, which the paper says differ only early, run 150.
  3. The KL and entropy ablations add one switch to vanilla (no other trick), so each isolates one effect.
  4. One PPO epoch per batch (the released code's schedule, ppo_rlhf.py's default); two epochs are a labelled
     ablation (vanilla_2ep, ppo_max_2ep).
"""
import argparse
import json
import os
import statistics

import ppo_rlhf
from runs import read_jsonl, replaced, run_main

HORIZON = 300        # iterations of every run but the initialisation ones (measured: docs/experiments.md)
SHORT = 150          # the initialisation runs: the paper says only their early phase differs
SEEDS = (0, 1, 2)    # of the runs in SEEDED; every other run is seed 0
SEEDED = ("vanilla", "ppo_max")
VANILLA = {k: str(v) for k, v in ppo_rlhf.PRESETS["vanilla"].items()}  # no KL, no score norm, no clips

# run name -> (ppo_rlhf.py flags on top of its ppo_max defaults, what the run tests, its length)
EXPERIMENTS = {
    "vanilla": (VANILLA, "vanilla PPO: no KL penalty, no score processing, no value/grad clip", HORIZON),
    "scale": ({**VANILLA, "score_norm": "scale"}, "vanilla + reward scaling (÷ running std)", HORIZON),
    "norm_clip_0.3": ({**VANILLA, "score_norm": "norm_clip", "score_clip": "0.3"}, "vanilla + reward norm, clip δ=0.3",
                      HORIZON),
    "norm_clip_0.8": ({**VANILLA, "score_norm": "norm_clip", "score_clip": "0.8"}, "vanilla + reward norm, clip δ=0.8",
                      HORIZON),
    "adv_norm_clip": ({**VANILLA, "adv_whiten": "true", "adv_clip": "0.5"}, "vanilla + advantage whitening, clip 0.5",
                      HORIZON),
    "kl_0.05": ({**VANILLA, "kl_coef": "0.05"}, "vanilla + token-level KL penalty β=0.05", HORIZON),
    "kl_0.1": ({**VANILLA, "kl_coef": "0.1"}, "vanilla + token-level KL penalty β=0.1", HORIZON),
    "kl_0.2": ({**VANILLA, "kl_coef": "0.2"}, "vanilla + token-level KL penalty β=0.2", HORIZON),
    "entropy": ({**VANILLA, "entropy_coef": "0.01"}, "vanilla + entropy bonus 0.01", HORIZON),
    "ppo_max": ({}, "PPO-max (the ppo_rlhf.py defaults)", HORIZON),
    "vanilla_2ep": ({**VANILLA, "epochs": "2"}, "vanilla with two PPO epochs per batch", HORIZON),
    "ppo_max_2ep": ({"epochs": "2"}, "PPO-max with two PPO epochs per batch", HORIZON),
    "policy_random": ({"policy_init": "random"}, "PPO-max with a randomly initialised policy (no SFT)", SHORT),
    "critic_rm_nopre": ({"critic_pretrain_iters": "0"}, "PPO-max, critic from the RM, no critic pre-training", SHORT),
    "critic_sft_pre": ({"critic_init": "sft"}, "PPO-max, critic from SFT (fresh head), critic pre-training", SHORT),
    "critic_sft_nopre": ({"critic_init": "sft", "critic_pretrain_iters": "0"},
                         "PPO-max, critic from SFT (fresh head), no critic pre-training", SHORT),
}

# figure file -> (title, runs): each run's seed 0; panels are PANELS for every figure
FIGURES = {
    "score_reparam": ("Score reparameterisation (paper §5.3.1, Fig. 6)",
                      ["vanilla", "scale", "norm_clip_0.3", "norm_clip_0.8", "adv_norm_clip", "ppo_max"]),
    "policy_constraints": ("Policy constraints (paper §5.3.2, Figs. 7, 15, 16)",
                           ["vanilla", "kl_0.05", "kl_0.1", "kl_0.2", "entropy", "ppo_max"]),
    "initialisation": ("Initialisation (paper §5.3.3, Fig. 8)",
                       ["ppo_max", "critic_rm_nopre", "critic_sft_pre", "critic_sft_nopre", "policy_random"]),
    "epochs": ("One PPO epoch per batch (the default) vs two", ["vanilla", "vanilla_2ep", "ppo_max", "ppo_max_2ep"]),
}
PANELS = [("score_raw", "RM score"), ("gold", "gold reward"), ("kl_seq", "KL to SFT (per response)"),
          ("perplexity", "perplexity"), ("length", "response length"), ("win_rate_vs_sft", "win rate vs SFT (gold)")]


def run_names(only=None):
    """{run folder name: (experiment, seed)} of the study (or of the experiments in `only`)."""
    return {f"{name}_s{seed}": (name, seed) for name in (only or EXPERIMENTS)
            for seed in (SEEDS if name in SEEDED else (0,))}


def first_warning(rows):
    """Iteration of the first collapse warning in a log, or None."""
    return next((r["iter"] for r in rows if r.get("collapse_warning")), None)


def summarize_run(rows, window=10):
    """Metrics of one log: means over its last `window` iterations, first collapse warning, win-rate peak, and the
    peak of gold as a mean over `window` iterations (one batch's gold is too noisy to compare with a mean)."""
    last = rows[-window:]
    avg = lambda k: sum(r[k] for r in last) / len(last)
    wins = [(r["iter"], r["win_rate_vs_sft"]) for r in rows if "win_rate_vs_sft" in r]
    peak_it, peak = max(wins, key=lambda w: w[1]) if wins else (None, float("nan"))
    full = min(window, len(rows))                                          # gold, mean of `full` iterations in a row
    rolling = [(rows[i]["iter"], sum(r["gold"] for r in rows[i - full + 1:i + 1]) / full)
               for i in range(full - 1, len(rows))]
    gold_peak_iter, gold_peak = max(rolling, key=lambda g: g[1])
    at_short = [g for it, g in rolling if it == SHORT]            # where the initialisation runs end
    return dict(iters=rows[-1]["iter"], rm=avg("score_raw"), gold=avg("gold"), kl=avg("kl_seq"),
                perplexity=avg("perplexity"), length=avg("length"), eos_rate=avg("eos_rate"),
                win_final=wins[-1][1] if wins else float("nan"), win_peak=peak, win_peak_iter=peak_it,
                gold_peak=gold_peak, gold_peak_iter=gold_peak_iter, collapse_iter=first_warning(rows),
                gold_at_short=at_short[-1] if at_short else None)


def plot_figure(path, title, logs, panels=PANELS):
    """One paper-style figure: a panel per metric, a line per run (logs: {label: rows}), smoothed where long."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from runs import SMOOTH_FROM, smooth
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (key, label) in zip(axes.flat, panels):
        for i, (name, rows) in enumerate(logs.items()):
            pts = [(r["iter"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            xs, vs = zip(*pts)
            color = f"C{i % 10}"
            if key != "win_rate_vs_sft" and len(pts) >= SMOOTH_FROM:
                ax.plot(xs, vs, color=color, alpha=0.2, linewidth=0.7)
                vs = smooth(vs)
            ax.plot(xs, vs, color=color, label=name, marker="." if key == "win_rate_vs_sft" else None)
            warned = first_warning(rows)
            if warned is not None:
                ax.axvline(warned, color=color, linestyle=":", linewidth=1)
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_title(label + " (dotted: first collapse warning)" if key == "score_raw" else label, fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with replaced(path, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)


def plot_reward_distribution(path, logs, n_snapshots=5):
    """Paper Fig. 13: the distribution of RM scores of the rollouts at a few iterations, one panel per run (the
    iterations whose rows hold "scores_raw")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = {k: [r for r in v if "scores_raw" in r] for k, v in logs.items()}
    logs = {k: v for k, v in logs.items() if v}
    fig, axes = plt.subplots(1, max(1, len(logs)), figsize=(5.5 * max(1, len(logs)), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes.flat, logs.items()):
        picks = sorted({rows[round(i * (len(rows) - 1) / max(1, n_snapshots - 1))]["iter"] for i in range(n_snapshots)})
        for r in rows:
            if r["iter"] in picks:
                ax.hist(r["scores_raw"], bins=20, histtype="step", density=True, linewidth=1.5, label=f"iter {r['iter']}")
        ax.set_title(f"{name}: RM score of the rollouts")
        ax.set_xlabel("RM score")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with replaced(path, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)


def f3(x):
    return "–" if x is None or x != x else f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def summary_markdown(summary):
    """Markdown table of summarize_run outputs, one row per run folder."""
    lines = ["| run | what it tests | iters | RM | gold | gold peak (iter) | KL | ppl | length | EOS | win final | "
             "win peak (iter) | first collapse warning |", "|" + "---|" * 13]
    for run, s in summary.items():
        name = run.rsplit("_s", 1)[0]
        lines.append(f"| {run} | {EXPERIMENTS[name][1] if name in EXPERIMENTS else ''} | {s['iters']} | {f3(s['rm'])} | "
                     f"{f3(s['gold'])} | {f3(s['gold_peak'])} ({s['gold_peak_iter']}) | {f3(s['kl'])} | "
                     f"{f3(s['perplexity'])} | {s['length']:.1f} | {s['eos_rate']:.2f} | {f3(s['win_final'])} | "
                     f"{f3(s['win_peak'])} ({s['win_peak_iter']}) | {s['collapse_iter'] or 'none'} |")
    return "\n".join(lines) + "\n\nRM, gold, KL, perplexity, length and EOS rate: means over the last 10 iterations " \
                              "(on the rollouts); win rate: gold win rate vs SFT on 64 val prompts, every 10 iterations.\n"


def spread(values):
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "–"
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def warnings_of(summary, name):
    """Each seed's first collapse warning of an experiment, as text: '145, none, 190'."""
    return ", ".join(str(s["collapse_iter"] or "none") for run, s in summary.items() if run.rsplit("_s", 1)[0] == name)


def claims(summary):
    """The paper's claims, each with what the runs measured and a verdict (reproduced / partly / not / not run),
    decided by the rule written beside it."""
    get = lambda name, seed=0: summary.get(f"{name}_s{seed}")
    seeds = lambda name: [s for run, s in summary.items() if run.rsplit("_s", 1)[0] == name]
    out = []

    van = seeds("vanilla")
    if van:   # collapse: a warning in most seeds, and gold falls from its peak while the RM score stays up
        fell = [s for s in van if s["collapse_iter"] and s["gold"] < s["gold_peak"] - 0.2]
        verdict = "reproduced" if 2 * len(fell) > len(van) else "partly" if fell or any(s["collapse_iter"] for s in van) \
            else "not"
        out.append(("Vanilla PPO collapses: the RM score rises while the true reward and the win rate peak and fall, "
                    "the KL runs away (§5.2, Fig. 4)",
                    f"{len(van)} seeds; first warning {warnings_of(summary, 'vanilla')}; final gold {spread([s['gold'] for s in van])} "
                    f"(peak {spread([s['gold_peak'] for s in van])}), RM {spread([s['rm'] for s in van])}, KL "
                    f"{spread([s['kl'] for s in van])}", verdict,
                    "reproduced: in most seeds a warning and final gold ≥ 0.2 below its peak; partly: in some"))
    reparam = [n for n in ("scale", "norm_clip_0.3", "norm_clip_0.8", "adv_norm_clip") if get(n)]
    if van and reparam:   # delays: each reparameterised run warns later than vanilla seed 0, or not at all
        v0 = get("vanilla")["collapse_iter"]
        later = [n for n in reparam if v0 and (get(n)["collapse_iter"] or 10 ** 9) > v0]
        prevented = [n for n in reparam if not get(n)["collapse_iter"]]
        verdict = ("not run long enough" if not v0 else "reproduced" if len(later) == len(reparam) and
                   len(prevented) < len(reparam) else "partly" if later else "not")
        missing = 4 - len(reparam)
        out.append(("Score reparameterisation only delays the collapse (§5.3.1, Fig. 6)",
                    f"first warning: vanilla {v0 or 'none'}, " + ", ".join(f"{n} {get(n)['collapse_iter'] or 'none'}"
                                                                         for n in reparam)
                    + (f" ({missing} of the 4 variants not run yet)" if missing else ""),
                    verdict + (" so far" if missing else ""),
                    "reproduced: every variant warns later than vanilla and at least one still warns"))
    kls = [n for n in ("kl_0.05", "kl_0.1", "kl_0.2") if get(n)]
    if len(kls) == 3:   # a hierarchy: KL and RM score fall as β rises
        kl_vals, rm_vals = [get(n)["kl"] for n in kls], [get(n)["rm"] for n in kls]
        ordered = lambda v: v[0] > v[1] > v[2]
        verdict = "reproduced" if ordered(kl_vals) and ordered(rm_vals) else "partly" if ordered(kl_vals) else "not"
        out.append(("The KL penalty gives a clear reward / deviation hierarchy (§5.3.2, Fig. 7)",
                    "β 0.05 / 0.1 / 0.2: KL " + " / ".join(f3(v) for v in kl_vals) + ", RM " +
                    " / ".join(f3(v) for v in rm_vals) + ", first warning " +
                    " / ".join(str(get(n)["collapse_iter"] or "none") for n in kls), verdict,
                    "reproduced: KL and RM both fall as β rises; partly: KL only"))
    if get("entropy") and van:
        e, v0 = get("entropy")["collapse_iter"], get("vanilla")["collapse_iter"]
        verdict = "not run long enough" if not v0 else "reproduced" if e else "not"
        out.append(("An entropy bonus alone does not prevent the collapse (§5.3.2)",
                    f"first warning: entropy {e or 'none'}, vanilla {v0 or 'none'}", verdict,
                    "reproduced: the entropy run warns too"))
    pm = seeds("ppo_max")
    if pm:
        stable = [s for s in pm if not s["collapse_iter"] and s["gold"] >= s["gold_peak"] - 0.1]
        verdict = "reproduced" if len(stable) == len(pm) else "partly" if stable else "not"
        out.append(("PPO-max stays stable for long (§5.4, Fig. 9)",
                    f"{len(pm)} seeds × {pm[0]['iters']} iterations; first warning {warnings_of(summary, 'ppo_max')}; "
                    f"final gold {spread([s['gold'] for s in pm])} (peak {spread([s['gold_peak'] for s in pm])}), KL "
                    f"{spread([s['kl'] for s in pm])}, win rate {spread([s['win_final'] for s in pm])}", verdict,
                    "reproduced: no warning and final gold within 0.1 of its peak in every seed"))
    if get("policy_random") and get("ppo_max"):
        r, p = get("policy_random"), get("ppo_max")
        verdict = "reproduced" if r["kl"] > 10 * max(p["kl"], 0.1) and r["gold"] < p["gold"] - 0.5 else "not"
        out.append(("A policy not initialised from SFT fails (§5.3.3, Fig. 8)",
                    f"random init: KL {f3(r['kl'])}, perplexity {f3(r['perplexity'])}, gold {f3(r['gold'])} "
                    f"(PPO-max from SFT: KL {f3(p['kl'])}, gold {f3(p['gold'])})", verdict,
                    "reproduced: KL ≥ 10× PPO-max's and gold ≥ 0.5 below it"))
    critics = [n for n in ("critic_rm_nopre", "critic_sft_pre", "critic_sft_nopre") if get(n)]
    pm_short = [s["gold_at_short"] for s in pm if s.get("gold_at_short") is not None]
    if critics and pm_short:   # at the same horizon: the variants ran SHORT iterations, PPO-max's seeds longer
        band = max(2 * statistics.stdev(pm_short) if len(pm_short) > 1 else 0.0, 0.05)
        ref = statistics.mean(pm_short)
        inside = [n for n in critics if abs(get(n)["gold"] - ref) <= band]
        verdict = "reproduced" if len(inside) == len(critics) else "partly" if inside else "not"
        missing = 3 - len(critics)
        out.append(("The critic's initialisation matters only early; pre-training smooths the start (§5.3.3)",
                    ", ".join(f"{n} gold {f3(get(n)['gold'])}" for n in critics) + f" at iteration {SHORT} (PPO-max "
                    f"{spread(pm_short)} at the same iteration)"
                    + (f" ({missing} of the 3 variants not run yet)" if missing else ""),
                    verdict + (" so far" if missing else ""),
                    "reproduced: every variant's gold at the end within 2 std of PPO-max's seeds there (at least ±0.05)"))
    for name in ("vanilla_2ep", "ppo_max_2ep"):
        if get(name):
            s = get(name)
            out.append((f"Ablation, not a claim: {EXPERIMENTS[name][1]}",
                        f"first warning {s['collapse_iter'] or 'none'}; final gold {f3(s['gold'])} (peak "
                        f"{f3(s['gold_peak'])} at {s['gold_peak_iter']}), KL {f3(s['kl'])}", "–", ""))
    return out


def claims_markdown(rows):
    lines = ["| the paper says | measured here | verdict | the rule |", "|---|---|---|---|"]
    lines += [f"| {c} | {m} | **{v}** | {rule} |" for c, m, v, rule in rows]
    return "\n".join(lines) + "\n"


def draw(logs, fig_dir):
    """Every figure from logs {run folder name: rows}: FIGURES (seed 0 of each run), seeds.png (vanilla and PPO-max,
    every seed), reward_distribution.png (vanilla and PPO-max seed 0)."""
    os.makedirs(fig_dir, exist_ok=True)
    for fname, (title, names) in FIGURES.items():
        have = {n: logs[f"{n}_s0"] for n in names if logs.get(f"{n}_s0")}
        if have:
            plot_figure(os.path.join(fig_dir, f"{fname}.png"), title, have)
    seeded = {run: rows for run, rows in logs.items() if run.rsplit("_s", 1)[0] in SEEDED and rows}
    if seeded:
        plot_figure(os.path.join(fig_dir, "seeds.png"), "Vanilla PPO vs PPO-max, every seed", seeded)
    plot_reward_distribution(os.path.join(fig_dir, "reward_distribution.png"),
                             {n: logs.get(f"{n}_s0", []) for n in ("vanilla", "ppo_max")})


def report(out_dir, fig_dir):
    """Draw every figure and write summary.md, claims.md and summary.json from the logs in out_dir."""
    logs = {}
    for run in run_names():
        path = os.path.join(out_dir, run, "ppo_log.jsonl")
        if os.path.exists(path):
            logs[run] = read_jsonl(path)
    draw(logs, fig_dir)
    summary = {run: summarize_run(rows) for run, rows in logs.items() if rows}
    with replaced(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    md, claims_md = summary_markdown(summary), claims_markdown(claims(summary))
    for name, text in (("summary.md", md), ("claims.md", claims_md)):
        with replaced(os.path.join(out_dir, name), "w") as f:
            f.write(text)
    print(claims_md + "\n" + md)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft_ckpt", default="out/sft.pt", help="SFT checkpoint shared by every run")
    p.add_argument("--rm_ckpt", default="out/rm.pt", help="reward-model checkpoint shared by every run")
    p.add_argument("--out_dir", default="out/experiments", help="one sub-folder per run, plus summary.md/json")
    p.add_argument("--fig_dir", default=None, help="where the figures go (default: out_dir)")
    p.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="run only these (every seed of each)")
    p.add_argument("--runs", nargs="+", default=None, help="run only these run folders (e.g. vanilla_s1)")
    p.add_argument("--quick", action="store_true", help="ppo_rlhf.py's tiny preset (4 iterations): checks the wiring")
    p.add_argument("--plot_only", action="store_true", help="no training: redraw from the logs in out_dir")
    p.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, mps")
    args = p.parse_args(argv)
    from studies.kept_runs import train_or_keep
    fig_dir = args.fig_dir or args.out_dir
    if not args.plot_only:
        for run, (name, seed) in run_names(args.only).items():
            if args.runs and run not in args.runs:
                continue
            flags, what, n_iters = EXPERIMENTS[name]
            print(f"== {run}: {what}")
            out = os.path.join(args.out_dir, run)
            argv_run = ["--preset", "ppo_max"] + (["--preset", "tiny"] if args.quick else []) + [
                "--sft_ckpt", args.sft_ckpt, "--rm_ckpt", args.rm_ckpt, "--out_dir", out, "--seed", str(seed),
                "--device", args.device, "--n_iters", str(4 if args.quick else n_iters)]
            for k, v in flags.items():
                argv_run += [f"--{k}", v]
            train_or_keep(ppo_rlhf, argv_run, out, False)
    return report(args.out_dir, fig_dir)


if __name__ == "__main__":
    run_main(main)
