"""
Everything around a stage's algorithm, in one file that a first reading skips: the options (a stage's Config
dataclass <-> its command line, each field's rule beside it), one-line errors and the stop on Ctrl-C / SIGTERM,
the device and torchrun's few helpers, a run's folder (its lock, the fresh-start refusal, --resume),
checkpoints (written atomically, loaded with their checks, GPT-2's weights read into our GPT), sampling and
scoring batches of responses, what the RL stages watch while they train (monitors, the sanity warnings), and
the logs, plots and tables. Nothing here is the RLHF algorithm: that lives in the stage files, beside the model
(model.py), the task (data.py) and the tokenizer. docs/files_and_checkpoints.md describes the files and the
checkpoint format. Sections, in order: options, errors, devices, the run folder, checkpoints, GPT-2 weights,
sampling, monitors, sanity warnings, logs and plots.
"""
import argparse
import contextlib
import copy
import dataclasses
import errno
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import sys
import time
import warnings
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist

import data
import tokenizer as tok
from data import regular_file
from model import (GPT, GPTConfig, ScalarHeadGPT, entropy_from_logits, exact_kl, k1, k3, logprobs_from_logits,
                   masked_mean, response_logits, response_values)
from tokenizer import TRUNCATIONS, encode_prompts, fit_prompt, pad_batch


# ====================================================================================================
# Options: a Config dataclass <-> the command line; each field's rule beside it
# ====================================================================================================


def str2bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def field(default, help, range=None, choices=None, valid=None, global_batch=False, input_file=False,
          resume_free=False):
    """
    A Config field with its help text (shown by --help) and, beside it, what its value must be; parse_config
    checks every field before the stage does any work (check_options), and --help shows the rule:
      range         an interval: "[1, inf)" (at least 1), "(0, inf)" (greater than 0), "[0, 1)", ... (nan fails)
      choices       the allowed values
      valid         (test, "what it must be") for anything else
      global_batch  a global batch: under torchrun each process takes an equal share, so it must divide by their number
      input_file    names input file(s), comma-separated: --resume compares their contents, not their paths
      resume_free   may differ between a run and its --resume (where to write, how to run, not what to compute)
    """
    interval = None
    if range:                                     # "[0, 1)" -> (0.0, 1.0, low closed, high closed, "[0, 1)")
        text = range.strip()
        low, high = (float(part) for part in text[1:-1].split(","))
        interval = (low, high, text[0] == "[", text[-1] == "]", text)
    rule = dict(range=interval, choices=choices, valid=valid, global_batch=global_batch, input_file=input_file,
                resume_free=resume_free)
    metadata = dict(help=help, **{k: v for k, v in rule.items() if v})
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def device_field():
    """The --device option every stage has, with its check."""
    return field("auto", "auto (cuda -> mps -> cpu), cpu, cuda, cuda:N, mps",
                 valid=(lambda v: v in ("auto", "cpu", "mps") or str(v).startswith("cuda"), "auto, cpu, cuda, cuda:N or mps"),
                 resume_free=True)


def field_rule(f):
    """What a dataclass field's value must be, in words ('' when anything goes): at least 1, 0 or more, greater
    than 0, in [0, 1), one of a, b, ..."""
    m = f.metadata
    if "range" in m:
        low, high, low_closed, _, text = m["range"]
        if high != math.inf:
            return f"in {text}"
        if low == 0:
            return "0 or more" if low_closed else "greater than 0"
        return f"at least {low:g}" if low_closed else f"greater than {low:g}"
    if "choices" in m:
        return "one of " + ", ".join(m["choices"])
    return m["valid"][1] if "valid" in m else ""


def check_options(cfg):
    """One-line ValueError for the first option whose value cannot work, named as on the command line (cfg: a
    Config dataclass whose fields were declared with field(): each field's rule stands beside it)."""
    n_ranks = int(os.environ.get("WORLD_SIZE", "1"))                  # set by torchrun
    for f in dataclasses.fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"--{f.name} {value!r}: must be a finite number")      # inf passes "(0, inf)"; nan no rule
        if "range" in m:
            low, high, low_closed, high_closed, _ = m["range"]
            above_low = low <= value if low_closed else low < value
            inside = above_low and (value <= high if high_closed else value < high)
        if ("range" in m and not inside) or ("choices" in m and value not in m["choices"]) or (
                "valid" in m and not m["valid"][0](value)):
            raise ValueError(f"--{f.name} {value!r}: must be {field_rule(f)}")
        if m.get("global_batch") and n_ranks > 1 and value % n_ranks:
            raise ValueError(f"--{f.name} {value}: must be a multiple of the {n_ranks} processes torchrun started "
                             f"(each takes an equal share of the global batch)")
    if getattr(cfg, "n_embd", 0) % getattr(cfg, "n_head", 1):
        raise ValueError(f"--n_embd {cfg.n_embd}: must be a multiple of --n_head {cfg.n_head} (each head gets n_embd / "
                         f"n_head dimensions)")
    length = getattr(cfg, "n_iters", None) or getattr(cfg, "max_iters", None)
    if getattr(cfg, "stop_after", 0) and length and cfg.stop_after >= length:
        raise ValueError(f"--stop_after {cfg.stop_after}: must be less than the run's length ({length}), or 0 for off")


def fields_with(cfg, flag):
    """The names of a Config's fields declared with field(..., flag=True): input_file, resume_free, global_batch."""
    return tuple(f.name for f in dataclasses.fields(cfg) if f.metadata.get(flag))


def parse_config(cls, presets, argv=None, description=None):
    """
    Build a `cls` dataclass from the command line: defaults, then each `--preset NAME` in the order given (dicts
    from `presets`; `--preset dapo --preset tiny` is DAPO at the tiny sizes), then every explicit `--field value`,
    checked by check_options before the stage does any work. --help shows each field's help text, what its value
    must be [in brackets] and its default; a `list` field takes one or more values.
    """
    # plain HelpFormatter: the default shown is the dataclass field's (argparse's own default is None, meaning
    # "not given on the command line", so ArgumentDefaultsHelpFormatter would print a second, wrong one)
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)   # --k is not --kl_coef
    if presets:
        p.add_argument("--preset", choices=sorted(presets), action="append", default=None,
                       help="a named set of overrides, applied before the explicit options; repeat to combine, later "
                            "ones winning (default: none)")
    for f in dataclasses.fields(cls):
        typ = str2bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(f.type, f.type)
        listed, rule = f.type in (list, "list"), field_rule(f)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        p.add_argument(f"--{f.name}", type=str if listed else typ, nargs="+" if listed else None, default=None,
                       help=f"{f.metadata.get('help', '')}{f' [{rule}]' if rule else ''} (default: {default})")
    args = p.parse_args(argv)
    cfg = cls(**{k: v for name in getattr(args, "preset", None) or () for k, v in presets[name].items()})
    overrides = {k: v for k, v in vars(args).items() if k != "preset" and v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    check_options(cfg)
    return cfg


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ====================================================================================================
# One-line errors; Ctrl-C and SIGTERM
# ====================================================================================================


def check_finite(where, **values):
    """Stop the run with a message naming the step and the quantity when a value is nan or inf."""
    for name, v in values.items():
        v = float(v)
        if not math.isfinite(v):
            raise FloatingPointError(f"{where}: {name} is {v}; stopping before it reaches the weights (the last "
                                     f"checkpoint is intact). Lower the learning rate or check the inputs.")


class Terminated(Exception):
    """SIGTERM (what `timeout`, `kill` and job schedulers send) arrived: stop as on Ctrl-C."""


STOP_NOTE = dict(general="the last periodic checkpoint in --out_dir is intact: run the same command with --resume true "
                         "to continue from it")


def run_main(main):
    """Run a stage's main(); our own errors (bad input, missing files, non-finite values) become one line, exit 2;
    Ctrl-C (exit 130) and SIGTERM (exit 143) one line saying where the last checkpoint is and how to resume."""
    error = "error:" if rank() == 0 else f"[rank {rank()}] error:"      # torchrun: which process said it

    def terminated(signum, frame):
        raise Terminated()
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        main()
        leave_ranks()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"{error} {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the file system said no: a full disk, a read-only folder, a path that is a file...
        where = f"{e.filename}: " if e.filename else ""
        print(f"{error} {where}{one_line(e.strerror or e)}; checkpoints written before are intact (once "
              f"fixed, continue with --resume true)", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        print(f"{error} out of memory: the sizes asked for (model, batch, data) do not fit the device; choose "
              f"smaller ones", file=sys.stderr)
        sys.exit(2)
    except MemoryError:
        print(f"{error} out of memory: the sizes asked for (model, batch, data) do not fit this machine; choose "
              f"smaller ones", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"stopped (Ctrl-C); {STOP_NOTE['text']}", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print(f"stopped (SIGTERM); {STOP_NOTE['text']}", file=sys.stderr)
        sys.exit(143)
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(message):
    """An error message on one line (a file name or a value may hold newlines)."""
    return " ".join(str(message).split())


# ====================================================================================================
# Devices and torchrun
#
# The device a stage runs on (pick_device: cuda -> mps -> cpu), and the few data-parallel helpers torchrun needs.
#
# Skip on a first read. `torchrun --nproc_per_node N stage.py ...` starts N processes ("ranks"), one per device,
# that train one model together (PyTorch DDP). With plain `python` there is no process group: every function here
# then returns its input unchanged, and rank() is 0 of world_size() 1.
# ====================================================================================================


def uses_bf16(device, enabled=True):
    """Whether autocast(device, enabled) runs in bf16: on CUDA only."""
    return enabled and str(device).startswith("cuda")


def autocast(device, enabled=True):
    """bf16 autocast on CUDA only: matmuls run in bf16, softmax / log-softmax / losses in fp32 (torch's autocast
    lists). CPU and MPS stay in fp32, so every number the tests check is the plain fp32 math."""
    if uses_bf16(device, enabled):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pick_device(requested="auto", torchrun_ok=False):
    """'auto' -> cuda, then mps, then cpu; anything else is used as given (and checked). A stage that does not
    run data parallel (every one but SFT, RM, PPO and GRPO: those call start_ranks) refuses torchrun's processes."""
    if not torchrun_ok and world_size() > 1:
        raise ValueError(f"this stage runs in one process; under torchrun it would run {world_size()} copies. "
                         f"torchrun is for train_sft.py, reward_model.py, ppo_rlhf.py and algorithms/grpo.py")
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


def rank():
    """This process's rank: 0 without torchrun (torchrun sets RANK, read before the group is joined)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size():
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def start_ranks(requested="auto"):
    """The stage's device, as pick_device; under torchrun (which sets LOCAL_RANK) this process also joins the
    group: NCCL and GPU number LOCAL_RANK on CUDA, Gloo on CPU. Ranks other than 0 stop printing to stdout
    (their errors still reach stderr, prefixed with their rank: run_main)."""
    device = pick_device(requested, torchrun_ok=True)
    if "LOCAL_RANK" not in os.environ:
        return device
    if device == "mps":
        raise ValueError("--device mps: torchrun runs on cuda (NCCL) or cpu (Gloo) devices")
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if rank() > 0:
            sys.stdout = open(os.devnull, "w")
    return device


def leave_ranks():
    """After a stage ends well under torchrun (run_main calls it): wait for every rank, then leave the process
    group. A process that exits still in the group can be killed by its communication threads (SIGABRT: measured,
    about one launch in ten) instead of ending with status 0. After an error a rank exits at once; torchrun then
    stops the others."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def data_parallel(model):
    """The module to train through: under torchrun a DistributedDataParallel wrapper, whose backward averages
    every gradient over the ranks (calling `model` itself, or `.module`, would skip that and each rank would
    train alone); without torchrun, `model`. Sampling and the frozen models use the plain module."""
    if not dist.is_initialized():
        return model
    device = next(model.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def shard(rows):
    """This rank's contiguous share of a global batch (a list every rank holds the same): rows[r·n/N : (r+1)·n/N]."""
    n, r, w = len(rows), rank(), world_size()
    return rows[r * n // w:(r + 1) * n // w]


def sum_over_ranks(x):
    """A tensor summed over every rank (a new tensor; x itself without torchrun)."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def share_of_global_tokens(tokens, all_tokens):
    """The weight of a loss that is a per-token mean over `tokens` tokens (a tensor), so that once DDP's backward
    has averaged every rank's gradients they are those of one mean over all ranks' `all_tokens` together:
    N · tokens / Σ_ranks all_tokens; tokens / all_tokens without torchrun. Returns a float."""
    return (world_size() * tokens / sum_over_ranks(all_tokens).clamp(min=1)).item()


def gather_rows(x):
    """(n, ...) on each rank -> (N·n, ...): every rank's rows, in rank order, on every rank."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_objects(obj):
    """[rank 0's obj, rank 1's obj, ...] on every rank ([obj] without torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def global_masked_moments(x, mask):
    """(mean, unbiased variance) of x over the masked positions of every rank's rows: what masked_mean and
    ppo_rlhf.masked_var give for the rows of all ranks concatenated."""
    mask = mask.to(x.dtype)
    n = sum_over_ranks(mask.sum())
    mean = sum_over_ranks((x * mask).sum()) / n.clamp(min=1)
    var = sum_over_ranks(((x - mean) ** 2 * mask).sum()) / (n - 1).clamp(min=1)
    return mean, var


def metrics_over_ranks(row, sums=()):
    """One iteration's metrics for the whole global batch: each number averaged over the ranks (equal shares,
    so a per-response mean is exact; a per-token mean becomes the mean of the ranks' means), a `*_max` the
    largest, a list (a distribution) every rank's items in rank order; what every rank has alike (the iteration)
    and the rest (flags) as rank 0 has them. Keys in `sums` (counts) are added up instead."""
    rows = gather_objects(row)
    if len(rows) == 1:
        return row
    out = {}
    for key, value in row.items():
        values = [r[key] for r in rows]
        if key in sums:
            out[key] = sum(values)
        elif isinstance(value, list):
            out[key] = [v for part in values for v in part]
        elif all(v == value for v in values) or isinstance(value, bool) or not isinstance(value, (int, float)):
            out[key] = value
        else:
            out[key] = max(values) if key.endswith("_max") else sum(values) / len(values)
    return out


# ====================================================================================================
# A run's folder and --resume
#
# A run of a stage, shared by every stage: the output folder it owns while it runs (claim_out_dir, a lock holding
# its PID), the refusal to replace an unfinished run, the options every stage shares (RunOptions), what --resume
# restores and checks (Run.begin, Run.resume_checkpoint: the same config, the same input contents), --stop_after,
# and the object that holds all of it for a stage's main() (Run). docs/files_and_checkpoints.md describes the files and the checkpoint format.
# ====================================================================================================


_HELD = {}  # real path of a folder this process holds -> [its open lock file, how many claims are open]


def claim_out_dir(out_dir):
    """
    Make this process the owner of out_dir while it runs: an exclusive flock on out_dir/.lock, taken in one
    atomic step, held until release_out_dir or the process's end (the kernel drops it when the process dies,
    however it dies: a lock is never stale, and nothing ever deletes the file). The file holds the owner's PID,
    only for the message of a run refused because the folder is in use. The same process may claim again
    (pipeline.py holds the folder across its stages, each stage claims it too): claims are counted, and the
    last release gives the folder back. Under torchrun, rank 0 claims it for every rank.
    """
    if rank() != 0:
        return
    key = os.path.realpath(make_out_dir(out_dir))
    if key in _HELD:
        _HELD[key][1] += 1
        return
    lock = open(os.path.join(key, ".lock"), "a+")
    if not _try_lock(lock):
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise ValueError(f"{out_dir}: in use by another run (PID {holder if holder.isdigit() else '?'}); wait for it "
                         f"to finish, or choose another --out_dir")
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    _HELD[key] = [lock, 1]


def _try_lock(lock):
    """Take an exclusive lock on an open file without waiting: True when this process now holds it."""
    try:
        import fcntl
    except ImportError:                                                # Windows: a lock on the file's first byte
        import msvcrt
        try:
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:                                               # a file system without locks (some NFS)
        print(f"warning: {lock.name}: cannot be locked here ({e.strerror}); make sure no other run uses this folder",
              file=sys.stderr)
        return True


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
    """Give back one claim on out_dir (claim_out_dir); the last one unlocks the folder."""
    key = os.path.realpath(out_dir)
    if key in _HELD:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            _HELD.pop(key)[0].close()                                  # closing the file drops the flock


@contextlib.contextmanager
def holding(out_dir):
    """`with holding(out_dir):` this process owns out_dir for the block (claim_out_dir ... release_out_dir)."""
    claim_out_dir(out_dir)
    try:
        yield out_dir
    finally:
        if rank() == 0:
            release_out_dir(out_dir)


def check_fresh_start(ckpt_path, cfg):
    """A run without --resume must not silently replace an unfinished one (its checkpoint and log would go):
    refuse, offering --resume true or --overwrite true. A checkpoint path that is not a file is an error."""
    if os.path.lexists(ckpt_path):
        regular_file(ckpt_path, "the stage's checkpoint")
    if cfg.resume or cfg.overwrite or not os.path.exists(ckpt_path):
        return
    try:
        ckpt = read_checkpoint(ckpt_path)
    except ValueError:
        return  # not ours or damaged: the stage's own loading reports it when it matters
    if isinstance(ckpt, dict) and ckpt.get("done") is False:
        raise ValueError(f"{ckpt_path}: an unfinished run is here (step {ckpt.get('step')}); continue it with "
                         f"--resume true, or start over with --overwrite true")


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
    for name in fields_with(cfg, "input_file"):
        value = getattr(cfg, name)
        files = [p.strip() for p in value.split(",")] if isinstance(value, str) else []
        if files and all(os.path.isfile(f) for f in files):
            out[name] = [file_sha256(f) for f in files]
    return out


def done_checkpoint(path, stage):
    """The checkpoint at `path` if a `stage` run finished there; None when there is none or an unfinished one."""
    if not os.path.exists(path):
        return None
    ckpt = load_checkpoint(path, stage, finished=False)
    return ckpt if ckpt.get("done", True) else None


def finished_run(path, stage, cfg):
    """pipeline.py --resume: the metrics of a finished `stage` run of exactly `cfg` (same config, same input
    contents) at `path`; None when there is no checkpoint there or an unfinished one (the stage runs or resumes)."""
    ckpt = done_checkpoint(path, stage)
    if ckpt is None:
        return None
    check_same_run(ckpt, cfg, path)
    return ckpt["metrics"]


def check_same_run(ckpt, cfg, path):
    """The checkpoint's run had cfg's config (resume_free fields aside) and inputs with the same contents."""
    saved, now, started_with = ckpt["config"], dataclasses.asdict(cfg), ckpt.get("inputs") or {}
    free = fields_with(cfg, "resume_free")
    diff = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in now.items()
            if k not in free and k not in started_with and saved.get(k) != v]
    if diff:
        raise ValueError(f"{path}: --resume continues the run saved here, but it was made with " + ", ".join(diff)
                         + "; give the same options, or start over with --overwrite true (without --resume)")
    current = input_fingerprints(cfg)
    changed = [f"--{k} {now[k]}" for k in started_with if current.get(k) != started_with[k]]
    if changed:
        raise ValueError(f"{path}: --resume needs the inputs the run started with, but {', '.join(changed)} is not "
                         f"the same file any more (other contents)")


@dataclasses.dataclass
class RunOptions:
    """The options every training stage shares, declared once: where its run lives and how it runs (the device,
    prompt truncation, checkpoints, --resume, --stop_after). A stage's Config inherits them (class Config(RunOptions))."""
    out_dir: str = field("out", "the run's folder: the stage's checkpoint, JSONL logs and plots", resume_free=True)
    seed: int = field(0, "seeds every random stream of the stage (data, init, prompts, sampling, batch order)")
    device: str = device_field()
    truncate_prompts: bool = field(True, "cut over-long prompts from the left, with one summary warning at the end of "
                                         "the stage (false: error)")
    log_truncations: bool = field(False, "also print one warning line per truncated prompt", resume_free=True)
    ckpt_interval: int = field(25, "also write the stage's checkpoint (with optimizer and RNG state) every N steps, "
                                   "for --resume", range="[1, inf)", resume_free=True)
    resume: bool = field(False, "continue the interrupted run whose checkpoint is in out_dir", resume_free=True)
    overwrite: bool = field(False, "start over although out_dir holds an unfinished run of this stage",
                            resume_free=True)
    stop_after: int = field(0, "stop after this many steps as if killed (to test --resume); 0 = off",
                            range="[0, inf)", resume_free=True)


def ckpt_interval_field(default):
    """RunOptions.ckpt_interval with a stage's own default (a stage whose steps are short checkpoints less often)."""
    return field(default, RunOptions.__dataclass_fields__["ckpt_interval"].metadata["help"], range="[1, inf)",
                 resume_free=True)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM arriving inside the block are delivered when it ends (where the OS allows it)."""
    block = getattr(signal, "pthread_sigmask", None)
    held = {signal.SIGINT, signal.SIGTERM}
    if block is not None:
        block(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        if block is not None:
            block(signal.SIG_UNBLOCK, held)


def run_meta(sft, cfg):
    """What a stage trained from the SFT policy writes for the next stages: the policy's shape and tokenizer, and
    the checkpoints it started from."""
    return dict(model_config=sft["model_config"], tokenizer=sft["tokenizer"], tokenizer_id=sft["tokenizer_id"],
                sft_ckpt=cfg.sft_ckpt, rm_ckpt=cfg.rm_ckpt)


class StopRun(Exception):
    """--stop_after N: raised by Run.save after step N; the stage's `with Run(...)` block ends there, quietly, as if
    the process had been killed just after that step's checkpoint (if any)."""


class Run:
    """
    One stage's run in its folder, from the claim to the release, behind one object. Every stage uses it alike:

        with Run(cfg, "rloo") as run:            # claims out_dir, refuses to replace an unfinished run, seeds, device
            ...                                  # models, optimizer, data
            moving = run.begin(opt, dict(model=policy), meta, cfg.n_iters, rng, gen, state=dict(moving=[0.0, 0]))
            for it in range(run.start, cfg.n_iters + 1):   # from where the run stopped (--resume)
                ...                              # one iteration; run.log.write(**row)
                run.save(it, moving=[moving.total, moving.count])   # every ckpt_interval iterations, a checkpoint
            run.finish(metrics, ...)             # the final checkpoint, written last

    begin(): on --resume, the interrupted run's weights, optimizer and random streams are put back, the JSONL logs
    cut back to what its checkpoint had, and the stage's own plain values (`state`, e.g. PPO's running score
    statistics) returned as the checkpoint had them; on a fresh start `state` comes back as given. save(): after
    step `step`, every ckpt_interval steps but the last, the checkpoint, holding the values given (the last ones
    given go into the final checkpoint too); --stop_after N ends the `with` block after step N. finish() writes
    the final checkpoint after the log and plots (a finished checkpoint means every file of the stage is there).
    Under torchrun every rank runs it alike and rank 0 alone writes. Leaving the `with` gives the folder back.
    """

    def __init__(self, cfg, stage, name=None, unit="iteration", data_parallel=False):
        self.cfg, self.stage, self.name, self.unit = cfg, stage, name or stage.upper(), unit
        self.ckpt_path = os.path.join(cfg.out_dir, f"{stage}.pt")
        self.samples_path = os.path.join(cfg.out_dir, f"{stage}_samples.jsonl")   # RL stages: rollouts, token by token
        self.log, self.samples, self.extra = None, None, {}
        self._progress = None
        TRUNCATIONS.reset(cfg.log_truncations)
        STOP_NOTE["text"] = STOP_NOTE["general"]
        claim_out_dir(cfg.out_dir)                     # one run per folder at a time
        self.claimed = True
        try:
            check_fresh_start(self.ckpt_path, cfg)
            for path in (self.log_path, self.samples_path):
                if os.path.lexists(path):
                    regular_file(path, "the stage's log")
            seed_everything(cfg.seed)
            # under torchrun (SFT, RM, PPO, GRPO): this process's device, in the process group
            self.device = start_ranks(cfg.device) if data_parallel else pick_device(cfg.device)
        except BaseException:
            self.release()
            raise

    @property
    def log_path(self):
        """The stage's JSONL log, where it is written now (PATH.new while staged: JsonlLog)."""
        return self.log.path if self.log is not None else os.path.join(self.cfg.out_dir, f"{self.stage}_log.jsonl")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        self.release()
        return kind is StopRun                         # --stop_after: the block ends here, without an error

    def release(self):
        """Give the folder back (once); a staged log never published goes (the stop note stays: an error or a
        signal on the way out still names this run's last checkpoint)."""
        if self.claimed:
            for log in (self.log, self.samples):
                if log is not None:
                    log.discard()
            release_out_dir(self.cfg.out_dir)
            self.claimed = False

    def note_checkpoint(self, step):
        """What Ctrl-C or SIGTERM say from now on: where the last checkpoint of this run is, or that there is none."""
        STOP_NOTE["text"] = (f"the last checkpoint, {self.ckpt_path} (after {self.unit} {step}), is intact: run the "
                             f"same command with --resume true to continue from it" if step else
                             f"nothing of this run was saved yet (the first checkpoint comes after {self.unit} "
                             f"{self.cfg.ckpt_interval}, --ckpt_interval): run the same command to start it again")

    def begin(self, opt, weights, meta, n_steps=None, rng=None, generator=None, state=None, samples=False):
        """Start or (--resume) continue the run: `weights` {checkpoint key: module} and `opt` train, `meta` is what
        later stages read from the checkpoint (model_config, tokenizer, tokenizer_id, input paths), rng / generator
        the stage's random streams, `state` the stage's own plain values (see the class). Returns `state`, restored
        on --resume. self.start is the first step to run; n_steps may be set later (run.n_steps = ...)."""
        self.opt, self.weights, self.meta, self.n_steps = opt, weights, meta, n_steps
        self.rng, self.generator, self.extra = rng, generator, dict(state or {})
        self.inputs, log_lines, train_time_s, done = input_fingerprints(self.cfg), None, 0.0, 0
        if self.cfg.resume:
            ckpt = self.resume_checkpoint()
            self.extra = {key: ckpt[key] for key in self.extra}
            log_lines, train_time_s, self.inputs, done = (ckpt["log_lines"], ckpt["train_time_s"], ckpt.get("inputs"),
                                                          ckpt["step"])
        self.start = done + 1
        if self.cfg.stop_after and self.cfg.stop_after <= done:     # it would never be reached: the run goes to its end
            raise ValueError(f"--stop_after {self.cfg.stop_after}: the run resumes after {self.unit} {done}, past it; "
                             f"give a later {self.unit}, or 0 for off")
        # a new run beside a finished one writes its logs as PATH.new until its first checkpoint (JsonlLog)
        staged = not self.cfg.resume and not self.cfg.overwrite and os.path.exists(self.ckpt_path)
        self.log = JsonlLog(self.log_path, log_lines, staged=staged)
        if samples:
            self.samples = JsonlLog(self.samples_path, lines_up_to(self.samples_path, "iter", done)
                                    if self.cfg.resume else None, staged=staged)
        self.note_checkpoint(done)
        self._progress = Progress(n_steps) if n_steps is not None else None   # its clock starts here
        self.t_start = time.time() - train_time_s
        return self.extra

    def resume_checkpoint(self):
        """--resume: the interrupted run's checkpoint, checked (the same config and inputs, the same number of
        processes), its weights, optimizer and random streams put back in place."""
        path = self.ckpt_path
        if not os.path.exists(path):
            raise ValueError(f"{path}: nothing to resume (no checkpoint here; a run writes one every --ckpt_interval "
                             f"steps); drop --resume to start the run")
        ckpt = load_checkpoint(path, self.stage, self.meta["tokenizer_id"], finished=False)
        if ckpt.get("done", True):  # checkpoints without the flag are finished ones
            raise ValueError(f"{path}: this run already finished (step {ckpt['step']}); nothing to resume")
        check_same_run(ckpt, self.cfg, path)   # the same config (resume_free fields aside), the same inputs
        if ckpt.get("world_size", 1) != world_size():     # each rank's random streams (and data share) differ
            raise ValueError(f"{path}: this run was made with {ckpt.get('world_size', 1)} process(es) and is resumed "
                             f"with {world_size()}; resume it with the same number (torchrun --nproc_per_node "
                             f"{ckpt.get('world_size', 1)}, or plain python for 1), or start over with --overwrite true")
        for key, module in self.weights.items():
            load_weights(module, ckpt[key], path)
        self.opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng_of_ranks"][rank()] if world_size() > 1 else ckpt["rng"], self.rng, self.generator)
        print(f"resuming from {path} after step {ckpt['step']}")
        return ckpt

    @property
    def progress(self):
        """The progress line's clock (made on first use, for the run's n_steps)."""
        if self._progress is None or self._progress.total != self.n_steps:
            self._progress = Progress(self.n_steps)
        return self._progress

    def train_time(self):
        """Seconds of training so far, the interrupted runs' included."""
        return time.time() - self.t_start

    def save(self, step, **state):
        """After step `step`: the stage's own values `state` kept for the checkpoints; every ckpt_interval steps
        (never the last: finish writes it) the checkpoint; --stop_after N: after step N, StopRun."""
        self.extra = state
        if step % self.cfg.ckpt_interval == 0 and step < self.n_steps:
            self.write(step)
        if not self.cfg.stop_after:
            return
        if self.cfg.stop_after >= self.n_steps:
            raise ValueError(f"--stop_after {self.cfg.stop_after}: must be less than the run's {self.n_steps} "
                             f"{self.unit}s, or 0 for off")
        if step == self.cfg.stop_after:
            if step >= self.cfg.ckpt_interval or self.cfg.resume:
                print(f"stopping after {self.unit} {step} as asked (--stop_after); continue with --resume true")
            else:
                print(f"stopping after {self.unit} {step} as asked (--stop_after), before the first checkpoint "
                      f"({self.unit} {self.cfg.ckpt_interval}, --ckpt_interval): nothing was saved, so there is "
                      f"nothing to resume")
            raise StopRun()

    def write(self, step, metrics=None, **final):
        """The checkpoint after `step`, written atomically (metrics=None: an unfinished run's): the modules' weights,
        what later stages read (meta), and everything --resume needs. Under torchrun every rank calls it (rank r
        resumes with its own random state) and rank 0 writes; the checkpoint records the world size."""
        rng_of_ranks = gather_objects(rng_state(self.rng, self.generator))   # [rank 0's, ...]; one without torchrun
        with signals_held():                           # Ctrl-C / SIGTERM wait until the checkpoint and its note agree
            for log in (self.log, self.samples):
                if log is not None:
                    log.publish()                      # a staged log takes its place before the checkpoint counts it
            if rank() == 0:
                save_checkpoint(self.ckpt_path, stage=self.stage, **{key: module.state_dict() for key, module in
                                                                    self.weights.items()}, **self.meta, **final,
                                step=step, done=metrics is not None, metrics=metrics or {},
                                config=dataclasses.asdict(self.cfg), optimizer=self.opt.state_dict(),
                                rng=rng_of_ranks[0], **self.extra, log_lines=self.log.n_lines,
                                train_time_s=self.train_time(), inputs=self.inputs, world_size=len(rng_of_ranks),
                                **({"rng_of_ranks": rng_of_ranks} if len(rng_of_ranks) > 1 else {}))
            self.note_checkpoint(step)

    def finish(self, metrics, responses_generated, policy_steps):
        """The final checkpoint (call it after the logs and plots: it is the run's last file) with the run's metrics
        and its training budget (responses sampled during training, the policy's optimizer steps: what
        studies/compare.py matches methods by), the truncation summary; the folder is given back."""
        self.write(self.n_steps, metrics, training_budget=dict(responses_generated=responses_generated,
                                                               policy_steps=policy_steps))
        TRUNCATIONS.summary(self.name)
        STOP_NOTE["text"] = STOP_NOTE["general"]      # the run is complete: a later stop is about something else
        self.release()


# ====================================================================================================
# Checkpoints
#
# Checkpoints, shared by every stage: what a stage writes (one self-describing dict, written atomically, with a
# checksum of its weights), how it is loaded back and checked, and the models the later stages build from them
# (load_policy, load_models, load_critic). docs/files_and_checkpoints.md describes the format.
# ====================================================================================================


SCALAR_HEAD_STAGES = ("rm", "orm", "prm_rule", "prm_mc")   # reward models (model.ScalarHeadGPT); the rest are policies


def save_checkpoint(path, **ckpt):
    """Write atomically: to a temporary file of this process first, then rename (a kill mid-save leaves the old
    file intact; two writers never share a temporary file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt["model_sha256"] = {key: model_sha256(ckpt, key) for key in WEIGHT_KEYS if key in ckpt}
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
DEFINITION_KEYS = ("model_config", "tokenizer", "tokenizer_id")  # what else defines the model: covered too


def write_failure(error, folder):
    """Why a write failed, in a user's terms: a full disk is named as such (torch's own message does not)."""
    full = getattr(error, "errno", None) == errno.ENOSPC
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(folder).free < (1 << 20)
    return "no space left on the device" if full else " ".join(str(getattr(error, "strerror", None) or error).split())


def model_sha256(ckpt, key):
    """The SHA-256 of everything that defines the model stored under `key`: its model_config, tokenizer and
    tokenizer id (one changed n_head or pad_id would load another model silently), then its weights' names and raw
    bytes (damaged bytes that still unpickle, as odd numbers or NaN, are caught on load, not later in training)."""
    digest = hashlib.sha256(json.dumps({k: ckpt.get(k) for k in DEFINITION_KEYS}, sort_keys=True).encode())
    for name, tensor in ckpt[key].items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


CHECKPOINT_KEYS = ("model", "model_config", "tokenizer", "tokenizer_id", "step", "config")  # in every stage's
CHECKPOINT_TYPES = dict(model=dict, model_config=dict, tokenizer=str, tokenizer_id=str, step=int, config=dict,
                        done=bool, metrics=dict, critic=dict)
# model_config: the type and range of each value, checked before any model is built from it
MODEL_CONFIG_RULES = dict(vocab_size=(int, 2, 1 << 20), block_size=(int, 2, 1 << 16), n_layer=(int, 1, 1024),
                          n_head=(int, 1, 1024), n_embd=(int, 1, 1 << 16), dropout=(float, 0.0, 0.999),
                          bias=(bool, False, True), pad_id=(int, -1, 1 << 20))


def read_checkpoint(path):
    """A checkpoint file -> its dict, loaded with weights_only (no code in the file runs), or a one-line error:
    not a regular file, truncated, another program's file."""
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    regular_file(path, "a checkpoint")
    try:
        with warnings.catch_warnings():                                # torch's notes on odd pickles: we say it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, another program's pickle (refused: no code runs), a text file...
        raise ValueError(f"{path}: cannot be read as a checkpoint of this project ({type(e).__name__}); is it "
                         f"truncated, or written by another program?") from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt or not isinstance(ckpt["stage"], str):
        raise ValueError(f"{path}: not a checkpoint written by this project (no 'stage' field)")
    return ckpt


def check_model_config(model_config, path):
    """A checkpoint's model_config, value by value (type and range) as options are checked, and complete."""
    unknown = set(model_config) - set(MODEL_CONFIG_RULES)
    missing = set(MODEL_CONFIG_RULES) - set(model_config) - {"bias", "dropout", "pad_id"}   # these have defaults
    if unknown or missing:
        raise ValueError(f"{path}: model_config has " + (f"unknown fields {sorted(unknown)}" if unknown else
                                                          f"no {', '.join(sorted(missing))}") +
                         "; was it edited by hand or written by another program?")
    for name, value in model_config.items():
        kind, low, high = MODEL_CONFIG_RULES[name]
        ok_type = isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok_type or not low <= value <= high:
            raise ValueError(f"{path}: model_config {name}={value!r} must be {kind.__name__} in [{low}, {high}]")
    if model_config["n_embd"] % model_config["n_head"] or model_config.get("pad_id", -1) >= model_config["vocab_size"]:
        raise ValueError(f"{path}: model_config n_embd={model_config['n_embd']}, n_head={model_config['n_head']}, "
                         f"vocab_size={model_config['vocab_size']}, pad_id={model_config.get('pad_id', -1)} do not "
                         f"fit together (n_embd a multiple of n_head, pad_id < vocab_size)")


def check_weight_shapes(module_class, model_config, state_dict, path):
    """The weights have exactly the names and shapes model_config implies, checked on a model without memory
    (the meta device) before a real one is built: a config that would allocate more than the file holds fails."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in module_class(GPTConfig(**model_config)).state_dict().items()}
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state_dict.items()}
    if got != expected:
        wrong = sorted(k for k in expected.keys() | got.keys() if got.get(k) != expected.get(k))
        raise ValueError(f"{path}: the weights do not have the shapes model_config implies (first: {wrong[0]!r}, "
                         f"{got.get(wrong[0])} stored, {expected.get(wrong[0])} expected); damaged or edited?")


def load_checkpoint(path, stage, tokenizer_id=None, finished=True):
    """Load a checkpoint dict written by `stage` (weights_only: no code runs on load) and check what it is: its
    fields' types, model_config (check_model_config), the weights' shapes and checksum (model_sha256).
    With tokenizer_id=None the checkpoint's own tokenizer is rebuilt and must still have the same identity.
    finished=True refuses the periodic checkpoint of a run that has not finished (use --resume on it).
    stage=None accepts any stage."""
    first = stage if isinstance(stage, str) or stage is None else stage[0]
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found" + (f" (run the '{first}' stage first)" if first else ""))
    ckpt = read_checkpoint(path)
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a complete '{ckpt['stage']}' checkpoint (missing {', '.join(missing)}); "
                         f"was it edited by hand or written by another program?")
    wrong = [f"{key} ({type(ckpt[key]).__name__}, not {kind.__name__})" for key, kind in CHECKPOINT_TYPES.items()
             if key in ckpt and (not isinstance(ckpt[key], kind) or (kind is int and isinstance(ckpt[key], bool)))]
    if wrong:
        raise ValueError(f"{path}: not a '{ckpt['stage']}' checkpoint of this project: {', '.join(wrong)}")
    stages = (stage,) if isinstance(stage, str) else tuple(stage or ())
    if stage is not None and ckpt["stage"] not in stages:
        raise ValueError(f"{path}: is a '{ckpt['stage']}' checkpoint; expected '{' or '.join(stages)}'")
    check_model_config(ckpt["model_config"], path)
    for key, expected in (ckpt.get("model_sha256") or {}).items():
        if key not in ckpt or not isinstance(ckpt[key], dict) or model_sha256(ckpt, key) != expected:
            raise ValueError(f"{path}: the '{key}' model (its weights, model_config or tokenizer) does not match the "
                             f"checksum written with it: the file was changed after it was saved; use another copy "
                             f"or train the stage again")
    check_weight_shapes(ScalarHeadGPT if ckpt["stage"] in SCALAR_HEAD_STAGES else GPT, ckpt["model_config"],
                        ckpt["model"], path)
    if finished and not ckpt.get("done", True):
        raise ValueError(f"{path}: is from an interrupted '{ckpt['stage']}' run (step {ckpt['step']}); finish it "
                         f"with --resume true first")
    if tokenizer_id is None:
        import tokenizer
        try:
            tokenizer_id = tokenizer.tokenizer_id(tokenizer.get_tokenizer(ckpt["tokenizer"]))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{path}: its tokenizer cannot be built: {e}") from None
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
    if ckpt["stage"] in SCALAR_HEAD_STAGES:
        raise ValueError(f"{path}: is a reward-model checkpoint, not a policy")
    model = GPT(without_dropout(ckpt["model_config"]))
    load_weights(model, ckpt["model"], path)
    return model, ckpt


def load_models(sft_path, rm_path, device, max_new_tokens=None, policy_init="sft"):
    """The start of every RL stage: the SFT policy (to train), a frozen copy of it (the reference) and the frozen
    reward model, on `device`; plus both checkpoint dicts. The RM must share the policy's vocabulary, and the
    context must hold a prompt besides max_new_tokens. policy_init (PPO's paper §5.3.3 Fig. 8 ablation): a policy
    not initialised from SFT, random or GPT-2 weights (gpt2 | a local file/folder, runs.load_gpt2); the
    reference stays SFT."""
    policy, sft = load_policy(sft_path, ("sft",))
    rm, rm_ckpt = load_reward_model(rm_path, "rm", sft, sft_path)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    shape = policy.cfg
    if policy_init == "random":
        policy = GPT(without_dropout(sft["model_config"]))
    elif policy_init != "sft":
        policy = load_gpt2(policy_init, shape.block_size, shape.vocab_size, shape.pad_id)
        if dataclasses.asdict(policy.cfg) != dataclasses.asdict(shape):
            raise ValueError(f"--policy_init {policy_init}: GPT-2 of shape {dataclasses.asdict(policy.cfg)} but the "
                             f"SFT policy (and its reference) has {dataclasses.asdict(shape)}")
    if max_new_tokens is not None and max_new_tokens >= shape.block_size:
        raise ValueError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in block_size "
                         f"{shape.block_size}")
    return policy.to(device), ref.to(device), rm.to(device), sft, rm_ckpt


def load_reward_model(rm_path, stages, sft, sft_path):
    """A frozen reward model (a checkpoint of `stages`: rm, or process_reward.py's orm / prm_rule / prm_mc) that
    scores the SFT policy's tokens: the same vocabulary and PAD id, a context as long. -> (model without dropout,
    its checkpoint dict)."""
    rm_ckpt = load_checkpoint(rm_path, stages, sft["tokenizer_id"])
    for k in ("vocab_size", "pad_id"):
        if rm_ckpt["model_config"][k] != sft["model_config"][k]:
            raise ValueError(f"{rm_path}: model_config {k}={rm_ckpt['model_config'][k]} but {sft_path} has "
                             f"{sft['model_config'][k]}; the RM must score the policy's tokens")
    check_rm_context(rm_ckpt, sft, rm_path, sft_path)
    rm = ScalarHeadGPT(without_dropout(rm_ckpt["model_config"]))
    load_weights(rm, rm_ckpt["model"], rm_path)
    return rm.eval().requires_grad_(False), rm_ckpt


def check_rm_context(rm_ckpt, sft, rm_path, sft_path):
    """The reward model scores prompt + response, which fill up to the policy's context: its context must be as long."""
    if rm_ckpt["model_config"]["block_size"] < sft["model_config"]["block_size"]:
        raise ValueError(f"{rm_path}: block_size {rm_ckpt['model_config']['block_size']} cannot hold the prompt + "
                         f"response of {sft_path}'s block_size {sft['model_config']['block_size']}; train the reward "
                         f"model from that SFT checkpoint")


def load_critic(init, sft, rm_ckpt, sft_path, rm_path):
    """The trainable critic (paper §5.3.3), without dropout: a copy of the reward model (init="rm") or the SFT
    backbone with a fresh scalar head (init="sft")."""
    critic = ScalarHeadGPT(without_dropout((rm_ckpt if init == "rm" else sft)["model_config"]))
    if init == "rm":
        load_weights(critic, rm_ckpt["model"], rm_path)
    else:
        load_weights(critic.backbone, sft["model"], sft_path)
    return critic


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


# ====================================================================================================
# GPT-2 weights
#
# GPT-2 weights from a local Hugging Face checkpoint (model.safetensors or pytorch_model.bin) into model.GPT.
#
# Our GPT is GPT-2's architecture (pre-LN, GELU-tanh, learned positions, tied embeddings, LayerNorm eps 1e-5),
# so the weights map one to one. Two differences in storage: HF names may carry a "transformer." prefix, and
# GPT-2's linear layers are `Conv1D` modules that store their weight as (in, out), the transpose of nn.Linear.
# safetensors is read by the short reader below, with no extra package. Nothing is downloaded: a missing file
# is an error that says how to get it. Used by `--init` (SFT, RM) and `--policy_init` (PPO).
# ====================================================================================================

GPT2_SIZES = {  # name -> (n_layer, n_head, n_embd); all have vocab 50257 and 1024 positions
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)
HF_BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers some old checkpoints carry: not weights


def read_safetensors(path):
    """
    A .safetensors file -> {name: tensor}, with no extra package. The format:
      8 bytes   little-endian uint64 N, the header's length
      N bytes   JSON {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}
      the rest  every tensor's raw little-endian bytes; offsets count from the end of the header
    """
    if sys.byteorder != "little":
        raise ValueError(f"{path}: safetensors data is little-endian; this reader does not convert byte order")
    size = regular_file(path, "GPT-2 weights")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER):                               # bounded before anything is allocated
            raise ValueError(f"{path}: header length {n} does not fit the file ({size} bytes); not a safetensors file?")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ValueError(f"{path}: the header is not JSON; is this a safetensors file?") from None
        buf = bytearray(f.read())                                      # every tensor's bytes, one read
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object; is this a safetensors file?")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = tensor_entry_problem(info, len(buf))
        if problem:
            raise ValueError(f"{path}: tensor {name!r}: {problem}; truncated, damaged, or not a safetensors file?")
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        flat = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin) \
            if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"]).clone()           # own memory, not a view of buf
    return tensors


MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header (100 MB)


def tensor_entry_problem(info, n_bytes):
    """What is wrong with one safetensors header entry (None when nothing): a known dtype, a shape of sizes >= 0,
    offsets inside the data that hold exactly shape's elements."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        return "not a {dtype, shape, data_offsets} entry"
    if info["dtype"] not in SAFETENSORS_DTYPES:
        return f"dtype {info['dtype']!r}, which this reader does not know"
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"shape {shape!r} is not a list of sizes >= 0"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end"
    if offsets[1] > n_bytes:
        return f"ends at byte {offsets[1]} but the data has {n_bytes}"
    if math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize != offsets[1] - offsets[0]:
        return f"shape {shape} does not match its {offsets[1] - offsets[0]} bytes"
    return None


def find_gpt2_checkpoint(spec):
    """
    `spec` -> the weights file: a .safetensors / .bin path, a folder holding model.safetensors or
    pytorch_model.bin, or a GPT2_SIZES name looked up in the Hugging Face cache (~/.cache/huggingface/hub, or
    $HF_HOME/hub). Nothing is downloaded; a missing file is an error that says how to get it.
    """
    if os.path.lexists(spec) and not os.path.isdir(spec):
        regular_file(spec, "GPT-2 weights")                         # a FIFO or a device is refused, not opened
        return spec
    folders = [spec] if os.path.isdir(spec) else []
    if spec in GPT2_SIZES:
        hub = os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
        for repo in (f"models--{spec}", f"models--openai-community--{spec}"):
            folders += sorted(glob.glob(os.path.join(hub, repo, "snapshots", "*")))
    for folder in folders:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.lexists(os.path.join(folder, name)):
                regular_file(os.path.join(folder, name), "GPT-2 weights")
                return os.path.join(folder, name)
    name = spec if spec in GPT2_SIZES else "gpt2"
    raise FileNotFoundError(
        f"{spec}: no GPT-2 weights found (looked for a file, a folder with model.safetensors or pytorch_model.bin"
        f"{', and the Hugging Face cache' if spec in GPT2_SIZES else ''}). Download them once on a machine with "
        f"internet, e.g. `huggingface-cli download openai-community/{name} model.safetensors config.json "
        f"--local-dir {name}` or https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors, "
        f"then pass --init {name}/")


def gpt2_config(path, state_dict):
    """(n_layer, n_head, n_embd, n_positions, vocab) from config.json beside the weights, else from the shapes
    (n_head then comes from the known sizes)."""
    cfg_file = os.path.join(os.path.dirname(path), "config.json")
    if state_dict["wte.weight"].dim() != 2 or state_dict["wpe.weight"].dim() != 2:
        raise ValueError(f"{path}: wte.weight and wpe.weight must be 2-D (rows, width); not a GPT-2 checkpoint?")
    n_embd, vocab = state_dict["wte.weight"].shape[1], state_dict["wte.weight"].shape[0]
    n_pos = state_dict["wpe.weight"].shape[0]
    n_layer = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("h.")), default=-1)
    if n_layer == 0 or n_embd == 0 or n_pos == 0 or vocab == 0:
        raise ValueError(f"{path}: no transformer blocks, or an empty embedding; not a GPT-2 checkpoint?")
    if n_layer > 1024:                                                 # names a block no file of GPT-2's size has
        raise ValueError(f"{path}: a parameter of block {n_layer - 1}; more than 1024 blocks is not a GPT-2 checkpoint")
    if os.path.isfile(cfg_file):
        if regular_file(cfg_file, "config.json") > 1 << 20:
            raise ValueError(f"{cfg_file}: over 1 MB; not a model config")
        try:
            with open(cfg_file, "rb") as f:
                hf = json.load(f)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ValueError(f"{cfg_file}: not JSON; expected Hugging Face's config.json of the weights") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{cfg_file}: not a JSON object; expected Hugging Face's config.json of the weights")
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{cfg_file}: activation {hf['activation_function']!r}; our GPT uses GELU-tanh (gelu_new)")
        eps = hf.get("layer_norm_epsilon", 1e-5)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or abs(eps - 1e-5) > 1e-12:
            raise ValueError(f"{cfg_file}: layer_norm_epsilon {eps!r}; our GPT uses 1e-5")
        n_head = hf.get("n_head")
        if not isinstance(n_head, int) or isinstance(n_head, bool) or n_head < 1 or n_embd % n_head:
            raise ValueError(f"{cfg_file}: n_head {n_head!r} must be a whole number >= 1 that divides the width {n_embd}")
        for key, have in (("n_embd", n_embd), ("n_layer", n_layer), ("n_positions", n_pos), ("vocab_size", vocab)):
            if key in hf and hf[key] != have:
                raise ValueError(f"{cfg_file}: {key} {hf[key]!r}, but the weights have {have}; config.json of other weights?")
        return n_layer, n_head, n_embd, n_pos, vocab
    by_width = {c: h for _, h, c in GPT2_SIZES.values()}
    if n_embd not in by_width:
        raise ValueError(f"{path}: no config.json beside it and width {n_embd} is not a GPT-2 size; "
                         f"cannot tell the number of heads")
    return n_layer, by_width[n_embd], n_embd, n_pos, vocab


def load_gpt2_state_dict(path):
    """Read a HF GPT-2 file (safetensors, or .bin with weights_only=True) into our parameter names:
    prefix dropped, Conv1D weights transposed, mask buffers dropped; unknown names are an error."""
    if path.endswith(".safetensors"):
        sd = read_safetensors(path)
    else:
        regular_file(path, "GPT-2 weights")
        try:
            with warnings.catch_warnings():                            # torch's notes on odd pickles: we say it
                warnings.simplefilter("ignore")
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:   # damaged, or a pickle that needs code to load: refused, none of it runs
            raise ValueError(f"{path}: cannot be read as a PyTorch state dict of plain tensors ({type(e).__name__}); "
                             f"a file that needs more than tensors to load is refused (no code in it runs)") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise ValueError(f"{path}: holds {type(sd).__name__}, not a state dict {{name: tensor}}; not a GPT-2 checkpoint?")
    ours = {}
    for name, t in sd.items():
        key = name[len("transformer."):] if name.startswith("transformer.") else name
        if key.startswith("h.") and not re.fullmatch(r"h\.\d{1,4}\.[a-z_.0-9]+", key):
            raise ValueError(f"{path}: unknown parameter {name!r}; not a GPT-2 checkpoint?")
        if key.startswith("h.") and key.split(".", 2)[2] in HF_BUFFERS:
            continue
        if key == "lm_head.weight":  # tied to wte: nothing of its own to load (checked below)
            continue
        if not (key in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias") or
                (key.startswith("h.") and key.split(".", 2)[2] in
                 {"ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias",
                  "mlp.c_fc.bias", "mlp.c_proj.bias", *CONV1D})):
            raise ValueError(f"{path}: unknown parameter {name!r}; not a GPT-2 checkpoint?")
        ours[key] = t.t() if key.endswith(CONV1D) else t               # Conv1D (in, out) -> Linear (out, in)
    for k in ("wte.weight", "wpe.weight"):
        if k not in ours:
            raise ValueError(f"{path}: no {k!r}; not a GPT-2 checkpoint?")
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd.get("transformer.wte.weight", sd.get("wte.weight"))):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; our GPT ties them as GPT-2 does")
    return ours


def load_gpt2(spec, block_size=None, vocab_size=None, pad_id=-1, dropout=0.0):
    """
    A GPT with GPT-2's weights from a local HF checkpoint (see find_gpt2_checkpoint for `spec`).
    block_size: keep only the first positions (default: all 1024). vocab_size: the tokenizer's size; one more
    than the checkpoint's is allowed when it is the PAD token, whose new embedding row is zero (PAD's logit is
    masked anyway, and a zero row never changes a real token's output).
    """
    path = find_gpt2_checkpoint(spec)
    sd = load_gpt2_state_dict(path)
    n_layer, n_head, n_embd, n_pos, vocab = gpt2_config(path, sd)
    block_size = block_size or n_pos
    if block_size > n_pos:
        raise ValueError(f"{path}: block_size {block_size} is longer than GPT-2's {n_pos} learned positions")
    sd["wpe.weight"] = sd["wpe.weight"][:block_size]
    vocab_size = vocab_size or vocab
    if vocab_size == vocab + 1 and pad_id == vocab:
        sd["wte.weight"] = torch.cat([sd["wte.weight"], torch.zeros(1, n_embd, dtype=sd["wte.weight"].dtype)])
    elif vocab_size != vocab:
        raise ValueError(f"{path}: the checkpoint has {vocab} tokens but the tokenizer has {vocab_size} "
                         f"(only one extra token, PAD = {vocab}, can be added)")
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    dropout=dropout, pad_id=pad_id)
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    sd["lm_head.weight"] = sd["wte.weight"]
    with torch.device("meta"):                    # the model's shapes without its memory: checked before building it
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    wrong = sorted(k for k in expected.keys() | sd.keys() if k not in sd or tuple(sd[k].shape) != expected.get(k))
    if wrong:
        k = wrong[0]
        raise ValueError(f"{path}: parameter {k!r} is " + ("missing" if k not in sd else f"of shape {tuple(sd[k].shape)}"
                         f"{'' if k in expected else ' but not a parameter'}") + f" for a {n_layer}-layer GPT-2 of width "
                         f"{n_embd}" + (f" (expected {expected[k]})" if k in expected and k in sd else ""))
    model = GPT(cfg)
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise ValueError(f"{path}: weights do not fit a GPT-2 of this config ({str(e).splitlines()[-1].strip()})") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: parameters missing {result.missing_keys[:5]} / unexpected "
                         f"{result.unexpected_keys[:5]} for a {n_layer}-layer GPT")
    return model


# ====================================================================================================
# Sampling and scoring
#
# Sampling responses and scoring them, for every method that samples: response strings for evaluations and
# win rates (sample_responses), reward-model scores of strings (score_texts), and one scored batch of samples
# with the log-probs a policy-gradient method needs (sample_and_score -> Samples; PPO adds its critic's values).
#
# Shape legend: B rows, Tp prompt length (left-padded), Tr response length (right-padded with PAD after EOS),
# T = Tp + Tr.
# ====================================================================================================


@torch.no_grad()
def sample_responses(model, enc, prompts, max_new_tokens, temperature, device, generator=None, batch_size=64):
    """Sample one response per prompt (left-padded batches, KV cache) -> data.Replies: each text (EOS kept as its
    marker text) and whether the model emitted the EOS token."""
    model.eval()
    rows = []
    for i in range(0, len(prompts), batch_size):
        room = model.cfg.block_size - max_new_tokens                      # a long (HH) prompt keeps its end
        ids, mask = encode_prompts(enc, prompts[i:i + batch_size], room, True)   # (b, Tp) each
        resp = model.generate(ids.to(device), mask.to(device), max_new_tokens, tok.eos_id(enc), tok.pad_id(enc),
                              temperature=temperature, generator=generator).tokens   # (b, Tr)
        rows += resp.tolist()
    return tok.decode_replies(enc, rows)


def score_texts(rm, enc, prompts, responses, device, truncate=True):
    """RM scores (n,) of prompt + response strings (a response ends with EOS when it finished), one batch.
    A prompt too long for the context is cut from the left (truncate=True) or is an error. `rm` may be the
    DDP wrapper of the model in training (its forward averages gradients; only its config is read through it)."""
    block_size = getattr(rm, "module", rm).cfg.block_size
    seqs = []
    for p, r in zip(prompts, responses):
        resp = tok.encode(enc, r)[: 3 * block_size // 4]  # a (real-data) response this long is cut off
        seqs.append(fit_prompt(tok.encode(enc, p), block_size - len(resp), truncate, f"prompt {p[:40]!r}") + resp)
    ids, mask = pad_batch(seqs, tok.pad_id(enc), left=False)                 # (n, T) each
    return rm(ids.to(device), mask.to(device), last=True)                     # (n,) the RM score


@dataclass
class Samples:
    """One batch of sampled responses, scored; every tensor is per row (B, ...)."""
    seq: torch.Tensor            # (B, T) prompt (left-padded) + response (right-padded) ids
    seq_mask: torch.Tensor       # (B, T) 1 on real tokens
    response: torch.Tensor       # (B, Tr) sampled ids, PAD after EOS
    mask: torch.Tensor           # (B, Tr) 1 on real response tokens, up to and including EOS
    old_logprobs: torch.Tensor   # (B, Tr) log π_old(a_t|s_t) at τ (the sampling loop's): the ratio's denominator
    ref_logprobs: torch.Tensor   # (B, Tr) log π_ref(a_t|s_t) at τ: the KL's reference
    scores: torch.Tensor         # (B,) RM score at the last real token
    entropy: torch.Tensor        # (B, Tr) entropy of π_old(·|s_t) at τ (monitoring)
    n_prompt: int                # Tp: the response starts at seq[:, Tp]
    t_generate: float = 0.0      # seconds spent sampling
    t_score: float = 0.0         # seconds spent on the reference's log-probs and the RM's scores
    exact_kl: torch.Tensor = None  # (B, Tr) KL(π_old || π_ref) over the vocabulary (second_forward only)

    def rows(self, idx):
        """The same Samples for rows idx (n,): every per-row tensor sliced alike."""
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


@torch.no_grad()
def sample_and_score(policy, ref, rm, prompt_ids, prompt_mask, max_new_tokens, temperature, eos_id, pad_id,
                     generator, second_forward=False):
    """
    The one rollout of every online method: sample one response per left-padded prompt (B, Tp) with the KV cache
    (pure temperature; a row that emits EOS is padded with PAD after it), keep log π_old and the entropy the
    sampling loop computed, then one no-grad pass of the frozen reference (log π_ref) and of the reward model (the
    score at the last real token). second_forward=True (PPO's --fast_rollout false, and PPO under bf16 autocast,
    where one-token and full-sequence matmuls may round differently): log π_old and the entropy from a second
    forward of the policy over the whole sequence instead, and the exact KL over the vocabulary.
    """
    policy.eval()
    t0 = time.time()
    sample = policy.generate(prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature=temperature,
                             generator=generator, return_logprobs=not second_forward)
    t_generate = time.time() - t0
    response = sample.tokens                                              # (B, Tr)
    mask = (response != pad_id).long()                                    # (B, Tr) 1 up to and incl. EOS
    seq = torch.cat([prompt_ids, response], dim=1)                        # (B, T)
    seq_mask = torch.cat([prompt_mask, mask], dim=1)                      # (B, T)
    n_prompt = prompt_ids.shape[1]
    ref_logits = response_logits(ref, seq, seq_mask, n_prompt, temperature)    # (B, Tr, V)
    ref_logprobs = logprobs_from_logits(ref_logits, response) * mask      # (B, Tr)
    if second_forward:
        logits = response_logits(policy, seq, seq_mask, n_prompt, temperature)  # (B, Tr, V)
        old_logprobs = logprobs_from_logits(logits, response) * mask      # (B, Tr) as the update computes it
        entropy = entropy_from_logits(logits) * mask                      # (B, Tr)
        exact = exact_kl(logits, ref_logits) * mask                       # (B, Tr)
        del logits
    else:
        old_logprobs, entropy, exact = sample.logprobs * mask, sample.entropy * mask, None   # (B, Tr) each
    del ref_logits                                                        # the largest tensors: free them first
    scores = rm.score(seq, seq_mask).float()                              # (B,) at the last real token
    return Samples(seq, seq_mask, response, mask, old_logprobs, ref_logprobs, scores, entropy, n_prompt, t_generate,
                   time.time() - t0 - t_generate, exact)


# ====================================================================================================
# Monitors
#
# What the RL stages watch while they train, and the samples log they keep: the paper's pattern-collapse
# signature (Secrets §5.2), the win rate judged by the reward model where there is no gold reward, PPO's
# per-iteration metrics and critic fit, the minibatch means of an update, and {stage}_samples.jsonl (the best,
# median and worst rollout of a batch and two followed validation prompts, each token with its per-token
# quantities) that studies/report.py draws. Monitoring only: nothing here feeds a gradient.
#
# Shape legend: B rollouts, Tp prompt length, Tr response length.
# ====================================================================================================


def collapse_signature(history, max_new_tokens, window):
    """
    The paper's pattern-collapse signature (§5.2, Fig. 4) in the last `window` iterations of `history`
    (list of metric dicts), compared with the window before: returns the reasons found, [] if none.
      length heading to the max (mean length ≥ 90% of max_new_tokens, or EOS rate < 50%) when the run's first
      window was not there already (a policy that never learnt to end, such as the tiny preset's, has not
      collapsed: it never ended),
      KL rising while the RM score rises and the gold reward falls.
    """
    if len(history) < 2 * window:
        return []
    now, before, first = history[-window:], history[-2 * window:-window], history[:window]
    avg = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    at_the_limit = lambda rows: avg(rows, "length") >= 0.9 * max_new_tokens or avg(rows, "eos_rate") < 0.5
    reasons = []
    if at_the_limit(now) and not at_the_limit(first):
        reasons.append(f"length {avg(now, 'length'):.1f}/{max_new_tokens}, EOS rate {avg(now, 'eos_rate'):.2f}")
    if (avg(now, "kl_seq") > avg(before, "kl_seq") + 0.5 and avg(now, "score_raw") > avg(before, "score_raw")
            and avg(now, "gold") < avg(before, "gold") - 0.05):
        reasons.append(f"KL {avg(before, 'kl_seq'):.2f}->{avg(now, 'kl_seq'):.2f}, RM score up "
                       f"{avg(before, 'score_raw'):.2f}->{avg(now, 'score_raw'):.2f}, gold down "
                       f"{avg(before, 'gold'):.2f}->{avg(now, 'gold'):.2f}")
    return reasons


@torch.no_grad()
def rm_win_rate(rm, enc, prompts, responses, opponents, device, batch_size=64):
    """Win rate of `responses` over `opponents` on the same prompts judged by the reward model (tie = ½): the
    judge when there is no gold reward (real data). Say so wherever it is reported: the policy is trained on
    this very judge."""
    scores = lambda texts: [x for i in range(0, len(prompts), batch_size)
                            for x in score_texts(rm, enc, prompts[i:i + batch_size], texts[i:i + batch_size],
                                                 device).tolist()]
    return data.win_rate(scores(responses), scores(opponents))


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over masked tokens (1 = perfect critic, ≤ 0 = useless)."""
    var_r = global_masked_moments(returns, mask)[1]
    return (1 - global_masked_moments(returns - values, mask)[1] / var_r.clamp(min=1e-8)).item()


def ppo_iteration_metrics(ro, values, scores, gold, ended, advantages, returns, running):
    """PPO's metrics of one iteration (ro: its Samples, values (B, Tr) the critic's): the paper's §5.2 ones (RM
    score, KL, length, perplexity) and the critic's fit."""
    mask, n_tokens = ro.mask, ro.mask.sum()
    kl_tokens = k1(ro.old_logprobs, ro.ref_logprobs, mask)               # (B, Tr) the penalty's estimator
    k3_tokens = k3(ro.old_logprobs, ro.ref_logprobs) * mask               # (B, Tr)
    return dict(score_raw=ro.scores.mean().item(), score_raw_std=ro.scores.std().item(),
                scores_raw=[round(x, 3) for x in ro.scores.tolist()],     # the distribution (paper Fig. 13)
                score=scores.mean().item(), gold=gold.mean().item(),
                kl_seq=kl_tokens.sum(1).mean().item(), kl_token=(kl_tokens.sum() / n_tokens).item(),
                kl_k3_seq=k3_tokens.sum(1).mean().item(),
                length=mask.sum(1).float().mean().item(), eos_rate=ended.float().mean().item(),
                perplexity=math.exp(-(ro.old_logprobs.sum() / n_tokens).item()),
                entropy=(ro.entropy.sum() / n_tokens).item(),
                **({} if ro.exact_kl is None else {"kl_exact_seq": ro.exact_kl.sum(1).mean().item()}),
                adv_mean=masked_mean(advantages, mask).item(), return_mean=masked_mean(returns, mask).item(),
                value_mean=masked_mean(values, mask).item(),
                explained_var=explained_variance(values, returns, mask),
                running_mean=running.mean, running_std=running.std)


@torch.no_grad()
def ratios_after_update(policy, ro, temperature):
    """π_θ/π_old per token (B, Tr) once the iteration's update is done (1 at padding): how far the
    update moved each sampled token, for the samples log."""
    logits = response_logits(policy, ro.seq, ro.seq_mask, ro.n_prompt, temperature)  # (B, Tr, V)
    logprobs = logprobs_from_logits(logits, ro.response)             # (B, Tr)
    return torch.exp((logprobs - ro.old_logprobs) * ro.mask)          # (B, Tr)


def log_ppo_iteration(run, cfg, monitor, history, warned, it, policy, ro, prompts, replies, gold,
                      per_token, row, update_policy):
    """
    PPO's monitoring after its step 6: every eval_interval the win rate vs SFT and the samples log (`per_token`: {name:
    (B, Tr)}, the ratio added), then the collapse signature (paper §5.2), the log row and the
    progress line. Returns `warned`: whether the collapse warning has been given.
    """
    if it % cfg.eval_interval == 0 or it == cfg.n_iters:
        row["win_rate_vs_sft"] = monitor.win_rate(policy)
        ratios = ratios_after_update(policy, ro, cfg.temperature)   # (B, Tr)
        clipped = clipped_tokens(ratios, per_token["advantage"], cfg.ratio_clip, cfg.ratio_clip)
        monitor.keep_samples(it, policy, ro, prompts, replies.texts, gold,
                             dict(per_token, ratio=ratios, clipped=clipped * ro.mask))
    history.append(row)
    reasons = collapse_signature(history, cfg.max_new_tokens, cfg.collapse_window)
    row["collapse_warning"] = bool(reasons)
    if reasons and not warned:
        print(f"WARNING: pattern collapse signature at iteration {it} (paper §5.2): "
              f"{'; '.join(reasons)}")
        warned = True
    run.log.write(**row)
    print(run.progress.line(it, f"RM {row['score_raw']:+.2f} gold {row['gold']:+.3f} KL "
                                f"{row['kl_seq']:.2f} len {row['length']:.1f} eos "
                                f"{row['eos_rate']:.2f} vf {row['vf_loss']:.3f}"
                                + ("" if update_policy else " (critic pre-training)")))
    return warned


def minibatch_means(update_stats):
    """An update's statistics ([{name: value}], one dict per optimizer step) averaged over its steps (ratio_max:
    the largest)."""
    out = {}
    for k in update_stats[0]:
        values = [s[k] for s in update_stats if k in s]
        out[k] = max(values) if k == "ratio_max" else sum(values) / len(values)
    return out


def clipped_tokens(ratio, advantages, clip_low, clip_high):
    """1.0 where the clip binds, 0.0 elsewhere: ratio (B, Tr) above 1 + clip_high where the advantage (B, Tr) is
    positive, or below 1 - clip_low where it is negative; there the token gets no policy gradient."""
    return (((ratio > 1 + clip_high) & (advantages > 0)) | ((ratio < 1 - clip_low) & (advantages < 0))).float()


# ---------------------------------------------------------------------------------------------- the samples log

def keep_samples(log, it, enc, prompts, texts, ro, gold, per_token, followed=()):
    """
    At an eval interval of an RL stage: print the best, median and worst rollout of the batch by RM score, and
    append them to the samples log (`log`, {stage}_samples.jsonl) with their per-token quantities (`per_token`:
    {name: (B, Tr)} tensors of the batch), followed by the rows of the followed validation prompts (`followed`).
    """
    order = torch.argsort(ro.scores, descending=True).tolist()
    picks = dict(best=order[0], median=order[len(order) // 2], worst=order[-1])
    kl_tokens = k1(ro.old_logprobs, ro.ref_logprobs, ro.mask)            # (B, Tr)
    print(table([(prompts[i].strip(), texts[i], ro.scores[i].item(), float(gold[i]), kl_tokens[i].sum().item())
                 for i in picks.values()], ["prompt", "response", "RM", "gold", "KL"], [30, 70, 5, 5, 5]))
    for row in sample_rows(it, enc, prompts, ro, gold, per_token, picks) + list(followed):
        log.write(**row)


def sample_rows(it, enc, prompts, ro, gold, per_token, picks):
    """Rows of the samples log for the rollouts `picks` ({label: row index}): prompt, response tokens decoded one by
    one, RM score, gold reward, and every per-token quantity cut to the response's length (so a view can colour
    each token by any of them)."""
    rows = []
    for label, i in picks.items():
        n = int(ro.mask[i].sum())
        rows.append(dict(iter=it, sample=label, prompt=prompts[i],
                         tokens=tok.decode_pieces(enc, ro.response[i, :n].tolist()),
                         rm_score=ro.scores[i].item(), gold=float(gold[i]),
                         per_token={name: [round(v, 5) for v in values[i, :n].float().tolist()]
                                    for name, values in per_token.items()}))
    return rows


@torch.no_grad()
def follow_prompts(it, policy, ref, rm, critic, enc, prompts, max_new_tokens, temperature, seed, has_gold, device):
    """
    The same validation prompts at every eval interval, sampled with the same seed, so one prompt can be followed
    over training: rows like sample_rows's ("val_0", "val_1", ...) with what a fresh sample has: k1 to the
    reference, the entropy, and the critic's value when there is a critic (PPO). Its own generator: training's
    random streams are untouched.
    """
    ids, mask = encode_prompts(enc, prompts, policy.cfg.block_size - max_new_tokens, True)  # (n, Tp) each
    s = sample_and_score(policy, ref, rm, ids.to(device), mask.to(device), max_new_tokens, temperature,
                         tok.eos_id(enc), tok.pad_id(enc), torch.Generator(device=device).manual_seed(seed))
    replies = tok.decode_replies(enc, s.response.tolist())
    gold = replies.golds(prompts) if has_gold else [float("nan")] * len(prompts)
    per_token = dict(k1=k1(s.old_logprobs, s.ref_logprobs, s.mask), entropy=s.entropy)
    if critic is not None:
        critic.eval()
        per_token["value"] = response_values(critic, s.seq, s.seq_mask, s.n_prompt).float() * s.mask  # (n, Tr)
    return sample_rows(it, enc, prompts, s, gold, per_token, {f"val_{i}": i for i in range(len(prompts))})


class ValidationMonitor:
    """
    What an RL stage watches on fixed validation prompts at each eval interval: the win rate against the SFT
    policy (both sampled with the same seed every time, so they answer the prompts with the same random stream;
    judged by the gold reward, or by the reward model where there is none) and the samples log (the batch's best,
    median and worst rollouts, and the first two validation prompts followed over training). Its own generators:
    training's random streams are untouched.
    """

    def __init__(self, enc, ref, rm, critic, prompts, max_new_tokens, temperature, seed, samples, device, has_gold=True):
        self.enc, self.ref, self.rm, self.critic, self.prompts, self.samples = enc, ref, rm, critic, prompts, samples
        self.max_new_tokens, self.temperature, self.seed, self.device = max_new_tokens, temperature, seed, device
        self.has_gold = has_gold
        self.sft_answers = self.answers(ref)

    def answers(self, model):
        """The model's responses to the validation prompts, with the seed + 1 generator."""
        return sample_responses(model, self.enc, self.prompts, self.max_new_tokens, self.temperature, self.device,
                                torch.Generator(device=self.device).manual_seed(self.seed + 1))

    def win_rate(self, policy):
        """The policy's win rate against SFT on the validation prompts (tie = ½)."""
        outs = self.answers(policy)
        return (data.gold_win_rate(self.prompts, outs, self.sft_answers) if self.has_gold else
                rm_win_rate(self.rm, self.enc, self.prompts, outs.texts, self.sft_answers.texts, self.device))

    def keep_samples(self, it, policy, ro, prompts, texts, gold, per_token):
        """The batch's best, median and worst rollouts (per_token: {name: (B, Tr)}) and the two followed
        validation prompts (sampled with seed + 2) into the samples log."""
        keep_samples(self.samples, it, self.enc, prompts, texts, ro, gold, per_token, follow_prompts(
            it, policy, self.ref, self.rm, self.critic, self.enc, self.prompts[:2], self.max_new_tokens,
            self.temperature, self.seed + 2, self.has_gold, self.device))


# ====================================================================================================
# Sanity warnings
#
# The classic silent failures of RL on language models, each turned into a plain-English warning printed once per run:
# the numbers that show them are in the logs anyway, but a student reading a log of numbers does not see them.
#
#   first_ratio   before any update the trainer's log-probs must equal the sampler's: ratio π/π_old = 1 on the
#                 first minibatch of every update (to float rounding: 1e-3 in fp32, 5e-2 under bf16 autocast)
#   kl_estimate   k1 summed over a response estimates KL(π‖π_ref) ≥ 0 without bias: a batch mean below 0 by more
#                 than 4 standard errors means the log-probs are not those of the samples' policy
#   tied_groups   every group of samples scored alike: every advantage 0, a zero policy gradient
#   advantages    a NaN / inf, or an advantage beyond ±100 (scores on a raw scale, a diverging critic)
#   no_eos        not one response of the first iterations ended with EOS: every one was cut at max_new_tokens
#
# Each message names the likely cause and the section of docs/debugging.md that explains it. Plumbing beside the
# algorithms: a stage calls these after the step whose numbers they read; nothing here changes a number.
#
# Shape legend: B responses, Tr response length.
# ====================================================================================================

RATIO_TOL_FP32, RATIO_TOL_BF16 = 1e-3, 5e-2
KL_STANDARD_ERRORS = 4.0
ADVANTAGE_LIMIT = 100.0
EOS_ITERATIONS = 3
PAGE = "docs/debugging.md"


class SanityChecks:
    """One run's warnings: each kind printed at most once (on rank 0), and remembered in `said`."""

    def __init__(self, stage):
        self.stage, self.said = stage, {}
        self.responses, self.ended, self.iterations = 0, 0, 0

    def warn(self, kind, message):
        if kind in self.said:
            return False
        self.said[kind] = message
        if rank() == 0:
            print(f"WARNING ({self.stage}): {message}", flush=True)
        return True

    def first_ratio(self, it, ratio_mean, ratio_max=None, bf16=False):
        """The ratio statistics of an update's first minibatch (before its first optimizer step)."""
        tol = RATIO_TOL_BF16 if bf16 else RATIO_TOL_FP32
        top = ratio_mean if ratio_max is None else ratio_max
        if abs(ratio_mean - 1) > tol or abs(top - 1) > tol:
            return self.warn("first_ratio", (
                f"iteration {it}: on the first minibatch, before any update, the ratio π/π_old is {ratio_mean:.4f} "
                f"on average{'' if ratio_max is None else f' (max {ratio_max:.4f})'}, not 1 (tolerance {tol:g}): "
                f"the trainer's log-probs are not the "
                f"sampler's. Likely: dropout on in the training pass, another temperature, other positions or "
                f"padding between the two passes, or bf16 sampling against fp32 training. See {PAGE}, "
                f"'The ratio-is-1 check'."))
        return False

    def kl_estimate(self, it, kl_seq):
        """kl_seq (B,): k1 summed over each response."""
        n = kl_seq.numel()
        if n < 2:
            return False
        mean, sem = kl_seq.mean().item(), kl_seq.std().item() / math.sqrt(n)
        if mean < 0 and mean < -KL_STANDARD_ERRORS * sem:
            return self.warn("kl_estimate", (
                f"iteration {it}: the mean KL estimate is {mean:.4f} nats, below 0 by {-mean / max(sem, 1e-12):.1f} "
                f"standard errors; KL(π‖π_ref) cannot be negative, so these log-probs do not belong to the policy "
                f"that sampled. Likely: sampled at one temperature and scored at another, policy and reference "
                f"swapped, or a reference that is not the starting policy. See {PAGE}, 'A KL below zero'."))
        return False

    def tied_groups(self, it, rewards, group_size):
        """rewards (B,) in groups of group_size consecutive samples (one prompt each)."""
        groups = rewards.view(-1, group_size)                             # (P, G)
        if groups.numel() and bool((groups.max(1).values == groups.min(1).values).all()):
            return self.warn("tied_groups", (
                f"iteration {it}: in every one of the {groups.shape[0]} groups the {group_size} samples got the same "
                f"reward (here {groups[0, 0].item():g}): every advantage is 0 and the policy gradient is zero. Likely: "
                f"a verifier the policy never (or always) satisfies, e.g. a weak SFT on a hard task, or a reward that "
                f"saturates. Train on prompts it can sometimes solve, sample more per prompt, or use a denser "
                f"reward. See {PAGE}, 'Every group tied'."))
        return False

    def advantages(self, it, advantages, mask=None):
        """advantages (B,) or (B, Tr) with its mask."""
        real = advantages[mask.bool()] if mask is not None else advantages.flatten()
        bad = int((~torch.isfinite(real)).sum())
        if bad:
            return self.warn("advantages", (
                f"iteration {it}: {bad} advantages are NaN or infinite: a non-finite reward, value or score reached "
                f"the advantage estimate. See {PAGE}, 'Advantages that explode'."))
        top = real.abs().max().item() if real.numel() else 0.0
        if top > ADVANTAGE_LIMIT:
            return self.warn("advantages", (
                f"iteration {it}: an advantage reaches {top:.3g} (beyond ±{ADVANTAGE_LIMIT:g}): one update will jump. "
                f"Likely: scores on a raw, large scale or a critic that diverged; normalise the scores "
                f"(--score_norm norm_clip), clip the value loss (--vf_clip) or whiten the advantages. See {PAGE}, "
                f"'Advantages that explode'."))
        return False

    def rollout(self, it, kl_seq, ended):
        """What a batch of samples can show before any update: the KL estimate's sign and whether any ended.
        kl_seq (B,) k1 summed over each response; ended (B,) bool."""
        said = self.kl_estimate(it, kl_seq)
        return self.no_eos(it, ended) or said

    def no_eos(self, it, ended):
        """ended (B,) bool: which responses of this iteration ended with EOS; judged after EOS_ITERATIONS."""
        self.responses += ended.numel()
        self.ended += int(ended.sum())
        self.iterations += 1
        if self.iterations == EOS_ITERATIONS and self.ended == 0:
            return self.warn("no_eos", (
                f"iteration {it}: not one of the first {self.responses} responses ended with EOS: every one was cut "
                f"at --max_new_tokens, and its score is read at a truncated last token. Likely: demonstrations "
                f"without the EOS token, an EOS id that differs between the tokenizer and the sampler, or an SFT "
                f"too short to learn to stop. See {PAGE}, 'No response ends'."))
        return False


# ====================================================================================================
# Logs, plots and tables
# ====================================================================================================



class JsonlLog:
    """
    Append one JSON object per line to `path`. It starts in one of three ways:
      fresh     an empty log (keep=None)
      resumed   the first `keep` lines of an interrupted run's log, the rest dropped (keep=N); a partial last line,
                left by a kill mid-write, is never a row
      staged    a fresh log written beside a finished run's, at PATH.new, until publish() moves it into place
                (staged=True): the finished run's log stays whole until the new run's first checkpoint
    The rewrite of a resumed log goes through a temporary file (replaced): when it fails the log is as it was.
    """

    def __init__(self, path, keep=None, staged=False):
        self.final_path, self.writes = path, rank() == 0                 # torchrun: rank 0 alone writes
        self.path = f"{path}.new" if staged else path
        lines = []
        if keep is not None and os.path.exists(path):
            lines = complete_lines(path)[:keep]
        self.n_lines = len(lines)
        if self.writes:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if keep is None or not os.path.exists(path) or os.path.getsize(path) != sum(map(len, lines)):
                with replaced(self.path, "wb") as f:
                    f.writelines(lines)

    @property
    def staged(self):
        return self.path != self.final_path

    def publish(self):
        """A staged log takes its place (the run's first checkpoint is about to be written)."""
        if self.staged:
            if self.writes:
                os.replace(self.path, self.final_path)
            self.path = self.final_path

    def discard(self):
        """A staged log that was never published goes (the run stopped before its first checkpoint)."""
        if self.staged and self.writes:
            with contextlib.suppress(OSError):
                os.remove(self.path)

    def write(self, **row):
        if self.writes:
            with open(self.path, "a") as f:
                f.write(json_line(row))
        self.n_lines += 1


def complete_lines(path):
    """A JSONL file's lines (bytes), without a last line that lacks its newline (a write cut short)."""
    with open(path, "rb") as f:
        lines = f.readlines()
    return lines[:-1] if lines and not lines[-1].endswith(b"\n") else lines


@contextlib.contextmanager
def replaced(path, mode="w", **kwargs):
    """
    Write a file whole or not at all: `with replaced(path) as f: f.write(...)` writes a temporary file beside
    `path` (named for this process) and moves it into place only once the block finished; a full disk, a kill or
    an error on the way leaves `path` exactly as it was.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


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


def lines_up_to(path, key, last):
    """How many leading rows of a JSONL log have row[key] <= last: what a resumed run keeps of a log whose rows
    are written in `key` order (0 when there is no file; a line that is not such a row ends what is kept)."""
    if not os.path.exists(path):
        return 0
    n = 0
    for line in complete_lines(path):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get(key), (int, float)) or row[key] > last:
                break
        except ValueError:
            break
        n += 1
    return n


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


def smooth(values, weight=0.9):
    """A debiased exponential moving average (as TensorBoard draws it): the trend of a noisy per-iteration curve,
    which starts at the first value instead of at 0."""
    out, average = [], 0.0
    for n, v in enumerate(values, 1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight ** n))
    return out


SMOOTH_FROM = 30  # curves with at least this many points are drawn faint, with their smoothed line on top


def plot_curves(path, rows, x, ys, title, logy=()):
    """Save a PNG of the JSONL rows' `ys` keys against `x` (rows without a key are skipped for that curve);
    `ys` is a list of panels, each a list of keys; panels whose index is in `logy` get a log y-axis. Long curves
    are drawn as faint raw points under a solid smoothed line. Under torchrun, rank 0 alone draws."""
    if rank() != 0:
        return
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
            if len(pts) >= SMOOTH_FROM:
                xs, vs = zip(*pts)
                raw = ax.plot(xs, vs, alpha=0.25, linewidth=0.8)[0]
                ax.plot(xs, smooth(vs), color=raw.get_color(), label=f"{key} (smoothed)")
            elif pts:
                ax.plot(*zip(*pts), label=key, marker=".")
        ax.set_xlabel(x)
        if i in logy:
            ax.set_yscale("log")
        if ax.lines:                                    # a panel whose keys have no values yet stays empty
            ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with replaced(path, "wb") as f:                    # a kill mid-write leaves the old plot, not half a PNG
        fig.savefig(f, format="png", dpi=100)
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
