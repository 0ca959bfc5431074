"""
How far from on-policy is RLOO's second minibatch (algorithms/rloo.py, deliberate choice 4)? Runs RLOO with its
update instrumented: before each minibatch's step, the ratio π_θ/π_old of that minibatch's sampled responses
(per token and per sequence); prints its size on the first minibatch (rounding only) and on the second (after
one step).

Run (after pipeline.py; about a minute on 2 CPU cores):
    python -m studies.rloo_second_minibatch --sft_ckpt out/sft.pt --rm_ckpt out/rm.pt --n_iters 150
"""
import argparse

import torch

from algorithms import rloo
from model import logprobs_from_logits, response_logits
from runs import check_finite

seen = []


def instrumented(policy, opt, ro, adv, cfg, generator, where="RLOO update"):
    policy.train()
    perm = torch.randperm(len(adv), generator=generator).to(adv.device)
    losses, gnorms = [], []
    for n, idx in enumerate(perm.chunk(cfg.minibatches)):
        logits = response_logits(policy, ro.seq[idx], ro.seq_mask[idx], ro.n_prompt, cfg.temperature)
        token_logp = logprobs_from_logits(logits, ro.response[idx]) * ro.mask[idx]
        with torch.no_grad():
            log_ratio_tok = (token_logp - ro.old_logprobs[idx]) * ro.mask[idx]
            seq_log_ratio = log_ratio_tok.sum(1)
            seen.append((n, log_ratio_tok.abs().sum().item() / ro.mask[idx].sum().item(),
                         (seq_log_ratio.exp() - 1).abs().mean().item(), (seq_log_ratio.exp() - 1).abs().max().item()))
        seq_logp = token_logp.sum(1)
        loss = rloo.reinforce_loss(seq_logp, adv[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        check_finite(where, loss=loss.item(), grad_norm=gnorm.item())
        opt.step()
        losses.append(loss.item()); gnorms.append(gnorm.item())
    return losses, gnorms


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="The off-policy ratio of RLOO's second minibatch.")
    p.add_argument("--sft_ckpt", default="out/sft.pt")
    p.add_argument("--rm_ckpt", default="out/rm.pt")
    p.add_argument("--n_iters", default="150")
    p.add_argument("--out_dir", default="out/rloo_second_minibatch")
    a = p.parse_args()
    rloo.rloo_update = instrumented
    rloo.main(["--sft_ckpt", a.sft_ckpt, "--rm_ckpt", a.rm_ckpt, "--out_dir", a.out_dir, "--n_iters", a.n_iters,
               "--overwrite", "true", "--eval_interval", "1000"])
    for n in (0, 1):
        rows = [s for s in seen if s[0] == n]
        print(f"minibatch {n + 1}: mean |log ρ_t| {sum(r[1] for r in rows) / len(rows):.2e}, mean |ρ_seq - 1| "
              f"{sum(r[2] for r in rows) / len(rows):.2e}, max |ρ_seq - 1| {max(r[3] for r in rows):.2e} over {len(rows)} iterations")
