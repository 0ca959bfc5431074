"""
The mutation table: for each part, classic wrong answers made by editing the reference body, and the points each
loses when graded. A grader that a wrong answer can pass would show a 0 here; tests/test_assignments.py requires
every variant to lose points. Kept out of the student copy (the edits quote the reference).

    python -m assignments.mutations          # prints the table (markdown), seconds
    python -m assignments.mutations --docs   # writes it, the parts table and the end-to-end marks into docs/assignments.md
"""
import argparse
import os
import sys

from assignments.grade import END_TO_END_POINTS, end_to_end_thresholds, grade
from assignments.parts import BY_NAME, PARTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (part, the mistake, [(reference text, wrong text)]): each reference text occurs once in the part's module
MUTANTS = [
    ("sft_loss", "mask ignored: the prompt and padding are trained on",
     [("m = loss_mask[:, 1:].float()", "m = torch.ones_like(loss_mask[:, 1:]).float()")]),
    ("sft_loss", "mask not shifted: the mask of position t, not t+1",
     [("m = loss_mask[:, 1:].float()", "m = loss_mask[:, :-1].float()")]),
    ("sft_loss", "mean over every position, padding included",
     [("return (nll * m).sum() / m.sum().clamp(min=1)", "return (nll * m).sum() / m.numel()")]),
    ("bradley_terry", "sign flipped: the rejected response preferred",
     [("-F.logsigmoid(r_chosen - r_rejected).mean()", "-F.logsigmoid(r_rejected - r_chosen).mean()")]),
    ("bradley_terry", "log(sigmoid(x)): -inf where the gap is large",
     [("-F.logsigmoid(r_chosen - r_rejected).mean()", "-torch.log(torch.sigmoid(r_chosen - r_rejected)).mean()")]),
    ("bradley_terry", "sum, not mean, over pairs",
     [("-F.logsigmoid(r_chosen - r_rejected).mean()", "-F.logsigmoid(r_chosen - r_rejected).sum()")]),
    ("running_moments", "the batch's own variance with Bessel's correction",
     [("x.var(unbiased=False).item()", "x.var(unbiased=True).item()")]),
    ("running_moments", "normalised before the batch is folded in",
     [("    running.update(scores)\n    if mode == \"scale\":\n        return scores / running.std",
       "    if mode == \"scale\":\n        running.update(scores)\n        return scores / running.std"),
      ("        return torch.clamp((scores - running.mean) / running.std, -clip, clip)",
       "        out = torch.clamp((scores - running.mean) / running.std, -clip, clip)\n"
       "        running.update(scores)\n        return out")]),
    ("running_moments", "clip ignored",
     [("torch.clamp((scores - running.mean) / running.std, -clip, clip)", "(scores - running.mean) / running.std")]),
    ("kl_reward", "score on the last position, padding or not",
     [("rewards[torch.arange(len(scores)), last] += scores", "rewards[:, -1] += scores")]),
    ("kl_reward", "KL sign flipped: a bonus for moving away",
     [("rewards = -kl_coef * k1(", "rewards = kl_coef * k1(")]),
    ("kl_reward", "KL paid at padding too",
     [("rewards = -kl_coef * k1(old_logprobs, ref_logprobs, mask)",
       "rewards = -kl_coef * (old_logprobs - ref_logprobs)")]),
    ("gae", "γ dropped from the TD error", [("rewards[:, t] + gamma * next_v", "rewards[:, t] + next_v")]),
    ("gae", "λ dropped from the recursion", [("last = delta + gamma * lam * last", "last = delta + gamma * last")]),
    ("gae", "values at padding leak into the last token's TD error",
     [("values, rewards = values * mask, rewards * mask", "rewards = rewards * mask")]),
    ("gae", "right values, but the caller's values and rewards zeroed in place",
     [("values, rewards = values * mask, rewards * mask", "values, rewards = values.mul_(mask), rewards.mul_(mask)")]),
    ("gae", "returns missing: the advantages returned twice",
     [("return adv, (adv + values) * mask", "return adv, adv")]),
    ("ppo_policy_loss", "min, not max: the optimistic bound",
     [("loss = masked_mean(torch.maximum(pg1, pg2), mask)", "loss = masked_mean(torch.minimum(pg1, pg2), mask)")]),
    ("ppo_policy_loss", "mean over padding",
     [("loss = masked_mean(torch.maximum(pg1, pg2), mask)", "loss = torch.maximum(pg1, pg2).mean()")]),
    ("ppo_policy_loss", "the ratio not clipped",
     [("torch.clamp(ratio, 1.0 - ratio_clip, 1.0 + ratio_clip)", "ratio")]),
    ("ppo_policy_loss", "statistics missing",
     [("    return loss, stats", "    return loss, {}")]),
    ("ppo_value_loss", "min, not max, of the two errors",
     [("loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)",
       "loss = 0.5 * masked_mean(torch.minimum(err, err_clip), mask)")]),
    ("ppo_value_loss", "the ½ dropped", [("loss, clipfrac = 0.5 * masked_mean(err, mask), 0.0",
                                         "loss, clipfrac = masked_mean(err, mask), 0.0"),
                                        ("loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)",
                                         "loss = masked_mean(torch.maximum(err, err_clip), mask)")]),
    ("ppo_value_loss", "clipped around the returns, not the old values",
     [("v_clip = old_values + torch.clamp(values - old_values, -vf_clip, vf_clip)",
       "v_clip = returns + torch.clamp(values - returns, -vf_clip, vf_clip)")]),
    ("whitening", "variance without Bessel's correction",
     [("return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)", "return ((x - mean) ** 2 * mask).sum() / n")]),
    ("whitening", "mean over padding too", [("    mean = masked_mean(x, mask)\n    n = mask.sum()",
                                            "    mean = x.mean()\n    n = mask.sum()")]),
    ("whitening", "padding not set back to 0", [("    return out * mask", "    return out")]),
    ("rloo_baseline", "the baseline includes the sample itself",
     [("baseline = (g.sum(1, keepdim=True) - g) / (k - 1)", "baseline = g.mean(1, keepdim=True)")]),
    ("rloo_baseline", "÷ k, not k - 1", [("baseline = (g.sum(1, keepdim=True) - g) / (k - 1)",
                                         "baseline = (g.sum(1, keepdim=True) - g) / k")]),
    ("rloo_baseline", "sign flipped", [("return (g - baseline).view(-1)", "return (baseline - g).view(-1)")]),
    ("group_advantages", "population std (÷ G), not the sample std",
     [("adv / (r.std(1, keepdim=True) + STD_EPS)", "adv / (r.std(1, keepdim=True, unbiased=False) + STD_EPS)")]),
    ("group_advantages", "the batch's mean, not the group's",
     [("adv = r - r.mean(1, keepdim=True)", "adv = r - r.mean()")]),
    ("group_advantages", "no eps and no rule for ties: a tied group divides 0 by 0",
     [("adv / (r.std(1, keepdim=True) + STD_EPS)", "adv / r.std(1, keepdim=True)"),
      ("return adv.masked_fill(flat, 0.0).view(-1).to(dtype)", "return adv.view(-1).to(dtype)")]),
    ("group_advantages", "float64 returned", [("return adv.masked_fill(flat, 0.0).view(-1).to(dtype)",
                                              "return adv.masked_fill(flat, 0.0).view(-1)")]),
    ("loss_aggregation", "masked by multiplying: NaN at padding reaches the loss",
     [("masked = torch.where(m, loss_per_token, torch.zeros_like(loss_per_token))",
       "masked = loss_per_token * m")]),
    ("loss_aggregation", "seq-mean-token-mean as the token mean",
     [("return (masked.sum(1) / m.sum(1).clamp(min=1)).mean()", "return masked.sum() / m.sum().clamp(min=1)")]),
    ("loss_aggregation", "norm_len ignored", [("(norm_len or mask.shape[1])", "mask.shape[1]")]),
    ("dpo_loss", "the reference dropped", [("h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)",
                                           "h = policy_chosen - policy_rejected")]),
    ("dpo_loss", "label smoothing with the wrong sign",
     [("- label_smoothing * F.logsigmoid(-beta * h)", "- label_smoothing * F.logsigmoid(beta * h)")]),
    ("dpo_loss", "β missing from the implicit rewards",
     [("r_c, r_r = beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()",
       "r_c, r_r = (policy_chosen - ref_chosen).detach(), (policy_rejected - ref_rejected).detach()")]),
    ("alol_weight", "A, not A⁺: negative advantages weigh in",
     [("(advantages.clamp(min=0) * log_rho.exp())", "(advantages * log_rho.exp())")]),
    ("alol_weight", "the ratio not clipped",
     [(".clamp(math.log(1 - clip_eps), math.log(1 + clip_eps))  # (B,) clipped", "  # (B,)")]),
    ("alol_weight", "the weight not detached: a gradient through ρ",
     [("(advantages.clamp(min=0) * log_rho.exp()).detach()", "(advantages.clamp(min=0) * log_rho.exp())")]),
    ("step_bce_loss", "every token trained on, not only the step ends",
     [("return (bce * read).sum() / read.sum().clamp(min=1)", "return bce.mean()")]),
    ("step_bce_loss", "the mean of each row's mean: a reply with few steps weighs more",
     [("return (bce * read).sum() / read.sum().clamp(min=1)",
       "return ((bce * read).sum(1) / read.sum(1).clamp(min=1)).mean()")]),
    ("step_bce_loss", "cross-entropy of sigmoid(logits): clamped at log 0 where logits are confident",
     [("F.binary_cross_entropy_with_logits(logits.float(), target, reduction=\"none\")",
       "F.binary_cross_entropy(torch.sigmoid(logits.float()), target, reduction=\"none\")")]),
]


def module_path(module):
    return os.path.join(ROOT, module.replace(".", os.sep) + ".py")


def mutated_source(part, edits):
    """The part's module text with the edits made; each reference text must occur once, inside the part's body."""
    module = BY_NAME[part].module
    with open(module_path(module)) as f:
        text = f.read()
    for old, new in edits:
        if text.count(old) != 1:
            raise ValueError(f"{module_path(module)}: {old!r} occurs {text.count(old)} times, not once")
        text = text.replace(old, new)
    return module, text


def points_lost(part, edits):
    """Points the part loses with the edits made, and the grader's reason."""
    module, text = mutated_source(part, edits)
    [(p, points, _, _, why)] = grade(ROOT, [part], sources={module: text})
    return p.points - points, why


def table(reasons=True):
    """Markdown: part, wrong variant, points lost (and the grader's reason: its digits are this CPU's)."""
    head = "| part | wrong variant | points lost |" + (" the grader's reason |" if reasons else "")
    lines = [head, "|---|---|---|" + ("---|" if reasons else "")]
    for part, variant, edits in MUTANTS:
        lost, why = points_lost(part, edits)
        lines.append(f"| {part} | {variant} | {lost} of {BY_NAME[part].points} |" +
                     (f" {why.replace('|', '/')} |" if reasons else ""))
    return "\n".join(lines)


def parts_table():
    lines = ["| part | points | file: what the student writes | paper | what it teaches | minutes |",
             "|---|---|---|---|---|---|"]
    for p in PARTS:
        lines.append(f"| `{p.name}` | {p.points} | `{p.module.replace('.', '/')}.py`: {p.writes} | {p.paper} | "
                     f"{p.teaches} | {p.minutes} |")
    lines.append(f"| **all parts** | {sum(p.points for p in PARTS)} | | | | {sum(p.minutes for p in PARTS)} |")
    lines.append(f"| `end_to_end` (only with `--end_to_end`) | {END_TO_END_POINTS} | the small pipeline on the "
                 f"student's code | | the parts working together | 10 |")
    return "\n".join(lines)


def end_to_end_marks():
    marks = end_to_end_thresholds(ROOT)
    return (f"Pass marks: RM accuracy vs gold ≥ {marks['rm_acc_gold']:.3f}, gold gain of PPO over SFT ≥ "
            f"{marks['gold_gain']:.3f}, KL to SFT ≤ {marks['kl_sft']:.3f} nats; from {marks['note']} "
            f"(`docs/measured/seeds/small_s*.json`, the records of `python -m studies.reproduce seeds`).")


BLOCKS = {"parts": parts_table, "mutations": lambda: table(reasons=False), "end_to_end": end_to_end_marks}
PAGE = os.path.join(ROOT, "docs", "assignments.md")


def page_with_blocks(text):
    """docs/assignments.md with every <!-- assignments:NAME --> block replaced by what BLOCKS[NAME] gives now."""
    for name, make_block in BLOCKS.items():
        start, end = f"<!-- assignments:{name} -->", f"<!-- /assignments:{name} -->"
        a, b = text.index(start) + len(start), text.index(end)
        text = text[:a] + "\n" + make_block() + "\n" + text[b:]
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the mutation table (part, wrong variant, points lost, reason), "
                                            "or with --docs, write docs/assignments.md's generated tables.")
    p.add_argument("--docs", action="store_true", help="rewrite the generated blocks of docs/assignments.md")
    a = p.parse_args(argv)
    if a.docs:
        with open(PAGE) as f:
            text = f.read()
        with open(PAGE, "w") as f:
            f.write(page_with_blocks(text))
        print(f"{PAGE}: the parts, mutation and end-to-end blocks written")
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
