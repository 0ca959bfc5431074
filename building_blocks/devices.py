"""
The device a stage runs on (pick_device: cuda -> mps -> cpu), and the few data-parallel helpers torchrun needs.

Skip on a first read. `torchrun --nproc_per_node N stage.py ...` starts N processes ("ranks"), one per device,
that train one model together (PyTorch DDP). With plain `python` there is no process group: every function here
then returns its input unchanged, and rank() is 0 of world_size() 1. The stages mark the lines that use them
with [DDP].
"""
import os
import sys

import torch
import torch.distributed as dist


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
    masked_var give for the rows of all ranks concatenated."""
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
