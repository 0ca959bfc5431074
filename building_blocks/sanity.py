"""
The classic silent failures of RL on language models, each turned into a plain-English warning printed once per run:
the numbers that show them are in the logs anyway, but a student reading a log of numbers does not see them.

  first_ratio   before any update the trainer's log-probs must equal the sampler's: ratio π/π_old = 1 on the
                first minibatch of every update (to float rounding: 1e-3 in fp32, 5e-2 under bf16 autocast)
  kl_estimate   k1 summed over a response estimates KL(π‖π_ref) ≥ 0 without bias: a batch mean below 0 by more
                than 4 standard errors means the log-probs are not those of the samples' policy
  tied_groups   every group of samples scored alike: every advantage 0, a zero policy gradient
  advantages    a NaN / inf, or an advantage beyond ±100 (scores on a raw scale, a diverging critic)
  no_eos        not one response of the first iterations ended with EOS: every one was cut at max_new_tokens

Each message names the likely cause and the section of docs/debugging.md that explains it. Plumbing beside the
algorithms: a stage calls these after the step whose numbers they read; nothing here changes a number.

Shape legend: B responses, Tr response length.
"""
import math

import torch

from building_blocks.devices import rank

RATIO_TOL_FP32, RATIO_TOL_BF16 = 1e-3, 5e-2
KL_STANDARD_ERRORS = 4.0
ADVANTAGE_LIMIT = 100.0
EOS_ITERATIONS = 3
PAGE = "docs/debugging.md"


class SanityChecks:
    """One run's warnings: each kind printed at most once (on rank 0), and remembered in `said`."""

    def __init__(self, stage):
        self.stage, self.said = stage, {}
        self.responses, self.ended, self.iterations = 0, 0, 0

    def warn(self, kind, message):
        if kind in self.said:
            return False
        self.said[kind] = message
        if rank() == 0:
            print(f"WARNING ({self.stage}): {message}", flush=True)
        return True

    def first_ratio(self, it, ratio_mean, ratio_max=None, bf16=False):
        """The ratio statistics of an update's first minibatch (before its first optimizer step)."""
        tol = RATIO_TOL_BF16 if bf16 else RATIO_TOL_FP32
        top = ratio_mean if ratio_max is None else ratio_max
        if abs(ratio_mean - 1) > tol or abs(top - 1) > tol:
            return self.warn("first_ratio", (
                f"iteration {it}: on the first minibatch, before any update, the ratio π/π_old is {ratio_mean:.4f} "
                f"on average{'' if ratio_max is None else f' (max {ratio_max:.4f})'}, not 1 (tolerance {tol:g}): "
                f"the trainer's log-probs are not the "
                f"sampler's. Likely: dropout on in the training pass, another temperature, other positions or "
                f"padding between the two passes, or bf16 sampling against fp32 training. See {PAGE}, "
                f"'The ratio-is-1 check'."))
        return False

    def kl_estimate(self, it, kl_seq):
        """kl_seq (B,): k1 summed over each response."""
        n = kl_seq.numel()
        if n < 2:
            return False
        mean, sem = kl_seq.mean().item(), kl_seq.std().item() / math.sqrt(n)
        if mean < 0 and mean < -KL_STANDARD_ERRORS * sem:
            return self.warn("kl_estimate", (
                f"iteration {it}: the mean KL estimate is {mean:.4f} nats, below 0 by {-mean / max(sem, 1e-12):.1f} "
                f"standard errors; KL(π‖π_ref) cannot be negative, so these log-probs do not belong to the policy "
                f"that sampled. Likely: sampled at one temperature and scored at another, policy and reference "
                f"swapped, or a reference that is not the starting policy. See {PAGE}, 'A KL below zero'."))
        return False

    def tied_groups(self, it, rewards, group_size):
        """rewards (B,) in groups of group_size consecutive samples (one prompt each)."""
        groups = rewards.view(-1, group_size)                             # (P, G)
        if groups.numel() and bool((groups.max(1).values == groups.min(1).values).all()):
            return self.warn("tied_groups", (
                f"iteration {it}: in every one of the {groups.shape[0]} groups the {group_size} samples got the same "
                f"reward (here {groups[0, 0].item():g}): every advantage is 0 and the policy gradient is zero. Likely: "
                f"a verifier the policy never (or always) satisfies, e.g. a weak SFT on a hard task, or a reward that "
                f"saturates. Train on prompts it can sometimes solve, sample more per prompt, or use a denser "
                f"reward. See {PAGE}, 'Every group tied'."))
        return False

    def advantages(self, it, advantages, mask=None):
        """advantages (B,) or (B, Tr) with its mask."""
        real = advantages[mask.bool()] if mask is not None else advantages.flatten()
        bad = int((~torch.isfinite(real)).sum())
        if bad:
            return self.warn("advantages", (
                f"iteration {it}: {bad} advantages are NaN or infinite: a non-finite reward, value or score reached "
                f"the advantage estimate. See {PAGE}, 'Advantages that explode'."))
        top = real.abs().max().item() if real.numel() else 0.0
        if top > ADVANTAGE_LIMIT:
            return self.warn("advantages", (
                f"iteration {it}: an advantage reaches {top:.3g} (beyond ±{ADVANTAGE_LIMIT:g}): one update will jump. "
                f"Likely: scores on a raw, large scale or a critic that diverged; normalise the scores "
                f"(--score_norm norm_clip), clip the value loss (--vf_clip) or whiten the advantages. See {PAGE}, "
                f"'Advantages that explode'."))
        return False

    def rollout(self, it, kl_seq, ended):
        """What a batch of samples can show before any update: the KL estimate's sign and whether any ended.
        kl_seq (B,) k1 summed over each response; ended (B,) bool."""
        said = self.kl_estimate(it, kl_seq)
        return self.no_eos(it, ended) or said

    def no_eos(self, it, ended):
        """ended (B,) bool: which responses of this iteration ended with EOS; judged after EOS_ITERATIONS."""
        self.responses += ended.numel()
        self.ended += int(ended.sum())
        self.iterations += 1
        if self.iterations == EOS_ITERATIONS and self.ended == 0:
            return self.warn("no_eos", (
                f"iteration {it}: not one of the first {self.responses} responses ended with EOS: every one was cut "
                f"at --max_new_tokens, and its score is read at a truncated last token. Likely: demonstrations "
                f"without the EOS token, an EOS id that differs between the tokenizer and the sampler, or an SFT "
                f"too short to learn to stop. See {PAGE}, 'No response ends'."))
        return False
