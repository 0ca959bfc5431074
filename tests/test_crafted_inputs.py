"""
Every loader against the crafted-file corpus (tests/crafted/, written by tests/crafted/make_corpus.py): each
damaged or hostile file is one line naming the file, never a traceback, a hang, or code from the file running;
anything that is not a regular file (a FIFO, a folder) is refused before it is opened.
"""
import os
import signal

import pytest

import tokenizer
from data import load_hh_jsonl
from runs import load_checkpoint, load_gpt2
from studies import report

CRAFTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crafted")
# corpus entry -> the words its one-line error must hold
CORPUS = {
    "st_empty.safetensors": "too short to be a safetensors file",
    "st_huge_header.safetensors": "header length 4611686018427387904 does not fit the file",
    "st_header_longer_than_file.safetensors": "header length 4096 does not fit the file (16 bytes)",
    "st_header_not_json.safetensors": "the header is not JSON",
    "st_header_is_a_list.safetensors": "the header is not a JSON object",
    "st_header_deeply_nested.safetensors": "the header is not JSON",
    "st_unknown_dtype.safetensors": "dtype 'F8_E9', which this reader does not know",
    "st_negative_shape.safetensors": "shape [-1, 4] is not a list of sizes >= 0",
    "st_shape_not_a_list.safetensors": "shape '4' is not a list of sizes >= 0",
    "st_offsets_past_the_end.safetensors": "ends at byte 4398046511104 but the data has 16",
    "st_offsets_reversed.safetensors": "data_offsets [16, 0] are not [begin, end]",
    "st_shape_and_bytes_differ.safetensors": "shape [100, 100] does not match its 16 bytes",
    "st_entry_not_an_object.safetensors": "not a {dtype, shape, data_offsets} entry",
    "st_no_wte.safetensors": "no 'wte.weight'",
    "st_wte_is_1d.safetensors": "must be 2-D",
    "st_block_name_not_a_number.safetensors": "unknown parameter 'transformer.h.x.ln_1.weight'",
    "st_missing_a_block_tensor": "parameter 'h.0.ln_1.weight' is missing for a 1-layer GPT-2",
    "st_block_9999": "more than 1024 blocks is not a GPT-2 checkpoint",
    "st_wrong_shape": "parameter 'h.0.mlp.c_fc.bias' is of shape (3,)",
    "bin_a_tensor.bin": "holds Tensor, not a state dict",
    "bin_a_list.bin": "holds list, not a state dict",
    "bin_not_tensors.bin": "holds dict, not a state dict",
    "bin_code_pickle.bin": "refused (no code in it runs)",
    "bin_text.bin": "cannot be read as a PyTorch state dict of plain tensors",
    "cfg_not_json": "config.json: not JSON",
    "cfg_a_list": "config.json: not a JSON object",
    "cfg_n_head_text": "config.json: n_head '1' must be a whole number",
    "cfg_n_head_zero": "config.json: n_head 0 must be",
    "cfg_no_n_head": "config.json: n_head None must be",
    "cfg_n_head_not_dividing": "n_head 3 must be a whole number >= 1 that divides the width 4",
    "cfg_n_embd_differs": "n_embd 8, but the weights have 4",
    "cfg_relu": "activation 'relu'",
    "cfg_eps_text": "layer_norm_epsilon '1e-5'",
    "cfg_deeply_nested": "config.json: not JSON",
    "ckpt_empty.pt": "cannot be read as a checkpoint of this project (EOFError)",
    "ckpt_text.pt": "cannot be read as a checkpoint of this project",
    "ckpt_truncated.pt": "cannot be read as a checkpoint of this project",
    "ckpt_code_pickle.pt": "cannot be read as a checkpoint of this project (UnpicklingError)",
    "ckpt_a_list.pt": "no 'stage' field",
    "ckpt_no_stage.pt": "no 'stage' field",
    "ckpt_missing_model_config.pt": "missing model_config",
    "ckpt_step_is_text.pt": "step (str, not int)",
    "ckpt_model_is_a_list.pt": "model (list, not dict)",
    "ckpt_model_config_is_text.pt": "model_config (str, not dict)",
    "ckpt_n_head_changed.pt": "does not match the checksum",
    "ckpt_pad_id_changed.pt": "does not match the checksum",
    "ckpt_weights_changed.pt": "does not match the checksum",
    "ckpt_tokenizer_id_changed.pt": "does not match the checksum",
    "ckpt_unknown_model_config_field.pt": "unknown fields ['n_experts']",
    "ckpt_n_head_is_text.pt": "model_config n_head='1' must be int",
    "ckpt_negative_vocab.pt": "model_config vocab_size=-1 must be int",
    "ckpt_huge_width.pt": "the weights do not have the shapes model_config implies",
    "ckpt_pad_id_past_vocab.pt": "pad_id=8 do not fit together",
    "ckpt_weights_of_another_shape.pt": "'wte.weight', (8, 5) stored, (8, 4) expected",
    "ckpt_unknown_tokenizer.pt": "its tokenizer cannot be built: unknown tokenizer 'bpe9'",
    "log_garbage_line": "ppo_log.jsonl:2: not a line of JSON",
    "log_a_list_line": "ppo_log.jsonl:2: not a JSON object",
    "log_iter_is_text": "ppo_log.jsonl:1: no iteration number ('iter')",
    "log_gold_is_text": "ppo_log.jsonl:2: 'gold' is not a number",
    "log_deeply_nested": "ppo_log.jsonl:2: not a line of JSON",
    "log_not_utf8": "ppo_log.jsonl:2: not a line of JSON",
    "samples_per_token_too_short": "ppo_samples.jsonl:1: per_token 'k1' must hold one number (or null) per token",
    "samples_no_prompt": "ppo_samples.jsonl:1: 'sample' and 'prompt' must be text",
    "samples_tokens_not_text": "ppo_samples.jsonl:1: 'tokens' must be a list of text",
    "samples_value_is_text": "ppo_samples.jsonl:1: per_token 'k1' must hold one number",
    "hh_lone_surrogate.jsonl": "hh_lone_surrogate.jsonl:2: field 'rejected' holds '\\ud800' at character 31",
    "hh_deeply_nested.jsonl": ":1: JSON nested too deeply",
    "hh_not_utf8.jsonl": ":1: not UTF-8 text",
    "hh_a_list_line.jsonl": ":1: expected a JSON object with 'chosen' and 'rejected'",
    "hh_no_rejected.jsonl": ":1: field 'rejected' is missing or not a string",
    "hh_numbers.jsonl": ":1: field 'chosen' is missing or not a string",
    "hh_empty.jsonl": "no usable records (the file is empty)",
    "hh_not_gzip.jsonl.gz": "cannot be read (",
    "hh_truncated.jsonl.gz": "cannot be read (Compressed file ended",
    "hh_no_assistant_turn.jsonl": "no usable records: all 1 skipped",
    "ranks_bad_base64.tiktoken": ":1: not a 'base64-token rank' line",
    "ranks_too_few.tiktoken": "the ranks are not 0..9 once each over all 256 bytes",
    "ranks_rank_twice.tiktoken": "the ranks are not 0..256 once each",
    "ranks_binary.tiktoken": ":1: not a 'base64-token rank' line",
    "ranks_rank_not_a_number.tiktoken": ":6: not a 'base64-token rank' line",
}


def loader(name, tmp_path):
    """The loader that reads a corpus entry, by its prefix."""
    kind = name.split("_")[0]
    return {"st": load_gpt2, "bin": load_gpt2, "cfg": load_gpt2, "ckpt": lambda p: load_checkpoint(p, None),
            "log": lambda p: report.report([p], str(tmp_path / "page.html")),
            "samples": lambda p: report.report([p], str(tmp_path / "page.html")),
            "hh": load_hh_jsonl, "ranks": tokenizer.load_ranks}[kind]


def test_the_corpus_is_the_one_the_table_describes():
    assert sorted(CORPUS) == sorted(n for n in os.listdir(CRAFTED) if n not in ("make_corpus.py", "bad_inputs.py", "__init__.py",
                                                                                   "__pycache__"))


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_each_crafted_file_is_one_line_naming_it(name, tmp_path):
    path = os.path.join(CRAFTED, name)
    marker = "/tmp/crafted_pickle_ran"                 # what the code-carrying pickles would write
    if os.path.exists(marker):
        os.remove(marker)
    signal.alarm(60)                                    # a hang fails the test instead of blocking the suite
    try:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            loader(name, tmp_path)(path)
    finally:
        signal.alarm(0)
    message = str(e.value)
    assert "\n" not in message and path in message and CORPUS[name] in message, message
    assert "weights_only" not in message and not os.path.exists(marker)


@pytest.mark.parametrize("kind", ["st", "bin", "ckpt", "log", "hh", "ranks"])
def test_a_fifo_or_a_folder_is_refused_before_it_is_opened(kind, tmp_path):
    """A FIFO would block the reader forever (nothing writes into it); a folder fails late. Both are refused by
    what they are, before anything opens them."""
    suffix = {"st": ".safetensors", "bin": ".bin", "ckpt": ".pt", "log": "", "hh": ".jsonl", "ranks": ".tiktoken"}[kind]
    fifo, folder = tmp_path / f"fifo{suffix}", tmp_path / f"folder{suffix}"
    os.mkfifo(fifo)
    folder.mkdir()
    if kind == "log":                                   # the report reads a run folder's files
        os.mkdir(tmp_path / "run")
        os.mkfifo(tmp_path / "run" / "ppo_log.jsonl")
        fifo = tmp_path / "run"
    signal.alarm(30)
    try:
        for path, what in ((fifo, "a FIFO (named pipe)"), (folder, "a folder")):
            if kind == "log" and what == "a folder":
                os.rmdir(folder)
                os.mkdir(tmp_path / "run2")
                os.mkdir(tmp_path / "run2" / "ppo_log.jsonl")
                path = tmp_path / "run2"
            if kind in ("st", "bin") and what == "a folder":
                continue                                # a folder is where load_gpt2 looks for model.safetensors
            with pytest.raises((ValueError, FileNotFoundError)) as e:
                loader(f"{kind}_x", tmp_path)(str(path))
            assert f"is {what}" in str(e.value) or "no run here" in str(e.value), str(e.value)
    finally:
        signal.alarm(0)
