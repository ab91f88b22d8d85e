"""Training configuration: one dataclass that is the single source of truth for flags.

Every field of :class:`TrainConfig` is a command-line flag of ``python -m train`` (``foo_bar``
becomes ``--foo-bar``) and its ``help`` metadata is the flag's documentation. Validation that needs
no devices, model or data lives in :func:`validate`; it raises :class:`ConfigError` with a message
that names the flag and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

OPTIMIZERS = ("adamw", "lion", "osd_adamw", "osd_lion", "galore_adamw")
SUBSPACE_OPTIMIZERS = ("osd_adamw", "osd_lion", "galore_adamw")
PROJECTOR_INITS = ("svd", "randomized", "random")
PROJECTOR_OPTIMIZERS = ("adam", "lion", "adafactor")  # osd_jax.projectors.projector_optimizer
FUSED_CLIPS = ("previous", "exact")
PROJECTION_RULES = ("attn_mlp", "all")
DTYPES = ("float32", "bfloat16", "float16")
STATE_DTYPES = ("float32", "bfloat16", "int8", "float8", "int8_dynamic")
#: Default --rank per preset: the ranks of the GaLore paper's C4 runs (Zhao et al. 2024, Table 2:
#: 128 of 512 for 60M, 256 of 768 for 130M, 256 of 1024 for 350M, 512 of 2048 for 1B; 1024 of 4096
#: for 7B), which the OSD paper's LLaMA runs reuse; tiny (width 128) gets a quarter of its width.
#: A matrix is projected only when the rank is below its smaller side, so each default projects
#: every attention and MLP matrix of its preset.
DEFAULT_RANKS = {"tiny": 32, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
#: --remat values: ``auto`` is the preset's default (train.model.PRESETS), the others are
#: train.model.REMAT_POLICIES.
REMAT_CHOICES = ("auto", "none", "full", "dots", "dots_no_batch")
#: --energy-metric values; ``auto`` logs the captured energy below 1b (TrainConfig.energy_metric).
ENERGY_METRIC_CHOICES = ("auto", "on", "off")
#: Presets whose ``--energy-metric auto`` is off: the metric keeps every gradient alive until after
#: the update (+20.2 GiB on the 7B step estimate, 74.55 -> 94.78 GiB; benchmarks/RESULTS.md §7).
NO_ENERGY_METRIC_PRESETS = ("1b", "7b")
#: Presets whose loss is chunked by default (--loss-chunk): their logits are the largest temporary
#: once the gradients and the optimizer state are compact (7B, 16 x 256 tokens: 0.5 GiB, and as
#: much again for their gradient; benchmarks/RESULTS.md §9).
CHUNKED_LOSS_PRESETS = ("1b", "7b")
DEFAULT_LOSS_CHUNK = 64
#: The smallest --vocab-size of a trained tokenizer: 4 special + 256 byte pieces + >= 1 character.
MIN_VOCAB_SIZE = 261


class ConfigError(ValueError):
  """A bad flag value or an inconsistent combination of flags; the message says which and how."""


_SPEC_HELP = ('use embedded, text:GLOB (.txt files: a glob or a directory), jsonl:GLOB (.jsonl and '
              '.json.gz files such as c4-train.*.json.gz) or tfds:NAME[:VERSION] such as '
              'tfds:c4/en:3.1.0')
_DATA_KINDS = ("text", "jsonl", "tfds")


def parse_spec(spec: str) -> tuple[str, str]:
  """Splits a ``--data`` spec into (kind, argument); kind is "embedded", "text", "jsonl" or "tfds".

  The one parser of the ``--data`` grammar (flag validation uses it too).
  """
  if isinstance(spec, str) and spec == "embedded":
    return "embedded", ""
  if isinstance(spec, str):
    kind, sep, arg = spec.partition(":")
    if sep and kind in _DATA_KINDS and arg:
      return kind, arg
  raise ValueError(f"bad --data {spec!r}; {_SPEC_HELP}")


def _f(default: Any, help: str, **meta: Any) -> Any:
  """A dataclass field carrying its command-line help text."""
  if isinstance(default, (dict, list)):
    return dataclasses.field(default_factory=lambda: type(default)(default),
                             metadata={"help": help, **meta})
  return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """How OSD moves each projector P (``--projector-*``, ``--orthogonality-weight``)."""

  lr_ratio: float  # α: P's step is α·lr(t)
  orthogonality_weight: float  # λ
  weight_decay: float | None  # on P (None: the optimizer's)
  init: str  # P₀
  optimizer: str  # adam | lion | adafactor


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer's options as the code reads them (:attr:`TrainConfig.optim`): the flat
  ``optimizer`` flags of the command line, grouped, with their defaults resolved."""

  name: str  # adamw | lion | osd_adamw | osd_lion | galore_adamw
  lr: float  # the peak of the schedule
  warmup_steps: int
  min_lr_ratio: float
  weight_decay: float
  b1: float
  b2: float
  eps: float | None  # None: the official code's (--reference-code)
  grad_clip: float  # 0: off
  scale: float | None  # None: osd_jax.DEFAULT_SCALE for the subspace optimizers, 1 for adamw
  rank: int
  project: str  # which matrices are projected
  reference_code: bool
  update_proj_gap: int  # GaLore's T
  align_signs: bool  # GaLore's refreshes
  state_dtype: str | None  # the moments' storage (None: float32)
  projector: ProjectorConfig  # OSD's P


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run depends on. Saved as ``config.json`` in the run directory.

  Frozen: :meth:`replace` makes a changed copy. The trainer resolves it once
  (:func:`train.run.startup.resolve`) and changes nothing afterwards.
  """

  # --- model
  preset: str = _f("tiny", "Model preset: tiny (CPU demo), 60m, 130m, 350m, 1b, 7b.", group="model")
  model_overrides: dict = _f({}, "Override one model-config field, KEY=VALUE (repeatable), e.g. "
                             "--model-override n_layers=2.", group="model", flag="model-override")
  dtype: str = _f("bfloat16", "Compute dtype of activations and matmuls.", choices=DTYPES,
                  group="model")
  param_dtype: str = _f("float32", "Dtype of the master weights (and, without --state-dtype, of "
                        "the optimizer state).", choices=DTYPES, group="model")
  state_dtype: str | None = _f(None, "Dtype of the optimizer's moments: float32, bfloat16, int8 "
                               "(a byte per element and a float32 scale per block of 256: e4m3 "
                               "codes, chosen by measurement; float8 is the same), int8_dynamic "
                               "(the dynamic map of 8-bit optimizers; osd_jax.quantization). "
                               "It covers the inner and "
                               "projector moments of osd_*/galore_adamw and the full-rank moments "
                               "(embedding, head, norms; adamw and lion too); compact moments are "
                               "updated in float32 and written back by stochastic rounding. With "
                               "bfloat16 or 8 bits the projectors P are kept in bfloat16. "
                               "Default: --param-dtype.",
                               choices=STATE_DTYPES, group="model")
  stochastic_rounding: bool | None = _f(None, "Round each new weight into --param-dtype "
                                        "stochastically (unbiased, so updates below half a "
                                        "bfloat16 step survive on average); deterministic in "
                                        "--seed and the step, so a resume stays bitwise. "
                                        "Default: on for bfloat16/float16 weights.", group="model")
  init_from: str | None = _f(None, "Start from a LLaMA-architecture Hugging Face directory "
                             "(config.json + safetensors, e.g. one written by python -m "
                             "train.export): its architecture replaces the preset's and its "
                             "tokenizer.model is the default --tokenizer.", group="model")
  scan_layers: bool = _f(True, "Stack the blocks' params on a leading layer axis and scan over "
                         "them (compile time and program size independent of depth); "
                         "--no-scan-layers keeps one module per block and a Python loop. "
                         "A checkpoint resumes only with the layout it was saved with.",
                         group="model")
  remat: str = _f("auto", "Rematerialise each block in the backward pass (jax.checkpoint): none, "
                  "full (save only block inputs), dots (save matmul outputs), dots_no_batch "
                  "(save the projections' outputs, recompute attention), or auto: the preset's "
                  "default (none up to 130m, full from 350m).", choices=REMAT_CHOICES,
                  group="model")

  # --- optimizer
  optimizer: str = _f("osd_adamw", "Optimizer: adamw, lion, osd_adamw, osd_lion, galore_adamw.",
                      choices=OPTIMIZERS, group="optimizer")
  lr: float = _f(1e-3, "Peak learning rate (after warmup).", group="optimizer")
  warmup_steps: int | None = _f(None, "Linear warmup steps (default: 10%% of --steps).",
                                group="optimizer")
  min_lr_ratio: float = _f(0.1, "Cosine decay ends at this fraction of --lr.", group="optimizer")
  weight_decay: float = _f(0.0, "Decoupled weight decay (matrices only; norms are not decayed).",
                           group="optimizer")
  b1: float | None = _f(None, "First-moment decay (default 0.9, Adam and Lion alike).",
                        group="optimizer")
  b2: float | None = _f(None, "Second-moment decay (default: 0.999 for Adam, 0.99 for Lion).",
                        group="optimizer")
  eps: float | None = _f(None, "Adam epsilon (default: 1e-8; 1e-6, the official code's, with "
                         "--reference-code).", group="optimizer")
  grad_clip: float = _f(1.0, "Clip gradients to this global norm (0 disables).", group="optimizer")
  rank: int | None = _f(None, "Subspace rank r for osd_* and galore_adamw; a matrix is projected "
                        "only when r is below its smaller side (default: the preset's: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_RANKS.items()) + ").",
                        group="optimizer")
  scale: float | None = _f(None, "Back-projection scale (default 0.25 for osd_* and galore_adamw; "
                           "with adamw: multiplies the update of the --project matrices).",
                           group="optimizer")
  orthogonality_weight: float = _f(0.1, "OSD: weight lambda of the ||P^T P - I||^2 term.",
                                   group="optimizer")
  projector_lr_ratio: float = _f(5.0, "OSD: projector step size alpha, as a multiple of the lr "
                                 "(the paper's 5; also the best of 0.5/2/5/10 at tiny scale and "
                                 "of 2/5 at 60M, benchmarks/RESULTS.md 4d, 4e).",
                                 group="optimizer")
  projector_weight_decay: float | None = _f(None, "OSD: weight decay on P "
                                            "(default: --weight-decay).",
                                            group="optimizer")
  projector_init: str = _f("svd", "OSD: how P is initialised at step 0.", choices=PROJECTOR_INITS,
                           group="optimizer")
  projector_optimizer: str = _f("adam", "OSD: P's optimizer: adam (the paper's; two s x r "
                                "moments per matrix), lion (one; +0.139 eval loss at 60M), "
                                "adafactor (a factored second moment: s + r floats; 1.75 GiB less "
                                "than adam at 7B r 1024 with int8 state, +0.056 eval loss at "
                                "60M). See benchmarks/RESULTS.md 9.",
                                choices=PROJECTOR_OPTIMIZERS, group="optimizer")
  update_proj_gap: int = _f(200, "GaLore: recompute P by SVD every this many steps.",
                            group="optimizer")
  align_signs: bool = _f(True, "GaLore: flip each refreshed column of P to the sign of the "
                         "previous P's, so Adam's carried moments are not negated by an arbitrary "
                         "SVD sign (--no-align-signs: each refresh's own canonical signs).",
                         group="optimizer")
  reference_code: bool = _f(False, "osd_adamw/osd_lion/galore_adamw: reproduce the official "
                            "PyTorch code instead of the paper (osd_jax reference_code=True: its "
                            "Adam eps placement and defaults, projector rule and step, decay "
                            "order); the warmup then starts at lr 0 and weight decay applies to "
                            "every parameter, as there.", group="optimizer")
  project: str = _f("attn_mlp", "Which matrices are projected: attn_mlp (paper: attention and MLP; "
                    "embeddings, head and norms get full-rank AdamW) or all (every 2-D param).",
                    choices=PROJECTION_RULES, group="optimizer")
  loss_spike_factor: float = _f(0.0, "Skip a step whose loss exceeds this multiple of the running "
                                "mean loss (0 disables; NaN/inf steps are always skipped).",
                                group="optimizer")
  max_consecutive_skips: int = _f(25, "Stop with an error (checkpoint saved, exit status 3) after "
                                  "this many skipped steps in a row; checked at each --log-every "
                                  "step over every step since the previous one, so the run stops "
                                  "at the next log step.", group="optimizer")
  stop_on_divergence: bool = _f(False, "Stop (checkpoint saved, exit status 3) when the divergence "
                                "checks fire: loss not below its first logged value for 5 log "
                                "steps after warmup, OSD projectors far from orthonormal "
                                "(||P^T P - I||_F > sqrt(rank)) or collapsed gradients; without "
                                "it they print one warning each.", group="optimizer")

  # --- training
  steps: int = _f(1000, "Number of optimizer steps.", group="training")
  batch_size: int = _f(64, "Global batch size in sequences (all processes, all micro-batches).",
                       group="training")
  seq_len: int = _f(256, "Sequence length in tokens.", group="training")
  grad_accum: int = _f(1, "Split each batch into this many micro-batches (gradient accumulation).",
                       group="training")
  seed: int = _f(0, "Seed for parameter init and data order.", group="training")
  loss_chunk: int | None = _f(None, "Compute the loss this many sequence positions at a time (a "
                              "divisor of --seq-len), recomputing each chunk's logits in the "
                              "backward pass, so the [batch, seq, vocab] logits are never held "
                              "whole (0: at once). Default: 64 for 1b and 7b, else 0.",
                              group="training")
  fused_update: bool = _f(False, "Update each scanned block inside the backward pass, as soon as "
                          "its gradient exists, so the whole gradient tree is never held (7B: "
                          "about the size of the params less; train/README.md, 'The fused "
                          "update'). The same optimizer; needs --scan-layers and --grad-accum 1; "
                          "with --grad-clip > 0 see --fused-clip.", group="training")
  fused_clip: str = _f("previous", "--fused-update with --grad-clip > 0: which global norm clips. "
                       "previous: the previous step's (no extra work; none at a run's first step; "
                       "+0.02 eval loss at 60M, benchmarks/RESULTS.md 8); exact: this step's, from "
                       "a first backward pass that computes the norm only (the unfused step's "
                       "clipping and skipping, at the cost of one more backward pass: 1.5x the "
                       "step at 60M on a CPU).",
                       choices=FUSED_CLIPS, group="training")
  offload_residuals: bool | None = _f(None, "--fused-update: keep the blocks' saved inputs "
                                      "(remat's residuals, 1 GiB at 7B for 16x256 tokens) in "
                                      "pinned host memory and bring one block's back for its "
                                      "backward step; and recompute the head's gradient after "
                                      "the blocks' loop instead of holding it through the loop "
                                      "(250 MiB at 7B, for one more pass of the head's matrix "
                                      "product; remat full does that too). The same numbers; "
                                      "it trades device memory for a host copy of each block's "
                                      "input each way per step (benchmarks/RESULTS.md 9). "
                                      "Default: on with --fused-update and remat full on a GPU "
                                      "or TPU; off on a CPU, where host and device are one.",
                                      group="training")

  # --- data
  data: str = _f("embedded", "Training data: embedded (offline corpus: Python docs and stdlib), "
                 "tfds:NAME[:VERSION] (e.g. tfds:c4/en:3.1.0), text:GLOB (local .txt files) or "
                 "jsonl:GLOB (.jsonl / .json.gz files, e.g. the c4-train.*.json.gz shards).",
                 group="data")
  text_field: str = _f("text", "--data jsonl: the JSON field holding each document's text.",
                       group="data")
  tfds_data_dir: str | None = _f(None, "tensorflow-datasets data dir (local path or gs://...).",
                                 group="data")
  tokenizer: str | None = _f(None, "SentencePiece .model file (default: one trained on the "
                             "embedded "
                             "corpus and cached).", group="data")
  vocab_size: int | None = _f(None, "Vocabulary size of the default tokenizer, the one trained on "
                              "the embedded corpus when no --tokenizer is given (default: 4096, "
                              "for every preset). Ignored with --tokenizer: the model's vocabulary "
                              "is always the tokenizer's.", group="data")
  cache_dir: str | None = _f(None, "Cache for the default tokenizer (default: ~/.cache/osd_jax).",
                             group="data")

  # --- eval, logging, checkpoints
  eval_every: int = _f(200, "Evaluate every this many steps (and at step 0 and the end; 0: only at "
                       "the start and end).", group="logging")
  eval_batches: int = _f(8, "Number of held-out batches per evaluation.", group="logging")
  energy_metric: str = _f("auto", "Log the captured gradient energy ||Q^T G'||^2/||G'||^2 of the "
                          "projected matrices at log steps (subspace optimizers): on, off, or "
                          "auto: on below 1b, off for 1b and 7b, where it keeps every gradient "
                          "alive until after the update (+20 GiB at 7B).",
                          choices=ENERGY_METRIC_CHOICES, group="logging")
  log_every: int = _f(10, "Write metrics every this many steps.", group="logging")
  run_dir: str | None = _f(None, "Run directory, locked while a run writes to it (default: "
                           "runs/PRESET-OPTIMIZER-TIMESTAMP-PID-RANDOM; with --config "
                           "RUN_DIR/config.json and --resume/--auto-resume: that RUN_DIR).",
                           group="logging")
  tensorboard: bool = _f(True, "Write TensorBoard event files.", group="logging")
  progress: bool = _f(True, "Show a progress bar.", group="logging")
  ckpt_dir: str | None = _f(None, "Checkpoint directory, local or gs://... shared by all hosts "
                          "(default: RUN_DIR/checkpoints).", group="checkpoint")
  ckpt_every: int = _f(500, "Save a checkpoint every this many steps (0: only at the end).",
                       group="checkpoint")
  keep_checkpoints: int = _f(3, "Keep the last this many checkpoints.", group="checkpoint")
  async_checkpoint: bool = _f(True, "Write checkpoints in the background.", group="checkpoint")
  resume: bool = _f(False, "Continue from the latest checkpoint in --run-dir.", group="checkpoint")
  auto_resume: bool = _f(False, "Continue from the latest checkpoint when there is one, else start "
                         "fresh: one command for every (re)start of a preemptible job.",
                         group="checkpoint")

  # --- parallelism
  mesh: str = _f("data=-1,fsdp=1,tensor=1", "Device mesh, AXIS=SIZE for data, fsdp, tensor; "
                 "one size "
                 "may be -1 (all remaining devices).", group="parallelism")
  distributed: bool = _f(False, "Call jax.distributed.initialize() (also automatic under SLURM, "
                         "Open MPI or a TPU pod launcher).", group="parallelism")
  coordinator_address: str | None = _f(None, "Multi-process: coordinator host:port (otherwise "
                                       "detected from the launcher).", group="parallelism")
  num_processes: int | None = _f(None, "Multi-process: number of processes.", group="parallelism")
  process_id: int | None = _f(None, "Multi-process: this process's id.", group="parallelism")

  # ------------------------------------------------------------------ helpers
  def replace(self, **changes: Any) -> TrainConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f"unknown config keys {unknown}")
    return cls(**d)

  @property
  def checkpoint_dir(self) -> str:
    """``--ckpt-dir``, or ``checkpoints`` in the run directory."""
    return self.ckpt_dir or os.path.join(self.run_dir or ".", "checkpoints")

  @property
  def resolved_rank(self) -> int:
    """``rank``, or the preset's default rank (:data:`DEFAULT_RANKS`) when it is None."""
    if self.rank is not None:
      return self.rank
    return DEFAULT_RANKS.get(self.preset.lower(), 128)

  @property
  def resolved_energy_metric(self) -> bool:
    """Whether the captured energy is logged (``--energy-metric``; ``auto`` by preset)."""
    if self.energy_metric != "auto":
      return self.energy_metric == "on"
    return self.preset.lower() not in NO_ENERGY_METRIC_PRESETS

  @property
  def resolved_stochastic_rounding(self) -> bool:
    """Whether new weights are rounded stochastically (``--stochastic-rounding``; default: for
    weights narrower than float32)."""
    if self.stochastic_rounding is not None:
      return bool(self.stochastic_rounding)
    return self.param_dtype in ("bfloat16", "float16")

  @property
  def resolved_loss_chunk(self) -> int:
    """Sequence positions per chunk of the loss (``--loss-chunk``; 0: one chunk)."""
    if self.loss_chunk is not None:
      return self.loss_chunk
    if self.preset.lower() not in CHUNKED_LOSS_PRESETS:
      return 0
    return math.gcd(DEFAULT_LOSS_CHUNK, self.seq_len)

  def resolved_offload_residuals(self, platform: str, remat: str) -> bool:
    """Whether the fused update keeps the remat residuals in host memory (``--offload-residuals``,
    never without ``--fused-update``; default: with ``remat`` (the resolved policy) ``full``, on
    every platform but the CPU, whose host memory is its device memory)."""
    if not self.fused_update:
      return False
    if self.offload_residuals is not None:
      return bool(self.offload_residuals)
    return remat == "full" and platform != "cpu"

  @property
  def compact_state(self) -> bool:
    """Moments in bfloat16 or 8 bits (then the projectors are kept in bfloat16)."""
    return self.state_dtype in ("bfloat16", "int8", "float8", "int8_dynamic")

  @property
  def resolved_warmup(self) -> int:
    if self.warmup_steps is not None:
      return self.warmup_steps
    return max(1, self.steps // 10)

  @property
  def optim(self) -> OptimizerConfig:
    """The optimizer's options, grouped and resolved (flat flags, nested in code)."""
    lion = self.optimizer in ("lion", "osd_lion")
    return OptimizerConfig(
        name=self.optimizer, lr=self.lr, warmup_steps=self.resolved_warmup,
        min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay,
        b1=0.9 if self.b1 is None else self.b1,
        b2=(0.99 if lion else 0.999) if self.b2 is None else self.b2,
        eps=self.eps if self.eps is not None or self.reference_code else 1e-8,
        grad_clip=self.grad_clip, scale=self.scale, rank=self.resolved_rank,
        project=self.project, reference_code=self.reference_code,
        update_proj_gap=self.update_proj_gap, align_signs=self.align_signs,
        state_dtype=self.state_dtype,
        projector=ProjectorConfig(
            lr_ratio=self.projector_lr_ratio, orthogonality_weight=self.orthogonality_weight,
            weight_decay=self.projector_weight_decay, init=self.projector_init,
            optimizer=self.projector_optimizer))


def _positive(cfg: TrainConfig, *names: str) -> None:
  for n in names:
    if getattr(cfg, n) <= 0:
      raise ConfigError(f"--{n.replace('_', '-')} must be positive, got {getattr(cfg, n)}")


# long on purpose: a flat list of independent flag checks, each one error line
def validate(cfg: TrainConfig) -> None:
  """Checks that need nothing but the config. Raises ConfigError."""
  from train.model import PRESETS  # light import; keeps a typo from costing a tokenizer build

  if cfg.preset.lower() not in PRESETS:
    raise ConfigError(f"unknown --preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
  if cfg.optimizer not in OPTIMIZERS:
    raise ConfigError(f"unknown --optimizer {cfg.optimizer!r}; "
                      f"choose one of {', '.join(OPTIMIZERS)}")
  if cfg.state_dtype is not None and cfg.state_dtype not in STATE_DTYPES:
    raise ConfigError(f"unknown --state-dtype {cfg.state_dtype!r}; choose one of "
                      f"{', '.join(STATE_DTYPES)}")
  if cfg.state_dtype is not None and cfg.reference_code:
    raise ConfigError("--state-dtype is not available with --reference-code (the official code "
                      "keeps float32 optimizer state); drop one of them")
  for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES),
                        ("projector_init", PROJECTOR_INITS),
                        ("projector_optimizer", PROJECTOR_OPTIMIZERS), ("fused_clip", FUSED_CLIPS),
                        ("project", PROJECTION_RULES), ("remat", REMAT_CHOICES)):
    if getattr(cfg, name) not in allowed:
      raise ConfigError(f"unknown --{name.replace('_', '-')} {getattr(cfg, name)!r}; "
                        f"choose one of {', '.join(allowed)}")
  if cfg.rank is not None:
    _positive(cfg, "rank")
  _positive(cfg, "lr", "steps", "batch_size", "seq_len", "grad_accum", "eval_batches",
            "log_every", "keep_checkpoints", "update_proj_gap", "max_consecutive_skips")
  for n in ("eval_every", "ckpt_every", "weight_decay", "grad_clip", "loss_spike_factor"):
    if getattr(cfg, n) < 0:
      raise ConfigError(f"--{n.replace('_', '-')} must be >= 0, got {getattr(cfg, n)}")
  if cfg.eps is not None and cfg.eps < 0:
    raise ConfigError(f"--eps must be >= 0, got {cfg.eps}")
  if cfg.reference_code and cfg.optimizer not in SUBSPACE_OPTIMIZERS:
    raise ConfigError(f"--reference-code applies to {', '.join(SUBSPACE_OPTIMIZERS)}, not "
                      f"--optimizer {cfg.optimizer}")
  if not 0.0 <= cfg.min_lr_ratio <= 1.0:
    raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
  if cfg.warmup_steps is not None and not 0 <= cfg.warmup_steps <= cfg.steps:
    raise ConfigError(f"--warmup-steps must be in [0, --steps={cfg.steps}], got {cfg.warmup_steps}")
  if cfg.loss_chunk is not None and (cfg.loss_chunk < 0 or (
      cfg.loss_chunk and cfg.seq_len % cfg.loss_chunk)):
    raise ConfigError(f"--loss-chunk must be 0 or a divisor of --seq-len {cfg.seq_len}, got "
                      f"{cfg.loss_chunk}")
  if cfg.fused_update and not cfg.scan_layers:
    raise ConfigError("--fused-update runs the update in the backward pass over the scanned "
                      "blocks; drop --no-scan-layers")
  if cfg.offload_residuals and not cfg.fused_update:
    raise ConfigError("--offload-residuals moves the fused update's saved block inputs to host "
                      "memory; add --fused-update (the unfused step's backward is JAX's own)")
  if cfg.fused_update and cfg.grad_accum > 1:
    raise ConfigError(f"--fused-update updates each block once per step from its whole "
                      f"gradient, so it cannot accumulate micro-batches (--grad-accum "
                      f"{cfg.grad_accum}); use --grad-accum 1 with a --batch-size that fits, or "
                      f"drop --fused-update")
  if cfg.batch_size % cfg.grad_accum:
    raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by --grad-accum "
                      f"{cfg.grad_accum}")
  if cfg.resume and not cfg.run_dir:
    raise ConfigError("--resume needs --run-dir (the run to continue)")
  if cfg.auto_resume and not cfg.run_dir:
    raise ConfigError("--auto-resume needs --run-dir (the same directory on every restart)")
  try:
    kind, _ = parse_spec(cfg.data)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if kind == "jsonl" and not cfg.text_field:
    raise ConfigError("--text-field must name the JSON field holding the text, e.g. text")
  if cfg.init_from is not None and not os.path.isdir(cfg.init_from):
    raise ConfigError(f"--init-from must be a Hugging Face model directory, got {cfg.init_from}")
  if kind == "tfds" and cfg.tokenizer is None:
    raise ConfigError("--data tfds:... needs --tokenizer PATH.model (e.g. the T5 SentencePiece "
                      "model for C4)")
  if cfg.tokenizer is not None and "://" not in cfg.tokenizer \
      and not os.path.isfile(cfg.tokenizer):
    raise ConfigError(f"--tokenizer file not found: {cfg.tokenizer}")
  if cfg.tfds_data_dir is not None and "://" not in cfg.tfds_data_dir \
      and not os.path.isdir(cfg.tfds_data_dir):
    raise ConfigError(f"--tfds-data-dir is not a directory: {cfg.tfds_data_dir}")
  if cfg.run_dir is not None and "://" in cfg.run_dir:
    raise ConfigError("--run-dir must be a local directory (metrics are written by process 0); "
                      "put checkpoints on cloud storage with --ckpt-dir gs://...")
  if cfg.vocab_size is not None and cfg.vocab_size < MIN_VOCAB_SIZE:
    raise ConfigError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (4 special and 256 byte "
                      f"pieces, plus one per character of the corpus: about 350 for the embedded "
                      f"corpus), got {cfg.vocab_size}")
  if (cfg.num_processes is None) != (cfg.process_id is None):
    raise ConfigError("give --num-processes and --process-id together")
  if cfg.num_processes is not None:
    if cfg.num_processes < 1:
      raise ConfigError(f"--num-processes must be positive, got {cfg.num_processes}")
    if not 0 <= cfg.process_id < cfg.num_processes:
      raise ConfigError(f"--process-id must be in [0, --num-processes={cfg.num_processes}), got "
                        f"{cfg.process_id}")
    if cfg.coordinator_address is None:
      raise ConfigError("--num-processes/--process-id need --coordinator-address HOST:PORT (the "
                        "address of process 0)")
  if cfg.coordinator_address is not None:
    host, colon, port = cfg.coordinator_address.rpartition(":")
    if not (colon and host and port.isdigit()):
      raise ConfigError(f"--coordinator-address must be HOST:PORT, got "
                        f"{cfg.coordinator_address!r}")


def model_config(cfg: TrainConfig, vocab_size: int):
  """The :class:`train.model.LlamaConfig` for ``cfg`` with the tokenizer's vocabulary (unless
  overridden). Raises ConfigError."""
  import jax.numpy as jnp

  from train import model as model_lib  # here, as in validate: config.py imports no train module

  if cfg.preset.lower() not in model_lib.PRESETS:
    raise ConfigError(f"unknown --preset {cfg.preset!r}; choose one of "
                      f"{', '.join(model_lib.PRESETS)}")
  overrides = dict(cfg.model_overrides)
  if "vocab_size" in overrides and overrides["vocab_size"] < vocab_size:
    raise ConfigError(f"--model-override vocab_size={overrides['vocab_size']} is smaller than the "
                      f"tokenizer's vocabulary ({vocab_size}); drop the override or use a "
                      f"matching --tokenizer")
  overrides.setdefault("vocab_size", vocab_size)
  overrides.setdefault("max_seq_len", cfg.seq_len)
  overrides.setdefault("dtype", jnp.dtype(cfg.dtype).name)
  overrides.setdefault("param_dtype", jnp.dtype(cfg.param_dtype).name)
  for key in ("scan_layers", "remat"):  # flags of their own (the checkpoint records the layout)
    if key in overrides:
      raise ConfigError(f"--model-override {key}=...: use --{key.replace('_', '-')} instead")
  overrides["scan_layers"] = bool(cfg.scan_layers)
  if cfg.remat != "auto":
    overrides["remat"] = cfg.remat
  try:
    mcfg = model_lib.get_config(cfg.preset, **overrides)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"--preset/--model-override: {e}") from None
  if mcfg.max_seq_len < cfg.seq_len:
    raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len "
                      f"{mcfg.max_seq_len}")
  return mcfg
