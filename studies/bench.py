"""
Benchmark: a fixed reference PPO workload run through the real ppo_rlhf.py functions, next to the hardware floor
of that same workload measured in the same process.

The reference workload (random-init weights, fp32, no early stop, so every system does the same work):
  GPT 4 layers x 4 heads x 128 wide, vocab 8192 (--vocab 50257 for the GPT-2 vocabulary), context 64;
  64 rollouts per iteration of 16 random prompt tokens + exactly 48 sampled tokens;
  policy + separate critic + frozen reference + frozen reward model;
  PPO: 4 epochs x 4 minibatches of 16; 1 warm-up iteration, then the median of --iters (>= 5).
RLOO (--algo rloo) runs the same rollouts as 16 prompts x k = 4 with no critic, and rloo.py's update repeated for
4 passes of 4 minibatches of 16: 16 optimizer steps per iteration, the same work as PPO here and as TRL's
RLOOTrainer with 4 PPO epochs x 4 minibatches (rloo.py itself makes one pass: a second pass on the same samples
would need an importance ratio, so the extra passes here measure compute, not a method we train with).

What it prints:
  s/iteration, split into generate / score (reference, reward model, critic; the policy's old log-probs come
  from the sampling loop) / train (score processing, GAE, PPO update); generated tokens/s; peak RSS;
  the floor: (a) FLOPs the iteration needs / the fp32 matmul throughput measured at the shapes those matmuls
  have (the LM head and the transformer body, per part), (b) the measured time of the
  bare necessary passes: KV-cache generation, one no-grad forward per frozen model and of the critic, and
  epochs x (forward + backward + AdamW step) of policy and critic; and the ratio iteration / floor.

Run (one workload per process, so peak RSS is that workload's own):
    python -m studies.bench                    # PPO, vocab 8192
    python -m studies.bench --vocab 50257      # PPO, GPT-2's vocabulary size
    python -m studies.bench --algo rloo        # RLOO on the same rollouts
    python -m studies.bench --algo generate    # KV-cache generation of 64 x 48 tokens only
    python -m studies.bench --algo hf_generate # the same with transformers' GPT-2 generate (needs tests/requirements.txt)
    python -m studies.bench --algo pipeline    # the default pipeline.py end to end (~9 min), wall time and peak RSS
    python -m studies.bench --all              # each of the above in its own process, then a summary table
    python -m studies.bench --quick            # tiny sizes, 2 iterations: checks the wiring (the tests run this)

Shape legend: B rollouts, Tp prompt tokens, Tr response tokens, T = Tp + Tr, C width, V vocab, L layers.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import ppo_rlhf
from algorithms import rloo
from data import regular_file
from runs import json_line, run_main, sample_and_score
from model import GPT, GPTConfig, ScalarHeadGPT

WORKLOAD = dict(n_layer=4, n_head=4, n_embd=128, B=64, Tp=16, Tr=48, epochs=4, minibatch=16, k=4)
QUICK = dict(n_layer=1, n_head=2, n_embd=32, B=8, Tp=4, Tr=6, epochs=2, minibatch=4, k=2)


def peak_rss_mib():
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def make_models(w, vocab, seed=0):
    """Policy, frozen reference (a copy of it), frozen reward model, critic: random init, fp32."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=w["Tp"] + w["Tr"], n_layer=w["n_layer"], n_head=w["n_head"],
                    n_embd=w["n_embd"], pad_id=-1)
    policy = GPT(cfg)
    ref = GPT(cfg).requires_grad_(False).eval()
    ref.load_state_dict(policy.state_dict())
    rm = ScalarHeadGPT(cfg).requires_grad_(False).eval()
    critic = ScalarHeadGPT(cfg)
    return policy, ref, rm, critic


def ppo_config(w):
    """ppo_rlhf's PPO-max defaults with the workload's batch geometry (no critic pre-training: every iteration
    updates both networks)."""
    return ppo_rlhf.Config(rollout_batch=w["B"], max_new_tokens=w["Tr"], epochs=w["epochs"],
                           minibatches=w["B"] // w["minibatch"], critic_pretrain_iters=0)


def ppo_iteration(models, opt, cfg, w, vocab, gen, running):
    """One PPO iteration of the workload through ppo_rlhf's functions (main()'s steps 1-6); returns timings."""
    policy, ref, rm, critic = models
    t0 = time.time()
    p_ids = torch.randint(0, vocab, (w["B"], w["Tp"]), generator=gen)    # (B, Tp) random prompts
    p_mask = torch.ones_like(p_ids)
    ro = ppo_rlhf.sample_and_score(policy, ref, rm, p_ids, p_mask, cfg.max_new_tokens, cfg.temperature, None, -1,
                                   gen)                                   # eos None: exactly 48 tokens
    values = ppo_rlhf.critic_values(critic, ro)                           # (B, Tr)
    t_train = time.time()
    scores = ppo_rlhf.process_scores(ro.scores, running, cfg.score_norm, cfg.score_clip)        # (B,)
    rewards = ppo_rlhf.kl_rewards(ro.old_logprobs, ro.ref_logprobs, ro.mask, scores, cfg.kl_coef)
    adv, ret = ppo_rlhf.compute_gae(rewards, values, ro.mask, cfg.gamma, cfg.lam)             # (B, Tr)
    ppo_rlhf.ppo_update(policy, critic, opt, ro, values, adv, ret, cfg, True, torch.Generator().manual_seed(0))
    t_end = time.time()
    return dict(generate=ro.t_generate, score=ro.t_score, train=t_end - t_train, iteration=t_end - t0,
                tokens=int(ro.mask.sum()))


def rloo_iteration(models, opt, cfg, w, vocab, gen):
    """One RLOO iteration: B/k prompts x k samples, KL-shaped sequence reward, leave-one-out baseline, rloo_update."""
    policy, ref, rm, _ = models
    t0 = time.time()
    p_ids = torch.randint(0, vocab, (w["B"] // w["k"], w["Tp"]), generator=gen).repeat_interleave(w["k"], 0)
    ro = sample_and_score(policy, ref, rm, p_ids, torch.ones_like(p_ids), cfg.max_new_tokens, cfg.temperature, None,
                          -1, gen)
    t_train = time.time()
    rewards, _ = rloo.kl_shaped_rewards(ro.scores, ro.old_logprobs, ro.ref_logprobs, ro.mask, cfg.kl_coef)
    adv = rloo.loo_advantages(rewards, w["k"])                            # (B,)
    for epoch in range(w["epochs"]):                                      # equal work: see the docstring
        rloo.rloo_update(policy, opt, ro, adv, cfg, torch.Generator().manual_seed(epoch))
    t_end = time.time()
    return dict(generate=ro.t_generate, score=ro.t_score, train=t_end - t_train, iteration=t_end - t0,
                tokens=int(ro.mask.sum()))


# ----------------------------------------------------------------------------------------------------
# The floor

def matmul_gflops(m, k, n, repeats=5):
    """fp32 matmul throughput (GFLOP/s) of an (m, k) @ (k, n) product, best of `repeats`."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b                                                                 # warm-up
    return 2 * m * k * n / min(_timed(lambda: a @ b) for _ in range(repeats)) / 1e9


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def iteration_flops(w, vocab, algo="ppo"):
    """
    Matmul FLOPs the iteration cannot avoid, per part and per kind of matmul (2 per multiply-add; a backward
    pass costs 2 forwards), with the (m, k, n) shape that kind runs at in that part:
      body per token: 24·C²·L (qkv 6C², out-proj 2C², MLP 16C²) + attention 4·C·S·L over S visible keys
      head per scored token: 2·C·V (only response positions are scored; generation scores one per step)
    Returns {part: [(flops, (m, k, n)), ...]} for part in generate / score / train.
    """
    C, L, B, Tp, Tr, mb = w["n_embd"], w["n_layer"], w["B"], w["Tp"], w["Tr"], w["minibatch"]
    T = Tp + Tr
    body_tok = 24 * C * C * L
    attn = lambda s: 4 * C * s * L                                       # one query over s keys, all layers
    head = 2 * C * vocab
    body_seq = T * body_tok + sum(attn(s + 1) for s in range(T))        # one full causal forward of a sequence
    gen_body = B * (Tp * body_tok + sum(attn(s + 1) for s in range(Tp))  # prefill, then one token per step
                    + sum(body_tok + attn(Tp + s + 1) for s in range(Tr - 1)))
    n_fwd = 3 if algo == "ppo" else 2                                    # ref, RM (+ critic) over the batch
    epochs = w["epochs"]
    nets = 2 if algo == "ppo" else 1                                     # policy (+ critic) trained
    return dict(generate=[(gen_body, (B, C, 4 * C)), (B * Tr * head, (B, C, vocab))],
                score=[(n_fwd * B * body_seq, (B * T, C, 4 * C)), (B * Tr * head, (B * Tr, C, vocab))],
                train=[(3 * epochs * nets * B * body_seq, (mb * T, C, 4 * C)),
                       (3 * epochs * B * Tr * head, (mb * Tr, C, vocab))])


def bare_passes(models, w, vocab, algo="ppo"):
    """Time the necessary passes with no bookkeeping (returns seconds per part)."""
    policy, ref, rm, critic = models
    B, Tp, Tr = w["B"], w["Tp"], w["Tr"]
    gen = torch.Generator().manual_seed(1)
    p_ids = torch.randint(0, vocab, (B, Tp), generator=gen)
    t0 = time.time()
    with torch.no_grad():
        resp = policy.generate(p_ids, torch.ones_like(p_ids), Tr, None, -1, generator=gen).tokens  # (B, Tr)
    t1 = time.time()
    seq = torch.cat([p_ids, resp], 1)                                    # (B, T)
    with torch.no_grad():
        ref.logits(ref.hidden(seq)[:, Tp - 1:-1])                        # (B, Tr, V)
        rm(seq)                                                          # (B, T)
        if algo == "ppo":
            critic(seq)                                                  # (B, T)
    t2 = time.time()
    params = list(policy.parameters()) + (list(critic.parameters()) if algo == "ppo" else [])
    opt = torch.optim.AdamW(params, lr=1e-6)
    epochs = w["epochs"]
    for _ in range(epochs):
        for idx in torch.arange(B).split(w["minibatch"]):
            s = seq[idx]                                                 # (b, T)
            logits = policy.logits(policy.hidden(s)[:, Tp - 1:-1])       # (b, Tr, V)
            loss = F.cross_entropy(logits.reshape(-1, vocab), resp[idx].reshape(-1))
            if algo == "ppo":
                loss = loss + critic(s)[:, Tp - 1:-1].pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    t3 = time.time()
    return dict(generate=t1 - t0, score=t2 - t1, train=t3 - t2)


# ----------------------------------------------------------------------------------------------------

def bench_rl(algo, vocab, w, n_iters):
    """Warm-up + n_iters iterations of PPO or RLOO, then the floor; returns a result dict."""
    models = make_models(w, vocab)
    policy, ref, rm, critic = models
    gen = torch.Generator().manual_seed(0)
    if algo == "ppo":
        cfg = ppo_config(w)
        opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": cfg.policy_lr},
                                 {"params": critic.parameters(), "lr": cfg.critic_lr}], weight_decay=0.0,
                                betas=(0.9, 0.95), eps=1e-8)
        running = ppo_rlhf.RunningMoments()
        step = lambda: ppo_iteration(models, opt, cfg, w, vocab, gen, running)
    else:
        cfg = rloo.Config(prompts_per_iter=w["B"] // w["k"], samples_per_prompt=w["k"], max_new_tokens=w["Tr"],
                          minibatches=w["B"] // w["minibatch"])
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
        step = lambda: rloo_iteration(models, opt, cfg, w, vocab, gen)
    step()                                                               # warm-up
    runs = [step() for _ in range(n_iters)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("generate", "score", "train", "iteration")}
    tokens = runs[0]["tokens"]
    flops = iteration_flops(w, vocab, algo)
    gflops = {shape: matmul_gflops(*shape) for part in flops.values() for _, shape in part}
    flop_floor = {k: sum(f / (gflops[shape] * 1e9) for f, shape in part) for k, part in flops.items()}
    flop_floor["iteration"] = sum(flop_floor.values())
    bare = [bare_passes(models, w, vocab, algo) for _ in range(3)]
    bare = {k: statistics.median(b[k] for b in bare) for k in bare[0]}   # median of 3, as ours is a median
    bare["iteration"] = sum(bare.values())
    return dict(algo=algo, vocab=vocab, threads=torch.get_num_threads(), iters=n_iters, median=med,
                runs=[r["iteration"] for r in runs], tokens_per_s=tokens / med["generate"],
                gflop=sum(f for part in flops.values() for f, _ in part) / 1e9,
                matmul_gflops={"x".join(map(str, k)): round(v, 1) for k, v in gflops.items()},
                flop_floor=flop_floor, bare_floor=bare, peak_rss_mib=peak_rss_mib(),
                ratio_bare=med["iteration"] / bare["iteration"], ratio_flops=med["iteration"] / flop_floor["iteration"])


def bench_generate(vocab, w, n_iters):
    """KV-cache generation of B x Tr tokens (no early stop): median seconds and tokens/s."""
    policy = make_models(w, vocab)[0].eval()
    gen = torch.Generator().manual_seed(0)
    p_ids = torch.randint(0, vocab, (w["B"], w["Tp"]), generator=gen)
    go = lambda: _timed(lambda: policy.generate(p_ids, torch.ones_like(p_ids), w["Tr"], None, -1, generator=gen))
    go()
    t = statistics.median(go() for _ in range(n_iters))
    return dict(algo="generate", vocab=vocab, threads=torch.get_num_threads(), seconds=t, rows=w["B"], new=w["Tr"],
                tokens_per_s=w["B"] * w["Tr"] / t, peak_rss_mib=peak_rss_mib())


def bench_hf_generate(vocab, w, n_iters):
    """The same generation with Hugging Face transformers' GPT-2 of the same size (a test-only dependency, from
    tests/requirements.txt; only this comparison uses it): sampling, KV cache, exactly Tr new tokens."""
    try:
        import transformers
    except ImportError:
        raise ValueError("--algo hf_generate needs transformers: pip install -r tests/requirements.txt") from None
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=w["Tp"] + w["Tr"], n_embd=w["n_embd"], n_layer=w["n_layer"],
        n_head=w["n_head"], bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    p_ids = torch.randint(1, vocab, (w["B"], w["Tp"]))
    kw = dict(attention_mask=torch.ones_like(p_ids), do_sample=True, max_new_tokens=w["Tr"], min_new_tokens=w["Tr"],
              top_k=0, top_p=1.0, pad_token_id=0)
    go = lambda: _timed(lambda: hf.generate(p_ids, **kw))
    go()
    t = statistics.median(go() for _ in range(n_iters))
    return dict(algo="hf_generate", vocab=vocab, threads=torch.get_num_threads(), seconds=t, rows=w["B"], new=w["Tr"],
                tokens_per_s=w["B"] * w["Tr"] / t, peak_rss_mib=peak_rss_mib())


def bench_pipeline(quick):
    """pipeline.py end to end in a child process: wall time and the child's peak RSS."""
    out = "out/bench_pipeline_tiny" if quick else "out/bench_pipeline"
    cmd = [sys.executable, "pipeline.py", "--out_dir", out] + (["--preset", "tiny"] if quick else [])
    t = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return dict(algo="pipeline", seconds=time.time() - t,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def report(r):
    """Human-readable lines for one result."""
    if r["algo"] in ("generate", "hf_generate"):
        return f"{r['algo']}  vocab {r['vocab']}: {r['seconds']:.3f} s for {r['rows']} x {r['new']} tokens = {r['tokens_per_s']:.0f} tokens/s, peak RSS {r['peak_rss_mib']:.0f} MiB"
    if r["algo"] == "pipeline":
        return f"pipeline.py end to end: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB"
    m, b, f = r["median"], r["bare_floor"], r["flop_floor"]
    lines = [f"{r['algo'].upper()} vocab {r['vocab']}, {r['threads']} threads, median of {r['iters']} iterations "
             f"(all: {', '.join(f'{x:.2f}' for x in r['runs'])})",
             f"  {'':10s} {'ours':>8s} {'bare passes':>12s} {'FLOP floor':>11s}",
             *[f"  {k:10s} {m[k]:8.3f} {b[k]:12.3f} {f[k]:11.3f}" for k in ("generate", "score", "train", "iteration")],
             f"  {r['gflop']:.1f} GFLOP per iteration; fp32 matmul GFLOP/s at the workload's (m, k, n): {r['matmul_gflops']}",
             f"  iteration / bare-pass floor = {r['ratio_bare']:.2f}; iteration / FLOP floor = {r['ratio_flops']:.2f}",
             f"  generation {r['tokens_per_s']:.0f} tokens/s; peak RSS {r['peak_rss_mib']:.0f} MiB"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", default="ppo", choices=["ppo", "rloo", "generate", "hf_generate", "pipeline"], help="what to time")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size of the workload (8192 or 50257)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations after the warm-up (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 iterations: checks the wiring")
    p.add_argument("--all", action="store_true", help="every workload, each in its own process, then a summary")
    p.add_argument("--json", default=None, help="also append the result as one JSON line to this file")
    a = p.parse_args(argv)
    for name, value, low, high in (("vocab", a.vocab, 2, 1 << 20), ("iters", a.iters, 1, 10_000),
                                   ("threads", a.threads, 0, 4096)):
        if not low <= value <= high:
            raise ValueError(f"--{name} {value}: must be in [{low}, {high}]")
    if a.json and os.path.lexists(a.json):
        regular_file(a.json, "--json")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.all:
        results = []
        jobs = [["--algo", "ppo"], ["--algo", "ppo", "--vocab", "50257"], ["--algo", "rloo"],
                ["--algo", "rloo", "--vocab", "50257"], ["--algo", "generate"], ["--algo", "hf_generate"],
                ["--algo", "pipeline"]]
        path = a.json or "out/bench.jsonl"
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        for job in jobs:
            extra = (["--quick"] if a.quick else []) + (["--threads", str(a.threads)] if a.threads else [])
            if subprocess.run([sys.executable, __file__, *job, *extra, "--json", path]).returncode:
                raise ValueError(f"the {' '.join(job)} workload failed (its error is above)")
        with open(path) as f:
            results = [json.loads(line) for line in f]
        return results
    torch.manual_seed(0)
    w = QUICK if a.quick else WORKLOAD
    n = 2 if a.quick else a.iters
    if a.algo in ("ppo", "rloo"):
        r = bench_rl(a.algo, a.vocab, w, n)
    elif a.algo == "generate":
        r = bench_generate(a.vocab, w, n)
    elif a.algo == "hf_generate":
        r = bench_hf_generate(a.vocab, w, n)
    else:
        r = bench_pipeline(a.quick)
    print(report(r), flush=True)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json_line(r))
    return r


if __name__ == "__main__":
    run_main(main)
