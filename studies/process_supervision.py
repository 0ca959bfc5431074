"""
The process-supervision study on the arithmetic chains, one seed at a time (studies/reproduce.py's "process" part
runs it over 3 seeds and draws docs/process_supervision.md from the records):
  1. SFT on the chains at the default size (train_sft.py --data chains)
  2. three reward models from it on the same sampled replies (algorithms/process_reward.py): an ORM (final answer),
     a PRM on the rule's step labels (PRM800K's role), a PRM on Math-Shepherd's Monte-Carlo labels; each one's step
     accuracy against the rule and its best-of-N curve, N = 1 ... 64
  3. GRPO from the SFT with the ORM's outcome reward and with the PRM's (rule labels) step rewards, the same budget
     (algorithms/process_grpo.py); and the same two with the rule in the models' place (the oracles)
Finished runs are kept and an interrupted one resumes (studies/kept_runs.py).

    python -m studies.process_supervision --seed 0 --out_dir out/process/s0
"""
import argparse
import os
import statistics

from studies.seed_spread import each, mean_std

RMS = ("outcome", "rule", "monte_carlo")          # process_reward --labels
RL = ("outcome", "process", "outcome_rule", "process_rule")     # process_grpo --reward (the last two: the rule)
RL_NAMES = {"outcome": "GRPO, outcome reward (ORM)", "process": "GRPO, process reward (PRM step scores)",
            "outcome_rule": "GRPO, outcome reward from the rule (oracle)",
            "process_rule": "GRPO, step rewards from the rule (oracle)"}
SHORT = {"outcome": "ORM reward", "process": "PRM step rewards", "outcome_rule": "rule: outcome", "process_rule": "rule: steps"}
SELECTORS = (("orm", "outcome", "ORM"), ("prm_min", "rule", "PRM (rule labels), min"),
             ("prm_product", "rule", "PRM (rule labels), product"), ("prm_min", "monte_carlo", "PRM (Monte-Carlo labels), min"),
             ("prm_product", "monte_carlo", "PRM (Monte-Carlo labels), product"),
             ("majority", "outcome", "majority vote (no model)"), ("gold", "outcome", "gold reward (oracle)"))
RL_KEYS = ("answer_acc", "step_acc", "process_acc", "prm_step", "orm", "kl_sft", "steps")


def commands(out, seed, device="cpu"):
    """[(module, stage, arguments, folder)] of one seed's runs, in order."""
    common, sft = ["--seed", str(seed), "--device", device], os.path.join(out, "sft.pt")
    runs = [("train_sft", "sft", ["--data", "chains", "--out_dir", out] + common, out)]
    runs += [("algorithms.process_reward", stage, ["--labels", labels, "--sft_ckpt", sft, "--out_dir", out] + common,
              out) for labels, stage in (("outcome", "orm"), ("rule", "prm_rule"), ("monte_carlo", "prm_mc"))]
    for reward in RL:
        folder = os.path.join(out, f"grpo_{reward}")
        runs.append(("algorithms.process_grpo", "process_grpo",
                     ["--reward", reward, "--sft_ckpt", sft, "--orm_ckpt", os.path.join(out, "orm.pt"), "--prm_ckpt",
                      os.path.join(out, "prm_rule.pt"), "--out_dir", folder] + common, folder))
    return runs


def run_seed(out, seed, device="cpu"):
    """Train (or keep, or resume) one seed's runs; returns the seconds spent on the runs this call trained."""
    import importlib
    import time
    from runs import done_checkpoint
    from studies.kept_runs import train_or_keep
    spent = 0.0
    for module, stage, args, folder in commands(out, seed, device):
        print("=" * 20, f"process supervision, seed {seed}: {module} {' '.join(args[:2])}", "=" * 20)
        kept, t0 = done_checkpoint(os.path.join(folder, f"{stage}.pt"), stage) is not None, time.time()
        train_or_keep(importlib.import_module(module), args, folder, False, stage)
        spent += 0.0 if kept else time.time() - t0
    return spent


def record(out, seed, device="cpu"):
    """What one seed's finished runs measured: SFT's chain metrics, each reward model's test metrics, each GRPO
    run's final evaluation and its evaluation curve."""
    from runs import load_checkpoint
    from runs import read_jsonl
    runs = commands(out, seed, device)
    metrics = {stage if stage != "process_grpo" else os.path.basename(folder):
               load_checkpoint(os.path.join(folder, f"{stage}.pt"), stage)["metrics"] for _, stage, _, folder in runs}
    curves = {f"grpo_{r}": [{k: row[k] for k in ["iter"] + [f"val_{key}" for key in RL_KEYS] if k in row}
                            for row in read_jsonl(os.path.join(out, f"grpo_{r}", "process_grpo_log.jsonl"))
                            if "val_answer_acc" in row] for r in RL}
    return dict(commands=[f"python {'-m ' if '.' in m else ''}{m}{'' if '.' in m else '.py'} {' '.join(a)}"
                          for m, _, a, _ in runs],
                sft=metrics["sft"]["chains_sft"], sft_train_time_s=metrics["sft"]["train_time_s"],
                rms={labels: metrics[stage] for labels, stage in (("outcome", "orm"), ("rule", "prm_rule"),
                                                                  ("monte_carlo", "prm_mc"))},
                rl={r: metrics[f"grpo_{r}"] for r in RL}, curves=curves)


# ----------------------------------------------------------------------------------------------------
# The page's tables and figures, from the records ({run: record}, one run per seed)

def block_sft(records):
    rs = list(records.values())
    keys = ("answer_acc", "step_acc", "process_acc", "gold", "ended", "steps")
    lines = ["| SFT on the chains (test prompts, T = 1) | mean ± std | each seed |", "|---|---|---|"]
    lines += [f"| {k} | {mean_std([r['sft'][k] for r in rs])} | {each([r['sft'][k] for r in rs])} |" for k in keys]
    return "\n".join(lines)


def block_step_accuracy(records):
    rs = list(records.values())
    names = {"outcome": "ORM (read at each step's end)", "rule": "PRM, rule labels", "monte_carlo": "PRM, Monte-Carlo labels"}
    lines = ["| model | step accuracy vs the rule | incorrect steps found | each seed (accuracy) |", "|---|---|---|---|"]
    for labels in RMS:
        acc = [r["rms"][labels]["step_acc"] for r in rs]
        lines.append(f"| {names[labels]} | {mean_std(acc)} | "
                     f"{mean_std([r['rms'][labels]['wrong_step_recall'] for r in rs])} | {each(acc)} |")
    mc = [r["rms"]["monte_carlo"] for r in rs]
    lines.append(f"| the Monte-Carlo labels themselves (training replies) | {mean_std([m['mc_label_acc'] for m in mc])} | "
                 f"{mean_std([m['mc_wrong_step_recall'] for m in mc])} | {each([m['mc_label_acc'] for m in mc])} |")
    return "\n".join(lines)


def best_of_n(records, key="best_of_n"):
    """{label: (ns, [per-seed accuracy lists])} for each SELECTORS row."""
    rs = list(records.values())
    ns = rs[0]["rms"]["outcome"]["n"]
    return {label: (ns, [r["rms"][rm][key][name] for r in rs]) for name, rm, label in SELECTORS
            if name in rs[0]["rms"][rm][key]}


def block_best_of_n(records, key="best_of_n"):
    curves = best_of_n(records, key)
    ns = next(iter(curves.values()))[0]
    lines = ["| selected by | " + " | ".join(f"N = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for label, (_, per_seed) in curves.items():
        lines.append(f"| {label} | " + " | ".join(mean_std([s[i] for s in per_seed]) for i in range(len(ns))) + " |")
    return "\n".join(lines)


def mean_curve(records, run, key):
    """(iterations, the mean over seeds of `key` at each) of a GRPO run's evaluation curve."""
    curves = [r["curves"][run] for r in records.values()]
    its = [row["iter"] for row in curves[0]]
    return its, [statistics.mean(c[i][key] for c in curves) for i in range(len(its))]


def block_rl(records):
    rs = list(records.values())
    lines = ["| val prompts | " + " | ".join(RL_KEYS) + " |", "|---|" + "---|" * len(RL_KEYS)]
    start = {k: [r["curves"]["grpo_outcome"][0][f"val_{k}"] for r in rs] for k in RL_KEYS}
    lines.append("| SFT (iteration 0) | " + " | ".join(mean_std(start[k]) for k in RL_KEYS) + " |")
    for reward in RL:
        lines.append(f"| {RL_NAMES[reward]} | " + " | ".join(mean_std([r["rl"][reward][k] for r in rs])
                                                              for k in RL_KEYS) + " |")
    lines.append("")
    for reward in RL[:2]:   # where the rule's step accuracy peaks, and what the PRM says after it
        its, step = mean_curve(records, f"grpo_{reward}", "val_step_acc")
        prm = mean_curve(records, f"grpo_{reward}", "val_prm_step")[1]
        peak = max(range(len(its)), key=lambda i: step[i])
        lines.append(f"- {RL_NAMES[reward]}: the rule's step accuracy (mean over seeds) peaks at iteration {its[peak]} "
                     f"({step[peak]:.3f}); from there to iteration {its[-1]} it goes to {step[-1]:.3f} while the "
                     f"PRM's mean step score goes {prm[peak]:.3f} → {prm[-1]:.3f}.")
    return "\n".join(lines)


def claims(record):
    """[(claim, its source, the measured quantity, whether it holds)] for one seed's record."""
    rms, rl, curves = record["rms"], record["rl"], record["curves"]
    bon = lambda rm, name, i: rms[rm]["best_of_n"][name][i]
    first, last = (lambda run, key: curves[run][0][f"val_{key}"]), (lambda run, key: curves[run][-1][f"val_{key}"])
    out = [("a PRM selects better than an ORM at the largest N (product of step probabilities)",
            "Lightman et al. 2023, Fig. 3", "PRM − ORM final-answer accuracy at N = 64",
            bon("rule", "prm_product", -1) - bon("outcome", "orm", -1)),
           ("best-of-N by the PRM improves on a single sample", "Lightman et al. 2023, Fig. 3",
            "PRM (product) at N = 64 − at N = 1", bon("rule", "prm_product", -1) - bon("rule", "prm_product", 0)),
           ("a PRM on true step labels judges steps better than one on Monte-Carlo labels",
            "Math-Shepherd's labels are estimates", "step accuracy: rule-label PRM − Monte-Carlo-label PRM",
            rms["rule"]["step_acc"] - rms["monte_carlo"]["step_acc"]),
           ("RL on the PRM's step rewards gives more correct steps than RL on the outcome reward",
            "Uesato et al. 2022; DeepSeekMath §4.1.3 vs §4.1.2", "val step accuracy: process − outcome GRPO",
            rl["process"]["step_acc"] - rl["outcome"]["step_acc"]),
           ("RL on the PRM raises its score while the rule's step accuracy falls (the PRM over-optimised)",
            "Gao et al. 2022, for a PRM", "from iteration 0 to the end, the PRM's step score rose and the rule's "
            "step accuracy fell",
            (last("grpo_process", "prm_step") - first("grpo_process", "prm_step")) > 0 and
            (last("grpo_process", "step_acc") - first("grpo_process", "step_acc")) < 0),
           ("RL on the rule's own step rewards gives more correct steps than RL on the PRM's", "the oracle",
            "val step accuracy: rule-rewarded − PRM-rewarded GRPO", rl["process_rule"]["step_acc"] - rl["process"]["step_acc"])]
    return [(c, src, what, float(v), bool(v > 0)) for c, src, what, v in out]


def block_claims(records):
    per_seed = [claims(r) for r in records.values()]
    lines = ["| claim | source | measured (each seed) | verdict |", "|---|---|---|---|"]
    for i, (claim, src, what, _, _) in enumerate(per_seed[0]):
        values, holds = [c[i][3] for c in per_seed], [c[i][4] for c in per_seed]
        shown = " / ".join("yes" if h else "no" for h in holds) if i == 4 else each(values)
        verdict = ("holds in every seed" if all(holds) else "fails in every seed" if not any(holds) else
                   f"holds in {sum(holds)} of {len(holds)} seeds: not told apart from chance")
        lines.append(f"| {claim} | {src} | {what}: {shown} | {verdict} |")
    return "\n".join(lines)


def plot(records, path_bon, path_rl):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("best_of_n", "best_of_n_process"), ("final answer right", "every step right")):
        colors = {label: f"C{i}" for i, (_, _, label) in enumerate(SELECTORS)}   # one colour per selector
        for label, (ns, per_seed) in best_of_n(records, key).items():
            mean = [statistics.mean(s[i] for s in per_seed) for i in range(len(ns))]
            std = [statistics.stdev(s[i] for s in per_seed) if len(per_seed) > 1 else 0 for i in range(len(ns))]
            ax.errorbar(ns, mean, yerr=std, marker="o", capsize=3, label=label, color=colors[label])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (replies sampled per test prompt)")
        ax.set_ylabel(f"best-of-N: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Best-of-N on the arithmetic chains, mean ± std over {len(records)} seeds")
    fig.tight_layout()
    fig.savefig(path_bon, dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for ax, key in zip(axes, ("val_answer_acc", "val_step_acc", "val_prm_step", "val_kl_sft")):
        for reward, color in zip(RL, ("tab:blue", "tab:orange", "tab:gray", "tab:green")):
            for i, r in enumerate(records.values()):
                rows = r["curves"][f"grpo_{reward}"]
                ax.plot([x["iter"] for x in rows], [x[key] for x in rows], color=color, alpha=0.8,
                        label=SHORT[reward] if i == 0 else None)
        ax.set_xlabel("GRPO iteration")
        ax.set_title(key[4:])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("GRPO on the chains: val replies by the rule (answers, steps), the PRM and the KL; one line per seed")
    fig.tight_layout()
    fig.savefig(path_rl, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default="out/process/s0")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    run_seed(a.out_dir, a.seed, a.device)


if __name__ == "__main__":
    from runs import run_main
    run_main(main)
