"""
GPT-2 weights from a local Hugging Face checkpoint (model.safetensors or pytorch_model.bin) into model.GPT.

Our GPT is GPT-2's architecture (pre-LN, GELU-tanh, learned positions, tied embeddings, LayerNorm eps 1e-5),
so the weights map one to one. Two differences in storage: HF names may carry a "transformer." prefix, and
GPT-2's linear layers are `Conv1D` modules that store their weight as (in, out), the transpose of nn.Linear.
safetensors is read by the short reader below, with no extra package. Nothing is downloaded: a missing file
is an error that says how to get it. Used by `--init` (SFT, RM) and `--policy_init` (PPO).
"""
import glob
import json
import math
import os
import re
import struct
import sys
import warnings

import torch

from model import GPT, GPTConfig
from utils import regular_file

GPT2_SIZES = {  # name -> (n_layer, n_head, n_embd); all have vocab 50257 and 1024 positions
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)
HF_BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers some old checkpoints carry: not weights


def read_safetensors(path):
    """
    A .safetensors file -> {name: tensor}, with no extra package. The format:
      8 bytes   little-endian uint64 N, the header's length
      N bytes   JSON {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}
      the rest  every tensor's raw little-endian bytes; offsets count from the end of the header
    """
    if sys.byteorder != "little":
        raise ValueError(f"{path}: safetensors data is little-endian; this reader does not convert byte order")
    size = regular_file(path, "GPT-2 weights")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER):                               # bounded before anything is allocated
            raise ValueError(f"{path}: header length {n} does not fit the file ({size} bytes); not a safetensors file?")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ValueError(f"{path}: the header is not JSON; is this a safetensors file?") from None
        buf = bytearray(f.read())                                      # every tensor's bytes, one read
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object; is this a safetensors file?")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = tensor_entry_problem(info, len(buf))
        if problem:
            raise ValueError(f"{path}: tensor {name!r}: {problem}; truncated, damaged, or not a safetensors file?")
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        flat = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin) \
            if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"]).clone()           # own memory, not a view of buf
    return tensors


MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header (100 MB)


def tensor_entry_problem(info, n_bytes):
    """What is wrong with one safetensors header entry (None when nothing): a known dtype, a shape of sizes >= 0,
    offsets inside the data that hold exactly shape's elements."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        return "not a {dtype, shape, data_offsets} entry"
    if info["dtype"] not in SAFETENSORS_DTYPES:
        return f"dtype {info['dtype']!r}, which this reader does not know"
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"shape {shape!r} is not a list of sizes >= 0"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end"
    if offsets[1] > n_bytes:
        return f"ends at byte {offsets[1]} but the data has {n_bytes}"
    if math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize != offsets[1] - offsets[0]:
        return f"shape {shape} does not match its {offsets[1] - offsets[0]} bytes"
    return None


def find_gpt2_checkpoint(spec):
    """
    `spec` -> the weights file: a .safetensors / .bin path, a folder holding model.safetensors or
    pytorch_model.bin, or a GPT2_SIZES name looked up in the Hugging Face cache (~/.cache/huggingface/hub, or
    $HF_HOME/hub). Nothing is downloaded; a missing file is an error that says how to get it.
    """
    if os.path.lexists(spec) and not os.path.isdir(spec):
        regular_file(spec, "GPT-2 weights")                         # a FIFO or a device is refused, not opened
        return spec
    folders = [spec] if os.path.isdir(spec) else []
    if spec in GPT2_SIZES:
        hub = os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
        for repo in (f"models--{spec}", f"models--openai-community--{spec}"):
            folders += sorted(glob.glob(os.path.join(hub, repo, "snapshots", "*")))
    for folder in folders:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.lexists(os.path.join(folder, name)):
                regular_file(os.path.join(folder, name), "GPT-2 weights")
                return os.path.join(folder, name)
    name = spec if spec in GPT2_SIZES else "gpt2"
    raise FileNotFoundError(
        f"{spec}: no GPT-2 weights found (looked for a file, a folder with model.safetensors or pytorch_model.bin"
        f"{', and the Hugging Face cache' if spec in GPT2_SIZES else ''}). Download them once on a machine with "
        f"internet, e.g. `huggingface-cli download openai-community/{name} model.safetensors config.json "
        f"--local-dir {name}` or https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors, "
        f"then pass --init {name}/")


def gpt2_config(path, state_dict):
    """(n_layer, n_head, n_embd, n_positions, vocab) from config.json beside the weights, else from the shapes
    (n_head then comes from the known sizes)."""
    cfg_file = os.path.join(os.path.dirname(path), "config.json")
    if state_dict["wte.weight"].dim() != 2 or state_dict["wpe.weight"].dim() != 2:
        raise ValueError(f"{path}: wte.weight and wpe.weight must be 2-D (rows, width); not a GPT-2 checkpoint?")
    n_embd, vocab = state_dict["wte.weight"].shape[1], state_dict["wte.weight"].shape[0]
    n_pos = state_dict["wpe.weight"].shape[0]
    n_layer = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("h.")), default=-1)
    if n_layer == 0 or n_embd == 0 or n_pos == 0 or vocab == 0:
        raise ValueError(f"{path}: no transformer blocks, or an empty embedding; not a GPT-2 checkpoint?")
    if n_layer > 1024:                                                 # names a block no file of GPT-2's size has
        raise ValueError(f"{path}: a parameter of block {n_layer - 1}; more than 1024 blocks is not a GPT-2 checkpoint")
    if os.path.isfile(cfg_file):
        if regular_file(cfg_file, "config.json") > 1 << 20:
            raise ValueError(f"{cfg_file}: over 1 MB; not a model config")
        try:
            with open(cfg_file, "rb") as f:
                hf = json.load(f)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ValueError(f"{cfg_file}: not JSON; expected Hugging Face's config.json of the weights") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{cfg_file}: not a JSON object; expected Hugging Face's config.json of the weights")
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{cfg_file}: activation {hf['activation_function']!r}; our GPT uses GELU-tanh (gelu_new)")
        eps = hf.get("layer_norm_epsilon", 1e-5)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or abs(eps - 1e-5) > 1e-12:
            raise ValueError(f"{cfg_file}: layer_norm_epsilon {eps!r}; our GPT uses 1e-5")
        n_head = hf.get("n_head")
        if not isinstance(n_head, int) or isinstance(n_head, bool) or n_head < 1 or n_embd % n_head:
            raise ValueError(f"{cfg_file}: n_head {n_head!r} must be a whole number >= 1 that divides the width {n_embd}")
        for key, have in (("n_embd", n_embd), ("n_layer", n_layer), ("n_positions", n_pos), ("vocab_size", vocab)):
            if key in hf and hf[key] != have:
                raise ValueError(f"{cfg_file}: {key} {hf[key]!r}, but the weights have {have}; config.json of other weights?")
        return n_layer, n_head, n_embd, n_pos, vocab
    by_width = {c: h for _, h, c in GPT2_SIZES.values()}
    if n_embd not in by_width:
        raise ValueError(f"{path}: no config.json beside it and width {n_embd} is not a GPT-2 size; "
                         f"cannot tell the number of heads")
    return n_layer, by_width[n_embd], n_embd, n_pos, vocab


def load_gpt2_state_dict(path):
    """Read a HF GPT-2 file (safetensors, or .bin with weights_only=True) into our parameter names:
    prefix dropped, Conv1D weights transposed, mask buffers dropped; unknown names are an error."""
    if path.endswith(".safetensors"):
        sd = read_safetensors(path)
    else:
        regular_file(path, "GPT-2 weights")
        try:
            with warnings.catch_warnings():                            # torch's notes on odd pickles: we say it
                warnings.simplefilter("ignore")
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:   # damaged, or a pickle that needs code to load: refused, none of it runs
            raise ValueError(f"{path}: cannot be read as a PyTorch state dict of plain tensors ({type(e).__name__}); "
                             f"a file that needs more than tensors to load is refused (no code in it runs)") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise ValueError(f"{path}: holds {type(sd).__name__}, not a state dict {{name: tensor}}; not a GPT-2 checkpoint?")
    ours = {}
    for name, t in sd.items():
        key = name[len("transformer."):] if name.startswith("transformer.") else name
        if key.startswith("h.") and not re.fullmatch(r"h\.\d{1,4}\.[a-z_.0-9]+", key):
            raise ValueError(f"{path}: unknown parameter {name!r}; not a GPT-2 checkpoint?")
        if key.startswith("h.") and key.split(".", 2)[2] in HF_BUFFERS:
            continue
        if key == "lm_head.weight":  # tied to wte: nothing of its own to load (checked below)
            continue
        if not (key in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias") or
                (key.startswith("h.") and key.split(".", 2)[2] in
                 {"ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias",
                  "mlp.c_fc.bias", "mlp.c_proj.bias", *CONV1D})):
            raise ValueError(f"{path}: unknown parameter {name!r}; not a GPT-2 checkpoint?")
        ours[key] = t.t() if key.endswith(CONV1D) else t               # Conv1D (in, out) -> Linear (out, in)
    for k in ("wte.weight", "wpe.weight"):
        if k not in ours:
            raise ValueError(f"{path}: no {k!r}; not a GPT-2 checkpoint?")
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd.get("transformer.wte.weight", sd.get("wte.weight"))):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; our GPT ties them as GPT-2 does")
    return ours


def load_gpt2(spec, block_size=None, vocab_size=None, pad_id=-1, dropout=0.0):
    """
    A GPT with GPT-2's weights from a local HF checkpoint (see find_gpt2_checkpoint for `spec`).
    block_size: keep only the first positions (default: all 1024). vocab_size: the tokenizer's size; one more
    than the checkpoint's is allowed when it is the PAD token, whose new embedding row is zero (PAD's logit is
    masked anyway, and a zero row never changes a real token's output).
    """
    path = find_gpt2_checkpoint(spec)
    sd = load_gpt2_state_dict(path)
    n_layer, n_head, n_embd, n_pos, vocab = gpt2_config(path, sd)
    block_size = block_size or n_pos
    if block_size > n_pos:
        raise ValueError(f"{path}: block_size {block_size} is longer than GPT-2's {n_pos} learned positions")
    sd["wpe.weight"] = sd["wpe.weight"][:block_size]
    vocab_size = vocab_size or vocab
    if vocab_size == vocab + 1 and pad_id == vocab:
        sd["wte.weight"] = torch.cat([sd["wte.weight"], torch.zeros(1, n_embd, dtype=sd["wte.weight"].dtype)])
    elif vocab_size != vocab:
        raise ValueError(f"{path}: the checkpoint has {vocab} tokens but the tokenizer has {vocab_size} "
                         f"(only one extra token, PAD = {vocab}, can be added)")
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    dropout=dropout, pad_id=pad_id)
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    sd["lm_head.weight"] = sd["wte.weight"]
    with torch.device("meta"):                    # the model's shapes without its memory: checked before building it
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    wrong = sorted(k for k in expected.keys() | sd.keys() if k not in sd or tuple(sd[k].shape) != expected.get(k))
    if wrong:
        k = wrong[0]
        raise ValueError(f"{path}: parameter {k!r} is " + ("missing" if k not in sd else f"of shape {tuple(sd[k].shape)}"
                         f"{'' if k in expected else ' but not a parameter'}") + f" for a {n_layer}-layer GPT-2 of width "
                         f"{n_embd}" + (f" (expected {expected[k]})" if k in expected and k in sd else ""))
    model = GPT(cfg)
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise ValueError(f"{path}: weights do not fit a GPT-2 of this config ({str(e).splitlines()[-1].strip()})") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: parameters missing {result.missing_keys[:5]} / unexpected "
                         f"{result.unexpected_keys[:5]} for a {n_layer}-layer GPT")
    return model
