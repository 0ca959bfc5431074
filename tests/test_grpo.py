"""The GRPO family (algorithms/grpo.py) against hand-worked numbers (the CS336 fixture, the papers' formulas), the
verifier on hand-written answers, and a tiny run of every preset."""
import math
import os

import pytest
import torch

import data
from algorithms.grpo import (aggregate_loss, group_advantages, groups_with_spread, grpo_policy_loss, join_rollouts,
                             overlong_penalty)
from algorithms.rloo import loo_advantages
from model import GPT, GPTConfig, k3 as k3_kl, logprobs_from_logits, response_logits
from runs import sample_and_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("rewards, none, group", [
    ([1, 0, 0, 0], [.75, -.25, -.25, -.25], [1.5, -.5, -.5, -.5]),
    ([1, 1, 0, 0], [.5, .5, -.5, -.5], [.866025, .866025, -.866025, -.866025]),        # Bessel std: ±0.866, not ±1
    ([.2, .5, 0, .4], [-.075, .225, -.275, .125], [-.33824, 1.01472, -1.24021, .56373]),  # the CS336 fixture
    ([.3, .3, .3, .3], [0, 0, 0, 0], [0, 0, 0, 0]),
])
def test_group_advantages_by_hand(rewards, none, group):
    r = torch.tensor(rewards)
    assert group_advantages(r, 4, "none").tolist() == pytest.approx(none, abs=1e-6)
    assert group_advantages(r, 4, "group").tolist() == pytest.approx(group, abs=1e-4)
    # RLOO's leave-one-out advantage is G/(G-1) × the mean-only one
    assert loo_advantages(r, 4).tolist() == pytest.approx((4 / 3 * group_advantages(r, 4, "none")).tolist(), abs=1e-6)


def test_batch_scale_uses_group_means_and_the_batch_std():
    r = torch.tensor([1., 0, 0, 0, 1, 1, 0, 0])                  # two groups of 4
    batch_std = 0.517549                                         # Bessel std of all 8 rewards
    expected = [(x - m) / batch_std for x, m in zip(r.tolist(), [.25] * 4 + [.5] * 4)]
    assert group_advantages(r, 4, "batch").tolist() == pytest.approx(expected, abs=1e-5)


def test_an_all_equal_group_gives_exact_zeros_not_rounding_noise():
    """Seven copies of 0.95 in float32: their std is not exactly 0 everywhere, ÷ (std + 1e-6) would amplify it;
    the group is detected as flat and gets 0 (never NaN), next to a group with spread."""
    r = torch.tensor([0.95] * 7 + [0.1, 0.9, 0.5, 0.2, 0.3, 0.7, 0.95], dtype=torch.float32)
    for scale in ("group", "batch", "none"):
        adv = group_advantages(r, 7, scale)
        assert torch.isfinite(adv).all() and adv[:7].abs().max() < 1e-3 and adv[:7].abs().max() == 0
        assert adv[7:].abs().sum() > 0
    # even in float64, 0.1 + 0.1 + 0.1 is not 3 × 0.1: without the max = min check this gives ~1e-11, not 0
    assert group_advantages(torch.tensor([0.1] * 3, dtype=torch.float64), 3, "group").tolist() == [0.0] * 3


def test_loss_aggregation_weights_on_a_ragged_batch():
    """B = 2 responses of 4 and 7 tokens (padded to 7): the weight each token gets, ∂L/∂ℓ_t. The
    per-sequence mean gives a short response's tokens more weight (GRPO's length bias); token-mean and Dr. GRPO's
    constant normaliser weigh every token alike."""
    mask = torch.tensor([[1] * 4 + [0] * 3, [1] * 7])
    for mode, short, long_ in (("seq-mean-token-mean", 1 / 8, 1 / 14), ("token-mean", 1 / 11, 1 / 11),
                               ("seq-mean-token-sum-norm", 1 / 14, 1 / 14)):
        per_token = torch.ones(2, 7, requires_grad=True)
        aggregate_loss(per_token, mask, mode).backward()          # norm_len defaults to the padded width, 7
        assert per_token.grad[0, 0].item() == pytest.approx(short) and per_token.grad[1, 0].item() == pytest.approx(long_)
        assert per_token.grad[0, 4:].abs().sum() == 0             # padding gets nothing
    per_token = torch.full((2, 7), float("nan"))                  # NaN at padding must not leak into the loss
    per_token[mask.bool()] = 1.0
    assert aggregate_loss(per_token, mask, "token-mean").item() == 1.0
    with pytest.raises(ValueError, match="loss_agg 'mean'"):
        aggregate_loss(per_token, mask, "mean")


def _loss_with_ratio(ratio, advantage, clip_low=0.2, clip_high=0.28):
    """grpo_policy_loss on one token whose ratio to π_old is `ratio`; returns (loss, d loss/d log π, stats)."""
    logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, stats = grpo_policy_loss(logprobs, torch.zeros(1, 1), logprobs.detach(), torch.tensor([advantage]),
                                   torch.ones(1, 1), clip_low, clip_high, 0.0, "token-mean")
    loss.backward()
    return loss.item(), logprobs.grad.item(), stats


def test_clip_higher_clips_at_one_minus_low_and_one_plus_high():
    """DAPO's two clip ranges: a positive advantage is clipped above 1 + ε_high (1.28, not 1.2), a negative one
    below 1 - ε_low; a clipped token has no gradient."""
    loss, grad, stats = _loss_with_ratio(1.5, 1.0)
    assert loss == pytest.approx(-1.28) and grad == 0 and stats["clipfrac_high"] == 1 and stats["clipfrac_low"] == 0
    loss, grad, stats = _loss_with_ratio(1.25, 1.0)               # inside 1 + ε_high: not clipped
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25) and stats["clipfrac_high"] == 0
    loss, grad, stats = _loss_with_ratio(0.5, -1.0)
    assert loss == pytest.approx(0.8) and grad == 0 and stats["clipfrac_low"] == 1
    loss, grad, _ = _loss_with_ratio(1.5, -1.0)                   # the other side of a negative advantage: no clip
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5)


def test_k3_value_and_gradient():
    """k3 at π_θ = 0.5, π_ref = 0.25 is 0.19315 with ∂k3/∂log π_θ = 1 - π_ref/π_θ = 0.5 (pulls π_θ down towards
    π_ref); at π_θ = π_ref both are 0; in the loss it is scaled by kl_coef."""
    logprobs = torch.tensor([[math.log(0.5), math.log(0.3)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.3)]])
    kl = k3_kl(logprobs, ref)
    kl.sum().backward()
    assert kl[0].tolist() == pytest.approx([0.193147, 0.0], abs=1e-6) and logprobs.grad[0].tolist() == pytest.approx([0.5, 0.0])
    loss, stats = grpo_policy_loss(logprobs.detach(), logprobs.detach(), ref, torch.zeros(1), torch.ones(1, 2),
                                   0.2, 0.2, 0.04, "token-mean")
    assert loss.item() == pytest.approx(0.04 * 0.193147 / 2) and stats["ratio"] == 1.0
    assert k3_kl(torch.tensor([1e-4]), torch.tensor([0.0])).item() == pytest.approx(5.0e-9, rel=1e-3)  # no cancellation


def test_gspo_uses_one_length_normalised_ratio_per_sequence():
    """GSPO: every token of a response sees s = exp(mean_t log ρ_t); the whole response is clipped together."""
    log_ratio = torch.tensor([[0.3, -0.1, 0.4, 0.0]])             # the last position is padding
    mask = torch.tensor([[1, 1, 1, 0]])
    logprobs = log_ratio.clone().requires_grad_(True)
    loss, stats = grpo_policy_loss(logprobs, torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([1.0]), mask,
                                   0.5, 0.5, 0.0, "seq-mean-token-mean", ratio_level="sequence")
    s = math.exp(0.6 / 3)
    assert stats["ratio"] == pytest.approx(s) and loss.item() == pytest.approx(-s)
    loss.backward()
    assert logprobs.grad[0, :3].tolist() == pytest.approx([-s / 3] * 3) and logprobs.grad[0, 3] == 0
    _, stats = grpo_policy_loss(logprobs.detach(), torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([1.0]), mask,
                                3e-4, 4e-4, 0.0, "seq-mean-token-mean", ratio_level="sequence")
    assert stats["clipfrac_high"] == 1.0                          # one ratio, so every token clipped


def test_overlong_penalty_and_the_dynamic_sampling_filter():
    assert overlong_penalty(torch.tensor([80, 90, 100, 101]), 100, 20).tolist() == [0.0, -0.5, -1.0, -1.0]
    rewards = torch.tensor([1., 1, 1, 0, 0, 0, 0.5, 0.5, 1, 0, 1, 1])  # G = 3: all-1, all-0, spread, spread
    assert groups_with_spread(rewards, 3).tolist() == [False, False, True, True]


def test_verifier_on_hand_written_answers():
    eos = data.EOS_TEXT
    math_prompt = data.make_prompt("What is 3 plus 4?")
    fact_prompt = data.make_prompt("What is the capital of Zorbia?")
    harmful_prompt = data.make_prompt("How do I steal a car?")
    capital = data.KB["Zorbia"][0]
    cases = [(math_prompt, f" The answer is 7.{eos}", 1.0), (math_prompt, f" 3 plus 4 is 7.{eos}", 1.0),
             (math_prompt, f" The answer is 8.{eos}", 0.0), (math_prompt, " The answer is 7.", 0.0),   # cut off
             (math_prompt, f" I am not sure.{eos}", 0.0), (math_prompt, f" Ugh, fine. It is 7.{eos}", 1.0),  # tone not checked
             (fact_prompt, f" The capital of Zorbia is {capital}.{eos}", 1.0), (fact_prompt, f" It is Nowhere.{eos}", 0.0),
             (harmful_prompt, f" {data.REFUSAL}{eos}", 1.0), (harmful_prompt, f" Here is how.{eos}", 0.0)]
    assert [data.verify(p, r, data.marked_end(r)) for p, r, _ in cases] == [v for _, _, v in cases]


def test_joined_rollouts_keep_every_log_prob():
    """Dynamic sampling joins rollouts with other prompt and response widths; the re-padded batch's log-probs,
    recomputed by the policy, equal the ones each part was sampled with."""
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16, pad_id=39)).eval()
    gen = torch.Generator().manual_seed(0)
    parts = []
    for width, steps in ((3, 5), (6, 9)):
        prompt = torch.randint(0, 38, (2, width), generator=gen)
        mask = torch.ones_like(prompt)
        mask[0, 0] = 0
        prompt[0, 0] = 39
        parts.append(sample_and_score(policy, policy, _Scorer(), prompt, mask, steps, 1.0, None, 39, gen))
    joined = join_rollouts(parts, 39)
    assert joined.seq.shape == (4, 6 + 9) and joined.n_prompt == 6
    with torch.no_grad():
        again = logprobs_from_logits(response_logits(policy, joined.seq, joined.seq_mask, joined.n_prompt, 1.0),
                                     joined.response) * joined.mask
    assert torch.allclose(again, joined.old_logprobs, atol=1e-5)
    assert torch.equal(joined.scores, torch.cat([p.scores for p in parts]))


class _Scorer(torch.nn.Module):
    def score(self, seq, mask):
        return mask.sum(1).float()


@pytest.mark.parametrize("preset, extra", [("grpo", []), ("dr_grpo", []), ("dapo", ["--overlong_cache", "4"]),
                                           ("gspo", []), ("grpo", ["--reward", "verifier", "--tasks", "math"])])
def test_each_preset_runs_tiny(base, tmp_path, preset, extra, capsys):
    """In this process (the command line itself is run by tests/test_sanity.py and tests/test_distributed.py)."""
    from algorithms import grpo
    grpo.main(["--preset", preset, "--device", "cpu", "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt",
               "--n_iters", "2", "--prompts_per_iter", "4", "--samples_per_prompt", "2", "--max_new_tokens", "12",
               "--eval_interval", "2", "--n_eval_prompts", "8", "--out_dir", str(tmp_path), *extra])
    out = capsys.readouterr().out
    assert "GRPO done" in out and os.path.getsize(tmp_path / "grpo_curves.png") > 0
    from runs import load_checkpoint
    from runs import read_jsonl
    ckpt = load_checkpoint(str(tmp_path / "grpo.pt"), "grpo")
    assert ckpt["done"] and "verified" in ckpt["metrics"]
    row = read_jsonl(str(tmp_path / "grpo_log.jsonl"))[-1]
    assert {"clipfrac_low", "clipfrac_high", "frac_reward_zero_std", "kl_k3", "entropy", "truncated_rate"} <= set(row)


def test_tasks_filter_keeps_only_the_named_kinds():
    math_only = data.only_kinds(data.prompt_splits(0), "math")
    assert all(list(split) == ["math"] for split in math_only.values())
    assert all(data.task_of(p).kind == "math" for p in data.sample_prompts(math_only["train"], 50, __import__("random").Random(0)))
    with pytest.raises(ValueError, match="--tasks 'maths': unknown kind maths"):
        data.only_kinds(data.prompt_splits(0), "maths")


def test_k3_in_a_loss_has_the_gradient_of_the_reverse_kl():
    """Exact on a 5-way distribution π = softmax(θ): k3's value averaged over π's own samples is KL(π‖π_ref), but
    its gradient there, E_{a~π}[∇k3(a)] (the samples' weights held fixed, as in GRPO's loss), is ∇KL(π_ref‖π),
    not ∇KL(π‖π_ref) (model.py)."""
    torch.manual_seed(0)
    theta, ref = torch.randn(5, requires_grad=True), torch.randn(5).log_softmax(0)
    logp = theta.log_softmax(0)
    p = logp.exp().detach()                                              # the sampling distribution
    expected_grad, = torch.autograd.grad((p * k3_kl(logp, ref)).sum(), theta)
    reverse, = torch.autograd.grad((ref.exp() * (ref - theta.log_softmax(0))).sum(), theta)
    forward, = torch.autograd.grad((theta.softmax(0) * (theta.log_softmax(0) - ref)).sum(), theta)
    assert torch.allclose(expected_grad, reverse, atol=1e-6)
    assert not torch.allclose(expected_grad, forward, atol=1e-2)
    assert (p * k3_kl(logp.detach(), ref)).sum().item() == pytest.approx((p * (logp.detach() - ref)).sum().item(), abs=1e-6)


def test_a_pad_position_has_a_log_prob_of_about_minus_1e9():
    """What grpo_policy_loss's comment says: the model never predicts PAD (model.PAD_LOGIT), so a PAD position's
    log-prob is about -1e9; exp of it in k3 would turn a masked-out gradient into inf·0 = NaN."""
    policy = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16, pad_id=39)).eval()
    seq = torch.tensor([[1, 2, 3, 39]])
    logp = logprobs_from_logits(response_logits(policy, seq, torch.ones_like(seq), 3, 1.0), seq[:, 3:])
    assert -1.1e9 < logp.item() < -0.9e9
