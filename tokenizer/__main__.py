"""python -m tokenizer: train the toy BPE on the toy task's corpus and write its ranks file (tokenizer/toy.tiktoken)."""
import os

import data
from data import regular_file
from runs import run_main
from tokenizer import EOS_TEXT, TOY_RANKS, decode, encode, get_tokenizer, save_ranks, train_bpe


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Train the toy BPE on the toy task's corpus and write its ranks file.")
    p.add_argument("--out", default=TOY_RANKS, help=f"ranks file to write (default: {TOY_RANKS}, the shipped one)")
    out = p.parse_args(argv).out
    if os.path.lexists(out):
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
    run_main(main)
