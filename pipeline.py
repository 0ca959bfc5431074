"""
The whole RLHF pipeline on the toy task, stage after stage, each stage's checkpoint feeding the next:

    1. train_sft.py     supervised fine-tuning on demonstrations      -> OUT/sft.pt
    2. reward_model.py  Bradley-Terry reward model on preference pairs -> OUT/rm.pt
   (3. PPO and the other RLHF algorithms are added by later stages.)

Run:
    python pipeline.py                                  # default config, CPU minutes
    python pipeline.py --preset tiny --out_dir out/tiny # seconds (what the smoke test runs)

Each stage can also be run on its own with its full set of options (`python train_sft.py --help`).
"""
import argparse
import os
import time

import reward_model
import train_sft


def main(argv=None):
    p = argparse.ArgumentParser(description="Run SFT then the reward model on the toy task.")
    p.add_argument("--out_dir", default="out", help="directory for every stage's checkpoint, log and plot")
    p.add_argument("--preset", default="default", choices=["default", "tiny"], help="size preset for every stage")
    p.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, mps")
    p.add_argument("--seed", default=0, type=int, help="seed for every stage")
    a = p.parse_args(argv)
    common = ["--preset", a.preset, "--out_dir", a.out_dir, "--device", a.device, "--seed", str(a.seed)]
    t0 = time.time()
    print("=" * 30, "stage 1: SFT", "=" * 30)
    sft = train_sft.main(common)
    print("=" * 30, "stage 2: reward model", "=" * 30)
    rm = reward_model.main(common + ["--sft_ckpt", os.path.join(a.out_dir, "sft.pt")])
    print("=" * 30, f"pipeline done in {time.time() - t0:.0f}s", "=" * 30)
    print(f"SFT: gold reward {sft['gold_sft']:.3f} (demonstrations {sft['gold_demos']:.3f}), val loss {sft['val_loss']:.3f}")
    print(f"RM : accuracy vs gold {rm['acc_gold']:.3f}, vs labels {rm['acc_labels']:.3f}, "
          f"Spearman {rm['spearman']:.3f}, Pearson {rm['pearson']:.3f}")
    print(f"checkpoints, JSONL logs and PNG plots in {a.out_dir}/")


if __name__ == "__main__":
    main()
