"""Tests of the Hugging Face interop (train/interop/hf.py, python -m train.export, --init-from).

The reference for the name/layout mapping is the table written out below by hand (HF's
``LlamaForCausalLM`` state dict: torch ``Linear`` weights are ``[out, in]``), not the module's own
table. The transformers comparison runs only where torch and transformers are importable.
"""

import importlib.util
import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train_utils import (
  SMALL_MODEL,
  assert_trees_equal,
  host,
  make_tokenizer,
  one_device,
  small_config,
)
from train import export as export_cli
from train import trainer
from train.config import ConfigError
from train.interop import hf
from train.model import Llama, LlamaConfig, params_layout
from train.run import startup

# (our path inside block i, HF name, transposed), written out independently of train/interop/hf.py
DOCUMENTED = [
    ("embed/embedding", "model.embed_tokens.weight", False),
    ("layers/{i}/attention/wq/kernel", "model.layers.{i}.self_attn.q_proj.weight", True),
    ("layers/{i}/attention/wk/kernel", "model.layers.{i}.self_attn.k_proj.weight", True),
    ("layers/{i}/attention/wv/kernel", "model.layers.{i}.self_attn.v_proj.weight", True),
    ("layers/{i}/attention/wo/kernel", "model.layers.{i}.self_attn.o_proj.weight", True),
    ("layers/{i}/mlp/w1/kernel", "model.layers.{i}.mlp.gate_proj.weight", True),
    ("layers/{i}/mlp/w3/kernel", "model.layers.{i}.mlp.up_proj.weight", True),
    ("layers/{i}/mlp/w2/kernel", "model.layers.{i}.mlp.down_proj.weight", True),
    ("layers/{i}/attention_norm/scale", "model.layers.{i}.input_layernorm.weight", False),
    ("layers/{i}/mlp_norm/scale", "model.layers.{i}.post_attention_layernorm.weight", False),
    ("norm/scale", "model.norm.weight", False),
    ("head/kernel", "lm_head.weight", True),
]


def _hf_shapes(c: LlamaConfig) -> dict:
  """HF shapes by hand: [out, in] weights, q/k/v with heads * head_dim rows."""
  h = c.dim // c.n_heads
  kv = (c.n_kv_heads or c.n_heads) * h
  out = {"model.embed_tokens.weight": (c.vocab_size, c.dim), "model.norm.weight": (c.dim,),
         "lm_head.weight": (c.vocab_size, c.dim)}
  for i in range(c.n_layers):
    p = f"model.layers.{i}."
    out.update({p + "self_attn.q_proj.weight": (c.n_heads * h, c.dim),
                p + "self_attn.k_proj.weight": (kv, c.dim),
                p + "self_attn.v_proj.weight": (kv, c.dim),
                p + "self_attn.o_proj.weight": (c.dim, c.n_heads * h),
                p + "mlp.gate_proj.weight": (c.hidden_dim, c.dim),
                p + "mlp.up_proj.weight": (c.hidden_dim, c.dim),
                p + "mlp.down_proj.weight": (c.dim, c.hidden_dim),
                p + "input_layernorm.weight": (c.dim,),
                p + "post_attention_layernorm.weight": (c.dim,)})
  return out


def _leaf(params, template: str, i=None) -> np.ndarray:
  """The leaf ``template`` (with ``{i}`` for the layer) of an unrolled or a scanned tree."""
  layers = params.get("layers", {})
  scanned = i is not None and "attention" in layers
  path = template.replace("{i}/", "") if scanned else template.format(i=i)
  x = params
  for k in path.split("/"):
    x = x[int(k)] if k.isdigit() and int(k) in x else x[k]
  return np.asarray(x)[i] if scanned else np.asarray(x)


def _expected_hf(params, c: LlamaConfig) -> dict:
  out = {}
  for ours, name, t in DOCUMENTED:
    for i in range(c.n_layers) if "{i}" in ours else [None]:
      x = _leaf(params, ours, i)
      out[name.format(i=i)] = x.T if t else x
  return out


def _read_safetensors(out_dir) -> tuple[dict, dict]:
  """({name: array}, {name: file}) with the safetensors library, sharded or not."""
  from safetensors.numpy import load_file

  index = os.path.join(out_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  else:
    weight_map = {k: "model.safetensors"
                  for k in load_file(os.path.join(out_dir, "model.safetensors"))}
  tensors = {}
  for fname in sorted(set(weight_map.values())):
    part = load_file(os.path.join(out_dir, fname))
    assert {k for k, v in weight_map.items() if v == fname} == set(part)
    tensors.update(part)
  return tensors, weight_map


def _logits(config: LlamaConfig, params, tokens) -> np.ndarray:
  model = Llama(config.replace(dtype="float32"), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return np.asarray(nnx.merge(graphdef, state)(jnp.asarray(tokens)))


def _scanned(params) -> dict:
  """The scanned layout of an unrolled tree: each block leaf stacked over layers."""
  layers = [params["layers"][i] for i in sorted(params["layers"])]
  out = {k: v for k, v in params.items() if k != "layers"}
  out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  return out


def _unrolled(params) -> dict:
  """The unrolled layout of a scanned tree: one subtree per layer."""
  n = len(jax.tree.leaves(params["layers"])[0])
  out = {k: v for k, v in params.items() if k != "layers"}
  out["layers"] = {i: jax.tree.map(lambda x, i=i: np.asarray(x)[i], params["layers"])
                   for i in range(n)}
  return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return make_tokenizer(str(tmp_path_factory.mktemp("hf-tok")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
  """A tiny run trained 3 steps (checkpoint at the end)."""
  run_dir = tmp_path_factory.mktemp("hf-run") / "run"
  cfg = small_config(run_dir, steps=3, optimizer="adamw", async_checkpoint=False,
                     model_overrides=dict(SMALL_MODEL, n_kv_heads=2))
  return trainer.train(cfg, devices=one_device(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("hf-export") / "out")
  rc = export_cli.main([trained.run_dir, out, "--max-shard-size", "20KB"])
  assert rc == 0
  return out


def test_export_reads_back_to_identical_logits(trained, exported):
  config = trained.setup.model_config
  tensors, weight_map = _read_safetensors(exported)
  # names, shapes and dtypes against the documented table
  assert {k: v.shape for k, v in tensors.items()} == _hf_shapes(config)
  assert all(v.dtype == np.float32 for v in tensors.values())
  expected = _expected_hf(host(trained.params), config)
  assert set(expected) == set(tensors)
  for name, x in expected.items():
    np.testing.assert_array_equal(tensors[name], x, err_msg=name)
  # forced sharding: several files, an index with every tensor and the total size
  assert len(set(weight_map.values())) > 1
  with open(os.path.join(exported, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
  # mapped back into the model: the same logits, bitwise
  params = hf.from_hf_tensors(tensors, config, layout=params_layout(trained.params))
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16), dtype=np.int32)
  np.testing.assert_array_equal(_logits(config, params, tokens),
                                _logits(config, host(trained.params), tokens))
  assert sorted(os.listdir(exported)) == sorted(
      ["config.json", "generation_config.json", "model.safetensors.index.json",
       "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
      + sorted(set(weight_map.values())))


def test_exported_files_all_get_the_umask_mode(exported, tmp_path):
  """Every exported file, the safetensors ones too (safetensors itself writes 0600), has the mode
  a new file gets under the umask, e.g. 0644 under umask 022."""
  probe = tmp_path / "probe"
  probe.write_text("")
  expected = stat.S_IMODE(os.stat(probe).st_mode)
  modes = {name: stat.S_IMODE(os.stat(os.path.join(exported, name)).st_mode)
           for name in os.listdir(exported)}
  assert any(name.endswith(".safetensors") for name in modes)
  assert modes == dict.fromkeys(modes, expected), {k: oct(v) for k, v in modes.items()}


def test_export_config_and_tokenizer_files(trained, exported, tokenizer):
  c = trained.setup.model_config
  with open(os.path.join(exported, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
  assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (512, 32, 64)
  assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == \
      (2, 4, 2)
  assert cfg["head_dim"] == 8 and cfg["hidden_act"] == "silu"
  assert cfg["rope_theta"] == c.rope_theta and cfg["rms_norm_eps"] == c.norm_eps
  assert cfg["max_position_embeddings"] == c.max_seq_len == 32
  assert cfg["tie_word_embeddings"] is False and cfg["rope_scaling"] is None
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 3, 0)
  with open(os.path.join(exported, "tokenizer.model"), "rb") as f:
    assert f.read() == tokenizer.serialized_model()
  with open(os.path.join(exported, "special_tokens_map.json")) as f:
    assert json.load(f) == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                            "pad_token": "<pad>"}
  with open(os.path.join(exported, "tokenizer_config.json")) as f:
    tc = json.load(f)
  assert tc["add_bos_token"] is False and tc["eos_token"] == "</s>"
  assert {int(k): v["content"] for k, v in tc["added_tokens_decoder"].items()} == \
      {0: "<pad>", 1: "<unk>", 2: "<s>", 3: "</s>"}
  with open(os.path.join(exported, "generation_config.json")) as f:
    assert json.load(f)["eos_token_id"] == 3


def test_export_import_is_bitwise_and_bfloat16_rounds(trained, exported, tmp_path):
  like = trained.setup.abstract_state.params
  assert_trees_equal(hf.load_params(exported, like), trained.params)
  # bfloat16: one unsharded file, each value the float32 one rounded to bfloat16
  import ml_dtypes

  out = str(tmp_path / "bf16")
  assert export_cli.main([trained.run_dir, out, "--dtype", "bfloat16"]) == 0
  tensors, weight_map = _read_safetensors(out)
  assert set(weight_map.values()) == {"model.safetensors"}
  expected = _expected_hf(host(trained.params), trained.setup.model_config)
  for name, x in expected.items():
    assert tensors[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(tensors[name], x.astype(ml_dtypes.bfloat16))
  # importing bfloat16 weights gives their exact float32 values
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                         host(trained.params))
  assert_trees_equal(hf.load_params(out, like), rounded)


def test_scanned_layout_maps_to_the_same_tensors(trained):
  config = trained.setup.model_config
  params = host(trained.params)
  if params_layout(params) == "scanned":  # the trainer's default layout with --scan-layers
    params = _unrolled(params)
  scanned = _scanned(params)
  assert params_layout(params) == "unrolled" and params_layout(scanned) == "scanned"
  a = dict(hf.to_hf_tensors(params, config))
  b = dict(hf.to_hf_tensors(scanned, config))
  assert list(a) == list(b)
  for k, x in a.items():
    np.testing.assert_array_equal(x, b[k])
  back = hf.from_hf_tensors(b, config, layout="scanned")
  assert_trees_equal(back, scanned)
  # load_params follows the layout of the tree it is given
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), scanned)
  assert params_layout(like) == "scanned"


@pytest.mark.parametrize("config", [
    LlamaConfig(vocab_size=300, dim=64, hidden_dim=96, n_layers=3, n_heads=8, n_kv_heads=2,
                max_seq_len=128, rope_theta=500000.0, norm_eps=1e-5, init_std=0.01),
    LlamaConfig(vocab_size=32000, dim=512, hidden_dim=1376, n_layers=8, n_heads=8),
])
def test_config_round_trip(config):
  hf_cfg = json.loads(json.dumps(hf.hf_config(config)))
  back = hf.llama_config_from_hf(hf_cfg, dtype=config.dtype, param_dtype=config.param_dtype)
  assert back == config
  assert hf.hf_tensor_specs(config) == _hf_shapes(config)


def _base_hf_config() -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
          "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "max_position_embeddings": 64, "hidden_act": "silu",
          "tie_word_embeddings": False}


@pytest.mark.parametrize("field,value", [
    ("tie_word_embeddings", True), ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("attention_bias", True), ("mlp_bias", True), ("head_dim", 16), ("hidden_act", "gelu"),
    ("model_type", "mistral"), ("rope_parameters", {"rope_type": "llama3", "factor": 8.0}),
    ("num_attention_heads", 5), ("intermediate_size", None),
])
def test_import_refuses_unsupported_features(field, value):
  cfg = _base_hf_config()
  cfg[field] = value
  with pytest.raises(hf.HFError, match=field):
    hf.llama_config_from_hf(cfg)


def _hand_made_hf_dir(path, tokenizer, rng) -> dict:
  """A HF LLaMA directory written by hand: config.json, two safetensors shards with an index,
  tokenizer.model. Returns the tensors."""
  from safetensors.numpy import save_file

  os.makedirs(path)
  cfg = _base_hf_config()
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  d, f_, v, kv = 32, 64, 512, 2 * 8
  tensors = {"model.embed_tokens.weight": rng.normal(size=(v, d)),
             "model.norm.weight": 1 + 0.1 * rng.normal(size=(d,)),
             "lm_head.weight": rng.normal(size=(v, d))}
  for i in range(2):
    p = f"model.layers.{i}."
    tensors.update({p + "self_attn.q_proj.weight": rng.normal(size=(d, d)),
                    p + "self_attn.k_proj.weight": rng.normal(size=(kv, d)),
                    p + "self_attn.v_proj.weight": rng.normal(size=(kv, d)),
                    p + "self_attn.o_proj.weight": rng.normal(size=(d, d)),
                    p + "mlp.gate_proj.weight": rng.normal(size=(f_, d)),
                    p + "mlp.up_proj.weight": rng.normal(size=(f_, d)),
                    p + "mlp.down_proj.weight": rng.normal(size=(d, f_)),
                    p + "input_layernorm.weight": 1 + 0.1 * rng.normal(size=(d,)),
                    p + "post_attention_layernorm.weight": 1 + 0.1 * rng.normal(size=(d,))})
  tensors = {k: (0.05 * x).astype(np.float32) for k, x in tensors.items()}
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for fname, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, os.path.join(path, fname), metadata={"format": "pt"})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
    json.dump({"metadata": {}, "weight_map": {k: fn for fn, ks in shards.items() for k in ks}},
              fh)
  with open(os.path.join(path, "tokenizer.model"), "wb") as fh:
    fh.write(tokenizer.serialized_model())
  return tensors


def test_init_from_a_hand_made_hf_dir(tmp_path, tokenizer):
  hf_dir = str(tmp_path / "hf")
  tensors = _hand_made_hf_dir(hf_dir, tokenizer, np.random.default_rng(1))
  cfg = small_config(tmp_path / "run", init_from=hf_dir, model_overrides={})
  cfg = hf.resolve_init_from(cfg)
  assert cfg.tokenizer == os.path.join(hf_dir, "tokenizer.model")
  assert cfg.model_overrides == {"vocab_size": 512, "dim": 32, "hidden_dim": 64, "n_layers": 2,
                                 "n_heads": 4, "n_kv_heads": 2, "rope_theta": 10000.0,
                                 "norm_eps": 1e-5}
  setup = trainer.build(cfg, tokenizer.vocab_size, devices=one_device())
  # The trainer's own --init-from step (hf.load_params into this run's layout), without a run.
  state = setup.init_state(startup.init_from(cfg, setup))
  params = host(state.params)
  for ours, name, t in DOCUMENTED:
    for i in range(2) if "{i}" in ours else [None]:
      x = tensors[name.format(i=i)]
      np.testing.assert_array_equal(_leaf(params, ours, i), x.T if t else x)
  # an override that contradicts the HF config is refused, naming both
  bad = small_config(tmp_path / "run2", init_from=hf_dir, model_overrides={"n_layers": 3})
  with pytest.raises(ConfigError, match="n_layers=3"):
    hf.resolve_init_from(bad)
  # no tokenizer.model and no --tokenizer: one clear error
  os.remove(os.path.join(hf_dir, "tokenizer.model"))
  with pytest.raises(ConfigError, match="--tokenizer"):
    hf.resolve_init_from(small_config(tmp_path / "run3", init_from=hf_dir, model_overrides={}))


def test_init_from_an_export_continues_where_the_run_ended(trained, exported, tmp_path):
  """python -m train --init-from EXPORT: its first evaluation is the exported run's last one."""
  cfg = small_config(tmp_path / "cont", init_from=exported, model_overrides={}, steps=1,
                     optimizer="adamw")
  result = trainer.train(cfg, devices=one_device())
  assert result.initial_eval["eval_loss"] == trained.final_eval["eval_loss"]
  with open(os.path.join(result.run_dir, "config.json")) as f:
    saved = json.load(f)
  assert saved["model_overrides"]["n_kv_heads"] == 2 and saved["init_from"] == exported


def test_export_errors_are_one_line(trained, tmp_path, capsys):
  assert export_cli.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err.count("\n") == 1
  assert export_cli.main([trained.run_dir, str(tmp_path / "o2"), "--step", "7"]) == 2
  assert "step 7" in capsys.readouterr().err
  assert export_cli.main([trained.run_dir, str(tmp_path / "o3"), "--max-shard-size", "lots"]) == 2
  assert "--max-shard-size" in capsys.readouterr().err


_HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


@pytest.mark.skipif(not _HAS_TORCH, reason="needs torch and transformers (see train/README.md)")
def test_transformers_loads_the_export_with_the_same_logits(trained, exported):
  import torch
  import transformers

  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      exported, output_loading_info=True)
  model = model.float()
  assert type(model).__name__ == "LlamaForCausalLM"
  assert not info["missing_keys"] and not info["unexpected_keys"]
  config = trained.setup.model_config
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 32), dtype=np.int32)
  with torch.no_grad():
    theirs = model.eval()(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  ours = _logits(config, host(trained.params), tokens)
  rel = np.max(np.abs(theirs - ours)) / np.max(np.abs(ours))
  print(f"transformers {transformers.__version__} vs JAX logits: max |diff| "
        f"{np.max(np.abs(theirs - ours)):.3g}, relative to max |logit| {rel:.3g}")
  assert rel < 1e-4, rel
