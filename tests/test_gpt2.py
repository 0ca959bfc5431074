"""GPT-2 weights into our model.py (runs.load_gpt2): logits and hidden-state parity with Hugging Face transformers (a test-only
dependency; a small random GPT-2 built from a config, nothing downloaded) from both file formats, the
dependency-free safetensors reader, clear errors, and the SFT -> RM -> PPO -> evaluate chain on the repo's
HH-RLHF sample starting from such a checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import model as M
import tokenizer as tok
from runs import load_checkpoint
from tokenizer import pad_batch
import runs

if os.environ.get("CI"):  # CI installs tests/requirements.txt: a missing transformers there is a failure
    import transformers
else:
    transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "samples", "hh_rlhf_sample.jsonl")
VOCAB = tok.get_tokenizer("toy").n_vocab - 1  # the random GPT-2 has the toy vocabulary without PAD, like GPT-2


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A random 2-layer GPT-2 saved as model.safetensors (save_pretrained) and as pytorch_model.bin."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(d)                                   # model.safetensors + config.json
    torch.save(hf.state_dict(), d / "pytorch_model.bin")    # the older format, "transformer." prefixed names
    return hf, d


def left_padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)     # (B, T)
    mask = torch.ones_like(ids)
    mask[0, :5], mask[1, :2] = 0, 0                         # rows 0 and 1 left-padded
    return ids.masked_fill(mask == 0, VOCAB), mask          # PAD = VOCAB, the id our tokenizer adds


@pytest.mark.parametrize("fname", ["model.safetensors", "pytorch_model.bin"])
def test_logits_and_hidden_match_transformers(hf_gpt2, fname):
    hf, d = hf_gpt2
    ours = runs.load_gpt2(str(d / fname), vocab_size=VOCAB + 1, pad_id=VOCAB).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        hf_ids = ids.clamp(max=VOCAB - 1)                   # HF has no PAD row; pads are masked out anyway
        out = hf(input_ids=hf_ids, attention_mask=mask, position_ids=M.position_ids(mask), output_hidden_states=True)
        logits, hidden = ours(ids, mask), ours.hidden(ids, mask)                  # (B, T, V+1), (B, T, C)
    real = mask.bool()
    assert torch.allclose(logits[..., :VOCAB][real], out.logits[real], atol=1e-5, rtol=0)
    assert torch.allclose(hidden[real], out.hidden_states[-1][real], atol=1e-5, rtol=0)  # after ln_f
    assert (logits[..., VOCAB] == M.PAD_LOGIT).all()                              # PAD never predicted
    # the reward head reads the last real token's hidden state: same for a right-padded copy of the batch
    rm = M.ScalarHeadGPT(ours.cfg)
    rm.backbone.load_state_dict(ours.state_dict())
    right = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    r_ids, r_mask = pad_batch(right, VOCAB, left=False)
    assert torch.allclose(rm.score(ids, mask), rm.score(r_ids, r_mask), atol=1e-5)


def test_safetensors_reader_matches_the_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")   # comes with transformers
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i64": torch.arange(6).reshape(2, 3), "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    st.save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    got = runs.read_safetensors(str(tmp_path / "t.safetensors"))
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        runs.read_safetensors(str(tmp_path / "trunc.safetensors"))


def test_clear_errors(hf_gpt2, tmp_path):
    hf, d = hf_gpt2
    with pytest.raises(FileNotFoundError, match="no GPT-2 weights found.*huggingface-cli download"):
        runs.load_gpt2(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no config.json beside it and width 32 is not a GPT-2 size"):
        torch.save(hf.state_dict(), tmp_path / "lonely.bin")
        runs.load_gpt2(str(tmp_path / "lonely.bin"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())   # the rest have their config
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(32, 100)          # wrong shape
    torch.save(sd, tmp_path / "shape.bin")
    with pytest.raises(ValueError, match="shape.bin: parameter .h.0.mlp.c_fc.weight. is of shape"):
        runs.load_gpt2(str(tmp_path / "shape.bin"), vocab_size=VOCAB)
    sd = dict(hf.state_dict(), **{"transformer.h.0.attn.rotary.weight": torch.zeros(2)})  # unknown name
    torch.save(sd, tmp_path / "unknown.bin")
    with pytest.raises(ValueError, match="unknown parameter 'transformer.h.0.attn.rotary.weight'"):
        runs.load_gpt2(str(tmp_path / "unknown.bin"))
    with pytest.raises(ValueError, match=f"has {VOCAB} tokens but the tokenizer has 50258"):
        runs.load_gpt2(str(d / "model.safetensors"), vocab_size=50258, pad_id=50257)
    with pytest.raises(ValueError, match="longer than GPT-2's 128 learned positions"):
        runs.load_gpt2(str(d / "model.safetensors"), block_size=256)


def test_hh_splits_multi_turn_and_gz(tmp_path):
    import gzip
    gz = tmp_path / "hh.jsonl.gz"
    with open(SAMPLE, "rb") as f, gzip.open(gz, "wb") as g:
        g.write(f.read())
    splits = data.hh_splits(f"{SAMPLE},{gz}", seed=0)      # two files, comma-separated
    assert [len(splits[k]) for k in ("train", "val", "test")] == [10, 1, 1]
    recs = [r for k in splits for r in splits[k]]
    assert all(r["chosen"].endswith(data.EOS_TEXT) and r["rejected"].endswith(data.EOS_TEXT) for r in recs)
    multi = [r for r in recs if r["prompt"].count("\n\nAssistant:") > 1]
    assert multi and all(r["prompt"].endswith("\n\nAssistant:") for r in multi)   # everything up to the last turn
    prompts = data.hh_prompt_splits(f"{SAMPLE},{gz}", seed=0)                 # the toy task's shape: {kind: [prompt]}
    assert prompts["train"] == {"hh": [r["prompt"] for r in splits["train"]]}
    assert set(data.sample_prompts(prompts["train"], 5, __import__("random").Random(0))) <= set(prompts["train"]["hh"])


def run(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_sft_rm_ppo_chain_from_gpt2_weights_on_hh_sample(hf_gpt2, tmp_path):
    """--init (both file formats) and --data through every stage, on CPU in seconds; the weights SFT starts
    from are exactly the GPT-2 checkpoint's."""
    _, d = hf_gpt2
    out = str(tmp_path)
    common = ["--preset", "tiny", "--device", "cpu", "--out_dir", out, "--data", SAMPLE]
    run("train_sft.py", *common, "--init", str(d), "--batch_size", "2", "--max_iters", "0")
    start = load_checkpoint(f"{out}/sft.pt", "sft")
    assert (start["model_config"]["n_layer"], start["model_config"]["n_embd"]) == (2, 32)
    assert torch.equal(start["model"]["h.1.mlp.c_fc.weight"], runs.load_gpt2(str(d), 128, VOCAB + 1, VOCAB).state_dict()["h.1.mlp.c_fc.weight"])
    run("train_sft.py", *common, "--init", str(d), "--batch_size", "2")
    rm_out = run("reward_model.py", *common, "--init", str(d / "pytorch_model.bin"), "--batch_size", "2",
                 "--sft_ckpt", f"{out}/sft.pt")
    assert "no gold reward for this data" in rm_out
    run("ppo_rlhf.py", *common, "--sft_ckpt", f"{out}/sft.pt", "--rm_ckpt", f"{out}/rm.pt", "--n_iters", "2",
        "--eval_interval", "2")
    log = [json.loads(line) for line in open(f"{out}/ppo_log.jsonl")]
    assert len(log) == 2 and "win_rate_vs_sft" in log[-1] and log[-1]["gold"] is None  # no gold: null, not NaN
    # the paper's Fig. 8 ablation on real weights: the policy starts from GPT-2 itself (no SFT), the reference is SFT
    run("ppo_rlhf.py", *common, "--sft_ckpt", f"{out}/sft.pt", "--rm_ckpt", f"{out}/rm.pt", "--n_iters", "1",
        "--policy_init", str(d), "--out_dir", f"{out}/no_sft")
    first = [json.loads(line) for line in open(f"{out}/no_sft/ppo_log.jsonl")][0]
    assert first["kl_seq"] != 0.0                                   # policy (GPT-2) and reference (SFT) differ
    ev = run("-m", "studies.evaluate", "--device", "cpu", "--policies", f"{out}/ppo.pt", "--sft_ckpt", f"{out}/sft.pt",
             "--rm_ckpt", f"{out}/rm.pt", "--out_dir", out, "--data", SAMPLE, "--max_new_tokens", "8")
    assert "judged by the reward model" in ev and "| gold" not in open(f"{out}/eval.md").read()
