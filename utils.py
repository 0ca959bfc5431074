"""
Boilerplate every stage shares and nothing algorithmic: the dataclass <-> argparse bridge and the option checks
(each field's rule declared beside it), seeding, prompt fitting and padding, autocast, one-line errors, masked
means, the JSONL log, a progress line with ETA, plots and a plain-text table. The device and torchrun's helpers
live in building_blocks/devices.py, checkpoints in checkpoints.py, a run and --resume in building_blocks/runs.py.
(The RLHF logic lives in the stage files; read those first.)
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import stat
import sys
import time

import numpy as np
import torch

from building_blocks.devices import global_masked_moments, leave_ranks, rank

# ---------------------------------------------------------------------------------------------- config

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
    rule = dict(range=range and _interval(range), choices=choices, valid=valid, global_batch=global_batch,
                input_file=input_file, resume_free=resume_free)
    metadata = dict(help=help, **{k: v for k, v in rule.items() if v})
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def device_field():
    """The --device option every stage has, with its check."""
    return field("auto", "auto (cuda -> mps -> cpu), cpu, cuda, cuda:N, mps",
                 valid=(lambda v: v in ("auto", "cpu", "mps") or str(v).startswith("cuda"), "auto, cpu, cuda, cuda:N or mps"),
                 resume_free=True)


def _interval(text):
    """ "[0, 1)" -> (0.0, 1.0, low closed: True, high closed: False, "[0, 1)") """
    text = text.strip()
    low, high = (float(part) for part in text[1:-1].split(","))
    return low, high, text[0] == "[", text[-1] == "]", text


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


def _outside(interval, value):
    low, high, low_closed, high_closed, _ = interval
    return not ((low <= value if low_closed else low < value) and (value <= high if high_closed else value < high))


def check_options(cfg):
    """One-line ValueError for the first option whose value cannot work, named as on the command line (cfg: a
    Config dataclass whose fields were declared with field(): each field's rule stands beside it)."""
    n_ranks = int(os.environ.get("WORLD_SIZE", "1"))                  # set by torchrun
    for f in dataclasses.fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"--{f.name} {value!r}: must be a finite number")      # inf passes "(0, inf)"; nan no rule
        if (("range" in m and _outside(m["range"], value)) or ("choices" in m and value not in m["choices"])
                or ("valid" in m and not m["valid"][0](value))):
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


def uses_bf16(device, enabled=True):
    """Whether autocast(device, enabled) runs in bf16: on CUDA only."""
    return enabled and str(device).startswith("cuda")


def autocast(device, enabled=True):
    """bf16 autocast on CUDA only: matmuls run in bf16, softmax / log-softmax / losses in fp32 (torch's autocast
    lists). CPU and MPS stay in fp32, so every number the tests check is the plain fp32 math."""
    if uses_bf16(device, enabled):
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


class Terminated(Exception):
    """SIGTERM (what `timeout`, `kill` and job schedulers send) arrived: stop as on Ctrl-C."""


STOP_NOTE = dict(general="the last periodic checkpoint in --out_dir is intact: run the same command with --resume true "
                         "to continue from it")
STOP_NOTE["text"] = STOP_NOTE["general"]    # what a stop says; building_blocks.runs.Run names the exact checkpoint


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


def regular_file(path, what="an input"):
    """Check that `path` is a regular file (a link to one is fine) before anything opens it: a FIFO or a device
    would block or stream forever, a folder fails late. Returns its size in bytes; one-line errors otherwise."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found ({what})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror}; {what})") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
                "not a plain file")
        raise ValueError(f"{path}: is {kind}; {what} must be a regular file")
    return os.path.getsize(path)


# ---------------------------------------------------------------------------------------------- masked tensors

def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1 (over `dim`, or everything)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask):
    """Unbiased variance of x over mask."""
    # [assignment: whitening]
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)
    # [end assignment: whitening]


def masked_whiten(x, mask, shift_mean=True, over_ranks=False):
    """(x - μ) / σ over masked positions (shift_mean=False keeps the mean: (x - μ)/σ + μ). Padding stays 0.
    over_ranks: under torchrun, μ and σ of every rank's rows together (global_masked_moments)."""
    mean, var = global_masked_moments(x, mask) if over_ranks else (masked_mean(x, mask), masked_var(x, mask))
    # [assignment: whitening]
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask
    # [end assignment: whitening]


# ---------------------------------------------------------------------------------------------- logging

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


