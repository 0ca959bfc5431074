"""
Data parallel under torchrun (2 processes, Gloo on CPU): the same step as one process with the whole global batch,
weights alike on every rank, global score statistics and whitening, and a PPO run that checkpoints and resumes.
What each process runs is in tests/ddp_worker.py.
"""
import os
import shutil
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

import ppo_rlhf
import reward_model
from ppo_rlhf import masked_whiten
import runs
from runs import check_options, load_checkpoint, read_jsonl, run_main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddp_worker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = ("time", "t_generate", "t_score", "t_train", "t_iter", "train_time_s")


TEARDOWN_ABORT = "terminate called without an active exception"   # Gloo's threads at a process's exit


def launch(args, n_ranks=2):
    """Run `args` (a script and its options) under torchrun with n_ranks CPU processes, or plain python for 1.
    A launch in which a process aborts on its way out of Gloo's process group (TEARDOWN_ABORT, seen about once in
    a few dozen loaded launches) runs once more; any other failure fails at once."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_ranks)]
                if n_ranks > 1 else [sys.executable])
    for attempt in range(2):
        r = subprocess.run(launcher + args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode == 0 or TEARDOWN_ABORT not in r.stderr:
            break
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def worker(case, out, *args, n_ranks=2):
    launch([os.path.join(ROOT, "tests", "ddp_worker.py"), case, out, *args], n_ranks)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(n_ranks)]


def assert_same_step(two, one, adam_lr=None):
    """2 ranks: identical gradients before the step on both ranks (DDP averaged them: a forward that bypassed
    the wrapper leaves each rank its own), identical weights after; and both as one process's, to 1e-6.
    adam_lr: Adam's first step is lr·g/(|g| + 1e-8), so a gradient that is 0 but for rounding (the reward model's
    loss ignores a shift of every score: a few of its gradients are) moves by up to lr in either run. Weights whose
    gradient is that small are then held to lr, the rest to 1e-6."""
    rank0, rank1 = two
    for g0, g1 in zip(rank0["grads"], rank1["grads"]):
        assert torch.equal(g0, g1), "gradients differ across ranks before the optimizer step: DDP did not average"
    for w0, w1 in zip(rank0["weights"], rank1["weights"]):
        assert torch.equal(w0, w1)
    for g2, g1 in zip(rank0["grads"], one["grads"]):
        assert torch.allclose(g2, g1, atol=1e-6, rtol=1e-5)
    for w2, w1, g in zip(rank0["weights"], one["weights"], one["grads"]):
        settled = g.abs() > 1e-6 if adam_lr else torch.ones_like(g, dtype=torch.bool)
        assert torch.allclose(w2[settled], w1[settled], atol=1e-6, rtol=0)
        assert adam_lr is None or (w2 - w1).abs().max() <= adam_lr


def without_timings(rows):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def test_sft_and_rm_steps_on_two_ranks_equal_one_process_on_the_global_batch(base, tmp_path):
    """Global batch 8 in 2 micro-batches (grad_accum 2): each of 2 ranks takes 4 rows of each."""
    assert_same_step(worker("sft", str(tmp_path / "sft2")), worker("sft", str(tmp_path / "sft1"), n_ranks=1)[0])
    two, one = (read_jsonl(str(tmp_path / d / "run" / "sft_log.jsonl")) for d in ("sft2", "sft1"))
    assert two[1]["train_loss"] == pytest.approx(one[1]["train_loss"], abs=1e-6)      # the global batch's loss
    assert two[0]["val_loss"] == pytest.approx(one[0]["val_loss"], abs=1e-6)
    assert load_checkpoint(str(tmp_path / "sft2" / "run" / "sft.pt"), "sft")["world_size"] == 2
    sft = f"{base}/sft.pt"
    assert_same_step(worker("rm", str(tmp_path / "rm2"), sft), worker("rm", str(tmp_path / "rm1"), sft, n_ranks=1)[0],
                     adam_lr=reward_model.Config().lr)


def test_token_means_over_unequal_ranks_are_one_mean_over_all_tokens(tmp_path):
    """Ranks holding 3 and 7 tokens, each loss weighted by share_of_global_tokens (what PPO's PTX term now takes,
    like its policy and value losses): the gradient DDP averages is that of one mean over the 10 tokens; the
    plain average of the two ranks' means would not be."""
    two, one = worker("tokens", str(tmp_path / "two")), worker("tokens", str(tmp_path / "one"), n_ranks=1)[0]
    for g0, g1, g in zip(two[0]["grads"], two[1]["grads"], one["grads"]):
        assert torch.equal(g0, g1) and torch.allclose(g0, g, atol=1e-6)


def test_a_ppo_update_on_two_ranks_is_one_update_on_the_global_batch(tmp_path, monkeypatch):
    rank0, rank1 = worker("ppo", str(tmp_path))
    # the running score statistics are those of all 8 scores, on both ranks
    scores = torch.cat([rank0["rollout"]["scores"], rank1["rollout"]["scores"]])    # (8,)
    for r in (rank0, rank1):
        mean, var, count = r["running"]
        assert count == pytest.approx(8) and mean == pytest.approx(scores.mean().item(), abs=1e-6)
        assert var == pytest.approx(scores.var(unbiased=False).item(), abs=1e-6)
    # whitened advantages use the mean and std of both ranks' tokens, not of one rank's
    cat = {k: torch.cat([rank0[k], rank1[k]]) for k in ("values", "advantages", "returns", "whitened")}
    mask = torch.cat([rank0["rollout"]["mask"], rank1["rollout"]["mask"]])
    assert torch.allclose(cat["whitened"], masked_whiten(cat["advantages"], mask), atol=1e-5)
    assert not torch.allclose(rank0["whitened"], masked_whiten(rank0["advantages"], rank0["rollout"]["mask"]), atol=1e-3)
    # one process updating on the 8 rollouts together ends with the same weights
    policy, _, _, critic = ddp_worker.tiny_models()
    ro = runs.Samples(**{f.name: (torch.cat([rank0["rollout"][f.name], rank1["rollout"][f.name]])
                                  if isinstance(rank0["rollout"][f.name], torch.Tensor) else rank0["rollout"][f.name])
                         for f in fields(runs.Samples)})
    opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": ddp_worker.PPO_CFG.policy_lr},
                             {"params": critic.parameters(), "lr": ddp_worker.PPO_CFG.critic_lr}], weight_decay=0.0)
    seen = ddp_worker.record_gradients(monkeypatch)
    ppo_rlhf.ppo_update(policy, critic, opt, ro, cat["values"], cat["advantages"], cat["returns"], ddp_worker.PPO_CFG, True,
                        torch.Generator().manual_seed(0))
    one = dict(grads=seen["grads"], weights=[p.detach() for p in seen["params"]])
    assert_same_step([rank0, rank1], one, adam_lr=ddp_worker.PPO_CFG.policy_lr)


def test_tiny_ppo_under_torchrun_writes_one_checkpoint_and_log_and_resumes(base, tmp_path):
    args = ["ppo_rlhf.py", "--preset", "tiny", "--device", "cpu", "--sft_ckpt", f"{base}/sft.pt",
            "--rm_ckpt", f"{base}/rm.pt", "--ckpt_interval", "2"]
    cut, whole = str(tmp_path / "cut"), str(tmp_path / "whole")
    launch(args + ["--out_dir", cut, "--stop_after", "2"])
    assert sorted(os.listdir(cut)) == [".lock", "ppo.pt", "ppo_log.jsonl", "ppo_samples.jsonl"]   # rank 0 alone wrote
    ckpt = load_checkpoint(f"{cut}/ppo.pt", "ppo", finished=False)
    assert (ckpt["step"], ckpt["world_size"], len(ckpt["rng_of_ranks"])) == (2, 2, 2)
    assert [row["iter"] for row in read_jsonl(f"{cut}/ppo_log.jsonl")] == [1, 2]
    shutil.copytree(cut, str(tmp_path / "copy"))
    launch(args + ["--out_dir", cut, "--resume", "true"])
    launch(args + ["--out_dir", whole])
    resumed, unbroken = (read_jsonl(f"{d}/ppo_log.jsonl") for d in (cut, whole))
    assert [row["iter"] for row in resumed] == [1, 2, 3, 4]
    assert without_timings(resumed) == without_timings(unbroken)
    assert len(resumed[0]["scores_raw"]) == 8                                  # both ranks' 4 rollouts
    # resuming a 2-process run in one process is refused in one line
    with pytest.raises(SystemExit) as e:
        run_main(lambda: ppo_rlhf.main(args[1:] + ["--out_dir", str(tmp_path / "copy"), "--resume", "true"]))
    assert e.value.code == 2


def test_a_global_batch_must_split_evenly_over_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="--rollout_batch 64: must be a multiple of the 3 processes"):
        check_options(ppo_rlhf.Config())


def test_grpo_under_torchrun_splits_the_prompts_and_refuses_dynamic_sampling(base, tmp_path):
    args = ["-m", "algorithms.grpo", "--preset", "tiny", "--device", "cpu", "--sft_ckpt", f"{base}/sft.pt",
            "--rm_ckpt", f"{base}/rm.pt"]
    launch(args + ["--out_dir", str(tmp_path / "grpo")])
    rows = read_jsonl(str(tmp_path / "grpo" / "grpo_log.jsonl"))
    assert [row["groups"] for row in rows] == [4, 4, 4]                        # 2 prompts' groups on each rank
    assert load_checkpoint(str(tmp_path / "grpo" / "grpo.pt"), "grpo")["metrics"]["responses_generated"] == 3 * 8
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
                        "--preset", "dapo", "--out_dir", str(tmp_path / "dapo")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "error: --dynamic_sampling: not under torchrun" in r.stderr


def test_stages_that_do_not_run_data_parallel_refuse_torchrun(base, tmp_path, monkeypatch):
    from algorithms import rloo
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="this stage runs in one process; under torchrun it would run 2 copies"):
        rloo.main(["--preset", "tiny", "--device", "cpu", "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt",
                   f"{base}/rm.pt", "--out_dir", str(tmp_path)])
