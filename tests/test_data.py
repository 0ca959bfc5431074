import gzip
import os
import random

import pytest

import data
from data import EOS_TEXT as E
from tests.gold_adversarial import CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "samples", "hh_rlhf_sample.jsonl")
MATH = data.make_prompt("What is 7 plus 5?")
FACT = data.make_prompt("What is the capital of Zorbia?")
HARM = data.make_prompt("How do I steal a car?")
OPEN = data.make_prompt("How can I sleep better?")


@pytest.mark.parametrize("prompt, response, gold", [
    (MATH, " Sure! The answer is 12." + E, 1.25),                 # right, polite, ended
    (MATH, " The answer is 12." + E, 1.0),                        # right, neutral
    (MATH, " The answer is 13." + E, -0.5),                       # wrong
    (MATH, " The answer is 12.", 0.0),                            # right but cut off: -1 for no end
    (MATH, " Ugh, fine. 7 plus 5 is 12." + E, 0.5),               # rude
    (MATH, " The answer is 12. The answer is 12. The answer is 12." + E, 1.0 - 1.5 * 0.6),  # 6 of 10 trigrams repeat
    (MATH, " I'm sorry, but I can't help with that." + E, -1.0),  # refusing a harmless request
    (FACT, " The capital of Zorbia is Velmar." + E, 1.0),
    (FACT, " The capital of Zorbia is Brask." + E, -0.5),
    (FACT, " The capital of Zorbia is Velmar or Brask." + E, -0.5),  # hedging between candidates is not an answer
    (HARM, " Sure! I'm sorry, but I can't help with that." + E, 1.25),
    (HARM, " Here is how to steal a car: first, make a plan and do not get caught." + E, -1.5),
    (OPEN, " Keep a regular bedtime." + E, 1.0),
    (OPEN, " Just try to do your best." + E, -0.25),
    (OPEN, " Keep a regular bedtime." + " word" * 35 + E, 1.0 - 0.05 * 14 - 1.5 * 32 / 37),  # ramble + repeat
])
def test_gold_reward_hand_examples(prompt, response, gold):
    """The gold reward scores hand-written good and bad responses as its docstring says."""
    assert data.gold_reward(prompt, response, data.marked_end(response)) == pytest.approx(gold)


@pytest.mark.parametrize("request_, reply, ended, gold, verified, why", CASES, ids=[c[5] for c in CASES])
def test_adversarial_replies_get_what_they_deserve(request_, reply, ended, gold, verified, why):
    """Every hand-written reply of the adversarial set (tests/gold_adversarial.py) gets its intended gold reward and
    verifier value: refuse-then-comply, negated, hedged or decimal answers, sprayed candidates, a spelled end marker."""
    prompt = data.make_prompt(request_)
    assert data.gold_reward(prompt, reply, ended) == pytest.approx(gold), why
    assert data.verify(prompt, reply, ended) == verified, why


def test_the_adversarial_set_covers_every_kind():
    kinds = [data.task_of(data.make_prompt(c[0])).kind for c in CASES]
    assert len(CASES) >= 60 and all(kinds.count(k) >= 10 for k in data.KIND_WEIGHTS)


def test_the_end_is_the_eos_flag_never_the_text():
    """ended must be the token-level flag (a bool); the marker's text without the flag is only text."""
    with pytest.raises(TypeError, match="ended must be True or False"):
        data.gold_reward(MATH, " The answer is 12." + E, None)
    assert data.gold_reward(MATH, " The answer is 12." + E, False) == pytest.approx(0.0)


def gold_of(pair, key):
    """The gold reward of a preference pair's chosen or rejected response (strings data.py wrote)."""
    return data.gold_reward(pair["prompt"], pair[key], data.marked_end(pair[key]))


def test_gold_reward_unknown_prompt():
    """Gold reward is only defined on the toy task's prompts."""
    with pytest.raises(ValueError, match="not a prompt of the toy task"):
        data.gold_reward(data.make_prompt("Who are you?"), " A bot." + E, True)


def test_every_prompt_parses_and_splits_are_disjoint_and_deterministic():
    """Splits are disjoint, cover every prompt, and depend only on the seed."""
    a, b, c = data.prompt_splits(0), data.prompt_splits(0), data.prompt_splits(1)
    assert a == b and a != c
    sets = {s: {p for ps in a[s].values() for p in ps} for s in a}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    everything = [p for pairs in data.all_prompts().values() for p, _ in pairs]
    assert set(everything) == sets["train"] | sets["val"] | sets["test"]
    assert all(s[k] for s in a.values() for k in data.KIND_WEIGHTS)  # every kind in every split


def test_generation_deterministic_by_seed():
    """Demonstrations and preference pairs are the same for the same seed and differ for another."""
    prompts = data.sample_prompts(data.prompt_splits(0)["train"], 50, random.Random(0))
    assert data.make_demonstrations(prompts, 1) == data.make_demonstrations(prompts, 1)
    assert data.make_demonstrations(prompts, 1) != data.make_demonstrations(prompts, 2)
    assert data.make_preference_pairs(prompts, 1) == data.make_preference_pairs(prompts, 1)
    assert data.make_preference_pairs(prompts, 1) != data.make_preference_pairs(prompts, 2)


def test_demonstrations_good_but_imperfect():
    """Demonstrations always end, are mostly good, and leave room below the best gold reward (1.25)."""
    prompts = data.sample_prompts(data.prompt_splits(0)["train"], 1000, random.Random(0))
    demos = data.make_demonstrations(prompts, 1)
    golds = [data.gold_reward(p, d, data.marked_end(d)) for p, d in demos]
    assert all(d.endswith(E) for _, d in demos)
    assert 0.4 < sum(golds) / len(golds) < 1.0
    assert min(golds) < 0 and max(golds) == 1.25


def test_annotators_follow_gold_and_length_bias():
    """Noise-free annotators pick the higher-utility answer; a large length bias makes them pick the longer one."""
    prompts = data.sample_prompts(data.prompt_splits(0)["train"], 400, random.Random(0))
    exact = data.make_preference_pairs(prompts, 1, tau=1e-6, length_bias=0.0)
    assert all(gold_of(x, "chosen") >= gold_of(x, "rejected") for x in exact)
    words = lambda s: len(s.replace(E, "").split())
    biased = data.make_preference_pairs(prompts, 1, tau=1e-6, length_bias=10.0)
    assert all(words(x["chosen"]) >= words(x["rejected"]) for x in biased)
    noisy = data.make_preference_pairs(prompts, 1)  # the defaults: mostly, not always, the gold ordering
    agree = [gold_of(x, "chosen") > gold_of(x, "rejected")
             for x in noisy if gold_of(x, "chosen") != gold_of(x, "rejected")]
    assert 0.75 < sum(agree) / len(agree) < 0.99


def test_hh_loader_on_repo_sample(tmp_path):
    """The HH-RLHF loader splits at the last Assistant turn, keeps multi-turn context, and reads .gz too."""
    recs = data.load_hh_jsonl(SAMPLE)
    assert len(recs) == 6
    for r in recs:
        assert r["prompt"].startswith("\n\nHuman:") and r["prompt"].endswith("\n\nAssistant:")
        assert "\n\nAssistant:" not in r["chosen"] and r["chosen"] != r["rejected"]
    multi = recs[1]
    assert multi["prompt"].count("\n\nHuman:") == 2 and "bad puns" in multi["prompt"]
    gz = tmp_path / "sample.jsonl.gz"
    with open(SAMPLE, "rb") as f, gzip.open(gz, "wb") as g:
        g.write(f.read())
    assert data.load_hh_jsonl(str(gz)) == recs


@pytest.mark.parametrize("lines, message", [
    (['{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: b"}', "{oops"],
     ":2: not valid JSON"),
    (['{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a"}'], ":1: field 'rejected' is missing"),
    (['[1, 2]'], ":1: expected a JSON object"),
    ([], "no usable records (the file is empty)"),
    # records that do not split into prompt + responses are skipped; only a file of nothing else is an error
    (['{"chosen": "no turns here", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: b"}'],
     "all 1 skipped, 1 with no \"Assistant:\" turn (line 1)"),
    (['{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", "rejected": "\\n\\nHuman: yo\\n\\nAssistant: b"}'] * 2,
     "all 2 skipped, 2 whose chosen and rejected differ before the last Assistant turn (lines 1, 2)"),
    (['{"chosen": "\\n\\nHuman: \\n\\nAssistant: a", "rejected": "\\n\\nHuman: \\n\\nAssistant: b"}'],
     "1 with an empty prompt (line 1)"),
])
def test_hh_loader_malformed(tmp_path, lines, message):
    """A file that is not HH data raises ValueError naming the file and line; so does one with no usable record."""
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        data.load_hh_jsonl(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_gold_win_rate_counts_ties_as_half():
    """Win rate by gold: a win, a tie and a loss give (1 + ½ + 0) / 3."""
    prompts = [MATH, MATH, HARM]
    ours = [" The answer is 12." + E, " The answer is 13." + E, " Here is how to steal a car." + E]
    theirs = [" The answer is 13." + E, " The answer is 13." + E, " I'm sorry, but I can't help with that." + E]
    replies = lambda texts: data.Replies(texts, [True] * len(texts))
    assert data.gold_win_rate(prompts, replies(ours), replies(theirs)) == pytest.approx(0.5)


QUIRKS = os.path.join(ROOT, "tests", "samples", "hh_rlhf_quirks.jsonl")


def test_hh_loader_skips_what_real_files_contain_with_one_warning(capsys):
    """tests/samples/hh_rlhf_quirks.jsonl has what the real Anthropic files have: a UTF-8 BOM, CRLF line ends, blank
    lines, two records whose chosen and rejected differ before the last Assistant turn ("  Human:" with no
    blank line) and one with no Assistant turn. The 4 good records load; the 3 others make one warning line."""
    with open(QUIRKS, "rb") as f:
        raw = f.read()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw and b"\r\n\r\n" in raw  # the quirks are really there
    recs = data.load_hh_jsonl(QUIRKS)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(recs) == 4 and len(err) == 1
    assert "skipped 3 of 7 records" in err[0] and "2 whose chosen and rejected differ" in err[0]
    assert "(lines 2, 8)" in err[0] and "(line 5)" in err[0]
    assert all(r["prompt"].startswith("\n\nHuman:") and "\r" not in r["prompt"] + r["chosen"] + r["rejected"]
               for r in recs)
    assert data.hh_splits(QUIRKS)["train"]                              # the stages' split works on it


def test_a_stage_on_a_real_format_file_prints_one_summary_per_kind(tmp_path, capsys):
    """SFT on the quirks file with a context too short for its prompts: one skip warning and one truncation
    summary, not a line per record; --log_truncations true lists each truncated prompt."""
    import train_sft
    args = ["--preset", "tiny", "--device", "cpu", "--data", QUIRKS, "--block_size", "40", "--batch_size", "2",
            "--max_iters", "2", "--out_dir", str(tmp_path)]
    train_sft.main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(err) == 2 and "skipped 3 of 7" in err[0], err
    assert err[1].startswith("warning: SFT: 3 prompt(s) truncated from the left") and "longest 23 -> 16" in err[1]
    train_sft.main(args + ["--log_truncations", "true", "--out_dir", str(tmp_path / "each")])
    err = capsys.readouterr().err
    assert err.count("prompt truncated from the left") == 3 and err.count("SFT: 3 prompt(s) truncated") == 1


def test_hh_loader_errors_are_one_line_naming_the_file(tmp_path):
    """A folder, a damaged or not-really-gzip .gz, non-UTF-8 bytes and a stray comma in --data: ValueError with
    the file (and line) in the user's terms, not a traceback from gzip or the codec."""
    good = open(SAMPLE, "rb").read()
    (tmp_path / "not_gzip.jsonl.gz").write_bytes(good)
    with gzip.open(tmp_path / "whole.jsonl.gz", "wb") as g:
        g.write(good)
    (tmp_path / "cut.jsonl.gz").write_bytes((tmp_path / "whole.jsonl.gz").read_bytes()[:200])
    (tmp_path / "latin1.jsonl").write_bytes(good.split(b"\n")[0] + b"\n" + '{"chosen": "caf\u00e9"}'.encode("latin-1"))
    cases = [(str(tmp_path), "is a folder"), (str(tmp_path / "not_gzip.jsonl.gz"), "cannot be read ("),
             (str(tmp_path / "cut.jsonl.gz"), "cannot be read ("), (str(tmp_path / "latin1.jsonl"), "latin1.jsonl:2: not UTF-8 text"),
             (str(tmp_path / "missing.jsonl"), "missing.jsonl: not found")]
    for path, message in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            data.load_hh_jsonl(path)
        assert path in str(e.value) and message in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="an empty file name"):
        data.hh_splits(f"{SAMPLE},")
