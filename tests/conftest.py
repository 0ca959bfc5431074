"""Fixtures shared by the tests, and the repository root on the import path (the tests import its modules)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if os.environ.get("PYTEST_XDIST_WORKER"):   # pytest -n 2: one torch thread per worker (and its subprocesses), so
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # that two workers on two cores do not oversubscribe them


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """One tiny pipeline run (SFT, RM, PPO, evaluation) shared by the tests that only read its outputs."""
    out = str(tmp_path_factory.mktemp("tiny_pipeline"))
    r = subprocess.run([sys.executable, "pipeline.py", "--preset", "tiny", "--device", "cpu", "--out_dir", out],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """One unbroken tiny run of SFT -> RM -> PPO (in this process, with periodic checkpoints): the inputs of many
    tests, and what resumed runs are compared against."""
    import ppo_rlhf
    import reward_model
    import train_sft
    tiny = ["--preset", "tiny", "--device", "cpu"]
    out = str(tmp_path_factory.mktemp("base"))
    train_sft.main(tiny + ["--out_dir", out, "--ckpt_interval", "10"])
    reward_model.main(tiny + ["--out_dir", out, "--sft_ckpt", f"{out}/sft.pt", "--ckpt_interval", "4"])
    ppo_rlhf.main(tiny + ["--out_dir", out, "--sft_ckpt", f"{out}/sft.pt", "--rm_ckpt", f"{out}/rm.pt",
                          "--ckpt_interval", "2"])
    return out
