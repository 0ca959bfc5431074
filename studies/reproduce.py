"""
Every measured number and figure of README.md and docs/ from one command, in parts that each fit in a session and
resume: a part trains (or keeps) its runs under out/reproduce/PART/, writes what each finished run measured to
docs/measured/PART/RUN.json (the pages' one source, committed), then redraws the pages from docs/measured/.

    python -m studies.reproduce seeds       # the pipeline over 3 seeds, default and small presets (~40 min, 2 cores)
    python -m studies.reproduce ablations   # the paper's ablations at 300 iterations (~4 h of one thread; split it
                                            # with --runs, e.g. two parts side by side, one thread each)
    python -m studies.reproduce overopt     # Gao et al.'s over-optimisation curves: RL β sweep, best-of-n (~2 h)
    python -m studies.reproduce compare     # every method × 3 seeds, and the RLVR study (~1.5 h)
    python -m studies.reproduce process     # process supervision on the arithmetic chains, 3 seeds (~1.5 h, one thread)
    python -m studies.reproduce bench       # studies.bench's workloads, alone on the machine, every core (~5 min)
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
import subprocess
import sys
import time

import torch

from studies import process_supervision as ps
from studies.seed_spread import mean_std

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
    """The short commit hash, with '+changes' when tracked code differs from it (a record of uncommitted code; the
    pages a part redraws are not code)."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    code = git("status", "--porcelain", "--untracked-files=no", "--", "*.py", "*.txt", "*.tiktoken", ".ci")
    return head + ("+changes" if code else "")


def stamp():
    return dict(commit=commit(), cpu=cpu_kind(), threads=torch.get_num_threads(), torch=torch.__version__)


def stamp_line(records):
    """One line saying where a block's records were measured (several lines' worth if they disagree)."""
    kinds = sorted({(r["stamp"]["commit"], r["stamp"]["cpu"], r["stamp"]["threads"]) for r in records})
    return "; ".join(f"commit {c}, {cpu}, {t} thread{'' if t == 1 else 's'}" for c, cpu, t in kinds)


def write_record(part, run, record):
    os.makedirs(os.path.join(MEASURED, part), exist_ok=True)
    with open(os.path.join(MEASURED, part, f"{run}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")


def wall_time(part, run, t0):
    """Seconds since t0, or the run's recorded time when it took under KEPT_S now (kept from an earlier call:
    only its evaluation, or nothing, ran again)."""
    old, wall = read_records(part).get(run), time.time() - t0
    return old["wall_s"] if old and wall < KEPT_S else wall


def read_records(part):
    """{run: record} of a part, from docs/measured/PART/ ({} when the part has not run)."""
    folder = os.path.join(MEASURED, part)
    if not os.path.isdir(folder):
        return {}
    return {name[:-5]: json.load(open(os.path.join(folder, name), encoding="utf-8"))
            for name in sorted(os.listdir(folder)) if name.endswith(".json")}


# ----------------------------------------------------------------------------------------------------
# Part "seeds": the pipeline over 3 seeds, at the default size and the small preset (and its β sweep)

KEPT_S = 60     # a part's run that took less than this was kept from an earlier call, not trained now
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
    from runs import load_checkpoint
    from runs import read_jsonl
    metrics = {stage: load_checkpoint(os.path.join(out_dir, f"{stage}.pt"), stage)["metrics"]
               for stage in ("sft", "rm", "ppo")}
    evals = {r["stage"]: {k: v for k, v in r.items() if k not in ("samples", "policy")}
             for r in read_jsonl(os.path.join(out_dir, "eval.jsonl"))}
    keep = lambda d, keys: {k: d[k] for k in keys if k in d}
    return dict(command="python pipeline.py " + " ".join(args), stamp=stamp(), wall_s=wall_s,
                sft=keep(metrics["sft"], ("val_loss", "gold_sft", "gold_demos", "train_time_s", "n_params",
                                          "gold_sft_by_kind", "gold_demos_by_kind")),
                rm=keep(metrics["rm"], ("acc_gold", "acc_labels", "spearman", "pearson", "train_time_s",
                                        "length_corr_rm", "length_corr_gold")),
                ppo=keep(metrics["ppo"], ("collapse_warning", "train_time_s", "gold", "kl_seq")),
                eval=evals)


def run_seeds(out_root, only, device, record_only=False):
    """The part's runs (or with record_only, their records written again from the finished folders, keeping each
    record's stamp and time: for a record format that gained a field)."""
    import pipeline
    for name, args in seed_runs().items():
        if only and name not in only:
            continue
        out = os.path.join(out_root, "seeds", name)
        if record_only:
            old = read_records("seeds")[name]
            write_record("seeds", name, dict(pipeline_record(out, args, old["wall_s"]), stamp=old["stamp"]))
            continue
        print("=" * 20, f"seeds: {name}", "=" * 20)
        t0 = time.time()
        pipeline.main(args + ["--out_dir", out, "--device", device, "--resume", "true"])
        write_record("seeds", name, pipeline_record(out, args, wall_time("seeds", name, t0)))


def block_pipeline(records):
    """README: the default pipeline over 3 seeds, each stage's result as mean ± std, and each seed's value."""
    runs = [records[f"default_s{s}"] for s in SEEDS if f"default_s{s}" in records]
    if not runs:
        return None
    rows = [("SFT val loss", lambda r: r["sft"]["val_loss"]),
            ("SFT samples' gold reward (best possible 1.25)", lambda r: r["sft"]["gold_sft"]),
            ("demonstrations' gold reward, the same prompts", lambda r: r["sft"]["gold_demos"]),
            ("RM accuracy vs the gold ordering", lambda r: r["rm"]["acc_gold"]),
            ("RM accuracy vs the annotators' labels", lambda r: r["rm"]["acc_labels"]),
            ("RM Pearson with gold", lambda r: r["rm"]["pearson"]),
            ("evaluation: SFT gold", lambda r: r["eval"]["sft"]["gold"]),
            ("evaluation: PPO-max gold", lambda r: r["eval"]["ppo"]["gold"]),
            ("evaluation: PPO-max RM score", lambda r: r["eval"]["ppo"]["rm"]),
            ("evaluation: PPO-max win rate vs SFT (gold)", lambda r: r["eval"]["ppo"]["win_vs_sft"]),
            ("evaluation: PPO-max KL to SFT (nats)", lambda r: r["eval"]["ppo"]["kl_sft"]),
            ("evaluation: PPO-max length (tokens)", lambda r: r["eval"]["ppo"]["length"]),
            ("pipeline time (s; one thread, beside other runs)", lambda r: r["wall_s"])]
    head = " | ".join(f"seed {s}" for s in SEEDS[:len(runs)])
    lines = [f"| measure | mean ± std | {head} |", "|---|---|" + "---|" * len(runs)]
    for label, get in rows:
        values = [get(r) for r in runs]
        digits = 0 if "time (s" in label else 3
        lines.append(f"| {label} | {mean_std(values, digits)} | " + " | ".join(f"{v:.{digits}f}" for v in values) + " |")
    warned = sum(bool(r["ppo"]["collapse_warning"]) for r in runs)
    return ("\n".join(lines) + f"\n\n`python pipeline.py --seed S` for S = {', '.join(map(str, SEEDS[:len(runs)]))} "
            f"(`python -m studies.reproduce seeds`); collapse warnings: {warned} of {len(runs)} runs. Measured at "
            f"{stamp_line(runs)}. On another CPU kind expect other digits, within about the spread shown.")


def block_sft_rm(records):
    """docs/toy_task.md: SFT's gold reward per prompt kind and the reward model's test metrics, over 3 seeds."""
    runs = [records[f"default_s{s}"] for s in SEEDS if f"default_s{s}" in records]
    if not runs or "gold_sft_by_kind" not in runs[0]["sft"]:
        return None
    kinds = list(runs[0]["sft"]["gold_sft_by_kind"])
    lines = ["| kind | demonstrations | SFT samples |", "|---|---|---|"]
    lines += [f"| {k} | {mean_std([r['sft']['gold_demos_by_kind'][k] for r in runs])} | "
              f"{mean_std([r['sft']['gold_sft_by_kind'].get(k) for r in runs])} |" for k in kinds]
    rm = [("accuracy vs the gold ordering (pairs whose gold rewards differ)", "acc_gold"),
          ("accuracy vs the (noisy) annotator labels", "acc_labels"), ("Spearman with the gold reward", "spearman"),
          ("Pearson with the gold reward", "pearson"), ("correlation with length: RM score", "length_corr_rm"),
          ("correlation with length: gold reward", "length_corr_gold")]
    lines += ["", "| reward model, 1,000 held-out test pairs | mean ± std |", "|---|---|"]
    lines += [f"| {label} | {mean_std([r['rm'][k] for r in runs])} |" for label, k in rm]
    return ("\n".join(lines) + f"\n\n`train_sft.py`'s and `reward_model.py`'s own evaluations in `python pipeline.py "
            f"--seed S`, S = {', '.join(map(str, SEEDS[:len(runs)]))}; measured at {stamp_line(runs)}.")


def block_small(records):
    """README: the small preset over 3 seeds: its time, SFT → PPO gold, and how --kl_coef moves the KL."""
    groups = [("0.1 (default)", "small_s{}")] + [(f"{b}", f"small_kl{b}_s{{}}") for b in SMALL_KL]
    lines = ["| --kl_coef | pipeline time (s; one thread, beside other runs) | SFT gold | PPO gold | gold gain | seeds with a gain | KL to SFT | "
             "win rate vs SFT | collapse warnings |", "|---|---|---|---|---|---|---|---|---|"]
    used = []
    for label, pattern in groups:
        runs = [records[pattern.format(s)] for s in SEEDS if pattern.format(s) in records]
        if not runs:
            continue
        used += runs
        ev = lambda stage, key: [r["eval"][stage][key] for r in runs]
        gain = [p - s for p, s in zip(ev("ppo", "gold"), ev("sft", "gold"))]
        lines.append(f"| {label} | {mean_std([r['wall_s'] for r in runs], 0)} | {mean_std(ev('sft', 'gold'))} | "
                     f"{mean_std(ev('ppo', 'gold'))} | {mean_std(gain)} | {sum(g > 0 for g in gain)} of {len(runs)} | "
                     f"{mean_std(ev('ppo', 'kl_sft'))} | {mean_std(ev('ppo', 'win_vs_sft'))} | "
                     f"{sum(bool(r['ppo']['collapse_warning']) for r in runs)} of {len(runs)} |")
    if not used:
        return None
    return ("\n".join(lines) + f"\n\n`python pipeline.py --preset small [--kl_coef B] --seed S`, mean ± std over "
            f"seeds {', '.join(map(str, SEEDS))} (`python -m studies.reproduce seeds`). Measured at {stamp_line(used)}.")


# ----------------------------------------------------------------------------------------------------
# Parts "ablations" and "overopt": PPO runs from the default pipeline's seed-0 SFT and RM

DEFAULT_BETA = 0.1   # ppo_rlhf.py's --kl_coef: its overopt run is the ablations' ppo_max_s0 (same options, same run)
SERIES_KEYS = ("iter", "score_raw", "gold", "kl_seq", "perplexity", "length", "eos_rate", "win_rate_vs_sft")
SNAPSHOTS = 5   # iterations whose rollouts' RM scores a record keeps (paper Fig. 13)


def compact(rows):
    """A PPO log cut to what the pages draw: SERIES_KEYS rounded to 4 decimals, the collapse warning where it is
    on, and the rollouts' scores at SNAPSHOTS evenly spaced iterations."""
    keep = {round(i * (len(rows) - 1) / (SNAPSHOTS - 1)) for i in range(SNAPSHOTS)}
    out = []
    for i, r in enumerate(rows):
        row = {k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in SERIES_KEYS if k in r}
        if r.get("collapse_warning"):
            row["collapse_warning"] = True
        if i in keep and "scores_raw" in r:
            row["scores_raw"] = [round(v, 3) for v in r["scores_raw"]]
        out.append(row)
    return out


def ppo_record(out_dir, command, wall_s):
    from runs import read_jsonl
    return dict(command=command, stamp=stamp(), wall_s=wall_s,
                rows=compact(read_jsonl(os.path.join(out_dir, "ppo_log.jsonl"))))


def base_checkpoints(out_root):
    """The SFT and RM every PPO study starts from: the seeds part's default_s0 (run it first)."""
    base = os.path.join(out_root, "seeds", "default_s0")
    sft, rm = os.path.join(base, "sft.pt"), os.path.join(base, "rm.pt")
    if not os.path.exists(rm):
        raise ValueError(f"{rm}: not there yet; the PPO parts start from the seeds part's default_s0 (python -m "
                         f"studies.reproduce seeds --runs default_s0)")
    return ["--sft_ckpt", sft, "--rm_ckpt", rm]


def finished(out_dir, stage="ppo"):
    """Whether the `stage` run in out_dir finished (whatever its options: a part keeps its own runs)."""
    from runs import done_checkpoint
    return done_checkpoint(os.path.join(out_dir, f"{stage}.pt"), stage) is not None


def run_ablations(out_root, only, device):
    from studies import experiments
    out = os.path.join(out_root, "ablations")
    for run in experiments.run_names():
        if only and run not in only:
            continue
        t0 = time.time()
        args = base_checkpoints(out_root) + ["--out_dir", out, "--device", device, "--runs", run]
        experiments.main(args)
        if finished(os.path.join(out, run)):
            write_record("ablations", run, ppo_record(os.path.join(out, run), "python -m studies.experiments "
                                                      + " ".join(args), wall_time("ablations", run, t0)))


def run_overopt(out_root, only, device):
    from studies import overoptimization as oo
    out = os.path.join(out_root, "overopt")
    for name in [oo.run_name(b) for b in oo.BETAS if b != DEFAULT_BETA] + ["bon"]:   # β 0.1: ablations' ppo_max_s0
        if only and name not in only:
            continue
        t0 = time.time()
        args = base_checkpoints(out_root) + ["--out_dir", out, "--device", device, "--only", name]
        oo.main(args)
        wall = wall_time("overopt", name, t0)
        command = "python -m studies.overoptimization " + " ".join(args)
        if name == "bon":
            write_record("overopt", name, dict(command=command, stamp=stamp(), wall_s=wall,
                                               points=json.load(open(os.path.join(out, "bon.json")))))
        elif finished(os.path.join(out, name)):
            write_record("overopt", name, ppo_record(os.path.join(out, name), command, wall))


COMPARED = ("ppo_max", "rloo", "raft", "grpo", "dr_grpo", "dapo", "gspo", "dpo", "alol")
RLVR = ("grpo_math_rm", "grpo_math_verifier", "grpo_math_gold")


def run_compare(out_root, only, device):
    """studies.compare over 3 seeds for every method of COMPARED and RLVR, from default_s0's SFT and RM; one record
    per method with each seed's evaluation row."""
    from studies import compare
    from runs import read_jsonl
    methods = [m for m in COMPARED + RLVR if not only or m in only]
    out = os.path.join(out_root, "compare")
    args = base_checkpoints(out_root) + ["--out_dir", out, "--device", device, "--methods", *methods,
                                          "--seeds", *map(str, SEEDS)]
    compare.main(args)
    rows = read_jsonl(os.path.join(out, "compare.jsonl"))
    start = sft_start(out_root, device)
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        write_record("compare", m, dict(command="python -m studies.compare " + " ".join(args), stamp=stamp(),
                                        wall_s=sum(r["time_s"] for r in mine), rows=mine, sft_start=start))


def sft_start(out_root, device):
    """The evaluation of the SFT every compared method starts from (studies/evaluate.py on it alone, as on the methods:
    512 test prompts), measured once per out_root and kept in compare_sft_start/."""
    from studies import evaluate
    from runs import read_jsonl
    out = os.path.join(out_root, "compare_sft_start")
    if not os.path.exists(os.path.join(out, "eval.jsonl")):
        sft, rm = base_checkpoints(out_root)[1::2]
        evaluate.main(["--policies", sft, "--sft_ckpt", sft, "--rm_ckpt", rm, "--out_dir", out, "--device", device,
                       "--n_prompts", "512"])
    [row] = read_jsonl(os.path.join(out, "eval.jsonl"))
    return {k: v for k, v in row.items() if k not in ("samples", "policy")}


def compare_table(records, methods, sft):
    """Markdown: SFT's row, then each method's mean ± std over seeds of the evaluation's keys."""
    keys = ("gold", "math_acc", "rm", "win_vs_sft", "kl_sft", "length", "distinct2")
    lines = ["| method | " + " | ".join(keys) + " | policy steps | train time (s) |", "|---" * (len(keys) + 3) + "|"]
    if sft:
        lines.append("| SFT (the start) | " + " | ".join(f"{sft[k]:.3f}" for k in keys) + " | | |")
    for m in methods:
        if m in records:
            rows = records[m]["rows"]
            lines.append(f"| {m} | " + " | ".join(mean_std([r[k] for r in rows]) for k in keys) +
                         f" | {'/'.join(sorted({str(r['policy_steps']) for r in rows}))} | "
                         f"{mean_std([r['time_s'] for r in rows], 0)} |")
    return "\n".join(lines)


def block_compare(methods):
    def block(records):
        if not any(m in records for m in methods):
            return None
        used = [records[m] for m in methods if m in records]
        starts = {json.dumps(r["sft_start"], sort_keys=True) for r in used if "sft_start" in r}
        if len(starts) > 1:
            raise ValueError("docs/measured/compare: the methods' records start from different SFT evaluations "
                             "(measured on different machines?): rerun the part on one machine")
        base = read_records("seeds").get("default_s0")                   # records from before sft_start was kept
        start = json.loads(starts.pop()) if starts else base["eval"]["sft"] if base else None
        return (compare_table(records, methods, start) +
                f"\n\nMean ± std over seeds {', '.join(map(str, SEEDS))}; 512 test prompts; measured at "
                f"{stamp_line(used)} (`python -m studies.reproduce compare`). Train times are of one thread beside "
                f"other runs, as many as the machine had then: they compare runs of one sitting only.")
    return block


def draw_compare(records):
    from studies import compare
    rows = [r for m in COMPARED if m in records for r in records[m]["rows"]]
    if rows:
        os.makedirs(FIGURES, exist_ok=True)
        compare.plot_compare(rows, compare.summarize(rows), os.path.join(FIGURES, "compare_reward_kl.png"))


# ----------------------------------------------------------------------------------------------------
# Part "process": process supervision on the arithmetic chains (studies/process_supervision.py), one record per seed

def run_process(out_root, only, device):
    for seed in SEEDS:
        name = f"s{seed}"
        if only and name not in only:
            continue
        out = os.path.join(out_root, "process", name)
        old = read_records("process").get(name)
        spent = ps.run_seed(out, seed, device)          # a seed's time: every call's time on the runs it trained
        write_record("process", name, dict(ps.record(out, seed, device), stamp=stamp(),
                                           wall_s=(old["wall_s"] if old else 0.0) + spent))


def process_block(make):
    """A docs/process_supervision.md block: the study's markdown and the stamp of the seeds it reads."""
    def block(records):
        if not records:
            return None
        return make(records) + (f"\n\nMeasured at {stamp_line(records.values())} over seeds "
                                f"{', '.join(sorted(records))} (`python -m studies.reproduce process`).")
    return block


def draw_process(records):
    if records:
        os.makedirs(FIGURES, exist_ok=True)
        ps.plot(records, os.path.join(FIGURES, "process_best_of_n.png"), os.path.join(FIGURES, "process_rl.png"))


# ----------------------------------------------------------------------------------------------------
# Part "bench": studies.bench's reference workloads (time them alone: a neighbour process slows them down)

BENCH_JOBS = {"ppo_v8192": ["--algo", "ppo"], "ppo_v50257": ["--algo", "ppo", "--vocab", "50257"],
              "rloo_v8192": ["--algo", "rloo"], "rloo_v50257": ["--algo", "rloo", "--vocab", "50257"],
              "generate_v8192": ["--algo", "generate"]}


def run_bench(out_root, only, device):
    """Each workload of BENCH_JOBS in its own process (so that its peak RSS is its own), at this process's thread
    count; one record per workload. Always measured again (a time is not kept from an earlier call)."""
    if device != "cpu":
        raise ValueError(f"--device {device}: the bench part measures the CPU workloads of studies.bench")
    out = os.path.join(out_root, "bench")
    os.makedirs(out, exist_ok=True)
    for run, job in BENCH_JOBS.items():
        if only and run not in only:
            continue
        path = os.path.join(out, f"{run}.jsonl")
        if os.path.exists(path):
            os.remove(path)
        args = job + ["--threads", str(torch.get_num_threads()), "--json", path]
        t0 = time.time()
        if subprocess.run([sys.executable, "-m", "studies.bench", *args], cwd=ROOT).returncode:
            raise ValueError(f"the {run} workload failed (its error is above)")
        result = json.loads(open(path, encoding="utf-8").read().splitlines()[-1])
        write_record("bench", run, dict(command="python -m studies.bench " + " ".join(args[:-2]), stamp=stamp(),
                                        wall_s=time.time() - t0, result=result))


def block_bench(records):
    """docs/performance.md: each workload's seconds per iteration against its two floors, and generation speed."""
    if not records:
        return "Not measured yet: `python -m studies.reproduce bench` writes this table."
    lines = ["| workload (16 optimizer steps per iteration) | ours s/iteration (generate / score / train) | "
             "bare-pass floor | ours / floor | FLOP floor | peak RSS |", "|---|---|---|---|---|---|"]
    for run in BENCH_JOBS:
        if run not in records or run.startswith("generate"):
            continue
        r = records[run]["result"]
        m = r["median"]
        lines.append(f"| {r['algo'].upper()}, vocab {r['vocab']} | **{m['iteration']:.2f}** ({m['generate']:.2f} / "
                     f"{m['score']:.2f} / {m['train']:.2f}) | {r['bare_floor']['iteration']:.2f} | "
                     f"**{r['ratio_bare']:.2f}** | {r['flop_floor']['iteration']:.2f} | {r['peak_rss_mib']:.0f} MiB |")
    if "generate_v8192" in records:
        r = records["generate_v8192"]["result"]
        lines.append(f"| KV-cache generation alone, {r['rows']} × {r['new']} tokens, vocab {r['vocab']} | "
                     f"{r['seconds']:.2f} s = **{r['tokens_per_s']:,.0f} tokens/s** | | | | {r['peak_rss_mib']:.0f} MiB |")
    spread = [f"{run}: " + ", ".join(f"{x:.2f}" for x in records[run]["result"]["runs"])
              for run in BENCH_JOBS if run in records and "runs" in records[run]["result"]]
    return ("\n".join(lines) + f"\n\nMedian of each workload's timed iterations (each one: {'; '.join(spread)} s). "
            f"Measured at {stamp_line(records.values())}, nothing else running (`python -m studies.reproduce bench "
            f"--threads 2`).")


def block_claims(records):
    from studies import experiments
    summary = {run: experiments.summarize_run(r["rows"]) for run, r in records.items()}
    if not summary:
        return None
    return (experiments.claims_markdown(experiments.claims(summary)) + f"\nMeasured at {stamp_line(records.values())}; "
            f"{len(records)} runs, {sum(r['wall_s'] for r in records.values()) / 60:.0f} minutes of one thread each "
            f"in all (`python -m studies.reproduce ablations`).")


def block_ablation_runs(records):
    from studies import experiments
    summary = {run: experiments.summarize_run(r["rows"]) for run, r in records.items()}
    return experiments.summary_markdown(summary).rstrip("\n") if summary else None


def draw_ablations(records):
    from studies import experiments
    if records:
        experiments.draw({run: r["rows"] for run, r in records.items()}, os.path.join(FIGURES, "experiments"))


def overopt_curves(records):
    """The RL curves ({β: points}; β 0.1 is the ablations' ppo_max_s0, the same run) and best-of-n's points."""
    from studies import overoptimization as oo
    records = dict(records)
    same_run = read_records("ablations").get("ppo_max_s0")
    if same_run and len(same_run["rows"]) == oo.N_ITERS:
        records[oo.run_name(DEFAULT_BETA)] = same_run
    rl = {b: oo.rl_curve(records[oo.run_name(b)]["rows"]) for b in oo.BETAS if oo.run_name(b) in records}
    return rl, records["bon"]["points"] if "bon" in records else []


def block_overopt(records):
    from studies import overoptimization as oo
    rl, bon = overopt_curves(records)
    if not rl and not bon:
        return None
    return (oo.summary_markdown(rl, bon).rstrip("\n") + f"\n\nMeasured at {stamp_line(records.values())} "
            f"(`python -m studies.reproduce overopt`); each RL point is the mean of 10 iterations.")


def draw_overopt(records):
    from studies import overoptimization as oo
    rl, bon = overopt_curves(records)
    if rl or bon:
        os.makedirs(FIGURES, exist_ok=True)
        oo.plot(os.path.join(FIGURES, "overoptimization.png"), rl, bon)


def block_parts(_):
    """README: each part of the command, its runs recorded so far and the time they took (from the records)."""
    lines = ["| part | what it measures | runs recorded | time they took |", "|---|---|---|---|"]
    what = {"seeds": "the pipeline over 3 seeds: default and small presets, the small β sweep",
            "ablations": "the paper's ablations, 300 iterations, vanilla and PPO-max over 3 seeds",
            "overopt": "over-optimisation: PPO at 5 β × 300 iterations (β 0.1 is ablations' ppo_max_s0), best-of-n",
            "compare": "every method × 3 seeds, and the RLVR study",
            "process": "process supervision on the arithmetic chains: SFT, ORM and PRMs, best-of-N, GRPO, 3 seeds",
            "bench": "studies.bench's reference workloads against their floors (alone on the machine)"}
    for part in PARTS:
        records = read_records(part)
        minutes = sum(r["wall_s"] for r in records.values()) / 60
        threads = sorted({r["stamp"]["threads"] for r in records.values()})
        took = f"{minutes:.0f} min, {'/'.join(map(str, threads))} thread{'' if threads == [1] else 's'}"
        lines.append(f"| `python -m studies.reproduce {part}` | {what[part]} | {len(records)} | "
                     f"{took if records else '–'} |")
    return "\n".join(lines) + "\n\nEach part resumes where it stopped; two training parts (or two `--runs` halves of one) run " \
                              "side by side on 2 cores, one thread each; bench runs alone. `python -m studies.reproduce redraw` takes seconds."


# ----------------------------------------------------------------------------------------------------
# Pages: blocks filled from the records

BLOCKS = {  # block name -> (part whose records it reads, function records -> markdown or None)
    "pipeline_seeds": ("seeds", block_pipeline),
    "small_preset": ("seeds", block_small),
    "sft_rm": ("seeds", block_sft_rm),
    "claims": ("ablations", block_claims),
    "ablation_runs": ("ablations", block_ablation_runs),
    "overoptimization": ("overopt", block_overopt),
    "compare_methods": ("compare", block_compare(COMPARED)),
    "compare_rlvr": ("compare", block_compare(RLVR)),
    "reproduce_parts": ("seeds", block_parts),
    "bench": ("bench", block_bench),
    "process_claims": ("process", process_block(ps.block_claims)),
    "process_sft": ("process", process_block(ps.block_sft)),
    "process_step_accuracy": ("process", process_block(ps.block_step_accuracy)),
    "process_best_of_n": ("process", process_block(ps.block_best_of_n)),
    "process_best_of_n_steps": ("process", process_block(lambda r: ps.block_best_of_n(r, "best_of_n_process"))),
    "process_rl": ("process", process_block(ps.block_rl)),
}
DRAWINGS = {"ablations": draw_ablations, "overopt": draw_overopt, "compare": draw_compare, "process": draw_process}   # part -> draws its figures into docs/figures
PAGES = ("README.md", "docs/ppo.md", "docs/experiments.md", "docs/overoptimization.md", "docs/algorithms.md",
         "docs/toy_task.md", "docs/performance.md", "docs/process_supervision.md")


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
    for part, draw in DRAWINGS.items():
        draw(read_records(part))
    changed = []
    for page in PAGES:
        path = os.path.join(root, page)
        if not os.path.exists(path):
            continue
        text = open(path, encoding="utf-8").read()
        new = fill_blocks(text, contents)
        if new != text:
            from runs import replaced
            with replaced(path, "w", encoding="utf-8") as f:
                f.write(new)
            changed.append(page)
    return changed


PARTS = {"seeds": run_seeds, "ablations": run_ablations, "overopt": run_overopt, "compare": run_compare,
         "process": run_process, "bench": run_bench}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=list(PARTS) + ["redraw"], help="the part to run (then redraw), or redraw alone")
    p.add_argument("--runs", nargs="+", default=None, help="only these runs of the part")
    p.add_argument("--out_root", default="out/reproduce", help="where the runs' folders go")
    p.add_argument("--device", default="cpu", help="cpu (the pages' numbers), or cuda / mps / auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: 1 for the training parts (the pages' "
                   "numbers: two parts side by side on 2 cores), every core for bench; a record states its own")
    p.add_argument("--record_only", action="store_true", help="seeds: write the records again from the finished "
                                                                "run folders (their stamps and times kept), train nothing")
    a = p.parse_args(argv)
    if a.threads < 0:
        raise ValueError(f"--threads {a.threads}: must be 0 (the part's default) or more")
    if a.threads or a.part != "bench":
        torch.set_num_threads(a.threads or 1)
    if a.record_only and a.part != "seeds":
        raise ValueError("--record_only: only the seeds part writes its records again from its folders")
    if a.part != "redraw":
        PARTS[a.part](a.out_root, a.runs, a.device, **({"record_only": True} if a.record_only else {}))
    changed = redraw()
    print(f"pages redrawn from docs/measured/: {', '.join(changed) if changed else 'none changed'}")


if __name__ == "__main__":
    from runs import run_main
    run_main(main)
