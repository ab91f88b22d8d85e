"""Repository hygiene: .gitignore ignores what the documented commands write into a checkout and
no file that the repository tracks (the notebooks and their generator among them)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")),
    reason="needs git and a git checkout")


def _git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
  """git in the repository, with the repository's own ignore rules only (not the user's global
  excludes file)."""
  return subprocess.run(["git", "-c", f"core.excludesFile={os.devnull}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60, check=check)


def test_no_tracked_file_is_ignored():
  tracked = _git("ls-files").stdout.split()
  assert "notebooks/_make_notebooks.py" in tracked
  assert {"notebooks/01_quickstart.ipynb", "notebooks/02_subspace_tracking.ipynb",
          "notebooks/03_llama_tiny.ipynb"} <= set(tracked)
  ignored = _git("ls-files", "--cached", "--ignored",
                 "--exclude-per-directory=.gitignore").stdout.split()
  assert ignored == [], f"tracked files matched by .gitignore: {ignored}"


@pytest.mark.parametrize("path", [
    "curves.png",  # python -m train.plot runs/* (its default --out)
    "hf/my-run/model.safetensors",  # python -m train.export runs/my-run hf/my-run
    "runs/my-run/config.json",  # python -m train's default run directories
    "benchmarks/out/update.json",  # make bench
])
def test_documented_outputs_are_ignored(path):
  out = _git("check-ignore", "--no-index", "--verbose", path, check=False)
  assert out.returncode == 0, f"{path} is not ignored: {out.stderr or out.stdout}"
