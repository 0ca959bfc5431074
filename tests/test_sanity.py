"""Each classic silent failure provoked once: its plain-English warning is printed, once per run, and a healthy
batch prints nothing (runs.py)."""
import os
import subprocess
import sys

import torch

from runs import SanityChecks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def printed(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]


def test_a_first_minibatch_ratio_away_from_1(capsys):
    s = SanityChecks("PPO")
    assert not s.first_ratio(1, 1.0000004, 1.0000009)                  # float rounding: fine
    assert s.first_ratio(2, 1.02, 1.31)                                 # e.g. dropout on in the training pass
    assert not s.first_ratio(3, 1.02, 1.31)                             # once per run
    assert not s.first_ratio(4, 1.02, 1.04, bf16=True)                  # within bf16's tolerance
    [line] = printed(capsys)
    assert line.startswith("WARNING (PPO): iteration 2: on the first minibatch, before any update, the ratio π/π_old "
                           "is 1.0200 on average (max 1.3100), not 1") and "'The ratio-is-1 check'" in line


def test_a_kl_estimate_below_zero_beyond_its_noise(capsys):
    g = torch.Generator().manual_seed(0)
    s = SanityChecks("GRPO")
    assert not s.kl_estimate(1, torch.randn(64, generator=g) * 0.5)     # mean about 0: noise
    assert not s.kl_estimate(2, torch.zeros(64))                        # policy = reference
    assert s.kl_estimate(3, torch.randn(64, generator=g) * 0.1 - 0.5)   # e.g. scored at another temperature
    [line] = printed(capsys)
    assert "the mean KL estimate is -0.4988 nats, below 0 by" in line and "KL(π‖π_ref) cannot be negative" in line


def test_every_group_tied(capsys):
    s = SanityChecks("GRPO")
    assert not s.tied_groups(1, torch.tensor([0.0, 1.0, 0.0, 0.0]), 2)  # one group has spread
    assert s.tied_groups(2, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0]), 3)
    [line] = printed(capsys)
    assert "in every one of the 2 groups the 3 samples got the same reward (here 0)" in line


def test_advantages_that_explode_or_are_not_finite(capsys):
    s = SanityChecks("PPO")
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert not s.advantages(1, torch.tensor([[3.0, -2.0, 1e6]]), mask)   # padding is not looked at
    assert s.advantages(2, torch.tensor([[3.0, -250.0, 0.0]]), mask)
    other = SanityChecks("RLOO")
    assert other.advantages(1, torch.tensor([1.0, float("nan")]))
    lines = printed(capsys)
    assert "an advantage reaches 250 (beyond ±100)" in lines[0] and "1 advantages are NaN or infinite" in lines[1]


def test_no_response_ends_with_eos(capsys):
    s = SanityChecks("PPO")
    never = torch.zeros(4, dtype=torch.bool)
    assert not s.no_eos(1, never) and not s.no_eos(2, never)           # judged after 3 iterations
    assert s.no_eos(3, never)
    healthy = SanityChecks("PPO")
    assert not any(healthy.no_eos(i, torch.tensor([False, True, False, False])) for i in (1, 2, 3))
    [line] = printed(capsys)
    assert "not one of the first 12 responses ended with EOS" in line


def test_grpo_with_a_verifier_the_sft_never_satisfies_says_so(tiny_pipeline, tmp_path):
    """The issue's case: GRPO with the verifier on a weak SFT (verified 0.00, grad norm 0) now says why."""
    cmd = [sys.executable, "-m", "algorithms.grpo", "--preset", "tiny", "--reward", "verifier", "--tasks", "math",
           "--device", "cpu", "--sft_ckpt", os.path.join(tiny_pipeline, "sft.pt"),
           "--rm_ckpt", os.path.join(tiny_pipeline, "rm.pt"), "--out_dir", str(tmp_path / "grpo")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING (GRPO): iteration 1: in every one of the 4 groups")


def test_a_healthy_debug_ppo_run_prints_no_warning(tiny_pipeline, tmp_path, capsys):
    import ppo_rlhf
    ppo_rlhf.main(["--preset", "debug", "--device", "cpu", "--sft_ckpt", os.path.join(tiny_pipeline, "sft.pt"),
                   "--rm_ckpt", os.path.join(tiny_pipeline, "rm.pt"), "--out_dir", str(tmp_path / "debug")])
    out = capsys.readouterr().out
    assert "PPO done" in out and "WARNING" not in out, out[-2000:]
