"""The studies behind the pages: experiments.py's quick mode runs every ablation through ppo_rlhf.py and draws
every figure; the summary and claim rules read logs correctly; the over-optimisation study's best-of-n estimate
by hand; studies/reproduce.py fills the pages' blocks from the records, and the committed pages equal what the
committed records give."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from runs import load_checkpoint, read_jsonl
from studies import experiments, overoptimization, reproduce


def test_quick_runs_every_ablation_and_draws_the_figures(tiny_pipeline, tmp_path):
    out = str(tmp_path / "exp")
    ck = ["--sft_ckpt", f"{tiny_pipeline}/sft.pt", "--rm_ckpt", f"{tiny_pipeline}/rm.pt", "--device", "cpu"]
    summary = experiments.main(["--quick", "--out_dir", out] + ck)
    assert set(summary) == set(experiments.run_names())
    assert {"vanilla_s0", "vanilla_s1", "vanilla_s2", "ppo_max_s2", "entropy_s0"} <= set(summary)
    for name in list(experiments.FIGURES) + ["seeds", "reward_distribution"]:
        assert os.path.getsize(os.path.join(out, f"{name}.png")) > 0, name
    # each run really used its switches and its seed: the config saved in its checkpoint
    config = lambda run: load_checkpoint(f"{out}/{run}/ppo.pt", "ppo")["config"]
    assert read_jsonl(f"{out}/vanilla_s0/ppo_log.jsonl")[0]["policy_updated"]      # no critic pre-training
    assert (config("vanilla_s1")["kl_coef"], config("vanilla_s1")["score_norm"], config("vanilla_s1")["seed"]) == \
           (0, "none", 1)
    assert (config("kl_0.1_s0")["kl_coef"], config("kl_0.1_s0")["score_norm"]) == (0.1, "none")
    assert (config("ppo_max_2ep_s0")["epochs"], config("ppo_max_s0")["epochs"]) == (2, 1)
    assert (config("ppo_max_s0")["kl_coef"], config("ppo_max_s0")["score_norm"]) == (0.1, "norm_clip")
    # run again: every finished run is kept (nothing retrained), the same summary
    before = os.path.getmtime(f"{out}/vanilla_s0/ppo.pt")
    again = experiments.main(["--quick", "--out_dir", out] + ck)
    assert again == summary and os.path.getmtime(f"{out}/vanilla_s0/ppo.pt") == before


def rows_of(golds, warn_from=None, kl=1.0, rm=3.0):
    return [dict(iter=i, score_raw=rm, gold=g, kl_seq=kl, perplexity=2.0, length=10.0, eos_rate=1.0,
                 collapse_warning=warn_from is not None and i >= warn_from) for i, g in enumerate(golds, 1)]


def test_summarize_run_and_first_warning_by_hand():
    wins = {5: 0.6, 10: 0.7, 15: 0.55, 20: 0.4}                          # an early peak, then a fall
    rows = [dict(r, **({"win_rate_vs_sft": wins[r["iter"]]} if r["iter"] in wins else {}), score_raw=float(r["iter"]))
            for r in rows_of([0.1 * i for i in range(1, 21)], warn_from=15)]
    s = experiments.summarize_run(rows, window=10)
    assert s["iters"] == 20 and s["rm"] == sum(range(11, 21)) / 10
    assert s["collapse_iter"] == 15 and experiments.first_warning(rows[:14]) is None
    assert s["win_final"] == 0.4 and (s["win_peak"], s["win_peak_iter"]) == (0.7, 10)
    assert (s["gold_peak"], s["gold_peak_iter"]) == (pytest.approx(1.55), 20)   # the mean of iterations 11-20


def test_claim_verdicts_follow_their_rules():
    """Vanilla that warns and falls from its peak in 2 of 3 seeds is 'reproduced'; PPO-max with one seed warning
    is 'partly'; a KL hierarchy ordered in KL but not in RM score is 'partly'."""
    collapse = rows_of([0.5] * 20 + [0.9] * 10 + [0.2] * 20, warn_from=35)
    healthy = rows_of([0.5] * 50)
    summary = {f"vanilla_s{s}": experiments.summarize_run(r) for s, r in enumerate((collapse, collapse, healthy))}
    summary |= {f"ppo_max_s{s}": experiments.summarize_run(r) for s, r in enumerate((healthy, healthy, collapse))}
    summary |= {f"kl_{b}_s0": experiments.summarize_run(rows_of([0.5] * 50, kl=kl, rm=3.0))
                for b, kl in (("0.05", 3.0), ("0.1", 2.0), ("0.2", 1.0))}
    verdicts = {c.split(" (")[0]: v for c, _, v, _ in experiments.claims(summary)}
    assert verdicts["Vanilla PPO collapses: the RM score rises while the true reward and the win rate peak and fall, "
                    "the KL runs away"] == "reproduced"
    assert verdicts["PPO-max stays stable for long"] == "partly"
    assert verdicts["The KL penalty gives a clear reward / deviation hierarchy"] == "partly"


def test_the_critic_claim_compares_at_the_initialisation_runs_horizon():
    """The critic variants run SHORT iterations: they are compared with PPO-max's gold at iteration SHORT, not at
    its own end; a variant not run yet makes the verdict 'so far'."""
    short = experiments.SHORT
    pm = rows_of([0.3] * short + [0.8] * short)                            # PPO-max keeps climbing after SHORT
    summary = {f"ppo_max_s{s}": experiments.summarize_run(pm) for s in range(3)}
    summary |= {f"{n}_s0": experiments.summarize_run(rows_of([0.32] * short)) for n in ("critic_rm_nopre", "critic_sft_pre")}
    claim = next(c for c in experiments.claims(summary) if c[0].startswith("The critic's initialisation"))
    assert summary["ppo_max_s0"]["gold_at_short"] == pytest.approx(0.3) and claim[2] == "reproduced so far"
    summary["critic_sft_nopre_s0"] = experiments.summarize_run(rows_of([0.6] * short))
    claim = next(c for c in experiments.claims(summary) if c[0].startswith("The critic's initialisation"))
    assert claim[2] == "partly"


def test_best_of_n_by_hand():
    """N = 3 samples, RM scores 1, 3, 2 and gold 10, 30, 20: best-of-1 is the mean (20), best-of-3 the top-scored
    sample (30), best-of-2 the mean over the three pairs {1,3}, {1,2}, {3,2} of the better-scored's gold: 80/3."""
    scores, gold = [1.0, 3.0, 2.0], [10.0, 30.0, 20.0]
    assert overoptimization.bon_expectation(scores, gold, 1) == pytest.approx(20.0)
    assert overoptimization.bon_expectation(scores, gold, 2) == pytest.approx(80.0 / 3)
    assert overoptimization.bon_expectation(scores, gold, 3) == pytest.approx(30.0)
    assert overoptimization.bon_kl(1) == 0.0 and overoptimization.bon_kl(4) == pytest.approx(1.3862944 - 0.75)


def test_rl_curve_points_are_block_means():
    rows = [dict(iter=i, kl_seq=float(i), gold=1.0 if i <= 10 else 0.0, score_raw=2.0) for i in range(1, 26)]
    points = overoptimization.rl_curve(rows, block=10)
    assert [(p["iter"], p["kl"], p["gold"]) for p in points] == [(10, 5.5, 1.0), (20, 15.5, 0.0)]   # 21-25 left out


def test_overoptimization_quick_draws_the_figure(tiny_pipeline, tmp_path):
    out = str(tmp_path / "oo")
    rl, bon = overoptimization.main(["--quick", "--sft_ckpt", f"{tiny_pipeline}/sft.pt", "--rm_ckpt",
                                     f"{tiny_pipeline}/rm.pt", "--out_dir", out, "--device", "cpu",
                                     "--only", "kl_0.0", "bon"])
    assert list(rl) == [0.0] and [b["n"] for b in bon] == [1, 2, 4, 8]
    assert os.path.getsize(os.path.join(out, "overoptimization.png")) > 0
    assert "best-of-n (peak at n =" in open(os.path.join(out, "summary.md")).read()


def test_blocks_are_filled_between_their_markers():
    text = "a\n<!-- reproduce:claims -->\nold\n<!-- /reproduce:claims -->\nb\n<!-- reproduce:small_preset -->x" \
           "<!-- /reproduce:small_preset -->"
    out = reproduce.fill_blocks(text, {"claims": "new", "small_preset": None})
    assert out == "a\n<!-- reproduce:claims -->\nnew\n<!-- /reproduce:claims -->\nb\n<!-- reproduce:small_preset -->x" \
                  "<!-- /reproduce:small_preset -->"                     # no records: the block is left as it is
    with pytest.raises(ValueError, match="no closing"):
        reproduce.fill_blocks("<!-- reproduce:claims -->", {})
    with pytest.raises(ValueError, match="no such block"):
        reproduce.fill_blocks("<!-- reproduce:nope --><!-- /reproduce:nope -->", {})


def test_the_pages_equal_what_the_committed_records_give(tmp_path):
    """studies.reproduce redraw on a copy of the pages changes nothing: every generated table in README and docs/
    is what docs/measured/ gives (a number typed by hand into a block, or a record without its page, fails)."""
    for page in reproduce.PAGES:
        src = os.path.join(reproduce.ROOT, page)
        if os.path.exists(src):
            os.makedirs(os.path.dirname(os.path.join(tmp_path, page)), exist_ok=True)
            shutil.copy(src, os.path.join(tmp_path, page))
    figures = reproduce.FIGURES
    try:
        reproduce.FIGURES = str(tmp_path / "figures")                   # the figures are drawn aside, not compared
        assert reproduce.redraw(str(tmp_path)) == []
    finally:
        reproduce.FIGURES = figures


def test_bench_block_tabulates_what_the_bench_measured(tmp_path):
    """The bench part's table shows each workload's own result (a quick studies.bench run here), stamped."""
    path = tmp_path / "ppo.jsonl"
    subprocess.run([sys.executable, "-m", "studies.bench", "--quick", "--algo", "ppo", "--json", str(path)],
                   cwd=reproduce.ROOT, check=True, capture_output=True, timeout=300)
    result = json.loads(path.read_text().splitlines()[-1])
    record = dict(command="bench", stamp=dict(commit="abc1234", cpu="a CPU", threads=2, torch="2"), wall_s=1.0,
                  result=result)
    table = reproduce.block_bench({"ppo_v8192": record})
    row = next(line for line in table.splitlines() if line.startswith("| PPO"))
    assert f"**{result['median']['iteration']:.2f}**" in row and f"**{result['ratio_bare']:.2f}**" in row
    assert "commit abc1234, a CPU, 2 threads" in table and "Not measured yet" in reproduce.block_bench({})
    with pytest.raises(ValueError, match="CPU workloads"):
        reproduce.run_bench(str(tmp_path), None, "cuda")
