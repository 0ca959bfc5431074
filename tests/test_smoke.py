import os
import re
import subprocess
import sys

import pytest
import torch

import tokenizer as tok
from runs import load_checkpoint, read_jsonl
from model import GPT, GPTConfig, ScalarHeadGPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    """Run a repo script in a subprocess on CPU; fail with its output if it fails."""
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.parametrize("script", ["train_sft.py", "reward_model.py", "ppo_rlhf.py", "-m studies.evaluate", "pipeline.py",
                                    "-m algorithms.rloo", "-m algorithms.dpo", "-m algorithms.raft", "-m algorithms.alol", "-m algorithms.grpo",
                                    "-m studies.compare", "-m studies.experiments", "-m studies.bench"])
def test_help(script):
    """Every stage script answers --help with its options, each option's default shown once, and right."""
    out = run(*script.split(), "--help")
    assert out.startswith("usage")
    if script != "-m studies.bench":                                   # the benchmark writes no run folder
        assert "--device" in out and "--out_dir" in out
    options = re.split(r"\n  (?=-)", out.split("options:")[1])            # one block per option
    assert all(block.count("(default:") <= 1 for block in options), [b for b in options if b.count("(default:") > 1]
    assert "(default: None)" not in out
    if script == "ppo_rlhf.py":
        n_iters = next(b for b in options if b.startswith("--n_iters"))
        assert " ".join(n_iters.split()).endswith("(default: 150)")


def test_pipeline_tiny_chained_through_checkpoints(tmp_path):
    """SFT -> RM with the tiny preset on CPU: every file is written and each checkpoint describes itself."""
    out = str(tmp_path)
    run("train_sft.py", "--preset", "tiny", "--device", "cpu", "--out_dir", out)
    run("reward_model.py", "--preset", "tiny", "--device", "cpu", "--out_dir", out, "--sft_ckpt", f"{out}/sft.pt")
    for f in ["sft.pt", "sft_log.jsonl", "sft_loss.png", "rm.pt", "rm_log.jsonl", "rm_loss.png"]:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    enc = tok.get_tokenizer("toy")
    sft = load_checkpoint(f"{out}/sft.pt", "sft", tok.tokenizer_id(enc))
    rm = load_checkpoint(f"{out}/rm.pt", "rm", tok.tokenizer_id(enc))
    GPT(GPTConfig(**sft["model_config"])).load_state_dict(sft["model"])
    ScalarHeadGPT(GPTConfig(**rm["model_config"])).load_state_dict(rm["model"])
    assert sft["step"] == 30 and {"gold_sft", "gold_demos", "val_loss"} <= set(sft["metrics"])
    assert {"acc_gold", "acc_labels", "spearman", "pearson"} <= set(rm["metrics"])
    assert torch.isfinite(torch.tensor(sft["metrics"]["val_loss"]))
    log = read_jsonl(f"{out}/rm_log.jsonl")
    assert any("train_loss" in r for r in log) and any("test_acc_gold" in r for r in log)
    with pytest.raises(ValueError, match="expected 'sft'"):  # the wrong stage's checkpoint is refused
        load_checkpoint(f"{out}/rm.pt", "sft")
    with pytest.raises(ValueError, match="made with tokenizer toy-"):  # ... and one from another tokenizer
        load_checkpoint(f"{out}/sft.pt", "sft", tokenizer_id="gpt2-50258-000000000000")


def test_pipeline_script_tiny_is_deterministic(tmp_path):
    """pipeline.py (the README's main command) runs end to end; two runs with one seed give identical weights and metrics."""
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert "pipeline done" in run("pipeline.py", "--preset", "tiny", "--device", "cpu", "--out_dir", str(out))
    for f in ["ppo.pt", "ppo_log.jsonl", "ppo_curves.png", "eval.md", "eval_reward_kl.png"]:
        assert os.path.getsize(a / f) > 0, f
    for stage, name in (("sft", "sft.pt"), ("rm", "rm.pt"), ("ppo", "ppo.pt")):
        ca, cb = load_checkpoint(str(a / name), stage), load_checkpoint(str(b / name), stage)
        assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
        assert {k: v for k, v in ca["metrics"].items() if k != "train_time_s"} == \
               {k: v for k, v in cb["metrics"].items() if k != "train_time_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("t_") and not k.endswith("time") and not k.endswith("time_s")}
                          for r in rows]
    for log in ("sft_log.jsonl", "rm_log.jsonl", "ppo_log.jsonl"):
        assert strip(read_jsonl(str(a / log))) == strip(read_jsonl(str(b / log))), log
    evals = [[{k: v for k, v in r.items() if k != "policy"} for r in read_jsonl(str(d / "eval.jsonl"))] for d in (a, b)]
    assert evals[0] == evals[1] and len(evals[0]) == 2


def test_pipeline_passes_ppo_options_through_and_refuses_a_typo_before_sft(tmp_path, capsys):
    """`pipeline.py --kl_coef 0.5` reaches the PPO stage; an option neither the pipeline nor PPO has is refused
    before SFT starts (nothing is written)."""
    import pipeline
    with pytest.raises(ValueError, match="passes every option it does not know to ppo_rlhf.py"):
        pipeline.main(["--preset", "tiny", "--device", "cpu", "--out_dir", str(tmp_path / "typo"), "--kl_cof", "1"])
    assert not (tmp_path / "typo" / "sft.pt").exists()
    with pytest.raises(ValueError, match="--seed: the pipeline sets it"):
        pipeline.check_ppo_options(pipeline_args(), ["--seed", "3"])
    pipeline.main(["--preset", "tiny", "--device", "cpu", "--out_dir", str(tmp_path / "kl"), "--kl_coef", "0.5",
                   "--n_iters", "3"])
    config = load_checkpoint(str(tmp_path / "kl" / "ppo.pt"), "ppo")["config"]
    assert (config["kl_coef"], config["n_iters"], config["rollout_batch"]) == (0.5, 3, 8)   # tiny's batch kept
    assert "--preset tiny is a smoke test" in capsys.readouterr().out


def pipeline_args():
    import argparse
    return argparse.Namespace(ppo_preset="ppo_max", preset="tiny")


@pytest.mark.parametrize("script", ["-m tokenizer", "data.py"])
def test_help_of_the_helper_scripts_changes_nothing(script):
    """`--help` prints usage and exits; `python -m tokenizer --help` no longer retrains (and rewrites) the shipped ranks file."""
    ranks = os.path.join(ROOT, "tokenizer", "toy.tiktoken")
    before = (os.path.getmtime(ranks), open(ranks, "rb").read())
    assert run(*script.split(), "--help").startswith("usage")
    assert (os.path.getmtime(ranks), open(ranks, "rb").read()) == before
