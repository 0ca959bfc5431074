"""
Checkpoints, shared by every stage: what a stage writes (one self-describing dict, written atomically, with a
checksum of its weights), how it is loaded back and checked, and the models the later stages build from them
(load_policy, load_models, load_critic). A run's plumbing around them (its folder, --resume, the Run object) is
building_blocks/runs.py. Plumbing, nothing algorithmic: read the stage files first; docs/files_and_checkpoints.md
describes the format.
"""
import contextlib
import copy
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import warnings

import torch

from external.gpt2 import load_gpt2
from model import GPT, GPTConfig, ScalarHeadGPT
from utils import regular_file

# ---------------------------------------------------------------------------------------------- checkpoints

SCALAR_HEAD_STAGES = ("rm", "orm", "prm_rule", "prm_mc")   # reward models (model.ScalarHeadGPT); the rest are policies


def save_checkpoint(path, **ckpt):
    """Write atomically: to a temporary file of this process first, then rename (a kill mid-save leaves the old
    file intact; two writers never share a temporary file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt["model_sha256"] = {key: model_sha256(ckpt, key) for key in WEIGHT_KEYS if key in ckpt}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError ("unexpected pos ...")
        reason = write_failure(e, os.path.dirname(os.path.abspath(path)))    # before the partial file goes
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, RuntimeError) and "no space" not in reason and "write" not in str(e):
            raise
        raise OSError(getattr(e, "errno", None) or errno.EIO, "cannot write it: " + reason, path) from None


WEIGHT_KEYS = ("model", "critic")  # the state dicts a checkpoint's checksum covers
DEFINITION_KEYS = ("model_config", "tokenizer", "tokenizer_id")  # what else defines the model: covered too


def write_failure(error, folder):
    """Why a write failed, in a user's terms: a full disk is named as such (torch's own message does not)."""
    full = getattr(error, "errno", None) == errno.ENOSPC
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(folder).free < (1 << 20)
    return "no space left on the device" if full else " ".join(str(getattr(error, "strerror", None) or error).split())


def weights_sha256(state_dict, digest=None):
    """SHA-256 over a state dict's names and raw tensor bytes: damaged bytes that still unpickle (they load as odd
    numbers or NaN) are caught on load instead of much later as a training failure."""
    digest = digest or hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_sha256(ckpt, key):
    """The checksum of everything that defines the model stored under `key`: its model_config, tokenizer and
    tokenizer id (one changed n_head or pad_id would load another model silently) and its weights."""
    digest = hashlib.sha256(json.dumps({k: ckpt.get(k) for k in DEFINITION_KEYS}, sort_keys=True).encode())
    return weights_sha256(ckpt[key], digest)


CHECKPOINT_KEYS = ("model", "model_config", "tokenizer", "tokenizer_id", "step", "config")  # in every stage's
CHECKPOINT_TYPES = dict(model=dict, model_config=dict, tokenizer=str, tokenizer_id=str, step=int, config=dict,
                        done=bool, metrics=dict, critic=dict)
# model_config: the type and range of each value, checked before any model is built from it
MODEL_CONFIG_RULES = dict(vocab_size=(int, 2, 1 << 20), block_size=(int, 2, 1 << 16), n_layer=(int, 1, 1024),
                          n_head=(int, 1, 1024), n_embd=(int, 1, 1 << 16), dropout=(float, 0.0, 0.999),
                          bias=(bool, False, True), pad_id=(int, -1, 1 << 20))


def read_checkpoint(path):
    """A checkpoint file -> its dict, loaded with weights_only (no code in the file runs), or a one-line error:
    not a regular file, truncated, another program's file."""
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    regular_file(path, "a checkpoint")
    try:
        with warnings.catch_warnings():                                # torch's notes on odd pickles: we say it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, another program's pickle (refused: no code runs), a text file...
        raise ValueError(f"{path}: cannot be read as a checkpoint of this project ({type(e).__name__}); is it "
                         f"truncated, or written by another program?") from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt or not isinstance(ckpt["stage"], str):
        raise ValueError(f"{path}: not a checkpoint written by this project (no 'stage' field)")
    return ckpt


def check_model_config(model_config, path):
    """A checkpoint's model_config, value by value (type and range) as options are checked, and complete."""
    unknown = set(model_config) - set(MODEL_CONFIG_RULES)
    missing = set(MODEL_CONFIG_RULES) - set(model_config) - {"bias", "dropout", "pad_id"}   # these have defaults
    if unknown or missing:
        raise ValueError(f"{path}: model_config has " + (f"unknown fields {sorted(unknown)}" if unknown else
                                                          f"no {', '.join(sorted(missing))}") +
                         "; was it edited by hand or written by another program?")
    for name, value in model_config.items():
        kind, low, high = MODEL_CONFIG_RULES[name]
        ok_type = isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok_type or not low <= value <= high:
            raise ValueError(f"{path}: model_config {name}={value!r} must be {kind.__name__} in [{low}, {high}]")
    if model_config["n_embd"] % model_config["n_head"] or model_config.get("pad_id", -1) >= model_config["vocab_size"]:
        raise ValueError(f"{path}: model_config n_embd={model_config['n_embd']}, n_head={model_config['n_head']}, "
                         f"vocab_size={model_config['vocab_size']}, pad_id={model_config.get('pad_id', -1)} do not "
                         f"fit together (n_embd a multiple of n_head, pad_id < vocab_size)")


def check_weight_shapes(module_class, model_config, state_dict, path):
    """The weights have exactly the names and shapes model_config implies, checked on a model without memory
    (the meta device) before a real one is built: a config that would allocate more than the file holds fails."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in module_class(GPTConfig(**model_config)).state_dict().items()}
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state_dict.items()}
    if got != expected:
        wrong = sorted(k for k in expected.keys() | got.keys() if got.get(k) != expected.get(k))
        raise ValueError(f"{path}: the weights do not have the shapes model_config implies (first: {wrong[0]!r}, "
                         f"{got.get(wrong[0])} stored, {expected.get(wrong[0])} expected); damaged or edited?")


def load_checkpoint(path, stage, tokenizer_id=None, finished=True):
    """Load a checkpoint dict written by `stage` (weights_only: no code runs on load) and check what it is: its
    fields' types, model_config (check_model_config), the weights' shapes and checksum (model_sha256).
    With tokenizer_id=None the checkpoint's own tokenizer is rebuilt and must still have the same identity.
    finished=True refuses the periodic checkpoint of a run that has not finished (use --resume on it).
    stage=None accepts any stage."""
    first = stage if isinstance(stage, str) or stage is None else stage[0]
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found" + (f" (run the '{first}' stage first)" if first else ""))
    ckpt = read_checkpoint(path)
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a complete '{ckpt['stage']}' checkpoint (missing {', '.join(missing)}); "
                         f"was it edited by hand or written by another program?")
    wrong = [f"{key} ({type(ckpt[key]).__name__}, not {kind.__name__})" for key, kind in CHECKPOINT_TYPES.items()
             if key in ckpt and (not isinstance(ckpt[key], kind) or (kind is int and isinstance(ckpt[key], bool)))]
    if wrong:
        raise ValueError(f"{path}: not a '{ckpt['stage']}' checkpoint of this project: {', '.join(wrong)}")
    stages = (stage,) if isinstance(stage, str) else tuple(stage or ())
    if stage is not None and ckpt["stage"] not in stages:
        raise ValueError(f"{path}: is a '{ckpt['stage']}' checkpoint; expected '{' or '.join(stages)}'")
    check_model_config(ckpt["model_config"], path)
    for key, expected in (ckpt.get("model_sha256") or {}).items():
        if key not in ckpt or not isinstance(ckpt[key], dict) or model_sha256(ckpt, key) != expected:
            raise ValueError(f"{path}: the '{key}' model (its weights, model_config or tokenizer) does not match the "
                             f"checksum written with it: the file was changed after it was saved; use another copy "
                             f"or train the stage again")
    for key, expected in (ckpt.get("weights_sha256") or {}).items():   # checkpoints written before model_sha256
        if key not in ckpt or not isinstance(ckpt[key], dict) or weights_sha256(ckpt[key]) != expected:
            raise ValueError(f"{path}: the '{key}' weights do not match the checksum written with them: the file "
                             f"was damaged after it was saved; use another copy or train the stage again")
    check_weight_shapes(ScalarHeadGPT if ckpt["stage"] in SCALAR_HEAD_STAGES else GPT, ckpt["model_config"],
                        ckpt["model"], path)
    if finished and not ckpt.get("done", True):
        raise ValueError(f"{path}: is from an interrupted '{ckpt['stage']}' run (step {ckpt['step']}); finish it "
                         f"with --resume true first")
    if tokenizer_id is None:
        import tokenizer
        try:
            tokenizer_id = tokenizer.tokenizer_id(tokenizer.get_tokenizer(ckpt["tokenizer"]))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{path}: its tokenizer cannot be built: {e}") from None
    if ckpt["tokenizer_id"] != tokenizer_id:
        raise ValueError(f"{path}: made with tokenizer {ckpt['tokenizer_id']}, but this run uses {tokenizer_id}")
    return ckpt


def without_dropout(model_config):
    """A checkpoint's model_config -> GPTConfig with dropout 0. Every model after SFT and the RM (policy,
    reference, critic, frozen RM; RL, DPO, A-LoL, evaluation) runs without dropout, whatever the SFT stage
    trained with: dropout in the update's forward would make the first-minibatch ratio != 1 and the critic's
    rollout values differ from the values it is trained against."""
    return GPTConfig(**{**model_config, "dropout": 0.0})


def load_policy(path, stages=None):
    """A finished policy checkpoint -> (GPT without dropout, checkpoint dict); stages=None accepts every stage
    but the RM's."""
    ckpt = load_checkpoint(path, stages)
    if ckpt["stage"] in SCALAR_HEAD_STAGES:
        raise ValueError(f"{path}: is a reward-model checkpoint, not a policy")
    model = GPT(without_dropout(ckpt["model_config"]))
    load_weights(model, ckpt["model"], path)
    return model, ckpt


def load_models(sft_path, rm_path, device, max_new_tokens=None, policy_init="sft"):
    """The start of every RL stage: the SFT policy (to train), a frozen copy of it (the reference) and the frozen
    reward model, on `device`; plus both checkpoint dicts. The RM must share the policy's vocabulary, and the
    context must hold a prompt besides max_new_tokens. policy_init (PPO's paper §5.3.3 Fig. 8 ablation): a policy
    not initialised from SFT, random or GPT-2 weights (gpt2 | a local file/folder, external/gpt2.py); the
    reference stays SFT."""
    policy, sft = load_policy(sft_path, ("sft",))
    rm, rm_ckpt = load_reward_model(rm_path, "rm", sft, sft_path)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    shape = policy.cfg
    if policy_init == "random":
        policy = GPT(without_dropout(sft["model_config"]))
    elif policy_init != "sft":
        policy = load_gpt2(policy_init, shape.block_size, shape.vocab_size, shape.pad_id)
        if dataclasses.asdict(policy.cfg) != dataclasses.asdict(shape):
            raise ValueError(f"--policy_init {policy_init}: GPT-2 of shape {dataclasses.asdict(policy.cfg)} but the "
                             f"SFT policy (and its reference) has {dataclasses.asdict(shape)}")
    if max_new_tokens is not None and max_new_tokens >= shape.block_size:
        raise ValueError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in block_size "
                         f"{shape.block_size}")
    return policy.to(device), ref.to(device), rm.to(device), sft, rm_ckpt


def load_reward_model(rm_path, stages, sft, sft_path):
    """A frozen reward model (a checkpoint of `stages`: rm, or process_reward.py's orm / prm_rule / prm_mc) that
    scores the SFT policy's tokens: the same vocabulary and PAD id, a context as long. -> (model without dropout,
    its checkpoint dict)."""
    rm_ckpt = load_checkpoint(rm_path, stages, sft["tokenizer_id"])
    for k in ("vocab_size", "pad_id"):
        if rm_ckpt["model_config"][k] != sft["model_config"][k]:
            raise ValueError(f"{rm_path}: model_config {k}={rm_ckpt['model_config'][k]} but {sft_path} has "
                             f"{sft['model_config'][k]}; the RM must score the policy's tokens")
    check_rm_context(rm_ckpt, sft, rm_path, sft_path)
    rm = ScalarHeadGPT(without_dropout(rm_ckpt["model_config"]))
    load_weights(rm, rm_ckpt["model"], rm_path)
    return rm.eval().requires_grad_(False), rm_ckpt


def check_rm_context(rm_ckpt, sft, rm_path, sft_path):
    """The reward model scores prompt + response, which fill up to the policy's context: its context must be as long."""
    if rm_ckpt["model_config"]["block_size"] < sft["model_config"]["block_size"]:
        raise ValueError(f"{rm_path}: block_size {rm_ckpt['model_config']['block_size']} cannot hold the prompt + "
                         f"response of {sft_path}'s block_size {sft['model_config']['block_size']}; train the reward "
                         f"model from that SFT checkpoint")


def load_critic(init, sft, rm_ckpt, sft_path, rm_path):
    """The trainable critic (paper §5.3.3), without dropout: a copy of the reward model (init="rm") or the SFT
    backbone with a fresh scalar head (init="sft")."""
    critic = ScalarHeadGPT(without_dropout((rm_ckpt if init == "rm" else sft)["model_config"]))
    if init == "rm":
        load_weights(critic, rm_ckpt["model"], rm_path)
    else:
        load_weights(critic.backbone, sft["model"], sft_path)
    return critic


def load_weights(module, state_dict, path):
    """module.load_state_dict with a one-line error naming the file when shapes or names do not fit."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise ValueError(f"{path}: weights do not fit the model config ({detail})") from None


def rng_state(rng=None, generator=None):
    """Every random state a stage uses (torch's global one always: dropout draws from it), as plain types a
    weights_only checkpoint can hold."""
    state = dict(torch=torch.get_rng_state())
    if rng is not None:
        version, internal, gauss = rng.getstate()
        state["python"] = [version, list(internal), gauss]
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state, rng=None, generator=None):
    torch.set_rng_state(state["torch"])
    if rng is not None:
        version, internal, gauss = state["python"]
        rng.setstate((version, tuple(internal), gauss))
    if generator is not None:
        generator.set_state(state["generator"])
