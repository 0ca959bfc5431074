"""
The graded parts of the assignment, one record each: the function bodies a student writes (named here, by module
and function: the real source carries no marks), its points, the paper section it implements, what it teaches,
and how the grader calls it on a stored case. Nothing here computes an answer: the answers are the
reference bodies in the stage files, and the expected values of every case are stored in assignments/expected/
(python -m assignments.cases writes them from the reference).

A part's call takes the module the body lives in (imported from the copy being graded) and one case's inputs,
and returns the outputs by name; a returned dict of statistics becomes outputs named "stats.KEY".
"""
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Part:
    name: str        # the marker's name in the source, and the cases' file name
    module: str      # the module whose graded bodies (`functions`) the student writes
    writes: str      # what the student writes, as the tables name it
    points: int
    paper: str       # the paper and section the body implements
    teaches: str     # the one idea the part is about
    minutes: int     # expected time for a student who has read the paper section
    call: Callable   # (module, inputs dict) -> outputs dict
    functions: tuple = ()  # the functions of `module` whose bodies the student writes (Class.method for a method)


def with_stats(loss, stats, **more):
    """(loss, stats dict) -> outputs: loss, stats.KEY for every statistic, and any more outputs."""
    return dict(loss=loss, **{f"stats.{k}": v for k, v in stats.items()}, **more)


def call_running_moments(m, x):
    """One RunningMoments folded over the batches in order, each batch processed as PPO processes its scores."""
    running = m.RunningMoments()
    out = {f"processed_{i}": m.process_scores(batch, running, x["mode"], x["clip"]) for i, batch in enumerate(x["batches"])}
    return dict(out, mean=running.mean, var=running.var, count=running.count)


def call_gae(m, x):
    advantages, returns = m.compute_gae(x["rewards"], x["values"], x["mask"], x["gamma"], x["lam"])
    return dict(advantages=advantages, returns=returns)


def call_whitening(m, x):
    return dict(whitened=m.masked_whiten(x["x"], x["mask"], shift_mean=x["shift_mean"]),
                variance=m.masked_var(x["x"], x["mask"]))


PARTS = (
    Part("sft_loss", "train_sft", "sft_loss: next-token cross-entropy on response tokens only", 6,
         "InstructGPT §3.5 (SFT); Secrets of RLHF Part I §3.1", "the loss counts a token iff it is a response token, "
         "shifted by one: position t predicts token t+1", 20,
         lambda m, x: dict(loss=m.sft_loss(x["logits"], x["ids"], x["loss_mask"])), functions=('sft_loss',)),
    Part("bradley_terry", "reward_model", "pairwise_loss: the Bradley–Terry loss", 5,
         "InstructGPT eq. 1; Secrets of RLHF Part I eq. 2", "a preference is a sigmoid of a score "
         "difference; logsigmoid stays finite where log(sigmoid) underflows", 10,
         lambda m, x: dict(loss=m.pairwise_loss(x["r_chosen"], x["r_rejected"])), functions=('pairwise_loss',)),
    Part("running_moments", "ppo_rlhf", "RunningMoments.update and process_scores: score normalisation", 8,
         "Secrets of RLHF Part I §5.3.1 eq. 18 (reward normalisation and clipping)", "scores are normalised by the "
         "moments of every score seen so far, merged batch by batch", 25, call_running_moments, functions=('RunningMoments.update', 'process_scores')),
    Part("kl_reward", "ppo_rlhf", "kl_rewards: the per-token KL-penalised reward", 7,
         "Secrets of RLHF Part I §3.1 eq. 3", "the KL penalty is paid on every token, the RM "
         "score only on the last real one", 15,
         lambda m, x: dict(rewards=m.kl_rewards(x["old_logprobs"], x["ref_logprobs"], x["mask"], x["scores"],
                                                 x["kl_coef"])), functions=('kl_rewards',)),
    Part("gae", "ppo_rlhf", "compute_gae: generalised advantage estimation", 12,
         "Secrets of RLHF Part I eqs. 7–11 (GAE, Schulman et al. 2016)", "advantages are discounted sums of "
         "TD errors computed backwards; nothing leaks from padding, the value after the last token is 0", 30, call_gae, functions=('compute_gae',)),
    Part("ppo_policy_loss", "ppo_rlhf", "ppo_policy_loss: the clipped surrogate and its statistics", 12,
         "Secrets of RLHF Part I eq. 15 (PPO's clipped surrogate)", "the pessimistic bound: the larger "
         "of the two losses, averaged over real tokens only", 25,
         lambda m, x: with_stats(*m.ppo_policy_loss(x["logprobs"], x["old_logprobs"], x["advantages"], x["mask"],
                                                     x["ratio_clip"])), functions=('ppo_policy_loss',)),
    Part("ppo_value_loss", "ppo_rlhf", "ppo_value_loss: the clipped value loss", 8,
         "Secrets of RLHF Part I eq. 16 and §5.4 (value clipping)", "the critic may not move a value more than ε_v from "
         "its rollout value without paying the larger error", 15,
         lambda m, x: with_stats(*m.ppo_value_loss(x["values"], x["old_values"], x["returns"], x["mask"],
                                                    x["vf_clip"])), functions=('ppo_value_loss',)),
    Part("whitening", "ppo_rlhf", "masked_var and masked_whiten: advantage whitening over real tokens", 7,
         "Secrets of RLHF Part I §5.3.1 (advantage normalisation)", "the mean and the unbiased variance are taken "
         "over real tokens; padding stays 0", 15, call_whitening, functions=('masked_var', 'masked_whiten')),
    Part("rloo_baseline", "algorithms.rloo", "loo_advantages: the leave-one-out baseline", 6,
         "Back to Basics (Ahmadian et al. 2024) §2.3 (RLOO)", "each sample's baseline is the mean reward of "
         "the other k-1 samples of its prompt", 10,
         lambda m, x: dict(advantages=m.loo_advantages(x["rewards"], x["k"])), functions=('loo_advantages',)),
    Part("group_advantages", "algorithms.grpo", "group_advantages: GRPO's group-relative advantages", 9,
         "DeepSeekMath §4.1.2 (GRPO outcome supervision); Dr. GRPO §3.2", "advantages relative to the group's mean, "
         "scaled by the group's sample std, the batch's, or not at all; a tied group carries no signal", 20,
         lambda m, x: dict(advantages=m.group_advantages(x["rewards"], x["group_size"], x["scale"])), functions=('group_advantages',)),
    Part("loss_aggregation", "algorithms.grpo", "aggregate_loss: token-mean, sequence-mean, Dr. GRPO's sum-norm", 8,
         "DAPO eq. 12; DeepSeekMath eq. 3; Dr. GRPO §3.2", "how per-token losses are averaged decides how much a "
         "token of a long response weighs; NaN at padding must not reach the loss or its gradient", 15,
         lambda m, x: dict(loss=m.aggregate_loss(x["loss_per_token"], x["mask"], x["mode"], x["norm_len"])), functions=('aggregate_loss',)),
    Part("dpo_loss", "algorithms.dpo", "dpo_loss: DPO and conservative DPO, with the implicit rewards", 7,
         "DPO (Rafailov et al. 2023) eq. 7; cDPO label smoothing", "the policy's log-ratio to the reference is an "
         "implicit reward, trained with the Bradley–Terry loss", 15,
         lambda m, x: with_stats(*m.dpo_loss(x["policy_chosen"], x["policy_rejected"], x["ref_chosen"],
                                              x["ref_rejected"], x["beta"], x["label_smoothing"])), functions=('dpo_loss',)),
    Part("alol_weight", "algorithms.alol", "alol_weight: A-LoL's clipped importance weight", 5,
         "Leftover Lunch (Baheti et al. 2023) eq. 5 and §2.3", "only positive advantages count; the ratio is "
         "clipped in log space and carries no gradient", 10,
         lambda m, x: dict(weight=m.alol_weight(x["advantages"], x["seq_logp"], x["ref_seq_logp"], x["clip_eps"])), functions=('alol_weight',)),
    Part("step_bce_loss", "algorithms.process_reward", "step_bce_loss: a process reward model's loss at the step ends",
         4, "Let's Verify Step by Step (Lightman et al. 2023); Math-Shepherd (Wang et al. 2024), soft labels",
         "a PRM is a classifier read only at the tokens that end a step; a soft label is a target like any other, "
         "and the loss must stay finite for confident wrong logits", 10,
         lambda m, x: dict(loss=m.step_bce_loss(x["logits"], x["target"], x["read"])), functions=('step_bce_loss',)),
)

BY_NAME = {p.name: p for p in PARTS}
