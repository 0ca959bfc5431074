"""
Process supervision, part 2: GRPO on the arithmetic-chain task rewarded by the process reward model's score of
every step, against GRPO rewarded by the outcome reward model's score of the whole reply (DeepSeekMath, Shao et
al. 2024, §4.1.3 "Process Supervision RL with GRPO" against §4.1.2 "Outcome Supervision"), at the same budget:
the same prompts, samples, minibatches and optimizer steps; only the reward and its advantage differ. The rule
that labels every step (algorithms/arithmetic_chains.py) measures what each one really improves, and where the PRM's
score rises while the rule's step accuracy does not (the PRM over-optimised).

One iteration (DSM Algorithm 1 with M = 1):
  1. sample    P prompts, G replies each (prompt-major rows p·G + j) from π_old = π_θ, with log π_old and log π_ref
               per token (runs.sample_and_score, the ORM scoring the last token); the PRM read at the token
               that ends each sentence (algorithms/process_steps.py)
  2. reward    outcome  r_i = σ(ORM logit of reply i);  Â_{i,t} = (r_i - mean(r)) / std(r) over the group, on
                        every token of reply i (DSM §4.1.2): process supervision's one-step case, a reply with one
                        step that ends at its last token, and computed so (process_advantages)
               process  r_i^j = σ(PRM logit at the end of sentence j of reply i);  normalised over every step
                        reward of the group's G replies, r̃ = (r - mean(R)) / std(R);  Â_{i,t} = Σ_{j: end(j) ≥ t} r̃_i^j,
                        the normalised rewards of the steps that end at or after token t (DSM §4.1.3)
  3. update    one pass over shuffled minibatches of the clipped surrogate plus β·k3 to the SFT reference
               (DSM eq. 3-4), per token ℓ_t = -min(ρ_t·Â_t, clip(ρ_t, 1-ε, 1+ε)·Â_t) + β·k3_t, the mean over each
               reply's tokens, then over replies
  Every eval_interval: the policy's replies to the val prompts, judged by the rule (final answer, steps, process),
  by the PRM (its mean step probability: what the process reward pushes up) and by their KL to the reference.

Run (after train_sft.py --data chains and algorithms/process_reward.py's ORM and PRM; writes OUT_DIR/process_grpo.pt,
process_grpo_log.jsonl, process_grpo_samples.jsonl (rollouts with the rule's label of every step) and the curves):
    python -m algorithms.process_grpo --reward process --out_dir out/chains/grpo_process
    python -m algorithms.process_grpo --reward outcome --out_dir out/chains/grpo_outcome
    python -m algorithms.process_grpo --reward process_rule --out_dir out/chains/grpo_process_rule   # the oracle
    python -m algorithms.process_grpo --preset tiny --sft_ckpt out/chains_tiny/sft.pt --orm_ckpt out/chains_tiny/orm.pt \
        --prm_ckpt out/chains_tiny/prm_rule.pt --out_dir out/chains_tiny/grpo
    python -m algorithms.process_grpo --help

Deliberate choices:
  1. Rewards are the models' probabilities σ(logit) in [0, 1], not logits: the process reward is a sum of
     per-step terms, and a logit's unbounded range would let one confident step outweigh the rest.
  2. A group whose rewards are all equal (outcome) or whose step rewards are all equal (process) gets Â = 0
     exactly, as algorithms/grpo.py (its choice 2); a reply with no sentence has no step reward and Â = 0.
  3. G = 4 × P = 16 prompts, 2 minibatches, lr 3e-5, β = 0.04, ε = 0.2: algorithms/grpo.py's defaults.
  4. --reward process_rule / outcome_rule put the rule where a reward model was (as grpo.py's --reward gold):
     the same loop on the true labels, so a run on a model's reward can be told apart from what its labels teach.

Shape legend: P prompts, G samples per prompt, N = P·G replies, Tr response length, S sentences of a reply,
n minibatch rows.
"""
import copy
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

import tokenizer as tok
from model import k1, k3, logprobs_from_logits, masked_mean, response_logits
from runs import (Run, RunOptions, check_finite, field, load_policy, load_reward_model, parse_config, plot_curves,
                  read_jsonl, run_main, sample_and_score, table)
from tokenizer import encode_prompts
from algorithms.process_steps import aggregate, outcome_labels, read_steps, rule_labels, step_replies
from algorithms import arithmetic_chains


@dataclass
class Config(RunOptions):
    sft_ckpt: str = field("out/chains/sft.pt", "SFT checkpoint (--data chains): initial policy and frozen reference",
                          input_file=True)
    orm_ckpt: str = field("out/chains/orm.pt", "outcome reward model (process_reward --labels outcome)",
                          input_file=True)
    prm_ckpt: str = field("out/chains/prm_rule.pt", "process reward model (process_reward --labels rule or "
                                                     "monte_carlo)", input_file=True)
    out_dir: str = field("out/chains/grpo_process", "where the checkpoint, logs and curves go")
    reward: str = field("process", "process (the PRM's score of every step, DSM §4.1.3), outcome (the ORM's "
                                   "score of the reply, §4.1.2), or the rule in a model's place: process_rule (each "
                                   "step's true label), outcome_rule (the final answer right)",
                        choices=("process", "outcome", "process_rule", "outcome_rule"))
    n_iters: int = field(100, "iterations (sample, reward, update)", range="[1, inf)")
    prompts_per_iter: int = field(16, "P prompts per iteration; N = P·G replies", range="[1, inf)")
    samples_per_prompt: int = field(4, "G: replies sampled per prompt (at least 2)", range="[2, inf)")
    ratio_clip: float = field(0.2, "ε: ratios outside [1 - ε, 1 + ε] are clipped", range="[0, 1)")
    kl_coef: float = field(0.04, "β of the k3 KL term in the loss (DSM 0.04)", range="[0, inf)")
    max_new_tokens: int = field(48, "longest reply", range="[1, inf)")
    temperature: float = field(1.0, "sampling temperature, used for every log-prob too", range="(0, inf)")
    minibatches: int = field(2, "optimizer steps per iteration", range="[1, inf)")
    lr: float = field(3e-5, "policy learning rate (AdamW)", range="(0, inf)")
    grad_clip: float = field(1.0, "grad-norm clip (0 = off)", range="[0, inf)")
    eval_interval: int = field(10, "every N iterations: the val prompts judged by the rule, the PRM and the KL",
                               range="[1, inf)")
    n_eval_prompts: int = field(200, "val prompts (one reply each) for the evaluation", range="[1, inf)")


PRESETS = {
    "default": {},
    "tiny": dict(n_iters=3, prompts_per_iter=4, samples_per_prompt=2, max_new_tokens=32, eval_interval=2,
                 n_eval_prompts=8),
}
STD_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------
# Pure functions (imported by the tests)

def process_advantages(step_rewards, ends, group_size, width):
    """
    Step 2, process (DSM §4.1.3): step_rewards N lists (one reward per sentence of each reply, prompt-major),
    ends N lists (the response token that ends each sentence) -> advantages (N, width): each reward normalised
    by the mean and sample std of every step reward of its group, then Â_{i,t} = Σ_{j: ends_j ≥ t} r̃_i^j.
    A group whose step rewards are all equal (or that has fewer than 2) gets 0.
    """
    adv = torch.zeros(len(step_rewards), width, dtype=torch.float64)          # (N, Tr)
    for g0 in range(0, len(step_rewards), group_size):
        group = [torch.tensor(r, dtype=torch.float64) for r in step_rewards[g0:g0 + group_size]]
        R = torch.cat(group)                                                   # (all steps of the group,)
        if len(R) < 2 or R.max() == R.min():
            continue
        mean, std = R.mean(), R.std()
        for i, (r, e) in enumerate(zip(group, ends[g0:g0 + group_size])):
            at = torch.zeros(width, dtype=torch.float64)                      # (Tr,) r̃ at each step's end token
            at[torch.tensor(e, dtype=torch.long)] = (r - mean) / (std + STD_EPS)
            adv[g0 + i] = at.flip(0).cumsum(0).flip(0)                         # Σ over the ends at or after t
    return adv.float()


def policy_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip, kl_coef):
    """Step 3, DSM eq. 3: per token -min(ρ·Â, clip(ρ, 1-ε, 1+ε)·Â) + β·k3, ρ = π_θ/π_old, the mean over each
    reply's tokens, then over replies. logprobs, old_logprobs, ref_logprobs, advantages, mask: (n, Tr)."""
    m = mask.bool()
    logprobs, old_logprobs, ref_logprobs = (torch.where(m, x, torch.zeros_like(x))
                                            for x in (logprobs, old_logprobs, ref_logprobs))   # (n, Tr) PAD-safe
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20, 20))                # (n, Tr)
    per_token = -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages) \
        + kl_coef * k3(logprobs, ref_logprobs)                              # (n, Tr)
    per_token = torch.where(m, per_token, torch.zeros_like(per_token))
    loss = (per_token.sum(1) / m.sum(1).clamp(min=1)).mean()
    clipped = ((ratio - 1).abs() > clip) & (advantages != 0)                   # (n, Tr) where the clip may bind
    return loss, dict(ratio=masked_mean(ratio, mask).item(), clipfrac=masked_mean(clipped.float(), mask).item())


# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def judge(policy, ref, orm, prm, enc, prompts, cfg, device, seed):
    """The policy's replies to `prompts` (a generator of `seed`: the same stream at every evaluation) judged by the
    rule (arithmetic_chains.score_replies), the PRM (the mean over replies of its mean step probability, and of the
    product), the ORM (mean σ) and the KL to the reference (k1 summed over each reply, averaged)."""
    prompt_ids, prompt_mask = encode_prompts(enc, prompts, policy.cfg.block_size - cfg.max_new_tokens, True)
    ro = sample_and_score(policy, ref, orm, prompt_ids.to(device), prompt_mask.to(device), cfg.max_new_tokens,
                          cfg.temperature, tok.eos_id(enc), tok.pad_id(enc),
                          torch.Generator(device=device).manual_seed(seed))
    replies = step_replies(enc, prompts, ro.response.tolist())
    logits = read_steps(prm, replies, tok.pad_id(enc), device)
    prm_step = [torch.sigmoid(torch.tensor(l)).mean().item() if l else 0.0 for l in logits]
    rule = arithmetic_chains.score_replies(replies.prompts, replies.texts, replies.ended)
    return dict(rule, prm_step=sum(prm_step) / len(prm_step), prm_product=sum(aggregate(logits, "product")) / len(replies),
                orm=torch.sigmoid(ro.scores.float()).mean().item(),
                kl_sft=k1(ro.old_logprobs, ro.ref_logprobs, ro.mask).sum(1).mean().item()), replies


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[1])
    if (cfg.prompts_per_iter * cfg.samples_per_prompt) % cfg.minibatches:
        raise ValueError(f"--minibatches {cfg.minibatches} must divide the {cfg.prompts_per_iter * cfg.samples_per_prompt}"
                         f" replies (prompts_per_iter × samples_per_prompt)")
    G = cfg.samples_per_prompt
    with Run(cfg, "process_grpo") as run:
        device = run.device
        policy, sft = load_policy(cfg.sft_ckpt, ("sft",))
        if sft["config"].get("data") != "chains":
            raise ValueError(f"{cfg.sft_ckpt}: trained with --data {sft['config'].get('data')}, not chains")
        policy.to(device)
        ref = copy.deepcopy(policy).eval().requires_grad_(False)              # the frozen SFT reference
        orm = load_reward_model(cfg.orm_ckpt, ("orm",), sft, cfg.sft_ckpt)[0].to(device)
        prm = load_reward_model(cfg.prm_ckpt, ("prm_rule", "prm_mc"), sft, cfg.sft_ckpt)[0].to(device)
        enc = tok.get_tokenizer(sft["tokenizer"])
        pad_id, eos_id = tok.pad_id(enc), tok.eos_id(enc)
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        print(f"device={device} config={asdict(cfg)}")
        splits = arithmetic_chains.splits(sft["config"]["seed"])
        rng = random.Random(cfg.seed)                                          # prompt draws, minibatch order
        gen = torch.Generator(device=device).manual_seed(cfg.seed)            # token sampling
        meta = dict(model_config=sft["model_config"], tokenizer=sft["tokenizer"], tokenizer_id=sft["tokenizer_id"],
                    sft_ckpt=cfg.sft_ckpt, orm_ckpt=cfg.orm_ckpt, prm_ckpt=cfg.prm_ckpt)
        run.begin(opt, dict(model=policy), meta, cfg.n_iters, rng, gen, samples=True)
        val_prompts = splits["val"][:cfg.n_eval_prompts]

        def evaluate(it, row):
            scores, replies = judge(policy, ref, orm, prm, enc, val_prompts, cfg, device, cfg.seed + 1)
            row.update({f"val_{k}": v for k, v in scores.items()})
            for p, t, e in list(zip(replies.prompts, replies.texts, replies.ended))[:4]:   # rollouts users can read
                run.samples.write(iter=it, prompt=p, response=t, gold=arithmetic_chains.gold_reward(p, t, e),
                                  steps=[[s, ok] for s, ok in arithmetic_chains.sentence_labels(p, t, e)])
            return scores

        row = dict(iter=0)
        if run.start == 1:
            evaluate(0, row)
            run.log.write(**row)
        for it in range(run.start, cfg.n_iters + 1):
            t_it = time.time()
            # 1. sample G replies per prompt from π_old; the ORM scores each reply, the PRM each sentence
            prompts = [p for p in rng.sample(splits["train"], cfg.prompts_per_iter) for _ in range(G)]
            prompt_ids, prompt_mask = encode_prompts(enc, prompts, policy.cfg.block_size - cfg.max_new_tokens, True)
            ro = sample_and_score(policy, ref, orm, prompt_ids.to(device), prompt_mask.to(device), cfg.max_new_tokens,
                                  cfg.temperature, eos_id, pad_id, gen)       # ro.scores (N,) the ORM's logit
            replies = step_replies(enc, prompts, ro.response.tolist())
            step_probs = [torch.sigmoid(torch.tensor(l)).tolist() for l in read_steps(prm, replies, pad_id, device)]
            outcome = torch.sigmoid(ro.scores.float())                         # (N,) σ(ORM logit)
            check_finite(f"process GRPO iteration {it}", orm=outcome.sum(), prm=sum(map(sum, step_probs)))
            # 2. advantages: one per reply on every token (outcome) or the sum of the later steps' (process)
            last = [[len(ids) - 1] for ids in replies.response_ids]     # outcome: one "step", ending at the end
            rewards, ends = {"outcome": ([[r] for r in outcome.tolist()], last),
                             "process": (step_probs, replies.ends),
                             "outcome_rule": (outcome_labels(replies), last),
                             "process_rule": (rule_labels(replies), replies.ends)}[cfg.reward]
            adv = process_advantages(rewards, ends, G, ro.response.shape[1]).to(device) * ro.mask   # (N, Tr)
            # 3. clipped surrogate + β·k3, one pass over shuffled minibatches
            policy.train()
            order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
            stats = []
            for idx in order.to(device).chunk(cfg.minibatches):
                logits = response_logits(policy, ro.seq[idx], ro.seq_mask[idx], ro.n_prompt, cfg.temperature)
                logprobs = logprobs_from_logits(logits, ro.response[idx])     # (n, Tr)
                loss, s = policy_loss(logprobs, ro.old_logprobs[idx], ro.ref_logprobs[idx], adv[idx], ro.mask[idx],
                                      cfg.ratio_clip, cfg.kl_coef)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
                check_finite(f"process GRPO iteration {it}", loss=loss.item(), grad_norm=gnorm.item())
                opt.step()
                stats.append(dict(s, loss=loss.item(), grad_norm=gnorm.item()))
            rule = arithmetic_chains.score_replies(prompts, replies.texts, replies.ended)
            row = dict(iter=it, orm=outcome.mean().item(),
                       prm_step=sum(sum(p) / len(p) if p else 0.0 for p in step_probs) / len(step_probs),
                       answer_acc=rule["answer_acc"], step_acc=rule["step_acc"], process_acc=rule["process_acc"],
                       kl_seq=k1(ro.old_logprobs, ro.ref_logprobs, ro.mask).sum(1).mean().item(),
                       length=ro.mask.sum(1).float().mean().item(), adv_abs_mean=masked_mean(adv.abs(), ro.mask).item(),
                       **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}, t_iter=time.time() - t_it)
            if it % cfg.eval_interval == 0 or it == cfg.n_iters:
                evaluate(it, row)
            run.log.write(**row)
            print(run.progress.line(it, f"answers {row['answer_acc']:.2f} steps {row['step_acc']:.2f} PRM "
                                        f"{row['prm_step']:.2f} ORM {row['orm']:.2f} KL {row['kl_seq']:.2f}"))
            run.save(it)

        metrics = {k[4:]: v for k, v in row.items() if k.startswith("val_")}
        metrics.update(train_time_s=run.train_time())
        _, replies = judge(policy, ref, orm, prm, enc, val_prompts[:6], cfg, device, cfg.seed + 1)
        print(table([(p.strip(), t, arithmetic_chains.gold_reward(p, t, e)) for p, t, e in
                     zip(replies.prompts, replies.texts, replies.ended)], ["val prompt", "reply", "gold"], [44, 70, 5]))
        plot_curves(os.path.join(cfg.out_dir, "process_grpo_curves.png"), read_jsonl(run.log_path), "iter",
                    [["answer_acc", "val_answer_acc"], ["step_acc", "val_step_acc"], ["prm_step", "val_prm_step"],
                     ["orm", "val_orm"], ["kl_seq", "val_kl_sft"], ["length"]],
                    f"GRPO on arithmetic chains, {cfg.reward} reward")
        run.finish(metrics, responses_generated=cfg.n_iters * cfg.prompts_per_iter * G,
                   policy_steps=cfg.n_iters * cfg.minibatches)
        print(f"process GRPO ({cfg.reward} reward) done in {metrics['train_time_s']:.0f}s: val final answers right "
              f"{metrics['answer_acc']:.3f}, steps right {metrics['step_acc']:.3f}, PRM step score {metrics['prm_step']:.3f},"
              f" KL to SFT {metrics['kl_sft']:.2f} -> {run.ckpt_path}")
        return metrics


if __name__ == "__main__":
    run_main(main)
