"""The debugger path (docs/debugging.md): the debug preset reaches every PPO step in its first iteration, and a
pdb session stopped in step 6 of the second iteration sees a KL reward that is not 0."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SESSION = """b ppo_rlhf.ppo_policy_loss
c
c
p ((logprobs - old_logprobs) * mask).abs().max().item()
up
up
p it
p k1(ro.old_logprobs, ro.ref_logprobs, ro.mask).abs().max().item()
q
"""


def test_a_pdb_session_stops_in_step_6_with_a_nonzero_kl_reward(tiny_pipeline, tmp_path):
    cmd = [sys.executable, "-m", "pdb", "ppo_rlhf.py", "--preset", "debug", "--device", "cpu",
           "--sft_ckpt", os.path.join(tiny_pipeline, "sft.pt"), "--rm_ckpt", os.path.join(tiny_pipeline, "rm.pt"),
           "--out_dir", str(tmp_path / "debug")]
    r = subprocess.run(cmd, cwd=ROOT, input=SESSION, capture_output=True, text=True, timeout=300)
    answers = re.findall(r"\(Pdb\) (\S+)\n", r.stdout)
    stops = r.stdout.count("ppo_rlhf.py(") - 1                      # the first is the module's line 1
    assert stops >= 4 and "ppo_policy_loss()" in r.stdout, r.stdout[-3000:]
    ratio_gap, it, kl_max = float(answers[-3]), int(answers[-2]), float(answers[-1])
    assert ratio_gap < 1e-3                       # the first minibatch's ratio is 1 on real tokens
    assert it == 2 and kl_max > 0                 # iteration 2: the policy moved, the KL reward is not 0


def test_the_debug_preset_updates_the_policy_from_iteration_1():
    import ppo_rlhf
    from algorithms import alol, dpo, grpo, raft, reinforce, rloo
    assert ppo_rlhf.PRESETS["debug"]["critic_pretrain_iters"] == 0
    assert ppo_rlhf.PRESETS["debug"]["rollout_batch"] == 4
    for module in (grpo, rloo, raft):
        p = module.PRESETS["debug"]
        assert p["prompts_per_iter"] * p["samples_per_prompt"] == 4
    assert reinforce.PRESETS["debug"]["prompts_per_iter"] == 4
    assert dpo.PRESETS["debug"]["batch_size"] == alol.PRESETS["debug"]["batch_size"] == 4


def test_next_over_the_loop_body_stays_in_the_stage_file(tiny_pipeline, tmp_path):
    """pdb's `next` from the loop's checkpoint line (run.save) goes on to the next iteration's first line in
    ppo_rlhf.py: the loop is a plain range, so stepping over its body never enters the checkpoint code."""
    lines = open(os.path.join(ROOT, "ppo_rlhf.py"), encoding="utf-8").read().split("\n")
    save = next(i + 1 for i, line in enumerate(lines) if line.strip().startswith("run.save(it,"))
    session = f"b ppo_rlhf.py:{save}\nc\nn\nn\nn\nq\n"
    cmd = [sys.executable, "-m", "pdb", "ppo_rlhf.py", "--preset", "debug", "--device", "cpu",
           "--sft_ckpt", os.path.join(tiny_pipeline, "sft.pt"), "--rm_ckpt", os.path.join(tiny_pipeline, "rm.pt"),
           "--out_dir", str(tmp_path / "debug")]
    r = subprocess.run(cmd, cwd=ROOT, input=session, capture_output=True, text=True, timeout=300)
    stops = re.findall(r"> (\S+?)\((\d+)\)\w", r.stdout)              # every place pdb stopped
    after_break = stops[stops.index(next(s for s in stops if s[1] == str(save))):]
    assert len(after_break) == 4, r.stdout[-3000:]                  # the breakpoint and three `next`s
    assert all(os.path.basename(path) == "ppo_rlhf.py" for path, _ in after_break), after_break
