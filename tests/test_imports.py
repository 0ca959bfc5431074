"""Imports flow one way, down the reading path (every import counts, function-level ones too):
library modules (model, tokenizer, data, runs, and the process-supervision task and steps in algorithms/)
import no stage, no algorithm file and no study; a stage never imports a later stage or an algorithm file; an
algorithm file imports neither another algorithm file nor a stage; no training stage imports studies/evaluate.py;
nothing imports in a circle. `python tests/test_imports.py` prints the graph: each file's project imports."""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("train_sft", "reward_model", "ppo_rlhf", "pipeline")          # the reading path, in order
TRAINING_STAGES = STAGES[:3]
LIBRARY_FOLDERS = ("tokenizer",)
LIBRARY = ("model", "tokenizer", "data", "runs", "algorithms.arithmetic_chains", "algorithms.process_steps")


def project_modules(root=ROOT):
    """{module name: file path} of every Python file of the project (tests and notebooks' helpers included)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "notebooks", "out")]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), root)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def imports_of(path, modules):
    """The project modules a file imports, anywhere in it (module level or inside functions), sorted."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return sorted(found)


def graph(root=ROOT):
    modules = project_modules(root)
    return {m: [i for i in imports_of(p, modules) if i != m] for m, p in sorted(modules.items())}


def kind(module):
    top = module.split(".")[0]
    if module in LIBRARY or top in LIBRARY_FOLDERS:
        return "library"
    if module in STAGES:
        return "stage"
    return {"algorithms": "algorithm", "studies": "study", "tests": "test"}.get(top, "other")


def forbidden(g):
    """Every import that goes against the flow, as 'a -> b: why'."""
    bad = []
    for a, targets in g.items():
        for b in targets:
            ka, kb = kind(a), kind(b)
            if b in ("algorithms", "studies"):
                continue                                             # a package's docstring-only __init__
            why = None
            if ka == "library" and kb in ("stage", "algorithm", "study"):
                why = f"a library module imports a {kb}"
            elif ka == "stage" and kb == "stage" and STAGES.index(b) > STAGES.index(a):
                why = "a stage imports a later stage"
            elif ka == "stage" and kb == "algorithm":
                why = "a stage imports an algorithm file"
            elif ka == "algorithm" and kb in ("algorithm", "stage"):
                why = f"an algorithm file imports {'another algorithm file' if kb == 'algorithm' else 'a stage'}"
            elif (a in TRAINING_STAGES or ka == "algorithm") and b == "studies.evaluate":
                why = "a training stage imports studies/evaluate.py"
            elif ka in ("stage", "algorithm") and kb == "study" and a != "pipeline":
                why = f"a {ka} imports a study"
            if why:
                bad.append(f"{a} -> {b}: {why}")
    return bad


def cycles(g):
    """One cycle through each strongly connected group of modules, as lists 'a -> b -> ... -> a'."""
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for n in g.get(m, []):
            if state.get(n) == "open":
                found.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in g:
        if m not in state:
            visit(m, [m])
    return found


def test_imports_flow_one_way():
    assert forbidden(graph()) == []


def test_no_import_cycle_anywhere():
    assert cycles(graph()) == []


def test_the_checks_catch_a_cycle_and_a_wrong_direction():
    """The two checks on a made-up graph: an algorithm importing a stage, and a library cycle."""
    g = {"algorithms.rloo": ["ppo_rlhf", "algorithms.raft"], "ppo_rlhf": ["pipeline"], "pipeline": [],
         "algorithms.raft": [], "runs": ["data"], "data": ["runs"], "model": ["train_sft"],
         "train_sft": [], "reward_model": ["studies.evaluate"], "studies.evaluate": []}
    assert sorted(forbidden(g)) == ["algorithms.rloo -> algorithms.raft: an algorithm file imports another algorithm file",
                                    "algorithms.rloo -> ppo_rlhf: an algorithm file imports a stage",
                                    "model -> train_sft: a library module imports a stage",
                                    "ppo_rlhf -> pipeline: a stage imports a later stage",
                                    "reward_model -> studies.evaluate: a training stage imports studies/evaluate.py"]
    assert cycles(g) == [["runs", "data", "runs"]]


if __name__ == "__main__":
    g = graph()
    for m, targets in g.items():
        if kind(m) in ("stage", "algorithm", "library") or "-a" in sys.argv:
            shown = [t for t in targets if t not in ("algorithms", "studies")]
            print(f"{m:28s} ({kind(m)}) -> {', '.join(shown) or '-'}")
    print("forbidden:", forbidden(g) or "none", "| cycles:", cycles(g) or "none")
