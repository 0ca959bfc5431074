"""--resume continues every stage exactly (weights, metrics and log equal to an unbroken run's), and the pipeline
continues from the stage it was in; --stop_after stands in for a kill."""
import json
import os
import shutil

import pytest
import torch

import pipeline
import ppo_rlhf
import reward_model
import train_sft
from algorithms import alol, dpo, grpo, raft, reinforce, rloo
from runs import load_checkpoint, read_jsonl

TINY = ["--preset", "tiny", "--device", "cpu"]
GRPO_TINY = ["--n_iters", "3", "--prompts_per_iter", "4", "--samples_per_prompt", "2", "--max_new_tokens", "12",
             "--eval_interval", "2", "--n_eval_prompts", "8"]      # the tiny sizes, after another preset


def _same_run(a, b, stage, log):
    """Weights, metrics and log lines equal (wall-clock fields aside)."""
    ca, cb = load_checkpoint(f"{a}/{stage}.pt", stage), load_checkpoint(f"{b}/{stage}.pt", stage)
    for key in ("model", "critic", "value_head"):
        for k in ca.get(key, {}):
            assert torch.allclose(ca[key][k], cb[key][k], atol=1e-6), (key, k)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("t_") and not k.endswith(("time", "time_s"))}
    assert strip(ca["metrics"]) == strip(cb["metrics"])
    assert [strip(r) for r in read_jsonl(f"{a}/{log}")] == [strip(r) for r in read_jsonl(f"{b}/{log}")]


def test_sft_resume_is_exact(base, tmp_path):
    """SFT stopped after a checkpoint and resumed ends with the weights, metrics and log of the unbroken run."""
    out = str(tmp_path)
    args = TINY + ["--out_dir", out, "--ckpt_interval", "10"]
    assert train_sft.main(args + ["--stop_after", "10"]) is None  # the data order is reshuffled at step 16
    assert not load_checkpoint(f"{out}/sft.pt", "sft", finished=False)["done"]
    with pytest.raises(ValueError, match="interrupted 'sft' run"):  # the next stage refuses it
        load_checkpoint(f"{out}/sft.pt", "sft")
    train_sft.main(args + ["--resume", "true"])
    _same_run(base, out, "sft", "sft_log.jsonl")


def test_rm_resume_is_exact(base, tmp_path):
    """The reward model stopped after a checkpoint and resumed matches the unbroken run."""
    out = str(tmp_path)
    args = TINY + ["--out_dir", out, "--sft_ckpt", f"{base}/sft.pt", "--ckpt_interval", "4"]
    assert reward_model.main(args + ["--stop_after", "4"]) is None
    reward_model.main(args + ["--resume", "true"])
    _same_run(base, out, "rm", "rm_log.jsonl")


def test_rm_resume_is_exact_with_dropout(tmp_path):
    """An RM trained from a dropout-0.1 SFT draws dropout masks from torch's global RNG: its checkpoint saves that
    state, so a resumed run still matches the unbroken one (before: weights off by ~4e-3)."""
    sft_out, full, cut = (str(tmp_path / d) for d in ("sft", "full", "cut"))
    train_sft.main(TINY + ["--out_dir", sft_out, "--dropout", "0.1"])
    args = TINY + ["--sft_ckpt", f"{sft_out}/sft.pt", "--ckpt_interval", "4"]
    reward_model.main(args + ["--out_dir", full])
    assert reward_model.main(args + ["--out_dir", cut, "--stop_after", "4"]) is None
    reward_model.main(args + ["--out_dir", cut, "--resume", "true"])
    _same_run(full, cut, "rm", "rm_log.jsonl")


def test_ppo_resume_is_exact(base, tmp_path):
    """PPO stopped after a checkpoint and resumed (optimizer, running score stats, RNG) matches the unbroken run."""
    out = str(tmp_path)
    args = TINY + ["--out_dir", out, "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt", "--ckpt_interval", "2"]
    assert ppo_rlhf.main(args + ["--stop_after", "2"]) is None
    ppo_rlhf.main(args + ["--resume", "true"])
    _same_run(base, out, "ppo", "ppo_log.jsonl")


def test_resume_compares_input_contents_not_paths(base, tmp_path, monkeypatch):
    """A PPO run resumed through other spellings of the same input paths (relative, from another working
    directory, with the output folder moved) continues exactly; a retrained rm.pt at the same path is refused."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for f in ("sft.pt", "rm.pt"):
        shutil.copy(f"{base}/{f}", inputs / f)
    first = tmp_path / "first"
    args = TINY + ["--ckpt_interval", "2"]
    ppo_rlhf.main(args + ["--out_dir", str(first), "--sft_ckpt", str(inputs / "sft.pt"), "--rm_ckpt",
                          str(inputs / "rm.pt"), "--stop_after", "2"])
    moved = tmp_path / "moved"
    shutil.move(str(first), str(moved))
    monkeypatch.chdir(inputs)                                             # relative paths, another directory
    ppo_rlhf.main(args + ["--out_dir", str(moved), "--sft_ckpt", "sft.pt", "--rm_ckpt", "./rm.pt", "--resume", "true"])
    _same_run(base, str(moved), "ppo", "ppo_log.jsonl")
    again = tmp_path / "again"
    ppo_rlhf.main(args + ["--out_dir", str(again), "--sft_ckpt", "sft.pt", "--rm_ckpt", "rm.pt", "--stop_after", "2"])
    reward_model.main(TINY + ["--out_dir", str(tmp_path / "rm2"), "--sft_ckpt", "sft.pt", "--seed", "1"])
    shutil.copy(tmp_path / "rm2" / "rm.pt", inputs / "rm.pt")             # retrained: same path, other contents
    with pytest.raises(ValueError, match=r"needs the inputs the run started with, but --rm_ckpt rm.pt is not the same"):
        ppo_rlhf.main(args + ["--out_dir", str(again), "--sft_ckpt", "sft.pt", "--rm_ckpt", "rm.pt", "--resume", "true"])


def test_resume_refuses_another_config(base, tmp_path):
    """--resume with a changed config, or of a finished run, is a clear error."""
    out = str(tmp_path)
    args = TINY + ["--out_dir", out, "--ckpt_interval", "10"]
    train_sft.main(args + ["--stop_after", "10"])
    with pytest.raises(ValueError, match=r"but it was made with lr=0.002 \(now 0.1\); give the same options"):
        train_sft.main(args + ["--resume", "true", "--lr", "0.1"])
    with pytest.raises(ValueError, match="already finished"):
        train_sft.main(TINY + ["--out_dir", base, "--resume", "true"])




def _strict_json(path):
    """Every line of a JSONL file parses as strict JSON (no bare NaN or Infinity)."""
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


@pytest.mark.parametrize("module, stage, extra, interval, stop", [
    (rloo, "rloo", [], 2, 2),
    (rloo, "rloo", ["--baseline", "moving_avg", "--samples_per_prompt", "1"], 1, 2),   # the baseline's running mean is resumed too
    (raft, "raft", [], 2, 2),
    (reinforce, "reinforce", [], 2, 2),                                 # docs/adding_an_algorithm.md's example
    (dpo, "dpo", [], 4, 5),                                             # stopped 1 step after its checkpoint
    (alol, "alol", [], 2, 3),
    (grpo, "grpo", ["--preset", "dapo", "--overlong_cache", "4"] + GRPO_TINY, 1, 2),
    (grpo, "grpo", ["--preset", "dapo", "--reward", "gold", "--overlong_cache", "4"] + GRPO_TINY, 1, 2),  # groups dropped and refilled
])
def test_every_algorithm_resumes_exactly(base, tmp_path, module, stage, extra, interval, stop):
    """RLOO, REINFORCE, RAFT, DPO and A-LoL stopped after a checkpoint and resumed end like the unbroken run; their
    logs are strict JSON (RLOO's baseline, which does not exist for loo, is null rather than NaN)."""
    args = TINY + ["--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt", "--ckpt_interval", str(interval)] + extra
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    module.main(args + ["--out_dir", full])
    assert module.main(args + ["--out_dir", cut, "--stop_after", str(stop)]) is None
    assert load_checkpoint(f"{cut}/{stage}.pt", stage, finished=False)["step"] == stop // interval * interval
    module.main(args + ["--out_dir", cut, "--resume", "true"])
    _same_run(full, cut, stage, f"{stage}_log.jsonl")
    assert _strict_json(f"{cut}/{stage}_log.jsonl")
    assert os.path.exists(f"{cut}/{stage}_curves.png")


def test_pipeline_resume_continues_from_the_stage_it_was_in(tiny_pipeline, tmp_path, capsys):
    """A pipeline killed during PPO (here: --stop_after) continues with --resume true: SFT and RM are kept, PPO
    resumes from its checkpoint, and everything ends as in the unbroken pipeline; a second --resume keeps all."""
    out = str(tmp_path)
    common = ["--out_dir", out, "--device", "cpu", "--seed", "0", "--overwrite", "False", "--preset", "tiny"]
    train_sft.main(common)
    reward_model.main(common + ["--sft_ckpt", f"{out}/sft.pt"])
    ppo_rlhf.main(common + ["--sft_ckpt", f"{out}/sft.pt", "--rm_ckpt", f"{out}/rm.pt", "--ckpt_interval", "2",
                            "--stop_after", "3"])
    capsys.readouterr()
    pipeline.main(["--preset", "tiny", "--device", "cpu", "--out_dir", out, "--resume", "true"])
    printed = capsys.readouterr().out
    assert f"{out}/sft.pt: finished with these options; kept" in printed
    assert f"{out}/rm.pt: finished with these options; kept" in printed
    assert f"resuming from {out}/ppo.pt after step 2" in printed
    for stage in ("sft", "rm", "ppo"):
        _same_run(tiny_pipeline, out, stage, f"{stage}_log.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "policy"} for r in rows]
    assert strip(read_jsonl(f"{out}/eval.jsonl")) == strip(read_jsonl(f"{tiny_pipeline}/eval.jsonl"))
    pipeline.main(["--preset", "tiny", "--device", "cpu", "--out_dir", out, "--resume", "true"])
    assert capsys.readouterr().out.count("finished with these options; kept") == 3
    with pytest.raises(ValueError, match=r"sft.pt: --resume continues the run saved here, but it was made with "
                                         r"seed=0 \(now 1\)"):                  # kept only with the same options
        pipeline.main(["--preset", "tiny", "--device", "cpu", "--out_dir", out, "--resume", "true", "--seed", "1"])


def test_stop_before_the_first_checkpoint_says_there_is_nothing_to_resume(base, tmp_path, capsys):
    """--stop_after before any checkpoint was written says so (a --resume would find nothing); a --stop_after at or
    past the end of the run is refused before any work."""
    out = str(tmp_path)
    assert train_sft.main(TINY + ["--out_dir", out, "--stop_after", "5"]) is None
    assert "nothing was saved, so there is nothing to resume" in capsys.readouterr().out
    assert not os.path.exists(f"{out}/sft.pt")
    ppo_args = TINY + ["--out_dir", out, "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt"]
    assert ppo_rlhf.main(ppo_args + ["--stop_after", "1", "--ckpt_interval", "2"]) is None
    assert "stopping after iteration 1 as asked (--stop_after), before the first checkpoint" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--stop_after 4: must be less than the run's length"):
        ppo_rlhf.main(ppo_args + ["--stop_after", "4"])
    with pytest.raises(ValueError, match="--stop_after 8: must be less than the run's 8 steps"):
        reward_model.main(TINY + ["--out_dir", out, "--sft_ckpt", f"{base}/sft.pt", "--stop_after", "8"])


def test_a_kill_before_the_final_checkpoint_still_gets_its_plot(base, tmp_path, monkeypatch):
    """The final checkpoint is written last: killed while plotting, the run is still unfinished, and --resume
    redoes the end (plot included) to the same result."""
    out = str(tmp_path)
    args = TINY + ["--out_dir", out, "--ckpt_interval", "10"]

    def killed(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(train_sft, "plot_curves", killed)
        with pytest.raises(KeyboardInterrupt):
            train_sft.main(args)
    assert not load_checkpoint(f"{out}/sft.pt", "sft", finished=False)["done"]
    train_sft.main(args + ["--resume", "true"])
    assert os.path.getsize(f"{out}/sft_loss.png") > 0
    _same_run(base, out, "sft", "sft_log.jsonl")


def test_resume_with_no_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    with pytest.raises(ValueError, match=r"sft.pt: nothing to resume \(no checkpoint here"):
        train_sft.main(TINY + ["--out_dir", str(tmp_path), "--resume", "true"])
