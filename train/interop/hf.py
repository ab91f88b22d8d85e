"""Hugging Face interop: our LLaMA params <-> a transformers ``LlamaForCausalLM`` directory.

One table (:data:`BLOCK_NAMES`, :data:`TOP_NAMES`) maps every parameter of
:class:`train.model.Llama` to its Hugging Face state-dict name:

==================================  ==============================================  ===========
ours                                Hugging Face (``LlamaForCausalLM``)             layout
==================================  ==============================================  ===========
``embed/embedding`` [V, d]          ``model.embed_tokens.weight`` [V, d]            as is
``layers/i/attention/wq/kernel``    ``model.layers.i.self_attn.q_proj.weight``      transposed
``layers/i/attention/wk/kernel``    ``model.layers.i.self_attn.k_proj.weight``      transposed
``layers/i/attention/wv/kernel``    ``model.layers.i.self_attn.v_proj.weight``      transposed
``layers/i/attention/wo/kernel``    ``model.layers.i.self_attn.o_proj.weight``      transposed
``layers/i/mlp/w1/kernel``          ``model.layers.i.mlp.gate_proj.weight``         transposed
``layers/i/mlp/w3/kernel``          ``model.layers.i.mlp.up_proj.weight``           transposed
``layers/i/mlp/w2/kernel``          ``model.layers.i.mlp.down_proj.weight``         transposed
``layers/i/attention_norm/scale``   ``model.layers.i.input_layernorm.weight``       as is
``layers/i/mlp_norm/scale``         ``model.layers.i.post_attention_layernorm.weight``  as is
``norm/scale`` [d]                  ``model.norm.weight`` [d]                       as is
``head/kernel`` [d, V]              ``lm_head.weight`` [V, d]                       transposed
==================================  ==============================================  ===========

Our kernels are ``[in, out]`` (``y = x @ kernel``), torch ``Linear`` weights are ``[out, in]``
(``y = x @ weight.T``), hence the transposes. No other permutation is needed: our q/k/v outputs
are head-major (feature ``n * head_dim + j`` is feature j of head n, as in HF) and
:func:`train.model.apply_rope` uses HF's rotate-half convention (feature j pairs with
j + head_dim/2), so the q/k rows are not reordered (Meta's original checkpoints, which pair adjacent
features, need that reordering; ours do not).

Both param layouts are handled: the unrolled one (``layers/<i>/...``, integer keys) and the scanned
one (``layers/...`` with a leading ``n_layers`` axis on every block leaf);
:func:`train.model.params_layout` tells them apart.

Example::

  from train.interop import hf
  hf.export(params, model_config, "runs/x/tokenizer.model", "export/x")   # a HF directory
  params = hf.load_params("export/x", abstract_params)                    # and back, bitwise

The command line is ``python -m train.export RUN_DIR OUT_DIR`` (:mod:`train.export`).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from train.model import LlamaConfig, params_layout

__all__ = [
  "BLOCK_NAMES",
  "DEFAULT_MAX_SHARD_SIZE",
  "TOP_NAMES",
  "HFError",
  "export",
  "from_hf_tensors",
  "hf_config",
  "hf_tensor_specs",
  "llama_config_from_hf",
  "load_params",
  "model_overrides_from_hf",
  "parse_size",
  "read_hf_config",
  "read_hf_tensors",
  "resolve_init_from",
  "to_hf_tensors",
  "tokenizer_files",
]

#: HF's default shard size (``save_pretrained(max_shard_size="5GB")``), in bytes.
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9

#: (path inside one block, HF name inside ``model.layers.<i>.``, transposed?)
BLOCK_NAMES: tuple[tuple[tuple[str, ...], str, bool], ...] = (
    (("attention_norm", "scale"), "input_layernorm.weight", False),
    (("attention", "wq", "kernel"), "self_attn.q_proj.weight", True),
    (("attention", "wk", "kernel"), "self_attn.k_proj.weight", True),
    (("attention", "wv", "kernel"), "self_attn.v_proj.weight", True),
    (("attention", "wo", "kernel"), "self_attn.o_proj.weight", True),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", False),
    (("mlp", "w1", "kernel"), "mlp.gate_proj.weight", True),
    (("mlp", "w3", "kernel"), "mlp.up_proj.weight", True),
    (("mlp", "w2", "kernel"), "mlp.down_proj.weight", True),
)
#: (path from the root, HF name, transposed?) of the parameters outside the blocks.
TOP_NAMES: tuple[tuple[tuple[str, ...], str, bool], ...] = (
    (("embed", "embedding"), "model.embed_tokens.weight", False),
    (("norm", "scale"), "model.norm.weight", False),
    (("head", "kernel"), "lm_head.weight", True),
)

_SAFE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


class HFError(ValueError):
  """A Hugging Face directory or config this trainer cannot use; the message names the field."""


# --------------------------------------------------------------------------------------------------
# param trees
# --------------------------------------------------------------------------------------------------


def _get(tree: Any, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _layer(layers: Mapping, i: int) -> Mapping:
  return layers[i] if i in layers else layers[str(i)]


def _set(tree: dict, path: tuple, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _names(config: LlamaConfig) -> Iterator[tuple[str, int | None, tuple[str, ...], bool]]:
  """(HF name, layer or None, our path, transposed?) in HF's order."""
  yield TOP_NAMES[0][1], None, TOP_NAMES[0][0], TOP_NAMES[0][2]
  for i in range(config.n_layers):
    for path, name, t in BLOCK_NAMES:
      yield f"model.layers.{i}.{name}", i, path, t
  for path, name, t in TOP_NAMES[1:]:
    yield name, None, path, t


def hf_tensor_specs(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """``{HF name: shape}`` of every tensor of the HF model of ``config`` (the documented table)."""
  c = config
  d, f, v = c.dim, c.hidden_dim, c.vocab_size
  q, kv = c.n_heads * c.head_dim, c.num_kv_heads * c.head_dim
  block = {"input_layernorm.weight": (d,), "self_attn.q_proj.weight": (q, d),
           "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
           "self_attn.o_proj.weight": (d, q), "post_attention_layernorm.weight": (d,),
           "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
           "mlp.down_proj.weight": (d, f)}
  out = {"model.embed_tokens.weight": (v, d)}
  for i in range(c.n_layers):
    out.update({f"model.layers.{i}.{k}": s for k, s in block.items()})
  out.update({"model.norm.weight": (d,), "lm_head.weight": (v, d)})
  return out


def _np_dtype(name: Any) -> np.dtype:
  import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

  return np.dtype(name)


def to_hf_tensors(params: Mapping, config: LlamaConfig,
                  dtype: Any = "float32") -> Iterator[tuple[str, np.ndarray]]:
  """Yields ``(HF name, array)`` for every parameter, in HF's order, one host array at a time.

  Kernels are transposed to torch's ``[out, in]``; everything is cast to ``dtype``.
  """
  dt = _np_dtype(dtype)
  scanned = params_layout(params) == "scanned"
  layers = params["layers"]
  for name, i, path, transpose in _names(config):
    if i is None:
      x = _get(params, path)
    elif scanned:
      x = _get(layers, path)[i]
    else:
      x = _get(_layer(layers, i), path)
    x = np.asarray(x)
    if transpose:
      x = x.T
    yield name, np.ascontiguousarray(x.astype(dt, copy=False))


def from_hf_tensors(tensors: Mapping[str, Any], config: LlamaConfig, *, layout: str = "unrolled",
                    dtype: Any = "float32") -> dict:
  """The inverse of :func:`to_hf_tensors`: a param tree (numpy arrays of ``dtype``) in ``layout``.

  ``tensors`` maps HF names to arrays (or to zero-argument callables returning one, so that shards
  are read lazily). Missing, unexpected or misshapen tensors raise :class:`HFError`.
  """
  if layout not in ("unrolled", "scanned"):
    raise ValueError(f"layout must be 'unrolled' or 'scanned', got {layout!r}")
  specs = hf_tensor_specs(config)
  missing = [n for n in specs if n not in tensors]
  unexpected = [n for n in tensors if n not in specs and not n.endswith("rotary_emb.inv_freq")]
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if unexpected:
      parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
    raise HFError("the safetensors do not match the config's LLaMA architecture: "
                  + "; ".join(parts))
  dt = _np_dtype(dtype)
  out: dict = {}
  stacks: dict[tuple, list] = {}
  for name, i, path, transpose in _names(config):
    x = tensors[name]
    x = np.asarray(x() if callable(x) else x)
    if tuple(x.shape) != specs[name]:
      raise HFError(f"tensor {name} has shape {tuple(x.shape)}, the config implies "
                    f"{specs[name]}")
    x = np.ascontiguousarray((x.T if transpose else x).astype(dt))
    if i is None:
      _set(out, path, x)
    elif layout == "unrolled":
      _set(out.setdefault("layers", {}).setdefault(i, {}), path, x)
    else:
      stacks.setdefault(path, []).append(x)
  for path, xs in stacks.items():
    _set(out.setdefault("layers", {}), path, np.stack(xs))
  return out


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------


def hf_config(config: LlamaConfig, *, bos_id: int | None = None, eos_id: int | None = None,
              pad_id: int | None = None, dtype: str = "float32") -> dict:
  """The ``config.json`` of the HF ``LlamaForCausalLM`` equivalent to ``config``."""
  c = config
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": c.vocab_size,
      "hidden_size": c.dim,
      "intermediate_size": c.hidden_dim,
      "num_hidden_layers": c.n_layers,
      "num_attention_heads": c.n_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": c.max_seq_len,
      "rms_norm_eps": c.norm_eps,
      "rope_theta": c.rope_theta,
      "rope_scaling": None,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "tie_word_embeddings": False,
      "initializer_range": c.init_std,
      "pretraining_tp": 1,
      "use_cache": True,
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "pad_token_id": pad_id,
      "torch_dtype": dtype,
  }


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


def model_overrides_from_hf(hf: Mapping) -> dict:
  """The :class:`LlamaConfig` fields given by an HF ``config.json``; refuses what we cannot run.

  Raises :class:`HFError` naming the field for: a model type other than llama, tied embeddings,
  RoPE scaling, attention or MLP biases, ``head_dim`` ≠ ``hidden_size / num_attention_heads``,
  an activation other than SiLU, partial rotary embeddings, or a missing size.
  """
  def bad(field: str, why: str) -> HFError:
    return HFError(f"config.json field {field}={hf.get(field)!r}: {why}")

  if hf.get("model_type", "llama") != "llama":
    raise bad("model_type", "only LLaMA-architecture models (model_type llama) are supported")
  for field in _REQUIRED:
    v = hf.get(field)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise bad(field, "must be a positive integer")
  if hf.get("tie_word_embeddings", False):
    raise bad("tie_word_embeddings", "tied input/output embeddings are not supported (this "
              "model has an untied LM head)")
  if hf.get("rope_scaling"):
    raise bad("rope_scaling", "RoPE scaling is not supported (plain RoPE only)")
  rope_params = hf.get("rope_parameters")
  theta = hf.get("rope_theta")
  if rope_params:
    if not isinstance(rope_params, Mapping):
      raise bad("rope_parameters", "expected an object")
    if rope_params.get("rope_type", "default") != "default":
      raise bad("rope_parameters", "only rope_type 'default' (no RoPE scaling) is supported")
    theta = rope_params.get("rope_theta", theta)
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise bad("partial_rotary_factor", "partial rotary embeddings are not supported")
  for field in ("attention_bias", "mlp_bias"):
    if hf.get(field, False):
      raise bad(field, "biases are not supported (every projection is bias-free)")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise bad("hidden_act", "only SiLU (SwiGLU MLP) is supported")
  dim, heads = hf["hidden_size"], hf["num_attention_heads"]
  if dim % heads:
    raise bad("num_attention_heads", f"must divide hidden_size={dim}")
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim != dim // heads:
    raise bad("head_dim", f"must equal hidden_size / num_attention_heads = {dim // heads}")
  kv = hf.get("num_key_value_heads") or heads
  out = {
      "vocab_size": hf["vocab_size"], "dim": dim, "hidden_dim": hf["intermediate_size"],
      "n_layers": hf["num_hidden_layers"], "n_heads": heads,
      "n_kv_heads": None if kv == heads else kv,
      "rope_theta": float(10000.0 if theta is None else theta),
      "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
  }
  if hf.get("max_position_embeddings"):
    out["max_seq_len"] = int(hf["max_position_embeddings"])
  if hf.get("initializer_range") is not None:
    out["init_std"] = float(hf["initializer_range"])
  return out


def llama_config_from_hf(hf: Mapping, **overrides: Any) -> LlamaConfig:
  """The :class:`LlamaConfig` of an HF ``config.json`` (``overrides``: e.g. dtype, param_dtype)."""
  fields = model_overrides_from_hf(hf)
  fields.update(overrides)
  try:
    return LlamaConfig(**fields)
  except ValueError as e:
    raise HFError(f"config.json: {e}") from None


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise HFError(f"{hf_dir} is not a Hugging Face model directory: no config.json")
  try:
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise HFError(f"{path}: not readable JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise HFError(f"{path}: expected a JSON object")
  return cfg


# --------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------


def read_hf_tensors(hf_dir: str) -> dict[str, Any]:
  """``{HF name: loader}`` for the safetensors of ``hf_dir`` (one file or sharded with an index);
  each loader returns the numpy array when called, so only one tensor is read at a time."""
  from safetensors import safe_open

  _np_dtype("bfloat16")
  index = os.path.join(hf_dir, _INDEX)
  single = os.path.join(hf_dir, _SAFE)
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise HFError(f"{index}: not a safetensors index with a weight_map ({e})") from None
  elif os.path.isfile(single):
    with safe_open(single, framework="np") as f:
      weight_map = dict.fromkeys(f.keys(), _SAFE)
  else:
    raise HFError(f"{hf_dir} has neither {_SAFE} nor {_INDEX} (PyTorch .bin weights are not "
                  "supported: re-save the model with safe_serialization=True)")

  def loader(name: str, fname: str):
    def load() -> np.ndarray:
      path = os.path.join(hf_dir, fname)
      if not os.path.isfile(path):
        raise HFError(f"{path} (listed in {_INDEX}) does not exist")
      with safe_open(path, framework="np") as f:
        return f.get_tensor(name)
    return load

  return {name: loader(name, fname) for name, fname in weight_map.items()}


def parse_size(size: Any) -> int:
  """Bytes of a size like ``5GB``, ``200MB``, ``10KiB`` or ``123`` (an int passes through)."""
  if isinstance(size, int) and not isinstance(size, bool) and size > 0:
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
  if not m:
    raise ValueError(f"max_shard_size must be a size such as 5GB, 200MB or a byte count, "
                     f"got {size!r}")
  unit = (m.group(2) or "B").upper()
  mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
  value = int(float(m.group(1)) * mult)
  if value <= 0:
    raise ValueError(f"max_shard_size must be positive, got {size!r}")
  return value


def _plan_shards(specs: Mapping[str, tuple[int, ...]], itemsize: int,
                 max_bytes: int) -> list[list[str]]:
  """Consecutive groups of tensors of at most ``max_bytes`` each (a larger tensor stands alone)."""
  shards: list[list[str]] = [[]]
  size = 0
  for name, shape in specs.items():
    n = math.prod(shape) * itemsize
    if shards[-1] and size + n > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  return shards


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


def tokenizer_files(tokenizer: Any, max_len: int) -> dict[str, dict]:
  """``tokenizer_config.json`` and ``special_tokens_map.json`` of a SentencePiece tokenizer, with
  the special pieces and ids that this model actually has (a missing one is left out)."""
  sp = tokenizer.processor
  special = {}
  for key, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                 ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())):
    if i >= 0:
      special[key] = (int(i), sp.id_to_piece(int(i)))
  add_prefix = True
  try:  # whether SentencePiece prepends "▁" to the text (read from the model's normalizer spec)
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer.serialized_model())
    add_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
  except (ImportError, ValueError, AttributeError):  # no protobuf: SentencePiece's default
    add_prefix = True
  config = {
      "tokenizer_class": "LlamaTokenizer",
      # the trainer appends EOS after each document and adds no BOS
      "add_bos_token": False,
      "add_eos_token": False,
      "add_prefix_space": add_prefix,
      "legacy": False,
      "clean_up_tokenization_spaces": False,
      "model_max_length": max_len,
      "sp_model_kwargs": {},
      "added_tokens_decoder": {
          str(i): {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": True}
          for i, piece in sorted(special.values())},
  }
  config.update({k: piece for k, (_, piece) in special.items()})
  return {"tokenizer_config.json": config,
          "special_tokens_map.json": {k: piece for k, (_, piece) in special.items()}}


# --------------------------------------------------------------------------------------------------
# export / import
# --------------------------------------------------------------------------------------------------


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")


def _mode_of(path: str) -> int:
  """The permission bits of ``path``."""
  return stat.S_IMODE(os.stat(path).st_mode)


# long on purpose: the files of one HF directory written in order (config, weight shards, tokenizer)
def export(params: Mapping, config: LlamaConfig, tokenizer_path: str, out_dir: str, *,
           dtype: str = "float32", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
  """Writes a transformers ``LlamaForCausalLM`` directory for ``params`` (either layout).

  ``out_dir`` gets ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards
  ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json`` when the weights exceed
  ``max_shard_size``), and the tokenizer: ``tokenizer.model`` (the SentencePiece file) with
  ``tokenizer_config.json`` and ``special_tokens_map.json``. ``out_dir`` must be new or empty.

  Returns the names of the files written.
  """
  from safetensors.numpy import save_file

  from train.data.tokenizer import load_tokenizer

  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
  max_bytes = parse_size(max_shard_size)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} is not empty; export into a new or empty directory")
  tokenizer = load_tokenizer(tokenizer_path)
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces, more than the model's "
                     f"vocab_size={config.vocab_size}")
  os.makedirs(out_dir, exist_ok=True)
  sp = tokenizer.processor

  def opt(i: int) -> int | None:
    return int(i) if i >= 0 else None

  ids = {"bos_id": opt(sp.bos_id()), "eos_id": opt(sp.eos_id()), "pad_id": opt(sp.pad_id())}
  written = []
  _write_json(os.path.join(out_dir, "config.json"), hf_config(config, dtype=dtype, **ids))
  gen = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"],
         "pad_token_id": ids["pad_id"], "max_length": config.max_seq_len}
  _write_json(os.path.join(out_dir, "generation_config.json"),
              {k: v for k, v in gen.items() if v is not None})
  written += ["config.json", "generation_config.json"]

  specs = hf_tensor_specs(config)
  shards = _plan_shards(specs, _np_dtype(dtype).itemsize, max_bytes)
  names = [_SAFE] if len(shards) == 1 else [
      f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  tensors = to_hf_tensors(params, config, dtype)
  weight_map, total = {}, 0
  for fname, shard in zip(names, shards):
    chunk = {}
    for expected in shard:
      name, x = next(tensors)
      assert name == expected, (name, expected)
      if tuple(x.shape) != specs[name]:
        raise ValueError(f"param for {name} has shape {x.shape} (as HF), the config implies "
                         f"{specs[name]}: params and config do not match")
      chunk[name] = x
      weight_map[name] = fname
      total += x.nbytes
    save_file(chunk, os.path.join(out_dir, fname), metadata={"format": "pt"})
    # safetensors writes its file with mode 0600; give it the mode of its siblings (which open()
    # created: 0666 less the umask)
    os.chmod(os.path.join(out_dir, fname), _mode_of(os.path.join(out_dir, "config.json")))
    written.append(fname)
  if len(shards) > 1:
    _write_json(os.path.join(out_dir, _INDEX),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    written.append(_INDEX)

  with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:  # the exact bytes of the model
    f.write(tokenizer.serialized_model())
  for fname, obj in tokenizer_files(tokenizer, config.max_seq_len).items():
    _write_json(os.path.join(out_dir, fname), obj)
  written += ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
  return written


def load_params(hf_dir: str, like: Any) -> dict:
  """The params of the HF directory ``hf_dir`` as a numpy tree with the structure, layout
  (unrolled or scanned), shapes and dtypes of ``like`` (arrays or ``jax.ShapeDtypeStruct``)."""
  import jax

  config = llama_config_from_hf(read_hf_config(hf_dir))
  layout = params_layout(like)
  params = from_hf_tensors(read_hf_tensors(hf_dir), config, layout=layout, dtype="float32")
  flat_like, treedef = jax.tree_util.tree_flatten_with_path(like)
  out = []
  for path, leaf in flat_like:
    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    if layout == "unrolled" and len(keys) > 1 and keys[0] == "layers":
      keys = ("layers", int(keys[1])) + keys[2:]
    where = "/".join(map(str, keys))
    try:
      x = _get(params, keys)
    except (KeyError, IndexError, TypeError):
      raise HFError(f"{hf_dir}: no tensor for param {where}") from None
    if tuple(x.shape) != tuple(leaf.shape):
      raise HFError(f"{hf_dir}: param {where} has shape {x.shape} in the HF model, "
                    f"{tuple(leaf.shape)} in this run (check --model-override)")
    out.append(x.astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def resolve_init_from(cfg: Any) -> Any:
  """``cfg`` (a :class:`train.config.TrainConfig`) with the architecture of ``--init-from`` as
  model overrides and its ``tokenizer.model`` as ``--tokenizer`` (unless one is given).

  Raises ``ConfigError`` for an unusable directory or an override that contradicts it.
  """
  from train.config import ConfigError

  if not cfg.init_from:
    return cfg
  try:
    fields = model_overrides_from_hf(read_hf_config(cfg.init_from))
  except HFError as e:
    raise ConfigError(f"--init-from {cfg.init_from}: {e}") from None
  fields.pop("init_std", None)  # the init is the checkpoint's
  fields.pop("max_seq_len", None)  # RoPE has no learned positions: --seq-len decides
  overrides = dict(cfg.model_overrides)
  clash = [f"{k}={overrides[k]!r} (the HF config has {v!r})" for k, v in fields.items()
           if k in overrides and overrides[k] != v]
  if clash:
    raise ConfigError(f"--model-override contradicts --init-from {cfg.init_from}: "
                      + ", ".join(clash))
  overrides.update(fields)
  tokenizer = cfg.tokenizer
  if tokenizer is None:
    tokenizer = os.path.join(cfg.init_from, "tokenizer.model")
    if not os.path.isfile(tokenizer):
      raise ConfigError(f"--init-from {cfg.init_from} has no tokenizer.model; give --tokenizer "
                        "PATH.model (the SentencePiece model the checkpoint was trained with)")
  return cfg.replace(model_overrides=overrides, tokenizer=tokenizer)

