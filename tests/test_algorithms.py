import math
import os
import subprocess
import sys

import pytest
import torch

import tokenizer as tok
from algorithms import rloo
from algorithms.dpo import dpo_loss, sequence_logprobs
from algorithms.raft import best_of_k
from algorithms.rloo import MovingAverageBaseline, kl_shaped_rewards, loo_advantages, reinforce_loss
from runs import load_checkpoint, read_jsonl
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rloo_baseline_three_samples_by_hand():
    """k=3, R = [1, 2, 6]: the others' means are [4, 3.5, 1.5], so A = [-3, -1.5, 4.5] = 3/2·(R - 3)."""
    adv = loo_advantages(torch.tensor([1.0, 2.0, 6.0]), k=3)
    assert adv.tolist() == pytest.approx([-3.0, -1.5, 4.5])


def test_rloo_groups_are_prompt_major_and_sum_to_zero():
    """Rows b·k + j belong to prompt b: per-prompt offsets cancel, each group sums to 0, A = k/(k-1)·(R - mean)."""
    k, B = 4, 3
    noise = torch.randn(B * k, generator=torch.Generator().manual_seed(0))
    rewards = noise + torch.tensor([0.0, 100.0, -50.0]).repeat_interleave(k)   # a big offset per prompt
    adv = loo_advantages(rewards, k)
    assert adv.view(B, k).sum(1).abs().max() < 1e-4
    assert adv.abs().max() < 10                                               # offsets never leak across prompts
    g = rewards.view(B, k)
    assert torch.allclose(adv, (k / (k - 1) * (g - g.mean(1, keepdim=True))).view(-1), atol=1e-4)
    with pytest.raises(ValueError, match="k >= 2"):
        loo_advantages(rewards, 1)


def test_moving_average_baseline_uses_earlier_batches_only():
    """The first batch gets baseline 0; later ones the mean of every earlier reward, never their own."""
    mab = MovingAverageBaseline()
    a1, b1 = mab.advantages(torch.tensor([1.0, 3.0]))
    a2, b2 = mab.advantages(torch.tensor([10.0]))
    assert (b1, b2) == (0.0, 2.0) and a1.tolist() == [1.0, 3.0] and a2.tolist() == [8.0]


def test_reinforce_loss_by_hand_and_k2_contrastive_form():
    """loss = -mean(A·log π(y)); for k=2 with LOO it is ½(R+ - R-)(-log π(y+) + log π(y-)) (Back to Basics, App. B)."""
    logp = torch.tensor([-2.0, -5.0], requires_grad=True)
    adv = loo_advantages(torch.tensor([3.0, 1.0]), k=2)                        # [2, -2]
    loss = reinforce_loss(logp, adv)
    assert loss.item() == pytest.approx(-(2 * -2.0 + -2 * -5.0) / 2)
    assert loss.item() == pytest.approx(0.5 * (3.0 - 1.0) * (2.0 - 5.0))
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-1.0, 1.0])


def test_dpo_loss_hand_example():
    """β=0.5, h = (−1+2) − (−3+2) = 2: loss = log(1 + e^−1); implicit rewards 0.5 and −0.5, accuracy 1."""
    loss, st = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert (st["rewards_chosen"], st["rewards_rejected"], st["margin"], st["accuracy"]) == pytest.approx((0.5, -0.5, 1.0, 1.0))
    smooth, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5, 0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.e))


def test_dpo_sequence_logprobs_sum_response_tokens():
    """Sequence log-probs are the sum of the response tokens' log-probs only (the prompt and padding excluded)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16, pad_id=0)).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 0], [3, 4, 8, 9, 0, 0]])
    mask = (ids != 0).long()
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]])
    lp = sequence_logprobs(m, ids, mask, loss_mask)
    full = torch.log_softmax(m(ids, mask), -1)
    assert lp[0].item() == pytest.approx(sum(full[0, t - 1, ids[0, t]].item() for t in (2, 3, 4)), abs=1e-5)
    assert lp[1].item() == pytest.approx(sum(full[1, t - 1, ids[1, t]].item() for t in (2, 3)), abs=1e-5)


@pytest.fixture(scope="module")
def dropout_sft(tmp_path_factory):
    """A tiny SFT policy trained with --dropout 0.1, and the reward model trained from it (whose model_config
    inherits the dropout): every stage after them must run without dropout."""
    import reward_model
    import train_sft
    out = str(tmp_path_factory.mktemp("dropout_sft"))
    train_sft.main(["--preset", "tiny", "--device", "cpu", "--out_dir", out, "--dropout", "0.1"])
    reward_model.main(["--preset", "tiny", "--device", "cpu", "--out_dir", out, "--sft_ckpt", f"{out}/sft.pt"])
    assert load_checkpoint(f"{out}/rm.pt", "rm")["model_config"]["dropout"] == 0.1
    return out


def test_models_after_sft_run_without_dropout(dropout_sft):
    """Policy, reference, RM (every RL stage, A-LoL) and the critic (both inits) built from dropout-0.1
    checkpoints give the same output twice in train mode: no dropout is left in them."""
    from runs import load_critic, load_models
    sft_path, rm_path = f"{dropout_sft}/sft.pt", f"{dropout_sft}/rm.pt"
    policy, ref, rm, sft, rm_ckpt = load_models(sft_path, rm_path, "cpu")
    critics = [load_critic(init, sft, rm_ckpt, sft_path, rm_path) for init in ("rm", "sft")]
    seq = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    for model in (policy, ref, rm, *critics):
        model.train()
        with torch.no_grad():
            assert torch.equal(model(seq), model(seq)), type(model).__name__


def test_first_ppo_minibatch_and_first_dpo_step_from_a_dropout_sft(dropout_sft, tmp_path):
    """From a dropout-0.1 SFT: PPO's first minibatch (one iteration, one minibatch, no critic pre-training) logs
    ratio 1 (with the SFT's dropout left in, as before the fix: mean 0.992, max 1.135), and DPO's first step, where
    π = π_ref, logs loss ln 2."""
    import ppo_rlhf
    from algorithms import dpo
    from runs import read_jsonl
    ckpts = ["--sft_ckpt", f"{dropout_sft}/sft.pt", "--rm_ckpt", f"{dropout_sft}/rm.pt", "--device", "cpu"]
    ppo_rlhf.main(["--preset", "tiny", "--n_iters", "1", "--critic_pretrain_iters", "0", "--epochs", "1",
                   "--minibatches", "1", "--out_dir", str(tmp_path / "ppo")] + ckpts)
    row = read_jsonl(str(tmp_path / "ppo" / "ppo_log.jsonl"))[0]
    assert abs(row["ratio_mean"] - 1) < 1e-6 and abs(row["ratio_max"] - 1) < 1e-5, row
    dpo.main(["--preset", "tiny", "--out_dir", str(tmp_path / "dpo")] + ckpts)
    first = next(r for r in read_jsonl(str(tmp_path / "dpo" / "dpo_log.jsonl")) if "loss" in r)
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_kl_shaped_reward_by_hand():
    """R = score - β·Σ_t (old - ref) over response tokens only: 2 - 0.5·(1 + 1) = 1; padding ignored."""
    old = torch.tensor([[-1.0, -1.0, 5.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-2.0, -2.0, 0.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    R, kl = kl_shaped_rewards(torch.tensor([2.0, 3.0]), old, ref, mask, 0.5)
    assert R.tolist() == pytest.approx([1.0, 3.0]) and kl.tolist() == pytest.approx([2.0, 0.0])


def test_best_of_k_picks_each_prompts_best_row():
    """Prompt-major rewards: the best row of each group of k, as a row index."""
    assert best_of_k(torch.tensor([0.1, 0.9, 0.5, 3.0, -1.0, 2.0]), k=3).tolist() == [1, 3]


def _run(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


def test_each_algorithm_runs_tiny_and_evaluates(tiny_pipeline, tmp_path, capsys):
    """RLOO, REINFORCE (moving average), DPO, RAFT and A-LoL run with the tiny preset (in this process) and
    studies/evaluate.py (its command line) reads their checkpoints."""
    from algorithms import alol, dpo, raft
    out, base = str(tmp_path), tiny_pipeline
    common = ["--preset", "tiny", "--device", "cpu", "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt"]
    rloo.main(common + ["--out_dir", out])
    rloo.main(common + ["--baseline", "moving_avg", "--samples_per_prompt", "1", "--out_dir", f"{out}/reinforce"])
    dpo.main(common + ["--out_dir", out])
    raft.main(common + ["--out_dir", out])
    alol.main(common + ["--out_dir", out])
    capsys.readouterr()
    enc_id = tok.tokenizer_id(tok.get_tokenizer("toy"))
    for stage, path in (("rloo", "rloo.pt"), ("rloo", "reinforce/rloo.pt"), ("dpo", "dpo.pt"), ("raft", "raft.pt"),
                        ("alol", "alol.pt")):
        ck = load_checkpoint(f"{out}/{path}", stage, enc_id)
        assert ck["done"] and "win_rate_vs_sft" in ck["metrics"]
    report = _run("-m", "studies.evaluate", "--policies", f"{out}/rloo.pt", f"{out}/dpo.pt", f"{out}/raft.pt", "--sft_ckpt",
                  f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt", "--out_dir", out, "--n_prompts", "8",
                  "--max_new_tokens", "8", "--device", "cpu")
    assert "| rloo |" in report and "| dpo |" in report and "| raft |" in report


def test_alol_weights_at_init_and_variants():
    """At π = π_ref (ρ ≡ 1) A-LoL and A-LoL seq equal ref-free; negative advantages weigh nothing."""
    from algorithms.alol import alol_loss
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).float()
    adv = torch.tensor([0.5, -0.3, 0.2])
    free, _ = alol_loss(logp, logp, mask, adv, "ref_free", 0.9)
    assert free.item() == pytest.approx(-(0.5 * logp[0, :3].sum() + 0.2 * logp[2, 0]).item() / 3)
    for variant in ("alol", "seq"):
        loss, st = alol_loss(logp, logp, mask, adv, variant, 0.9)
        assert loss.item() == pytest.approx(free.item()) and st["clipped_frac"] == 0.0


def test_alol_clip_in_log_space_stays_finite():
    """A huge log-ratio is clipped to 1+ε before exp: the weight is exactly 1.9 and nothing overflows."""
    from algorithms.alol import alol_loss
    logp, ref = torch.full((1, 4), -1.0), torch.full((1, 4), -300.0)   # log ρ = 1196
    mask, adv = torch.ones(1, 4), torch.tensor([1.0])
    loss, st = alol_loss(logp, ref, mask, adv, "alol", 0.9)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(-1.9 * -4.0)
    assert st["clipped_frac"] == 1.0
    loss_seq, _ = alol_loss(logp, ref, mask, adv, "seq", 0.9)
    assert loss_seq.item() == pytest.approx(-1.9 * -4.0)


def test_alol_kl_gradient_is_ref_free_with_shifted_advantage():
    """∇ of -A⁺·s + β(s - sg s_ref) equals ∇ of the ref-free loss with advantage A⁺ - β."""
    from algorithms.alol import alol_loss
    mask, adv, beta = torch.ones(2, 3), torch.tensor([0.6, 0.3]), 0.1
    ref = -torch.rand(2, 3, generator=torch.Generator().manual_seed(1))
    a = (-torch.rand(2, 3, generator=torch.Generator().manual_seed(2))).requires_grad_()
    b = a.detach().clone().requires_grad_()
    alol_loss(a, ref, mask, adv, "kl", 0.9, beta)[0].backward()
    alol_loss(b, ref, mask, adv - beta, "ref_free", 0.9)[0].backward()
    assert torch.allclose(a.grad, b.grad)


def test_priority_sampling_never_draws_negative_advantages():
    """Indices are drawn ∝ A⁺: examples with A <= 0 never appear; all-negative advantages are a clear error."""
    from algorithms.alol import priority_sample
    adv = torch.tensor([0.5, -1.0, 0.0, 1.5])
    idx = priority_sample(adv, 2000, torch.Generator().manual_seed(0))
    assert set(idx.tolist()) <= {0, 3}
    assert 0.65 < (idx == 3).float().mean().item() < 0.85                  # 1.5 / 2.0 = 0.75
    with pytest.raises(ValueError, match="positive advantage"):
        priority_sample(torch.tensor([-1.0, 0.0]), 3, torch.Generator())


def test_value_head_ignores_left_padding():
    """V(x) does not change when a prompt's hidden states get extra left padding (key-padding mask)."""
    from algorithms.alol import ValueHead
    torch.manual_seed(0)
    head = ValueHead(16, n_head=2).eval()
    h = torch.randn(1, 4, 16)
    padded = torch.cat([torch.randn(1, 3, 16), h], 1)
    v1 = head(h, torch.ones(1, 4, dtype=torch.long))
    v2 = head(padded, torch.tensor([[0, 0, 0, 1, 1, 1, 1]]))
    assert torch.allclose(v1, v2, atol=1e-6)


def test_compare_quick_writes_table_and_plot(tiny_pipeline, tmp_path):
    """studies/compare.py --quick trains two methods from one SFT + RM and writes the table, the JSONL and the plot."""
    out, base = str(tmp_path), tiny_pipeline
    report = _run("-m", "studies.compare", "--quick", "--methods", "rloo", "alol_seq", "--seeds", "0", "1", "--sft_ckpt",
                  f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt", "--out_dir", f"{out}/compare", "--device", "cpu")
    tiny = rloo.Config(**rloo.PRESETS["tiny"])                             # studies/compare.py adds --k 4
    generated, steps = tiny.n_iters * tiny.prompts_per_iter * 4, tiny.n_iters * tiny.minibatches
    assert f"| rloo | own samples | {generated} | {steps} | 2 |" in report and "| alol_seq | RM pairs" in report
    for f in ("compare.md", "compare.jsonl", "compare_reward_kl.png", "rloo_s1/rloo.pt", "alol_seq_s0/alol.pt"):
        assert os.path.getsize(os.path.join(out, "compare", f)) > 0, f


def test_training_budget_is_what_each_run_wrote(base, tmp_path):
    """studies.compare reads a run's budget from the checkpoint the run wrote, whatever its stage: the tiny PPO run
    generated 4 iterations × 8 responses and took (4 - 1 critic pre-training) × 1 epoch × 2 minibatches = 6 policy
    steps; tiny RLOO 3 iterations × 4 prompts × 2 samples = 24 responses and 3 × 2 minibatches = 6 steps."""
    from studies.kept_runs import the_checkpoint
    from studies.compare import training_budget
    assert training_budget(load_checkpoint(f"{base}/ppo.pt", "ppo")) == (32, 6)
    rloo.main(["--preset", "tiny", "--device", "cpu", "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt", f"{base}/rm.pt",
               "--out_dir", str(tmp_path)])
    assert training_budget(load_checkpoint(the_checkpoint(str(tmp_path)), None)) == (24, 6)


def test_the_worked_example_runs_resumable_and_opens_in_the_report(base, tmp_path):
    """docs/adding_an_algorithm.md's example, algorithms/reinforce.py, added as one new file: its tiny run writes a
    finished checkpoint with its budget (3 iterations × 8 responses, 3 steps), its log and samples, and
    studies.report draws its page with no other edit (its resume: tests/test_resume.py)."""
    from algorithms import reinforce
    from studies import report
    out = str(tmp_path)
    metrics = reinforce.main(["--preset", "tiny", "--device", "cpu", "--sft_ckpt", f"{base}/sft.pt", "--rm_ckpt",
                              f"{base}/rm.pt", "--out_dir", out])
    ckpt = load_checkpoint(f"{out}/reinforce.pt", "reinforce")
    assert ckpt["training_budget"] == dict(responses_generated=24, policy_steps=3) and ckpt["metrics"] == metrics
    assert [r["iter"] for r in read_jsonl(f"{out}/reinforce_log.jsonl")] == [1, 2, 3]
    page = open(report.report([out], f"{out}/report.html"), encoding="utf-8").read()
    assert f"{os.path.basename(out)} reinforce" in page and "3 iterations logged" in page and "iteration 2" in page
    assert "(the run has not finished)" not in page


def test_batch_mean_baseline_by_hand():
    """A_i = R_i - mean(R): [1, 2, 6] -> [-2, -1, 3]."""
    from algorithms.reinforce import batch_mean_advantages
    assert batch_mean_advantages(torch.tensor([1.0, 2.0, 6.0])).tolist() == [-2.0, -1.0, 3.0]


def test_compare_spread_is_the_sample_std_over_seeds():
    """studies.compare's "±": the sample standard deviation (÷ n-1), 1.0 for gold rewards 1, 2, 3 (the population
    std would be 0.816); undefined (nan) for one seed."""
    from studies.compare import KEYS, summarize
    rows = [dict(method="m", time_s=0.0, **{k: v for k in KEYS}) for v in (1.0, 2.0, 3.0)]
    assert summarize(rows)["m"]["gold"] == (2.0, 1.0)
    assert math.isnan(summarize(rows[:1])["m"]["gold"][1])
