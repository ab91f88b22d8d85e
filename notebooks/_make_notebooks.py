"""Builds the example notebooks from the readable cell sources in ``notebooks/_cells/``.

Each notebook is one Python file in ``_cells/`` (``NN_name.py``) split into cells by marker lines:
``# %% [markdown]`` starts a markdown cell (its lines are written as ``# text``), ``# %%`` starts a
code cell.  This is the "percent" format that VS Code, PyCharm and jupytext also understand, so the
sources can be read, diffed and run as scripts.

Usage::

  python notebooks/_make_notebooks.py            # rebuild every .ipynb (no outputs)
  python notebooks/_make_notebooks.py --execute  # rebuild and execute, storing outputs (plots)
  python notebooks/_make_notebooks.py --execute 02_subspace_tracking  # one notebook

The committed notebooks are the executed ones, so GitHub shows the plots without running anything.
``tests/test_notebooks.py`` executes a copy of each committed notebook and checks that it still
runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
CELLS = os.path.join(HERE, "_cells")
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}
CELL_TIMEOUT_S = 600


def parse_cells(source: str) -> list[nbformat.NotebookNode]:
  """Splits a percent-format script into notebook cells (markdown comments are un-commented)."""
  cells: list[nbformat.NotebookNode] = []
  kind, lines = None, []

  def flush():
    text = "\n".join(lines).strip("\n")
    if kind is None or not text:
      return
    if kind == "markdown":
      body = []
      for line in text.splitlines():
        if line.startswith("# "):
          body.append(line[2:])
        elif line.strip() == "#":
          body.append("")
        else:
          raise ValueError(f"markdown line must start with '# ': {line!r}")
      cells.append(nbformat.v4.new_markdown_cell("\n".join(body)))
    else:
      cells.append(nbformat.v4.new_code_cell(text))

  for line in source.splitlines():
    if line.startswith("# %%"):
      flush()
      kind, lines = ("markdown" if "[markdown]" in line else "code"), []
    elif kind is not None:
      lines.append(line)
  flush()
  return cells


def build(name: str) -> nbformat.NotebookNode:
  """The notebook ``name`` (e.g. ``"01_quickstart"``) built from ``_cells/<name>.py``, unrun."""
  with open(os.path.join(CELLS, name + ".py"), encoding="utf-8") as f:
    cells = parse_cells(f.read())
  nb = nbformat.v4.new_notebook(cells=cells)
  nb.metadata["kernelspec"] = dict(KERNEL)
  nb.metadata["language_info"] = {"name": "python"}
  for i, cell in enumerate(nb.cells):  # stable ids keep diffs small
    cell["id"] = f"{name[:2]}-{i:02d}"
  return nb


def execute(nb: nbformat.NotebookNode, timeout: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
  """Runs ``nb`` top to bottom in a python3 kernel of this interpreter, in ``notebooks/``."""
  from nbclient import NotebookClient

  env_path = os.path.dirname(sys.executable)
  os.environ["PATH"] = env_path + os.pathsep + os.environ.get("PATH", "")  # kernel = this venv
  os.environ.pop("XLA_FLAGS", None)  # one CPU device, as a user would have
  # the repo root first on the kernel's path, so the notebooks use this checkout's osd_jax/train
  os.environ["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(HERE)]
      + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
  NotebookClient(nb, timeout=timeout, kernel_name="python3",
                 resources={"metadata": {"path": HERE}}).execute()
  return nb


def names() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(CELLS) if f.endswith(".py") and f[0].isdigit())


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--execute", action="store_true", help="execute and store outputs")
  parser.add_argument("only", nargs="*", help="notebook names (default: all)")
  args = parser.parse_args(argv)
  for name in args.only or names():
    nb = build(name)
    if args.execute:
      t = time.time()
      execute(nb)
      print(f"{name}: executed in {time.time() - t:.0f} s")
    path = os.path.join(HERE, name + ".ipynb")
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
  main()
