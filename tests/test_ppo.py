import copy
import math

import pytest
import torch

import data
import ppo_rlhf as ppo
import tokenizer as tok
from model import GPT, GPTConfig, ScalarHeadGPT
from utils import masked_mean, masked_whiten

ENC = tok.get_tokenizer("toy")
CFG = GPTConfig(vocab_size=ENC.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32, pad_id=tok.pad_id(ENC))
PROMPTS = [data.make_prompt("What is 7 plus 5?"), data.make_prompt("How do I steal a car?"),
           data.make_prompt("What is the capital of Zorbia?"), data.make_prompt("How can I save money?")]


def rollout_text(models, prompts, cfg, generator, fast=True):
    """ppo_rlhf's steps 1-2 for prompt strings, as main() runs them (models: policy, ref, rm, critic)."""
    ids, mask = ppo.encode_prompts(ENC, prompts, models[0].cfg.block_size - cfg.max_new_tokens, cfg.truncate_prompts)
    return ppo.rollout(*models, ids, mask, cfg.max_new_tokens, cfg.temperature, tok.eos_id(ENC), tok.pad_id(ENC),
                       generator, fast)


def _models(seed=0):
    torch.manual_seed(seed)
    policy = GPT(CFG)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = ScalarHeadGPT(CFG).eval().requires_grad_(False)
    critic = copy.deepcopy(rm).requires_grad_(True)
    return policy, ref, rm, critic


def _rollout(cfg, seed=0, fast=True):
    policy, ref, rm, critic = _models(seed)
    ro = rollout_text((policy, ref, rm, critic), PROMPTS, cfg, torch.Generator().manual_seed(seed), fast)
    return policy, ref, rm, critic, ro


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
    cfg = ppo.Config(max_new_tokens=10, temperature=0.7, ppo_epochs=1, minibatch=2)
    policy, ref, rm, critic = _models()
    policy = _perturbed(policy)
    ro = rollout_text((policy, ref, rm, critic), PROMPTS, cfg, torch.Generator().manual_seed(0), fast)
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
    adv, ret = ppo.compute_gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
    opt = torch.optim.AdamW([{"params": policy.parameters()}, {"params": critic.parameters()}], lr=1e-3)
    first = ppo.ppo_update(policy, critic, opt, ro, adv, ret, cfg, True, torch.Generator().manual_seed(0))[0]
    tol = 0 if not fast else 1e-6
    assert abs(first["ratio_mean"] - 1) <= tol and abs(first["ratio_max"] - 1) <= 10 * tol
    assert first["clipfrac"] == 0.0 and abs(first["approx_kl"]) <= tol


def test_kl_is_zero_when_the_policy_is_its_reference():
    """At the start of RL (policy = reference) the sampling loop's log-probs equal the reference forward's."""
    cfg = ppo.Config(max_new_tokens=10, temperature=0.7)
    _, _, _, _, ro = _rollout(cfg, fast=True)
    assert torch.allclose(ro.old_logprobs, ro.ref_logprobs, atol=1e-5) and ro.exact_kl is None


def test_rollout_masks_and_temperature():
    """The response mask is 1 up to and including EOS; old log-probs are those of logits / temperature."""
    cfg = ppo.Config(max_new_tokens=12, temperature=2.0)
    policy, *_, ro = _rollout(cfg)
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
    _, _, rm, critic, ro = _rollout(cfg)
    for i in range(len(PROMPTS)):
        keep = ro.seq_mask[i].bool()
        seq = ro.seq[i][keep][None]                                        # (1, n) unpadded
        n_prompt = int(ro.seq_mask[i, :ro.n_prompt].sum())
        n_resp = int(ro.mask[i].sum())
        v = ppo.response_values(critic, seq, torch.ones_like(seq), n_prompt)[0, :n_resp]
        assert torch.allclose(v, ro.values[i, :n_resp], atol=1e-5)
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
    loss, stats = ppo.ppo_policy_loss(logprobs, torch.zeros(1, 3), adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert stats["clipfrac"] == pytest.approx(0.5) and stats["ratio_max"] == pytest.approx(1.5)
    assert stats["approx_kl"] == pytest.approx(0.5 - math.log(1.5))


def test_clipped_value_loss_hand_example():
    """½·max((V-R)², (clip(V, V_old ± 0.2) - R)²): the clipped error counts only when it is larger."""
    values, old, ret = torch.tensor([[1.0, 0.3]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 1.0]])
    mask = torch.ones(1, 2)
    loss, stats = ppo.ppo_value_loss(values, old, ret, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.64) / 2)
    assert stats["vf_clipfrac"] == pytest.approx(0.5)
    plain, _ = ppo.ppo_value_loss(values, old, ret, mask, clip_eps=0.0)
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


def test_presets_switch_what_they_say():
    """vanilla turns off KL, score normalisation, value clipping, grad clipping and critic pre-training."""
    maxed, vanilla = ppo.Config(**ppo.PRESETS["ppo_max"]), ppo.Config(**ppo.PRESETS["vanilla"])
    assert maxed.kl_coef > 0 and maxed.score_norm == "norm_clip" and maxed.vf_clip > 0 and maxed.grad_clip > 0
    assert maxed.critic_pretrain_iters > 0 and not maxed.adv_whiten and maxed.entropy_coef == 0
    assert maxed.ppo_epochs == 1                         # one pass over each rollout batch, as the released code
    assert (vanilla.kl_coef, vanilla.score_norm, vanilla.vf_clip, vanilla.grad_clip, vanilla.critic_pretrain_iters) == \
           (0.0, "none", 0.0, 0.0, 0)


def test_vanilla_pg_preset_is_one_unclipped_step_of_reward_to_go():
    """vanilla_pg: γ = λ = 1 (returns = reward-to-go), one epoch of one minibatch (ρ = 1), raw scores, plain value MSE."""
    c = ppo.Config(**ppo.PRESETS["vanilla_pg"])
    assert (c.gamma, c.lam, c.ppo_epochs, c.minibatch, c.rollout_batch, c.vf_clip, c.score_norm) == \
           (1.0, 1.0, 1, 64, 64, 0.0, "none")


def test_critic_pretraining_leaves_policy_unchanged():
    """With update_policy=False a PPO update moves the critic only."""
    cfg = ppo.Config(max_new_tokens=8, minibatch=2, ppo_epochs=1)
    policy, _, _, critic, ro = _rollout(cfg)
    before_p, before_c = copy.deepcopy(policy.state_dict()), copy.deepcopy(critic.state_dict())
    adv, ret = ppo.compute_gae(torch.randn_like(ro.values) * ro.mask, ro.values, ro.mask, 1.0, 0.95)
    opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": 1e-2}, {"params": critic.parameters(), "lr": 1e-2}])
    ppo.ppo_update(policy, critic, opt, ro, adv, ret, cfg, False, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before_p.items())
    assert any(not torch.equal(v, critic.state_dict()[k]) for k, v in before_c.items())
    ppo.ppo_update(policy, critic, opt, ro, adv, ret, cfg, True, torch.Generator().manual_seed(0))
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
    cfg = ppo.Config(max_new_tokens=6, minibatch=8, ppo_epochs=2, kl_coef=0.0, score_norm="none")
    policy, ref, _, critic = _models()
    opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": 1e-2}, {"params": critic.parameters(), "lr": 1e-2}])
    prompts = PROMPTS * 4
    n_prompt = max(len(tok.encode(ENC, p)) for p in prompts)
    rm, gen, means = LowTokenReward(n_prompt), torch.Generator().manual_seed(0), []
    for _ in range(20):
        ro = rollout_text((policy, ref, rm, critic), prompts, cfg, gen)
        rewards = ppo.kl_rewards(ro.old_logprobs, ro.ref_logprobs, ro.mask, ro.scores, cfg.kl_coef)
        adv, ret = ppo.compute_gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
        ppo.ppo_update(policy, critic, opt, ro, adv, ret, cfg, True, torch.Generator().manual_seed(len(means)))
        means.append(ro.scores.mean().item())
    assert sum(means[-3:]) / 3 > sum(means[:3]) / 3 + 0.3, means  # ~0.47 -> ~0.98 when written


def test_collapse_signature():
    """The warning fires for length at the max or for KL up + RM up + gold down, and not for a healthy run."""
    healthy = [dict(length=20, eos_rate=1.0, kl_seq=1.0, score_raw=3.0, gold=0.6)] * 6
    assert ppo.collapse_signature(healthy, 48, 3) == []
    long = healthy[:3] + [dict(length=47, eos_rate=0.2, kl_seq=1.0, score_raw=3.0, gold=0.6)] * 3
    assert "length" in ppo.collapse_signature(long, 48, 3)[0]
    hacked = healthy[:3] + [dict(length=25, eos_rate=1.0, kl_seq=3.0, score_raw=5.0, gold=0.2)] * 3
    assert "gold down" in ppo.collapse_signature(hacked, 48, 3)[0]


@pytest.mark.parametrize("switch", [dict(entropy_coef=0.1), dict(adv_whiten=True), dict(adv_clip=0.05),
                                    dict(clip_eps=0.01), dict(ptx_coef=1.0), dict(vf_clip=0.0), dict(grad_clip=0.01)])
def test_each_update_switch_changes_the_update(switch):
    """Turning one switch on changes the weights a PPO update produces (from identical starts and minibatches)."""
    from train_sft import encode_demos
    demos = encode_demos(ENC, data.make_demonstrations(PROMPTS, 0), 64)
    results = []
    for cfg in (ppo.Config(max_new_tokens=8, minibatch=2, ppo_epochs=2),
                ppo.Config(max_new_tokens=8, minibatch=2, ppo_epochs=2, **switch)):
        policy, _, _, critic, ro = _rollout(cfg)
        rewards = ppo.kl_rewards(ro.old_logprobs, ro.ref_logprobs, ro.mask,
                                 torch.tensor([1.0, -1.0, 2.0, 0.5]), cfg.kl_coef)
        adv, ret = ppo.compute_gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
        opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": 1e-2}, {"params": critic.parameters(), "lr": 1e-2}])
        stats = ppo.ppo_update(policy, critic, opt, ro, adv, ret, cfg, True, torch.Generator().manual_seed(0), demos,
                               tok.pad_id(ENC))
        results.append((policy.state_dict(), critic.state_dict(), stats))
    (p0, c0, s0), (p1, c1, s1) = results
    changed = any(not torch.allclose(p0[k], p1[k]) for k in p0) or any(not torch.allclose(c0[k], c1[k]) for k in c0)
    assert changed
    if "ptx_coef" in switch:
        assert "ptx_loss" in s1[0] and "ptx_loss" not in s0[0]
