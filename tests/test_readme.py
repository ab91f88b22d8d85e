"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
  assert len(_python_blocks()) >= 2


def test_readme_quickstart_runs_and_learns(capsys):
  namespace = {}
  exec(compile(_python_blocks()[0], "README-quickstart", "exec"), namespace)  # noqa: S102
  assert float(namespace["loss"]) < 0.05 * float(namespace["loss_fn"](
      {"w": namespace["params"]["w"] * 0, "b": namespace["params"]["b"] * 0}))
  assert "optimizer state" in capsys.readouterr().out


def test_readme_chain_example_builds():
  exec(compile("import optax, osd_jax\n" + _python_blocks()[1], "README-chain", "exec"), {})  # noqa: S102
