"""
Reward-model over-optimisation on the toy task, the picture of Gao et al. 2022 (*Scaling Laws for Reward Model
Overoptimization*, Figs. 1-2): the proxy (our reward model) and the truth (the gold reward) against √KL(π‖π_SFT),
for RL (PPO-max at several KL coefficients β, each point 10 iterations of training) and for best-of-n sampling
against the reward model (n = 1 … 256). Where the two curves part is where optimising the proxy stops helping.

Run (after pipeline.py, which writes out/sft.pt and out/rm.pt):
    python -m studies.overoptimization                    # the β sweep (5 PPO runs) and best-of-n, then the figure
    python -m studies.overoptimization --only bon         # best-of-n alone (a few minutes)
    python -m studies.overoptimization --plot_only        # redraw from out_dir
    python -m studies.overoptimization --quick --sft_ckpt out/tiny/sft.pt --rm_ckpt out/tiny/rm.pt --out_dir out/tiny/oo
Outputs in out_dir: kl_<β>/ (each PPO run's folder), bon.json, overoptimization.png, summary.md. Run it again
after a kill: finished PPO runs are kept, an interrupted one resumes.

Deliberate deviations from Gao et al.:
  1. RL's gold, RM score and KL are the means over the rollouts of BLOCK consecutive iterations (training
     prompts; KL the k1 estimate summed over the response); Gao et al. evaluate held-out prompts at checkpoints.
     The rollouts cost nothing extra; best-of-n is measured on test prompts, so the two starts differ a little.
  2. Best-of-n's KL is the analytic value log n − (n−1)/n (Stiennon et al. 2020, as Gao et al. use), and its
     gold and RM score are the unbiased estimates over all n-subsets of N = 256 samples per prompt
     (bon_expectation), not one draw of n.
  3. One RM and one policy size; Gao et al.'s scaling laws fit many of each.

Shape legend: N samples per prompt, P prompts.
"""
import argparse
import json
import math
import os
import random

import torch

import data
import ppo_rlhf
import tokenizer as tok
from runs import load_models, pick_device, read_jsonl, replaced, run_main
from tokenizer import encode_prompts

BETAS = (0.0, 0.02, 0.05, 0.1, 0.2)    # PPO-max's KL coefficient; 0.1 is ppo_rlhf.py's default
N_ITERS = 300                          # twice the default run: long enough for the low-β runs to pass their peak
BON_N = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BLOCK = 10                             # iterations averaged into one point of an RL curve


# ----------------------------------------------------------------------------------------------------
# Pure functions

def bon_kl(n):
    """KL(best-of-n ‖ π) = log n − (n−1)/n nats (Stiennon et al. 2020, App. G.3; Gao et al. §2)."""
    return math.log(n) - (n - 1) / n


def bon_expectation(scores, values, n):
    """
    E[value of the highest-scoring of n samples drawn without replacement from these N]: with the samples sorted by
    score, the i-th lowest (1-based) is the best of a random n-subset with probability C(i−1, n−1) / C(N, n).
    scores, values: N floats for one prompt. Exact, with no sampling noise of its own.
    """
    N = len(scores)
    order = sorted(range(N), key=lambda i: scores[i])
    total = math.comb(N, n)
    return sum(math.comb(rank, n - 1) * values[i] for rank, i in enumerate(order) if rank >= n - 1) / total


def rl_curve(rows, block=BLOCK):
    """One PPO log -> a point per `block` consecutive iterations: their mean KL, gold and RM score, at the block's
    last iteration (the first block, critic pre-training, is the SFT policy at KL ≈ 0); a run shorter than one
    block is one point."""
    block, out = max(1, min(block, len(rows))), []
    for i in range(0, len(rows) - block + 1, block):
        part = rows[i:i + block]
        mean = lambda k: sum(r[k] for r in part) / len(part)
        out.append(dict(iter=part[-1]["iter"], kl=max(0.0, mean("kl_seq")), gold=mean("gold"), rm=mean("score_raw")))
    return out


def peak(points):
    """The point of highest gold reward of a curve (points: dicts with kl, gold, ...)."""
    return max(points, key=lambda p: p["gold"])


# ----------------------------------------------------------------------------------------------------
# Best-of-n

@torch.no_grad()
def best_of_n(sft_ckpt, rm_ckpt, n_prompts, n_samples, max_new_tokens, seed, device, batch_size=256):
    """N = n_samples responses of the SFT policy per test prompt, each scored by the RM and the gold reward; then
    for each n of BON_N the mean over prompts of bon_expectation of gold and of RM score. Returns a list of
    {n, kl, gold, rm}."""
    policy, _, rm, sft, _ = load_models(sft_ckpt, rm_ckpt, device, max_new_tokens)
    policy.eval()
    enc = tok.get_tokenizer(sft["tokenizer"])
    splits = data.prompt_splits(sft["config"]["seed"])
    prompts = data.sample_prompts(splits["test"], n_prompts, random.Random(seed))
    gen = torch.Generator(device=device).manual_seed(seed)
    flat = [p for p in prompts for _ in range(n_samples)]                 # P·N prompts, each prompt N times
    scores, golds = [], []
    for i in range(0, len(flat), batch_size):
        batch = flat[i:i + batch_size]
        ids, mask = encode_prompts(enc, batch, policy.cfg.block_size - max_new_tokens, True)   # (b, Tp) each
        ids, mask = ids.to(device), mask.to(device)
        resp = policy.generate(ids, mask, max_new_tokens, tok.eos_id(enc), tok.pad_id(enc), temperature=1.0,
                               generator=gen).tokens                      # (b, Tr)
        resp_mask = (resp != tok.pad_id(enc)).long()                      # (b, Tr)
        scores += rm.score(torch.cat([ids, resp], 1), torch.cat([mask, resp_mask], 1)).float().tolist()  # (b,)
        golds += tok.decode_replies(enc, resp.tolist()).golds(batch)
        print(f"best-of-n: {min(i + batch_size, len(flat))}/{len(flat)} samples", flush=True)
    out = []
    for n in (n for n in BON_N if n <= n_samples):
        per_prompt = [(scores[j * n_samples:(j + 1) * n_samples], golds[j * n_samples:(j + 1) * n_samples])
                      for j in range(len(prompts))]
        out.append(dict(n=n, kl=bon_kl(n),
                        gold=sum(bon_expectation(s, g, n) for s, g in per_prompt) / len(prompts),
                        rm=sum(bon_expectation(s, s, n) for s, _ in per_prompt) / len(prompts)))
    return out


# ----------------------------------------------------------------------------------------------------
# The figure and the table

def plot(path, rl, bon):
    """Two panels as Gao et al.'s: gold (solid) and RM score (dashed, right axis) against √KL, for RL (one colour
    per β; o marks each run's gold peak) and for best-of-n. rl: {β: points}; bon: points with n."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    twins = [ax.twinx() for ax in axes]
    for i, (beta, points) in enumerate(rl.items()):
        x = [math.sqrt(p["kl"]) for p in points]
        axes[0].plot(x, [p["gold"] for p in points], color=f"C{i}", label=f"β = {beta}: gold")
        twins[0].plot(x, [p["rm"] for p in points], color=f"C{i}", linestyle="--", alpha=0.6)
        top = peak(points)
        axes[0].plot(math.sqrt(top["kl"]), top["gold"], "o", color=f"C{i}")
    if bon:
        x = [math.sqrt(p["kl"]) for p in bon]
        axes[1].plot(x, [p["gold"] for p in bon], "k-o", markersize=3, label="best-of-n: gold")
        twins[1].plot(x, [p["rm"] for p in bon], "k--", alpha=0.6)
        for p in bon:
            axes[1].annotate(f"n={p['n']}", (math.sqrt(p["kl"]), p["gold"]), fontsize=7, textcoords="offset points",
                             xytext=(2, -10))
    for ax, twin, title in zip(axes, twins, (f"RL: PPO-max, one point per {BLOCK} iterations",
                                             "Best-of-n sampling against the reward model")):
        ax.set_xlabel("√KL(π ‖ π_SFT)  (√nats)")
        ax.set_ylabel("gold reward (solid)")
        twin.set_ylabel("reward-model score (dashed)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Over-optimisation: the proxy (RM) keeps rising, the truth (gold) peaks (Gao et al. 2022)")
    fig.tight_layout()
    with replaced(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def summary_markdown(rl, bon):
    """The peak of gold for every RL run and for best-of-n, with its KL, and where each ended."""
    lines = ["| optimiser | gold at the start | gold peak | its KL (nats) | its RM score | at the end: gold | KL | RM |",
             "|---|---|---|---|---|---|---|---|"]
    for beta, points in rl.items():
        top, first, last = peak(points), points[0], points[-1]
        lines.append(f"| PPO-max β = {beta} (peak at iteration {top['iter']} of {last['iter']}) | {first['gold']:.3f} | "
                     f"{top['gold']:.3f} | {top['kl']:.2f} | {top['rm']:.2f} | {last['gold']:.3f} | {last['kl']:.2f} | "
                     f"{last['rm']:.2f} |")
    if bon:
        top, first, last = peak(bon), bon[0], bon[-1]
        lines.append(f"| best-of-n (peak at n = {top['n']} of {last['n']}) | {first['gold']:.3f} | {top['gold']:.3f} | "
                     f"{top['kl']:.2f} | {top['rm']:.2f} | {last['gold']:.3f} | {last['kl']:.2f} | {last['rm']:.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# The study

def run_name(beta):
    return f"kl_{beta}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft_ckpt", default="out/sft.pt", help="SFT checkpoint: the policy's start and the KL reference")
    p.add_argument("--rm_ckpt", default="out/rm.pt", help="the reward model optimised against (the proxy)")
    p.add_argument("--out_dir", default="out/overopt", help="one folder per PPO run, bon.json, the figure and table")
    p.add_argument("--only", nargs="+", choices=[run_name(b) for b in BETAS] + ["bon"], help="run only these")
    p.add_argument("--n_iters", type=int, default=N_ITERS, help="PPO iterations of each β run")
    p.add_argument("--bon_prompts", type=int, default=128, help="test prompts for best-of-n")
    p.add_argument("--bon_samples", type=int, default=max(BON_N), help="samples per prompt (N ≥ the largest n)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the wiring in seconds")
    p.add_argument("--plot_only", action="store_true", help="no training or sampling: redraw from out_dir")
    p.add_argument("--seed", type=int, default=0, help="seed of every run and of the best-of-n samples")
    p.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, mps")
    a = p.parse_args(argv)
    if a.bon_samples < max(BON_N) and not a.quick:
        raise ValueError(f"--bon_samples {a.bon_samples}: must be at least {max(BON_N)}, the largest n")
    from studies.kept_runs import train_or_keep
    os.makedirs(a.out_dir, exist_ok=True)
    todo = a.only or [run_name(b) for b in BETAS] + ["bon"]
    if not a.plot_only:
        for beta in BETAS:
            if run_name(beta) in todo:
                out = os.path.join(a.out_dir, run_name(beta))
                args = ["--sft_ckpt", a.sft_ckpt, "--rm_ckpt", a.rm_ckpt, "--out_dir", out, "--seed", str(a.seed),
                        "--device", a.device, "--kl_coef", str(beta), "--n_iters", str(a.n_iters)]
                train_or_keep(ppo_rlhf, args + (["--preset", "tiny", "--n_iters", "6"] if a.quick else []), out, False)
        if "bon" in todo:
            n_prompts, n_samples = (4, 8) if a.quick else (a.bon_prompts, a.bon_samples)
            bon = best_of_n(a.sft_ckpt, a.rm_ckpt, n_prompts, n_samples, 12 if a.quick else 48, a.seed,
                            pick_device(a.device))
            with replaced(os.path.join(a.out_dir, "bon.json"), "w") as f:
                json.dump(bon, f, indent=1)
    rl, bon = read_results(a.out_dir)
    plot(os.path.join(a.out_dir, "overoptimization.png"), rl, bon)
    md = summary_markdown(rl, bon)
    with replaced(os.path.join(a.out_dir, "summary.md"), "w") as f:
        f.write(md)
    print(md)
    return rl, bon


def read_results(out_dir):
    """({β: RL curve} of the finished or stopped runs found, best-of-n points or []) from out_dir."""
    rl = {}
    for beta in BETAS:
        path = os.path.join(out_dir, run_name(beta), "ppo_log.jsonl")
        if os.path.exists(path):
            rl[beta] = rl_curve(read_jsonl(path))
    bon_path = os.path.join(out_dir, "bon.json")
    bon = json.load(open(bon_path)) if os.path.exists(bon_path) else []
    return rl, bon


if __name__ == "__main__":
    run_main(main)
