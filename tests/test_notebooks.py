"""The notebooks execute headless (nbclient, a test-only dependency from tests/requirements.txt), each within 60 s,
and print what they are meant to show: the quickstart runs its own tiny pipeline, the others read a shared one."""
import os
import re
import time

import pytest

if os.environ.get("CI"):  # CI installs tests/requirements.txt: a missing nbclient there is a failure, not a skip
    import nbclient
    import nbformat
else:
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))


def execute(name, out, monkeypatch):
    """Run one notebook in a fresh kernel from the repo root; returns (its text outputs, seconds)."""
    monkeypatch.setenv("TINY_RLHF_OUT", out)
    monkeypatch.setenv("TINY_RLHF_NB_PAIRS", "100")
    monkeypatch.setenv("TINY_RLHF_EXPERIMENTS", os.path.join(out, "no_experiments_here"))
    monkeypatch.setenv("TINY_RLHF_QUICKSTART_OUT", os.path.join(out, "quickstart"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    t0 = time.time()
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    seconds = time.time() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "\n".join(o.get("text", "") for o in outputs)
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    return text, seconds, html


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tiny_pipeline, tmp_path, monkeypatch):
    out = str(tmp_path) if name.startswith("0_") else tiny_pipeline   # the quickstart writes its own run
    text, seconds, html = execute(name, out, monkeypatch)
    assert seconds <= 60, f"{name} took {seconds:.0f}s (limit 60s)"
    if name.startswith("0_"):  # inside the repo: no clone, no install; the tiny pipeline ran; report and views shown
        assert f"inside the repository at {ROOT}: nothing to clone" in text
        assert "nothing to install: torch, numpy, tiktoken and matplotlib are already here" in text
        assert "pipeline.py --preset tiny" in text and "report (open it in a browser)" in text
        assert os.path.exists(os.path.join(out, "quickstart", "report.html"))
        assert html[0].startswith("<div><iframe srcdoc=") and "&lt;h2&gt;" in html[0]             # the whole report
        assert [q in h for q, h in zip(("k1", "advantage"), html[1:])] == [True, True]        # two token views
        assert not os.path.exists(os.path.join(ROOT, "notebooks", "tiny-rlhf"))               # nothing cloned
    if name.startswith("1_"):  # the walkthrough used the trained (tiny) checkpoints and the ratio starts at 1
        assert "using the trained checkpoints" in text
        assert "minibatch 0:" in text and "ratio mean 1.0000 max 1.0000 clipfrac 0.000" in text
        assert [h.count("<span title=") > 0 for h in html] == [True] * 3           # k1, advantage, value views
        assert all(q in h for q, h in zip(("k1", "advantage", "value"), html))
    if name.startswith("4_"):  # the graded parts, from the notebook: the reference passes, the wrong loss does not
        assert "gae                12 points  ppo_rlhf.py: compute_gae" in text
        assert "total: 29 / 29 points" in text and "total: 104 / 104 points" in text
        assert "ppo_policy_loss: 0 of 3 cases pass; case 'ε 0.2, ragged right padding': output loss differs" in text


def test_all_notebooks_exist():
    assert [n[:2] for n in NOTEBOOKS] == ["0_", "1_", "2_", "3_", "4_"]


def test_the_colab_badges_open_the_quickstart_of_the_repository_it_clones():
    """The README's badge, the notebook's own badge and the address its first cell clones must name one repository."""
    quickstart = nbformat.read(os.path.join(ROOT, "notebooks", "0_quickstart.ipynb"), as_version=4)
    clone_url = re.search(r'REPO_URL = "https://github.com/([^"]+)"', quickstart.cells[1].source).group(1)
    badge = f"https://colab.research.google.com/github/{clone_url}/blob/main/notebooks/0_quickstart.ipynb"
    assert badge in open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert badge in quickstart.cells[0].source
