"""
One run per folder, and nothing a user has is lost: the folder lock under races (fresh and stale, two processes
at the same instant, hundreds of times), every command that writes into a run folder holding it, a resume whose
writes fail at each step in turn (the run stays resumable, its history intact), a new run beside a finished one,
SIGTERM, and studies.compare continuing an interrupted study.
"""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from runs import run_main
from studies import evaluate
import train_sft
import runs
from studies import compare, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--device", "cpu"]
TRIALS = 200


def _racer(folder, start, results, done):
    """A child process: wait for the start, try to take the folder, say whether it did, hold it until told."""
    start.wait()
    try:
        runs.claim_out_dir(folder)
        results.put("owner")
    except ValueError:
        results.put("refused")
    done.wait()
    os._exit(0)


def _race(folder, ctx):
    """Two processes try to take `folder` at the same instant; returns how many got it."""
    start, done, results = ctx.Event(), ctx.Event(), ctx.Queue()
    racers = [ctx.Process(target=_racer, args=(folder, start, results, done)) for _ in range(2)]
    for p in racers:
        p.start()
    start.set()
    got = [results.get(timeout=30) for _ in racers]
    done.set()
    for p in racers:
        p.join(timeout=30)
    return got.count("owner")


@pytest.mark.parametrize("stale", [False, True])
def test_two_processes_racing_for_a_folder_never_both_own_it(tmp_path, stale):
    """Fresh: no lock file yet. Stale: the lock file of a run that was killed (SIGKILL, no clean-up) with its
    PID in it. 200 races each: exactly one owner every time (the old PID-file lock let both own it in 6 of 100)."""
    ctx = multiprocessing.get_context("fork")
    owners = []
    for trial in range(TRIALS):
        folder = str(tmp_path / f"run{trial}")
        if stale and trial < 10:                            # ten locks of runs really killed ...
            killed = ctx.Process(target=_killed_holder, args=(folder,))
            killed.start()
            killed.join(timeout=30)
            assert killed.exitcode == -signal.SIGKILL
        elif stale:                                         # ... then the files they leave, with a dead PID
            os.mkdir(folder)
            with open(os.path.join(folder, ".lock"), "w") as f:
                f.write("999999999")
        owners.append(_race(folder, ctx))
    assert owners.count(1) == TRIALS, {n: owners.count(n) for n in set(owners)}


def _killed_holder(folder):
    runs.claim_out_dir(folder)
    os.kill(os.getpid(), signal.SIGKILL)


def _hold(folder, held, release):
    runs.claim_out_dir(folder)
    held.set()
    release.wait()
    os._exit(0)


@pytest.fixture
def held_by_another_process(tmp_path):
    """A folder another (live) process holds, for as long as the test runs."""
    ctx = multiprocessing.get_context("fork")
    folder = str(tmp_path / "held")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(folder, held, release))
    holder.start()
    assert held.wait(timeout=30)
    yield folder, holder.pid
    release.set()
    holder.join(timeout=30)


def test_evaluate_report_and_compare_refuse_a_folder_a_run_holds(base, held_by_another_process, capsys):
    folder, pid = held_by_another_process
    busy = f"{folder}: in use by another run (PID {pid}); wait for it to finish, or choose another --out_dir"
    commands = [lambda: evaluate.main(TINY[2:] + ["--out_dir", folder, "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt",
                                                  f"{base}/rm.pt", "--policies", f"{base}/ppo.pt"]),
                lambda: report.main([base, "--out_file", os.path.join(folder, "report.html")]),
                lambda: compare.main(["--quick", "--methods", "dpo", "--seeds", "0", "--out_dir", folder,
                                      "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt"])]
    for command in commands:
        with pytest.raises(SystemExit) as e:
            run_main(command)
        assert e.value.code == 2 and capsys.readouterr().err.strip() == f"error: {busy}"
    assert sorted(os.listdir(folder)) == [".lock"]                          # nothing was written


def test_pipeline_holds_its_folder_from_the_first_stage_to_the_report(tmp_path, monkeypatch):
    """Between two stages (where each stage gives its own claim back) the folder stays the pipeline's: another
    process trying to take it then is refused."""
    import pipeline
    import reward_model
    out = str(tmp_path / "pipe")
    seen = []
    real = reward_model.main

    def between_stages(args):
        probe = subprocess.run([sys.executable, "-c", "import sys; from runs import claim_out_dir; "
                                "claim_out_dir(sys.argv[1])", out], cwd=ROOT, capture_output=True, text=True)
        seen.append(probe.stderr.strip().splitlines()[-1])
        return real(args)
    monkeypatch.setattr(reward_model, "main", between_stages)
    pipeline.main(["--preset", "tiny", "--device", "cpu", "--out_dir", out])
    assert seen == [f"ValueError: {out}: in use by another run (PID {os.getpid()}); wait for it to finish, or choose "
                    f"another --out_dir"]
    assert not runs._HELD


def _files(folder):
    """{name: bytes} of a folder's files (the lock aside)."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n != ".lock"}


def _rows(path):
    """A log's rows without their wall-clock fields (the only thing a resumed run may change)."""
    return _rows_of(open(path, "rb").readlines())


class DiskFull(Exception):
    pass


def test_a_resume_whose_writes_fail_at_each_step_leaves_the_run_resumable(tmp_path, monkeypatch):
    """An SFT run stopped after step 10 (checkpoint every 5) is resumed with the k-th write into its folder failing
    -- for every k from the first (the log's cut) to the last (the final checkpoint), each write cut short as a full
    disk cuts it (part of the bytes written). After each failure the folder's log still holds every line the last
    checkpoint counts, byte for byte; a clean --resume then finishes with the log of the run never interrupted."""
    args = TINY + ["--ckpt_interval", "5", "--max_iters", "16", "--eval_interval", "8"]
    whole = str(tmp_path / "whole")
    train_sft.main(args + ["--out_dir", whole])
    stopped = str(tmp_path / "stopped")
    train_sft.main(args + ["--out_dir", stopped, "--stop_after", "10"])
    start = _files(stopped)
    import builtins
    import torch
    real_open, real_save = builtins.open, torch.save
    count = {"writes": 0, "fail_at": None}

    def failing(write):                     # the k-th write into the run folder writes half its bytes, then fails
        def wrapped(data, *a, **k):
            write(data[:len(data) // 2])
            raise OSError(28, "No space left on device")
        return wrapped

    def open_(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        name = os.path.basename(str(path))
        if any(c in mode for c in "wax") and str(path).startswith(tmp_path.as_posix() + "/run") and \
                not name.startswith((".lock", ".write_test")):
            count["writes"] += 1
            if count["writes"] == count["fail_at"]:
                f.write = failing(f.write)
        return f

    def save_(obj, path, *a, **k):
        if str(path).startswith(tmp_path.as_posix() + "/run"):
            count["writes"] += 1
            if count["writes"] == count["fail_at"]:
                real_open(path, "wb").write(b"PK\x03\x04 half a checkpoint")
                raise OSError(28, "No space left on device", str(path))
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(torch, "save", save_)
    whole_rows, k = _rows(f"{whole}/sft_log.jsonl"), 0
    while True:
        k += 1
        run = str(tmp_path / f"run{k}")
        os.mkdir(run)
        for name, data in start.items():
            real_open(os.path.join(run, name), "wb").write(data)
        count.update(writes=0, fail_at=k)
        try:
            train_sft.main(args + ["--out_dir", run, "--resume", "true"])
            finished = True
        except OSError:
            finished = False
        assert not runs._HELD
        if finished:                        # k is past the last write: every write has failed once
            break
        from runs import load_checkpoint
        ckpt = load_checkpoint(f"{run}/sft.pt", "sft", finished=False)
        kept = open(f"{run}/sft_log.jsonl", "rb").read().splitlines(keepends=True)[:ckpt["log_lines"]]
        assert _rows_of(kept) == whole_rows[:ckpt["log_lines"]], k       # the history the checkpoint counts
        count.update(fail_at=None)
        train_sft.main(args + ["--out_dir", run, "--resume", "true"])
        assert _rows(f"{run}/sft_log.jsonl") == whole_rows, k
        assert not [n for n in os.listdir(run) if n.endswith((".tmp", ".new"))], k
    assert k > 8                            # the log's cut, its appends, a periodic and the final checkpoint, plots


def _rows_of(lines):
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "train_time_s")} for line in lines]


def test_a_new_run_beside_a_finished_one_leaves_its_files_until_its_first_checkpoint(tmp_path, monkeypatch):
    """A new run started into a folder holding a finished run, that fails before its first checkpoint (a
    non-finite loss at step 2), leaves every file of the finished run as it was and no PATH.new behind; one that
    reaches its first checkpoint has replaced the log."""
    out = str(tmp_path)
    train_sft.main(TINY + ["--out_dir", out])
    before = _files(out)
    import model
    real = model.GPT.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        logits = real(self, *a, **k)
        return logits * float("nan") if calls["n"] > 3 else logits
    monkeypatch.setattr(model.GPT, "forward", poisoned)
    with pytest.raises(FloatingPointError):
        train_sft.main(TINY + ["--out_dir", out, "--seed", "1"])
    assert _files(out) == before
    monkeypatch.setattr(model.GPT, "forward", real)
    train_sft.main(TINY + ["--out_dir", out, "--seed", "1", "--ckpt_interval", "5", "--stop_after", "5"])
    assert _files(out)["sft_log.jsonl"] != before["sft_log.jsonl"]          # its first checkpoint: the new log
    assert not [n for n in os.listdir(out) if n.endswith(".new")]


def test_sigterm_is_one_line_naming_the_last_checkpoint_and_the_run_resumes(base, tmp_path):
    """SIGTERM (what `timeout` and schedulers send) mid-run: one line naming the last checkpoint and how to resume,
    exit 143, the folder free again; --resume then finishes the run."""
    out = str(tmp_path / "ppo")
    cmd = [sys.executable, "ppo_rlhf.py"] + TINY + ["--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt",
                                                    "--out_dir", out, "--n_iters", "400", "--ckpt_interval", "1"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(f"{out}/ppo.pt") and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1].strip().splitlines()
    assert p.returncode == 143
    last = err[-1]
    assert last.startswith(f"stopped (SIGTERM); the last checkpoint, {out}/ppo.pt (after iteration ") and \
        last.endswith("), is intact: run the same command with --resume true to continue from it"), err[-3:]
    assert not any("Traceback" in line for line in err)
    runs.claim_out_dir(out)                                                  # the folder is free
    runs.release_out_dir(out)
    step = int(last.split("(after iteration ")[1].split(")")[0])
    r = subprocess.run(cmd + ["--resume", "true", "--stop_after", str(step + 1)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and f"resuming from {out}/ppo.pt after step {step}" in r.stdout, r.stderr[-500:]


def test_compare_continues_an_interrupted_study(base, tmp_path, capsys):
    """studies.compare run again after a kill: the finished method runs are kept, the interrupted one resumes from
    its checkpoint, the rest are trained; a third time, everything is kept."""
    from algorithms import rloo
    out = str(tmp_path / "study")
    common = ["--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt", "--device", "auto"]
    rloo.main(compare.METHODS["rloo"][1] + ["--seed", "0", "--out_dir", f"{out}/rloo_s0", *common, "--preset", "tiny",
                                            "--ckpt_interval", "1", "--stop_after", "1"])     # the study's kill
    study = ["--quick", "--methods", "rloo", "dpo", "--seeds", "0", "--out_dir", out, "--sft_ckpt", f"{base}/sft.pt",
             "--rm_ckpt", f"{base}/rm.pt"]
    capsys.readouterr()
    first = compare.main(study)
    said = capsys.readouterr().out
    assert f"resuming from {out}/rloo_s0/rloo.pt after step 1" in said and "dpo.pt: finished" not in said
    second = compare.main(study)
    said = capsys.readouterr().out
    assert said.count("finished with these options; kept") == 2 and "resuming" not in said
    means = lambda summary: {m: (s["gold"][0], s["rm"][0], s["kl_sft"][0]) for m, s in summary.items()}
    assert means(second) == means(first)                                   # the same runs, evaluated again


def test_a_stop_after_the_resume_has_passed_is_refused(tmp_path):
    """--stop_after 5 on a run that resumes after step 10 would never stop: refused before any step."""
    out = str(tmp_path)
    train_sft.main(TINY + ["--out_dir", out, "--ckpt_interval", "5", "--stop_after", "10"])
    with pytest.raises(ValueError, match="--stop_after 5: the run resumes after step 10, past it"):
        train_sft.main(TINY + ["--out_dir", out, "--ckpt_interval", "5", "--resume", "true", "--stop_after", "5"])
    assert not runs._HELD
