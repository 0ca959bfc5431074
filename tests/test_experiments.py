"""experiments.py: the quick mode runs every ablation through ppo_rlhf.py and draws every figure; the summary
helpers read logs correctly; the 150-iteration PPO-max curve really is the start of the 300-iteration run."""
import os

import ppo_rlhf
from checkpoints import load_checkpoint
from studies import experiments
from utils import read_jsonl

TIMING = {"t_generate", "t_score", "t_train", "t_iter"}


def test_quick_runs_every_ablation_and_draws_the_figures(tiny_pipeline, tmp_path):
    out = str(tmp_path / "exp")
    ck = ["--sft_ckpt", f"{tiny_pipeline}/sft.pt", "--rm_ckpt", f"{tiny_pipeline}/rm.pt", "--device", "cpu"]
    summary = experiments.main(["--quick", "--out_dir", out] + ck)
    assert set(summary) == set(experiments.EXPERIMENTS) | set(experiments.ALIASES)
    for name in list(experiments.FIGURES) + ["reward_distribution"]:
        assert os.path.getsize(os.path.join(out, f"{name}.png")) > 0, name
    assert summary["ppo_max_long"]["iters"] == 8 and summary["ppo_max"]["iters"] == 4
    # each run really used its switches: its log (no critic pre-training) and the config saved in its checkpoint
    assert read_jsonl(f"{out}/vanilla/ppo_log.jsonl")[0]["policy_updated"]       # no critic pre-training
    config = lambda run: load_checkpoint(f"{out}/{run}/ppo.pt", "ppo")["config"]
    assert (config("vanilla")["kl_coef"], config("vanilla")["score_norm"], config("vanilla")["vf_clip"]) == (0, "none", 0)
    assert (config("kl_0.1")["kl_coef"], config("kl_0.1")["score_norm"]) == (0.1, "none")
    assert (config("ppo_max_long")["kl_coef"], config("ppo_max_long")["score_norm"]) == (0.1, "norm_clip")
    assert len(read_jsonl(f"{out}/vanilla/ppo_log.jsonl")[0]["scores_raw"]) == 8  # rollout_batch of tiny
    # the alias: a separate 4-iteration PPO-max run is identical to the first 4 iterations of the long run
    ppo_rlhf.main(["--preset", "tiny", "--out_dir", str(tmp_path / "short")] + ck)
    short = read_jsonl(str(tmp_path / "short" / "ppo_log.jsonl"))
    long_ = read_jsonl(f"{out}/ppo_max_long/ppo_log.jsonl")[:4]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(short) == strip(long_)
    # --skip_existing runs nothing when every run finished
    again = experiments.main(["--quick", "--out_dir", out, "--skip_existing"] + ck)
    assert again.keys() == summary.keys()


def test_summarize_run_and_first_warning_by_hand():
    wins = {5: 0.6, 10: 0.7, 15: 0.55, 20: 0.4}                          # an early peak, then a fall
    rows = [dict(iter=i, score_raw=float(i), gold=0.1 * i, kl_seq=1.0, perplexity=2.0, length=10.0, eos_rate=1.0,
                 collapse_warning=i >= 15, **({"win_rate_vs_sft": wins[i]} if i in wins else {}))
            for i in range(1, 21)]
    s = experiments.summarize_run(rows, window=10)
    assert s["iters"] == 20 and s["rm"] == sum(range(11, 21)) / 10
    assert s["collapse_iter"] == 15 and experiments.first_warning(rows[:14]) is None
    assert s["win_final"] == 0.4 and (s["win_peak"], s["win_peak_iter"]) == (0.7, 10)
