"""
Every measured number and figure of README.md and docs/ from one command, in parts that each fit in a session and
resume: a part trains (or keeps) its runs under out/reproduce/PART/, writes what each finished run measured to
docs/measured/PART/RUN.json (the pages' one source, committed), then redraws the pages from docs/measured/.

    python -m studies.reproduce seeds       # the pipeline over 3 seeds, default and small presets (~40 min, 2 cores)
    python -m studies.reproduce overopt     # Gao et al.'s over-optimisation curves: RL β sweep, best-of-n (~55 min)
    python -m studies.reproduce redraw      # only the pages, from docs/measured/ (seconds; what the tests check)
    python -m studies.reproduce seeds --runs small_s0 small_s1   # some runs of a part

Run a part again after a kill: finished runs are kept (and their records rewritten only if missing), an
interrupted one resumes from its last checkpoint. The part's time per run is in each record ("wall_s").

Where the numbers go: each page has blocks between `<!-- reproduce:NAME -->` and `<!-- /reproduce:NAME -->`; redraw
replaces each block's content with what BLOCKS[NAME] computes from the records, and draws the figures into
docs/figures/. Every block says the commit, the CPU kind and the thread count its records were measured with.
On one CPU kind with the same thread count the runs are deterministic; on another they differ in the last
digits and then diverge, so each headline number is given as the mean ± standard deviation over seeds, with
every seed's value beside it.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURED = os.path.join(ROOT, "docs", "measured")
FIGURES = os.path.join(ROOT, "docs", "figures")
SEEDS = (0, 1, 2)


# ----------------------------------------------------------------------------------------------------
# Where and how a record was measured

def cpu_kind():
    """The CPU's name and widest vector extension (AVX-512 and AVX2 machines give different last digits)."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:                                                     # not Linux: the name alone
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return f"{name}{f', {isa}' if isa else ''}"


def commit():
    """The short commit hash, with '+changes' when tracked files differ from it (a record of uncommitted code)."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def stamp():
    return dict(commit=commit(), cpu=cpu_kind(), threads=torch.get_num_threads(), torch=torch.__version__)


def stamp_line(records):
    """One line saying where a block's records were measured (several lines' worth if they disagree)."""
    kinds = sorted({(r["stamp"]["commit"], r["stamp"]["cpu"], r["stamp"]["threads"]) for r in records})
    return "; ".join(f"commit {c}, {cpu}, {t} threads" for c, cpu, t in kinds)


def write_record(part, run, record):
    os.makedirs(os.path.join(MEASURED, part), exist_ok=True)
    with open(os.path.join(MEASURED, part, f"{run}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")


def read_records(part):
    """{run: record} of a part, from docs/measured/PART/ ({} when the part has not run)."""
    folder = os.path.join(MEASURED, part)
    if not os.path.isdir(folder):
        return {}
    return {name[:-5]: json.load(open(os.path.join(folder, name), encoding="utf-8"))
            for name in sorted(os.listdir(folder)) if name.endswith(".json")}


def mean_std(values):
    """'m ± s' over seeds (sample standard deviation), with 3 decimals."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "–"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


# ----------------------------------------------------------------------------------------------------
# Part "seeds": the pipeline over 3 seeds, at the default size and the small preset (and its β sweep)

SMALL_KL = (0.02, 0.5)   # the small preset's β sweep beside its default 0.1: --kl_coef visibly moves the KL


def seed_runs():
    """{run name: pipeline.py arguments} of the part."""
    runs = {f"default_s{s}": ["--seed", str(s)] for s in SEEDS}
    runs |= {f"small_s{s}": ["--preset", "small", "--seed", str(s)] for s in SEEDS}
    runs |= {f"small_kl{b}_s{s}": ["--preset", "small", "--seed", str(s), "--kl_coef", str(b)]
             for b in SMALL_KL for s in SEEDS}
    return runs


def pipeline_record(out_dir, args, wall_s):
    """What one pipeline run measured, from its folder: each stage's metrics and the evaluation table."""
    from checkpoints import load_checkpoint
    from utils import read_jsonl
    metrics = {stage: load_checkpoint(os.path.join(out_dir, f"{stage}.pt"), stage)["metrics"]
               for stage in ("sft", "rm", "ppo")}
    evals = {r["stage"]: {k: v for k, v in r.items() if k not in ("samples", "policy")}
             for r in read_jsonl(os.path.join(out_dir, "eval.jsonl"))}
    keep = lambda d, keys: {k: d[k] for k in keys if k in d}
    return dict(command="python pipeline.py " + " ".join(args), stamp=stamp(), wall_s=wall_s,
                sft=keep(metrics["sft"], ("val_loss", "gold_sft", "gold_demos", "train_time_s", "n_params")),
                rm=keep(metrics["rm"], ("acc_gold", "acc_labels", "spearman", "pearson", "train_time_s")),
                ppo=keep(metrics["ppo"], ("collapse_warning", "train_time_s", "gold", "kl_seq")),
                eval=evals)


def run_seeds(out_root, only, device):
    import pipeline
    for name, args in seed_runs().items():
        if only and name not in only:
            continue
        out = os.path.join(out_root, "seeds", name)
        print("=" * 20, f"seeds: {name}", "=" * 20)
        t0 = time.time()
        pipeline.main(args + ["--out_dir", out, "--device", device, "--resume", "true"])
        old = read_records("seeds").get(name)
        wall = time.time() - t0
        # a run kept whole from an earlier call took no time now: its first measured time stays
        write_record("seeds", name, pipeline_record(out, args, old["wall_s"] if old and wall < 30 else wall))


def block_pipeline(records):
    """README: the default pipeline over 3 seeds, each stage's result as mean ± std, and each seed's value."""
    runs = [records[f"default_s{s}"] for s in SEEDS if f"default_s{s}" in records]
    if not runs:
        return None
    rows = [("SFT val loss", lambda r: r["sft"]["val_loss"]),
            ("SFT samples' gold reward (demonstrations: ~0.76; best 1.25)", lambda r: r["sft"]["gold_sft"]),
            ("RM accuracy vs the gold ordering", lambda r: r["rm"]["acc_gold"]),
            ("RM accuracy vs the annotators' labels", lambda r: r["rm"]["acc_labels"]),
            ("RM Pearson with gold", lambda r: r["rm"]["pearson"]),
            ("evaluation: SFT gold", lambda r: r["eval"]["sft"]["gold"]),
            ("evaluation: PPO-max gold", lambda r: r["eval"]["ppo"]["gold"]),
            ("evaluation: PPO-max RM score", lambda r: r["eval"]["ppo"]["rm"]),
            ("evaluation: PPO-max win rate vs SFT (gold)", lambda r: r["eval"]["ppo"]["win_vs_sft"]),
            ("evaluation: PPO-max KL to SFT (nats)", lambda r: r["eval"]["ppo"]["kl_sft"]),
            ("evaluation: PPO-max length (tokens)", lambda r: r["eval"]["ppo"]["length"]),
            ("pipeline time (s)", lambda r: r["wall_s"])]
    head = " | ".join(f"seed {s}" for s in SEEDS[:len(runs)])
    lines = [f"| measure | mean ± std | {head} |", "|---|---|" + "---|" * len(runs)]
    for label, get in rows:
        values = [get(r) for r in runs]
        lines.append(f"| {label} | {mean_std(values)} | " + " | ".join(f"{v:.3f}" if v < 100 else f"{v:.0f}"
                                                                      for v in values) + " |")
    warned = sum(bool(r["ppo"]["collapse_warning"]) for r in runs)
    return ("\n".join(lines) + f"\n\n`python pipeline.py --seed S` for S = {', '.join(map(str, SEEDS[:len(runs)]))} "
            f"(`python -m studies.reproduce seeds`); collapse warnings: {warned} of {len(runs)} runs. Measured at "
            f"{stamp_line(runs)}. On another CPU kind expect other digits, within about the spread shown.")


def block_small(records):
    """README: the small preset over 3 seeds: its time, SFT → PPO gold, and how --kl_coef moves the KL."""
    groups = [("0.1 (default)", "small_s{}")] + [(f"{b}", f"small_kl{b}_s{{}}") for b in SMALL_KL]
    lines = ["| --kl_coef | pipeline time (s) | SFT gold | PPO gold | gold gain | KL to SFT | win rate vs SFT |",
             "|---|---|---|---|---|---|---|"]
    used = []
    for label, pattern in groups:
        runs = [records[pattern.format(s)] for s in SEEDS if pattern.format(s) in records]
        if not runs:
            continue
        used += runs
        ev = lambda stage, key: [r["eval"][stage][key] for r in runs]
        gain = [p - s for p, s in zip(ev("ppo", "gold"), ev("sft", "gold"))]
        lines.append(f"| {label} | {mean_std([r['wall_s'] for r in runs])} | {mean_std(ev('sft', 'gold'))} | "
                     f"{mean_std(ev('ppo', 'gold'))} | {mean_std(gain)} | {mean_std(ev('ppo', 'kl_sft'))} | "
                     f"{mean_std(ev('ppo', 'win_vs_sft'))} |")
    if not used:
        return None
    return ("\n".join(lines) + f"\n\n`python pipeline.py --preset small [--kl_coef B] --seed S`, mean ± std over "
            f"seeds {', '.join(map(str, SEEDS))} (`python -m studies.reproduce seeds`). Measured at {stamp_line(used)}.")


# ----------------------------------------------------------------------------------------------------
# Pages: blocks filled from the records

BLOCKS = {  # block name -> (part whose records it reads, function records -> markdown or None)
    "pipeline_seeds": ("seeds", block_pipeline),
    "small_preset": ("seeds", block_small),
}
PAGES = ("README.md", "docs/ppo.md", "docs/experiments.md", "docs/overoptimization.md", "docs/toy_task.md")


def fill_blocks(text, contents):
    """text with every `<!-- reproduce:NAME -->...<!-- /reproduce:NAME -->` block's inside replaced by
    contents[NAME] (a block whose records are missing is left as it is)."""
    out, pos = [], 0
    while True:
        start = text.find("<!-- reproduce:", pos)
        if start < 0:
            return "".join(out) + text[pos:]
        name = text[start + len("<!-- reproduce:"):text.index("-->", start)].strip()
        opener_end = text.index("-->", start) + 3
        closer = f"<!-- /reproduce:{name} -->"
        end = text.find(closer, opener_end)
        if end < 0:
            raise ValueError(f"block {name!r} has no closing {closer}")
        if name not in BLOCKS:
            raise ValueError(f"block {name!r}: no such block (studies/reproduce.py BLOCKS has {', '.join(BLOCKS)})")
        inside = contents.get(name)
        out.append(text[pos:opener_end] + ("\n" + inside + "\n" if inside is not None else text[opener_end:end]))
        out.append(closer)
        pos = end + len(closer)


def redraw(root=ROOT):
    """Every page's blocks from docs/measured/; returns the pages that changed."""
    contents = {}
    for name, (part, make) in BLOCKS.items():
        contents[name] = make(read_records(part))
    changed = []
    for page in PAGES:
        path = os.path.join(root, page)
        if not os.path.exists(path):
            continue
        text = open(path, encoding="utf-8").read()
        new = fill_blocks(text, contents)
        if new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
            changed.append(page)
    return changed


PARTS = {"seeds": run_seeds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=list(PARTS) + ["redraw"], help="the part to run (then redraw), or redraw alone")
    p.add_argument("--runs", nargs="+", default=None, help="only these runs of the part")
    p.add_argument("--out_root", default="out/reproduce", help="where the runs' folders go")
    p.add_argument("--device", default="cpu", help="cpu (the pages' numbers), or cuda / mps / auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the pages' numbers: 1, so that two parts "
                                                           "can run side by side on 2 cores; a record states its own)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.part != "redraw":
        PARTS[a.part](a.out_root, a.runs, a.device)
    changed = redraw()
    print(f"pages redrawn from docs/measured/: {', '.join(changed) if changed else 'none changed'}")


if __name__ == "__main__":
    from utils import run_main
    run_main(main)
