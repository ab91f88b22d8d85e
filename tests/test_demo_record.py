"""train/README.md's table of healthy metric values agrees with the recorded `make demo` run
(benchmarks/data/demo-run.json), and that record was made with the Makefile's demo flags.

Nothing is trained here: the record is the metrics.jsonl of one demo run. To refresh it after a
change that moves the demo's numbers, run the demo with the record's command (``make demo``),
replace the records, and update the table to what this test then reports.
"""

import json
import math
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "data" / "demo-run.json"
README = ROOT / "train" / "README.md"


@pytest.fixture(scope="module")
def record():
  return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def train_records(record):
  return {r["step"]: r for r in record["records"] if "loss" in r}


@pytest.fixture(scope="module")
def eval_records(record):
  return {r["step"]: r for r in record["records"] if "eval_loss" in r}


def _healthy(metric: str) -> str:
  """The "healthy" cell of the metrics table's row whose first cell names ``metric``."""
  for line in README.read_text().splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 3 and metric in re.findall(r"`([a-z_]+)`", cells[0]):
      return cells[2]
  raise AssertionError(f"no row for {metric} in the metrics table of {README}")


def _floor(x: float, digits: int = 2) -> float:
  """``x`` rounded down to ``digits`` significant digits (0.943 -> 0.94)."""
  q = 10 ** (math.floor(math.log10(abs(x))) - digits + 1)
  return round(math.floor(x / q) * q, 12)


def _ceil(x: float, digits: int = 2) -> float:
  q = 10 ** (math.floor(math.log10(abs(x))) - digits + 1)
  return round(math.ceil(x / q) * q, 12)


def _sig(x: float, digits: int = 2) -> float:
  return float(f"{x:.{digits - 1}e}")


def _range(text: str, context: str) -> tuple[float, float]:
  """The numbers LO, HI of ``context`` (which holds ``LO–HI``) in ``text``."""
  pattern = re.escape(context).replace("LO–HI", r"([\d.e-]+)–([\d.e-]+)")
  m = re.search(pattern, text)
  assert m, f"no '{context}' in: {text}"
  return float(m.group(1)), float(m.group(2))


def _assert_tight_range(stated: tuple[float, float], values: list[float]) -> None:
  """The stated range is the values' min and max, rounded outwards to 2 significant digits:
  the values lie inside it and it is no wider than that."""
  assert stated == (_floor(min(values)), _ceil(max(values))), (stated, min(values), max(values))


def test_the_record_is_of_the_makefiles_demo(record):
  recipe = re.search(r"^demo: install\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
  assert recipe, "no demo target in the Makefile"
  command = " ".join(recipe.group(1).replace("\\\n", " ").split())
  flags = shlex.split(command.split(" -m train ", 1)[1].replace("$(DEMO_ARGS)", ""))
  assert shlex.split(record["command"].split(" -m train ", 1)[1]) == flags
  steps = int(flags[flags.index("--steps") + 1])
  log_every = int(flags[flags.index("--log-every") + 1])
  eval_every = int(flags[flags.index("--eval-every") + 1])
  assert [r["step"] for r in record["records"] if "loss" in r] == list(
      range(log_every, steps + 1, log_every))
  assert [r["step"] for r in record["records"] if "eval_loss" in r] == list(
      range(0, steps + 1, eval_every))


def test_loss_row(train_records):
  text = _healthy("loss")
  stated = re.search(r"([\d.]+) at step 10, ([\d.]+) at step 100 and ([\d.]+) at step 300", text)
  assert stated, text
  got = [round(train_records[s]["loss"], 1) for s in (10, 100, 300)]
  assert [float(x) for x in stated.groups()] == got
  assert "8.3 for 4096" in text and round(math.log(4096), 1) == 8.3


def test_grad_norm_row(train_records):
  text = _healthy("grad_norm")
  _assert_tight_range(_range(text, "LO–HI in the demo"), [r["grad_norm"] for r in
                                                    train_records.values()])
  _assert_tight_range(_range(text, "LO–HI after step 100"),
                      [r["grad_norm"] for s, r in train_records.items() if s > 100])


def test_lr_row(record, train_records):
  text = _healthy("lr")
  m = re.search(r"rises to ([\d.e-]+) at step (\d+) \(the end of warmup\) and decays to "
                r"([\d.e-]+) at step 300", text)
  assert m, text
  peak, at, end = float(m.group(1)), int(m.group(2)), float(m.group(3))
  flags = shlex.split(record["command"])
  steps = int(flags[flags.index("--steps") + 1])
  assert at == steps // 10  # the default warmup, 10% of --steps
  assert peak == float(flags[flags.index("--lr") + 1])
  assert train_records[at]["lr"] == pytest.approx(peak, rel=1e-6)
  assert max(r["lr"] for r in train_records.values()) == pytest.approx(peak, rel=1e-6)
  assert _sig(train_records[300]["lr"]) == end


def test_epochs_row(train_records):
  m = re.search(r"\(([\d.]+) after the demo's 300 steps\)", _healthy("epochs"))
  assert m and float(m.group(1)) == round(train_records[300]["epochs"], 2)


def test_orthogonality_error_row(record, train_records):
  text = _healthy("orthogonality_error")
  _assert_tight_range(_range(text, "LO–HI in the demo"),
                      [r["orthogonality_error"] for r in train_records.values()])
  flags = shlex.split(record["command"])
  rank = int(flags[flags.index("--rank") + 1])
  assert f"(√{rank} = {math.sqrt(rank):.1f})" in text


def test_subspace_drift_row(train_records):
  text = _healthy("subspace_drift")
  m = re.search(r"([\d.e-]+) at step 10, at most ([\d.e-]+) \(at the end of warmup\), "
                r"([\d.e-]+) at step 300", text)
  assert m, text
  drift = {s: r["subspace_drift"] for s, r in train_records.items()}
  peak_step = max(drift, key=drift.get)
  assert [float(x) for x in m.groups()] == [_sig(drift[10]), _sig(drift[peak_step]),
                                            _sig(drift[300])]
  assert peak_step == 30  # the end of warmup (10% of 300 steps)


def test_captured_energy_row(record, train_records):
  from train.model import PRESETS

  text = _healthy("captured_energy_mean")
  _assert_tight_range(_range(text, "the mean is LO–HI"),
                      [r["captured_energy_mean"] for r in train_records.values()])
  _assert_tight_range(_range(text, "the min LO–HI)"),
                      [r["captured_energy_min"] for r in train_records.values()])
  flags = shlex.split(record["command"])
  rank, dim = int(flags[flags.index("--rank") + 1]), PRESETS["tiny"].dim
  assert f"{rank}/{dim} = {rank / dim:.2f} in the demo" in text
  assert min(r["captured_energy_min"] for r in train_records.values()) > rank / dim


def test_eval_row(eval_records, train_records):
  text = _healthy("eval_perplexity")
  m = re.search(r"perplexity goes ([\d →]+) at steps ([\d, and]+)", text)
  assert m, text
  stated = [int(x) for x in m.group(1).split(" → ")]
  steps = [int(x) for x in re.findall(r"\d+", m.group(2))]
  assert steps == sorted(eval_records)
  assert stated == [round(eval_records[s]["eval_perplexity"]) for s in steps]
  end = re.search(r"`eval_loss` ([\d.]+) at the end", text)
  assert end and float(end.group(1)) == round(eval_records[300]["eval_loss"], 2)
  assert eval_records[300]["eval_loss"] > train_records[300]["loss"]  # "above the training loss"
