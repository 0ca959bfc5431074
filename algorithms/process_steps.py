"""
The steps of a sampled reply, for process supervision (algorithms/process_reward.py trains reward models on them,
algorithms/process_grpo.py rewards a policy with them): replies kept as the sampled token rows with the token that
ends each sentence (StepReplies, sample_step_replies), the rule's labels of them (rule_labels, outcome_labels),
the right-padded rows a scalar-head model reads, with a
mask at the tokens it is read at (step_rows), one no-grad pass reading it there (read_steps), and the two ways a
reply's step probabilities become one score (Lightman et al. 2023: the product, "the probability that every step is
correct"; the minimum, which the paper also discusses).

A sentence ends at the token that holds its closing '.' (algorithms/arithmetic_chains.sentence_ends): in the toy
tokenizer '.' is a token of its own, so the model read there has seen the whole step and nothing of the next.

Shape legend: B replies, Tp prompt length (left-padded), T prompt + response length (right-padded), S sentences.
"""
from dataclasses import dataclass

import torch

import tokenizer as tok
from tokenizer import encode_prompts, pad_batch
from algorithms import arithmetic_chains


@dataclass
class StepReplies:
    """Sampled replies of the arithmetic-chain task, token by token."""
    prompts: list        # B prompt strings
    prompt_ids: list     # B id lists (the prompt's own tokens, no padding)
    response_ids: list   # B id lists: the sampled tokens up to and including EOS (no PAD)
    texts: list          # B decoded responses (a reply that ended keeps EOS as its marker text)
    ended: list          # B bools: the model emitted EOS
    ends: list           # B lists of S_i indices into response_ids: the token that ends each sentence

    def __len__(self):
        return len(self.prompts)

    def rows(self, idx):
        """The replies at positions idx, as a StepReplies."""
        return StepReplies(*([getattr(self, f)[i] for i in idx] for f in self.__dataclass_fields__))


def step_replies(enc, prompts, rows):
    """Prompt strings and sampled response rows (id lists, PAD after EOS) -> StepReplies."""
    eos, pad = tok.eos_id(enc), tok.pad_id(enc)
    out = StepReplies([], [], [], [], [], [])
    for p, row in zip(prompts, rows):
        ids = row[: row.index(eos) + 1] if eos in row else [i for i in row if i != pad]
        pieces = tok.decode_pieces(enc, ids)
        for f, v in zip(out.__dataclass_fields__, (p, tok.encode(enc, p), ids, "".join(pieces), eos in ids,
                                                   arithmetic_chains.sentence_ends(pieces))):
            getattr(out, f).append(v)
    return out


@torch.no_grad()
def sample_step_replies(model, enc, prompts, max_new_tokens, temperature, device, generator, batch_size=64):
    """One sampled reply per prompt (left-padded batches, KV cache) -> StepReplies."""
    model.eval()
    rows = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(enc, prompts[i:i + batch_size], model.cfg.block_size - max_new_tokens, True)
        rows += model.generate(ids.to(device), mask.to(device), max_new_tokens, tok.eos_id(enc), tok.pad_id(enc),
                               temperature=temperature, generator=generator).tokens.tolist()   # (b, Tr)
    return step_replies(enc, prompts, rows)


def rule_labels(replies):
    """The rule's label of every sentence of every reply (arithmetic_chains.sentence_labels): B lists of 1.0 / 0.0.
    A PRM's training labels, the oracle's process reward, and the truth every step judge is measured against."""
    return [[float(ok) for _, ok in arithmetic_chains.sentence_labels(p, t, e)]
            for p, t, e in zip(replies.prompts, replies.texts, replies.ended)]


def outcome_labels(replies):
    """One label per reply, 1.0 when it ended and its final answer is the expression's value (gold reward > 0)."""
    return [[float(arithmetic_chains.gold_reward(p, t, e) > 0)]
            for p, t, e in zip(replies.prompts, replies.texts, replies.ended)]


def read_positions(replies, i, outcome):
    """Where reply i is read in its row prompt + response: each sentence's last token (a process reward model), or
    only the reply's last token (outcome=True: an outcome reward model, as Lightman et al.'s ORM)."""
    n = len(replies.prompt_ids[i])
    return [n + len(replies.response_ids[i]) - 1] if outcome else [n + e for e in replies.ends[i]]


def step_rows(replies, pad_id, device, outcome=False, targets=None):
    """
    The replies as right-padded rows: ids (B, T), mask (B, T), read (B, T) 1.0 at the tokens the model is read at
    (read_positions), and, given targets (B lists, one value per read position), target (B, T) holding them there
    (0 elsewhere; None without targets).
    """
    ids, mask = pad_batch([p + r for p, r in zip(replies.prompt_ids, replies.response_ids)], pad_id, left=False)
    read = torch.zeros(ids.shape)                                               # (B, T)
    target = torch.zeros(ids.shape) if targets is not None else None           # (B, T)
    for i in range(len(ids)):
        at = read_positions(replies, i, outcome)
        read[i, at] = 1.0
        if targets is not None:
            if len(targets[i]) != len(at):
                raise ValueError(f"reply {i}: {len(targets[i])} targets for {len(at)} read positions")
            target[i, at] = torch.tensor(targets[i], dtype=torch.float)
    return ids.to(device), mask.to(device), read.to(device), None if target is None else target.to(device)


@torch.no_grad()
def read_steps(model, replies, pad_id, device, outcome=False, batch_size=64):
    """A scalar-head model's logits at each reply's read positions: B lists of floats (S_i each, or 1 with
    outcome=True); sigmoid of one is the model's probability that the step (or the outcome) is correct."""
    model.eval()
    out = []
    for i in range(0, len(replies), batch_size):
        part = replies.rows(range(i, min(i + batch_size, len(replies))))
        ids, mask, read, _ = step_rows(part, pad_id, device, outcome)
        values = model(ids, mask).float()                                       # (b, T)
        out += [v[r.bool()].tolist() for v, r in zip(values, read)]
    return out


def aggregate(step_logits, how):
    """One score per reply from its step logits: "min" (the least likely step) or "product" (the probability that
    every step is correct, Lightman et al.), both of the sigmoid probabilities. A reply with no sentence
    scores 0 (it states nothing that could be right)."""
    out = []
    for logits in step_logits:
        p = torch.sigmoid(torch.tensor(logits, dtype=torch.float64))             # (S,)
        out.append(0.0 if len(logits) == 0 else float(p.min() if how == "min" else p.prod()))
    return out
