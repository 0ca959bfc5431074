"""The methods the RLHF papers compare PPO against, one flat file each, beside the reading path's ppo_rlhf.py:
REINFORCE / RLOO (rloo.py), RAFT (raft.py), DPO (dpo.py), A-LoL (alol.py), the GRPO family (grpo.py), and
REINFORCE with a batch-mean baseline (reinforce.py, the worked example of docs/adding_an_algorithm.md); process
supervision (process_reward.py, process_grpo.py) on its task (arithmetic_chains.py, process_steps.py). Each method
file imports only library modules, never a stage or another method file. Run from the repository root, e.g.
`python -m algorithms.rloo --help`."""
