"""The methods the RLHF papers compare PPO against, one flat file each, beside the reading path's ppo_rlhf.py:
REINFORCE / RLOO (rloo.py), RAFT (raft.py), DPO (dpo.py) and A-LoL (alol.py). Run from the repository root,
e.g. `python -m algorithms.rloo --help`."""
