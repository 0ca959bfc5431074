import pytest
import tiktoken

import data
import tokenizer as tok


def test_roundtrip_and_special_tokens():
    """Toy text, including the EOS marker, encodes and decodes back exactly; EOS and PAD are distinct single tokens."""
    enc = tok.get_tokenizer("toy")
    assert isinstance(enc, tiktoken.Encoding)
    text = data.make_prompt("What is 7 plus 5?") + " Sure! The answer is 12." + data.EOS_TEXT
    ids = tok.encode(enc, text)
    assert tok.decode(enc, ids) == text
    assert ids[-1] == tok.eos_id(enc) != tok.pad_id(enc)
    assert tok.decode(enc, ids + [tok.pad_id(enc)] * 3) == text  # PAD dropped on decode
    assert enc.n_vocab == tok.pad_id(enc) + 1
    assert tok.decode(enc, tok.encode(enc, "unseen wörds ✓")) == "unseen wörds ✓"  # byte fallback


def test_shipped_ranks_are_what_the_script_trains():
    """tokenizer/toy.tiktoken is reproduced exactly by train_bpe on the toy corpus (the file is not hand-made)."""
    ranks = tok.train_bpe(data.corpus_text(seed=0))
    assert ranks == tok.load_ranks(tok.TOY_RANKS)
    assert 300 <= len(ranks) - 256 <= 2000


def test_gpt2_offline_error_is_one_clear_line(monkeypatch):
    """When tiktoken cannot fetch GPT-2's encoding, the error is one line that says what to do."""
    def offline(name):
        raise ConnectionError("Max retries exceeded with url: https://openaipublic.blob.core.windows.net/...")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(FileNotFoundError) as e:
        tok.get_tokenizer("gpt2")
    msg = str(e.value)
    assert "\n" not in msg and "gpt2" in msg and "--tokenizer toy" in msg


def test_unknown_tokenizer():
    """An unknown tokenizer name is a ValueError naming the choices."""
    with pytest.raises(ValueError, match="toy"):
        tok.get_tokenizer("bert")
