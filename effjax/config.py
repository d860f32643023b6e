"""Frozen, validated experiment configuration.

Configs are written as ml_collections ConfigDicts (configs/*.py) and converted here, once, at the
entry point. Library code only ever sees these dataclasses. Every check that can be made without
devices is made at construction, so a bad value fails before anything is compiled.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ATTENTION_IMPLS = ("xla", "cudnn", "pallas")
LINEAR_KINDS = ("dense", "monarch")
LINEAR_GROUPS = ("qkv", "attn_out", "mlp")  # projection groups that choose a kind
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
  _require(value in allowed, f"{name}={value!r} is not one of {list(allowed)}")


def _positive(name: str, value: float) -> None:
  _require(value > 0, f"{name} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LinearConfig:
  """Which linear layer the model's attention and MLP projections are built from.

  `kind` applies to every projection group; `qkv` (attention query/key/value), `attn_out`
  (attention output) and `mlp` (all three SwiGLU weights) override it per group ("" = use
  `kind`). `nblocks` is the block count of Monarch layers (the paper uses 4).
  """
  kind: str = "dense"
  qkv: str = ""
  attn_out: str = ""
  mlp: str = ""
  nblocks: int = 4

  def __post_init__(self):
    _one_of("model.linear.kind", self.kind, LINEAR_KINDS)
    for group in LINEAR_GROUPS:
      value = getattr(self, group)
      if value:
        _one_of(f"model.linear.{group}", value, LINEAR_KINDS)
    _require(isinstance(self.nblocks, int) and self.nblocks >= 1,
             f"model.linear.nblocks must be an integer >= 1, got {self.nblocks!r}")

  def kind_for(self, group: str) -> str:
    """The layer kind of projection group `group` (one of LINEAR_GROUPS)."""
    _one_of("projection group", group, LINEAR_GROUPS)
    return getattr(self, group) or self.kind

  @property
  def uses_monarch(self) -> bool:
    return any(self.kind_for(g) == "monarch" for g in LINEAR_GROUPS)

  def all_dense(self) -> "LinearConfig":
    """The same config with every group dense (the model after reverse sparsification)."""
    return dataclasses.replace(self, kind="dense", qkv="", attn_out="", mlp="")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 384
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 0  # 0 means d_model // num_heads
  d_ff: int = 512
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  tie_embeddings: bool = True
  attention_impl: str = "xla"
  linear: LinearConfig = LinearConfig()
  scan_layers: bool = False
  remat: str = "none"
  param_dtype: str = "float32"
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff"):
      _positive(f"model.{name}", getattr(self, name))
    _positive("model.rope_theta", self.rope_theta)
    _positive("model.norm_eps", self.norm_eps)
    _positive("model.init_std", self.init_std)
    _require(self.head_dim >= 0, f"model.head_dim must be >= 0 (0 = d_model // num_heads), "
             f"got {self.head_dim}")
    if self.head_dim == 0:
      _require(self.d_model % self.num_heads == 0,
               f"model.d_model={self.d_model} is not divisible by model.num_heads="
               f"{self.num_heads}; change one of them or set model.head_dim explicitly")
    _require(self.num_heads % self.num_kv_heads == 0,
             f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads="
             f"{self.num_kv_heads} (grouped-query attention shares each kv head by a whole "
             "number of query heads)")
    _require(self.resolved_head_dim % 2 == 0,
             f"head dim {self.resolved_head_dim} must be even for rotary embeddings")
    _one_of("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _one_of("model.remat", self.remat, REMAT_POLICIES)
    _one_of("model.param_dtype", self.param_dtype, DTYPES)
    _one_of("model.dtype", self.dtype, DTYPES)
    for group, shapes in self.projection_shapes().items():
      if self.linear.kind_for(group) == "monarch":
        narrowest = min(min(shape) for shape in shapes)
        _require(self.linear.nblocks <= narrowest,
                 f"model.linear.nblocks={self.linear.nblocks} is larger than the narrowest "
                 f"{group!r} projection ({narrowest} wide; shapes {shapes}); Monarch needs "
                 "at least one input and one output per block")
    if self.attention_impl == "cudnn":
      _require(self.dtype == "bfloat16",
               "model.attention_impl='cudnn' runs cuDNN flash attention, which needs "
               f"model.dtype='bfloat16' (got {self.dtype!r})")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def projection_shapes(self) -> dict[str, list[tuple[int, int]]]:
    """(in, out) of each projection of one layer, by projection group."""
    d, h = self.d_model, self.resolved_head_dim
    return {"qkv": [(d, self.num_heads * h), (d, self.num_kv_heads * h),
                    (d, self.num_kv_heads * h)],
            "attn_out": [(self.num_heads * h, d)],
            "mlp": [(d, self.d_ff), (d, self.d_ff), (self.d_ff, d)]}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = "python_stdlib"  # the bundled offline corpus, or a TFDS name in array_record
  text_key: str = "text"
  data_dir: str = ""  # "" means the TFDS default directory
  seq_len: int = 256
  train_split: str = "train"
  eval_split: str = "validation"
  eval_batches: int = 32  # 0 means the whole evaluation split

  def __post_init__(self):
    _positive("data.seq_len", self.seq_len)
    _require(self.eval_batches >= 0, f"data.eval_batches must be >= 0, got {self.eval_batches}")
    _require(bool(self.dataset), "data.dataset must name a dataset")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0  # global-norm clipping; 0 disables it

  def __post_init__(self):
    _positive("optim.learning_rate", self.learning_rate)
    _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
    _require(0 <= self.min_lr_ratio <= 1,
             f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
    _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1,
             f"optim.b1 and optim.b2 must be in [0, 1), got {self.b1}, {self.b2}")
    _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
    _require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int = 0
  global_batch_size: int = 16
  num_steps: int = 600
  log_every: int = 20
  eval_every: int = 200  # also evaluates at step 0 and at the end; 0 disables evaluation
  checkpoint_every: int = 200  # also saves at the end; 0 saves only at the end
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  # Reverse sparsification: after this many updates, multiply every Monarch layer out into a
  # dense weight and continue dense (0 = never). See effjax/train/loop.py.
  dense_from_step: int = 0
  # Dense-to-sparse: a workdir (or its checkpoints/ dir) of a run with the same shapes; its
  # latest params initialise this run, projected onto Monarch where this model uses Monarch.
  init_from: str = ""

  def __post_init__(self):
    _positive("train.global_batch_size", self.global_batch_size)
    _positive("train.num_steps", self.num_steps)
    _positive("train.log_every", self.log_every)
    _require(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
    _require(self.checkpoint_every >= 0,
             f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
    _require(0 <= self.dense_from_step < self.num_steps,
             f"train.dense_from_step must be in [0, train.num_steps={self.num_steps}) "
             f"(0 = never), got {self.dense_from_step}")
    _require(self.keep_checkpoints >= 2,
             f"train.keep_checkpoints must be >= 2 so a corrupt latest checkpoint has a "
             f"fallback, got {self.keep_checkpoints}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Per-axis device counts; exactly one may be -1 ("all remaining devices")."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1

  def __post_init__(self):
    degrees = dataclasses.asdict(self)
    for name, value in degrees.items():
      _require(value == -1 or value >= 1,
               f"mesh.{name} must be a positive device count or -1, got {value}")
    _require(sum(v == -1 for v in degrees.values()) <= 1,
             f"at most one mesh axis may be -1, got {degrees}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()

  def __post_init__(self):
    if self.data.dataset == "python_stdlib":
      from effjax.data import tokenizer  # pylint: disable=g-import-not-at-top
      _require(self.model.vocab_size >= tokenizer.VOCAB_SIZE,
               f"model.vocab_size={self.model.vocab_size} is smaller than the byte tokenizer's "
               f"{tokenizer.VOCAB_SIZE} tokens")
    _require(not self.train.dense_from_step or self.model.linear.uses_monarch,
             f"train.dense_from_step={self.train.dense_from_step} converts Monarch layers to "
             "dense, but model.linear uses no Monarch layer")
    _require(self.optim.warmup_steps < self.train.num_steps,
             f"optim.warmup_steps={self.optim.warmup_steps} exceeds train.num_steps="
             f"{self.train.num_steps}")


def from_dict(cls, values: Mapping[str, Any], prefix: str = ""):
  """Builds dataclass `cls` from a nested mapping, rejecting unknown keys by their full name."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                     f"known keys under {prefix or 'the top level'}: {sorted(fields)}")
  kwargs = {}
  for name, value in values.items():
    default = fields[name].default
    if dataclasses.is_dataclass(default):
      kwargs[name] = from_dict(type(default), value, prefix=f"{prefix}{name}.")
    else:
      kwargs[name] = value
  return cls(**kwargs)


def from_config_dict(config) -> ExperimentConfig:
  """ConfigDict (or plain dict) -> ExperimentConfig, with every check applied."""
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return from_dict(ExperimentConfig, values)


def to_dict(config) -> dict[str, Any]:
  return dataclasses.asdict(config)
