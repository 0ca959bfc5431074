import math

import pytest
import torch

import data
import tokenizer as tok
from tokenizer import build_sft_example, encode_demos
from reward_model import pairwise_loss, pearson, ranks, spearman
from train_sft import Config, lr_at, sft_loss


def test_pairwise_loss_hand_example():
    """-log sigmoid(r_c - r_r), averaged: margins +1 and -1 give (log(1+e^-1) + log(1+e)) / 2 = 0.81326."""
    loss = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.81326, abs=1e-5)
    assert pairwise_loss(torch.tensor([3.0]), torch.tensor([3.0])).item() == pytest.approx(math.log(2))


def test_sft_mask_covers_exactly_response_and_eos():
    """The SFT loss mask is 0 on every prompt token and 1 on every response token including the final EOS."""
    enc = tok.get_tokenizer("toy")
    prompt, response = data.make_prompt("What is 2 plus 2?"), " The answer is 4." + data.EOS_TEXT
    (ids, mask), = encode_demos(enc, [(prompt, response)], block_size=128)
    n_prompt = len(tok.encode(enc, prompt))
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tok.decode(enc, [i for i, m in zip(ids, mask) if m]) == response
    assert ids[-1] == tok.eos_id(enc) and mask[-1] == 1
    assert build_sft_example([7, 8], [9, 1]) == ([7, 8, 9, 1], [0, 0, 1, 1])


def test_sft_loss_ignores_prompt_and_padding_targets():
    """Changing logits that predict prompt or pad tokens leaves the SFT loss unchanged; it equals the hand mean."""
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 8, 0]])           # prompt 5 6, response 7 8, then a pad
    loss_mask = torch.tensor([[0, 0, 1, 1, 0]])
    logits = torch.randn(1, 5, 10)
    base = sft_loss(logits, ids, loss_mask)
    logp = torch.log_softmax(logits, -1)
    assert base.item() == pytest.approx(-(logp[0, 1, 7] + logp[0, 2, 8]).item() / 2, abs=1e-6)
    poked = logits.clone()
    poked[0, 0] += 5.0   # predicts prompt token 6: not a target
    poked[0, 3] += 5.0   # predicts the pad: not a target
    assert sft_loss(poked, ids, loss_mask).item() == pytest.approx(base.item(), abs=1e-6)


def test_lr_schedule_warmup_starts_above_zero():
    """Warm-up starts at lr/warmup (not 0), peaks at lr, and cosine-decays to lr/10."""
    cfg = Config(lr=1.0, warmup_iters=10, max_iters=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_rank_correlations_hand_examples():
    """Average ranks share ties; Spearman is 1 for any monotone map and -1 when reversed."""
    assert ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert spearman(x, [v ** 3 for v in x]) == pytest.approx(1.0)
    assert spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    assert pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert pearson(x, [v ** 3 for v in x]) < 1.0
