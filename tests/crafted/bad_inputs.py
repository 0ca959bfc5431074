"""
Every crafted file of this folder, and a few dozen bad options and odd paths, given to the command line that
reads them, each in its own process under a 60 s timeout: prints a Markdown table of the input, the last line the
command printed, its exit code, and whether a traceback or a hang happened (the closing table of issue 23).

    python -m tests.crafted.bad_inputs            # about 5 minutes on 2 CPU cores; makes a tiny pipeline first
"""
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = ["--preset", "tiny", "--device", "cpu"]


def cases(work, base):
    """(what, argv) for every bad input."""
    out = lambda name: os.path.join(work, name)                                        # noqa: E731
    fifo = out("fifo")
    os.mkfifo(fifo)
    os.makedirs(out("fifo_run"))
    os.mkfifo(out("fifo_run/ppo_log.jsonl"))
    os.makedirs(out("ckpt_is_a_folder/sft.pt"))
    os.makedirs(out("fifo_ckpt"))
    os.mkfifo(out("fifo_ckpt/sft.pt"))
    open(out("a_file"), "w").close()
    sft, rm = f"{base}/sft.pt", f"{base}/rm.pt"
    found = []
    for name in sorted(os.listdir(HERE)):
        path = os.path.join(HERE, name)
        kind = name.split("_")[0]
        if kind in ("st", "bin", "cfg"):
            found.append((f"--init {name}", ["train_sft.py", *TINY, "--init", path, "--out_dir", out(name)]))
        elif kind == "ckpt":
            found.append((f"--sft_ckpt {name}", ["reward_model.py", *TINY, "--sft_ckpt", path, "--out_dir", out(name)]))
        elif kind in ("log", "samples"):
            found.append((f"report of {name}/", ["-m", "studies.report", path, "--out_file", out(f"{name}.html")]))
        elif kind == "hh":
            found.append((f"--data {name}", ["train_sft.py", *TINY, "--data", path, "--out_dir", out(name)]))
        elif kind == "ranks":
            found.append((f"tokenizer ranks {name}", ["-c", "import sys, tokenizer; from utils import run_main; "
                                                      "run_main(lambda: tokenizer.load_ranks(sys.argv[1]))", path]))
    ppo = ["ppo_rlhf.py", *TINY, "--sft_ckpt", sft, "--rm_ckpt", rm]
    found += [
        ("--data a FIFO", ["train_sft.py", *TINY, "--data", fifo, "--out_dir", out("d1")]),
        ("--init a FIFO", ["train_sft.py", *TINY, "--init", fifo, "--out_dir", out("d2")]),
        ("--sft_ckpt a FIFO", ["reward_model.py", *TINY, "--sft_ckpt", fifo, "--out_dir", out("d3")]),
        ("--rm_ckpt a FIFO", ppo[:-2] + ["--rm_ckpt", fifo, "--out_dir", out("d4")]),
        ("out_dir/sft.pt a FIFO", ["train_sft.py", *TINY, "--out_dir", out("fifo_ckpt")]),
        ("out_dir/sft.pt a folder", ["train_sft.py", *TINY, "--out_dir", out("ckpt_is_a_folder")]),
        ("report of a FIFO log", ["-m", "studies.report", out("fifo_run"), "--out_file", out("r.html")]),
        ("--out_dir a file", ["train_sft.py", *TINY, "--out_dir", out("a_file")]),
        ("--temperature inf", ppo + ["--temperature", "inf", "--out_dir", out("o1")]),
        ("--kl_coef nan", ppo + ["--kl_coef", "nan", "--out_dir", out("o2")]),
        ("--lr inf", ["train_sft.py", *TINY, "--lr", "inf", "--out_dir", out("o3")]),
        ("--lr -1", ["train_sft.py", *TINY, "--lr", "-1", "--out_dir", out("o4")]),
        ("--block_size 8 (responses of 24)", ["train_sft.py", *TINY, "--block_size", "8", "--out_dir", out("o5")]),
        ("--n_embd 6 --n_head 4", ["train_sft.py", *TINY, "--n_embd", "6", "--n_head", "4", "--out_dir", out("o6")]),
        ("--n_layer 64 --n_embd 16384", ["train_sft.py", *TINY, "--n_layer", "64", "--n_embd", "16384", "--out_dir",
                                          out("o16")]),
        ("--device tpu", ["train_sft.py", *TINY, "--device", "tpu", "--out_dir", out("o7")]),
        ("--stop_after past the end", ["train_sft.py", *TINY, "--stop_after", "1000", "--out_dir", out("o8")]),
        ("--max_new_tokens 1000 (PPO)", ppo + ["--max_new_tokens", "1000", "--out_dir", out("o9")]),
        ("evaluate --max_new_tokens 1000", ["-m", "studies.evaluate", "--device", "cpu", "--sft_ckpt", sft, "--rm_ckpt", rm,
                                            "--policies", sft, "--max_new_tokens", "1000", "--out_dir", out("o10")]),
        ("evaluate an RM as a policy", ["-m", "studies.evaluate", "--device", "cpu", "--sft_ckpt", sft, "--rm_ckpt", rm,
                                        "--policies", rm, "--out_dir", out("o11")]),
        ("--resume with nothing to resume", ["train_sft.py", *TINY, "--resume", "true", "--out_dir", out("o12")]),
        ("--resume a finished run", ["train_sft.py", *TINY, "--resume", "true", "--out_dir", base]),
        ("--sft_ckpt the RM", ["reward_model.py", *TINY, "--sft_ckpt", rm, "--out_dir", out("o13")]),
        ("bench --vocab 0", ["-m", "studies.bench", "--quick", "--vocab", "0"]),
        ("bench --iters 0", ["-m", "studies.bench", "--iters", "0"]),
        ("bench --threads -1", ["-m", "studies.bench", "--threads", "-1"]),
        ("bench --json a FIFO", ["-m", "studies.bench", "--quick", "--json", fifo]),
        ("tokenizer --out a folder", ["-m", "tokenizer", "--out", work]),
        ("tokenizer --out a FIFO", ["-m", "tokenizer", "--out", fifo]),
        ("--data with a stray comma", ["train_sft.py", *TINY, "--data", f"{HERE}/hh_empty.jsonl,", "--out_dir", out("o14")]),
        ("--k 1 (an abbreviation)", ppo + ["--k", "1", "--out_dir", out("o15")]),
    ]
    return found


def main():
    work = tempfile.mkdtemp(prefix="bad_inputs_")
    base = os.path.join(work, "base")
    subprocess.run([sys.executable, "pipeline.py", *TINY[:2], "--device", "cpu", "--out_dir", base], cwd=ROOT,
                   check=True, capture_output=True)
    rows = []
    for what, argv in cases(work, base):
        try:
            r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
            lines = (r.stderr.strip() or r.stdout.strip() or "(nothing)").splitlines()
            code, hang, traceback = r.returncode, False, "Traceback" in r.stderr
            last = lines[-1]
        except subprocess.TimeoutExpired:
            code, hang, traceback, last = "-", True, False, "(killed after 60 s)"
        rows.append((what, last.replace(work, "$TMP").replace(HERE, "tests/crafted").replace("|", "\\|"), code,
                     "yes" if traceback else "no", "yes" if hang else "no"))
        print(f"{len(rows):3d} {what}: exit {code}", file=sys.stderr, flush=True)
    print("| # | bad input | the line printed | exit | traceback | hang |")
    print("|---|---|---|---|---|---|")
    for n, row in enumerate(rows, 1):
        print(f"| {n} | {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]} |")
    bad = [r for r in rows if r[2] != 2 or r[3] == "yes" or r[4] == "yes"]
    print(f"\n{len(rows)} inputs; {len(rows) - len(bad)} one line with exit 2; others: {[r[0] for r in bad]}")


if __name__ == "__main__":
    main()
