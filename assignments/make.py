"""
Make a student copy of the repository: the body of every function a part of assignments/parts.py names becomes
`raise NotImplementedError(...)` (the function's signature and docstring, with its shapes, equation and paper
section, stay), the key is left out (the hidden cases, the mutation table, the case writer and
its test), and the handout assignments/README.md is put at the copy's root as ASSIGNMENT.md. The copy is then
searched for any line of a solution, notebooks included; a copy that still holds one is refused.

    python -m assignments.make OUT_DIR            # e.g. python -m assignments.make ../rlhf_assignment
"""
import argparse
import ast
import json
import os
import shutil
import subprocess

from assignments.parts import PARTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = ("assignments/hidden/", "assignments/mutations.py", "assignments/cases.py", "tests/test_assignments.py")
DISTINCTIVE = 16          # a solution line this long (code only, spaces squeezed) must not survive anywhere...
GENERIC = ("with torch.no_grad():", "return loss, stats")   # ...unless it is scaffolding every loss file has


def repository_files(root):
    """The repository's files (tracked and not ignored), relative to root."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
        return [f for f in out.splitlines() if os.path.isfile(os.path.join(root, f))]
    except (OSError, subprocess.CalledProcessError):              # not a git checkout: every file but the usual
        skip = {".git", ".venv", "out", "__pycache__", ".pytest_cache"}
        found = []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in skip]
            found += [os.path.relpath(os.path.join(d, f), root) for f in files]
        return found


def graded_bodies(text, path):
    """[(part name, first line index, last line index, indent)] of the graded bodies of a source file (`path`,
    relative to the root): for each function assignments/parts.py names in this module, from the first statement
    after its docstring to its last line."""
    module = path[:-3].replace(os.sep, ".").replace("/", ".") if path.endswith(".py") else path
    parts = [p for p in PARTS if p.module == module]
    if not parts:
        return []
    tree, lines = ast.parse(text, path), text.split("\n")
    defs = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            defs[node.name] = node
        elif isinstance(node, ast.ClassDef):
            defs.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    regions = []
    for part in parts:
        for name in part.functions:
            if name not in defs:
                raise ValueError(f"{path}: no function {name!r}, which assignments/parts.py names for {part.name!r}")
            body = defs[name].body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]                                        # the docstring stays
            first = body[0].lineno - 1
            indent = lines[first][:len(lines[first]) - len(lines[first].lstrip())]
            regions.append((part.name, first, defs[name].end_lineno - 1, indent))
    return sorted(regions, key=lambda r: r[1])


def stub(text, path):
    """The source with every graded body replaced by one raise."""
    lines = text.split("\n")
    for name, first, last, indent in reversed(graded_bodies(text, path)):
        lines[first:last + 1] = [f'{indent}raise NotImplementedError("assignment part {name}: write this body '
                                 f'(python -m assignments.grade --parts {name})")']
    return "\n".join(lines)


def code_of(line):
    """A line's code, comment dropped and spaces squeezed ('' for a comment or blank line)."""
    return " ".join(line.split("#", 1)[0].split())


def solution_lines(root):
    """{squeezed line: 'file:line'} of every distinctive line inside a graded body of the repository."""
    found = {}
    for rel in repository_files(root):
        if not rel.endswith(".py"):
            continue
        with open(os.path.join(root, rel)) as f:
            text = f.read()
        lines = text.split("\n")
        for name, first, last, _ in graded_bodies(text, rel):
            for i in range(first, last + 1):
                code = code_of(lines[i])
                if len(code) >= DISTINCTIVE and code not in GENERIC:
                    found.setdefault(code, f"{rel}:{i + 1}")
    return found


def texts_of(path):
    """The text a file shows a reader: a notebook's cell sources and outputs, any other file as it is."""
    with open(path, errors="replace") as f:
        text = f.read()
    if path.endswith(".ipynb"):
        cells = json.loads(text)["cells"]
        parts = ["".join(c.get("source", "")) for c in cells]
        for c in cells:
            for o in c.get("outputs", []):
                parts.append("".join(o.get("text", "")) + json.dumps(o.get("data", {})))
        text = "\n".join(parts)
    return text


def leaks(copy_dir, solutions):
    """['file: the solution line of SOURCE'] for every solution line found anywhere in the copy; [] if none."""
    found = []
    for d, dirs, files in os.walk(copy_dir):
        dirs[:] = [x for x in dirs if x not in (".git", ".venv", "__pycache__")]
        for name in files:
            path = os.path.join(d, name)
            try:
                text = texts_of(path)
            except (UnicodeDecodeError, ValueError):
                continue
            squeezed = " ".join(text.split())
            rel = os.path.relpath(path, copy_dir)
            found += [f"{rel}: holds the solution line of {src} ({code!r})" for code, src in solutions.items()
                      if code in squeezed]
    return found


def make(out_dir, root=ROOT):
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not empty; give a new folder")
    files = [f for f in repository_files(root) if not any(f == k or f.startswith(k) for k in KEY)]
    for rel in files:
        src, dst = os.path.join(root, rel), os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if rel.endswith(".py"):
            with open(src) as f:
                text = f.read()
            with open(dst, "w") as f:
                f.write(stub(text, rel))
            shutil.copymode(src, dst)
        else:
            shutil.copy2(src, dst)
    shutil.copy2(os.path.join(root, "assignments", "README.md"), os.path.join(out_dir, "ASSIGNMENT.md"))
    found = leaks(out_dir, solution_lines(root))
    if found:
        raise ValueError(f"{out_dir}: the student copy still holds a solution ({len(found)} places), e.g. {found[0]}")
    return len(files)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a student copy of the repository: the graded bodies stubbed, "
                                            "the key left out, no solution line anywhere.")
    p.add_argument("out_dir", help="a new (or empty) folder for the student copy")
    a = p.parse_args(argv)
    n = make(os.path.abspath(a.out_dir))
    print(f"{a.out_dir}: a student copy of {n} files; open ASSIGNMENT.md there, then python -m assignments.grade")
    return 0


if __name__ == "__main__":
    from runs import run_main
    run_main(main)
