"""--rank: the trainer and the library agree that a matrix is projected only when rank < min(m, n).

A subspace optimizer that projects nothing is an error, a rank that leaves some selected matrices
at full rank is one warning naming them (trainer: a log line; library: one osd_jax.FullRankWarning
at init), and every preset's default rank projects all its attention and MLP matrices.
"""

import warnings

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import osd_jax
from train import model as model_lib
from train import optimizers
from train.config import DEFAULT_RANKS, ConfigError, TrainConfig


def _abstract_params(preset, **overrides):
  """Abstract params of a preset, unrolled by default (one path per layer, so that the messages
  below name ``layers/*/...``); pass ``scan_layers=True`` for the stacked layout."""
  overrides.setdefault("scan_layers", False)
  mcfg = model_lib.get_config(preset, **overrides)
  model = nnx.eval_shape(lambda: model_lib.Llama(mcfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)


@pytest.mark.parametrize("preset", sorted(DEFAULT_RANKS))
def test_every_preset_default_rank_projects_every_selected_matrix(preset):
  params = _abstract_params(preset)
  cfg = TrainConfig(preset=preset)
  assert cfg.rank is None and cfg.resolved_rank == DEFAULT_RANKS[preset]
  shapes = optimizers.projected_shapes(params, cfg.project)
  assert len(shapes) == 7 * model_lib.PRESETS[preset].n_layers
  # independently of check_rank: the default is below the smaller side of every selected matrix
  assert all(cfg.resolved_rank < min(s) for s in shapes.values())
  assert optimizers.check_rank(params, cfg) == []
  assert optimizers.unprojected_by_rank(params, cfg) == {}
  # the scanned layout: one stacked leaf per matrix kind, checked on each layer's matrix shape
  stacked = optimizers.projected_shapes(_abstract_params(preset, scan_layers=True), cfg.project)
  assert len(stacked) == 7 and set(stacked.values()) == set(shapes.values())
  assert optimizers.check_rank(_abstract_params(preset, scan_layers=True), cfg) == []


def test_a_rank_that_projects_nothing_is_an_error_naming_the_flag_and_the_side():
  params = _abstract_params("tiny")  # width 128: every attention matrix is 128 x 128
  for rank in (128, 352, 1000):  # rank == min(m, n) projects nothing, as rank > min(m, n)
    with pytest.raises(ConfigError) as e:
      optimizers.check_rank(params, TrainConfig(preset="tiny", rank=rank))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"--rank {rank} projects no matrix")
    assert "largest smaller side here is 128" in message and "--rank < 128" in message


def test_a_rank_that_leaves_some_matrices_unprojected_is_one_warning_naming_them():
  params = _abstract_params("tiny", hidden_dim=96)  # MLP 128 x 96, attention 128 x 128
  cfg = TrainConfig(preset="tiny", rank=100)
  full = optimizers.unprojected_by_rank(params, cfg)
  assert sorted({p.split("/", 2)[2] for p in full}) == ["mlp/w1/kernel", "mlp/w2/kernel",
                                                        "mlp/w3/kernel"]
  assert len(full) == 3 * 4
  messages = optimizers.check_rank(params, cfg)
  assert len(messages) == 1
  assert messages[0].startswith("--rank 100 leaves 12 of 28 selected matrices unprojected")
  for name in ("layers/*/mlp/w1/kernel", "layers/*/mlp/w2/kernel", "layers/*/mlp/w3/kernel"):
    assert name in messages[0]
  assert "attention" not in messages[0] and "--rank < 96" in messages[0]


def test_library_warns_once_at_init_about_matrices_left_at_full_rank():
  params = {"small": jnp.zeros((64, 128)), "big": jnp.zeros((512, 300)), "b": jnp.zeros(8)}
  tx = osd_jax.osd_adamw(1e-3, rank=256)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = tx.init(params)
    _, state = tx.update(params, state, params)  # the update warns nothing
    jax.jit(tx.update)(params, state, params)
  full = [w for w in caught if issubclass(w.category, osd_jax.FullRankWarning)]
  assert len(full) == 1, [str(w.message) for w in caught]
  text = str(full[0].message)
  assert "rank=256" in text and "'small'" in text and "(64, 128)" in text
  assert "'big'" not in text and "'b'" not in text  # projected / not selected (1-D)
  # the warning tells the truth: 'small' really has no projector, 'big' has one
  assert [p.shape for p in osd_jax.projectors_of(state)] == [(300, 256)]


def test_library_full_rank_warning_can_be_silenced_or_made_an_error():
  params = {"w": jnp.zeros((8, 16))}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    warnings.simplefilter("ignore", osd_jax.FullRankWarning)
    osd_jax.osd_adamw(1e-3, rank=8).init(params)
  assert not caught
  with warnings.catch_warnings():
    warnings.simplefilter("error", osd_jax.FullRankWarning)
    with pytest.raises(osd_jax.FullRankWarning):
      osd_jax.galore_adamw(1e-3, rank=8).init(params)
    osd_jax.osd_adamw(1e-3, rank=7).init(params)  # rank < min(m, n): projected, no warning


def test_cli_rank_that_projects_nothing_is_one_error_line_and_writes_nothing(tmp_path, capsys):
  from train.__main__ import main

  rc = main(["--preset", "tiny", "--rank", "128", "--steps", "2", "--batch-size", "8",
             "--seq-len", "32", "--dtype", "float32", "--no-progress", "--no-tensorboard",
             "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
             "--vocab-size", "400"])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == 2 and len(lines) == 1, err
  assert lines[0].startswith("error: --rank 128 projects no matrix"), err
  assert not (tmp_path / "run").exists()


def test_help_cpu_demo_example_projects():
  """The `--help` CPU demo line parses to a config whose rank projects every tiny matrix."""
  import shlex

  from train.__main__ import EXAMPLES, parse_config

  text = EXAMPLES.split("examples:\n", 1)[1]
  first = text.split("# CPU demo")[0].replace("\\\n", " ")
  argv = shlex.split(first)[3:]  # after "python -m train"
  cfg = parse_config(argv)
  assert cfg.optimizer == "osd_adamw" and cfg.preset == "tiny"
  params = _abstract_params("tiny", vocab_size=4096)
  assert optimizers.check_rank(params, cfg) == []
