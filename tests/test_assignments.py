"""The graded assignment: the reference scores full marks, every classic wrong answer loses points, the student
copy holds no solution and scores nothing until written, and the stored cases are what the reference gives."""
import json
import os

import pytest
import torch

from assignments import cases, grade, make, mutations
from assignments.parts import BY_NAME, PARTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_reference_scores_full_marks_hidden_cases_included():
    rows = grade.grade(ROOT)
    assert [(p.name, points, passed == n, why) for p, points, passed, n, why in rows] == \
        [(p.name, p.points, True, "") for p in PARTS]
    assert all(n == len(cases.CASES[p.name]) for p, _, _, n, _ in rows)          # the hidden case was graded too
    assert sum(p.points for p in PARTS) == 104


def test_the_grading_command_ends_with_the_total(capsys):
    grade.main(["--parts", "gae", "dpo_loss"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "total: 19 / 19 points" and any(line.startswith("gae ") for line in lines)


@pytest.mark.parametrize("part,variant,edits", mutations.MUTANTS, ids=[f"{m[0]}: {m[1]}" for m in mutations.MUTANTS])
def test_every_wrong_variant_loses_points(part, variant, edits):
    lost, why = mutations.points_lost(part, edits)
    assert lost == BY_NAME[part].points, why
    assert why.startswith(("case '", "the hidden case")) and ("output" in why or "input" in why or "gradient" in why)


def test_every_mutation_edits_its_own_parts_body():
    for part, variant, edits in mutations.MUTANTS:
        module, _ = mutations.mutated_source(part, edits)
        with open(mutations.module_path(module)) as f:
            text = f.read()
        bodies = ["\n".join(text.split("\n")[a:b + 1]) for name, a, b, _ in make.graded_bodies(text, module)
                  if name == part]
        assert all(any(old in body for body in bodies) for old, _ in edits), (part, variant)
    assert {m[0] for m in mutations.MUTANTS} == set(BY_NAME)                  # every part has wrong variants


def test_every_part_names_functions_of_its_module():
    for part in PARTS:
        with open(mutations.module_path(part.module)) as f:
            regions = [r for r in make.graded_bodies(f.read(), part.module) if r[0] == part.name]
        assert len(regions) == len(part.functions) >= 1, part.name


def test_the_stored_cases_are_what_the_case_writer_makes():
    """The inputs are rebuilt exactly from their seeds (no stored value was edited by hand); the outputs are the
    reference's, within the grader's tolerance (another CPU kind rounds the last digits differently)."""
    for part in PARTS:
        visible, hidden = cases.build(part.name)
        for path, built in ((os.path.join(cases.VISIBLE_DIR, f"{part.name}.json"), visible),
                            (os.path.join(cases.HIDDEN_DIR, f"{part.name}.json"), hidden)):
            with open(path) as f:
                stored = json.load(f)["cases"]
            assert [c["name"] for c in stored] == [c["name"] for c in built]
            for s, b in zip(stored, built):
                assert json.dumps(s["inputs"]) == json.dumps(b["inputs"]), (part.name, s["name"])
                for k, v in b["outputs"].items():
                    assert grade.compare(k, grade.decode(v), grade.decode(s["outputs"][k])) is None, (part.name, k)


@pytest.fixture(scope="module")
def student_copy(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("student") / "copy")
    make.make(out)
    return out


def test_the_student_copy_holds_no_solution_and_no_key(student_copy):
    assert make.leaks(student_copy, make.solution_lines(ROOT)) == []
    for key in make.KEY:
        assert not os.path.exists(os.path.join(student_copy, key))
    assert os.path.exists(os.path.join(student_copy, "ASSIGNMENT.md"))
    assert not os.path.exists(os.path.join(student_copy, ".git"))
    with open(os.path.join(student_copy, "ppo_rlhf.py")) as f:
        text = f.read()
    assert "Generalised advantage estimation over response tokens (eqs. 7-11)" in text     # docstring kept
    assert 'raise NotImplementedError("assignment part gae: write this body' in text


def test_the_leak_check_finds_a_solution_pasted_into_a_notebook(student_copy, tmp_path):
    nb = os.path.join(student_copy, "notebooks", "4_exercises.ipynb")
    with open(nb) as f:
        saved = f.read()
    try:
        book = json.loads(saved)
        book["cells"][-1]["source"] = ["last = delta + gamma * lam * last  # a solution, pasted\n"]
        with open(nb, "w") as f:
            json.dump(book, f)
        found = make.leaks(student_copy, make.solution_lines(ROOT))
        assert len(found) == 1 and found[0].startswith("notebooks/4_exercises.ipynb: holds the solution line of ppo_rlhf.py")
    finally:
        with open(nb, "w") as f:
            f.write(saved)


def test_the_student_copy_scores_nothing_until_written(student_copy):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "assignments.grade"], cwd=student_copy, capture_output=True, text=True,
                       timeout=120)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0, r.stderr[-2000:]
    assert lines[-1] == "total: 0 / 104 points"
    assert sum("not implemented yet (NotImplementedError)" in line for line in lines) == len(PARTS)
    assert "the hidden case of each part is not in this copy" in r.stdout


def test_a_refused_copy_names_the_leak(tmp_path, monkeypatch):
    monkeypatch.setattr(make, "KEY", tuple(k for k in make.KEY if k != "assignments/mutations.py"))
    with pytest.raises(ValueError, match="still holds a solution .* assignments/mutations.py: holds the solution line"):
        make.make(str(tmp_path / "leaky"))


def test_the_end_to_end_marks_come_from_the_reference_records():
    marks = grade.end_to_end_thresholds(ROOT)
    with open(os.path.join(ROOT, "docs", "measured", "seeds", "small_s1.json")) as f:
        seed1 = json.load(f)
    assert marks["rm_acc_gold"] <= seed1["rm"]["acc_gold"] - 0.05 + 1e-12
    assert 0 < marks["gold_gain"] < seed1["eval"]["ppo"]["gold"] - seed1["eval"]["sft"]["gold"]
    assert marks["kl_sft"] >= 2 * seed1["eval"]["ppo"]["kl_sft"]


def test_an_input_changed_in_place_is_named():
    part = BY_NAME["kl_reward"]

    def kl_rewards(old_logprobs, ref_logprobs, mask, scores, kl_coef):
        old_logprobs.sub_(ref_logprobs)                                    # right values, the caller's tensor gone
        rewards = -kl_coef * old_logprobs * mask
        last = (mask.sum(1) - 1).long()
        rewards[torch.arange(len(scores)), last] += scores
        return rewards

    import types
    passed, n, why = grade.grade_part(part, types.SimpleNamespace(kl_rewards=kl_rewards), cases.HIDDEN_DIR)
    assert passed == 0 and why == "case 'β 0.1, ragged right padding': input old_logprobs was changed in place"


def test_the_instructors_page_shows_what_the_code_gives():
    with open(mutations.PAGE) as f:
        text = f.read()
    assert text == mutations.page_with_blocks(text), "rerun: python -m assignments.mutations --docs"


def test_a_bad_out_dir_is_one_line(tmp_path):
    import subprocess
    import sys
    (tmp_path / "taken.txt").write_text("x")
    r = subprocess.run([sys.executable, "-m", "assignments.make", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path}: exists and is not empty; give a new folder\n"
