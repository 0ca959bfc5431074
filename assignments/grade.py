"""
Grade the assignment: every part's body against the expected values stored in assignments/expected/ (and, in the
instructor's repository, assignments/hidden/), then, when asked, the end-to-end part. Run at the root of a student
copy or of the repository (the repository's own bodies are the reference: they score full marks):

    python -m assignments.grade                        # every part, seconds
    python -m assignments.grade --parts gae ppo_policy_loss
    python -m assignments.grade --root ../student_copy # the instructor: a copy, with the hidden cases
    python -m assignments.grade --end_to_end           # also the small pipeline on your code (minutes)

A case passes when every output has the stored shape, dtype and values (within float32 rounding), the gradient
reaching each input that needs one is the stored one, and no input was changed. A part earns its points when all
its cases pass. Grading imports only the code under test (the copy's modules) and reads the stored values; it never
runs a reference body. The last line is `total: X / Y points`.
"""
import argparse
import contextlib
import importlib
import io
import json
import math
import os
import subprocess
import sys
import types

import torch

from assignments.parts import PARTS

HERE = os.path.dirname(os.path.abspath(__file__))
RTOL, ATOL = 1e-4, 1e-5                   # float32 rounding of another correct order of operations
END_TO_END_POINTS = 20


# ------------------------------------------------------------------------------------------------ loading

def import_from(root, module, source=None):
    """The module as the copy at `root` has it; with `source`, a fresh module run from that text instead (the
    mutation table grades a changed body this way, without writing a file)."""
    if root not in sys.path:
        sys.path.insert(0, root)
    if source is None:
        return importlib.import_module(module)
    m = types.ModuleType(module)
    m.__file__ = os.path.join(root, module.replace(".", os.sep) + ".py")
    exec(compile(source, m.__file__, "exec"), m.__dict__)
    return m


def stored_cases(part, hidden_dir):
    """[(case, hidden?)] of a part: its visible cases, then its hidden case where the hidden folder has it."""
    with open(os.path.join(HERE, "expected", f"{part}.json")) as f:
        cases = [(c, False) for c in json.load(f)["cases"]]
    path = os.path.join(hidden_dir, f"{part}.json")
    if os.path.exists(path):
        with open(path) as f:
            cases += [(c, True) for c in json.load(f)["cases"]]
    return cases


# ------------------------------------------------------------------------------------------------ checking

def decode(v):
    """A stored value: {"tensor": nested lists, "dtype"} -> a tensor; anything else as it is."""
    if isinstance(v, dict) and "tensor" in v:
        return torch.tensor(v["tensor"], dtype=getattr(torch, v["dtype"]))
    return v


def where_differs(got, want):
    """'at [i, j]: got vs want' for the first element that differs most."""
    diff = (got.double() - want.double()).abs().nan_to_num(nan=math.inf)
    diff = torch.where(torch.isnan(got) & torch.isnan(want), torch.zeros_like(diff), diff)
    i = int(diff.flatten().argmax())
    idx = list(torch.unravel_index(torch.tensor(i), want.shape)) if want.dim() else []
    at = f" at [{', '.join(str(int(k)) for k in idx)}]" if idx else ""
    return f"{at}: {got.flatten()[i].item():.6g} instead of {want.flatten()[i].item():.6g}"


def compare(what, got, want):
    """None if `got` matches the stored `want`, else why not (one phrase)."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{what} is a {type(got).__name__}, not a tensor"
        if tuple(got.shape) != tuple(want.shape):
            return f"{what} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if got.dtype != want.dtype:
            return f"{what} has dtype {str(got.dtype)[6:]}, expected {str(want.dtype)[6:]}"
        got = got.detach()
        if want.is_floating_point():
            ok = torch.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True)
        else:
            ok = torch.equal(got, want)
        return None if ok else f"{what} differs{where_differs(got, want)}"
    if isinstance(want, float):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float)):
            return f"{what} is a {type(got).__name__}, not a number"
        return None if math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL) else f"{what} is {got:.6g}, expected {want:.6g}"
    return None if got == want else f"{what} is {got!r}, expected {want!r}"


def fresh_inputs(inputs, needs_grad):
    """A copy of a case's inputs for one call: every tensor cloned (a call that edits one cannot touch the stored
    value), those named in needs_grad requiring a gradient."""
    return {k: (v.clone().requires_grad_(True) if k in needs_grad else v.clone()) if isinstance(v, torch.Tensor)
            else v for k, v in inputs.items()}


def run_case(part, module, case):
    """None if the case passes, else the first reason it fails."""
    inputs = {k: decode(v) for k, v in case["inputs"].items()}
    given = fresh_inputs(inputs, case["needs_grad"])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            out = part.call(module, given)
    except NotImplementedError:
        return "not implemented yet (NotImplementedError)"
    except Exception as e:                                          # the student's error, reported as one line
        return f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    for name, want in case["outputs"].items():
        if name not in out:
            return f"output {name} is missing"
        why = compare(f"output {name}", out[name], decode(want))
        if why:
            return why
        if name in case["requires_grad"] and isinstance(out[name], torch.Tensor):
            if bool(out[name].requires_grad) != case["requires_grad"][name]:
                return (f"output {name} {'carries no gradient' if case['requires_grad'][name] else 'carries a gradient'}"
                        f" ({'the graph was cut' if case['requires_grad'][name] else 'it must be a constant: detach it'})")
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor) and not torch.equal(given[name].detach().nan_to_num(1e30), v.nan_to_num(1e30)):
            return f"input {name} was changed in place"
    if case["grads"]:
        try:
            out["loss"].backward()
        except Exception as e:
            return f"the loss cannot be differentiated ({type(e).__name__})"
        for name, want in case["grads"].items():
            got = given[name].grad
            if got is None:
                return f"no gradient reaches input {name}"
            why = compare(f"the gradient of the loss with respect to {name}", got, decode(want))
            if why:
                return why
    return None


def grade_part(part, module, hidden_dir):
    """(cases passed, cases in all, the first failure as 'case NAME: reason' or '')."""
    cases = stored_cases(part.name, hidden_dir)
    passed, first = 0, ""
    for case, hidden in cases:
        why = run_case(part, module, case)
        if why is None:
            passed += 1
        elif not first:
            first = f"{'the hidden case' if hidden else 'case ' + repr(case['name'])}: {why}"
    return passed, len(cases), first


def grade(root, parts=None, hidden_dir=None, sources=None):
    """[(part, points earned, cases passed, cases, reason)] for the chosen parts; sources maps a module name to
    the text to grade instead of the copy's file."""
    hidden_dir = hidden_dir or os.path.join(HERE, "hidden")
    rows = []
    for part in PARTS:
        if parts and part.name not in parts:
            continue
        try:
            module = import_from(root, part.module, (sources or {}).get(part.module))
        except Exception as e:
            rows.append((part, 0, 0, len(stored_cases(part.name, hidden_dir)),
                         f"{part.module} does not import: {type(e).__name__}: {e}"[:200]))
            continue
        passed, n, why = grade_part(part, module, hidden_dir)
        rows.append((part, part.points if passed == n else 0, passed, n, why))
    return rows


# ------------------------------------------------------------------------------------------------ end to end

def end_to_end_thresholds(root):
    """The pass marks of the end-to-end part, from the reference's small-preset records over its seeds
    (docs/measured/seeds/small_s*.json): each with its margin, stated in the reason."""
    records = []
    for seed in range(3):
        with open(os.path.join(root, "docs", "measured", "seeds", f"small_s{seed}.json")) as f:
            records.append(json.load(f))
    acc = min(r["rm"]["acc_gold"] for r in records)
    gain = min(r["eval"]["ppo"]["gold"] - r["eval"]["sft"]["gold"] for r in records)
    kl = max(r["eval"]["ppo"]["kl_sft"] for r in records)
    return dict(rm_acc_gold=acc - 0.05, gold_gain=gain / 2, kl_sft=2 * kl,
                note=f"the reference's seeds 0-2: RM accuracy vs gold ≥ {acc:.3f}, gold gain ≥ {gain:.3f}, "
                     f"KL ≤ {kl:.3f}; pass marks: accuracy - 0.05, half the gain, twice the KL")


def end_to_end(root, seed=0):
    """The small pipeline on the copy's own code; (points, reason)."""
    marks = end_to_end_thresholds(root)
    out = os.path.join(root, "out", "assignment_end_to_end")
    cmd = [sys.executable, "pipeline.py", "--preset", "small", "--seed", str(seed), "--out_dir", out,
           "--overwrite", "true"]
    print("end to end: " + " ".join(cmd[1:]) + " (a few minutes)", flush=True)
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or [""]
        return 0, f"the small pipeline failed: {last[0][:160]}"
    from runs import load_checkpoint
    acc = load_checkpoint(os.path.join(out, "rm.pt"), "rm")["metrics"]["acc_gold"]
    with open(os.path.join(out, "eval.jsonl")) as f:
        evals = {row["stage"]: row for row in map(json.loads, f)}
    gain, kl = evals["ppo"]["gold"] - evals["sft"]["gold"], evals["ppo"]["kl_sft"]
    got = f"RM accuracy vs gold {acc:.3f}, gold gain {gain:+.3f}, KL {kl:.3f}"
    ok = acc >= marks["rm_acc_gold"] and gain >= marks["gold_gain"] and kl <= marks["kl_sft"]
    return (END_TO_END_POINTS if ok else 0), f"{got} ({'passes' if ok else 'fails'}: {marks['note']})"


# ------------------------------------------------------------------------------------------------ the table

def report(rows, hidden_shown):
    earned, total = sum(r[1] for r in rows), sum(r[0].points for r in rows)
    lines = [f"{'part':<18} {'points':>7} {'cases':>6}  reason"]
    for part, points, passed, n, why in rows:
        lines.append(f"{part.name:<18} {points:>3} / {part.points:<2} {passed:>2}/{n:<2}  {why or 'passes'}")
    if not hidden_shown:
        lines.append("(the hidden case of each part is not in this copy: the instructor grades it)")
    return lines, earned, total


def main(argv=None):
    p = argparse.ArgumentParser(description="Grade the assignment's parts (and, when asked, the end-to-end part).")
    p.add_argument("--root", default=".", help="the copy (or repository) to grade: its modules are imported")
    p.add_argument("--parts", nargs="+", choices=[q.name for q in PARTS], help="only these parts")
    p.add_argument("--end_to_end", action="store_true",
                   help=f"also run the small pipeline on this code and grade the outcome ({END_TO_END_POINTS} points)")
    a = p.parse_args(argv)
    root = os.path.abspath(a.root)
    hidden_dir = os.path.join(HERE, "hidden")
    rows = grade(root, a.parts, hidden_dir)
    lines, earned, total = report(rows, os.path.isdir(hidden_dir))
    print("\n".join(lines))
    if a.end_to_end:
        if earned < total:
            points, why = 0, "not run: every part must pass first"
        else:
            points, why = end_to_end(root)
        print(f"{'end_to_end':<18} {points:>3} / {END_TO_END_POINTS:<2} {'':>5}  {why}")
        earned, total = earned + points, total + END_TO_END_POINTS
    print(f"total: {earned} / {total} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
