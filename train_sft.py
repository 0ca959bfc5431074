"""
Stage 1: supervised fine-tuning (SFT) of the tiny GPT on demonstrations of the toy assistant task.

The loss is next-token cross-entropy on the *response* tokens and the final EOS only; prompt tokens are
context, not targets (InstructGPT, Ouyang et al. 2022, §3.5 "SFT"; Secrets of RLHF Part I §3.1 "SFT").
The model starts from random weights (the toy task has no pre-training corpus), so the demonstrations are
its only teacher: it learns the reply format, the knowledge base and when to stop.

Run (defaults: ~1M-parameter GPT, CPU minutes; writes out/sft.pt, out/sft_log.jsonl, out/sft_loss.png):
    python train_sft.py
    python train_sft.py --preset tiny --out_dir out/tiny        # seconds: the smoke test
    python train_sft.py --data chains --out_dir out/chains   # arithmetic chains, step by step (process supervision)
    python train_sft.py --tokenizer gpt2 --init gpt2/ --data hh/train.jsonl.gz --out_dir out/gpt2_hh  # GPT-2, HH-RLHF
    torchrun --standalone --nproc_per_node 2 train_sft.py     # data parallel: 2 processes, one per GPU (or CPU)
    python train_sft.py --help

At the end it samples answers to held-out test prompts (temperature 1, as PPO's rollouts will) and prints
their mean gold reward next to the demonstrations' gold reward on the same prompts.

Deliberate choices:
  1. The demonstrations are good but imperfect (data.DEMO): SFT should roughly match their gold reward,
     not exceed it; the gap to a perfect 1.25 is what RLHF can still win.
  2. Right padding for training batches, with position ids from the mask (model.position_ids), so the
     same sequence gives the same logits whichever way it is padded.
  3. AdamW, linear warm-up then cosine decay to 10%, global grad-norm clip 1.0 (nanoGPT's recipe).
  4. Real data (`--data` HH-RLHF): the chosen response is the demonstration; there is no gold reward, so the final
     evaluation prints samples next to the chosen responses. `--init` loads GPT-2 weights (runs.load_gpt2);
     `--grad_accum` micro-batches are an exact token-weighted mean; bf16 autocast on CUDA only (`--amp`).

Shape legend: B batch, T sequence length (prompt + response), V vocab.
"""
import math
import os
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import data
import tokenizer as tok
from runs import (Run, RunOptions, autocast, check_finite, ckpt_interval_field, data_parallel, field, load_gpt2,
                  parse_config, plot_curves, read_jsonl, run_main, sample_responses, shard, share_of_global_tokens,
                  sum_over_ranks, table, world_size)
from tokenizer import collate, encode_demos
from model import GPT, GPTConfig


@dataclass
class Config(RunOptions):
    ckpt_interval: int = ckpt_interval_field(250)
    tokenizer: str = field("toy", "toy (shipped BPE) or gpt2 (tiktoken's, needs its cache)", choices=('toy', 'gpt2'))
    init: str = field("random", "random, or GPT-2 weights: gpt2 | gpt2-medium | ... (HF cache) or a local "
                                "model.safetensors / pytorch_model.bin / folder; sets n_layer, n_head, n_embd",
                      input_file=True)
    data: str = field("toy", "toy (the built-in task), chains (arithmetic chains worked step by step: "
                             "algorithms/arithmetic_chains.py), or HH-RLHF .jsonl/.jsonl.gz file(s), comma-separated: "
                             "SFT on the chosen responses", input_file=True)
    # model
    n_layer: int = field(4, "transformer blocks", range="[1, inf)")
    n_head: int = field(4, "attention heads", range="[1, inf)")
    n_embd: int = field(128, "model width", range="[1, inf)")
    block_size: int = field(128, "max prompt + response tokens", range="[1, inf)")
    dropout: float = field(0.0, "dropout (0 keeps later PPO ratios exact)", range="[0, 1)")
    # data
    n_train: int = field(8000, "demonstrations drawn from the train prompts", range="[1, inf)")
    n_val: int = field(500, "demonstrations drawn from the val prompts (validation loss)", range="[1, inf)")
    # optimisation
    max_iters: int = field(1500, "optimizer steps", range="[0, inf)")
    batch_size: int = field(32, "sequences per micro-batch, over all processes under torchrun (each takes an equal share)",
                            range="[1, inf)", global_batch=True)
    grad_accum: int = field(1, "micro-batches per optimizer step (gradient accumulation; exact token-weighted mean)",
                            range="[1, inf)")
    amp: bool = field(True, "bf16 autocast on CUDA (CPU and MPS always run fp32)")
    lr: float = field(2e-3, "peak learning rate", range="(0, inf)")
    warmup_iters: int = field(50, "linear warm-up steps", range="[1, inf)")
    weight_decay: float = field(0.1, "AdamW weight decay on matrices", range="[0, inf)")
    grad_clip: float = field(1.0, "global grad-norm clip (0 = off)", range="[0, inf)")
    eval_interval: int = field(100, "validate every this many steps", range="[1, inf)")
    # final evaluation
    n_eval_prompts: int = field(512, "test prompts sampled for the gold-reward evaluation", range="[1, inf)")
    max_new_tokens: int = field(48, "longest sampled response", range="[1, inf)")
    temperature: float = field(1.0, "sampling temperature for the evaluation (1 = the policy PPO starts from)",
                               range="(0, inf)")
    # reliability


PRESETS = {
    "default": {},
    # small: 1500 steps, not 800: from the 800-step SFT, PPO lost gold in 1 of 3 seeds even with a better RM (seed
    # 1: 0.245 -> 0.031); from 1500 steps it gained in 3 of 3 (sweep of 2026-12-03, the README's table measures it)
    "small": dict(n_layer=2, n_head=2, n_embd=64, n_train=4000, n_val=200, max_iters=1500, lr=3e-3, warmup_iters=20,
                  eval_interval=100, n_eval_prompts=128, max_new_tokens=32),
    "tiny": dict(n_layer=1, n_head=2, n_embd=32, n_train=256, n_val=64, max_iters=30, batch_size=16,
                 warmup_iters=5, eval_interval=15, n_eval_prompts=16, max_new_tokens=24),
}


# ----------------------------------------------------------------------------------------------------
# Pure functions (imported by tests, notebooks and later stages)

def sft_loss(logits, ids, loss_mask):
    """
    Mean next-token cross-entropy over response tokens: position t predicts ids[t+1], counted iff loss_mask[t+1].
    logits (B, T, V), ids (B, T), loss_mask (B, T).
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)                  # (B, T-1, V)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)                  # (B, T-1)
    m = loss_mask[:, 1:].float()                                          # (B, T-1)
    return (nll * m).sum() / m.sum().clamp(min=1)


def lr_at(step, cfg):
    """Linear warm-up to cfg.lr over warmup_iters (step 0 already gets lr/warmup, not 0), then cosine to lr/10."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def eval_loss(model, examples, cfg, pad_id, device):
    model.eval()
    total, n = 0.0, 0
    examples = shard(examples)                        # torchrun: each process its share, the sums add up
    for i in range(0, len(examples), cfg.batch_size):
        ids, mask, loss_mask = collate(examples[i:i + cfg.batch_size], pad_id, device)
        total += sft_loss(model(ids, mask), ids, loss_mask).item() * len(ids)
        n += len(ids)
    total, n = sum_over_ranks(torch.tensor([total, n], dtype=torch.float64)).tolist()
    return total / n


def mean(xs):
    return sum(xs) / len(xs)


def gold_by_kind(prompts, replies):
    """Mean gold reward of data.Replies over all prompts and per kind: {"all": g, "math": g, ...}."""
    golds = replies.golds(prompts)
    out = {"all": mean(golds)}
    for kind in data.KIND_WEIGHTS:
        g = [x for p, x in zip(prompts, golds) if data.task_of(p).kind == kind]
        if g:
            out[kind] = mean(g)
    return out


def check_fits_in_memory(mcfg):
    """Sizes that cannot fit are one line before anything is allocated (not a machine swapping, then killed):
    fp32 weights, gradients and AdamW's two moments take 16 bytes a parameter, counted on the meta device."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(mcfg).parameters())
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):                      # a system that does not say
        return
    if 16 * n_params > memory:
        raise ValueError(f"--n_layer {mcfg.n_layer} --n_embd {mcfg.n_embd}: {n_params / 1e9:.1f}B parameters need "
                         f"{16 * n_params / 2**30:.0f} GiB to train, more than this machine's {memory / 2**30:.0f} GiB")


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    if cfg.max_new_tokens >= cfg.block_size:         # found now, not when the final evaluation samples
        raise ValueError(f"--max_new_tokens {cfg.max_new_tokens}: leaves no room for a prompt in --block_size "
                         f"{cfg.block_size}; the context must hold a prompt and the longest response")
    with Run(cfg, "sft", unit="step", data_parallel=True) as run:
        device = run.device
        enc = tok.get_tokenizer(cfg.tokenizer)
        print(f"device={device} tokenizer={tok.tokenizer_id(enc)} config={asdict(cfg)}")

        # data: demonstrations on train prompts (training) and val prompts (validation loss)
        rng = random.Random(cfg.seed)
        if cfg.data == "toy":
            splits = data.prompt_splits(cfg.seed)
            train = data.make_demonstrations(data.sample_prompts(splits["train"], cfg.n_train, rng), cfg.seed + 1)
            val = data.make_demonstrations(data.sample_prompts(splits["val"], cfg.n_val, rng), cfg.seed + 2)
        elif cfg.data == "chains":  # the worked steps of arithmetic chains; its own splits, the same draws of rng
            from algorithms import arithmetic_chains  # the task of process supervision, beside its methods
            splits = arithmetic_chains.splits(cfg.seed)
            train = arithmetic_chains.demonstrations([rng.choice(splits["train"]) for _ in range(cfg.n_train)])
            val = arithmetic_chains.demonstrations([rng.choice(splits["val"]) for _ in range(cfg.n_val)])
        else:  # HH-RLHF: the chosen response of each record is the demonstration
            splits = data.hh_splits(cfg.data, cfg.seed)
            train = [(r["prompt"], r["chosen"]) for r in splits["train"][:cfg.n_train]]
            val = [(r["prompt"], r["chosen"]) for r in splits["val"][:cfg.n_val]]
        train = encode_demos(enc, train, cfg.block_size, cfg.truncate_prompts)
        val = encode_demos(enc, val, cfg.block_size, cfg.truncate_prompts)

        if cfg.batch_size > len(train):
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(train)} training demonstrations (n_train)")
        if cfg.init == "random":
            mcfg = GPTConfig(vocab_size=enc.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, dropout=cfg.dropout, pad_id=tok.pad_id(enc))
            check_fits_in_memory(mcfg)
            model = GPT(mcfg).to(device)
        else:  # GPT-2 weights; the model's shape comes from the checkpoint, not from n_layer / n_head / n_embd
            model = load_gpt2(cfg.init, cfg.block_size, enc.n_vocab, tok.pad_id(enc), cfg.dropout).to(device)
            mcfg = model.cfg
            print(f"initialised from GPT-2 weights {cfg.init}: {mcfg.n_layer} layers, {mcfg.n_head} heads, width {mcfg.n_embd}")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{n_params / 1e6:.2f}M parameters; {len(train)} train / {len(val)} val demonstrations")
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
        train_model = data_parallel(model)                # torchrun: gradients averaged over the processes

        meta = dict(model_config=asdict(mcfg), tokenizer=cfg.tokenizer, tokenizer_id=tok.tokenizer_id(enc))
        # the epoch's remaining demonstrations, popped per batch (kept in the checkpoints)
        order = run.begin(opt, dict(model=model), meta, cfg.max_iters, rng, state=dict(order=[]))["order"]

        def validate(step):
            vl = eval_loss(model, val, cfg, mcfg.pad_id, device)
            run.log.write(step=step, val_loss=vl, time=run.train_time())
            print(run.progress.line(step, f"val loss {vl:.4f}"))
            return vl

        if run.start == 1:
            vl = validate(0)
        for step in range(run.start, cfg.max_iters + 1):  # the step-th optimizer step
            # one optimizer step on grad_accum micro-batches drawn without replacement (reshuffled each epoch)
            micro = []
            for _ in range(cfg.grad_accum):
                if len(order) < cfg.batch_size:
                    order[:] = range(len(train))
                    rng.shuffle(order)
                batch = [train[order.pop()] for _ in range(cfg.batch_size)]  # every rank draws the same global batch
                micro.append(collate(shard(batch), mcfg.pad_id, device))      # torchrun: this process's share
            n_tokens = sum(lm[:, 1:].sum() for _, _, lm in micro)             # the step's loss tokens on this rank
            model.train()
            lr = lr_at(step - 1, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for ids, mask, loss_mask in micro:                                # (B, T) each
                with autocast(device, cfg.amp):
                    part = sft_loss(train_model(ids, mask), ids, loss_mask)   # mean over this micro-batch's tokens
                share = share_of_global_tokens(loss_mask[:, 1:].sum(), n_tokens)   # of the step's tokens
                (part * share).backward()                 # gradients add up over micro-batches to the step's token mean
                loss = loss + part.detach() * share / world_size()
            loss = sum_over_ranks(loss)                                       # torchrun: the global batch's
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            check_finite(f"SFT step {step}", train_loss=loss.item(), grad_norm=gnorm.item())
            opt.step()
            run.log.write(step=step, train_loss=loss.item(), lr=lr, grad_norm=gnorm.item(), time=run.train_time())
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                vl = validate(step)
            run.save(step, order=order)                   # every ckpt_interval steps, the checkpoint
        train_time = run.train_time()

        # final evaluation: sample on test prompts, gold reward next to the demonstrations' on the same prompts
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        metrics = dict(val_loss=vl, train_time_s=train_time, n_params=n_params)
        if cfg.data == "toy":
            eval_prompts = data.sample_prompts(splits["test"], cfg.n_eval_prompts, random.Random(cfg.seed + 3))
            responses = sample_responses(model, enc, eval_prompts, cfg.max_new_tokens, cfg.temperature, device, gen)
            demos = [d for _, d in data.make_demonstrations(eval_prompts, cfg.seed + 4)]
            demos = data.Replies(demos, [data.marked_end(d) for d in demos])
            gold_sft, gold_demo = gold_by_kind(eval_prompts, responses), gold_by_kind(eval_prompts, demos)
            golds = responses.golds(eval_prompts[:8])
            print(table([(p.strip(), r, g) for p, r, g in zip(eval_prompts[:8], responses.texts, golds)],
                        ["test prompt", f"SFT sample (T={cfg.temperature})", "gold"], [44, 70, 5]))
            print(table([(k, gold_demo[k], gold_sft.get(k, float("nan"))) for k in gold_demo],
                        ["kind", "gold: demonstrations", "gold: SFT samples"], [8, 20, 18]))
            metrics.update(gold_sft=gold_sft["all"], gold_demos=gold_demo["all"], gold_sft_by_kind=gold_sft,
                           gold_demos_by_kind=gold_demo)
        elif cfg.data == "chains":  # final answer, steps and gold by the task's rules; demonstrations are all right
            eval_prompts = splits["test"][:cfg.n_eval_prompts]
            responses = sample_responses(model, enc, eval_prompts, cfg.max_new_tokens, cfg.temperature, device, gen)
            chains = arithmetic_chains.score_replies(eval_prompts, responses.texts, responses.ended)
            golds = [arithmetic_chains.gold_reward(p, t, e) for p, t, e in
                     zip(eval_prompts[:8], responses.texts, responses.ended)]
            print(table([(p.strip(), r, g) for p, r, g in zip(eval_prompts[:8], responses.texts, golds)],
                        ["test prompt", f"SFT sample (T={cfg.temperature})", "gold"], [44, 70, 5]))
            print(table(list(chains.items()), ["chains metric", "SFT samples"], [12, 11]))
            metrics.update(gold_sft=chains["gold"], chains_sft=chains)
        else:  # no gold reward for real data: show samples next to the chosen responses
            test = splits["test"][:cfg.n_eval_prompts]
            eval_prompts = [r["prompt"] for r in test]
            responses = sample_responses(model, enc, eval_prompts, cfg.max_new_tokens, cfg.temperature, device, gen)
            print(table([(p[-120:].strip(), r, t["chosen"]) for p, r, t in zip(eval_prompts[:8], responses.texts, test)],
                        ["test prompt (end)", f"SFT sample (T={cfg.temperature})", "chosen (data)"], [40, 50, 50]))
        ended = mean(responses.ended)
        metrics.update(ended_fraction=ended, n_eval_prompts=len(eval_prompts))
        run.log.write(step=cfg.max_iters, **{k: v for k, v in metrics.items() if not isinstance(v, dict)})

        plot_curves(os.path.join(cfg.out_dir, "sft_loss.png"), read_jsonl(run.log_path), "step",
                    [["train_loss", "val_loss"]], "SFT: response-token cross-entropy", logy=(0,))
        run.finish(metrics, responses_generated=0, policy_steps=cfg.max_iters)
        gold = (f"gold reward SFT {metrics['gold_sft']:.3f} vs demonstrations {metrics['gold_demos']:.3f}, "
                if "gold_demos" in metrics else f"final answers right {metrics['chains_sft']['answer_acc']:.3f}, "
                f"steps right {metrics['chains_sft']['step_acc']:.3f}, " if "chains_sft" in metrics else "")
        print(f"SFT done in {train_time:.0f}s: val loss {vl:.4f}, {gold}{100 * ended:.0f}% ended with EOS -> {run.ckpt_path}")
        return metrics


if __name__ == "__main__":
    run_main(main)
