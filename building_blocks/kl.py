"""
The KL estimators, written once. On a response y sampled from π (positions t, log-probs at the sampling
temperature), with r_t = π_ref(y_t|·) / π(y_t|·):

    k1_t = log π(y_t|·) - log π_ref(y_t|·) = -log r_t   unbiased for KL(π‖π_ref) summed over a response, and
                                                        negative on some tokens (PPO's per-token penalty, eq. 3)
    k3_t = (r_t - 1) - log r_t                          never negative, same expectation under samples of π
                                                        (Schulman's "Approximating KL divergence"; DSM eq. 4)
    exact_kl_t = Σ_v π(v|·) (log π(v|·) - log π_ref(v|·))   over the whole vocabulary (a metric only)

As a *value*, k3 estimates KL(π‖π_ref). As a term of a *loss* (GRPO, with the samples' π treated as the
current policy and no importance weight on it) its expected gradient is that of KL(π_ref‖π), the reverse
direction: E_{y~π}[∇k3] = -Σ_y π_ref(y) ∇log π(y) = ∇KL(π_ref‖π) (tests/test_grpo.py checks it exactly on a
five-way distribution).

Shape legend: B rows, Tr response length, V vocab.
"""
import torch


def k1(logprobs, ref_logprobs, mask):
    """k1 per token (B, Tr): log π - log π_ref on real response tokens, 0 at padding."""
    return (logprobs - ref_logprobs) * mask


def k3(logprobs, ref_logprobs):
    """k3 per token (B, Tr): exp(d) - 1 - d with d = log π_ref - log π, written expm1(d) - d so that a small d
    loses no float32 precision to cancellation. Mask it where padding must be 0."""
    d = ref_logprobs - logprobs
    return torch.expm1(d) - d


def exact_kl(logits, ref_logits):
    """KL(π‖π_ref) summed over the vocabulary at each position: logits (B, Tr, V) each -> (B, Tr)."""
    logp, ref_logp = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)  # (B, Tr, V) each
    return (logp.exp() * (logp - ref_logp)).sum(-1)                       # (B, Tr)
