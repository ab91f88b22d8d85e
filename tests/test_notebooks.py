"""The example notebooks run top to bottom; the committed ones match their sources and hold plots.

Each notebook is executed from a copy in memory (the committed file, with its outputs, is never
rewritten) in a ``python3`` kernel of this interpreter, with the repository root on its path, a
single CPU device (the fake 8-device ``XLA_FLAGS`` of conftest.py is removed) and temporary files
under pytest's ``tmp_path``.  All three together take a few minutes on two CPU cores.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "[0-9]*.ipynb")))
CELL_TIMEOUT_S = 600
EXPECTED = ["01_quickstart", "02_subspace_tracking", "03_llama_tiny"]


def _name(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _builder():
  spec = importlib.util.spec_from_file_location("_make_notebooks",
                                                os.path.join(NOTEBOOK_DIR, "_make_notebooks.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_all_notebooks_present():
  assert [_name(p) for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_committed_notebook_matches_its_source_and_has_plots(path):
  committed = nbformat.read(path, as_version=4)
  built = _builder().build(_name(path))
  assert [(c.cell_type, c.source) for c in committed.cells] == \
         [(c.cell_type, c.source) for c in built.cells], (
             f"{os.path.basename(path)} is out of date: run python "
             f"notebooks/_make_notebooks.py --execute {_name(path)}")
  code = [c for c in committed.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code), "commit the notebook executed"
  errors = [o for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
  assert images, "the committed notebook should carry its plots as outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_notebook_executes(path, monkeypatch, tmp_path):
  nb = nbformat.read(path, as_version=4)  # a copy in memory; the file is not written
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as a user has
  monkeypatch.setenv("PATH",
                     os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # run directories of 03 and other temporary files
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOK_DIR}})
  client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code)
  assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
