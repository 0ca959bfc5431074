"""Studies built on the stages: every method from one SFT + RM (compare.py), the paper's ablations
(experiments.py) and the benchmark (bench.py). Run from the repository root, e.g. `python -m studies.compare`."""
