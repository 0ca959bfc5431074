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


def test_an_end_marker_spelled_by_ordinary_tokens_is_not_an_end():
    """The audit's hole: eleven ordinary tokens that spell "<|endoftext|>" decode to the same text as the EOS token,
    but decode_replies reads the end from the token, so the gold reward charges the missing end and the verifier
    says 0; the EOS token itself ends the reply."""
    enc = tok.get_tokenizer("toy")
    prompt = data.make_prompt("What is 7 plus 5?")
    body = tok.encode(enc, " The answer is 12.")
    spelled = enc.encode("<|endoftext|>", disallowed_special=())          # ordinary tokens, not the special one
    assert len(spelled) > 1 and tok.eos_id(enc) not in spelled
    rows = [body + spelled, body + [tok.eos_id(enc)] + [tok.pad_id(enc)] * 2]
    replies = tok.decode_replies(enc, rows)
    assert replies.texts[0] == replies.texts[1] == " The answer is 12.<|endoftext|>"  # the same text ...
    assert replies.ended == [False, True]                                  # ... but only one ended
    assert replies.golds([prompt, prompt]) == [0.0, 1.0]
    assert data.rule_rewards("verifier", [prompt] * 2, replies.texts, replies.ended) == [0.0, 1.0]
