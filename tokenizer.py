"""
Tokenizers, both tiktoken `Encoding`s with two special tokens: EOS "<|endoftext|>" and PAD "<|pad|>" (PAD != EOS).

  toy   (default) byte-level BPE trained on the toy task's text by this file; the ranks are shipped in
        tokenizer/toy.tiktoken, so nothing is downloaded. ~1k tokens, so the tiny GPT's embedding is small.
  gpt2  tiktoken's GPT-2 encoding (50257 tokens) plus <|pad|> = 50257. tiktoken downloads it once into its
        cache; offline and uncached this fails with a one-line message saying how to get it.

Retrain the toy ranks (only needed after changing data.py's wording):
    python tokenizer.py                 # writes tokenizer/toy.tiktoken and prints a round-trip check

Why PAD != EOS: if they were the same id, an attention mask built from "token != PAD" would hide every
real EOS the policy emits, and the reward model could not see whether an answer ended (Secrets of RLHF
notes §3.2; TRL PR #5303).
"""
import base64
import codecs
import hashlib
import os
from collections import Counter

import tiktoken

import data

EOS_TEXT, PAD_TEXT = "<|endoftext|>", "<|pad|>"
TOY_RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer", "toy.tiktoken")
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
    from utils import replaced
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replaced(path) as f:                                          # whole or not at all
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")


def load_ranks(path):
    """The ranks file back as {token_bytes: rank}; a damaged file is a one-line error naming the line."""
    ranks, fix = {}, "restore it with `git checkout tokenizer/toy.tiktoken`, or retrain it with `python tokenizer.py`"
    from utils import regular_file
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
            raise FileNotFoundError(f"{TOY_RANKS} is missing; run `python tokenizer.py` to train it")
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


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Train the toy BPE on the toy task's corpus and write its ranks file.")
    p.add_argument("--out", default=TOY_RANKS, help=f"ranks file to write (default: {TOY_RANKS}, the shipped one)")
    out = p.parse_args(argv).out
    if os.path.lexists(out):
        from utils import regular_file
        regular_file(out, "--out")
    text = data.corpus_text(seed=0)
    ranks = train_bpe(text)
    save_ranks(ranks, out)
    if out != TOY_RANKS:
        print(f"wrote {out}: {len(ranks)} ranks ({len(ranks) - 256} merges)")
        return
    enc = get_tokenizer("toy")
    sample = data.make_prompt("What is the capital of Zorbia?") + " Sure! The capital of Zorbia is Velmar." + EOS_TEXT
    ids = encode(enc, sample)
    assert decode(enc, ids) == sample
    print(f"wrote {TOY_RANKS}: {len(ranks)} ranks ({len(ranks) - 256} merges), n_vocab={enc.n_vocab} with EOS/PAD")
    print(f"corpus: {len(text):,} chars -> {len(encode(enc, text)):,} tokens")
    print(f"{len(ids)} tokens: {[enc.decode([i]) for i in ids]}")


if __name__ == "__main__":
    from utils import run_main
    run_main(main)
