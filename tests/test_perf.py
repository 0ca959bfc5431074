"""The speed-ups keep the math: each fast path equals the plain path it replaces. Plus the benchmark's wiring
and its FLOP count by hand."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import data
import ppo_rlhf as ppo
import tokenizer as tok
from model import GPT, GPTConfig, ScalarHeadGPT
from studies import bench
from runs import autocast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENC = tok.get_tokenizer("toy")
CFG = GPTConfig(vocab_size=ENC.n_vocab, block_size=64, n_layer=2, n_head=2, n_embd=32, pad_id=tok.pad_id(ENC))
PROMPTS = [data.make_prompt(q) for q in ("What is 2 plus 3?", "Tell me a joke.", "What is the capital of Zorbia?")]


def rollout_text(models, prompts, cfg, generator, fast=True):
    """ppo_rlhf's steps 1-2 for prompt strings, as main() runs them (models: policy, ref, rm, critic): the
    rollouts and the critic's values (B, Tr). Under autocast main() always takes the second forward."""
    policy, ref, rm, critic = models
    ids, mask = ppo.encode_prompts(ENC, prompts, policy.cfg.block_size - cfg.max_new_tokens, cfg.truncate_prompts)
    second = not fast or torch.is_autocast_enabled("cpu")
    ro = ppo.sample_and_score(policy, ref, rm, ids, mask, cfg.max_new_tokens, cfg.temperature, tok.eos_id(ENC),
                              tok.pad_id(ENC), generator, second_forward=second)
    return ro, ppo.critic_values(critic, ro)


def _models():
    torch.manual_seed(0)
    policy = GPT(CFG)
    with torch.no_grad():  # a policy that differs from the reference, so KL and ratios are not trivially 0 / 1
        ref = copy.deepcopy(policy).requires_grad_(False)
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return policy, ref, ScalarHeadGPT(CFG).requires_grad_(False), ScalarHeadGPT(CFG)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fast_rollout_equals_plain_rollout(temperature):
    """old_logprobs and entropy from the sampling loop = those of a second forward pass; everything else identical."""
    cfg = ppo.Config(max_new_tokens=12, temperature=temperature)
    models = _models()
    fast, fast_values = rollout_text(models, PROMPTS, cfg, torch.Generator().manual_seed(3), fast=True)
    plain, plain_values = rollout_text(models, PROMPTS, cfg, torch.Generator().manual_seed(3), fast=False)
    for k in ("response", "mask", "seq", "seq_mask", "ref_logprobs", "scores"):
        assert torch.equal(getattr(fast, k), getattr(plain, k)), k
    assert torch.equal(fast_values, plain_values)
    assert torch.allclose(fast.old_logprobs, plain.old_logprobs, atol=1e-5)
    assert torch.allclose(fast.entropy, plain.entropy, atol=1e-4)
    assert (fast.old_logprobs != fast.ref_logprobs).any()             # the check is not vacuous


def test_generate_logprobs_are_the_tempered_distribution_and_refuse_top_k():
    """generate's logprobs score the sampled tokens under softmax(logits / τ), as response_logits does; with top_k
    the tokens would come from another distribution than the one scored, so the combination is refused."""
    policy = _models()[0].eval()
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = (torch.arange(4) >= torch.tensor([[0], [2]])).long()
    with pytest.raises(ValueError, match="top_k"):
        policy.generate(ids, mask, 6, None, tok.pad_id(ENC), temperature=0.8, top_k=20, return_logprobs=True)
    sample = policy.generate(ids, mask, 6, None, tok.pad_id(ENC), temperature=0.8,
                             generator=torch.Generator().manual_seed(0), return_logprobs=True)
    resp, logp, ent = sample.tokens, sample.logprobs, sample.entropy
    assert resp.shape == (2, 6)                                              # eos_id None: exactly max_new_tokens
    seq, smask = torch.cat([ids, resp], 1), torch.cat([mask, torch.ones_like(resp)], 1)
    full = ppo.logprobs_from_logits(ppo.response_logits(policy, seq, smask, 4, 0.8), resp)
    assert torch.allclose(logp, full, atol=1e-5)
    assert torch.allclose(ent, ppo.entropy_from_logits(ppo.response_logits(policy, seq, smask, 4, 0.8)), atol=1e-4)


def test_response_logits_equal_the_full_forward_at_response_positions():
    policy = _models()[0]
    seq = torch.randint(0, 100, (2, 10))
    mask = torch.ones_like(seq)
    mask[1, :3] = 0
    assert torch.allclose(ppo.response_logits(policy, seq, mask, 4, 1.0), policy(seq, mask)[:, 3:-1], atol=1e-6)


def test_autocast_is_a_no_op_on_cpu_and_bf16_on_cuda():
    policy = _models()[0]
    seq = torch.randint(0, 100, (2, 10))
    plain = policy(seq)
    with autocast("cpu"):                                                   # runs.autocast: fp32 math on CPU
        assert torch.equal(policy(seq), plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):                      # real bf16 autocast changes the numbers
        assert not torch.equal(policy(seq), plain)
    if torch.cuda.is_available():  # the same code on a GPU: bf16 body, fp32 logits close to the CPU ones
        cuda = policy.cuda()
        with autocast("cuda"):
            logits = cuda(seq.cuda())
        assert logits.dtype == torch.float32
        assert torch.allclose(logits.cpu(), policy.cpu()(seq), atol=5e-2)


def gpt2_like_models(seed=0):
    """The _models() quartet with GPT-2's logit scale: around -60 with a spread of ~8 (every token embedding
    shares a direction u and the final LayerNorm's bias points against it), where bf16's spacing is 0.25-0.5."""
    torch.manual_seed(seed)
    policy = GPT(CFG)
    with torch.no_grad():
        u = torch.randn(CFG.n_embd)
        u /= u.norm()
        policy.wte.weight.mul_(25).add_(4.0 * u)
        policy.ln_f.bias.copy_(-20 * u)
        ref = copy.deepcopy(policy).requires_grad_(False)
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return policy, ref, ScalarHeadGPT(CFG).requires_grad_(False), ScalarHeadGPT(CFG)


def test_output_heads_are_fp32_under_bf16_autocast():
    """Under bf16 autocast the LM head and the scalar head still compute in fp32: log-probs at GPT-2's logit
    scale stay within 0.01 nats of the fp32 model's (measured: 0.00057 on average, 0.0021 at most; with the
    bf16 LM head of the code before, 0.094 and 0.35)."""
    policy, _, rm, _ = gpt2_like_models()
    seq = torch.randint(0, 1000, (4, 40))
    tokens = seq[:, 1:, None]                                               # (B, T-1, 1) the next tokens
    with torch.no_grad():
        logits = policy(seq)                                                # (B, T, V) fp32 everywhere
        assert -80 < logits[..., :1000].mean() < -40                        # GPT-2-like offsets
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = policy.hidden(seq)                                          # (B, T, C) from a bf16 body
            logits_bf16 = policy.logits(h)                                  # (B, T, V)
            values = rm(seq)                                                # (B, T)
        assert logits_bf16.dtype == torch.float32 and values.dtype == torch.float32
        assert torch.equal(logits_bf16, policy.logits(h))                  # the head is the fp32 matmul
        err = (torch.log_softmax(logits_bf16, -1)[:, :-1].gather(-1, tokens)
               - torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens)).abs()  # (B, T-1, 1)
    assert err.mean() < 0.01 and err.max() < 0.05, f"log-prob error mean {err.mean():.4f}, max {err.max():.4f}"


@pytest.mark.parametrize("fast", [True, False])
def test_first_minibatch_ratio_is_one_under_bf16_autocast(fast):
    """The real rollout and update under bf16 autocast (CPU): the first minibatch's ratio is 1 within 1e-5 and
    nothing is clipped. Under autocast the rollout recomputes old log-probs in the update's layout (fast is
    ignored); on this CPU the sampling loop's own log-probs also agree (|log ρ| ≤ 1.2e-7 when measured)."""
    cfg = ppo.Config(max_new_tokens=16, epochs=1, minibatches=2, temperature=0.7)
    policy, ref, rm, critic = gpt2_like_models()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ro, values = rollout_text((policy, ref, rm, critic), PROMPTS + [data.make_prompt("How do I steal a car?")], cfg,
                          torch.Generator().manual_seed(3), fast=fast)
        rewards = ppo.kl_rewards(ro.old_logprobs, ro.ref_logprobs, ro.mask, ro.scores, cfg.kl_coef)
        adv, ret = ppo.compute_gae(rewards, values, ro.mask, cfg.gamma, cfg.lam)
        opt = torch.optim.AdamW([{"params": policy.parameters()}, {"params": critic.parameters()}], lr=1e-4)
        stats = ppo.ppo_update(policy, critic, opt, ro, values, adv, ret, cfg, True, torch.Generator().manual_seed(0))
    assert ro.old_logprobs.dtype == torch.float32 and (ro.old_logprobs != ro.ref_logprobs).any()
    first = stats[0]
    assert abs(first["ratio_mean"] - 1) < 1e-5 and abs(first["ratio_max"] - 1) < 1e-5 and first["clipfrac"] == 0
    assert abs(stats[1]["ratio_mean"] - 1) > 1e-5                           # the second minibatch did move


def test_iteration_flops_by_hand():
    """C=2, L=1, V=3, B=1, Tp=1, Tr=1, 4 epochs: body 24·C²·L = 96 per token, attention 8 per visible key,
    head 2·C·V = 12 per scored token."""
    w = dict(n_embd=2, n_layer=1, B=1, Tp=1, Tr=1, epochs=4, minibatch=1)
    f = bench.iteration_flops(w, 3, "ppo")
    body_seq = 2 * 96 + 8 * 1 + 8 * 2                                        # 216: two tokens, 1 and 2 keys
    assert [x for x, _ in f["generate"]] == [96 + 8, 12]                     # prefill of the prompt token; 1 head
    assert [x for x, _ in f["score"]] == [3 * body_seq, 12]                  # ref, RM, critic; ref's head
    assert [x for x, _ in f["train"]] == [3 * 4 * 2 * body_seq, 3 * 4 * 12]  # fwd+bwd, 4 epochs, 2 nets
    assert [x for x, _ in bench.iteration_flops(w, 3, "rloo")["train"]] == [3 * 4 * body_seq, 3 * 4 * 12]  # 1 net


@pytest.mark.parametrize("algo", ["ppo", "rloo", "generate"])
def test_bench_quick_runs(algo):
    r = subprocess.run([sys.executable, "-m", "studies.bench", "--quick", "--algo", algo], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokens/s" in r.stdout and "peak RSS" in r.stdout
    if algo != "generate":
        assert "iteration / bare-pass floor" in r.stdout and "iteration / FLOP floor" in r.stdout


def test_sample_categorical_has_the_distribution_of_multinomial():
    """The inverse-CDF sampler (one uniform per row) draws from probs exactly as torch.multinomial does:
    frequencies over 200k draws within 4.5 standard errors of probs, zero-probability tokens never drawn."""
    from model import sample_categorical
    probs = torch.tensor([0.2, 0.0, 0.5, 0.25, 0.05, 0.0])
    n = 200_000
    draws = sample_categorical(probs.expand(n, -1), torch.Generator().manual_seed(0))      # (n,)
    freq = torch.bincount(draws, minlength=6).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert (freq - probs).abs().le(4.5 * se + 1e-12).all(), freq
    assert freq[1] == 0 and freq[5] == 0                                   # PAD-like zero rows, incl. the last
    ref = torch.multinomial(probs.expand(n, -1), 1, generator=torch.Generator().manual_seed(0))[:, 0]
    assert (torch.bincount(ref, minlength=6).double() / n - freq).abs().max() < 0.01
    assert sample_categorical(torch.eye(4), torch.Generator().manual_seed(1)).tolist() == [0, 1, 2, 3]


def test_logprobs_from_logits_equals_logit_minus_logsumexp_values_and_gradients():
    logits = torch.randn(3, 5, 50, dtype=torch.float64).float().requires_grad_(True)
    tokens = torch.randint(0, 50, (3, 5))
    fast = ppo.logprobs_from_logits(logits, tokens)
    plain = logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)   # the definition
    assert torch.allclose(fast, plain, atol=1e-6)
    w = torch.randn(3, 5)
    g_fast, = torch.autograd.grad((fast * w).sum(), logits)
    g_plain, = torch.autograd.grad((plain * w).sum(), logits)
    assert torch.allclose(g_fast, g_plain, atol=1e-6)
