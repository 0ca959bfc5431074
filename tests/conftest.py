"""Fixtures shared by the tests (pytest.ini puts the repository root on the import path)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """One tiny pipeline run (SFT, RM, PPO, evaluation) shared by the tests that only read its outputs."""
    out = str(tmp_path_factory.mktemp("tiny_pipeline"))
    r = subprocess.run([sys.executable, "pipeline.py", "--preset", "tiny", "--device", "cpu", "--out_dir", out],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out
