"""
Boilerplate every stage shares and nothing algorithmic: the dataclass <-> argparse bridge, seeding,
checkpoints, the JSONL log, a progress line with ETA, a loss plot and a plain-text table.
(The RLHF logic lives in the stage files; read those first.)
"""
import argparse
import atexit
import contextlib
import copy
import dataclasses
import errno
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from typing import Optional

import numpy as np
import torch

from model import GPT, GPTConfig, ScalarHeadGPT


# ---------------------------------------------------------------------------------------------- config

def str2bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


# What an option's value must be, by name: one table for every stage's Config, checked by parse_config before any
# work. A field not named here has no range (paths, seeds, booleans; file contents are checked where they load).
AT_LEAST_1 = ("n_layer", "n_head", "n_embd", "block_size", "n_train", "n_val", "n_test", "batch_size",
              "grad_accum", "eval_interval", "n_eval_prompts", "max_new_tokens", "ckpt_interval", "n_iters",
              "rollout_batch", "minibatch", "ppo_epochs", "ptx_batch", "collapse_window", "prompts_per_iter", "k",
              "minibatches", "epochs", "value_epochs", "warmup_iters", "n_prompts", "max_sample_rounds")
AT_LEAST_0 = ("max_iters", "weight_decay", "grad_clip", "kl_coef", "missing_eos_penalty", "entropy_coef",
              "ptx_coef", "vf_coef", "vf_clip", "adv_clip", "critic_pretrain_iters", "stop_after", "micro_batch",
              "clip_high", "overlong_cache")
ABOVE_0 = ("lr", "policy_lr", "critic_lr", "value_lr", "temperature", "tau", "beta", "score_clip")
RANGES = {"dropout": (lambda v: 0 <= v < 1, "in [0, 1)"), "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
          "gamma": (lambda v: 0 <= v <= 1, "in [0, 1]"), "lam": (lambda v: 0 <= v <= 1, "in [0, 1]"),
          "clip_eps": (lambda v: 0 < v < 1, "in (0, 1)"), "clip_low": (lambda v: 0 <= v < 1, "in [0, 1)"),
          "group_size": (lambda v: v >= 2, "at least 2 (the baseline is the group's mean)")}
CHOICES = {"score_norm": ("none", "scale", "norm_clip"), "critic_init": ("rm", "sft"), "baseline": ("loo", "moving_avg", "none"),
           "rank_by": ("R", "score"), "variant": ("alol", "ref_free", "seq", "kl"), "tokenizer": ("toy", "gpt2"),
           "reward": ("rm", "verifier", "gold"), "scale": ("group", "batch", "none"), "ratio_level": ("token", "sequence"),
           "loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")}


def check_options(cfg):
    """One-line ValueError for the first option whose value cannot work, named as on the command line (cfg: a
    Config dataclass, or an argparse namespace)."""
    for name, value in (dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else vars(cfg)).items():
        wrong = ((name in AT_LEAST_1 and value < 1 and "at least 1") or (name in AT_LEAST_0 and value < 0 and "0 or more")
                 or (name in ABOVE_0 and value <= 0 and "greater than 0")
                 or (name in RANGES and not RANGES[name][0](value) and RANGES[name][1])
                 or (name in CHOICES and value not in CHOICES[name] and "one of " + ", ".join(CHOICES[name])))
        if wrong:
            raise ValueError(f"--{name} {value!r}: must be {wrong}")
    if getattr(cfg, "n_embd", 0) % getattr(cfg, "n_head", 1):
        raise ValueError(f"--n_embd {cfg.n_embd}: must be a multiple of --n_head {cfg.n_head} (each head gets n_embd / "
                         f"n_head dimensions)")
    length = getattr(cfg, "n_iters", None) or getattr(cfg, "max_iters", None)
    if getattr(cfg, "stop_after", 0) and length and cfg.stop_after >= length:
        raise ValueError(f"--stop_after {cfg.stop_after}: must be less than the run's length ({length}), or 0 for off")
    if getattr(cfg, "device", "auto") not in ("auto", "cpu", "mps") and not str(cfg.device).startswith("cuda"):
        raise ValueError(f"--device {cfg.device!r}: must be auto, cpu, cuda, cuda:N or mps")


def parse_config(cls, presets, argv=None, description=None):
    """
    Build a `cls` dataclass from the command line: defaults, then each `--preset NAME` in the order given (dicts
    from `presets`; `--preset dapo --preset tiny` is DAPO at the tiny sizes), then every explicit `--field value`,
    checked by check_options before the stage does any work. Each field's help text is its `metadata["help"]`.
    """
    # plain HelpFormatter: the default shown is the dataclass field's (argparse's own default is None, meaning
    # "not given on the command line", so ArgumentDefaultsHelpFormatter would print a second, wrong one)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=sorted(presets), action="append", default=None,
                   help="a named set of overrides, applied before the explicit options; repeat to combine, later "
                        "ones winning (default: none)")
    for f in dataclasses.fields(cls):
        typ = str2bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(f.type, f.type)
        p.add_argument(f"--{f.name}", type=typ, default=None, help=f"{f.metadata.get('help', '')} (default: {f.default})")
    args = p.parse_args(argv)
    cfg = cls(**{k: v for name in args.preset or () for k, v in presets[name].items()})
    overrides = {k: v for k, v in vars(args).items() if k != "preset" and v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    check_options(cfg)
    return cfg


def field(default, help):
    """A dataclass field with its help text (shown by --help)."""
    return dataclasses.field(default=default, metadata={"help": help})


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, **ckpt):
    """Write atomically: to a temporary file of this process first, then rename (a kill mid-save leaves the old
    file intact; two writers never share a temporary file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt["weights_sha256"] = {key: weights_sha256(ckpt[key]) for key in WEIGHT_KEYS if key in ckpt}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError ("unexpected pos ...")
        reason = write_failure(e, os.path.dirname(os.path.abspath(path)))    # before the partial file goes
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, RuntimeError) and "no space" not in reason and "write" not in str(e):
            raise
        raise OSError(getattr(e, "errno", None) or errno.EIO, "cannot write it: " + reason, path) from None


WEIGHT_KEYS = ("model", "critic")  # the state dicts a checkpoint's checksum covers


def write_failure(error, folder):
    """Why a write failed, in a user's terms: a full disk is named as such (torch's own message does not)."""
    full = getattr(error, "errno", None) == errno.ENOSPC
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(folder).free < (1 << 20)
    return "no space left on the device" if full else " ".join(str(getattr(error, "strerror", None) or error).split())


def weights_sha256(state_dict):
    """SHA-256 over a state dict's names and raw tensor bytes: damaged bytes that still unpickle (they load as odd
    numbers or NaN) are caught on load instead of much later as a training failure."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def claim_out_dir(out_dir):
    """Make this process the owner of out_dir while it runs: a lock file holding its PID. A folder held by another
    live process is an error naming it; a lock left by a dead (killed) process is taken over with a note. The same
    process may claim again (pipeline.py runs every stage in one process); release_out_dir, or the process's exit,
    gives the folder back."""
    lock = os.path.join(make_out_dir(out_dir), ".lock")
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    holder = int(f.read().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder == os.getpid():
                return
            if holder and _alive(holder):
                raise ValueError(f"{out_dir}: in use by another run (PID {holder}); wait for it to finish, or choose "
                                 f"another --out_dir")
            print(f"note: {out_dir}: taking over the lock of PID {holder or '?'}, which is not running", file=sys.stderr)
            os.remove(lock)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(release_out_dir, out_dir)  # also when the stage stops on an error (not when killed)
        return


def make_out_dir(out_dir):
    """Create out_dir (with its parents) or say in one line why it cannot hold a run's files; returns it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir {out_dir}: is a file, not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test.{os.getpid()}")      # the file system's own answer
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out_dir {out_dir}: cannot write there ({write_failure(e, out_dir)})") from None
    return out_dir


def release_out_dir(out_dir):
    """Give out_dir back (claim_out_dir): remove its lock when this process holds it."""
    lock = os.path.join(out_dir, ".lock")
    try:
        with open(lock) as f:
            mine = f.read().strip() == str(os.getpid())
        if mine:
            os.remove(lock)
    except OSError:
        pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def check_fresh_start(ckpt_path, cfg):
    """A run without --resume must not silently replace an unfinished one (its checkpoint and log would go):
    refuse, offering --resume true or --overwrite true."""
    if cfg.resume or cfg.overwrite or not os.path.exists(ckpt_path):
        return
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception:
        return  # not ours or damaged: the stage's own loading reports it when it matters
    if isinstance(ckpt, dict) and ckpt.get("done") is False:
        raise ValueError(f"{ckpt_path}: an unfinished run is here (step {ckpt.get('step')}); continue it with "
                         f"--resume true, or start over with --overwrite true")


CHECKPOINT_KEYS = ("model", "model_config", "tokenizer", "tokenizer_id", "step", "config")  # in every stage's


def load_checkpoint(path, stage, tokenizer_id=None, finished=True):
    """Load a checkpoint dict written by `stage` (weights_only: no code runs on load) and check what it is.
    With tokenizer_id=None the checkpoint's own tokenizer is rebuilt and must still have the same identity.
    finished=True refuses the periodic checkpoint of a run that has not finished (use --resume on it).
    stage=None accepts any stage."""
    if not os.path.exists(path):
        first = stage if isinstance(stage, str) or stage is None else stage[0]
        raise FileNotFoundError(f"{path}: checkpoint not found" + (f" (run the '{first}' stage first)" if first else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, another program's pickle, a text file...
        raise ValueError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}); is it truncated or not "
                         f"written by this project?") from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt:
        raise ValueError(f"{path}: not a checkpoint written by this project (no 'stage' field)")
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    unknown = set(ckpt.get("model_config", {})) - {f.name for f in dataclasses.fields(GPTConfig)}
    if missing or unknown or not isinstance(ckpt["model"], dict):
        what = (f"missing {', '.join(missing)}" if missing else f"unknown model_config fields {sorted(unknown)}"
                if unknown else "'model' is not a set of weights")
        raise ValueError(f"{path}: not a complete '{ckpt['stage']}' checkpoint ({what}); "
                         f"was it edited by hand or written by another program?")
    for key, expected in ckpt.get("weights_sha256", {}).items():
        if key not in ckpt or weights_sha256(ckpt[key]) != expected:
            raise ValueError(f"{path}: the '{key}' weights do not match the checksum written with them: the file "
                             f"was damaged after it was saved; use another copy or train the stage again")
    stages = (stage,) if isinstance(stage, str) else tuple(stage or ())
    if stage is not None and ckpt["stage"] not in stages:
        raise ValueError(f"{path}: is a '{ckpt['stage']}' checkpoint; expected '{' or '.join(stages)}'")
    if finished and not ckpt.get("done", True):
        raise ValueError(f"{path}: is from an interrupted '{ckpt['stage']}' run (step {ckpt['step']}); finish it "
                         f"with --resume true first")
    if tokenizer_id is None:
        import tokenizer
        tokenizer_id = tokenizer.tokenizer_id(tokenizer.get_tokenizer(ckpt["tokenizer"]))
    if ckpt["tokenizer_id"] != tokenizer_id:
        raise ValueError(f"{path}: made with tokenizer {ckpt['tokenizer_id']}, but this run uses {tokenizer_id}")
    return ckpt


def without_dropout(model_config):
    """A checkpoint's model_config -> GPTConfig with dropout 0. Every model after SFT and the RM (policy,
    reference, critic, frozen RM; RL, DPO, A-LoL, evaluation) runs without dropout, whatever the SFT stage
    trained with: dropout in the update's forward would make the first-minibatch ratio != 1 and the critic's
    rollout values differ from the values it is trained against."""
    return GPTConfig(**{**model_config, "dropout": 0.0})


def load_policy(path, stages=None):
    """A finished policy checkpoint -> (GPT without dropout, checkpoint dict); stages=None accepts every stage
    but the RM's."""
    ckpt = load_checkpoint(path, stages)
    if ckpt["stage"] == "rm":
        raise ValueError(f"{path}: is a reward-model checkpoint, not a policy")
    model = GPT(without_dropout(ckpt["model_config"]))
    load_weights(model, ckpt["model"], path)
    return model, ckpt


def load_models(sft_path, rm_path, device):
    """The start of every RL stage: the SFT policy (to train), a frozen copy of it (the reference) and the frozen
    reward model, on `device`; plus both checkpoint dicts. The RM must share the policy's vocabulary."""
    policy, sft = load_policy(sft_path, ("sft",))
    rm_ckpt = load_checkpoint(rm_path, "rm", sft["tokenizer_id"])
    for k in ("vocab_size", "pad_id"):
        if rm_ckpt["model_config"][k] != sft["model_config"][k]:
            raise ValueError(f"{rm_path}: model_config {k}={rm_ckpt['model_config'][k]} but {sft_path} has "
                             f"{sft['model_config'][k]}; the RM must score the policy's tokens")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = ScalarHeadGPT(without_dropout(rm_ckpt["model_config"]))
    load_weights(rm, rm_ckpt["model"], rm_path)
    rm.eval().requires_grad_(False)
    return policy.to(device), ref.to(device), rm.to(device), sft, rm_ckpt


def load_critic(init, sft, rm_ckpt, sft_path, rm_path):
    """The trainable critic (paper §5.3.3), without dropout: a copy of the reward model (init="rm") or the SFT
    backbone with a fresh scalar head (init="sft")."""
    critic = ScalarHeadGPT(without_dropout((rm_ckpt if init == "rm" else sft)["model_config"]))
    if init == "rm":
        load_weights(critic, rm_ckpt["model"], rm_path)
    else:
        load_weights(critic.backbone, sft["model"], sft_path)
    return critic


# may differ between a run and its resumption (out_dir: the folder may have moved)
RESUME_FREE = ("resume", "overwrite", "stop_after", "device", "ckpt_interval", "log_truncations", "out_dir")
INPUT_FIELDS = ("sft_ckpt", "rm_ckpt", "data", "init", "policy_init")  # options that may name input files
_SHA256 = {}  # (real path, size, mtime) -> hex digest: each input file is read once per process


def file_sha256(path):
    """The SHA-256 of a file's contents (cached while the file is unchanged)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def input_fingerprints(cfg):
    """{option: [SHA-256 of each file it names]} for the options that name input files (--data may name several,
    comma-separated). --resume compares these instead of the paths: the same file reached another way (relative
    or absolute, another working directory) is the same input; a retrained checkpoint at the same path is not."""
    out = {}
    for name in INPUT_FIELDS:
        value = getattr(cfg, name, None)
        files = [p.strip() for p in value.split(",")] if isinstance(value, str) else []
        if files and all(os.path.isfile(f) for f in files):
            out[name] = [file_sha256(f) for f in files]
    return out


def check_resume(ckpt, cfg, path):
    """--resume only continues the same run: every config field but RESUME_FREE must match the checkpoint's, and
    every input file must have the contents it had when the run started."""
    if ckpt.get("done", True):  # checkpoints without the flag are finished ones
        raise ValueError(f"{path}: this run already finished (step {ckpt['step']}); nothing to resume")
    check_same_run(ckpt, cfg, path)


def finished_run(path, stage, cfg):
    """pipeline.py --resume: the metrics of a finished `stage` run of exactly `cfg` (same config, same input
    contents) at `path`; None when there is no checkpoint there or an unfinished one (the stage runs or resumes)."""
    if not os.path.exists(path):
        return None
    ckpt = load_checkpoint(path, stage, finished=False)
    if not ckpt.get("done", True):
        return None
    check_same_run(ckpt, cfg, path)
    return ckpt["metrics"]


def check_same_run(ckpt, cfg, path):
    """The checkpoint's run had cfg's config (RESUME_FREE fields aside) and inputs with the same contents."""
    saved, now, started_with = ckpt["config"], dataclasses.asdict(cfg), ckpt.get("inputs") or {}
    diff = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in now.items()
            if k not in RESUME_FREE and k not in started_with and saved.get(k) != v]
    if diff:
        raise ValueError(f"{path}: --resume continues the run saved here, but it was made with " + ", ".join(diff)
                         + "; give the same options, or start over with --overwrite true (without --resume)")
    current = input_fingerprints(cfg)
    changed = [f"--{k} {now[k]}" for k in started_with if current.get(k) != started_with[k]]
    if changed:
        raise ValueError(f"{path}: --resume needs the inputs the run started with, but {', '.join(changed)} is not "
                         f"the same file any more (other contents)")


def load_weights(module, state_dict, path):
    """module.load_state_dict with a one-line error naming the file when shapes or names do not fit."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise ValueError(f"{path}: weights do not fit the model config ({detail})") from None


def rng_state(rng=None, generator=None):
    """Every random state a stage uses (torch's global one always: dropout draws from it), as plain types a
    weights_only checkpoint can hold."""
    state = dict(torch=torch.get_rng_state())
    if rng is not None:
        version, internal, gauss = rng.getstate()
        state["python"] = [version, list(internal), gauss]
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state, rng=None, generator=None):
    torch.set_rng_state(state["torch"])
    if rng is not None:
        version, internal, gauss = state["python"]
        rng.setstate((version, tuple(internal), gauss))
    if generator is not None:
        generator.set_state(state["generator"])


def check_finite(where, **values):
    """Stop the run with a message naming the step and the quantity when a value is nan or inf."""
    for name, v in values.items():
        v = float(v)
        if not math.isfinite(v):
            raise FloatingPointError(f"{where}: {name} is {v}; stopping before it reaches the weights (the last "
                                     f"checkpoint is intact). Lower the learning rate or check the inputs.")


class Truncations:
    """
    Counts the prompts fit_prompt cut, so that a stage prints one summary (truncation_summary) instead of one
    warning per prompt: a real HH-RLHF file makes thousands. `each=True` (a stage's --log_truncations) also
    prints one line per cut prompt. A prompt cut twice (PPO draws prompts again) counts twice.
    """

    def __init__(self):
        self.reset()

    def reset(self, each=False):
        """Start counting from zero (a stage calls this first, with its --log_truncations)."""
        self.each, self.count, self.longest, self.longest_after = each, 0, 0, 0

    def add(self, before, after, where):
        self.count += 1
        if before > self.longest:
            self.longest, self.longest_after = before, after
        if self.each:
            print(f"warning: {where}: prompt truncated from the left, {before} -> {after} tokens", file=sys.stderr)


    def summary(self, stage):
        """One warning line for the stage's truncated prompts (nothing when none was cut)."""
        if self.count:
            print(f"warning: {stage}: {self.count} prompt(s) truncated from the left to fit the context (longest "
                  f"{self.longest} -> {self.longest_after} tokens)" + ("" if self.each else
                  "; --log_truncations true lists each"), file=sys.stderr)


TRUNCATIONS = Truncations()  # the running stage's count: TRUNCATIONS.reset(...) at its start, .summary(...) at its end


def fit_prompt(prompt_ids, room, truncate, where):
    """
    Make a prompt fit in `room` tokens. Policy: drop tokens from the LEFT (the oldest context), counted in
    TRUNCATIONS for the stage's summary, or, with truncate=False, raise an error naming `where`.
    """
    if len(prompt_ids) <= room:
        return prompt_ids
    if room <= 0 or not truncate:
        raise ValueError(f"{where}: prompt has {len(prompt_ids)} tokens but only {room} fit in the context "
                         f"(block_size minus the response); use a shorter prompt or allow truncation")
    TRUNCATIONS.add(len(prompt_ids), room, where)
    return prompt_ids[-room:]


def autocast(device, enabled=True):
    """bf16 autocast on CUDA only: matmuls run in bf16, softmax / log-softmax / losses in fp32 (torch's autocast
    lists). CPU and MPS stay in fp32, so every number the tests check is the plain fp32 math."""
    if enabled and str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pad_batch(seqs, pad_id, left):
    """List of id lists -> (ids (B, T), mask (B, T)) padded with pad_id on the left or right."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)                 # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)                       # (B, T)
    for i, s in enumerate(seqs):
        span = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def pick_device(requested="auto"):
    """'auto' -> cuda, then mps, then cpu; anything else is used as given (and checked)."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for but torch.backends.mps.is_available() is False")
    return requested


def run_main(main):
    """Run a stage's main(); our own errors (bad input, missing files, non-finite values) become one line, exit 2."""
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the file system said no: a full disk, a read-only folder, a path that is a file...
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; checkpoints written before are intact (once fixed, continue with "
              f"--resume true)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("stopped (Ctrl-C); the last periodic checkpoint in --out_dir is intact: run the same command with "
              "--resume true to continue from it", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------- runs

def stop_here(cfg, step, total, unit="step"):
    """--stop_after N: True once `step` reaches N, where the stage returns as if it had been killed just after that
    step's checkpoint (if any), to try --resume; the line printed says whether there is a checkpoint to resume."""
    if not cfg.stop_after:
        return False
    if cfg.stop_after >= total:
        raise ValueError(f"--stop_after {cfg.stop_after}: must be less than the run's {total} {unit}s, or 0 for off")
    if step != cfg.stop_after:
        return False
    saved = step // cfg.ckpt_interval * cfg.ckpt_interval
    if saved or cfg.resume:
        print(f"stopping after {unit} {step} as asked (--stop_after); continue with --resume true")
    else:
        print(f"stopping after {unit} {step} as asked (--stop_after), before the first checkpoint ({unit} "
              f"{cfg.ckpt_interval}, --ckpt_interval): nothing was saved, so there is nothing to resume")
    release_out_dir(cfg.out_dir)
    return True


@dataclasses.dataclass
class RunState:
    """What --resume restores in every stage besides the weights: the optimizer, the stage's random streams and
    its own plain values (`extra`: SFT's data order, PPO's running score statistics and monitoring history);
    resume_run also fills in how far the log got and the training time so far."""
    opt: torch.optim.Optimizer
    rng: Optional[random.Random] = None            # the stage's Python RNG (data order, prompt draws), if any
    generator: Optional[torch.Generator] = None    # the RL stages' sampling generator
    extra: dict = dataclasses.field(default_factory=dict)
    log_lines: Optional[int] = None                # lines of the stage's JSONL log that belong to the run
    train_time_s: float = 0.0
    inputs: Optional[dict] = None                  # input_fingerprints when the run started


def save_run(path, stage, step, cfg, state, weights, log, t0, metrics=None, **meta):
    """A stage's checkpoint, written atomically: the modules in `weights` ({key: module}), what later stages
    read (`meta`), and everything --resume needs. metrics=None marks a run that has not finished. Stages write
    their final checkpoint last, after the log and the plot: a run killed before it resumes from its last periodic
    checkpoint and writes them all again, so a finished checkpoint means every file of the stage is there."""
    save_checkpoint(path, stage=stage, **{key: module.state_dict() for key, module in weights.items()}, **meta,
                    step=step, done=metrics is not None, metrics=metrics or {}, config=dataclasses.asdict(cfg),
                    optimizer=state.opt.state_dict(), rng=rng_state(state.rng, state.generator), **state.extra,
                    log_lines=log.n_lines, train_time_s=time.time() - t0, inputs=state.inputs)


def resume_run(path, stage, cfg, tokenizer_id, state, weights):
    """--resume: the interrupted run's weights and state back in place (its config must match cfg); returns the
    step it stopped after."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: nothing to resume (no checkpoint here; a run writes one every --ckpt_interval "
                         f"steps); drop --resume to start the run")
    ckpt = load_checkpoint(path, stage, tokenizer_id, finished=False)
    check_resume(ckpt, cfg, path)
    for key, module in weights.items():
        load_weights(module, ckpt[key], path)
    state.opt.load_state_dict(ckpt["optimizer"])
    if "rng" not in ckpt:
        raise ValueError(f"{path}: written before checkpoints kept their random state; it cannot be resumed "
                         f"exactly: start the run again without --resume")
    set_rng_state(ckpt["rng"], state.rng, state.generator)
    state.extra = {key: ckpt[key] for key in state.extra}
    state.log_lines, state.train_time_s, state.inputs = ckpt["log_lines"], ckpt["train_time_s"], ckpt.get("inputs")
    print(f"resuming from {path} after step {ckpt['step']}")
    return ckpt["step"]


# ---------------------------------------------------------------------------------------------- masked tensors

def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1 (over `dim`, or everything)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask):
    """Unbiased variance of x over mask."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def masked_whiten(x, mask, shift_mean=True):
    """(x - μ) / σ over masked positions (shift_mean=False keeps the mean: (x - μ)/σ + μ). Padding stays 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---------------------------------------------------------------------------------------------- logging

class JsonlLog:
    """Append one JSON object per line to `path`: started fresh, or, when resuming, cut back to `keep` lines."""

    def __init__(self, path, keep=None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        lines = []
        if keep is not None and os.path.exists(path):
            with open(path) as f:
                lines = f.readlines()[:keep]
        with open(path, "w") as f:
            f.writelines(lines)
        self.n_lines = len(lines)

    def write(self, **row):
        with open(self.path, "a") as f:
            f.write(json_line(row))
        self.n_lines += 1


def json_line(row):
    """One line of strict JSON: NaN and ±inf (a metric that does not exist, e.g. the gold reward of real data)
    are written as null, which every JSON reader accepts (bare NaN is not JSON)."""
    def strict(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: strict(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [strict(x) for x in v]
        return v
    return json.dumps(strict(row), allow_nan=False) + "\n"


def read_jsonl(path):
    """The rows of a JSONL file (null where a value did not exist)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """`progress.line(step, text)` -> 'step 120/600 (20%) | text | 12.3s elapsed, ETA 49s'."""

    def __init__(self, total):
        self.total, self.t0 = total, time.time()

    def line(self, step, text):
        elapsed = time.time() - self.t0
        eta = elapsed / max(step, 1) * (self.total - step)
        return f"step {step:>5}/{self.total} ({100 * step / max(self.total, 1):3.0f}%) | {text} | {elapsed:6.1f}s elapsed, ETA {eta:5.0f}s"


def plot_curves(path, rows, x, ys, title, logy=()):
    """Save a PNG of the JSONL rows' `ys` keys against `x` (rows without a key are skipped for that curve);
    `ys` is a list of panels, each a list of keys; panels whose index is in `logy` get a log y-axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ncols = min(3, len(ys))
    nrows = -(-len(ys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows + 0.4), squeeze=False)
    for ax in axes.flat[len(ys):]:
        ax.set_visible(False)
    for i, (ax, group) in enumerate(zip(axes.flat, ys)):
        for key in group:
            pts = [(r[x], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 30 else None)
        ax.set_xlabel(x)
        if i in logy:
            ax.set_yscale("log")
        if ax.lines:                                    # a panel whose keys have no values yet stays empty
            ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(rows, headers, widths):
    """Plain-text table; cells are cut to their column width (newlines shown as the two characters \\n)."""
    def cell(v, w):
        s = f"{v:.2f}" if isinstance(v, float) else str(v).replace("\n", "\\n")
        return (s[: w - 1] + "…" if len(s) > w else s).ljust(w)
    line = "+".join("-" * (w + 2) for w in widths)
    out = [line, " | ".join(cell(h, w) for h, w in zip(headers, widths)), line]
    out += [" | ".join(cell(v, w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(out + [line])
