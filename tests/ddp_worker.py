"""
What tests/test_distributed.py runs in each process, under `torchrun --nproc_per_node 2` (Gloo on CPU) or with
plain python (one process, the reference). Not a test file itself:

    python tests/ddp_worker.py sft OUT                 # one SFT step (grad_accum 2) -> OUT/rank{r}.pt
    python tests/ddp_worker.py rm OUT SFT_CKPT         # one reward-model step (grad_accum 2) -> OUT/rank{r}.pt
    python tests/ddp_worker.py ppo OUT                 # one PPO update on this rank's rollout -> OUT/rank{r}.pt
    python tests/ddp_worker.py tokens OUT              # a token mean over unequal token counts -> OUT/rank{r}.pt

Each saves what the test compares: the gradients just before the optimizer step (recorded by wrapping
clip_grad_norm_, which every stage calls right before opt.step()), the weights after it, and for `ppo` the
rollout, the running score statistics and the whitened advantages.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ppo_rlhf  # noqa: E402
import reward_model  # noqa: E402
import train_sft  # noqa: E402
from model import GPT, GPTConfig, ScalarHeadGPT
from ppo_rlhf import masked_whiten
from runs import data_parallel, global_masked_moments, leave_ranks, rank, share_of_global_tokens, start_ranks, world_size

TINY = ["--preset", "tiny", "--device", "cpu", "--overwrite", "true"]


def record_gradients(monkeypatch=None):
    """Wrap clip_grad_norm_ so the first call keeps (params, a copy of their gradients); returns that record.
    In a test process, pass pytest's monkeypatch so the wrapper goes away after the test."""
    seen, original = {}, torch.nn.utils.clip_grad_norm_

    def clip_and_record(parameters, *args, **kwargs):
        parameters = list(parameters)
        if not seen:
            seen["params"] = parameters
            seen["grads"] = [p.grad.detach().clone() for p in parameters]
        return original(parameters, *args, **kwargs)

    if monkeypatch is not None:
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_record)
    else:
        torch.nn.utils.clip_grad_norm_ = clip_and_record
    return seen


def save(out, seen, **more):
    torch.save(dict(grads=seen["grads"], weights=[p.detach().clone() for p in seen["params"]], **more),
               os.path.join(out, f"rank{rank()}.pt"))


def sft(out):
    seen = record_gradients()
    train_sft.main(TINY + ["--out_dir", os.path.join(out, "run"), "--max_iters", "1", "--batch_size", "8",
                           "--grad_accum", "2", "--n_train", "64", "--n_val", "16", "--eval_interval", "1",
                           "--n_eval_prompts", "2"])
    save(out, seen)


def rm(out, sft_ckpt):
    seen = record_gradients()
    reward_model.main(TINY + ["--out_dir", os.path.join(out, "run"), "--sft_ckpt", sft_ckpt, "--batch_size", "8",
                              "--grad_accum", "2", "--n_train", "16", "--n_val", "8", "--n_test", "8"])
    save(out, seen)


def tiny_models():
    """Policy, reference, reward model and critic of one tiny random shape, the same in every process."""
    torch.manual_seed(0)
    shape = GPTConfig(vocab_size=40, block_size=24, n_layer=1, n_head=2, n_embd=16, dropout=0.0, pad_id=0)
    return GPT(shape), GPT(shape), ScalarHeadGPT(shape), ScalarHeadGPT(shape)


PPO_CFG = ppo_rlhf.Config(rollout_batch=8, minibatches=1, epochs=1, adv_whiten=True, policy_lr=1e-2,
                          critic_lr=1e-2)


def ppo(out):
    """One PPO update of a 2-rank run: each rank scores and updates its own 4 rollouts (8 in all)."""
    device = start_ranks("cpu")
    policy, ref, rm_model, critic = tiny_models()
    sampling = torch.Generator().manual_seed(100 + rank())              # each rank its own prompts and samples
    prompt_ids = torch.randint(1, 40, (PPO_CFG.rollout_batch // 2, 5), generator=sampling)  # (4, 5)
    ro = ppo_rlhf.sample_and_score(policy, ref, rm_model, prompt_ids.to(device), torch.ones_like(prompt_ids), 6, 1.0,
                                   None, 0, sampling)                    # eos None: every response 6 tokens
    values = ppo_rlhf.critic_values(critic, ro)                          # (4, 6)
    running = ppo_rlhf.RunningMoments()
    scores = ppo_rlhf.process_scores(ro.scores, running, "norm_clip", 0.8)           # (4,)
    rewards = ppo_rlhf.kl_rewards(ro.old_logprobs, ro.ref_logprobs, ro.mask, scores, 0.1)
    advantages, returns = ppo_rlhf.compute_gae(rewards, values, ro.mask, 1.0, 0.95)
    seen = record_gradients()
    train_policy, train_critic = data_parallel(policy), data_parallel(critic)
    opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": PPO_CFG.policy_lr},
                             {"params": critic.parameters(), "lr": PPO_CFG.critic_lr}], weight_decay=0.0)
    ppo_rlhf.ppo_update(train_policy, train_critic, opt, ro, values, advantages, returns, PPO_CFG, True,
                        torch.Generator().manual_seed(0))
    save(out, seen, rollout={k: v for k, v in vars(ro).items()}, values=values, advantages=advantages, returns=returns,
         running=[running.mean, running.var, running.count],
         whitened=masked_whiten(advantages, ro.mask, moments=global_masked_moments(advantages, ro.mask)))


def tokens(out):
    """The weighting PPO's losses (policy, value and PTX), SFT's and GRPO's token-mean take under torchrun: rank r
    averages a loss over its own tokens (3 on rank 0, 7 on rank 1: unequal, as PTX demonstrations are) and weighs
    it by share_of_global_tokens; one process averages over all 10 tokens."""
    start_ranks("cpu")                                                   # join the group (as the stages do)
    torch.manual_seed(0)
    model, x = torch.nn.Linear(3, 1), torch.randn(10, 3)                 # every process: the same model and tokens
    mine = x if world_size() == 1 else (x[:3] if rank() == 0 else x[3:])
    train_model = data_parallel(model)
    loss = (train_model(mine) ** 2).mean()                               # this rank's per-token mean
    (share_of_global_tokens(torch.tensor(len(mine)), torch.tensor(len(mine))) * loss).backward()
    torch.save(dict(grads=[p.grad.clone() for p in model.parameters()]), os.path.join(out, f"rank{rank()}.pt"))


if __name__ == "__main__":
    case, out, *rest = sys.argv[1:]
    os.makedirs(out, exist_ok=True)
    {"sft": sft, "rm": rm, "ppo": ppo, "tokens": tokens}[case](out, *rest)
    leave_ranks()
