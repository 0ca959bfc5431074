"""
What the RL stages watch while they train, and the samples log they keep: the paper's pattern-collapse
signature (Secrets §5.2), the win rate judged by the reward model where there is no gold reward, PPO's
per-iteration metrics and critic fit, the minibatch means of an update, and {stage}_samples.jsonl (the best,
median and worst rollout of a batch and two followed validation prompts, each token with its per-token
quantities) that studies/report.py draws. Monitoring only: nothing here feeds a gradient.

Shape legend: B rollouts, Tp prompt length, Tr response length.
"""
import math

import torch

import data
import tokenizer as tok
from building_blocks.kl import k1, k3
from building_blocks.sampling import sample_and_score, sample_responses, score_texts
from building_blocks.sequences import encode_prompts
from model import response_values
from utils import masked_mean, masked_var, table


def collapse_signature(history, max_new_tokens, window):
    """
    The paper's pattern-collapse signature (§5.2, Fig. 4) in the last `window` iterations of `history`
    (list of metric dicts), compared with the window before: returns the reasons found, [] if none.
      length heading to the max (mean length ≥ 90% of max_new_tokens, or EOS rate < 50%) when the run's first
      window was not there already (a policy that never learnt to end, such as the tiny preset's, has not
      collapsed: it never ended),
      KL rising while the RM score rises and the gold reward falls.
    """
    if len(history) < 2 * window:
        return []
    now, before, first = history[-window:], history[-2 * window:-window], history[:window]
    avg = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    at_the_limit = lambda rows: avg(rows, "length") >= 0.9 * max_new_tokens or avg(rows, "eos_rate") < 0.5
    reasons = []
    if at_the_limit(now) and not at_the_limit(first):
        reasons.append(f"length {avg(now, 'length'):.1f}/{max_new_tokens}, EOS rate {avg(now, 'eos_rate'):.2f}")
    if (avg(now, "kl_seq") > avg(before, "kl_seq") + 0.5 and avg(now, "score_raw") > avg(before, "score_raw")
            and avg(now, "gold") < avg(before, "gold") - 0.05):
        reasons.append(f"KL {avg(before, 'kl_seq'):.2f}->{avg(now, 'kl_seq'):.2f}, RM score up "
                       f"{avg(before, 'score_raw'):.2f}->{avg(now, 'score_raw'):.2f}, gold down "
                       f"{avg(before, 'gold'):.2f}->{avg(now, 'gold'):.2f}")
    return reasons


@torch.no_grad()
def rm_win_rate(rm, enc, prompts, responses, opponents, device, batch_size=64):
    """Win rate of `responses` over `opponents` on the same prompts judged by the reward model (tie = ½): the
    judge when there is no gold reward (real data). Say so wherever it is reported: the policy is trained on
    this very judge."""
    scores = lambda texts: [x for i in range(0, len(prompts), batch_size)
                            for x in score_texts(rm, enc, prompts[i:i + batch_size], texts[i:i + batch_size],
                                                 device).tolist()]
    return data.win_rate(scores(responses), scores(opponents))


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over masked tokens (1 = perfect critic, ≤ 0 = useless)."""
    var_r = masked_var(returns, mask)
    return (1 - masked_var(returns - values, mask) / var_r.clamp(min=1e-8)).item()


def ppo_iteration_metrics(ro, scores, gold, ended, advantages, returns, running):
    """PPO's metrics of one iteration: the paper's §5.2 ones (RM score, KL, length, perplexity) and the critic's fit."""
    mask, n_tokens = ro.mask, ro.mask.sum()
    kl_tokens = k1(ro.old_logprobs, ro.ref_logprobs, mask)               # (B, Tr) the penalty's estimator
    k3_tokens = k3(ro.old_logprobs, ro.ref_logprobs) * mask               # (B, Tr)
    return dict(score_raw=ro.scores.mean().item(), score_raw_std=ro.scores.std().item(),
                scores_raw=[round(x, 3) for x in ro.scores.tolist()],     # the distribution (paper Fig. 13)
                score=scores.mean().item(), gold=gold.mean().item(),
                kl_seq=kl_tokens.sum(1).mean().item(), kl_token=(kl_tokens.sum() / n_tokens).item(),
                kl_k3_seq=k3_tokens.sum(1).mean().item(),
                length=mask.sum(1).float().mean().item(), eos_rate=ended.float().mean().item(),
                perplexity=math.exp(-(ro.old_logprobs.sum() / n_tokens).item()),
                entropy=(ro.entropy.sum() / n_tokens).item(),
                **({} if ro.exact_kl is None else {"kl_exact_seq": ro.exact_kl.sum(1).mean().item()}),
                adv_mean=masked_mean(advantages, mask).item(), return_mean=masked_mean(returns, mask).item(),
                value_mean=masked_mean(ro.values, mask).item(),
                explained_var=explained_variance(ro.values, returns, mask),
                running_mean=running.mean, running_std=running.std)


def minibatch_means(update_stats):
    """An update's statistics ([{name: value}], one dict per optimizer step) averaged over its steps (ratio_max:
    the largest)."""
    out = {}
    for k in update_stats[0]:
        values = [s[k] for s in update_stats if k in s]
        out[k] = max(values) if k == "ratio_max" else sum(values) / len(values)
    return out


def clipped_tokens(ratio, advantages, clip_low, clip_high):
    """1.0 where the clip binds, 0.0 elsewhere: ratio (B, Tr) above 1 + clip_high where the advantage (B, Tr) is
    positive, or below 1 - clip_low where it is negative; there the token gets no policy gradient."""
    return (((ratio > 1 + clip_high) & (advantages > 0)) | ((ratio < 1 - clip_low) & (advantages < 0))).float()


# ---------------------------------------------------------------------------------------------- the samples log

def keep_samples(log, it, enc, prompts, texts, ro, gold, per_token, followed=()):
    """
    At an eval interval of an RL stage: print the best, median and worst rollout of the batch by RM score, and
    append them to the samples log (`log`, {stage}_samples.jsonl) with their per-token quantities (`per_token`:
    {name: (B, Tr)} tensors of the batch), followed by the rows of the followed validation prompts (`followed`).
    """
    order = torch.argsort(ro.scores, descending=True).tolist()
    picks = dict(best=order[0], median=order[len(order) // 2], worst=order[-1])
    kl_tokens = k1(ro.old_logprobs, ro.ref_logprobs, ro.mask)            # (B, Tr)
    print(table([(prompts[i].strip(), texts[i], ro.scores[i].item(), float(gold[i]), kl_tokens[i].sum().item())
                 for i in picks.values()], ["prompt", "response", "RM", "gold", "KL"], [30, 70, 5, 5, 5]))
    for row in sample_rows(it, enc, prompts, ro, gold, per_token, picks) + list(followed):
        log.write(**row)


def sample_rows(it, enc, prompts, ro, gold, per_token, picks):
    """Rows of the samples log for the rollouts `picks` ({label: row index}): prompt, response tokens decoded one by
    one, RM score, gold reward, and every per-token quantity cut to the response's length (so a view can colour
    each token by any of them)."""
    rows = []
    for label, i in picks.items():
        n = int(ro.mask[i].sum())
        rows.append(dict(iter=it, sample=label, prompt=prompts[i],
                         tokens=tok.decode_pieces(enc, ro.response[i, :n].tolist()),
                         rm_score=ro.scores[i].item(), gold=float(gold[i]),
                         per_token={name: [round(v, 5) for v in values[i, :n].float().tolist()]
                                    for name, values in per_token.items()}))
    return rows


@torch.no_grad()
def follow_prompts(it, policy, ref, rm, critic, enc, prompts, max_new_tokens, temperature, seed, has_gold, device):
    """
    The same validation prompts at every eval interval, sampled with the same seed, so one prompt can be followed
    over training: rows like sample_rows's ("val_0", "val_1", ...) with what a fresh sample has: k1 to the
    reference, the entropy, and the critic's value when there is a critic (PPO). Its own generator: training's
    random streams are untouched.
    """
    ids, mask = encode_prompts(enc, prompts, policy.cfg.block_size - max_new_tokens, True)  # (n, Tp) each
    s = sample_and_score(policy, ref, rm, ids.to(device), mask.to(device), max_new_tokens, temperature,
                         tok.eos_id(enc), tok.pad_id(enc), torch.Generator(device=device).manual_seed(seed))
    replies = tok.decode_replies(enc, s.response.tolist())
    gold = replies.golds(prompts) if has_gold else [float("nan")] * len(prompts)
    per_token = dict(k1=k1(s.old_logprobs, s.ref_logprobs, s.mask), entropy=s.entropy)
    if critic is not None:
        critic.eval()
        per_token["value"] = response_values(critic, s.seq, s.seq_mask, s.n_prompt).float() * s.mask  # (n, Tr)
    return sample_rows(it, enc, prompts, s, gold, per_token, {f"val_{i}": i for i in range(len(prompts))})


class ValidationMonitor:
    """
    What an RL stage watches on fixed validation prompts at each eval interval: the win rate against the SFT
    policy (both sampled with the same seed every time, so they answer the prompts with the same random stream;
    judged by the gold reward, or by the reward model where there is none) and the samples log (the batch's best,
    median and worst rollouts, and the first two validation prompts followed over training). Its own generators:
    training's random streams are untouched.
    """

    def __init__(self, enc, ref, rm, critic, prompts, max_new_tokens, temperature, seed, samples, device, has_gold=True):
        self.enc, self.ref, self.rm, self.critic, self.prompts, self.samples = enc, ref, rm, critic, prompts, samples
        self.max_new_tokens, self.temperature, self.seed, self.device = max_new_tokens, temperature, seed, device
        self.has_gold = has_gold
        self.sft_answers = self.answers(ref)

    def answers(self, model):
        """The model's responses to the validation prompts, with the seed + 1 generator."""
        return sample_responses(model, self.enc, self.prompts, self.max_new_tokens, self.temperature, self.device,
                                torch.Generator(device=self.device).manual_seed(self.seed + 1))

    def win_rate(self, policy):
        """The policy's win rate against SFT on the validation prompts (tie = ½)."""
        outs = self.answers(policy)
        return (data.gold_win_rate(self.prompts, outs, self.sft_answers) if self.has_gold else
                rm_win_rate(self.rm, self.enc, self.prompts, outs.texts, self.sft_answers.texts, self.device))

    def keep_samples(self, it, policy, ro, prompts, texts, gold, per_token):
        """The batch's best, median and worst rollouts (per_token: {name: (B, Tr)}) and the two followed
        validation prompts (sampled with seed + 2) into the samples log."""
        keep_samples(self.samples, it, self.enc, prompts, texts, ro, gold, per_token, follow_prompts(
            it, policy, self.ref, self.rm, self.critic, self.enc, self.prompts[:2], self.max_new_tokens,
            self.temperature, self.seed + 2, self.has_gold, self.device))
