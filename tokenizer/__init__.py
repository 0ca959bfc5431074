"""
Tokenizers, both tiktoken `Encoding`s with two special tokens: EOS "<|endoftext|>" and PAD "<|pad|>" (PAD != EOS).

  toy   (default) byte-level BPE trained on the toy task's text by this file; the ranks are shipped in
        tokenizer/toy.tiktoken (beside this file), so nothing is downloaded. ~1k tokens, so the tiny GPT's embedding is small.
  gpt2  tiktoken's GPT-2 encoding (50257 tokens) plus <|pad|> = 50257. tiktoken downloads it once into its
        cache; offline and uncached this fails with a one-line message saying how to get it.

Retrain the toy ranks (only needed after changing data.py's wording):
    python -m tokenizer                 # writes tokenizer/toy.tiktoken and prints a round-trip check

Below the tokenizer: the shapes every stage feeds the model. Prompts left-padded for sampling (encode_prompts),
prompt + response examples with a loss mask on the response (build_sft_example, encode_demos: SFT's
demonstrations, PPO-ptx's, DPO's pair halves), their right-padded batches (collate), and prompts cut from the
left to fit the context (fit_prompt), counted for one summary line per stage (TRUNCATIONS).

Why PAD != EOS: if they were the same id, an attention mask built from "token != PAD" would hide every
real EOS the policy emits, and the reward model could not see whether an answer ended (Secrets of RLHF
notes §3.2; TRL PR #5303).
"""
import base64
import codecs
import hashlib
import os
import sys
from collections import Counter

import tiktoken
import torch

import data
from data import regular_file


EOS_TEXT, PAD_TEXT = "<|endoftext|>", "<|pad|>"
TOY_RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy.tiktoken")
# GPT-2's pre-tokenisation regex (the same string tiktoken's gpt2 encoding uses): words, numbers,
# punctuation runs and spaces are split apart before BPE, so merges never cross a word boundary.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TOY_MERGES = 1000  # upper bound; training stops earlier when no pair occurs twice


def train_bpe(text, n_merges=TOY_MERGES):
    """
    Byte-level BPE: start from the 256 single bytes, repeatedly merge the most frequent adjacent pair.
    Returns {token_bytes: rank}; rank = merge order, which is exactly what tiktoken's encoder applies
    (it always merges the adjacent pair whose concatenation has the lowest rank).
    """
    import regex  # tiktoken's own dependency; supports the \p{L} classes of GPT2_PAT
    ranks = {bytes([i]): i for i in range(256)}
    words = Counter(regex.findall(GPT2_PAT, text))  # pre-token -> count
    seqs = {w: [bytes([b]) for b in w.encode("utf-8")] for w in words}  # pre-token -> current pieces
    for _ in range(n_merges):
        pairs = Counter()
        for w, pieces in seqs.items():
            for a, b in zip(pieces, pieces[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # ties broken deterministically
        if count < 2:
            break
        ranks[a + b] = len(ranks)
        for w, pieces in seqs.items():  # apply the merge everywhere
            i, out = 0, []
            while i < len(pieces):
                if i + 1 < len(pieces) and pieces[i] == a and pieces[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            seqs[w] = out
    return ranks


def save_ranks(ranks, path):
    """tiktoken's ranks file format: one "base64(token bytes) rank" per line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"                                  # whole or not at all
    try:
        with open(tmp, "w") as f:
            for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
        os.replace(tmp, path)
    except BaseException:                                             # a failed write leaves no temporary file
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_ranks(path):
    """The ranks file back as {token_bytes: rank}; a damaged file is a one-line error naming the line."""
    ranks, fix = {}, "restore it with `git checkout tokenizer/toy.tiktoken`, or retrain it with `python -m tokenizer`"
    if regular_file(path, "the tokenizer's ranks file") > 64 << 20:
        raise ValueError(f"{path}: over 64 MB, too large for a ranks file; the tokenizer file is damaged: {fix}")
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:  # wrong field count, bad base64, a rank that is not a number
                raise ValueError(f"{path}:{number}: not a 'base64-token rank' line ({line[:40]!r}); the tokenizer "
                                 f"file is damaged: {fix}") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
        raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1} once each over all 256 bytes; the tokenizer "
                         f"file is damaged: {fix}")
    return ranks


def get_tokenizer(name="toy"):
    """A tiktoken Encoding with EOS and PAD special tokens; `name` is "toy" or "gpt2"."""
    if name == "toy":
        if not os.path.lexists(TOY_RANKS):
            raise FileNotFoundError(f"{TOY_RANKS} is missing; run `python -m tokenizer` to train it")
        ranks = load_ranks(TOY_RANKS)
        n = len(ranks)
        return tiktoken.Encoding(name="toy", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                                 special_tokens={EOS_TEXT: n, PAD_TEXT: n + 1})
    if name == "gpt2":
        try:
            base = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline: a requests/urllib error from deep inside tiktoken
            raise FileNotFoundError(
                f"could not load tiktoken's 'gpt2' encoding ({type(e).__name__}); it is downloaded once into "
                f"tiktoken's cache: run `TIKTOKEN_CACHE_DIR=tiktoken_cache python -c \"import tiktoken; "
                f"tiktoken.get_encoding('gpt2')\"` on a machine with internet, copy the tiktoken_cache folder here "
                f"and set TIKTOKEN_CACHE_DIR to it (default cache: $TMPDIR/data-gym-cache); or use --tokenizer toy"
            ) from None
        return tiktoken.Encoding(name="gpt2", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                 special_tokens={EOS_TEXT: base.eot_token, PAD_TEXT: base.n_vocab})
    raise ValueError(f"unknown tokenizer {name!r}; expected 'toy' or 'gpt2'")


def eos_id(enc):
    return enc.encode_single_token(EOS_TEXT)


def pad_id(enc):
    return enc.encode_single_token(PAD_TEXT)


def tokenizer_id(enc):
    """Identity stored in checkpoints: name + hash of the vocabulary, so a mismatch is caught on load."""
    h = hashlib.sha256()
    for tok, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(tok + rank.to_bytes(4, "little"))
    return f"{enc.name}-{enc.n_vocab}-{h.hexdigest()[:12]}"


def encode(enc, text):
    """Text -> ids; the EOS marker in text becomes the EOS token (so data.py's response strings round-trip)."""
    return enc.encode(text, allowed_special={EOS_TEXT}, disallowed_special=())


def decode(enc, ids):
    """Ids -> text, PAD tokens dropped (EOS stays as its marker text, as data.gold_reward expects)."""
    pad = pad_id(enc)
    return enc.decode([i for i in ids if i != pad])


def decode_replies(enc, rows):
    """Sampled response rows (lists of ids, PAD after EOS) -> data.Replies: each row's text (decode) and whether it
    holds the EOS token, the token-level end flag (eleven ordinary tokens spelling EOS_TEXT are not an end)."""
    eos = eos_id(enc)
    return data.Replies([decode(enc, r) for r in rows], [eos in r for r in rows])


def decode_pieces(enc, ids):
    """Ids -> one text piece per id, joining to enc.decode(ids): a character whose bytes span several tokens goes
    to the token that completes it (the others get ""), and bytes that are not UTF-8 become U+FFFD, so every piece
    is printable text (the per-token views colour these)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(enc.decode_single_token_bytes(i)) for i in ids]
    if pieces:
        pieces[-1] += decoder.decode(b"", final=True)                   # an unfinished character at the end
    return pieces


# ----------------------------------------------------------------------------------------------------
# Prompts and demonstrations as padded batches of ids


def pad_batch(seqs, pad_id, left):
    """List of id lists -> (ids (B, T), mask (B, T)) padded with pad_id on the left or right."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)                 # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)                       # (B, T)
    for i, s in enumerate(seqs):
        span = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


class Truncations:
    """
    Counts the prompts fit_prompt cut, so that a stage prints one summary (truncation_summary) instead of one
    warning per prompt: a real HH-RLHF file makes thousands. `each=True` (a stage's --log_truncations) also
    prints one line per cut prompt. A prompt cut twice (PPO draws prompts again) counts twice.
    """

    def __init__(self):
        self.reset()

    def reset(self, each=False):
        """Start counting from zero (a stage calls this first, with its --log_truncations)."""
        self.each, self.count, self.longest, self.longest_after = each, 0, 0, 0

    def add(self, before, after, where):
        self.count += 1
        if before > self.longest:
            self.longest, self.longest_after = before, after
        if self.each:
            print(f"warning: {where}: prompt truncated from the left, {before} -> {after} tokens", file=sys.stderr)


    def summary(self, stage):
        """One warning line for the stage's truncated prompts (nothing when none was cut)."""
        if self.count:
            print(f"warning: {stage}: {self.count} prompt(s) truncated from the left to fit the context (longest "
                  f"{self.longest} -> {self.longest_after} tokens)" + ("" if self.each else
                  "; --log_truncations true lists each"), file=sys.stderr)


TRUNCATIONS = Truncations()  # the running stage's count: TRUNCATIONS.reset(...) at its start, .summary(...) at its end


def fit_prompt(prompt_ids, room, truncate, where):
    """
    Make a prompt fit in `room` tokens. Policy: drop tokens from the LEFT (the oldest context), counted in
    TRUNCATIONS for the stage's summary, or, with truncate=False, raise an error naming `where`.
    """
    if len(prompt_ids) <= room:
        return prompt_ids
    if room <= 0 or not truncate:
        raise ValueError(f"{where}: prompt has {len(prompt_ids)} tokens but only {room} fit in the context "
                         f"(block_size minus the response); use a shorter prompt or allow truncation")
    TRUNCATIONS.add(len(prompt_ids), room, where)
    return prompt_ids[-room:]


def encode_prompts(enc, prompts, room, truncate):
    """Prompt strings -> left-padded (ids (B, Tp), mask (B, Tp)), each cut from the left to `room` tokens."""
    return pad_batch([fit_prompt(encode(enc, p), room, truncate, f"prompt {p[:40]!r}") for p in prompts],
                     pad_id(enc), left=True)


def build_sft_example(prompt_ids, response_ids):
    """ids = prompt + response (response ends with EOS); loss_mask[i] = 1 iff ids[i] is a response token."""
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def encode_demos(enc, pairs, block_size, truncate=True):
    """[(prompt, response)] -> [(ids, loss_mask)]; a prompt too long for block_size is cut from the left
    (truncate=True, with a warning) or is an error naming the demonstration."""
    out = []
    for i, (p, r) in enumerate(pairs):
        resp = encode(enc, r)[: 3 * block_size // 4]   # a (real-data) response this long is cut off
        prompt = fit_prompt(encode(enc, p), block_size - len(resp), truncate, f"demonstration {i}")
        out.append(build_sft_example(prompt, resp))
    return out


def collate(examples, pad_id, device):
    """[(ids, loss_mask)] -> ids, attention mask, loss mask, each (B, T), right-padded."""
    ids, mask = pad_batch([e[0] for e in examples], pad_id, left=False)   # (B, T), (B, T)
    loss_mask, _ = pad_batch([e[1] for e in examples], 0, left=False)     # (B, T)
    return ids.to(device), mask.to(device), loss_mask.to(device)
