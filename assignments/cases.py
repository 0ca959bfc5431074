"""
The key: every graded case's inputs and the reference's outputs, written once into assignments/expected/PART.json
(the cases a student sees) and assignments/hidden/PART.json (one more case per part, kept out of the student
copy). Run it after changing a graded body or a case:

    python -m assignments.cases

This file and mutations.py (the key's tools, both left out of the student copy) run the reference; grading
reads the stored values.
Each case is built to catch a classic mistake: γ and λ both away from 1, values and rewards that are not 0 at
padding, ragged masks with left and right padding, a row with no response, score gaps where log(sigmoid)
underflows, tied groups, NaN at padding, a mask with few real tokens (where the unbiased variance differs).
"""
import argparse
import importlib
import json
import os
import sys

import torch

from assignments.grade import fresh_inputs
from assignments.parts import BY_NAME, PARTS

HERE = os.path.dirname(os.path.abspath(__file__))
VISIBLE_DIR, HIDDEN_DIR = os.path.join(HERE, "expected"), os.path.join(HERE, "hidden")


# ------------------------------------------------------------------------------------------------ encoding

def encode(v):
    """A tensor -> {"tensor": nested lists, "dtype"}; numbers, strings, booleans and None as they are."""
    if isinstance(v, torch.Tensor):
        return dict(tensor=v.detach().tolist(), dtype=str(v.dtype).removeprefix("torch."))
    return v


# ------------------------------------------------------------------------------------------------ inputs

def gen(seed):
    return torch.Generator().manual_seed(seed)


def mask_of(lengths, width, left=()):
    """(B, width) 0/1 float mask: row i has lengths[i] real tokens, right-padded, or left-padded if i in left."""
    m = torch.zeros(len(lengths), width)
    for i, n in enumerate(lengths):
        if i in left:
            m[i, width - n:width] = 1.0 if n else 0.0
        else:
            m[i, :n] = 1.0
    return m


def sft_case(seed, B, T, V, masks):
    g = gen(seed)
    return dict(logits=torch.randn(B, T, V, generator=g) * 2, ids=torch.randint(0, V, (B, T), generator=g),
                loss_mask=torch.tensor(masks, dtype=torch.long))


def token_logprobs(g, B, T, spread=0.3):
    return torch.randn(B, T, generator=g) * spread - 2.0


def inputs_of(part, seed, **kw):
    """One case's inputs for a part; kw picks the case's shapes and options."""
    g = gen(seed)
    if part == "sft_loss":
        return sft_case(seed, kw["B"], kw["T"], kw["V"], kw["masks"])
    if part == "bradley_terry":
        n, scale = kw["n"], kw["scale"]
        chosen = torch.randn(n, generator=g) * scale
        gaps = torch.tensor(kw["gaps"]) if "gaps" in kw else torch.randn(n, generator=g) * scale
        return dict(r_chosen=chosen, r_rejected=chosen - gaps)
    if part == "running_moments":
        k, n = kw["shape"]
        return dict(batches=torch.randn(k, n, generator=g) * 2 + 3, mode=kw["mode"], clip=kw["clip"])
    if part == "kl_reward":
        B, T = len(kw["lengths"]), kw["T"]
        return dict(old_logprobs=token_logprobs(g, B, T), ref_logprobs=token_logprobs(g, B, T),
                    mask=mask_of(kw["lengths"], T), scores=torch.randn(B, generator=g) * 2, kl_coef=kw["kl_coef"])
    if part == "gae":
        B, T = len(kw["lengths"]), kw["T"]
        return dict(rewards=torch.randn(B, T, generator=g), values=torch.randn(B, T, generator=g),
                    mask=mask_of(kw["lengths"], T), gamma=kw["gamma"], lam=kw["lam"])
    if part == "ppo_policy_loss":
        B, T = len(kw["lengths"]), kw["T"]
        mask = mask_of(kw["lengths"], T, kw.get("left", ()))
        logprobs = token_logprobs(g, B, T)
        old = logprobs + torch.randn(B, T, generator=g) * 0.3                 # ratios well outside 1 ± ε
        if kw.get("pad_logprob") is not None:                              # what a PAD position holds in a rollout
            logprobs, old = (x.masked_fill(mask == 0, kw["pad_logprob"]) for x in (logprobs, old))
        return dict(logprobs=logprobs, old_logprobs=old, advantages=torch.randn(B, T, generator=g), mask=mask,
                    ratio_clip=kw["ratio_clip"])
    if part == "ppo_value_loss":
        B, T = len(kw["lengths"]), kw["T"]
        old = torch.randn(B, T, generator=g)
        return dict(values=old + torch.randn(B, T, generator=g) * 0.4, old_values=old,
                    returns=old + torch.randn(B, T, generator=g), mask=mask_of(kw["lengths"], T, kw.get("left", ())),
                    vf_clip=kw["vf_clip"])
    if part == "whitening":
        B, T = len(kw["lengths"]), kw["T"]
        return dict(x=torch.randn(B, T, generator=g) * 2 + 1, mask=mask_of(kw["lengths"], T, kw.get("left", ())),
                    shift_mean=kw["shift_mean"])
    if part == "rloo_baseline":
        return dict(rewards=torch.randn(kw["prompts"] * kw["k"], generator=g), k=kw["k"])
    if part == "group_advantages":
        P, G = kw["prompts"], kw["group_size"]
        r = (torch.rand(P, G, generator=g) < 0.5).float() if kw.get("binary") else torch.randn(P, G, generator=g)
        for i in kw.get("tied", ()):
            r[i] = r[i, 0]
        return dict(rewards=r.view(-1), group_size=G, scale=kw["scale"])
    if part == "loss_aggregation":
        B, T = len(kw["lengths"]), kw["T"]
        mask = mask_of(kw["lengths"], T, kw.get("left", ()))
        loss = torch.randn(B, T, generator=g).masked_fill(mask == 0, float("nan"))   # NaN at padding
        return dict(loss_per_token=loss, mask=mask, mode=kw["mode"], norm_len=kw.get("norm_len"))
    if part == "dpo_loss":
        n = kw["n"]
        pc, pr = torch.randn(n, generator=g) * 3 - 30, torch.randn(n, generator=g) * 3 - 30
        return dict(policy_chosen=pc, policy_rejected=pr, ref_chosen=pc + torch.randn(n, generator=g),
                    ref_rejected=pr + torch.randn(n, generator=g), beta=kw["beta"],
                    label_smoothing=kw["label_smoothing"])
    if part == "alol_weight":
        n = kw["n"]
        s = torch.randn(n, generator=g) * 2 - 20
        return dict(advantages=torch.randn(n, generator=g), seq_logp=s,
                    ref_seq_logp=s + torch.randn(n, generator=g) * 0.5, clip_eps=kw["clip_eps"])
    if part == "step_bce_loss":
        B, T = len(kw["reads"]), kw["T"]
        read = torch.zeros(B, T)
        for i, at in enumerate(kw["reads"]):
            read[i, list(at)] = 1.0
        target = torch.rand(B, T, generator=g) if kw.get("soft") else (torch.rand(B, T, generator=g) < 0.7).float()
        logits = torch.randn(B, T, generator=g) * kw.get("scale", 2.0)
        return dict(logits=logits, target=target, read=read)
    raise ValueError(f"no inputs for part {part!r}")


# Inputs whose gradient is checked (of the output "loss", or, for alol_weight, that none flows into the weight).
NEEDS_GRAD = dict(sft_loss=["logits"], bradley_terry=["r_chosen", "r_rejected"], ppo_policy_loss=["logprobs"],
                  ppo_value_loss=["values"], loss_aggregation=["loss_per_token"],
                  dpo_loss=["policy_chosen", "policy_rejected"], alol_weight=["seq_logp"], step_bce_loss=["logits"])

M = [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1]]   # prompt, response, right padding
CASES = {   # part -> [(case name, seed, options)]; the last case of each part is the hidden one
    "sft_loss": [("prompt masked, right padding", 1, dict(B=3, T=7, V=11, masks=M)),
                 ("a row with no response", 2, dict(B=2, T=6, V=9, masks=[[0, 1, 1, 1, 0, 0], [0] * 6])),
                 ("hidden", 3, dict(B=3, T=5, V=7, masks=[[1, 1, 0, 1, 1], [1, 0, 0, 0, 1], [0, 1, 1, 1, 1]]))],
    "bradley_terry": [("scores of ±3", 1, dict(n=8, scale=3.0)),
                      ("gaps up to ±150, where log(sigmoid) underflows", 2,
                       dict(n=6, scale=3.0, gaps=[-150.0, -120.0, 0.5, 40.0, 120.0, -2.0])),
                      ("hidden", 3, dict(n=5, scale=3.0, gaps=[-110.0, 3.0, -0.1, 90.0, -7.0]))],
    "running_moments": [("norm_clip, clip 1.5", 1, dict(shape=(3, 6), mode="norm_clip", clip=1.5)),
                        ("scale", 2, dict(shape=(2, 5), mode="scale", clip=0.0)),
                        ("none: moments untouched", 3, dict(shape=(2, 4), mode="none", clip=0.0)),
                        ("hidden", 4, dict(shape=(4, 3), mode="norm_clip", clip=1.0))],
    "kl_reward": [("β 0.1, ragged right padding", 1, dict(T=6, lengths=[6, 3, 1, 4], kl_coef=0.1)),
                  ("β 0: the score alone", 2, dict(T=5, lengths=[2, 5, 3], kl_coef=0.0)),
                  ("hidden", 3, dict(T=4, lengths=[4, 1, 2], kl_coef=0.5))],
    "gae": [("γ 0.9, λ 0.8, ragged", 1, dict(T=6, lengths=[6, 3, 1, 4], gamma=0.9, lam=0.8)),
            ("γ 1, λ 0.95", 2, dict(T=5, lengths=[5, 2, 4], gamma=1.0, lam=0.95)),
            ("γ 0.95, λ 1", 3, dict(T=5, lengths=[3, 5], gamma=0.95, lam=1.0)),
            ("hidden", 4, dict(T=7, lengths=[7, 2, 5], gamma=0.8, lam=0.7))],
    "ppo_policy_loss": [("ε 0.2, ragged right padding", 1, dict(T=6, lengths=[6, 3, 4], ratio_clip=0.2)),
                        ("left padding, PAD log-probs -1e9", 2, dict(T=5, lengths=[5, 2, 3], left=(1, 2),
                                                                    ratio_clip=0.1, pad_logprob=-1e9)),
                        ("hidden", 3, dict(T=6, lengths=[1, 6, 4, 2], ratio_clip=0.3))],
    "ppo_value_loss": [("ε_v 0.2, ragged", 1, dict(T=6, lengths=[6, 3, 4], vf_clip=0.2)),
                       ("no clip (ε_v 0), left padding", 2, dict(T=5, lengths=[5, 2, 3], left=(1,), vf_clip=0.0)),
                       ("hidden", 3, dict(T=4, lengths=[4, 1, 3], vf_clip=0.1))],
    "whitening": [("ragged right padding", 1, dict(T=5, lengths=[5, 3, 2], shift_mean=True)),
                  ("left padding, mean kept", 2, dict(T=5, lengths=[4, 2], left=(0,), shift_mean=False)),
                  ("three real tokens", 3, dict(T=4, lengths=[2, 1, 0], shift_mean=True)),
                  ("hidden", 4, dict(T=6, lengths=[1, 4, 3], left=(2,), shift_mean=True))],
    "rloo_baseline": [("k 4", 1, dict(prompts=2, k=4)), ("k 2", 2, dict(prompts=3, k=2)),
                      ("hidden", 3, dict(prompts=3, k=3))],
    "group_advantages": [("group std, a tied group", 1, dict(prompts=3, group_size=4, scale="group", tied=(1,))),
                         ("batch std", 2, dict(prompts=2, group_size=4, scale="batch")),
                         ("no scaling (Dr. GRPO), 0/1 rewards", 3, dict(prompts=3, group_size=4, scale="none",
                                                                       binary=True, tied=(2,))),
                         ("hidden", 4, dict(prompts=3, group_size=3, scale="group", binary=True, tied=(0,)))],
    "loss_aggregation": [("token-mean, NaN at padding", 1, dict(T=5, lengths=[5, 2, 3, 1], mode="token-mean")),
                         ("seq-mean-token-mean, left padding", 2, dict(T=5, lengths=[5, 2, 3], left=(1,),
                                                                       mode="seq-mean-token-mean")),
                         ("seq-mean-token-sum-norm, norm_len 8", 3, dict(T=5, lengths=[4, 1, 5],
                                                                         mode="seq-mean-token-sum-norm", norm_len=8)),
                         ("seq-mean-token-sum-norm, norm_len = width", 4, dict(T=6, lengths=[6, 2],
                                                                               mode="seq-mean-token-sum-norm")),
                         ("hidden", 5, dict(T=4, lengths=[1, 4, 2], mode="seq-mean-token-mean"))],
    "dpo_loss": [("β 0.1", 1, dict(n=6, beta=0.1, label_smoothing=0.0)),
                 ("β 0.5, label smoothing 0.2", 2, dict(n=5, beta=0.5, label_smoothing=0.2)),
                 ("hidden", 3, dict(n=4, beta=0.3, label_smoothing=0.1))],
    "alol_weight": [("ε 0.2", 1, dict(n=8, clip_eps=0.2)), ("ε 0.9", 2, dict(n=6, clip_eps=0.9)),
                    ("hidden", 3, dict(n=5, clip_eps=0.5))],
    "step_bce_loss": [("hard labels, 1 to 3 steps a row", 1, dict(T=7, reads=[(2, 4, 6), (3,), (1, 5)])),
                      ("soft (Monte-Carlo) labels, a row with no step", 2, dict(T=6, reads=[(1, 3, 5), (), (4,)],
                                                                                soft=True)),
                      ("logits of ±60, where log(sigmoid) underflows", 3, dict(T=5, reads=[(0, 2, 4), (1, 3)],
                                                                               scale=60.0)),
                      ("hidden", 4, dict(T=6, reads=[(5,), (0, 1, 2, 3), (2, 4)], soft=True, scale=30.0))],
}


# ------------------------------------------------------------------------------------------------ the key

def outputs_of(part, module, inputs, needs_grad):
    """The reference's outputs and gradients for one case."""
    x = fresh_inputs(inputs, needs_grad)
    out = BY_NAME[part].call(module, x)
    grads = {}
    if "loss" in out and needs_grad:
        out["loss"].backward()
        grads = {k: x[k].grad for k in needs_grad}
    return ({k: encode(v) for k, v in out.items()},
            {k: encode(v) for k, v in grads.items()},
            {k: bool(v.requires_grad) for k, v in out.items() if isinstance(v, torch.Tensor)})


def build(part):
    """(visible cases, hidden cases) of a part, each a list of stored cases."""
    module = importlib.import_module(BY_NAME[part].module)
    needs_grad = NEEDS_GRAD.get(part, [])
    stored = []
    for name, seed, kw in CASES[part]:
        inputs = inputs_of(part, seed, **kw)
        outputs, grads, requires_grad = outputs_of(part, module, inputs, needs_grad)
        stored.append(dict(name=name, inputs={k: encode(v) for k, v in inputs.items()}, needs_grad=needs_grad,
                           outputs=outputs, grads=grads, requires_grad=requires_grad))
    return stored[:-1], stored[-1:]


def write(path, part, cases):
    with open(path, "w") as f:
        json.dump(dict(part=part, cases=cases), f, indent=1)
        f.write("\n")


def main(argv=None):
    p = argparse.ArgumentParser(description="Write every graded case's inputs and the reference's outputs "
                                            "(assignments/expected/ and assignments/hidden/).")
    p.add_argument("--parts", nargs="+", default=[q.name for q in PARTS], choices=[q.name for q in PARTS])
    a = p.parse_args(argv)
    os.makedirs(VISIBLE_DIR, exist_ok=True)
    os.makedirs(HIDDEN_DIR, exist_ok=True)
    for part in a.parts:
        visible, hidden = build(part)
        write(os.path.join(VISIBLE_DIR, f"{part}.json"), part, visible)
        write(os.path.join(HIDDEN_DIR, f"{part}.json"), part, hidden)
        print(f"{part}: {len(visible)} visible + {len(hidden)} hidden case(s)")


if __name__ == "__main__":
    sys.exit(main())
