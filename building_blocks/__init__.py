"""Library building blocks the stages and algorithm files share, each module named for what it holds: token
sequences and batches (sequences.py), sampling responses and scoring them (sampling.py), the KL estimators
(kl.py), and the training monitors and samples log of the RL stages (monitors.py). They import no stage and
no algorithm file (tests/test_imports.py checks it)."""
