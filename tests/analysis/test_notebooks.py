"""Both notebooks execute headless (nbclient) on the tiny sweep, given as a path relative to the repository
root, and show figures."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "notebook, variable, job", [("beta_dashboard", "DEEPDELTA_RUN", "0"), ("sweep_report", "DEEPDELTA_SWEEP", "")]
)
def test_notebook_executes(tiny_sweep, monkeypatch, notebook, variable, job):
    # relative to the repository root, as `make report RUN=...` takes it; the kernel runs in notebooks/
    where = os.path.relpath(tiny_sweep / job if job else tiny_sweep, ROOT)
    monkeypatch.setenv(variable, where)  # the kernel inherits it
    book = nbformat.read(ROOT / "notebooks" / f"{notebook}.ipynb", as_version=4)
    NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= (4 if notebook == "beta_dashboard" else 3)
    assert os.environ[variable]
