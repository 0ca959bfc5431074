"""Per-token views, the samples log of the RL stages, and the self-contained report page."""
import html
import json
import os
import re

import pytest

import ppo_rlhf
import tokenizer as tok
from studies import report
from studies.report import token_view_html
from runs import read_jsonl, run_main, smooth

TINY = ["--preset", "tiny", "--device", "cpu"]


def test_samples_log_has_per_token_arrays_as_long_as_each_response(tiny_pipeline):
    """PPO keeps the best, median and worst rollout and two followed validation prompts at each eval interval,
    each with every per-token quantity, one value per response token."""
    rows = read_jsonl(f"{tiny_pipeline}/ppo_samples.jsonl")
    assert [(r["iter"], r["sample"]) for r in rows[:5]] == [(2, "best"), (2, "median"), (2, "worst"), (2, "val_0"),
                                                            (2, "val_1")]
    assert {"k1", "reward", "value", "advantage", "return", "entropy", "ratio", "clipped"} == set(rows[0]["per_token"])
    assert set(rows[3]["per_token"]) == {"k1", "entropy", "value"}          # a fresh rollout: no update yet
    for r in rows:
        assert all(len(v) == len(r["tokens"]) > 0 for v in r["per_token"].values())
    assert rows[3]["prompt"] == rows[8]["prompt"]                            # the same prompt followed
    enc = tok.get_tokenizer("toy")
    assert "".join(rows[0]["tokens"]) == tok.decode(enc, tok.encode(enc, "".join(rows[0]["tokens"])))
    best = rows[0]
    assert best["rm_score"] >= rows[1]["rm_score"] >= rows[2]["rm_score"]


def test_token_pieces_join_to_the_text_even_for_bytes_that_are_not_utf8():
    enc = tok.get_tokenizer("toy")
    for ids in (tok.encode(enc, "Héllo – ok<|endoftext|>"), [72, 195, 195, 169, 226, 128], [165, 72]):
        pieces = tok.decode_pieces(enc, ids)
        assert len(pieces) == len(ids) and "".join(pieces) == enc.decode(ids)


def test_token_view_escapes_model_output_and_centres_the_scale():
    view = token_view_html(["<script>alert(1)</script>", " ok", "\n"], [0.5, -1.0, 0.0], "advantage")
    assert "<script>" not in view and "&lt;script&gt;alert(1)&lt;/script&gt;" in view
    assert "rgba(178,24,43,0.50)" in view and "rgba(33,102,172,1.00)" in view  # +0.5 of 1 red, -1 full blue
    assert "↵" in view
    ratio = token_view_html(["a"], [1.0], "ratio")                            # the ratio's neutral value is 1
    assert "rgba(33,102,172,0.00)" in ratio
    entropy = token_view_html(["a", "b"], [0.5, 2.0], "entropy", scale=1.0)    # non-negative: one hue from 0
    assert "rgba(84,39,143,0.50)" in entropy and "rgba(84,39,143,1.00)" in entropy and "178,24,43" not in entropy


def test_one_colour_scale_per_quantity_for_every_card():
    """The same value has the same colour on every card: the scale is the page's, not the card's."""
    cards = [dict(per_token={"k1": [0.1, -0.2] + [0.0] * 18}), dict(per_token={"k1": [1.0] * 20, "entropy": [3.0]})]
    scales = report.colour_scales(cards, ["k1", "entropy", "advantage"])
    assert scales == {"k1": 1.0, "entropy": 3.0, "advantage": 1.0}             # 95th percentile of |k1| is 1.0
    small = token_view_html(["a"], [0.5], "k1", scales["k1"])
    assert "rgba(178,24,43,0.50)" in small                                     # not full red on its own card


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])         # starts at the first value, not 0
    assert smooth([0.0, 10.0], weight=0.9) == pytest.approx([0.0, 1.0 / 0.19])


def test_report_of_a_finished_run_is_one_offline_page(tiny_pipeline, tmp_path):
    path = report.report([tiny_pipeline], str(tmp_path / "report.html"))
    page = open(path, encoding="utf-8").read()
    tags = re.findall(r"<[^>]+>", re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page))
    assert not any("http" in t or "//" in t for t in tags)                   # no URL to fetch: opens offline
    assert page.count("data:image/png;base64,") == 4                  # SFT, RM, paper panels, PPO diagnostics
    assert "Final evaluation (studies/evaluate.py, 16 test prompts)" in page and "win_vs_sft" in page
    assert "iteration 2" in page and ">advantage</option>" in page and "<select" in page
    assert html.escape(report.CARD_TIMES) in page and "advantage: not computed for this card" in page  # val cards
    assert "(the run has not finished)" not in page
    assert os.path.exists(f"{tiny_pipeline}/report.html")                    # pipeline.py wrote its own


def test_report_of_a_stopped_run_and_of_two_runs(base, tmp_path):
    out = str(tmp_path / "stopped")
    ppo_rlhf.main(TINY + ["--out_dir", out, "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt",
                          "--ckpt_interval", "2", "--stop_after", "2"])
    page = open(report.report([out], str(tmp_path / "stopped.html")), encoding="utf-8").read()
    assert "(the run has not finished)" in page and "iteration 2" in page
    page = open(report.report([out, base], str(tmp_path / "two.html")), encoding="utf-8").read()
    assert "<h2>All runs</h2>" in page and page.count("<h2>") == 4   # the frontier, each run, base: SFT/RM/eval too


def test_report_of_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(lambda: report.main([str(tmp_path)]))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: no run here (no {{stage}}_log.jsonl of "
                                               f"iterations: PPO, RLOO, RAFT, GRPO, ...)")


def test_the_report_escapes_every_string_it_takes_from_a_run_folder(tmp_path):
    """Hostile keys and values in a run folder's files -- a per-token quantity named to close the <style> block, a
    sample name, a prompt, tokens, config keys and values, the folder's own name -- end up as text: no tag, no
    attribute, no style rule of theirs reaches the page."""
    import torch
    evil = '</style><script>alert(1)</script><img src=x onerror=alert(2)>"\'{}'
    run = tmp_path / f"run{evil.replace('/', '')}"
    run.mkdir()
    (run / "ppo_log.jsonl").write_text(json.dumps({"iter": 1, "gold": 0.5, evil: evil}) + "\n")
    row = {"iter": 1, "sample": evil, "prompt": evil, "rm_score": 1.0, "gold": None, "tokens": [evil, "ok"],
           "per_token": {evil: [0.1, -0.2], "k1": [0.0, 0.3]}}
    (run / "ppo_samples.jsonl").write_text(json.dumps(row) + "\n")
    torch.save({"stage": "ppo", "config": {evil: evil, "n_iters": 1}}, run / "ppo.pt")
    page = open(report.report([str(run)], str(tmp_path / "page.html")), encoding="utf-8").read()
    assert "<script" not in page and "<img src=x" not in page and '"\'{}' not in page     # no tag, no quote unescaped
    assert page.count("</style>") == 2                                   # the page's own two style blocks
    assert "&lt;/style&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page   # shown, as text
