import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch

from runs import load_checkpoint, load_weights, read_jsonl, run_main
from tokenizer import TRUNCATIONS, fit_prompt
from studies import evaluate
import model
import ppo_rlhf
import reward_model
import train_sft
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--device", "cpu"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    """A huge learning rate makes the loss nan: the run stops naming the step and the quantity; sft.pt stays good."""
    out = str(tmp_path)
    train_sft.main(TINY + ["--out_dir", out])
    before = open(f"{out}/sft.pt", "rb").read()
    with pytest.raises(FloatingPointError, match=r"SFT step \d+: (train_loss|grad_norm) is (nan|inf)"):
        train_sft.main(TINY + ["--out_dir", out, "--lr", "1e9", "--grad_clip", "0"])
    assert open(f"{out}/sft.pt", "rb").read() == before


def test_poisoned_reward_stops_ppo(base, tmp_path, monkeypatch):
    """A nan reward-model score stops PPO at iteration 1, naming the quantity, before any update."""
    monkeypatch.setattr(model.ScalarHeadGPT, "score", lambda self, idx, mask: torch.full((idx.shape[0],), float("nan")))
    with pytest.raises(FloatingPointError, match="PPO iteration 1: rm_score is nan"):
        ppo_rlhf.main(TINY + ["--out_dir", str(tmp_path), "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt"])
    assert not os.path.exists(tmp_path / "ppo.pt")


def _error_line(capsys, main, argv):
    """Run a stage's main as its __main__ does; return the one line it printed, checking exit code 2."""
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    return err


def test_bad_inputs_give_one_line_errors(base, tmp_path, capsys):
    """Wrong or missing files, wrong stage, corrupt checkpoints, bad switch values and batch arithmetic: one clear line."""
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    ppo_args = TINY + ["--out_dir", str(tmp_path), "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt"]
    rm_args = TINY + ["--out_dir", str(tmp_path)]
    cases = [
        (reward_model.main, rm_args + ["--sft_ckpt", str(tmp_path / "nope.pt")], "nope.pt: checkpoint not found"),
        (reward_model.main, rm_args + ["--sft_ckpt", f"{base}/rm.pt"], "is a 'rm' checkpoint; expected 'sft'"),
        (reward_model.main, rm_args + ["--sft_ckpt", str(junk)], "junk.pt: cannot be read as a checkpoint"),
        (ppo_rlhf.main, ppo_args + ["--score_norm", "whiten"], "--score_norm 'whiten': must be one of none, scale, norm_clip"),
        (ppo_rlhf.main, ppo_args + ["--critic_init", "random"], "--critic_init 'random': must be one of rm, sft"),
        (ppo_rlhf.main, ppo_args + ["--minibatches", "3"], "--minibatches 3 must divide --rollout_batch 8"),
        (ppo_rlhf.main, ppo_args + ["--max_new_tokens", "500"], "leaves no room for a prompt"),
        (ppo_rlhf.main, ppo_args + ["--rm_ckpt", f"{base}/sft.pt"], "is a 'sft' checkpoint; expected 'rm'"),
    ]
    cases.append((evaluate.main, ["--policies", f"{base}/rm.pt", "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt",
                                  f"{base}/rm.pt", "--device", "cpu"], "rm.pt: is a reward-model checkpoint, not a policy"))
    cases.append((train_sft.main, rm_args + ["--n_train", "8"], "batch_size 16 is larger than the 8 training demonstrations"))
    cases.append((reward_model.main, rm_args + ["--sft_ckpt", f"{base}/sft.pt", "--n_train", "8"],
                  "8 training pairs is less than one step of batch_size x grad_accum = 16"))
    for main, argv, message in cases:
        assert message in _error_line(capsys, main, argv)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    """Run as a script, a missing checkpoint prints one 'error:' line and exits 2 (no traceback)."""
    r = subprocess.run([sys.executable, "ppo_rlhf.py", "--sft_ckpt", str(tmp_path / "missing.pt")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.pt'}: checkpoint not found (run the 'sft' stage first)"]


def test_unknown_preset_and_bad_bool_are_argparse_errors(capsys):
    """argparse rejects an unknown preset and a non-boolean value, naming the option."""
    for argv, message in ((["--preset", "huge"], "invalid choice: 'huge'"), (["--resume", "maybe"], "expected true/false")):
        with pytest.raises(SystemExit):
            train_sft.main(argv)
        assert message in capsys.readouterr().err


def test_long_prompt_truncated_from_the_left_or_refused(capsys):
    """Over-long prompts lose their oldest tokens, counted for one summary line per stage (or one line each with
    --log_truncations), or raise an error naming where, by flag."""
    TRUNCATIONS.reset()
    assert fit_prompt([1, 2, 3, 4, 5], 3, True, "demonstration 7") == [3, 4, 5]
    assert fit_prompt(list(range(9)), 4, True, "demonstration 8") == [5, 6, 7, 8]
    assert capsys.readouterr().err == ""                                  # nothing per prompt by default
    TRUNCATIONS.summary("SFT")
    assert capsys.readouterr().err == ("warning: SFT: 2 prompt(s) truncated from the left to fit the context "
                                       "(longest 9 -> 4 tokens); --log_truncations true lists each\n")
    TRUNCATIONS.reset(each=True)
    fit_prompt([1, 2, 3, 4, 5], 3, True, "demonstration 7")
    assert "demonstration 7: prompt truncated from the left, 5 -> 3 tokens" in capsys.readouterr().err
    TRUNCATIONS.reset()
    TRUNCATIONS.summary("SFT")
    assert capsys.readouterr().err == ""                                  # nothing cut, nothing said
    assert fit_prompt([1, 2], 3, False, "x") == [1, 2]
    with pytest.raises(ValueError, match="demonstration 7: prompt has 5 tokens but only 3 fit"):
        fit_prompt([1, 2, 3, 4, 5], 3, False, "demonstration 7")


def test_model_config_mismatch_is_clear():
    """Loading weights into a model of another shape names the file instead of dumping torch's message."""
    small = model.GPT(model.GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    other = model.GPT(model.GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match="sft.pt: weights do not fit the model config"):
        load_weights(small, other.state_dict(), "sft.pt")


def test_gradient_accumulation_equals_the_big_batch(base, tmp_path):
    """SFT and RM with batch_size 8 x grad_accum 2 take the same optimizer steps as batch_size 16: the same
    examples in the same order, the loss a token-weighted (SFT) or pair-weighted (RM) mean over the whole step."""
    common = ["--preset", "tiny", "--device", "cpu"]
    for module, stage, extra in ((train_sft, "sft", []), (reward_model, "rm", ["--sft_ckpt", f"{base}/sft.pt"])):
        logs = []
        for name, flags in (("big", ["--batch_size", "16"]), ("accum", ["--batch_size", "8", "--grad_accum", "2"])):
            out = tmp_path / f"{stage}_{name}"
            module.main(common + extra + flags + ["--out_dir", str(out)])
            logs.append([r for r in read_jsonl(str(out / f"{stage}_log.jsonl")) if "train_loss" in r])
        assert len(logs[0]) == len(logs[1]) > 0
        # step 1 starts from the same weights: loss and gradient norm equal up to float summation order (Adam
        # then amplifies that rounding noise in near-zero gradients, so later steps are compared loosely)
        for key in ("train_loss", "grad_norm"):
            assert logs[0][0][key] == pytest.approx(logs[1][0][key], rel=1e-5), (stage, key)
        assert [r["train_loss"] for r in logs[0]] == pytest.approx([r["train_loss"] for r in logs[1]], rel=1e-2)


@pytest.mark.parametrize("stage, argv, message", [
    ("reward_model", ["--batch_size", "-4"], "--batch_size -4: must be at least 1"),
    ("reward_model", ["--lr", "0"], "--lr 0.0: must be greater than 0"),
    ("reward_model", ["--warmup_iters", "0"], "--warmup_iters 0: must be at least 1"),
    ("train_sft", ["--dropout", "1.5"], "--dropout 1.5: must be in [0, 1)"),
    ("train_sft", ["--tokenizer", "bert"], "--tokenizer 'bert': must be one of toy, gpt2"),
    ("train_sft", ["--grad_accum", "0"], "--grad_accum 0: must be at least 1"),
    ("train_sft", ["--n_embd", "30", "--n_head", "4"], "--n_embd 30: must be a multiple of --n_head 4 (each head gets n_embd / n_head dimensions)"),
    ("train_sft", ["--stop_after", "1500"], "--stop_after 1500: must be less than the run's length (1500), or 0 for off"),
    ("ppo_rlhf", ["--policy_lr", "-1"], "--policy_lr -1.0: must be greater than 0"),
    ("ppo_rlhf", ["--kl_coef", "-0.1"], "--kl_coef -0.1: must be 0 or more"),
    ("ppo_rlhf", ["--gamma", "1.5"], "--gamma 1.5: must be in [0, 1]"),
    ("ppo_rlhf", ["--lam", "-0.5"], "--lam -0.5: must be in [0, 1]"),
    ("ppo_rlhf", ["--temperature", "0"], "--temperature 0.0: must be greater than 0"),
    ("ppo_rlhf", ["--ratio_clip", "1.5"], "--ratio_clip 1.5: must be in (0, 1)"),
    ("ppo_rlhf", ["--epochs", "0"], "--epochs 0: must be at least 1"),
    ("ppo_rlhf", ["--device", "tpu"], "--device 'tpu': must be auto, cpu, cuda, cuda:N or mps"),
    ("algorithms.rloo", ["--samples_per_prompt", "0"], "--samples_per_prompt 0: must be at least 1"),
    ("algorithms.rloo", ["--baseline", "mean"], "--baseline 'mean': must be one of loo, moving_avg, none"),
    ("algorithms.raft", ["--rank_by", "gold"], "--rank_by 'gold': must be one of R, score"),
    ("algorithms.dpo", ["--beta", "0"], "--beta 0.0: must be greater than 0"),
    ("algorithms.dpo", ["--label_smoothing", "0.7"], "--label_smoothing 0.7: must be in [0, 0.5)"),
    ("algorithms.alol", ["--variant", "best"], "--variant 'best': must be one of alol, ref_free, seq, kl"),
    ("algorithms.alol", ["--ratio_clip", "1.2"], "--ratio_clip 1.2: must be in (0, 1)"),
])
def test_option_values_are_checked_before_any_work(stage, argv, message, tmp_path, capsys):
    """A value that cannot work is one 'error:' line before anything is read or written (the checkpoints named
    by default do not even exist here)."""
    import importlib
    out = tmp_path / "out"
    main = importlib.import_module(stage).main
    none = str(tmp_path / "none.pt")
    inputs = {"train_sft": [], "reward_model": ["--sft_ckpt", none]}.get(stage, ["--sft_ckpt", none, "--rm_ckpt", none])
    argv = argv + inputs + ["--out_dir", str(out)]
    assert _error_line(capsys, main, argv) == f"error: {message}"
    assert not out.exists()


def test_one_run_per_output_folder(base, tmp_path, capsys):
    """A folder held by a live run (its flock on out_dir/.lock) refuses a second run with one line naming the
    holder's PID; once the holder is killed (SIGKILL: no clean-up ran) the kernel has dropped its lock and the
    next run takes the folder without a note; a PID of some other live process in the file blocks nothing."""
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from runs import claim_out_dir; "
                               "claim_out_dir(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        message = _error_line(capsys, train_sft.main, TINY + ["--out_dir", str(out)])
        assert message == f"error: {out}: in use by another run (PID {holder.pid}); wait for it to finish, or choose another --out_dir"
        assert not (out / "sft_log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    train_sft.main(TINY + ["--out_dir", str(out)])                        # the holder is gone, and so is its lock
    assert "lock" not in capsys.readouterr().err and os.path.exists(out / "sft.pt")
    (out / ".lock").write_text(str(os.getppid()))                          # a live process that is no run
    train_sft.main(TINY + ["--out_dir", str(out), "--overwrite", "true"])
    assert not runs._HELD                                                  # every claim was given back


def test_a_new_run_does_not_replace_an_unfinished_one(tmp_path, capsys):
    """Without --resume, a run over an interrupted one is refused (its checkpoint untouched); --overwrite starts over."""
    out = str(tmp_path)
    train_sft.main(TINY + ["--out_dir", out, "--ckpt_interval", "10", "--stop_after", "10"])
    before = open(f"{out}/sft.pt", "rb").read()
    message = _error_line(capsys, train_sft.main, TINY + ["--out_dir", out])
    assert message == (f"error: {out}/sft.pt: an unfinished run is here (step 10); continue it with --resume true, "
                       f"or start over with --overwrite true")
    assert open(f"{out}/sft.pt", "rb").read() == before
    train_sft.main(TINY + ["--out_dir", out, "--overwrite", "true"])
    assert load_checkpoint(f"{out}/sft.pt", "sft")["done"]


def test_ctrl_c_is_one_line_saying_how_to_resume(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        run_main(interrupted)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--resume true" in err and "Traceback" not in err


def test_damaged_weights_that_still_load_are_caught_by_the_checksum(base, tmp_path):
    """8 flipped bytes inside a weight tensor still unpickle; the checksum written with the weights catches them."""
    data = bytearray(open(f"{base}/sft.pt", "rb").read())
    ckpt = load_checkpoint(f"{base}/sft.pt", "sft")
    raw = ckpt["model"]["wte.weight"].contiguous().view(-1).view(torch.uint8).numpy().tobytes()[4096:4160]
    at = bytes(data).find(raw)
    assert at > 0
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    damaged = tmp_path / "sft.pt"
    damaged.write_bytes(bytes(data))
    torch.load(damaged, map_location="cpu", weights_only=True)                   # it still unpickles
    with pytest.raises(ValueError, match="'model' model .its weights, model_config or tokenizer. does not match the checksum"):
        load_checkpoint(str(damaged), "sft")


def test_output_folder_and_disk_problems_are_one_line(base, tmp_path, capsys, monkeypatch):
    """An --out_dir that is a file or cannot be written, and a disk that fills up while a checkpoint is written,
    are one line each; the full disk leaves the previous checkpoint intact and no temporary file behind."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert _error_line(capsys, train_sft.main, TINY + ["--out_dir", str(a_file)]) == \
        f"error: --out_dir {a_file}: is a file, not a folder"
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", path)         # (root may write in a chmod 555 folder)
    with monkeypatch.context() as m:
        m.setattr("builtins.open", read_only)
        assert _error_line(capsys, train_sft.main, TINY + ["--out_dir", str(tmp_path / "ro")]) == \
            f"error: --out_dir {tmp_path / 'ro'}: cannot write there (Read-only file system)"

    out = str(tmp_path / "full")
    args = TINY + ["--out_dir", out, "--ckpt_interval", "10"]
    train_sft.main(args + ["--stop_after", "10"])
    before = open(f"{out}/sft.pt", "rb").read()
    real_save = torch.save

    def disk_fills_up(obj, path):
        real_save(obj, path)                                              # part of the file is written ...
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")                   # ... as torch reports ENOSPC
    monkeypatch.setattr(torch, "save", disk_fills_up)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    message = _error_line(capsys, train_sft.main, args + ["--resume", "true"])
    assert message == (f"error: {out}/sft.pt: cannot write it: no space left on the device; checkpoints written "
                       f"before are intact (once fixed, continue with --resume true)")
    assert open(f"{out}/sft.pt", "rb").read() == before and not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_hand_edited_checkpoints_and_a_damaged_tokenizer_file_are_one_line(base, tmp_path, capsys, monkeypatch):
    """A checkpoint missing a key, or with a model_config this code does not know, and a damaged tokenizer ranks
    file each give one line naming the file (and the line)."""
    ckpt = torch.load(f"{base}/sft.pt", map_location="cpu", weights_only=True)
    edited = tmp_path / "edited.pt"
    torch.save({k: v for k, v in ckpt.items() if k != "model_config"}, edited)
    rm_args = TINY + ["--out_dir", str(tmp_path / "rm"), "--sft_ckpt", str(edited)]
    assert _error_line(capsys, reward_model.main, rm_args) == (
        f"error: {edited}: not a complete 'sft' checkpoint (missing model_config); was it edited by hand or written "
        f"by another program?")
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "n_experts": 8}}, edited)
    assert "model_config has unknown fields ['n_experts']" in _error_line(capsys, reward_model.main, rm_args)

    import tokenizer
    ranks = open(tokenizer.TOY_RANKS).read().splitlines()
    damaged = tmp_path / "toy.tiktoken"
    damaged.write_text("\n".join(ranks[:2] + ["Zm9v"] + ranks[3:]) + "\n")  # line 3 lost its rank
    monkeypatch.setattr(tokenizer, "TOY_RANKS", str(damaged))
    assert _error_line(capsys, train_sft.main, TINY + ["--out_dir", str(tmp_path / "sft")]) == (
        f"error: {damaged}:3: not a 'base64-token rank' line (b'Zm9v\\n'); the tokenizer file is damaged: restore it "
        f"with `git checkout tokenizer/toy.tiktoken`, or retrain it with `python -m tokenizer`")


def test_evaluate_checks_every_policy_and_the_output_folder_before_sampling(base, tmp_path, capsys, monkeypatch):
    """A bad last --policies entry or an --out_dir that is a file is found before any policy is sampled."""
    sampled = []
    monkeypatch.setattr(evaluate, "sample_for_evaluation", lambda *a, **k: sampled.append(1))
    common = ["--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt", "--device", "cpu"]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for argv, message in (
            (["--policies", f"{base}/ppo.pt", str(tmp_path / "typo.pt"), "--out_dir", str(tmp_path)],
             f"error: {tmp_path / 'typo.pt'}: checkpoint not found"),
            (["--policies", f"{base}/ppo.pt", "--out_dir", str(a_file)], f"error: --out_dir {a_file}: is a file, not a folder"),
            (["--policies", f"{base}/ppo.pt", "--n_prompts", "0"], "error: --n_prompts 0: must be at least 1")):
        assert _error_line(capsys, evaluate.main, argv + common) == message
    assert not sampled
