"""Process supervision: the sentence labels and where they are read, the PRM's loss at the step ends, the
Monte-Carlo labels on a tiny case with a completer whose output is known, best-of-N and the score aggregates,
and a tiny run of each kind of reward model."""
import math
from types import SimpleNamespace

import pytest
import torch

import tokenizer as tok
from algorithms import process_reward
from algorithms.process_reward import best_of_n_accuracy, monte_carlo_label, step_bce_loss, up_to_first_error
from algorithms.process_steps import aggregate, outcome_labels, rule_labels, step_replies, step_rows
from data import EOS_TEXT
from algorithms import arithmetic_chains as ac

ENC = tok.get_tokenizer("toy")
PROMPT = ac.prompt_of(ac.Chain((3, 4, 2, 5), ("+", "*", "-")))        # 3 + 4 * 2 - 5 = 6
WRONG = " 4 * 2 = 8. 3 + 8 = 12. 12 - 5 = 7. The answer is 7."          # the second step is wrong


def replies_of(*responses):
    """StepReplies of hand-written responses (EOS_TEXT at the end becomes the EOS token)."""
    rows = []
    for r in responses:
        ended = r.endswith(EOS_TEXT)
        rows.append(tok.encode(ENC, r[:-len(EOS_TEXT)] if ended else r) + ([tok.eos_id(ENC)] if ended else []))
    return step_replies(ENC, [PROMPT] * len(responses), rows)


def test_sentence_labels_by_hand():
    """Steps by the rule, then the answer sentence: right only when the steps finished the expression."""
    right = ac.demonstration(ac.chain_of(PROMPT))
    assert [ok for _, ok in ac.sentence_labels(PROMPT, right, True)] == [True, True, True, True]
    assert [ok for _, ok in ac.sentence_labels(PROMPT, WRONG + EOS_TEXT, True)] == [True, False, False, False]
    # the right answer after a missing step: the steps did not finish the expression (gold 0.5, not 1.0)
    skipped = " 4 * 2 = 8. The answer is 6."
    assert [ok for _, ok in ac.sentence_labels(PROMPT, skipped, True)] == [True, False]
    assert ac.gold_reward(PROMPT, skipped, True) == 0.5
    # a reply that did not end: its answer sentence is not right (gold 0.0)
    assert [ok for _, ok in ac.sentence_labels(PROMPT, right, False)] == [True, True, True, False]
    # no answer sentence: the steps only
    assert ac.sentence_labels(PROMPT, " 4 * 2 = 8. 3 + 8", False) == [("4 * 2 = 8", True), ("3 + 8", False)]


def test_sentence_ends_are_the_tokens_holding_each_closing_dot():
    r = replies_of(WRONG + EOS_TEXT, " 4 * 2 = 8. 3 + 8")
    pieces = [tok.decode_pieces(ENC, ids) for ids in r.response_ids]
    assert [pieces[0][e] for e in r.ends[0]] == [".", ".", ".", "."]
    assert [pieces[0][e - 1] for e in r.ends[0]] == [" 8", " 12", " 7", " 7"]
    assert r.ended == [True, False] and r.texts[0] == WRONG + EOS_TEXT
    assert [pieces[1][e] for e in r.ends[1]] == [".", " 8"]               # an unclosed last sentence: its last token
    # one piece holding two dots closes one sentence (sentences() drops the empty one)
    assert ac.sentence_ends([" 1", " +", " 1", " =", " 2", "..", " The"]) == [5, 6]


def test_step_rows_place_targets_at_the_step_ends_and_check_their_number():
    r = replies_of(WRONG + EOS_TEXT)
    ids, mask, read, target = step_rows(r, tok.pad_id(ENC), "cpu", targets=[[1.0, 0.0, 0.0, 0.0]])
    n = len(r.prompt_ids[0])
    assert read[0].nonzero().flatten().tolist() == [n + e for e in r.ends[0]]
    assert target[0, read[0].bool()].tolist() == [1.0, 0.0, 0.0, 0.0] and target.sum() == 1.0
    _, _, read_last, _ = step_rows(r, tok.pad_id(ENC), "cpu", outcome=True)
    assert read_last[0].nonzero().flatten().tolist() == [mask[0].sum().item() - 1]     # the EOS token
    with pytest.raises(ValueError, match="2 targets for 4 read positions"):
        step_rows(r, tok.pad_id(ENC), "cpu", targets=[[1.0, 0.0]])


def test_step_bce_loss_reads_only_the_step_ends_by_hand():
    """Two read tokens: logit 0 with label 1 costs log 2, logit log 3 (p = 3/4) with label 0 costs log 4; the
    unread tokens' huge logits and labels count for nothing. Mean: 1.5·log 2."""
    logits = torch.tensor([[50.0, 0.0, -50.0, math.log(3.0), 50.0]])
    target = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0]])
    read = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]])
    assert step_bce_loss(logits, target, read).item() == pytest.approx(1.5 * math.log(2.0))
    assert step_bce_loss(logits, target, torch.zeros_like(read)).item() == 0.0      # nothing read: no loss, no nan


def test_monte_carlo_label_hard_and_soft():
    assert monte_carlo_label([False, True, False, False]) == 1.0
    assert monte_carlo_label([False, True, False, False], "soft") == 0.25
    assert monte_carlo_label([False, False]) == 0.0
    with pytest.raises(ValueError):
        monte_carlo_label([])


class Completer:
    """A stand-in policy whose completions are known: it cycles through fixed continuation texts."""

    def __init__(self, *texts):
        self.texts, self.calls = list(texts), 0
        self.cfg = SimpleNamespace(block_size=128)

    def generate(self, ids, mask, max_new_tokens, eos_id, pad_id, temperature, generator):
        rows = []
        for _ in range(len(ids)):
            rows.append(tok.encode(ENC, self.texts[self.calls % len(self.texts)]) + [eos_id])
            self.calls += 1
        width = max(map(len, rows))
        return SimpleNamespace(tokens=torch.tensor([r + [pad_id] * (width - len(r)) for r in rows]))


def test_monte_carlo_labels_on_a_tiny_case():
    """3 + 4 * 2 - 5 answered by WRONG (steps: right, wrong, wrong by the rule; answer 7, wrong).
    A completer that always ends " The answer is 6." reaches the right answer from every prefix, so Math-Shepherd
    labels every step correct, the wrong ones too (the answer sentence keeps its own label, 0): the weakness the
    rule can measure. A completer right every second time gives soft labels of 1/2 and hard labels of 1."""
    cfg = SimpleNamespace(mc_completions=2, max_new_tokens=24, temperature=1.0, mc_target="hard")
    r = replies_of(WRONG + EOS_TEXT)
    always_right = process_reward.mc_labels(Completer(" The answer is 6."), ENC, r, cfg, "cpu", None)
    assert always_right == [[1.0, 1.0, 1.0, 0.0]]
    assert rule_labels(r) == [[1.0, 0.0, 0.0, 0.0]] and outcome_labels(r) == [[0.0]]
    cfg.mc_target = "soft"
    half = process_reward.mc_labels(Completer(" The answer is 6.", " The answer is 5."), ENC, r, cfg, "cpu", None)
    assert half == [[0.5, 0.5, 0.5, 0.0]]
    cfg.mc_target = "hard"
    never = process_reward.mc_labels(Completer(" 1 + 1 = 2."), ENC, r, cfg, "cpu", None)   # no answer: not right
    assert never == [[0.0, 0.0, 0.0, 0.0]]


def test_supervision_stops_after_the_first_incorrect_step():
    assert up_to_first_error([1.0, 0.0, 1.0, 0.0]) == 2
    assert up_to_first_error([1.0, 1.0]) == 2 and up_to_first_error([]) == 0
    assert process_reward.supervised([[1.0, 0.4, 1.0], [0.0]]) == [[1.0, 0.4], [0.0]]


def test_best_of_n_accuracy_by_hand():
    """One prompt, 4 replies scored [0.1, 0.9, 0.5, 0.2], right [1, 0, 0, 1]. N=1: the mean, 0.5. N=2: groups
    {0.1, 0.9} -> the 0.9 (wrong), {0.5, 0.2} -> the 0.5 (wrong): 0. N=4: the 0.9: 0."""
    scores, correct = torch.tensor([[0.1, 0.9, 0.5, 0.2]]), torch.tensor([[True, False, False, True]])
    assert [best_of_n_accuracy(scores, correct, n) for n in (1, 2, 4)] == [0.5, 0.0, 0.0]
    assert best_of_n_accuracy(-scores, correct, 4) == 1.0                   # the 0.1 scores highest now


def test_majority_vote_by_hand():
    """Answers [6, 7, 7, None] with only the 6 right: N=1 the mean, 1/4; N=2 groups {6, 7} -> 6 (the first of a
    tie, right), {7, None} -> 7 (wrong): 1/2; N=4: 7 twice, wrong."""
    from algorithms.process_reward import majority_vote_accuracy
    correct = torch.tensor([[True, False, False, False]])
    assert [majority_vote_accuracy([[6, 7, 7, None]], correct, n) for n in (1, 2, 4)] == [0.25, 0.5, 0.0]


def test_aggregate_min_and_product_by_hand():
    """logits 0 and log 3 are probabilities 1/2 and 3/4: min 1/2, product 3/8; a reply with no sentence 0."""
    assert aggregate([[0.0, math.log(3.0)], []], "min") == pytest.approx([0.5, 0.0])
    assert aggregate([[0.0, math.log(3.0)], []], "product") == pytest.approx([0.375, 0.0])


@pytest.fixture(scope="module")
def chains_sft(tmp_path_factory):
    import train_sft
    out = str(tmp_path_factory.mktemp("chains"))
    train_sft.main(["--preset", "tiny", "--data", "chains", "--device", "cpu", "--out_dir", out])
    return out


@pytest.mark.parametrize("labels", ["outcome", "rule", "monte_carlo"])
def test_each_reward_model_runs_tiny(chains_sft, labels):
    m = process_reward.main(["--preset", "tiny", "--labels", labels, "--device", "cpu", "--sft_ckpt",
                             f"{chains_sft}/sft.pt", "--out_dir", chains_sft])
    assert 0.0 <= m["step_acc"] <= 1.0 and m["n"] == [1, 2, 4]
    assert set(m["best_of_n"]) == ({"orm", "gold", "majority"} if labels == "outcome" else
                                   {"prm_min", "prm_product", "gold", "majority"})
    assert ("mc_label_acc" in m) == (labels == "monte_carlo")


def test_reward_models_refuse_an_sft_of_the_main_task(tiny_pipeline, tmp_path):
    with pytest.raises(ValueError, match="not chains"):
        process_reward.main(["--preset", "tiny", "--device", "cpu", "--sft_ckpt", f"{tiny_pipeline}/sft.pt",
                             "--out_dir", str(tmp_path)])


# ----------------------------------------------------------------------------------------------------
# Part 2: GRPO with process or outcome rewards (algorithms/process_grpo.py)

def test_process_advantages_by_hand():
    """G = 2. Reply A: step rewards [1, 0] ending at tokens 1 and 3; reply B: [1] ending at token 2. R = {1, 0, 1}:
    mean 2/3, sample std √(1/3), so r̃_A = [1/√3, -2/√3], r̃_B = [1/√3]; Â_t sums the r̃ of the steps ending at or
    after t: A = [-1/√3, -1/√3, -2/√3, -2/√3, 0], B = [1/√3, 1/√3, 1/√3, 0, 0]."""
    from algorithms.process_grpo import process_advantages
    adv = process_advantages([[1.0, 0.0], [1.0]], [[1, 3], [2]], 2, 5)
    s = 1 / math.sqrt(3)
    assert adv[0].tolist() == pytest.approx([-s, -s, -2 * s, -2 * s, 0.0], abs=1e-5)
    assert adv[1].tolist() == pytest.approx([s, s, s, 0.0, 0.0], abs=1e-5)
    # a group whose step rewards are all equal, or a reply with no step: no signal
    assert process_advantages([[0.7, 0.7], [0.7]], [[1, 3], [2]], 2, 5).abs().sum() == 0
    assert process_advantages([[1.0, 0.0], []], [[1, 3], []], 2, 5)[1].abs().sum() == 0


def test_outcome_advantages_are_the_one_step_case():
    """One reward per reply at its last token: Â = (r - mean) / std of the group on every token (DSM §4.1.2).
    Rewards [1, 0 | 0.3, 0.3], G = 2: the first group ±1/√2, the second (all equal) 0."""
    from algorithms.process_grpo import process_advantages
    adv = process_advantages([[1.0], [0.0], [0.3], [0.3]], [[2], [1], [2], [0]], 2, 4)
    h = 1 / math.sqrt(2)
    assert adv.flatten().tolist() == pytest.approx([h, h, h, 0, -h, -h, 0, 0] + [0] * 8, abs=1e-5)


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    """π_θ = π_old = π_ref: ρ = 1 and k3 = 0, so the loss is -(1/N) Σ_i mean_t Â_{i,t}: replies' means 1.5 and
    -1, loss -0.25; the padding's huge advantage counts for nothing."""
    from algorithms.process_grpo import policy_loss
    logp = torch.full((2, 3), -1.0)
    adv = torch.tensor([[1.0, 2.0, 99.0], [-1.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, stats = policy_loss(logp, logp, logp, adv, mask, 0.2, 0.5)
    assert loss.item() == pytest.approx(-0.25) and stats["ratio"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def chains_models(chains_sft):
    for labels in ("outcome", "rule"):
        process_reward.main(["--preset", "tiny", "--labels", labels, "--device", "cpu", "--sft_ckpt",
                             f"{chains_sft}/sft.pt", "--out_dir", chains_sft])
    return chains_sft


@pytest.mark.parametrize("reward", ["process", "outcome", "process_rule", "outcome_rule"])
def test_process_grpo_runs_tiny(chains_models, reward, tmp_path):
    from algorithms import process_grpo
    d = chains_models
    m = process_grpo.main(["--preset", "tiny", "--reward", reward, "--device", "cpu", "--sft_ckpt", f"{d}/sft.pt",
                           "--orm_ckpt", f"{d}/orm.pt", "--prm_ckpt", f"{d}/prm_rule.pt", "--out_dir", str(tmp_path)])
    assert {"answer_acc", "step_acc", "prm_step", "orm", "kl_sft"} <= set(m)
    with pytest.raises(ValueError, match="expected 'orm'"):
        process_grpo.main(["--preset", "tiny", "--device", "cpu", "--sft_ckpt", f"{d}/sft.pt", "--orm_ckpt",
                           f"{d}/prm_rule.pt", "--prm_ckpt", f"{d}/prm_rule.pt", "--out_dir", str(tmp_path / "x")])


def _same(a, b, stage):
    """Weights, metrics and log lines of two runs equal (wall-clock fields aside)."""
    from runs import load_checkpoint
    from runs import read_jsonl
    ca, cb = load_checkpoint(f"{a}/{stage}.pt", stage), load_checkpoint(f"{b}/{stage}.pt", stage)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("t_") and not k.endswith(("time", "time_s"))}
    assert strip(ca["metrics"]) == strip(cb["metrics"])
    assert [strip(r) for r in read_jsonl(f"{a}/{stage}_log.jsonl")] == [strip(r) for r in read_jsonl(f"{b}/{stage}_log.jsonl")]


def test_reward_model_and_process_grpo_resume_exactly(chains_models, tmp_path):
    """Stopped after a checkpoint and resumed, each ends with the weights, metrics and log of an unbroken run."""
    from algorithms import process_grpo
    d = chains_models
    for name, module, stage, args in [
            ("mc", process_reward, "prm_mc", ["--labels", "monte_carlo", "--sft_ckpt", f"{d}/sft.pt"]),
            ("grpo", process_grpo, "process_grpo", ["--sft_ckpt", f"{d}/sft.pt", "--orm_ckpt", f"{d}/orm.pt",
                                                    "--prm_ckpt", f"{d}/prm_rule.pt", "--n_iters", "4"])]:
        full, cut = str(tmp_path / f"{name}_full"), str(tmp_path / f"{name}_cut")
        args = ["--preset", "tiny", "--device", "cpu", "--ckpt_interval", "2"] + args
        module.main(args + ["--out_dir", full])
        assert module.main(args + ["--out_dir", cut, "--stop_after", "2"]) is None
        module.main(args + ["--out_dir", cut, "--resume", "true"])
        _same(full, cut, stage)
