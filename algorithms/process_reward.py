"""
Process supervision, part 1: an outcome reward model (ORM) and a process reward model (PRM) on the arithmetic-chain
task (algorithms/arithmetic_chains.py), whose every step is checkable in code. Lightman et al. 2023 ("Let's Verify Step
by Step") train a PRM on human step labels (PRM800K) and an ORM on final-answer correctness, and compare them by
best-of-N selection; Math-Shepherd (Wang et al. 2024) makes the step labels without humans, from Monte-Carlo
completions. Here the true label of every step is known, so each model's step accuracy can be measured against it.

One run trains one model, chosen by --labels, from the SFT policy's backbone with a fresh scalar head, on the same
sampled replies whatever the labels (same seed, same SFT: the same budget of solutions for each kind of model):
  1. sample     k replies to each of n_train_prompts train prompts from the SFT policy (temperature 1)
  2. label      outcome      one label per reply, at its last token: the final answer is right (Lightman's ORM)
                rule         one label per sentence, at the token ending it: arithmetic_chains.sentence_labels,
                             the code's stand-in for PRM800K's human labellers
                monte_carlo  Math-Shepherd: from the prefix ending at each step, M completions by the SFT policy;
                             hard label 1 iff any completion reaches the right answer (soft: the share that do);
                             the answer sentence's label is its own correctness (no completion is needed)
  3. train      binary cross-entropy on the head's logit at the labelled tokens (step_bce_loss), every step
                supervised up to and including the first incorrect one (Lightman et al.: "only up to the first
                incorrect step"), AdamW, one pass per epoch in a seeded order
  4. evaluate   on held-out test prompts, best_of replies each: step accuracy against the rule (the model's
                sigmoid > 0.5 at each sentence's end, up to the rule's first incorrect step; an ORM is read at the
                same tokens, as a value), and best-of-N final-answer accuracy for N = 1, 2, 4, ... best_of (Lightman
                Fig. 3): the reply the model scores highest among N (ORM: its last-token score; PRM: the minimum or
                the product of its step probabilities), next to the oracle that selects by the gold reward

Run (after `python train_sft.py --data chains --out_dir out/chains`; writes out/chains/{orm,prm_rule,prm_mc}.pt, the
JSONL log and the loss plot beside them):
    python -m algorithms.process_reward --labels outcome                     # -> out/chains/orm.pt
    python -m algorithms.process_reward --labels rule                        # -> out/chains/prm_rule.pt
    python -m algorithms.process_reward --labels monte_carlo                 # -> out/chains/prm_mc.pt
    python -m algorithms.process_reward --preset tiny --sft_ckpt out/chains_tiny/sft.pt --out_dir out/chains_tiny
    python -m algorithms.process_reward --help

Deliberate choices:
  1. Binary labels (correct / incorrect) where PRM800K has three (positive, negative, neutral): the rule has no
     neutral step.
  2. The answer sentence is a step: correct iff the correct steps finished the expression and the answer is its
     value, so "every sentence correct" is exactly gold reward 1.0, and a reply with no step still has a score.
  3. Completions for the Monte-Carlo labels get the whole max_new_tokens budget after the prefix (the context holds
     it: prompt <= 28 tokens, a reply <= 48), not what the prefix left of it.
  4. Best-of-N for N < best_of averages over the best_of / N disjoint groups of each prompt's replies (every reply
     used once per N), where Lightman et al. resample; the spread in the study comes from seeds instead.
  5. One recipe for all three models: 2 epochs at lr 3e-4 (docs/process_supervision.md: why this rate).
  6. The training replies answer prompts the SFT never saw (arithmetic_chains.splits' "rm" split), as the test
     prompts are: on its own train prompts the SFT's answers hold fewer and other errors than the ones the
     models must judge (docs/process_supervision.md).

Shape legend: B replies in a batch, T prompt + response length (right-padded), S sentences of a reply, P prompts,
K replies per prompt.
"""
import os
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import tokenizer as tok
from runs import (Progress, Run, RunOptions, check_finite, field, load_policy, load_weights, parse_config, plot_curves,
                  read_jsonl, run_main, table)
from tokenizer import encode_prompts
from algorithms.process_steps import (StepReplies, aggregate, outcome_labels, read_steps, rule_labels,
                                      sample_step_replies, step_replies, step_rows)
from model import ScalarHeadGPT
from algorithms import arithmetic_chains

STAGES = {"outcome": "orm", "rule": "prm_rule", "monte_carlo": "prm_mc"}


@dataclass
class Config(RunOptions):
    sft_ckpt: str = field("out/chains/sft.pt", "SFT checkpoint trained with --data chains: the policy that samples "
                                               "and completes, and the backbone every model starts from",
                          input_file=True)
    out_dir: str = field("out/chains", "where the checkpoint (orm.pt, prm_rule.pt or prm_mc.pt), log and plot go")
    labels: str = field("rule", "outcome (an ORM: the final answer right), rule (a PRM on the code's step labels) "
                                "or monte_carlo (a PRM on Math-Shepherd labels)",
                        choices=tuple(STAGES))
    mc_target: str = field("hard", "monte_carlo: hard (1 iff any completion is right) or soft (their share)",
                           choices=("hard", "soft"))
    n_train_prompts: int = field(1000, "prompts of the rm split (unseen by SFT) the training replies answer",
                                 range="[1, 2000]")
    samples_per_prompt: int = field(2, "k: replies sampled per train prompt", range="[1, inf)")
    mc_completions: int = field(8, "M: completions from each step prefix (monte_carlo)", range="[1, inf)")
    n_val_prompts: int = field(100, "val prompts (one reply each): loss and step accuracy during training",
                               range="[1, inf)")
    n_test_prompts: int = field(200, "test prompts for the final step accuracy and best-of-N", range="[1, inf)")
    best_of: int = field(64, "replies per test prompt: best-of-N for N = 1, 2, 4, ... up to it (a power of 2)",
                         range="[1, inf)", valid=(lambda n: n & (n - 1) == 0, "a power of 2"))
    max_new_tokens: int = field(48, "longest reply (and completion)", range="[1, inf)")
    temperature: float = field(1.0, "sampling temperature of replies and completions", range="(0, inf)")
    epochs: int = field(2, "passes over the training replies", range="[1, inf)")
    batch_size: int = field(32, "replies per optimizer step", range="[1, inf)")
    lr: float = field(3e-4, "learning rate (AdamW), linear warm-up then constant", range="(0, inf)")
    warmup_iters: int = field(20, "linear warm-up steps", range="[1, inf)")
    grad_clip: float = field(1.0, "global grad-norm clip (0 = off)", range="[0, inf)")
    eval_interval: int = field(25, "validate every this many steps", range="[1, inf)")


PRESETS = {
    "default": {},
    "tiny": dict(n_train_prompts=16, samples_per_prompt=2, mc_completions=2, n_val_prompts=8, n_test_prompts=4,
                 best_of=4, max_new_tokens=32, epochs=1, batch_size=8, warmup_iters=2, eval_interval=2),
}


# ----------------------------------------------------------------------------------------------------
# Pure functions (imported by tests)

def step_bce_loss(logits, target, read):
    """Mean binary cross-entropy of the head's logits against the targets at the read tokens only (the tokens that
    end a labelled step, or an ORM's last token). logits, target (0..1), read (0/1) are (B, T)."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")   # (B, T)
    return (bce * read).sum() / read.sum().clamp(min=1)


def monte_carlo_label(completions_right, target="hard"):
    """Math-Shepherd's label of one step from whether each of its M completions reached the right answer: hard
    estimation 1.0 iff any did, soft estimation the share that did."""
    if not completions_right:
        raise ValueError("a Monte-Carlo label needs at least one completion")
    if target == "hard":
        return float(any(completions_right))
    return sum(map(bool, completions_right)) / len(completions_right)


def up_to_first_error(labels):
    """How many of a reply's step labels are supervised: up to and including the first incorrect one (< 0.5)."""
    for i, y in enumerate(labels):
        if y < 0.5:
            return i + 1
    return len(labels)


def best_of_n_accuracy(scores, correct, n):
    """Final-answer accuracy of best-of-n selection: the K replies of each prompt (scores, correct: (P, K)) split
    into K / n disjoint groups, in each the reply with the highest score chosen (the first one on ties); the mean of
    the chosen replies' correctness over prompts and groups."""
    P, K = scores.shape
    groups = scores.view(P, K // n, n)                                         # (P, K/n, n)
    pick = groups.argmax(-1, keepdim=True)                                     # (P, K/n, 1)
    return correct.view(P, K // n, n).float().gather(-1, pick).mean().item()


def majority_vote_accuracy(answers, correct, n):
    """Lightman et al.'s baseline without a reward model: in each of a prompt's K / n disjoint groups the final
    answer most replies give (the first of those tied), judged by the first reply giving it. answers: P lists of
    K answers (None for none), correct (P, K)."""
    right = []
    for p, row in enumerate(answers):
        for g in range(0, len(row), n):
            group = row[g:g + n]
            top = max(group, key=group.count)                                 # max keeps the first of a tie
            right.append(bool(correct[p, g + group.index(top)]))
    return sum(right) / len(right)


# ----------------------------------------------------------------------------------------------------
# Labels (plumbing around the pure functions: the sampling they need)

@torch.no_grad()
def mc_labels(policy, enc, replies, cfg, device, generator, batch_size=64):
    """Math-Shepherd labels of every sentence: M completions of each step's prefix by the policy, each judged by its
    final answer (the answer sentence itself: its own correctness). B lists of floats."""
    prefixes, owner = [], []                                                    # one entry per (step, completion)
    for i in range(len(replies)):
        steps = arithmetic_chains.step_labels(replies.prompts[i], replies.texts[i])
        for s, end in enumerate(replies.ends[i][:len(steps)]):
            prefixes += [replies.prompt_ids[i] + replies.response_ids[i][:end + 1]] * cfg.mc_completions
            owner += [(i, s)] * cfg.mc_completions
    right, progress = {}, Progress(len(prefixes))
    for j in range(0, len(prefixes), batch_size):
        if j % (50 * batch_size) == 0:
            print(progress.line(j, f"Monte-Carlo completions of {len(prefixes) // cfg.mc_completions} step prefixes"))
        ids, mask = encode_prompts(enc, [tok.decode(enc, p) for p in prefixes[j:j + batch_size]],
                                   policy.cfg.block_size - cfg.max_new_tokens, True)   # (b, Tp) each
        rows = policy.generate(ids.to(device), mask.to(device), cfg.max_new_tokens, tok.eos_id(enc), tok.pad_id(enc),
                               temperature=cfg.temperature, generator=generator).tokens.tolist()
        done = step_replies(enc, [replies.prompts[i] for i, _ in owner[j:j + batch_size]], rows)
        for (i, s), prefix, text, ended in zip(owner[j:j + batch_size], prefixes[j:j + batch_size], done.texts,
                                               done.ended):
            whole = tok.decode(enc, prefix[len(replies.prompt_ids[i]):]) + text
            right.setdefault((i, s), []).append(arithmetic_chains.gold_reward(replies.prompts[i], whole, ended) > 0)
    out = []
    for i, own in enumerate(rule_labels(replies)):
        n_steps = len(arithmetic_chains.step_labels(replies.prompts[i], replies.texts[i]))
        out.append([monte_carlo_label(right[(i, s)], cfg.mc_target) for s in range(n_steps)] + own[n_steps:])
    return out


def supervised(labels):
    """Each reply's labels cut after its first incorrect one (up_to_first_error); the reply's read positions are cut
    alike by the caller (StepReplies.ends)."""
    return [y[:up_to_first_error(y)] for y in labels]


def cut_ends(replies, labels):
    """The replies with each one's sentence ends cut to its supervised labels."""
    return StepReplies(replies.prompts, replies.prompt_ids, replies.response_ids, replies.texts, replies.ended,
                       [e[:len(y)] for e, y in zip(replies.ends, labels)])


@torch.no_grad()
def step_accuracy(rm, replies, pad_id, device):
    """The model against the rule at every sentence up to the rule's first incorrect one: accuracy (sigmoid > 0.5 is
    "correct"), and recall of the incorrect steps (the share of them it calls incorrect)."""
    truth = supervised(rule_labels(replies))
    logits = read_steps(rm, cut_ends(replies, truth), pad_id, device)
    pairs = [(l > 0, y > 0.5) for ls, ys in zip(logits, truth) for l, y in zip(ls, ys)]
    wrong = [p for p, y in pairs if not y]
    return dict(step_acc=sum(p == y for p, y in pairs) / max(len(pairs), 1),
                wrong_step_recall=sum(not p for p in wrong) / max(len(wrong), 1), n_steps=len(pairs))


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    outcome = cfg.labels == "outcome"
    with Run(cfg, STAGES[cfg.labels], unit="step") as run:
        device = run.device
        policy, sft = load_policy(cfg.sft_ckpt, ("sft",))
        if sft["config"].get("data") != "chains":
            raise ValueError(f"{cfg.sft_ckpt}: trained with --data {sft['config'].get('data')}, not chains; train "
                             f"the SFT policy with `python train_sft.py --data chains --out_dir out/chains`")
        policy.to(device).requires_grad_(False)
        enc, pad_id = tok.get_tokenizer(sft["tokenizer"]), policy.cfg.pad_id
        print(f"device={device} config={asdict(cfg)}")

        # 1. sample: the same replies whatever the labels (a generator of the seed alone, before training starts)
        splits = arithmetic_chains.splits(sft["config"]["seed"])
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        train_prompts = [p for p in rng.sample(splits["rm"], min(cfg.n_train_prompts, len(splits["rm"])))
                         for _ in range(cfg.samples_per_prompt)]      # prompts the SFT never saw (choice 6)
        sample = lambda prompts: sample_step_replies(policy, enc, prompts, cfg.max_new_tokens, cfg.temperature,
                                                     device, gen)
        train, val = sample(train_prompts), sample(splits["val"][:cfg.n_val_prompts])
        test = sample([p for p in splits["test"][:cfg.n_test_prompts] for _ in range(cfg.best_of)])

        # 2. label
        if cfg.labels == "monte_carlo":
            labels = mc_labels(policy, enc, train, cfg, device, gen)
            rule = rule_labels(train)
            flat = [(m > 0.5, r > 0.5) for ms, rs in zip(labels, rule) for m, r in zip(ms, rs)]
            label_quality = dict(mc_label_acc=sum(m == r for m, r in flat) / len(flat),
                                 mc_wrong_step_recall=sum(not m for m, r in flat if not r) / max(1, sum(not r for _, r in flat)))
        else:
            labels, label_quality = (outcome_labels(train) if outcome else rule_labels(train)), {}
        labels = labels if outcome else supervised(labels)
        train = train if outcome else cut_ends(train, labels)
        print(f"{len(train)} training replies, {sum(map(len, labels))} labels ({cfg.labels}), "
              f"{100 * sum(map(sum, labels)) / max(1, sum(map(len, labels))):.0f}% positive {label_quality or ''}")

        # 3. train: the SFT backbone and a fresh scalar head
        rm = ScalarHeadGPT(policy.cfg)
        load_weights(rm.backbone, sft["model"], cfg.sft_ckpt)
        rm.to(device)
        opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        order = [i for _ in range(cfg.epochs) for i in rng.sample(range(len(train)), len(train))]
        n_steps = len(order) // cfg.batch_size
        meta = dict(model_config=asdict(policy.cfg), tokenizer=sft["tokenizer"], tokenizer_id=sft["tokenizer_id"],
                    sft_ckpt=cfg.sft_ckpt, labels=cfg.labels)
        run.begin(opt, dict(model=rm), meta, n_steps)

        def validate(step):
            m = step_accuracy(rm, val, pad_id, device)
            run.log.write(step=step, val_step_acc=m["step_acc"], val_wrong_step_recall=m["wrong_step_recall"],
                          time=run.train_time())
            print(run.progress.line(step, f"val step accuracy {m['step_acc']:.3f} (incorrect steps found "
                                          f"{m['wrong_step_recall']:.3f})"))

        if run.start == 1:
            validate(0)
        for step in range(run.start, n_steps + 1):
            idx = order[(step - 1) * cfg.batch_size:step * cfg.batch_size]
            ids, mask, read, target = step_rows(train.rows(idx), pad_id, device, outcome,
                                                [labels[i] for i in idx])          # (B, T) each
            rm.train()
            lr = cfg.lr * min(1.0, step / cfg.warmup_iters)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = rm(ids, mask)                                                 # (B, T)
            loss = step_bce_loss(logits, target, read)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.grad_clip or float("inf"))
            check_finite(f"{STAGES[cfg.labels]} step {step}", train_loss=loss.item(), grad_norm=gnorm.item())
            opt.step()
            acc = (((logits > 0) == (target > 0.5)).float() * read).sum() / read.sum().clamp(min=1)
            run.log.write(step=step, train_loss=loss.item(), train_acc=acc.item(), lr=lr, grad_norm=gnorm.item(),
                          time=run.train_time())
            if step % cfg.eval_interval == 0 or step == n_steps:
                validate(step)
            run.save(step)
        train_time = run.train_time()

        # 4. evaluate: step accuracy against the rule, best-of-N by this model and by the gold reward
        metrics = dict(step_accuracy(rm, test, pad_id, device), train_time_s=train_time, **label_quality)
        P, K = cfg.n_test_prompts, cfg.best_of
        gold = torch.tensor([arithmetic_chains.gold_reward(p, t, e) for p, t, e in
                             zip(test.prompts, test.texts, test.ended)]).view(P, K)          # (P, K)
        correct = gold > 0                                                                    # (P, K)
        logits = read_steps(rm, test, pad_id, device, outcome)
        selectors = {"orm": [l[0] for l in logits]} if outcome else {
            "prm_min": aggregate(logits, "min"), "prm_product": aggregate(logits, "product")}
        selectors["gold"] = gold.flatten().tolist()
        ns = [2 ** i for i in range(K.bit_length())]
        metrics["best_of_n"] = {name: [best_of_n_accuracy(torch.tensor(s).view(P, K), correct, n) for n in ns]
                                for name, s in selectors.items()}
        metrics["best_of_n_process"] = {name: [best_of_n_accuracy(torch.tensor(s).view(P, K), gold == 1.0, n)
                                               for n in ns] for name, s in selectors.items()}
        answers = [[arithmetic_chains.final_answer(t) for t in test.texts[p * K:(p + 1) * K]] for p in range(P)]
        metrics["best_of_n"]["majority"] = [majority_vote_accuracy(answers, correct, n) for n in ns]
        metrics["n"] = ns
        run.log.write(step=n_steps, **{f"test_{k}": v for k, v in metrics.items()})
        print(table([(name, *accs) for name, accs in metrics["best_of_n"].items()],
                    ["final answer right", *[f"N={n}" for n in ns]], [18] + [6] * len(ns)))
        plot_curves(os.path.join(cfg.out_dir, f"{STAGES[cfg.labels]}_loss.png"), read_jsonl(run.log_path), "step",
                    [["train_loss"], ["train_acc", "val_step_acc", "val_wrong_step_recall"]],
                    f"{STAGES[cfg.labels]}: binary cross-entropy at the labelled tokens; step accuracy vs the rule")
        run.finish(metrics, responses_generated=0, policy_steps=0)
        print(f"{STAGES[cfg.labels]} done in {train_time:.0f}s: step accuracy vs the rule {metrics['step_acc']:.3f}, "
              f"incorrect steps found {metrics['wrong_step_recall']:.3f} -> {run.ckpt_path}")
        return metrics


if __name__ == "__main__":
    run_main(main)
