"""
A study's runs, each kept, resumed or trained (train_or_keep): a study stopped anywhere continues where it was,
a run that finished with the same options kept as it is, an interrupted one resumed from its checkpoint.
"""
import glob
import os

from runs import finished_run, parse_config


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
