"""
Arithmetic chains: a multi-step toy task whose every step is checkable in code, for process supervision (a
reward model that grades each step, against one that grades the outcome). A prompt asks for an expression of 3 or
4 small numbers joined by +, - and * ("Work out 3 + 4 * 2 - 5 step by step."); a demonstration reduces it one
operation per step, multiplications first, then left to right, and states the answer:

    4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6. The answer is 6.

The rules, all pure functions of the text and the token-level EOS flag (as data.py's):
  step_labels   each step (a sentence "a op b = c.") is correct iff it is a true equation that performs an operation
                the expression allows next, given the correct steps before it: any multiplication of two adjacent
                numbers; an addition or subtraction only at the leftmost operator, and only when no multiplication
                binds its right-hand number. A wrong step leaves the expression as it was (the next step is judged
                against the same state), so a repeated or skipped step is wrong too.
  final_answer  the number of "The answer is N." (the reply's last sentence), or None.
  gold_reward   1.0 when the reply ended, every step is correct, the steps finish the expression and the answer is
                right; 0.5 when the answer is right but a step is wrong or missing (a right outcome by a wrong
                process); -0.5 when the answer is wrong or absent; 0.0 when the reply did not end.

Kept apart from data.py's prompts and pairs: its own generator and splits, so no number of the main task moves.
"""
import random
import re
from dataclasses import dataclass

from data import EOS_TEXT

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
OPS = ("+", "-", "*")
STEP = re.compile(r"^\s*(-?\d+)\s*([+*-])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
ANSWER = re.compile(r"^\s*The answer is (-?\d+)\s*$")


@dataclass(frozen=True)
class Chain:
    numbers: tuple     # the operands, left to right
    ops: tuple         # the operators between them, len(numbers) - 1

    def text(self):
        out = [str(self.numbers[0])]
        for op, n in zip(self.ops, self.numbers[1:]):
            out += [op, str(n)]
        return " ".join(out)


def apply(a, op, b):
    return a + b if op == "+" else a - b if op == "-" else a * b


def allowed(chain, i):
    """Whether the operation between numbers i and i+1 may be done next (precedence, then left to right)."""
    if chain.ops[i] == "*":
        return True
    return i == 0 and (len(chain.ops) == 1 or chain.ops[1] != "*")


def reduce(chain, i):
    """The chain with the operation between numbers i and i+1 done."""
    value = apply(chain.numbers[i], chain.ops[i], chain.numbers[i + 1])
    return Chain(chain.numbers[:i] + (value,) + chain.numbers[i + 2:], chain.ops[:i] + chain.ops[i + 1:])


def solution_steps(chain):
    """The demonstration's steps [(a, op, b, c)]: multiplications left to right, then the rest left to right."""
    steps = []
    while chain.ops:
        i = chain.ops.index("*") if "*" in chain.ops else 0
        a, op, b = chain.numbers[i], chain.ops[i], chain.numbers[i + 1]
        steps.append((a, op, b, apply(a, op, b)))
        chain = reduce(chain, i)
    return steps


def value_of(chain):
    return solution_steps(chain)[-1][3] if chain.ops else chain.numbers[0]


def demonstration(chain):
    steps = " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in solution_steps(chain))
    return f" {steps} The answer is {value_of(chain)}."


def prompt_of(chain):
    return f"{HUMAN} Work out {chain.text()} step by step.{ASSISTANT}"


def chain_of(prompt):
    """The chain a prompt of this task asks for; ValueError for any other prompt."""
    m = re.fullmatch(re.escape(HUMAN) + r" Work out ([-\d +*]+) step by step\." + re.escape(ASSISTANT), prompt)
    if not m:
        raise ValueError(f"not a prompt of the arithmetic-chain task: {prompt!r}")
    tokens = m.group(1).split()
    return Chain(tuple(int(t) for t in tokens[0::2]), tuple(tokens[1::2]))


def sample_chain(rng, n_numbers=None):
    """3 or 4 numbers of 1-9 with random operators (a draw of `rng` only: the main task's streams are untouched)."""
    n = n_numbers or rng.choice((3, 4))
    return Chain(tuple(rng.randint(1, 9) for _ in range(n)), tuple(rng.choice(OPS) for _ in range(n - 1)))


def sentences(response):
    """The reply split into sentences at '.', empty pieces dropped ("12." and "12" both give one sentence); a
    trailing EOS marker text (a sampled reply that ended keeps it) is not a sentence."""
    if response.endswith(EOS_TEXT):
        response = response[: -len(EOS_TEXT)]
    return [s.strip() for s in response.split(".") if s.strip()]


def step_labels(prompt, response):
    """[(step text, correct?)] for every sentence before the answer sentence (see the module docstring)."""
    return _label_steps(chain_of(prompt), response)[0]


def _label_steps(chain, response):
    """(step_labels, the chain left after the correct steps)."""
    labels, parts = [], sentences(response)
    if parts and ANSWER.match(parts[-1]):
        parts = parts[:-1]
    for text in parts:
        m = STEP.match(text)
        ok = False
        if m and chain.ops:
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            for i in range(len(chain.ops)):
                if (chain.numbers[i], chain.ops[i], chain.numbers[i + 1]) == (a, op, b) and allowed(chain, i) \
                        and apply(a, op, b) == c:
                    chain, ok = reduce(chain, i), True
                    break
        labels.append((text, ok))
    return labels, chain


def sentence_labels(prompt, response, ended):
    """[(sentence, correct?)] for every sentence: step_labels, then the answer sentence when the reply has one,
    correct iff the reply ended, the correct steps finished the expression and the answer is its value. All
    correct (and at least one sentence) iff gold_reward is 1.0: the labels a process reward model learns."""
    chain = chain_of(prompt)
    labels, left = _label_steps(chain, response)
    answer = final_answer(response)
    if answer is not None:
        labels.append((sentences(response)[-1], bool(ended) and not left.ops and answer == value_of(chain)))
    return labels


def sentence_ends(pieces):
    """The index of the token that ends each sentence (sentences() of "".join(pieces)): the one holding its closing
    '.', or the last token for a last sentence that no '.' closes. pieces: one text piece per token
    (tokenizer.decode_pieces). A process reward model is read at these tokens."""
    text = "".join(pieces)
    owner = [i for i, piece in enumerate(pieces) for _ in piece]           # the token of each character
    eos_at = len(text) - len(EOS_TEXT) if text.endswith(EOS_TEXT) else len(text)
    ends, open_sentence = [], False
    for c, ch in enumerate(text[:eos_at]):
        if ch == ".":
            if open_sentence:
                ends.append(owner[c])
            open_sentence = False
        elif not ch.isspace():
            open_sentence = True
    if open_sentence:
        ends.append(owner[eos_at - 1])
    return ends


def final_answer(response):
    parts = sentences(response)
    m = ANSWER.match(parts[-1]) if parts else None
    return int(m.group(1)) if m else None


def gold_reward(prompt, response, ended):
    """See the module docstring: 1.0, 0.5, -0.5, or 0.0 for a reply that did not end."""
    if not ended:
        return 0.0
    chain = chain_of(prompt)
    if final_answer(response) != value_of(chain):
        return -0.5
    labels = step_labels(prompt, response)
    right_process = len(labels) == len(chain.ops) and all(ok for _, ok in labels)
    return 1.0 if right_process else 0.5


def demonstrations(prompts):
    """[(prompt, the demonstration ending with EOS_TEXT)]: SFT's examples for this task (no noise: every one is right)."""
    return [(p, demonstration(chain_of(p)) + EOS_TEXT) for p in prompts]


def score_replies(prompts, texts, ended):
    """The task's metrics of n replies (texts, token-level EOS flags):
      answer_acc   the reply ended and its final answer is right
      step_acc     correct steps / all steps written (step_labels), over every reply
      process_acc  gold reward 1.0: every step right, none missing, and the answer right
      gold         mean gold reward;  ended  share that emitted EOS;  steps  mean steps written"""
    n_right = n_steps = 0
    answer, process, golds = [], [], []
    for p, t, e in zip(prompts, texts, ended):
        labels = step_labels(p, t)
        n_steps, n_right = n_steps + len(labels), n_right + sum(ok for _, ok in labels)
        g = gold_reward(p, t, e)
        golds.append(g)
        answer.append(g > 0)
        process.append(g == 1.0)
    n = max(len(golds), 1)
    return dict(answer_acc=sum(answer) / n, step_acc=n_right / max(n_steps, 1), process_acc=sum(process) / n,
                gold=sum(golds) / n, ended=sum(map(bool, ended)) / n, steps=n_steps / n)


def splits(seed, n_train=4000, n_val=200, n_test=500, n_rm=2000):
    """{"train", "val", "test", "rm"}: disjoint lists of distinct prompts, from their own random.Random(seed). "rm":
    prompts for the reward models' training replies, which SFT never sees (drawn after the others, so they
    leave train, val and test as they are)."""
    rng, seen, prompts = random.Random(f"arithmetic_chains/{seed}"), set(), []
    while len(prompts) < n_train + n_val + n_test + n_rm:
        p = prompt_of(sample_chain(rng))
        if p not in seen:
            seen.add(p)
            prompts.append(p)
    a, b, c = n_train, n_train + n_val, n_train + n_val + n_test
    return dict(train=prompts[:a], val=prompts[a:b], test=prompts[b:c], rm=prompts[c:])
