"""Studies built on the stages: one evaluation for every policy (evaluate.py), every method from one SFT + RM
(compare.py), the paper's ablations (experiments.py), over-optimisation, process supervision, the benchmark
(bench.py), the run report (report.py) and the pages' generator (reproduce.py). Run from the repository root,
e.g. `python -m studies.compare`."""
