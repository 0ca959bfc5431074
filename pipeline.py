"""
The whole RLHF pipeline on the toy task, stage after stage, each stage's checkpoint feeding the next:

    1. train_sft.py     supervised fine-tuning on demonstrations              -> OUT/sft.pt
    2. reward_model.py  Bradley-Terry reward model on preference pairs        -> OUT/rm.pt
    3. ppo_rlhf.py      PPO with the PPO-max recipe against the reward model  -> OUT/ppo.pt
    4. studies/evaluate.py      SFT vs PPO on held-out test prompts: gold reward, RM score, win rate, KL, ...
                                                                              -> OUT/eval.md
    then one self-contained page of the run (studies/report.py)               -> OUT/report.html

Run:
    python pipeline.py                                  # default config, CPU minutes
    python pipeline.py --preset small --out_dir out/small          # a minute or two: RLHF visibly at work
    python pipeline.py --preset small --kl_coef 0.5 --out_dir out/small_kl05   # any PPO option passes through
    python pipeline.py --preset tiny --out_dir out/tiny # seconds: a smoke test (every stage runs; numbers mean nothing)
    python pipeline.py --ppo_preset vanilla --out_dir out/vanilla   # PPO without the PPO-max tricks (docs/ppo.md)
    python pipeline.py --resume true    # after a kill or Ctrl-C: finished stages are kept, the interrupted one
                                        # continues from its last checkpoint, the rest run

Each stage can also be run on its own with its full set of options (`python ppo_rlhf.py --help`).
"""
import argparse
import os
import time

from runs import finished_run, holding, parse_config, run_main, str2bool, world_size
from studies import evaluate
import ppo_rlhf
import reward_model
import train_sft
from studies import report

SIZES = ("default", "small", "tiny")   # the size presets every stage has


def main(argv=None):
    p = argparse.ArgumentParser(description="Run SFT, the reward model, PPO and the evaluation on the toy task.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="out", help="directory for every stage's checkpoint, log and plot")
    p.add_argument("--preset", default="default", choices=SIZES,
                   help="size preset for every stage: default (CPU minutes), small (a minute or two, RLHF visibly "
                        "raising gold), tiny (seconds: a smoke test, its numbers mean nothing)")
    p.add_argument("--ppo_preset", default="ppo_max", choices=["ppo_max", "vanilla", "vanilla_pg"],
                   help="PPO recipe, applied before the size preset")
    p.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, mps")
    p.add_argument("--seed", default=0, type=int, help="seed for every stage")
    p.add_argument("--resume", default=False, type=str2bool,
                   help="continue a stopped pipeline: keep the stages that finished with these options, resume the "
                        "interrupted one from its last checkpoint, run the rest")
    p.add_argument("--overwrite", default=False, type=str2bool, help="start every stage over, even an unfinished one")
    p.epilog = ("Any other option is PPO's (python ppo_rlhf.py --help), passed through to the PPO stage after the "
                "presets: e.g. --kl_coef 0.5, --n_iters 300, --reward gold.")
    a, ppo_options = p.parse_known_args(argv)
    check_ppo_options(a, ppo_options)
    a.ppo_options = ppo_options
    if world_size() > 1:
        raise ValueError("pipeline.py runs in one process: under torchrun, launch train_sft.py, reward_model.py and "
                         "ppo_rlhf.py one by one, then studies/evaluate.py with plain python (README: past one GPU)")
    common = ["--out_dir", a.out_dir, "--device", a.device, "--seed", str(a.seed), "--overwrite", str(a.overwrite)]
    sft_path, rm_path, ppo_path = (os.path.join(a.out_dir, f) for f in ("sft.pt", "rm.pt", "ppo.pt"))
    t0, times = time.time(), {}

    def stage(name, module, args, ckpt_path=None):
        """Run one stage's main(args); with --resume, a stage that finished with these options is kept (its
        metrics read back from its checkpoint) and an interrupted one continues from its checkpoint."""
        print("=" * 30, name, "=" * 30)
        t = time.time()
        if a.resume and ckpt_path and not a.overwrite:
            stage_name = os.path.basename(ckpt_path)[:-len(".pt")]        # a stage's checkpoint is named after it
            kept = finished_run(ckpt_path, stage_name, parse_config(module.Config, module.PRESETS, args))
            if kept is not None:
                print(f"{ckpt_path}: finished with these options; kept")
                return kept
            args = args + ["--resume", str(os.path.exists(ckpt_path))]
        out = module.main(args)
        times[name] = time.time() - t
        return out

    with holding(a.out_dir):      # the folder is the pipeline's from the first stage to the report: nothing runs into it
        stages(a, stage, common, sft_path, rm_path, ppo_path, t0, times)


def ppo_presets(a):
    """The PPO stage's presets: the recipe, then the size (the default size is the recipe's own)."""
    return ["--preset", a.ppo_preset] + (["--preset", a.preset] if a.preset != "default" else [])


def check_ppo_options(a, ppo_options):
    """The options pipeline.py passes through to PPO, checked now (a typo found before SFT runs, not after it)."""
    owned = {"--out_dir", "--device", "--seed", "--resume", "--overwrite", "--sft_ckpt", "--rm_ckpt", "--preset"}
    taken = [o.split("=")[0] for o in ppo_options if o.split("=")[0] in owned]
    if taken:
        raise ValueError(f"{taken[0]}: the pipeline sets it for every stage; it cannot be passed through to PPO")
    try:
        parse_config(ppo_rlhf.Config, ppo_rlhf.PRESETS, ppo_presets(a) + ppo_options)
    except SystemExit as e:             # argparse's message is already printed, naming the option
        raise ValueError(f"pipeline.py passes every option it does not know to ppo_rlhf.py, which refused "
                         f"{' '.join(ppo_options)} (see above; python ppo_rlhf.py --help lists its options)") from e


def stages(a, stage, common, sft_path, rm_path, ppo_path, t0, times):
    """The four stages in order, each fed the checkpoints of the ones before, the summary and the report."""
    if a.preset == "tiny":
        print("--preset tiny is a smoke test: every stage runs in seconds, and a model this small learns nothing "
              "(its numbers mean nothing). --preset small shows RLHF at work in a minute or two.")
    sft = stage("1 SFT", train_sft, common + ["--preset", a.preset], sft_path)
    rm = stage("2 reward model", reward_model, common + ["--preset", a.preset, "--sft_ckpt", sft_path], rm_path)
    ppo = stage("3 PPO", ppo_rlhf, common + ppo_presets(a) + ["--sft_ckpt", sft_path, "--rm_ckpt", rm_path]
                + a.ppo_options, ppo_path)
    ev = stage("4 evaluate", evaluate, ["--out_dir", a.out_dir, "--device", a.device, "--seed", str(a.seed),
                                        "--preset", a.preset, "--sft_ckpt", sft_path, "--rm_ckpt", rm_path,
                                        "--policies", sft_path, ppo_path])
    print("=" * 30, f"pipeline done in {time.time() - t0:.0f}s", "=" * 30)
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print(f"SFT: val loss {sft['val_loss']:.3f}; gold reward {sft['gold_sft']:.3f} (demonstrations {sft['gold_demos']:.3f})")
    print(f"RM : accuracy vs gold {rm['acc_gold']:.3f}, vs labels {rm['acc_labels']:.3f}, "
          f"Spearman {rm['spearman']:.3f}, Pearson {rm['pearson']:.3f}")
    print(f"PPO: {'COLLAPSE WARNING' if ppo['collapse_warning'] else 'no collapse warning'}")
    for r in ev:
        print(f"eval {r['policy']}: gold {r['gold']:.3f}, RM {r['rm']:.2f}, win rate vs SFT {r['win_vs_sft']:.3f}, "
              f"KL to SFT {r['kl_sft']:.2f}, length {r['length']:.1f}")
    print(f"checkpoints, JSONL logs, PNG plots and eval.md in {a.out_dir}/")
    print(f"report (open it in a browser): {report.report([a.out_dir], os.path.join(a.out_dir, 'report.html'))}")


if __name__ == "__main__":
    run_main(main)
