"""
A run of a stage, shared by every stage: the output folder it owns while it runs (claim_out_dir, a lock holding
its PID), the refusal to replace an unfinished run, the options every stage shares (RunOptions), what --resume
restores and checks (RunState, save_run, resume_run: the same config, the same input contents), --stop_after,
the object that holds all of it for a stage's main() (Run), and a study's run kept, resumed or trained
(train_or_keep). Plumbing, nothing algorithmic: read the stage files first; docs/files_and_checkpoints.md describes the files and the checkpoint format (checkpoints.py).
"""
import contextlib
import dataclasses
import glob
import hashlib
import os
import random
import signal
import sys
import time
from typing import Optional

import torch

from building_blocks.devices import gather_objects, pick_device, rank, start_ranks, world_size
from checkpoints import load_checkpoint, load_weights, read_checkpoint, rng_state, save_checkpoint, set_rng_state, write_failure
from utils import (STOP_NOTE, TRUNCATIONS, JsonlLog, Progress, device_field, field, fields_with, lines_up_to, parse_config,
                   regular_file, seed_everything)


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


def check_resume(ckpt, cfg, path):
    """--resume only continues the same run: every config field but the resume_free ones must match the checkpoint's, and
    every input file must have the contents it had when the run started."""
    if ckpt.get("done", True):  # checkpoints without the flag are finished ones
        raise ValueError(f"{path}: this run already finished (step {ckpt['step']}); nothing to resume")
    check_same_run(ckpt, cfg, path)


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


def the_checkpoint(run_dir):
    """The one checkpoint a method's run wrote in its own folder."""
    found = sorted(glob.glob(os.path.join(run_dir, "*.pt")))
    if len(found) != 1:
        raise ValueError(f"{run_dir}: expected the one checkpoint of a run, found {len(found)}")
    return found[0]


def train_or_keep(module, args, out, overwrite, stage=None):
    """One method run in `out`, continued where a study stopped: a run that finished with these options is kept,
    an interrupted one resumes from its checkpoint, otherwise (or with overwrite) it is trained from the start.
    `stage`: the run's checkpoint is out/STAGE.pt, in a folder that holds several stages' runs (else the one .pt)."""
    found = [p for p in [os.path.join(out, f"{stage}.pt")] if os.path.exists(p)] if stage else \
        glob.glob(os.path.join(out, "*.pt"))
    if overwrite or not found:
        module.main(args + (["--overwrite", "true"] if overwrite else []))
        return
    path = found[0] if stage else the_checkpoint(out)
    stage = os.path.basename(path)[:-len(".pt")]                        # a run's checkpoint is named after its stage
    if finished_run(path, stage, parse_config(module.Config, module.PRESETS, args)) is not None:
        print(f"{path}: finished with these options; kept")
    else:
        module.main(args + ["--resume", "true"])


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
    checkpoint and writes them all again, so a finished checkpoint means every file of the stage is there.
    Under torchrun every rank calls it (each rank's random state is kept: rank r resumes with its own) and rank 0
    writes; the checkpoint records the world size."""
    rng_of_ranks = gather_objects(rng_state(state.rng, state.generator))   # [rank 0's, ...]; one without torchrun
    if rank() != 0:
        return
    save_checkpoint(path, stage=stage, **{key: module.state_dict() for key, module in weights.items()}, **meta,
                    step=step, done=metrics is not None, metrics=metrics or {}, config=dataclasses.asdict(cfg),
                    optimizer=state.opt.state_dict(), rng=rng_of_ranks[0], **state.extra, log_lines=log.n_lines,
                    train_time_s=time.time() - t0, inputs=state.inputs, world_size=len(rng_of_ranks),
                    **({"rng_of_ranks": rng_of_ranks} if len(rng_of_ranks) > 1 else {}))


def resume_run(path, stage, cfg, tokenizer_id, state, weights):
    """--resume: the interrupted run's weights and state back in place (its config must match cfg); returns the
    step it stopped after."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: nothing to resume (no checkpoint here; a run writes one every --ckpt_interval "
                         f"steps); drop --resume to start the run")
    ckpt = load_checkpoint(path, stage, tokenizer_id, finished=False)
    check_resume(ckpt, cfg, path)
    if ckpt.get("world_size", 1) != world_size():     # each rank's random streams (and data share) differ
        raise ValueError(f"{path}: this run was made with {ckpt.get('world_size', 1)} process(es) and is resumed with "
                         f"{world_size()}; resume it with the same number (torchrun --nproc_per_node "
                         f"{ckpt.get('world_size', 1)}, or plain python for 1), or start over with --overwrite true")
    for key, module in weights.items():
        load_weights(module, ckpt[key], path)
    state.opt.load_state_dict(ckpt["optimizer"])
    if "rng" not in ckpt:
        raise ValueError(f"{path}: written before checkpoints kept their random state; it cannot be resumed "
                         f"exactly: start the run again without --resume")
    set_rng_state(ckpt["rng_of_ranks"][rank()] if world_size() > 1 else ckpt["rng"], state.rng, state.generator)
    state.extra = {key: ckpt[key] for key in state.extra}
    state.log_lines, state.train_time_s, state.inputs = ckpt["log_lines"], ckpt["train_time_s"], ckpt.get("inputs")
    print(f"resuming from {path} after step {ckpt['step']}")
    return ckpt["step"]


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


class Run:
    """
    One stage's run in its folder, from the claim to the release, behind one object. Every stage uses it alike:

        with Run(cfg, "rloo") as run:            # claims out_dir, refuses to replace an unfinished run, seeds, device
            ...                                  # models, optimizer, data
            restored = run.begin(opt, dict(model=policy), meta, n_steps=cfg.n_iters, rng=rng, generator=gen,
                                 saved=lambda: dict(moving=[moving.total, moving.count]))
            for it in run.steps():               # from where the run stopped (--resume)
                ...                              # one iteration; run.log.write(**row)
            if run.stopped:                      # --stop_after
                return None
            run.finish(metrics)                  # the final checkpoint, written last

    begin(): on --resume, the interrupted run's weights, optimizer, random streams and the stage's own values
    (`saved`, a function returning {name: plain value} that every checkpoint stores; `restored` holds them back,
    or saved()'s own values on a fresh start) are put back, and the JSONL logs are cut back to what the checkpoint
    had. steps() yields 1 ... n_steps from there; after each step's body it writes the periodic checkpoint (every
    ckpt_interval steps, never the last) and honours --stop_after. finish() writes the final checkpoint after the
    log and plots (a finished checkpoint means every file of the stage is there) and prints the truncation summary.
    Under torchrun every rank runs it alike and rank 0 alone writes. Leaving the `with` gives the folder back.
    """

    def __init__(self, cfg, stage, name=None, unit="iteration", data_parallel=False):
        self.cfg, self.stage, self.name, self.unit = cfg, stage, name or stage.upper(), unit
        self.ckpt_path = os.path.join(cfg.out_dir, f"{stage}.pt")
        self.samples_path = os.path.join(cfg.out_dir, f"{stage}_samples.jsonl")   # RL stages: rollouts, token by token
        self.stopped, self.log, self.samples = False, None, None
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
            # [DDP] under torchrun (SFT, RM, PPO, GRPO): this process's device, in the process group
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

    def __exit__(self, *exc):
        self.release()
        return False

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

    def begin(self, opt, weights, meta, n_steps=None, rng=None, generator=None, saved=dict, samples=False):
        """Start or (--resume) continue the run: `weights` {checkpoint key: module} and `opt` train, `meta` is what
        later stages read from the checkpoint (model_config, tokenizer, tokenizer_id, input paths), rng / generator
        the stage's random streams, `saved` the stage's own values (see the class). Returns the restored values."""
        self.opt, self.weights, self.meta, self.n_steps, self.saved = opt, weights, meta, n_steps, saved
        self.state = RunState(opt, rng, generator, extra=saved(), inputs=input_fingerprints(self.cfg))
        done = (resume_run(self.ckpt_path, self.stage, self.cfg, meta["tokenizer_id"], self.state, weights)
                if self.cfg.resume else 0)
        self.start = done + 1
        if self.cfg.stop_after and self.cfg.stop_after <= done:     # it would never be reached: the run goes to its end
            raise ValueError(f"--stop_after {self.cfg.stop_after}: the run resumes after {self.unit} {done}, past it; "
                             f"give a later {self.unit}, or 0 for off")
        # a new run beside a finished one writes its logs as PATH.new until its first checkpoint (JsonlLog)
        staged = not self.cfg.resume and not self.cfg.overwrite and os.path.exists(self.ckpt_path)
        self.log = JsonlLog(self.log_path, self.state.log_lines, staged=staged)
        if samples:
            self.samples = JsonlLog(self.samples_path, lines_up_to(self.samples_path, "iter", done)
                                    if self.cfg.resume else None, staged=staged)
        self.note_checkpoint(done)
        self.progress = Progress(n_steps) if n_steps is not None else None
        self.t_start = time.time() - self.state.train_time_s
        return self.state.extra

    def steps(self):
        """The steps (or iterations) still to run, 1-based, to n_steps (begin's, or set on the run after it when
        the length depends on what the restored state computes): after each one's body, the periodic checkpoint
        and the --stop_after stop (then self.stopped is True). self.progress prints the progress lines."""
        if self.progress is None or self.progress.total != self.n_steps:
            self.progress = Progress(self.n_steps)
        for step in range(self.start, self.n_steps + 1):
            yield step
            if step % self.cfg.ckpt_interval == 0 and step < self.n_steps:
                self.save(step)
            if stop_here(self.cfg, step, self.n_steps, self.unit):
                self.stopped = True
                self.release()
                return

    def train_time(self):
        """Seconds of training so far, the interrupted runs' included."""
        return time.time() - self.t_start

    def save(self, step, metrics=None, **final):
        """The checkpoint after `step` (metrics=None: an unfinished run's)."""
        self.state.extra = self.saved()
        with signals_held():                           # Ctrl-C / SIGTERM wait until the checkpoint and its note agree
            for log in (self.log, self.samples):
                if log is not None:
                    log.publish()                      # a staged log takes its place before the checkpoint counts it
            save_run(self.ckpt_path, self.stage, step, self.cfg, self.state, self.weights, self.log, self.t_start,
                     metrics, **self.meta, **final)
            self.note_checkpoint(step)

    def finish(self, metrics, responses_generated, policy_steps):
        """The final checkpoint (call it after the logs and plots: it is the run's last file) with the run's metrics
        and its training budget (responses sampled during training, the policy's optimizer steps: what
        studies/compare.py matches methods by), the truncation summary; the folder is given back."""
        self.save(self.n_steps, metrics, training_budget=dict(responses_generated=responses_generated,
                                                              policy_steps=policy_steps))
        TRUNCATIONS.summary(self.name)
        STOP_NOTE["text"] = STOP_NOTE["general"]      # the run is complete: a later stop is about something else
        self.release()
