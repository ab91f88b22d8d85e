"""A LLaMA decoder in Flax NNX: RMSNorm, rotary embeddings, causal attention with optional grouped
key/value heads, SwiGLU MLP and an untied LM head.

Every parameter is a kernel (or a norm scale) annotated with logical axis names through the
``out_sharding`` metadata of ``nnx.Param``; the trainer maps those names onto its device mesh.

The blocks come in two layouts (``LlamaConfig.scan_layers``):

- scanned (the default): one :class:`Block` whose every parameter carries a leading axis of size
  ``n_layers`` (logical name ``layers``), created with ``nnx.vmap`` over split rngs; the forward
  pass is one ``jax.lax.scan`` over that axis, so the program size and compile time do not grow
  with depth. Paths read ``layers/attention/{wq,wk,wv,wo}/kernel`` ``[n_layers, d_in, d_out]``,
  ``layers/mlp/{w1,w2,w3}/kernel`` and ``layers/{attention_norm,mlp_norm}/scale``
  ``[n_layers, dim]``.
- unrolled (``scan_layers=False``): an ``nnx.List`` of blocks, paths
  ``layers/<i>/attention/wq/kernel`` ``[d_in, d_out]`` etc., a Python loop in the forward pass.

Both compute the same function of the same weights (:func:`stack_layers` turns unrolled params into
scanned ones). ``embed/embedding``, ``head/kernel`` and ``norm/scale`` are the same in both.
``LlamaConfig.remat`` wraps each block (inside the scan, or each block of the loop) in
``jax.checkpoint`` with the policy of :data:`REMAT_POLICIES`.

Parameters are stored in ``param_dtype`` (float32 master weights by default) and the forward pass
computes in ``dtype`` (bfloat16 by default); norms, RoPE and the softmax run in float32, and the
logits come back in float32.

Activations carry logical axis names too (``batch``, ``length``, ``heads``, ``kv``, ``mlp``,
``vocab``; the model width of an activation is ``activation_embed``): inside
:func:`activation_sharding` the model calls the given function on each named activation, which the
trainer uses to pin them to its mesh with ``jax.lax.with_sharding_constraint``. Outside it the
names are ignored.

Example::

  from flax import nnx
  from train.model import Llama, get_config
  model = Llama(get_config("tiny", vocab_size=4096), rngs=nnx.Rngs(0))
  logits = model(tokens)  # int32[B, T] -> float32[B, T, vocab]
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

__all__ = [
  "LOGICAL_AXIS_NAMES",
  "MLP",
  "PRESETS",
  "Attention",
  "Block",
  "Llama",
  "LlamaConfig",
  "RMSNorm",
  "activation_sharding",
  "apply_rope",
  "flops_per_token",
  "get_config",
  "matmul_param_count",
  "param_count",
  "rope_inverse_frequencies",
]

#: Every logical axis name a parameter of :class:`Llama` may carry.
LOGICAL_AXIS_NAMES = ("layers", "vocab", "embed", "heads", "kv", "mlp", "norm")

#: ``LlamaConfig.remat`` -> the ``jax.checkpoint`` policy applied to each block (None: no remat).
#: ``full`` saves nothing but the block's input (the backward pass recomputes the whole block);
#: ``dots`` saves every matmul output; ``dots_no_batch`` only those without batch dimensions
#: (the projections, not the attention scores and values).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_ATTENTION_IMPLS = ("xla", "jax", "cudnn")

#: ``jax.ad_checkpoint.checkpoint_name``\ s of the attention's q, k, v (after RoPE): a policy
#: that saves only these recomputes just the norm, the scores and the attention's output
ATTENTION_INPUTS = ("attention_q", "attention_k", "attention_v")

#: The params of a block's first half (:meth:`Block.attend`); the others are
#: :meth:`Block.feed_forward`'s. The fused update splits a block's optimizer by them.
ATTENTION_HALF = ("attention_norm", "attention")

# The function that pins a named activation to the mesh while a step is traced (None: no
# constraints).
_ACTIVATION_CONSTRAINT: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "llama_activation_constraint", default=None)


@contextlib.contextmanager
def activation_sharding(
    constrain: Callable[[jax.Array, Sequence[str | None]], jax.Array] | None,
) -> Iterator[None]:
  """While tracing inside this context, every named activation ``x`` becomes
  ``constrain(x, names)``.

  ``names`` holds one logical axis name (or None) per dimension of ``x``, e.g.
  ``("batch", "length", "mlp")`` for the SwiGLU hidden units. The trainer passes a function that
  applies ``jax.lax.with_sharding_constraint`` with its logical-axis rules.
  """
  token = _ACTIVATION_CONSTRAINT.set(constrain)
  try:
    yield
  finally:
    _ACTIVATION_CONSTRAINT.reset(token)


def _named(x: jax.Array, *names: str | None) -> jax.Array:
  constrain = _ACTIVATION_CONSTRAINT.get()
  return x if constrain is None else constrain(x, names)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Shape and numerics of a LLaMA model.

  Attributes:
    vocab_size: number of token ids (embedding rows and head columns).
    dim: model (embedding) width.
    hidden_dim: SwiGLU inner width.
    n_layers: number of transformer blocks.
    n_heads: number of query heads; ``dim`` must be divisible by it.
    n_kv_heads: number of key/value heads (grouped-query attention); ``None`` means ``n_heads``.
    max_seq_len: longest sequence the model accepts.
    rope_theta: RoPE base.
    norm_eps: RMSNorm epsilon.
    dtype: activation / compute dtype name.
    param_dtype: parameter (master weight) dtype name.
    init_std: standard deviation of the normal initialiser of every matrix (HF LLaMA: 0.02).
    attention_impl: ``"xla"`` (explicit einsum softmax attention, float32 softmax), ``"jax"``
      (``jax.nn.dot_product_attention``, XLA backend) or ``"cudnn"`` (its cuDNN flash kernel, GPU
      only).
    scan_layers: stack the blocks' params on a leading ``layers`` axis and scan over them (True),
      or keep a list of blocks and loop (False).
    remat: rematerialisation policy of each block, a key of :data:`REMAT_POLICIES`.
  """

  vocab_size: int = 32000
  dim: int
  hidden_dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int | None = None
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  init_std: float = 0.02
  attention_impl: str = "xla"
  scan_layers: bool = True
  remat: str = "none"

  def __post_init__(self):
    for name in ("vocab_size", "dim", "hidden_dim", "n_layers", "n_heads", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
    if self.dim % self.n_heads:
      raise ValueError(
          f"LlamaConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig head_dim = dim / n_heads = {self.head_dim} must be even "
                       "for rotary embeddings")
    if self.n_kv_heads is not None and (
        not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0
        or self.n_heads % self.n_kv_heads):
      raise ValueError(f"LlamaConfig.n_kv_heads={self.n_kv_heads!r} must be a positive divisor "
                       f"of n_heads={self.n_heads}")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"LlamaConfig.{name}={getattr(self, name)!r} is not a dtype name") from e
    if self.attention_impl not in _ATTENTION_IMPLS:
      raise ValueError(f"LlamaConfig.attention_impl={self.attention_impl!r}; "
                       f"valid: {', '.join(_ATTENTION_IMPLS)}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"LlamaConfig.scan_layers must be a bool, got {self.scan_layers!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"LlamaConfig.remat={self.remat!r}; valid: {', '.join(REMAT_POLICIES)}")

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def num_kv_heads(self) -> int:
    """Key/value heads actually used (``n_kv_heads`` or ``n_heads``)."""
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def grouped(self) -> bool:
    """True when keys/values have fewer heads than queries."""
    return self.num_kv_heads < self.n_heads

  def replace(self, **kw: Any) -> LlamaConfig:
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


#: Model presets. ``tiny`` is a CPU demo whose vocabulary is normally replaced by the tokenizer's;
#: the others are the LLaMA shapes of the GaLore paper's C4 experiments (vocab 32000, seq 256).
#: Every preset scans its layers; the models from 350m up rematerialise each block (``full``):
#: their activations, not the weights, dominate the step's memory at the batch sizes they train
#: with (see train/README.md, "Memory").
PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=4096, dim=128, hidden_dim=352, n_layers=4, n_heads=4),
    "60m": LlamaConfig(dim=512, hidden_dim=1376, n_layers=8, n_heads=8),
    "130m": LlamaConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12),
    "350m": LlamaConfig(dim=1024, hidden_dim=2736, n_layers=24, n_heads=16, remat="full"),
    "1b": LlamaConfig(dim=2048, hidden_dim=5461, n_layers=24, n_heads=32, remat="full"),
    "7b": LlamaConfig(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32, remat="full"),
}


def get_config(name: str, **overrides: Any) -> LlamaConfig:
  """Returns preset ``name`` with dataclass fields replaced by ``overrides``."""
  key = str(name).lower()
  if key not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
  bad = [k for k in overrides if k not in {f.name for f in dataclasses.fields(LlamaConfig)}]
  if bad:
    raise ValueError(f"unknown LlamaConfig field(s) {bad} in overrides for preset {name!r}")
  return PRESETS[key].replace(**overrides)


# --------------------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------------------


def param_count(config: LlamaConfig) -> int:
  """Number of parameters of ``Llama(config)``.

  ``2·V·d`` (embedding + untied head) ``+ L·(d·H·h + 2·d·K·h + H·h·d + 3·d·F + 2·d) + d``
  with V vocab, d dim, L layers, H heads, K kv heads, h head_dim, F hidden_dim.
  """
  c = config
  h, q, kv = c.head_dim, c.n_heads, c.num_kv_heads
  attn = c.dim * q * h + 2 * c.dim * kv * h + q * h * c.dim
  mlp = 3 * c.dim * c.hidden_dim
  per_layer = attn + mlp + 2 * c.dim
  return 2 * c.vocab_size * c.dim + c.n_layers * per_layer + c.dim


def matmul_param_count(config: LlamaConfig) -> int:
  """Parameters that take part in matmuls: every kernel except the embedding table and norms."""
  c = config
  return param_count(c) - c.vocab_size * c.dim - (2 * c.n_layers + 1) * c.dim


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token, the usual MFU convention.

  ``6·N + 12·L·T·d`` (PaLM, Chowdhery et al. 2022, appendix B): ``N`` counts the matmul parameters
  (all kernels including the LM head, excluding the embedding lookup and norms), each costing 2
  FLOPs per token forward and 4 backward; the second term is the attention score and value products
  (``QKᵀ`` and ``AV``: 2·2·T·d forward per layer, times 3 for the backward), with ``d = n_heads ·
  head_dim`` and the causal mask not discounted. Elementwise work (norms, softmax, RoPE) is ignored.
  """
  c = config
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  attn = 12 * c.n_layers * seq_len * c.n_heads * c.head_dim
  return float(6 * matmul_param_count(c) + attn)


def is_layer_index(key: Any) -> bool:
  """Whether ``key`` (a dict key under ``layers``, or a path name) is a layer's index: the
  unrolled layout has one subtree per layer under ``layers/0``, ``layers/1``, ... (int keys, or
  their strings in orbax metadata and key paths)."""
  return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


def params_layout(params: Mapping) -> str:
  """``"unrolled"`` (``layers/<i>/...``) or ``"scanned"`` (``layers/...``, a leading ``n_layers``
  axis on every block leaf) of a Llama params tree: arrays, ShapeDtypeStructs or orbax metadata.
  :func:`stack_layers` and :func:`unstack_layers` convert between the two.

  Raises ValueError for a tree without a ``layers`` subtree, or one that mixes the two layouts.
  """
  layers = params.get("layers") if isinstance(params, Mapping) else None
  if not isinstance(layers, Mapping) or not layers:
    raise ValueError("params have no 'layers' subtree; expected a Llama param tree")
  keys = list(layers)
  if all(is_layer_index(k) for k in keys):
    return "unrolled"
  if any(is_layer_index(k) for k in keys):
    raise ValueError(f"params['layers'] mixes layer indices and names: {keys}")
  return "scanned"


def stack_layers(params: dict) -> dict:
  """Unrolled params (``layers/<i>/...``) -> scanned params (``layers/...``, leading axis i).

  Works on a pure dict (``nnx.to_pure_dict``) of arrays; every other entry is kept as it is.
  """
  layers = params["layers"]
  blocks = [layers[i] for i in sorted(layers, key=int)]
  return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_layers(params: dict) -> dict:
  """Scanned params (``layers/...``, leading axis i) -> unrolled params (``layers/<i>/...``)."""
  stacked = params["layers"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  return {**params, "layers": {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}}


# --------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------


def _eager_sharding() -> bool:
  """Shard params at creation only when flax asks for it *and* a mesh is set (``jax.set_mesh``).

  Without a mesh the logical names are kept as metadata only, so the model can be built anywhere
  (tests, notebooks, ``nnx.eval_shape``); the trainer places params with these names and its rules.
  """
  return nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty


def _normal(std: float, names: tuple[str, ...]):
  return nnx.with_partitioning(jax.nn.initializers.normal(stddev=std), names,
                               eager_sharding=_eager_sharding())


def _dense(config: LlamaConfig, d_in: int, d_out: int, names: tuple[str, str], rngs: nnx.Rngs,
           **kw: Any) -> nnx.Linear:
  return nnx.Linear(
      d_in, d_out, use_bias=False, dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype), kernel_init=_normal(config.init_std, names),
      rngs=rngs, **kw)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x²) + eps) · scale, computed in float32, returned in ``dtype``."""

  def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",),
                           eager_sharding=_eager_sharding())
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
  """θ^(−2i/h) for i = 0 … h/2 − 1 (float32)."""
  return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, rotate-half convention (GPT-NeoX / Hugging Face LLaMA).

  For x of shape [..., T, heads, h], feature i < h/2 is paired with i + h/2 and the pair is rotated
  by the angle ``positions[t] · θ^(−2i/h)``. (Meta's LLaMA pairs adjacent features instead; the two
  differ only by a fixed permutation of the q/k projection columns.) Computed in float32, returned
  in x.dtype.

  Args:
    x: [..., T, heads, head_dim].
    positions: integer positions broadcastable to [..., T].
    theta: RoPE base.
  """
  h = x.shape[-1]
  inv_freq = rope_inverse_frequencies(h, theta)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, h/2]
  sin = jnp.sin(angles)[..., None, :]  # broadcast over heads
  cos = jnp.cos(angles)[..., None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head attention with RoPE and optional grouped key/value heads."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    # grouped k/v heads are replicated (a tensor axis rarely divides them); else they follow "heads"
    self.kv_axis = kv_axis = "kv" if c.grouped else "heads"
    self.wq = _dense(c, c.dim, c.n_heads * c.head_dim, ("embed", "heads"), rngs)
    self.wk = _dense(c, c.dim, c.num_kv_heads * c.head_dim, ("embed", kv_axis), rngs)
    self.wv = _dense(c, c.dim, c.num_kv_heads * c.head_dim, ("embed", kv_axis), rngs)
    self.wo = _dense(c, c.n_heads * c.head_dim, c.dim, ("heads", "embed"), rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    c = self.config
    b, t, _ = x.shape
    h, nq, nkv = c.head_dim, c.n_heads, c.num_kv_heads
    kv_axis = self.kv_axis
    q = _named(apply_rope(self.wq(x).reshape(b, t, nq, h), positions, c.rope_theta),
               "batch", "length", "heads", None)
    k = _named(apply_rope(self.wk(x).reshape(b, t, nkv, h), positions, c.rope_theta),
               "batch", "length", kv_axis, None)
    v = _named(self.wv(x).reshape(b, t, nkv, h), "batch", "length", kv_axis, None)
    q, k, v = (checkpoint_name(y, name) for y, name in zip((q, k, v), ATTENTION_INPUTS))
    if c.attention_impl == "xla":
      out = _causal_attention(q, k, v)
    else:
      impl = "cudnn" if c.attention_impl == "cudnn" else None
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    out = _named(out, "batch", "length", "heads", None)
    return self.wo(out.reshape(b, t, nq * h))


def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q kᵀ / √h + causal mask) v with float32 scores; q [B,T,H,h], k/v [B,S,K,h], K | H."""
  b, t, nq, h = q.shape
  nkv = k.shape[2]
  qg = q.reshape(b, t, nkv, nq // nkv, h)  # query heads grouped by the kv head they share
  scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / math.sqrt(h))
  causal = jnp.tril(jnp.ones((t, k.shape[1]), dtype=bool))
  scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, nq, h)


class MLP(nnx.Module):
  """SwiGLU: w2(silu(w1 x) · w3 x)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    self.w1 = _dense(c, c.dim, c.hidden_dim, ("embed", "mlp"), rngs)
    self.w3 = _dense(c, c.dim, c.hidden_dim, ("embed", "mlp"), rngs)
    self.w2 = _dense(c, c.hidden_dim, c.dim, ("mlp", "embed"), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = _named(jax.nn.silu(self.w1(x)) * self.w3(x), "batch", "length", "mlp")
    return self.w2(hidden)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    norm = {"eps": c.norm_eps, "dtype": jnp.dtype(c.dtype), "param_dtype": jnp.dtype(c.param_dtype)}
    self.attention_norm = RMSNorm(c.dim, **norm)
    self.attention = Attention(c, rngs=rngs)
    self.mlp_norm = RMSNorm(c.dim, **norm)
    self.mlp = MLP(c, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    return self.feed_forward(self.attend(x, positions))

  def attend(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """The block's first half: h = x + attn(norm(x))."""
    return _named(x + self.attention(self.attention_norm(x), positions),
                  "batch", "length", "activation_embed")

  def feed_forward(self, h: jax.Array) -> jax.Array:
    """The block's second half: h + mlp(norm(h))."""
    return _named(h + self.mlp(self.mlp_norm(h)), "batch", "length", "activation_embed")


class Llama(nnx.Module):
  """LLaMA decoder: tokens int[B, T] -> float32 logits [B, T, vocab_size]."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.embed = nnx.Embed(
        c.vocab_size, c.dim, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
        embedding_init=_normal(c.init_std, ("vocab", "embed")), rngs=rngs)
    if c.scan_layers:
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked_blocks(layer_rngs: nnx.Rngs) -> Block:
        return Block(c, rngs=layer_rngs)

      self.layers = stacked_blocks(rngs.split(c.n_layers))
    else:
      self.layers = nnx.List([Block(c, rngs=rngs) for _ in range(c.n_layers)])
    self.norm = RMSNorm(c.dim, eps=c.norm_eps, dtype=jnp.dtype(c.dtype),
                        param_dtype=jnp.dtype(c.param_dtype))
    self.head = _dense(c, c.dim, c.vocab_size, ("embed", "vocab"), rngs,
                       preferred_element_type=jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    c = self.config
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be int[batch, seq], got shape {tokens.shape}")
    if tokens.shape[1] > c.max_seq_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds LlamaConfig.max_seq_len="
                       f"{c.max_seq_len}")
    return self.logits(self.hidden_states(tokens))

  def hidden_states(self, tokens: jax.Array) -> jax.Array:
    """The blocks' output [B, T, dim] (before the final norm and the head)."""
    return self._blocks(self.embed_tokens(tokens), positions_of(tokens))

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """The blocks' input: the token embeddings [B, T, dim] in the compute dtype."""
    return _named(self._embed(tokens.astype(jnp.int32)), "batch", "length", "activation_embed")

  def logits(self, x: jax.Array) -> jax.Array:
    """float32 logits [B, T, vocab] of the blocks' output ``x`` (final norm, then the head)."""
    return _named(self.head(self.norm(x)).astype(jnp.float32), "batch", "length", "vocab")

  def block_function(self, positions: jax.Array) -> Callable[[Any, jax.Array], jax.Array]:
    """``(block params, x) -> x``: one block of the scanned stack, as a pure function of one
    layer's slice of ``layers`` (a pure dict), under the config's remat policy.

    The forward pass scans it over the stacked params; the fused update (train/fused_update.py)
    takes its VJP one block at a time.
    """
    if not self.config.scan_layers:
      raise ValueError("block_function needs scanned layers (LlamaConfig.scan_layers=True)")
    graphdef, _ = nnx.split(self.layers)
    return _block_apply(graphdef, positions, self.config.remat)

  def block_halves(self, positions: jax.Array) -> tuple[Callable, Callable]:
    """``(attend, feed_forward)``: the two halves of :meth:`block_function`, each
    ``(block params, x) -> x`` and without remat; their composition is the block.

    The fused update under remat ``full`` takes their VJPs one after the other, to update the
    MLP's weights before the attention's backward step (train/fused_update.py).
    """
    if not self.config.scan_layers:
      raise ValueError("block_halves needs scanned layers (LlamaConfig.scan_layers=True)")
    graphdef, _ = nnx.split(self.layers)

    def attend(layer_state, x):
      return nnx.merge(graphdef, layer_state).attend(x, positions)

    def feed_forward(layer_state, h):
      return nnx.merge(graphdef, layer_state).feed_forward(h)

    return attend, feed_forward

  def _embed(self, tokens: jax.Array) -> jax.Array:
    """The token embeddings, looked up in the table gathered along its model width.

    The table is stored sharded over ``embed`` (FSDP) while the looked-up rows are split over the
    batch; gathering the table first (as FSDP gathers every weight) keeps the backward
    scatter-add of the rows' gradients local to each device's batch rows, followed by one
    reduce-scatter of the table's gradient. Left to itself, XLA would instead move the activation
    gradient ``[B, T, dim]`` from the batch split to a width split, which it can only do by
    replicating it (an "involuntary full rematerialization").
    """
    table = _named(self.embed.embedding[...].astype(self.embed.dtype), "vocab", None)
    return jnp.take(table, tokens, axis=0)

  def _blocks(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """All blocks: a scan over the stacked params, or a loop over the list; each block under
    ``jax.checkpoint`` with the config's remat policy."""
    if self.config.scan_layers:
      block = self.block_function(positions)
      _, stacked = nnx.split(self.layers)
      x, _ = jax.lax.scan(lambda h, layer_state: (block(layer_state, h), None), x, stacked)
      return x
    for layer in self.layers:
      graphdef, layer_state = nnx.split(layer)
      x = _block_apply(graphdef, positions, self.config.remat)(layer_state, x)
    return x


def positions_of(tokens: jax.Array) -> jax.Array:
  """The token positions [1, T] of a batch of sequences [B, T]."""
  return jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]


def _block_apply(graphdef, positions: jax.Array, remat: str) -> Callable:
  """``(layer_state, x) -> x`` for a block's graphdef, under ``jax.checkpoint`` with the remat
  policy (none: no checkpoint)."""

  def apply(layer_state, h):
    return nnx.merge(graphdef, layer_state)(h, positions)

  if remat != "none":
    apply = jax.checkpoint(apply, policy=REMAT_POLICIES[remat])
  return apply
