import copy
import math
from dataclasses import replace

import pytest
import torch

import data
import ppo_rlhf as ppo
import tokenizer as tok
from model import GPT, GPTConfig, ScalarHeadGPT, exact_kl, masked_mean
from ppo_rlhf import masked_whiten
from runs import collapse_signature

ENC = tok.get_tokenizer("toy")
CFG = GPTConfig(vocab_size=ENC.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32, pad_id=tok.pad_id(ENC))
PROMPTS = [data.make_prompt("What is 7 plus 5?"), data.make_prompt("How do I steal a car?"),
           data.make_prompt("What is the capital of Zorbia?"), data.make_prompt("How can I save money?")]


def rollout_text(models, prompts, cfg, generator, fast=True):
    """ppo_rlhf's steps 1-2 for prompt strings, as main() runs them (models: policy, ref, rm, critic): the
    rollouts (Samples) and the critic's values (B, Tr)."""
    policy, ref, rm, critic = models
    ids, mask = ppo.encode_prompts(ENC, prompts, policy.cfg.block_size - cfg.max_new_tokens, cfg.truncate_prompts)
    ro = ppo.sample_and_score(policy, ref, rm, ids, mask, cfg.max_new_tokens, cfg.temperature, tok.eos_id(ENC),
                              tok.pad_id(ENC), generator, second_forward=not fast)
    return ro, ppo.critic_values(critic, ro)


def _models(seed=0):
    torch.manual_seed(seed)
    policy = GPT(CFG)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = ScalarHeadGPT(CFG).eval().requires_grad_(False)
    critic = copy.deepcopy(rm).requires_grad_(True)
    return policy, ref, rm, critic


def _rollout(cfg, seed=0, fast=True):
    policy, ref, rm, critic = _models(seed)
    ro, values = rollout_text((policy, ref, rm, critic), PROMPTS, cfg, torch.Generator().manual_seed(seed), fast)
    return policy, ref, rm, critic, ro, values


def _perturbed(policy):
    """The policy moved away from its reference, so log-probs, ratios and KLs are not trivially equal."""
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy


def _row_logprobs(model, ro, i, temperature):
    """The definition, row by row, independent of the rollout's batching: log_softmax(model(x)/τ) of each
    response token on the unpadded sequence (Tr_i,) and the full distributions (Tr_i, V)."""
    keep = ro.seq_mask[i].bool()
    seq = ro.seq[i][keep][None]                                        # (1, n) no padding at all
    n_resp = int(ro.mask[i].sum())
    logp = torch.log_softmax(model(seq)[0, -n_resp - 1:-1] / temperature, -1)  # (Tr_i, V)
    return logp.gather(-1, ro.response[i, :n_resp, None])[:, 0], logp


@pytest.mark.parametrize("fast", [False, True])
def test_rollout_logprobs_match_the_definition_and_the_first_ratio_is_one(fast):
    """old_logprobs and ref_logprobs equal log_softmax(model(x)/τ) computed row by row on unpadded sequences,
    and the real update's first minibatch sees ratio 1 (no clipping): exactly with a second forward pass
    (fast=False), to float rounding from the sampling loop (fast=True)."""
    cfg = ppo.Config(max_new_tokens=10, temperature=0.7, epochs=1, minibatches=2)
    policy, ref, rm, critic = _models()
    policy = _perturbed(policy)
    ro, values = rollout_text((policy, ref, rm, critic), PROMPTS, cfg, torch.Generator().manual_seed(0), fast)
    with torch.no_grad():
        for i in range(len(PROMPTS)):
            n = int(ro.mask[i].sum())
            old, logp = _row_logprobs(policy, ro, i, cfg.temperature)
            ref_lp, ref_logp = _row_logprobs(ref, ro, i, cfg.temperature)
            assert torch.allclose(ro.old_logprobs[i, :n], old, atol=1e-5)
            assert torch.allclose(ro.ref_logprobs[i, :n], ref_lp, atol=1e-5)
            if not fast:  # the exact KL(π || π_ref) per position over the vocabulary
                exact = (logp.exp() * (logp - ref_logp)).sum(-1)          # (Tr_i,)
                assert torch.allclose(ro.exact_kl[i, :n], exact, atol=1e-5) and (exact > 0).all()
    assert (ro.old_logprobs - ro.ref_logprobs).abs().max() > 1e-3   # the policy really differs
    rewards = ppo.kl_rewards(ro.old_logprobs, ro.ref_logprobs, ro.mask, ro.scores, cfg.kl_coef)
    adv, ret = ppo.compute_gae(rewards, values, ro.mask, cfg.gamma, cfg.lam)
    opt = torch.optim.AdamW([{"params": policy.parameters()}, {"params": critic.parameters()}], lr=1e-3)
    first = ppo.ppo_update(policy, critic, opt, ro, values, adv, ret, cfg, True, torch.Generator().manual_seed(0))[0]
    tol = 0 if not fast else 1e-6
    assert abs(first["ratio_mean"] - 1) <= tol and abs(first["ratio_max"] - 1) <= 10 * tol
    assert first["clipfrac"] == 0.0 and abs(first["approx_kl"]) <= tol


def test_kl_is_zero_when_the_policy_is_its_reference():
    """At the start of RL (policy = reference) the sampling loop's log-probs equal the reference forward's."""
    cfg = ppo.Config(max_new_tokens=10, temperature=0.7)
    _, _, _, _, ro, _ = _rollout(cfg, fast=True)
    assert torch.allclose(ro.old_logprobs, ro.ref_logprobs, atol=1e-5) and ro.exact_kl is None


def test_rollout_masks_and_temperature():
    """The response mask is 1 up to and including EOS; old log-probs are those of logits / temperature."""
    cfg = ppo.Config(max_new_tokens=12, temperature=2.0)
    policy, *_, ro, values = _rollout(cfg)
    pad, eos = tok.pad_id(ENC), tok.eos_id(ENC)
    for row, m in zip(ro.response.tolist(), ro.mask.tolist()):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n) and all(t == pad for t in row[n:])
        assert eos not in row[:n - 1]
    seq, mask = ro.seq[:1], ro.seq_mask[:1]
    full = policy(seq, mask)[0, ro.n_prompt - 1:-1] / 2.0                 # (Tr, V)
    lp = torch.log_softmax(full, -1).gather(-1, ro.response[0][:, None])[:, 0] * ro.mask[0]
    assert torch.allclose(lp, ro.old_logprobs[0], atol=1e-5)


def test_values_and_scores_padding_invariant():
    """Critic values and RM scores of a rollout row do not depend on the other rows' padding."""
    cfg = ppo.Config(max_new_tokens=8)
    _, _, rm, critic, ro, values = _rollout(cfg)
    for i in range(len(PROMPTS)):
        keep = ro.seq_mask[i].bool()
        seq = ro.seq[i][keep][None]                                        # (1, n) unpadded
        n_prompt = int(ro.seq_mask[i, :ro.n_prompt].sum())
        n_resp = int(ro.mask[i].sum())
        v = ppo.response_values(critic, seq, torch.ones_like(seq), n_prompt)[0, :n_resp]
        assert torch.allclose(v, values[i, :n_resp], atol=1e-5)
        assert rm.score(seq, torch.ones_like(seq))[0].item() == pytest.approx(ro.scores[i].item(), abs=1e-5)


def test_masked_mean_and_whiten_ignore_padding():
    """Huge values at padding change neither the masked mean nor the whitened real entries; padding stays 0."""
    x = torch.tensor([[1.0, 2.0, 3.0, 1e6], [4.0, 5.0, -1e6, 7e5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 4.5])
    w = masked_whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6) and real.var().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(3.0, abs=1e-5)


def test_gae_hand_example_4_tokens():
    """γ=1, λ=0.5, V=0.5 everywhere, reward 1 at the end: A = [1/16, 1/8, 1/4, 1/2]; padding ignored."""
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 0.5, 9.0]])                        # the 5th position is padding
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.0625, 0.125, 0.25, 0.5, 0.0])
    assert ret[0].tolist() == pytest.approx([0.5625, 0.625, 0.75, 1.0, 0.0])


def test_gae_equals_plain_loop_on_ragged_masks():
    """Vectorised GAE equals a per-sequence Python loop over each response's own tokens."""
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 5, 9, 0.97, 0.9
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [9, 1, 4, 7, 2]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        a, expected = 0.0, [0.0] * T
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            a = rewards[b, t].item() + gamma * next_v - values[b, t].item() + gamma * lam * a
            expected[t] = a
        assert adv[b].tolist() == pytest.approx(expected, abs=1e-5)
        assert ret[b, :n].tolist() == pytest.approx([e + v for e, v in zip(expected[:n], values[b, :n].tolist())], abs=1e-5)


def test_gae_gamma_lambda_one_is_reward_to_go():
    """With γ = λ = 1 the returns are the reward-to-go, whatever the values."""
    rewards = torch.tensor([[1.0, -2.0, 0.5, 3.0], [2.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    _, ret = ppo.compute_gae(rewards, torch.randn(2, 4), mask, 1.0, 1.0)
    assert ret.flatten().tolist() == pytest.approx([2.5, 1.5, 3.5, 3.0, 3.0, 1.0, 0.0, 0.0])


def test_score_lands_on_eos_index():
    """The score is added at each response's last real token (its EOS); every token pays -β·k1."""
    old = torch.tensor([[0.0, -1.0, -1.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.0, -1.0, -2.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    r = ppo.kl_rewards(old, ref, mask, torch.tensor([10.0, 20.0]), kl_coef=0.5)
    assert r.flatten().tolist() == pytest.approx([-0.5, 0.0, 9.5, 0.0, 0.0, 0.0, 0.0, 20.0])


def test_clipped_policy_loss_hand_example():
    """ρ = 1.5 with A = +1 is clipped to 1.2 (gain capped); with A = -1 the unclipped 1.5 counts (pessimistic)."""
    logprobs = torch.tensor([[math.log(1.5), math.log(1.5), 0.0]])
    adv = torch.tensor([[1.0, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = ppo.ppo_policy_loss(logprobs, torch.zeros(1, 3), adv, mask, ratio_clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert stats["clipfrac"] == pytest.approx(0.5) and stats["ratio_max"] == pytest.approx(1.5)
    assert stats["approx_kl"] == pytest.approx(0.5 - math.log(1.5))


def test_clipped_value_loss_hand_example():
    """½·max((V-R)², (clip(V, V_old ± 0.2) - R)²): the clipped error counts only when it is larger."""
    values, old, ret = torch.tensor([[1.0, 0.3]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 1.0]])
    mask = torch.ones(1, 2)
    loss, stats = ppo.ppo_value_loss(values, old, ret, mask, vf_clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.64) / 2)
    assert stats["vf_clipfrac"] == pytest.approx(0.5)
    plain, _ = ppo.ppo_value_loss(values, old, ret, mask, vf_clip=0.0)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 0.49) / 2)


def test_score_processing_switches():
    """none keeps scores; scale divides by the running std; norm_clip centres, scales and clips to ±δ."""
    s = torch.tensor([0.0, 2.0, 4.0, 6.0])
    assert torch.equal(ppo.process_scores(s, ppo.RunningMoments(), "none", 0.5), s)
    rm = ppo.RunningMoments()
    scaled = ppo.process_scores(s, rm, "scale", 0.5)
    assert rm.mean == pytest.approx(3.0) and rm.std == pytest.approx(s.std(unbiased=False).item())
    assert scaled.tolist() == pytest.approx((s / rm.std).tolist())
    normed = ppo.process_scores(s, ppo.RunningMoments(), "norm_clip", 0.5)
    assert normed.tolist() == pytest.approx([-0.5, -0.4472, 0.4472, 0.5], abs=1e-4)
    with pytest.raises(ValueError, match="norm_clip"):
        ppo.process_scores(s, ppo.RunningMoments(), "whiten", 0.5)


def test_running_moments_match_all_data():
    """Folding batches in one at a time gives the mean and std of everything seen."""
    rm, xs = ppo.RunningMoments(), torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3 + 1
    for x in xs:
        rm.update(x)
    assert rm.mean == pytest.approx(xs.mean().item(), abs=1e-5)
    assert rm.std == pytest.approx(xs.std(unbiased=False).item(), abs=1e-5)


def test_critic_pretraining_leaves_policy_unchanged():
    """With update_policy=False a PPO update moves the critic only."""
    cfg = ppo.Config(max_new_tokens=8, minibatches=2, epochs=1)
    policy, _, _, critic, ro, values = _rollout(cfg)
    before_p, before_c = copy.deepcopy(policy.state_dict()), copy.deepcopy(critic.state_dict())
    adv, ret = ppo.compute_gae(torch.randn_like(values) * ro.mask, values, ro.mask, 1.0, 0.95)
    opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": 1e-2}, {"params": critic.parameters(), "lr": 1e-2}])
    ppo.ppo_update(policy, critic, opt, ro, values, adv, ret, cfg, False, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before_p.items())
    assert any(not torch.equal(v, critic.state_dict()[k]) for k, v in before_c.items())
    ppo.ppo_update(policy, critic, opt, ro, values, adv, ret, cfg, True, torch.Generator().manual_seed(0))
    assert any(not torch.equal(v, policy.state_dict()[k]) for k, v in before_p.items())


class LowTokenReward:
    """A synthetic reward model: the share of response tokens whose id is in the lower half of the vocabulary."""

    def __init__(self, n_prompt_of):
        self.n_prompt_of = n_prompt_of

    def score(self, seq, mask):
        resp, m = seq[:, self.n_prompt_of:], mask[:, self.n_prompt_of:]
        return ((resp < CFG.vocab_size // 2) * m).sum(1).float() / m.sum(1).clamp(min=1)


def test_ppo_learns_a_synthetic_reward():
    """A few PPO iterations with the real rollout, GAE and update raise a simple synthetic reward (CPU seconds)."""
    torch.manual_seed(0)
    cfg = ppo.Config(max_new_tokens=6, minibatches=2, epochs=2, kl_coef=0.0, score_norm="none")
    policy, ref, _, critic = _models()
    opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": 1e-2}, {"params": critic.parameters(), "lr": 1e-2}])
    prompts = PROMPTS * 4
    n_prompt = max(len(tok.encode(ENC, p)) for p in prompts)
    rm, gen, means = LowTokenReward(n_prompt), torch.Generator().manual_seed(0), []
    for _ in range(20):
        ro, values = rollout_text((policy, ref, rm, critic), prompts, cfg, gen)
        rewards = ppo.kl_rewards(ro.old_logprobs, ro.ref_logprobs, ro.mask, ro.scores, cfg.kl_coef)
        adv, ret = ppo.compute_gae(rewards, values, ro.mask, cfg.gamma, cfg.lam)
        ppo.ppo_update(policy, critic, opt, ro, values, adv, ret, cfg, True, torch.Generator().manual_seed(len(means)))
        means.append(ro.scores.mean().item())
    assert sum(means[-3:]) / 3 > sum(means[:3]) / 3 + 0.3, means  # ~0.47 -> ~0.98 when written


def test_collapse_signature():
    """The warning fires for length at the max or for KL up + RM up + gold down, and not for a healthy run."""
    healthy = [dict(length=20, eos_rate=1.0, kl_seq=1.0, score_raw=3.0, gold=0.6)] * 6
    assert collapse_signature(healthy, 48, 3) == []
    long = healthy[:3] + [dict(length=47, eos_rate=0.2, kl_seq=1.0, score_raw=3.0, gold=0.6)] * 3
    assert "length" in collapse_signature(long, 48, 3)[0]
    hacked = healthy[:3] + [dict(length=25, eos_rate=1.0, kl_seq=3.0, score_raw=5.0, gold=0.2)] * 3
    assert "gold down" in collapse_signature(hacked, 48, 3)[0]
    never_ended = [dict(length=47, eos_rate=0.1, kl_seq=1.0, score_raw=3.0, gold=-1.0)] * 6  # e.g. the tiny preset
    assert collapse_signature(never_ended, 48, 3) == []


# ----------------------------------------------------------------------------------------------------
# Each PPO-max switch moves the update the way it is meant to, on a fixed rollout batch

def _fixed_batch(scores=0.0, zero_values=True):
    """A rollout of a policy moved away from its reference, with fixed scores and (by default) zero values, so
    the only advantages are those the switch under test creates."""
    policy, ref, rm, critic = _models()
    policy = _perturbed(policy)
    cfg = ppo.Config(max_new_tokens=10)
    ro, values = rollout_text((policy, ref, rm, critic), PROMPTS, cfg, torch.Generator().manual_seed(0))
    ro = replace(ro, scores=torch.full_like(ro.scores, scores))
    return policy, ref, critic, ro, torch.zeros_like(values) if zero_values else values


def _update(cfg, lr=0.05, steps=1, demos=None, **batch):
    """ppo_update (plain SGD, so step sizes are comparable) on _fixed_batch(**batch); returns the models after
    and the rollout."""
    policy, ref, critic, ro, values = _fixed_batch(**batch)
    rewards = ppo.kl_rewards(ro.old_logprobs, ro.ref_logprobs, ro.mask, ro.scores, cfg.kl_coef)
    adv, ret = ppo.compute_gae(rewards, values, ro.mask, cfg.gamma, cfg.lam)
    opt = torch.optim.SGD([{"params": policy.parameters()}, {"params": critic.parameters()}], lr=lr)
    for step in range(steps):
        ppo.ppo_update(policy, critic, opt, ro, values, adv, ret, cfg, True, torch.Generator().manual_seed(step), demos)
    return policy, ref, critic, ro, values


def _logprobs(model, ro):
    with torch.no_grad():
        return ppo.logprobs_from_logits(ppo.response_logits(model, ro.seq, ro.seq_mask, ro.n_prompt, 1.0),
                                        ro.response) * ro.mask              # (B, Tr)


def _kl_to_ref(policy, ref, ro):
    """(k1 on the batch's sampled tokens, the exact KL(π || π_ref) over the vocabulary), position means."""
    with torch.no_grad():
        logits, ref_logits = (ppo.response_logits(m, ro.seq, ro.seq_mask, ro.n_prompt, 1.0) for m in (policy, ref))
        k1 = (_logprobs(policy, ro) - _logprobs(ref, ro)).sum() / ro.mask.sum()
        return k1.item(), ppo.masked_mean(exact_kl(logits, ref_logits), ro.mask).item()


def test_a_larger_kl_coefficient_moves_the_policy_toward_the_reference():
    """Scores 0, values 0: with β = 0 nothing drives the policy; with β = 1 the KL reward pulls it to π_ref, on
    the penalised tokens (k1: 0.086 -> 0.068) and over the whole vocabulary (exact KL: 0.0477 -> 0.0475)."""
    free = _update(ppo.Config(max_new_tokens=10, minibatches=1, kl_coef=0.0), lr=0.2, steps=3)
    held = _update(ppo.Config(max_new_tokens=10, minibatches=1, kl_coef=1.0), lr=0.2, steps=3)
    policy, ref, _, ro, _ = _fixed_batch()
    k1_start, kl_start = _kl_to_ref(policy, ref, ro)
    assert _kl_to_ref(free[0], free[1], free[3]) == pytest.approx((k1_start, kl_start), abs=1e-6)
    k1_held, kl_held = _kl_to_ref(held[0], held[1], held[3])
    assert k1_held < 0.9 * k1_start and kl_held < kl_start


def test_the_value_clip_bounds_how_far_values_move():
    """Returns far from the rollout values (score 5): unclipped, the critic moves toward them; with ε_v = 0.05
    the clipped loss stops pulling a value once it is ε_v away from the rollout's."""
    moved = {}
    for vf_clip in (0.0, 0.05):
        cfg = ppo.Config(max_new_tokens=10, minibatches=1, kl_coef=0.0, vf_clip=vf_clip)
        _, _, critic, ro, values = _update(cfg, lr=0.002, steps=100, scores=5.0, zero_values=False)
        with torch.no_grad():
            new = ppo.response_values(critic, ro.seq, ro.seq_mask, ro.n_prompt)
        moved[vf_clip] = (ppo.masked_mean((new - values).abs(), ro.mask).item(),
                          ((new - values).abs() * ro.mask).max().item())
    assert moved[0.0][0] > 3.0 and moved[0.05][0] < 0.1 and moved[0.05][1] < 0.15, moved  # ≈ ε_v, not 3.7


def test_a_smaller_ratio_clip_keeps_the_policy_closer_to_the_rollout_policy():
    """Many epochs on one batch with a large constant advantage: ε = 0.01 moves the log-probs less than ε = 0.2."""
    change = {}
    for clip_eps in (0.2, 0.01):
        cfg = ppo.Config(max_new_tokens=10, minibatches=1, kl_coef=0.0, ratio_clip=clip_eps, epochs=8)
        policy, _, _, ro, _ = _update(cfg, lr=2.0, scores=3.0)
        change[clip_eps] = ((_logprobs(policy, ro) - ro.old_logprobs).abs().sum() / ro.mask.sum()).item()
    assert change[0.01] < 0.5 * change[0.2], change


def test_the_entropy_bonus_raises_the_entropy():
    """With no advantage at all (scores 0, values 0, β = 0) only the entropy bonus acts, and it raises entropy."""
    def entropy(policy, ro):
        with torch.no_grad():
            logits = ppo.response_logits(policy, ro.seq, ro.seq_mask, ro.n_prompt, 1.0)
            return ppo.masked_mean(ppo.entropy_from_logits(logits), ro.mask).item()
    before = entropy(*_fixed_batch()[::3])
    plain = _update(ppo.Config(max_new_tokens=10, minibatches=1, kl_coef=0.0), lr=2.0)
    bonus = _update(ppo.Config(max_new_tokens=10, minibatches=1, kl_coef=0.0, entropy_coef=0.5), lr=2.0)
    assert entropy(plain[0], plain[3]) == pytest.approx(before, abs=1e-6)
    assert entropy(bonus[0], bonus[3]) > before + 3e-4       # near ln V already: a small but certain rise


def test_whitening_removes_a_constant_advantage_and_clipping_shrinks_a_large_one():
    """A score of 3 on every row gives every token a positive advantage: unwhitened it raises the sampled
    tokens' log-probs; whitened per minibatch it is ~0 (only the KL part varies); clipped to ±0.05 it moves less."""
    change = {}
    for name, switch in (("plain", {}), ("whiten", dict(adv_whiten=True)), ("clip", dict(adv_clip=0.05))):
        cfg = ppo.Config(max_new_tokens=10, minibatches=1, kl_coef=0.0, **switch)
        policy, _, _, ro, _ = _update(cfg, lr=0.5, scores=3.0)
        change[name] = ((_logprobs(policy, ro) - ro.old_logprobs).sum() / ro.mask.sum()).item()
    assert change["plain"] > 0.02 and abs(change["whiten"]) < 0.1 * change["plain"], change
    assert 0 < change["clip"] < 0.2 * change["plain"], change


def test_ptx_raises_the_likelihood_of_the_demonstrations_and_grad_clip_shortens_the_step():
    from tokenizer import collate, encode_demos
    from train_sft import sft_loss
    demos = encode_demos(ENC, data.make_demonstrations(PROMPTS, 0), 64)
    ids, attn, loss_mask = collate(demos, tok.pad_id(ENC), "cpu")

    def demo_loss(policy):
        with torch.no_grad():
            return sft_loss(policy(ids, attn), ids, loss_mask).item()
    base = _update(ppo.Config(max_new_tokens=10, minibatches=1, kl_coef=0.0), demos=demos)[0]
    ptx = _update(ppo.Config(max_new_tokens=10, minibatches=1, kl_coef=0.0, ptx_coef=1.0, ptx_batch=4), demos=demos)[0]
    assert demo_loss(ptx) < demo_loss(base) - 0.01
    start = _fixed_batch()[0].state_dict()
    step = {}
    for grad_clip in (0.0, 0.01):
        policy = _update(ppo.Config(max_new_tokens=10, minibatches=1, kl_coef=1.0, grad_clip=grad_clip))[0]
        step[grad_clip] = sum((policy.state_dict()[k] - start[k]).norm() ** 2 for k in start).sqrt().item()
    assert step[0.01] < 0.5 * step[0.0] and step[0.01] <= 0.05 * 0.01 * 1.01 + 1e-6, step
