"""
A-LoL: Advantage-Leftover-Lunch RL (Baheti et al. 2023, "Leftover Lunch: Advantage-based Offline Reinforcement
Learning for Language Models"; "the paper" below): offline policy gradient on EXISTING data, no sampling from
the policy during training. Here the data are the chosen responses of the reward model's own training pairs.

The whole response is one action. With s_θ = Σ_t log π_θ(y_t|·) (a token sum) and the frozen SFT policy π_ref:
  0. value     V_ref(x): an attention-pooling head on π_ref's frozen hidden states of the prompt, fit by MSE to
               the reward of π_ref's own greedy answers on validation prompts (paper §2.2; our notes §1.3)
  1. advantage A = R(x, y) - V_ref(x) on every training example, R = sigmoid(RM score - c); cached once
  2. filter    examples with A <= 0 are never trained on: priority sampling ∝ A⁺ with replacement (§2.3)
  3. loss, per variant (paper eq. 5 and §2.4; the weights are constants, sg = stop-gradient):
       alol      -A⁺ · sg[clip(ρ, 1-ε, 1+ε)] · s_θ,        ρ = π_θ(y|x) / π_ref(y|x) = exp(s_θ - s_ref)
       ref_free  -A⁺ · s_θ                                  (ρ := 1)
       seq       -A⁺ · Σ_t sg[clip(ρ_t, 1-ε, 1+ε)] · log π_θ(y_t|·),   ρ_t the per-token ratio
       kl        -A⁺ · s_θ + β·(s_θ - sg[s_ref])            (no ρ)
     The clip is done in log space (log ρ ∈ [log(1-ε), log(1+ε)]), so a long response cannot overflow exp.

Run (after train_sft.py and reward_model.py; writes out/alol.pt, out/alol_log.jsonl, out/alol_curves.png;
alol.pt also every --ckpt_interval steps, for --resume true):
    python -m algorithms.alol                                # A-LoL
    python -m algorithms.alol --variant seq --out_dir out/alol_seq
    python -m algorithms.alol --help

Deliberate choices:
  1. Dropout is 0 everywhere, so ρ = 1 exactly at the start (the official QLoRA code has dropout, so ρ != 1).
  2. The value head gets a key-padding mask and is put in eval mode after fitting (the official code does
     neither; notes §5.1); the best epoch is chosen on a held-out fifth of the dev prompts, not on train MSE.
  3. Steps: one epoch over the positive-advantage subset (the official code scales steps by that fraction).
  4. R = sigmoid(RM score - c) with c = the mean RM score of π_ref's greedy dev answers (--center_reward true).
     The official code uses sigmoid(RM score) with an RM whose scores sit around 0; ours average about +3, where
     the sigmoid saturates (π_ref's answers all get R ≈ 0.96 and every advantage shrinks to ±0.03).
     --center_reward false gives the official transform.

Shape legend: B batch, Tp prompt length, Tr response length, T = Tp + Tr, C width, N training examples.
"""
import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import tokenizer as tok
from runs import (Run, RunOptions, check_finite, ckpt_interval_field, field, load_models, parse_config, plot_curves,
                  read_jsonl, run_main, run_meta, sample_responses, table)
from tokenizer import fit_prompt, pad_batch
from model import logprobs_from_logits, response_logits


@dataclass
class Config(RunOptions):
    ckpt_interval: int = ckpt_interval_field(100)
    sft_ckpt: str = field("out/sft.pt", "SFT checkpoint: π_ref (frozen) and the initial policy", input_file=True)
    rm_ckpt: str = field("out/rm.pt", "reward model; its config says which pairs it was trained on", input_file=True)
    variant: str = field("alol", "alol | ref_free | seq | kl", choices=('alol', 'ref_free', 'seq', 'kl'))
    ratio_clip: float = field(0.9, "ε: the importance ratio is clipped to [1-ε, 1+ε] (paper 0.9)", range="(0, 1)")
    kl_coef: float = field(0.1, "β of the kl variant", range="[0, inf)")
    batch_size: int = field(16, "examples per step (paper: 16)", range="[1, inf)", global_batch=True)
    lr: float = field(3e-5, "policy learning rate (AdamW)", range="(0, inf)")
    grad_clip: float = field(1.0, "grad-norm clip (0 = off)", range="[0, inf)")
    center_reward: bool = field(True, "R = sigmoid(score - mean dev score of π_ref) instead of sigmoid(score)")
    value_epochs: int = field(10, "value-head training epochs (paper: 10)", range="[1, inf)")
    value_lr: float = field(1e-3, "value-head learning rate", range="(0, inf)")
    max_new_tokens: int = field(48, "longest greedy dev answer and final sample", range="[1, inf)")
    eval_interval: int = field(50, "log a sample every N steps", range="[1, inf)")
    n_eval_prompts: int = field(64, "val prompts for the final win rate vs SFT", range="[1, inf)")


PRESETS = {
    "default": {},
    "tiny": dict(batch_size=8, value_epochs=2, max_new_tokens=12, eval_interval=4, n_eval_prompts=8),
    # debug: for stepping through in a debugger (docs/debugging.md): batches of 4 examples, one value epoch; the
    # steps are one pass over the positive-advantage pairs (seconds from the tiny pipeline's RM)
    "debug": dict(batch_size=4, value_epochs=1, max_new_tokens=12, eval_interval=4, n_eval_prompts=4),
}
VARIANTS = ("alol", "ref_free", "seq", "kl")


# ----------------------------------------------------------------------------------------------------
# Pure functions and the value head

class ValueHead(nn.Module):
    """V(x) = max_value · sigmoid(w · attention(q, h, h) + b): one learned query attends over the prompt's states."""

    def __init__(self, n_embd, n_head=4, dropout=0.1, max_value=1.0):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_embd) * 0.02)
        self.attn = nn.MultiheadAttention(n_embd, n_head, dropout=dropout, batch_first=True)
        self.out = nn.Linear(n_embd, 1)
        self.max_value = max_value

    def forward(self, h, mask):
        """h (B, Tp, C) frozen prompt hidden states, mask (B, Tp) 1 on real tokens -> V (B,)."""
        q = self.query.expand(h.shape[0], 1, -1)                          # (B, 1, C)
        pooled, _ = self.attn(q, h, h, key_padding_mask=mask == 0)        # (B, 1, C)
        return self.max_value * torch.sigmoid(self.out(pooled[:, 0]).squeeze(-1))  # (B,)


def priority_sample(advantages, n, generator):
    """n indices drawn with replacement with probability ∝ max(A, 0); examples with A <= 0 are never drawn."""
    w = advantages.clamp(min=0)
    if w.sum() <= 0:
        raise ValueError("no training example has a positive advantage: A-LoL has nothing to learn from")
    return torch.multinomial(w, n, replacement=True, generator=generator)


def alol_weight(advantages, seq_logp, ref_seq_logp, clip_eps):
    """
    The A-LoL weight of each training example (paper eq. 5), a constant (B,): A⁺ · clip(ρ, 1-ε, 1+ε) with
    A⁺ = max(A, 0) and ρ = π_θ(y|x) / π_ref(y|x) = exp(s_θ - s_ref) from summed response log-probs seq_logp and
    ref_seq_logp (B,). The clip is done in log space, log ρ ∈ [log(1-ε), log(1+ε)], so a long response cannot
    overflow exp; no gradient flows through the weight (sg[·] in the paper's loss).
    """
    log_rho = (seq_logp - ref_seq_logp).clamp(math.log(1 - clip_eps), math.log(1 + clip_eps))  # (B,) clipped
    return (advantages.clamp(min=0) * log_rho.exp()).detach()            # (B,)


def alol_loss(logp, ref_logp, mask, advantages, variant, clip_eps, kl_coef=0.0):
    """
    The A-LoL family's loss on (B, Tr) token log-probs of the data responses under π_θ (logp) and π_ref (ref_logp),
    `mask` 1 on response tokens, advantages (B,). Returns (loss, stats). Weights are constants (no gradient).
    """
    a_pos = advantages.clamp(min=0).detach()                              # (B,) A⁺
    s, s_ref = (logp * mask).sum(1), (ref_logp * mask).sum(1)             # (B,) sequence log-probs
    lo, hi = math.log(1 - clip_eps), math.log(1 + clip_eps)
    log_rho = (s - s_ref).detach()                                        # (B,)
    stats = dict(a_pos_mean=a_pos.mean().item(), log_rho_abs_mean=log_rho.abs().mean().item(),
                 log_rho_abs_max=log_rho.abs().max().item(),
                 clipped_frac=((log_rho < lo) | (log_rho > hi)).float().mean().item(), drift=log_rho.mean().item())
    if variant == "alol":
        loss = -(alol_weight(advantages, s, s_ref, clip_eps) * s).mean()
    elif variant == "ref_free":
        loss = -(a_pos * s).mean()
    elif variant == "seq":
        rho_t = ((logp - ref_logp).detach().clamp(lo, hi).exp() * mask)  # (B, Tr) per-token clipped ratios
        loss = -(a_pos * (rho_t * logp).sum(1)).mean()
    elif variant == "kl":
        loss = -(a_pos * s).mean() + kl_coef * (s - s_ref.detach()).mean()
    else:
        raise ValueError(f"unknown A-LoL variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return loss, stats


@torch.no_grad()
def prompt_states(ref, enc, prompts, room, truncate, device):
    """π_ref's final hidden states of left-padded prompts: (B, Tp, C) and the mask (B, Tp)."""
    ids, mask = pad_batch([fit_prompt(tok.encode(enc, p), room, truncate, f"prompt {p[:40]!r}") for p in prompts],
                          tok.pad_id(enc), left=True)
    return ref.hidden(ids.to(device), mask.to(device)), mask.to(device)


def encode_examples(enc, prompts, responses, room_total, truncate, pad_id, device):
    """Prompts left-padded + responses right-padded, as ppo_rlhf's rollout lays them out: seq, seq_mask, response, mask."""
    resp = [tok.encode(enc, r) for r in responses]
    p_ids, p_mask = pad_batch([fit_prompt(tok.encode(enc, p), room_total - len(r), truncate, f"prompt {p[:40]!r}")
                               for p, r in zip(prompts, resp)], pad_id, left=True)  # (B, Tp)
    r_ids, r_mask = pad_batch(resp, pad_id, left=False)                   # (B, Tr)
    seq, seq_mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)  # (B, T)
    return seq.to(device), seq_mask.to(device), r_ids.to(device), r_mask.to(device), p_ids.shape[1]


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    with Run(cfg, "alol", name="A-LoL", unit="step") as run:
        device = run.device
        policy, ref, rm, sft, rm_ckpt = load_models(cfg.sft_ckpt, cfg.rm_ckpt, device)
        enc = tok.get_tokenizer(sft["tokenizer"])
        pad, block = tok.pad_id(enc), policy.cfg.block_size
        print(f"device={device} config={asdict(cfg)}")
        splits = data.prompt_splits(sft["config"]["seed"])

        def rm_scores(prompts, responses):
            """Raw RM scores in batches of 128: (n,)"""
            out = []
            for i in range(0, len(prompts), 128):
                seq, seq_mask, *_ = encode_examples(enc, prompts[i:i + 128], responses[i:i + 128], block,
                                                    cfg.truncate_prompts, pad, device)
                out.append(rm.score(seq, seq_mask))
            return torch.cat(out)

        # 0. value estimate of π_ref: greedy answers on the (unique) val prompts, scored by the RM
        t0 = time.time()
        dev = sorted({p for ps in splits["val"].values() for p in ps})
        with torch.no_grad():
            dev_answers = sample_responses(ref, enc, dev, cfg.max_new_tokens, 0.0, device).texts
            dev_scores = rm_scores(dev, dev_answers)                          # (N_v,)
            center = dev_scores.mean().item() if cfg.center_reward else 0.0
            dev_r = torch.sigmoid(dev_scores - center)                        # (N_v,) R of π_ref's answers
            dev_h, dev_m = prompt_states(ref, enc, dev, block - cfg.max_new_tokens, cfg.truncate_prompts, device)
        n_fit = max(1, int(0.8 * len(dev)))
        order = torch.randperm(len(dev), generator=torch.Generator().manual_seed(cfg.seed))
        fit_idx, hold_idx = order[:n_fit], order[n_fit:] if len(dev) > n_fit else order[:n_fit]
        vhead = ValueHead(policy.cfg.n_embd, n_head=policy.cfg.n_head).to(device)
        vopt = torch.optim.AdamW(vhead.parameters(), lr=cfg.value_lr)
        best, best_state = float("inf"), None
        for epoch in range(cfg.value_epochs):
            vhead.train()
            for idx in fit_idx[torch.randperm(len(fit_idx), generator=torch.Generator().manual_seed(epoch))].split(16):
                loss = F.mse_loss(vhead(dev_h[idx], dev_m[idx]), dev_r[idx])
                vopt.zero_grad(set_to_none=True)
                loss.backward()
                vopt.step()
            vhead.eval()
            with torch.no_grad():
                held = F.mse_loss(vhead(dev_h[hold_idx], dev_m[hold_idx]), dev_r[hold_idx]).item()
            if held < best:
                best, best_state = held, copy.deepcopy(vhead.state_dict())
        vhead.load_state_dict(best_state)
        vhead.eval().requires_grad_(False)
        print(f"value head: {len(dev)} dev prompts, reward centre {center:.2f}, mean greedy R {dev_r.mean():.3f}, "
              f"best held-out MSE {best:.4f} "
              f"(baseline {dev_r[hold_idx].var(unbiased=False):.4f})")
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        gen = torch.Generator().manual_seed(cfg.seed)                         # priority sampling (step 2)
        fit_time = time.time() - t0                                           # the value fit: training time too
        # --resume: the fit above is seeded; loading the interrupted run's value head over it makes the advantages
        # below exactly the ones it trained with on every device
        run.begin(opt, dict(model=policy, value_head=vhead), run_meta(sft, cfg), generator=gen)

        # 1. advantages of the existing data: the chosen responses of the RM's training pairs
        rcfg = rm_ckpt["config"]
        pairs = data.sample_preference_pairs(splits["train"], rcfg["n_train"], rcfg["seed"] + 10, rcfg["tau"],
                                              rcfg["length_bias"])
        prompts, responses = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
        with torch.no_grad():
            R = torch.sigmoid(rm_scores(prompts, responses) - center)        # (N,)
            V = torch.cat([vhead(*prompt_states(ref, enc, prompts[i:i + 256], block - cfg.max_new_tokens,
                                                cfg.truncate_prompts, device)) for i in range(0, len(prompts), 256)])
        A = R - V                                                             # (N,)
        frac_pos = (A > 0).float().mean().item()
        # 2. one epoch over the positive-advantage subset, sampled ∝ A⁺
        n_iters = int(len(pairs) * frac_pos) // cfg.batch_size
        if n_iters == 0:
            raise ValueError(f"only {frac_pos:.0%} of {len(pairs)} examples have A > 0: less than one batch")
        q = torch.quantile(A, torch.tensor([0.1, 0.5, 0.9], device=A.device)).tolist()
        print(f"{len(pairs)} examples, {frac_pos:.0%} with A > 0 (A quantiles 10/50/90%: {q[0]:+.3f} {q[1]:+.3f} "
              f"{q[2]:+.3f}); {n_iters} steps; value fit {time.time() - t0:.0f}s")

        run.n_steps = n_iters
        if run.start == 1:
            run.log.write(step=0, frac_pos=frac_pos, value_mse=best,
                          value_mse_constant=dev_r[hold_idx].var(unbiased=False).item(), reward_center=center,
                          dev_reward=dev_r.mean().item(), adv_q10=q[0], adv_q50=q[1], adv_q90=q[2])
        t_train = time.time()
        for step in range(run.start, n_iters + 1):
            idx = priority_sample(A.cpu(), cfg.batch_size, gen).tolist()
            seq, seq_mask, resp, mask, Tp = encode_examples(enc, [prompts[i] for i in idx], [responses[i] for i in idx],
                                                            block, cfg.truncate_prompts, pad, device)
            with torch.no_grad():
                ref_logp = logprobs_from_logits(response_logits(ref, seq, seq_mask, Tp, 1.0), resp) * mask  # (B, Tr)
            policy.train()
            logp = logprobs_from_logits(response_logits(policy, seq, seq_mask, Tp, 1.0), resp) * mask       # (B, Tr)
            # 3. the variant's loss
            loss, st = alol_loss(logp, ref_logp, mask, A[idx], cfg.variant, cfg.ratio_clip, cfg.kl_coef)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
            check_finite(f"A-LoL step {step}", loss=loss.item(), grad_norm=gnorm.item())
            opt.step()
            run.log.write(step=step, loss=loss.item(), grad_norm=gnorm.item(), **st, time=time.time() - t_train)
            if step % cfg.eval_interval == 0 or step == n_iters:
                print(run.progress.line(step, f"loss {loss.item():+.4f} A⁺ {st['a_pos_mean']:.3f} drift {st['drift']:+.2f} "
                                              f"clipped {st['clipped_frac']:.2f}"))
            run.save(step)
        train_time = run.train_time() + fit_time

        # final check on val prompts: gold win rate vs SFT samples (studies/evaluate.py does the full evaluation)
        ev = data.sample_prompts(splits["val"], cfg.n_eval_prompts, random.Random(cfg.seed + 1))
        g = lambda m: sample_responses(m, enc, ev, cfg.max_new_tokens, 1.0, device,
                                       torch.Generator(device=device).manual_seed(cfg.seed + 1))
        outs, base = g(policy), g(ref)
        win = data.gold_win_rate(ev, outs, base)
        golds = outs.golds(ev)
        print(table([(p.strip(), o, g) for p, o, g in zip(ev[:4], outs.texts, golds)],
                    ["val prompt", f"A-LoL ({cfg.variant}) sample", "gold"], [34, 70, 5]))
        metrics = dict(win_rate_vs_sft=win, gold=sum(golds) / len(ev),
                       frac_pos=frac_pos, value_mse=best, train_time_s=train_time)
        run.log.write(step=n_iters, **metrics)
        plot_curves(os.path.join(cfg.out_dir, "alol_curves.png"), read_jsonl(run.log_path), "step",
                    [["loss"], ["a_pos_mean"], ["drift", "log_rho_abs_mean"], ["clipped_frac"]],
                    f"A-LoL ({cfg.variant})")
        run.finish(metrics, responses_generated=0, policy_steps=n_iters)
        print(f"A-LoL ({cfg.variant}) done in {train_time:.0f}s: win rate vs SFT {win:.2f} -> {run.ckpt_path}")
        return metrics


if __name__ == "__main__":
    run_main(main)
