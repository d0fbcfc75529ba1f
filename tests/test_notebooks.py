"""The notebooks under docs/notebooks/: each is what ``scripts/make_notebooks.py`` writes and
is in the documentation site, whose build executes it from a clean kernel.

The build (``sphinx-build``, myst-nb with ``nb_execution_mode = "force"`` and
``nb_execution_raise_on_error = True``) runs every cell and fails on any error, and CI runs
that build (``.ci/run``); running them here too would execute each notebook twice in CI.
``python scripts/make_notebooks.py`` executes them as it writes them.
"""

import importlib.util
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "docs" / "notebooks").glob("*.ipynb"))


def generator():
    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  ROOT / "scripts" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "custom_hyperparameter.ipynb", "tune_your_model.ipynb",
            "meta_learning.ipynb"} <= names


def test_the_docs_build_executes_every_notebook_and_fails_on_an_error():
    conf = (ROOT / "docs" / "conf.py").read_text()
    assert re.search(r'^nb_execution_mode = "force"$', conf, re.M)
    assert re.search(r"^nb_execution_raise_on_error = True$", conf, re.M)
    index = (ROOT / "docs" / "notebooks" / "index.md").read_text()
    toctree = index.split("```{toctree}")[1].split("```")[0].split()
    assert sorted(toctree[toctree.index(":maxdepth:") + 2:]) == sorted(p.stem for p in NOTEBOOKS)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sphinx-build -W" in ci


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_the_generators(path):
    """Its cells are scripts/make_notebooks.py's (so the reviewed source is what runs), and
    a stored output holds no error."""
    cells = {"quickstart": "QUICKSTART", "custom_hyperparameter": "CUSTOM",
             "tune_your_model": "TUNE", "meta_learning": "META"}[path.stem]
    want = getattr(generator(), cells)
    nb = nbformat.read(path, as_version=4)
    assert [(("md" if c.cell_type == "markdown" else "code"), c.source) for c in nb.cells] \
        == [(kind, src) for kind, src in want]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
