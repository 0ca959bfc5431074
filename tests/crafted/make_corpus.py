"""
Writes the crafted-file corpus in this folder: damaged and hostile versions of every kind of file a loader of
this project reads (GPT-2 safetensors / .bin / config.json, checkpoints, run logs and samples files, HH-RLHF files,
tokenizer ranks). tests/test_crafted_inputs.py feeds each file to its loader and expects one line naming the file
(never a traceback, a hang or code running); CORPUS there says which loader reads which file and the words its
error must hold. The files are committed; run this again only to change them:

    python -m tests.crafted.make_corpus
"""
import base64
import gzip
import io
import json
import os
import pickle
import struct

import torch

from runs import model_sha256, save_checkpoint
from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
MICRO = dict(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4, dropout=0.0, bias=True, pad_id=7)


def write(name, data):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(header, data=b"", raw_header=None):
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def tensor_entry(shape, begin, dtype="F32"):
    n = 4
    for d in shape:
        n *= d
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + n]}


class Evil:
    """A pickle that would run a shell command when unpickled without weights_only (it never runs here)."""
    def __reduce__(self):
        return (os.system, ("echo crafted-pickle-ran > /tmp/crafted_pickle_ran",))


def gpt2_safetensors(extra=None, drop=(), n_layer=1):
    """A valid micro GPT-2 safetensors file (HF names), with `extra` tensors added and `drop` names removed."""
    model = GPT(GPTConfig(**{**MICRO, "n_layer": n_layer, "pad_id": -1}))
    tensors = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            v = v.t()
        tensors[f"transformer.{k}"] = v.contiguous()
    tensors.update(extra or {})
    header, data = {}, b""
    for k, v in tensors.items():
        if k in drop:
            continue
        raw = v.numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return safetensors(header, data)


def main():
    # --- GPT-2 safetensors (runs.load_gpt2)
    write("st_empty.safetensors", b"")
    write("st_huge_header.safetensors", struct.pack("<Q", 1 << 62) + b"{}")
    write("st_header_longer_than_file.safetensors", struct.pack("<Q", 4096) + b'{"a": 1}')
    write("st_header_not_json.safetensors", safetensors(None, raw_header=b"\x00\xff not json"))
    write("st_header_is_a_list.safetensors", safetensors([1, 2, 3]))
    write("st_header_deeply_nested.safetensors", safetensors(None, raw_header=b"[" * 10_000 + b"]" * 10_000))
    write("st_unknown_dtype.safetensors", safetensors({"w": {"dtype": "F8_E9", "shape": [1], "data_offsets": [0, 1]}},
                                                       b"\x00"))
    write("st_negative_shape.safetensors", safetensors({"w": {"dtype": "F32", "shape": [-1, 4],
                                                               "data_offsets": [0, 16]}}, b"\x00" * 16))
    write("st_shape_not_a_list.safetensors", safetensors({"w": {"dtype": "F32", "shape": "4",
                                                                 "data_offsets": [0, 16]}}, b"\x00" * 16))
    write("st_offsets_past_the_end.safetensors", safetensors({"w": tensor_entry([1 << 40], 0)}, b"\x00" * 16))
    write("st_offsets_reversed.safetensors", safetensors({"w": {"dtype": "F32", "shape": [0],
                                                                 "data_offsets": [16, 0]}}, b"\x00" * 16))
    write("st_shape_and_bytes_differ.safetensors", safetensors({"w": {"dtype": "F32", "shape": [100, 100],
                                                                       "data_offsets": [0, 16]}}, b"\x00" * 16))
    write("st_entry_not_an_object.safetensors", safetensors({"w": 3}))
    write("st_no_wte.safetensors", gpt2_safetensors(drop=("transformer.wte.weight",)))
    write("st_wte_is_1d.safetensors", gpt2_safetensors(extra={"transformer.wte.weight": torch.zeros(32)}))
    write("st_block_name_not_a_number.safetensors", gpt2_safetensors(extra={"transformer.h.x.ln_1.weight": torch.zeros(4)}))
    # folders st_*/ with a config.json, so that the weights reach the shape checks
    for name, weights in [("missing_a_block_tensor", gpt2_safetensors(drop=("transformer.h.0.ln_1.weight",))),
                          ("block_9999", gpt2_safetensors(extra={"transformer.h.9999.ln_1.weight": torch.zeros(4)})),
                          ("wrong_shape", gpt2_safetensors(extra={"transformer.h.0.mlp.c_fc.bias": torch.zeros(3)}))]:
        os.makedirs(os.path.join(HERE, f"st_{name}"), exist_ok=True)
        write(f"st_{name}/model.safetensors", weights)
        write(f"st_{name}/config.json", '{"n_head": 1}')
    # --- GPT-2 .bin (torch.load with weights_only)
    buf = io.BytesIO()
    torch.save(torch.zeros(3), buf)
    write("bin_a_tensor.bin", buf.getvalue())
    buf = io.BytesIO()
    torch.save([torch.zeros(3)], buf)
    write("bin_a_list.bin", buf.getvalue())
    buf = io.BytesIO()
    torch.save({"wte.weight": 3}, buf)
    write("bin_not_tensors.bin", buf.getvalue())
    write("bin_code_pickle.bin", pickle.dumps(Evil()))
    write("bin_text.bin", "this is not a state dict\n")
    # --- config.json beside valid micro weights (folders cfg_*/ with model.safetensors + config.json)
    good = gpt2_safetensors()
    for name, text in [("not_json", "{n_head: 1"), ("a_list", "[1]"), ("n_head_text", '{"n_head": "1"}'),
                       ("n_head_zero", '{"n_head": 0}'), ("no_n_head", '{"n_embd": 4}'),
                       ("n_head_not_dividing", '{"n_head": 3}'), ("n_embd_differs", '{"n_head": 1, "n_embd": 8}'),
                       ("relu", '{"n_head": 1, "activation_function": "relu"}'),
                       ("eps_text", '{"n_head": 1, "layer_norm_epsilon": "1e-5"}'),
                       ("deeply_nested", '{"n_head": ' + "[" * 10_000 + "]" * 10_000 + "}")]:
        os.makedirs(os.path.join(HERE, f"cfg_{name}"), exist_ok=True)
        write(f"cfg_{name}/model.safetensors", good)
        write(f"cfg_{name}/config.json", text)
    # --- checkpoints (runs.load_checkpoint)
    model = GPT(GPTConfig(**MICRO))
    path = os.path.join(HERE, "ckpt_valid_micro.pt")
    save_checkpoint(path, stage="sft", model=model.state_dict(), model_config=dict(MICRO), tokenizer="toy",
                    tokenizer_id="toy-8-000000000000", step=1, done=True, metrics={}, config={"seed": 0})
    valid = torch.load(path, weights_only=True)
    os.remove(path)                                            # the corpus holds only bad files

    def ckpt(name, **changes):
        c = {**valid, **changes}
        write(f"ckpt_{name}.pt", _saved(c))

    def resigned(c):                                           # a hand edit that also recomputed the checksum
        c = dict(c)
        c["model_sha256"] = {"model": model_sha256(c, "model")}
        return c

    write("ckpt_empty.pt", b"")
    write("ckpt_text.pt", "not a checkpoint\n")
    whole = _saved(valid)
    write("ckpt_truncated.pt", whole[:len(whole) // 2])
    write("ckpt_code_pickle.pt", pickle.dumps(Evil()))
    write("ckpt_a_list.pt", _saved([1, 2, 3]))
    write("ckpt_no_stage.pt", _saved({k: v for k, v in valid.items() if k != "stage"}))
    write("ckpt_missing_model_config.pt", _saved({k: v for k, v in valid.items() if k != "model_config"}))
    ckpt("step_is_text", step="1")
    ckpt("model_is_a_list", model=[1])
    ckpt("model_config_is_text", model_config="n_layer=1")
    ckpt("n_head_changed", model_config={**MICRO, "n_head": 2})
    ckpt("pad_id_changed", model_config={**MICRO, "pad_id": 3})
    ckpt("weights_changed", model={**valid["model"], "ln_f.bias": torch.ones(4)})
    ckpt("tokenizer_id_changed", tokenizer_id="toy-8-ffffffffffff")
    write("ckpt_unknown_model_config_field.pt", _saved(resigned({**valid, "model_config": {**MICRO, "n_experts": 8}})))
    write("ckpt_n_head_is_text.pt", _saved(resigned({**valid, "model_config": {**MICRO, "n_head": "1"}})))
    write("ckpt_negative_vocab.pt", _saved(resigned({**valid, "model_config": {**MICRO, "vocab_size": -1}})))
    write("ckpt_huge_width.pt", _saved(resigned({**valid, "model_config": {**MICRO, "n_embd": 65536}})))
    write("ckpt_pad_id_past_vocab.pt", _saved(resigned({**valid, "model_config": {**MICRO, "pad_id": 8}})))
    write("ckpt_weights_of_another_shape.pt", _saved(resigned({**valid, "model": {**valid["model"],
                                                                                  "wte.weight": torch.zeros(8, 5)}})))
    write("ckpt_unknown_tokenizer.pt", _saved(resigned({**valid, "tokenizer": "bpe9"})))
    # --- run logs and samples files (studies.report), each in a folder of its own
    good_row = json.dumps({"iter": 1, "gold": 0.5, "score_raw": 1.0}) + "\n"
    sample = {"iter": 1, "sample": "best", "prompt": "p", "rm_score": 1.0, "gold": 0.1, "tokens": ["a", "b"],
              "per_token": {"k1": [0.1, 0.2]}}
    logs = {"log_garbage_line": good_row + "{not json\n" + good_row,
            "log_a_list_line": good_row + "[1, 2]\n",
            "log_iter_is_text": json.dumps({"iter": "one"}) + "\n",
            "log_gold_is_text": good_row + json.dumps({"iter": 2, "gold": "high"}) + "\n",
            "log_deeply_nested": good_row + "[" * 10_000 + "]" * 10_000 + "\n",
            "log_not_utf8": good_row + '{"iter": 2, "gold": "\xff"}\n'}
    for name, text in logs.items():
        os.makedirs(os.path.join(HERE, name), exist_ok=True)
        write(f"{name}/ppo_log.jsonl", text.encode("latin-1") if name == "log_not_utf8" else text)
    samples = {"samples_per_token_too_short": {**sample, "per_token": {"k1": [0.1]}},
               "samples_no_prompt": {k: v for k, v in sample.items() if k != "prompt"},
               "samples_tokens_not_text": {**sample, "tokens": [1, 2]},
               "samples_value_is_text": {**sample, "per_token": {"k1": ["a", "b"]}}}
    for name, row in samples.items():
        os.makedirs(os.path.join(HERE, name), exist_ok=True)
        write(f"{name}/ppo_log.jsonl", good_row)
        write(f"{name}/ppo_samples.jsonl", json.dumps(row) + "\n")
    # --- HH-RLHF files (data.load_hh_jsonl)
    rec = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    write("hh_lone_surrogate.jsonl", json.dumps(rec) + "\n" + json.dumps(rec)[:-2] + '\\ud800"}\n')
    write("hh_deeply_nested.jsonl", '{"chosen": ' + "[" * 10_000 + "]" * 10_000 + "}\n")
    write("hh_not_utf8.jsonl", b'{"chosen": "\xff\xfe"}\n')
    write("hh_a_list_line.jsonl", "[1, 2]\n")
    write("hh_no_rejected.jsonl", json.dumps({"chosen": rec["chosen"]}) + "\n")
    write("hh_numbers.jsonl", json.dumps({"chosen": 1, "rejected": 2}) + "\n")
    write("hh_empty.jsonl", "")
    write("hh_not_gzip.jsonl.gz", b"\x1f\x8b\x08\x00 this is not deflate data")
    write("hh_truncated.jsonl.gz", gzip.compress((json.dumps(rec) + "\n").encode() * 50)[:40])
    write("hh_no_assistant_turn.jsonl", json.dumps({"chosen": "Human: hi", "rejected": "Human: hey"}) + "\n")
    # --- tokenizer ranks (tokenizer.load_ranks)
    ranks = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    write("ranks_bad_base64.tiktoken", "\n".join(["!!!! 0"] + ranks[1:]) + "\n")
    write("ranks_too_few.tiktoken", "\n".join(ranks[:10]) + "\n")
    write("ranks_rank_twice.tiktoken", "\n".join(ranks + [f"{base64.b64encode(b'ab').decode()} 255"]) + "\n")
    write("ranks_binary.tiktoken", bytes(range(256)) * 4)
    write("ranks_rank_not_a_number.tiktoken", "\n".join(ranks[:5] + ["YQ== five"] + ranks[6:]) + "\n")
    print(f"wrote the corpus in {HERE}")


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


if __name__ == "__main__":
    main()
