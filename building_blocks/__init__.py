"""Library building blocks the stages and algorithm files share, each module named for what it holds: token
sequences and batches (sequences.py), sampling responses and scoring them (sampling.py), the KL estimators
(kl.py), the training monitors and samples log of the RL stages (monitors.py), a run's plumbing (runs.py:
its folder, --resume, the Run object every stage uses) and the device with torchrun's helpers (devices.py).
They import no stage and no algorithm file (tests/test_imports.py checks it)."""
