"""Frozen, validated experiment configuration.

Configs are written as ml_collections ConfigDicts (configs/*.py) and converted here, once, at the
entry point. Library code only ever sees these dataclasses. Every check that can be made without
devices is made at construction, so a bad value fails before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

ATTENTION_IMPLS = ("xla", "cudnn", "pallas")
LINEAR_KINDS = ("dense", "monarch", "lora", "sst")
MONARCH_IMPLS = ("xla", "pallas")  # see effjax/layers/monarch.py MONARCH_MULTIPLIES
SST_SAMPLINGS = ("mixed", "sigma", "uniform", "top")  # see effjax/layers/spectral.py
LINEAR_GROUPS = ("qkv", "attn_out", "mlp")  # projection groups that choose a kind
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")
FFN_KINDS = ("dense", "moe")
MOE_ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid_bias", "expert_choice",
               "dense_to_sparse")
MOE_DISPATCH = ("capacity", "dropless")
MOE_GATE_ACTIVATIONS = ("none", "tanh", "sigmoid")  # dense_to_sparse: applied to the logits
# grouped-matmul implementations of effjax.moe.gmm.GMM_IMPLS: jax.lax.ragged_dot, or effjax's
# Pallas gmm (its GPU/TPU kernel; on a CPU its jnp reference, not a kernel)
MOE_GMM_IMPLS = ("ragged_dot", "pallas")


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
  `kind`). `nblocks` is the block count of Monarch layers (the paper uses 4);
  `monarch_impl` computes them with XLA ("xla") or the fused kernel ("pallas").

  Low-rank kinds (effjax/layers/lora.py, effjax/layers/spectral.py, effjax/optim/lowrank.py):
  "lora" (frozen W0 + (alpha/r) B A; ReLoRA when relora_every > 0) and "sst" (Sparse
  Spectral Training), both with rank `rank`.
  """
  kind: str = "dense"
  qkv: str = ""
  attn_out: str = ""
  mlp: str = ""
  nblocks: int = 4
  monarch_impl: str = "xla"
  rank: int = 16  # lora: r of B A; sst: number of active singular vectors
  lora_alpha: float = 0.0  # LoRA scale alpha / r; 0 means alpha = r (scale 1)
  relora_every: int = 0  # ReLoRA: merge, re-init A/B and reset their Adam state every N steps
  relora_prune: float = 1.0  # fraction of A/B's Adam moments zeroed at a merge (by magnitude)
  sst_every: int = 200  # SST: steps per iteration (T3): new active set, Adam reset, re-warm
  sst_sampling: str = "mixed"  # SST_SAMPLINGS
  sst_round: int = 0  # SST: re-SVD every this many iterations; 0 = ceil(min(in, out) / rank)

  def __post_init__(self):
    _one_of("model.linear.kind", self.kind, LINEAR_KINDS)
    for group in LINEAR_GROUPS:
      value = getattr(self, group)
      if value:
        _one_of(f"model.linear.{group}", value, LINEAR_KINDS)
    _require(isinstance(self.nblocks, int) and self.nblocks >= 1,
             f"model.linear.nblocks must be an integer >= 1, got {self.nblocks!r}")
    _one_of("model.linear.monarch_impl", self.monarch_impl, MONARCH_IMPLS)
    _require(isinstance(self.rank, int) and self.rank >= 1,
             f"model.linear.rank must be an integer >= 1, got {self.rank!r}")
    _require(self.lora_alpha >= 0, f"model.linear.lora_alpha must be >= 0, got {self.lora_alpha}")
    _require(isinstance(self.relora_every, int) and self.relora_every >= 0,
             f"model.linear.relora_every must be an integer >= 0, got {self.relora_every!r}")
    _require(0 <= self.relora_prune <= 1,
             f"model.linear.relora_prune must be in [0, 1], got {self.relora_prune}")
    _require(isinstance(self.sst_every, int) and self.sst_every >= 1,
             f"model.linear.sst_every must be an integer >= 1, got {self.sst_every!r}")
    _one_of("model.linear.sst_sampling", self.sst_sampling, SST_SAMPLINGS)
    _require(isinstance(self.sst_round, int) and self.sst_round >= 0,
             f"model.linear.sst_round must be an integer >= 0, got {self.sst_round!r}")
    _require(not self.relora_every or self.uses("lora"),
             f"model.linear.relora_every={self.relora_every} merges LoRA layers, but no "
             "projection group is 'lora'")
    _require(not (self.uses("lora") and self.uses("sst")),
             "model.linear: 'lora' and 'sst' in one model is not supported (one low-rank "
             "method at a time)")

  def kind_for(self, group: str) -> str:
    """The layer kind of projection group `group` (one of LINEAR_GROUPS)."""
    _one_of("projection group", group, LINEAR_GROUPS)
    return getattr(self, group) or self.kind

  @property
  def uses_monarch(self) -> bool:
    return any(self.kind_for(g) == "monarch" for g in LINEAR_GROUPS)

  def uses(self, kind: str) -> bool:
    """Whether any projection group is of layer kind `kind`."""
    return any(self.kind_for(g) == kind for g in LINEAR_GROUPS)

  def all_dense(self) -> "LinearConfig":
    """The same config with every group dense (the model after reverse sparsification)."""
    return dataclasses.replace(self, kind="dense", qkv="", attn_out="", mlp="", relora_every=0)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-Experts FFN (effjax/moe), used where `model.ffn == "moe"`.

  Expert ids: 0..num_experts-1 are SwiGLU FFN experts, then `num_zero_experts` zero,
  `num_copy_experts` copy and `num_constant_experts` constant experts (MoE++); the router
  chooses among all of them. Capacity C = ceil(capacity_factor * tokens * top_k /
  num_experts) per expert and token group (`group_size`; 0 = the batch), from the group's real
  (non-padding) tokens (capacity dispatch and expert choice).
  """
  num_experts: int = 8
  top_k: int = 2
  every_n: int = 1  # layer i (0-based) is MoE iff (i + 1) % every_n == 0
  d_ff: int = 0  # hidden width of one FFN expert; 0 = model.d_ff
  router: str = "softmax_topk"
  # softmax_topk / sigmoid_bias: the k weights renormalised to sum to 1 (refused with top_k=1:
  # the single weight would be p / p = 1 and the task loss would not reach the router)
  renormalize: bool = True
  jitter: float = 0.0  # training: router input multiplied by U(1 - jitter, 1 + jitter)
  dispatch: str = "dropless"
  capacity_factor: float = 1.25  # training (capacity dispatch; expert choice always)
  # evaluation; 0 = capacity_factor (evaluate the mixture that was trained). A different value
  # is opt-in and sown as the "capacity_factor" metric
  eval_capacity_factor: float = 0.0
  # capacity dispatch and expert choice route within groups of this many tokens (GShard), so
  # the [tokens, E, C] dispatch tensors grow linearly with the batch; 0 = one group
  group_size: int = 0
  gmm_impl: str = "ragged_dot"  # dropless expert matmuls: "ragged_dot" or "pallas" (see gmm.py)
  aux_loss_weight: float = 0.01  # Switch load-balancing loss
  z_loss_weight: float = 1e-3  # ST-MoE router z-loss
  # MoE++ heterogeneous load balance: zero/copy/constant experts' terms weighted by this
  moepp_tau: float = 0.75
  bias_rate: float = 1e-3  # sigmoid_bias: selection-bias step per update
  allow_noncausal: bool = False  # expert_choice in a causal LM needs this opt-in
  # dense_to_sparse (EvoMoE): Gumbel-softmax temperature from temp_start to temp_end over
  # anneal_steps updates ("exponential" or "linear"), experts whose gate >= threshold used
  temp_start: float = 2.0
  temp_end: float = 0.3
  anneal_steps: int = 500
  anneal: str = "exponential"
  threshold: float = 0.05
  hard_gumbel: bool = False  # after the anneal: hard top-1 Gumbel gate (straight-through)
  gate_activation: str = "none"  # activation dense-to-sparse gate: softmax(act(logits) / tau)
  # dense_to_sparse, dropless, one device: while tokens use at most this many experts on
  # average, the expert matmuls run over this many rows per token, not E (exact; the sparse
  # phase's cost); 0 = off
  compact_experts_per_token: int = 0
  num_zero_experts: int = 0
  num_copy_experts: int = 0
  num_constant_experts: int = 0
  gating_residual: bool = False  # MoE++: router adds a projection of the previous logits
  num_shared_experts: int = 0  # DeepSeek: dense FFN(s) of width d_ff each, added
  # expert parallelism (mesh.expert > 1): per-destination all-to-all buffer of
  # ceil(ep_buffer_factor * local pairs / expert degree) rows; 0 = worst case, never overflows
  ep_buffer_factor: float = 0.0
  ep_reroute: bool = False  # a pair whose destination buffer is full tries its next expert
  upcycle_noise: float = 0.0  # train.init_from: relative std of noise added to each copy
  upcycle_mask: float = 0.0  # train.init_from: fraction of each copy's weights zeroed (EvoMoE)

  def __post_init__(self):
    for name in ("num_experts", "top_k", "every_n"):
      value = getattr(self, name)
      _require(isinstance(value, int) and value >= 1,
               f"model.moe.{name} must be an integer >= 1, got {value!r}")
    _require(self.d_ff >= 0, f"model.moe.d_ff must be >= 0 (0 = model.d_ff), got {self.d_ff}")
    _one_of("model.moe.router", self.router, MOE_ROUTERS)
    _one_of("model.moe.dispatch", self.dispatch, MOE_DISPATCH)
    _one_of("model.moe.gmm_impl", self.gmm_impl, MOE_GMM_IMPLS)
    _one_of("model.moe.anneal", self.anneal, ("exponential", "linear"))
    _one_of("model.moe.gate_activation", self.gate_activation, MOE_GATE_ACTIVATIONS)
    _positive("model.moe.capacity_factor", self.capacity_factor)
    _require(self.eval_capacity_factor >= 0, "model.moe.eval_capacity_factor must be >= 0 "
             f"(0 = capacity_factor), got {self.eval_capacity_factor!r}")
    _require(self.router not in ("softmax_topk", "sigmoid_bias", "topk_softmax")
             or self.top_k > 1 or (self.router != "topk_softmax" and not self.renormalize),
             f"model.moe.router={self.router!r} with top_k=1 "
             + ("always weights the chosen expert by softmax over one logit = 1"
                if self.router == "topk_softmax" else "and renormalize=True weights the chosen "
                "expert by p / p = 1") + ", so the task loss gives the router no gradient; use "
             + ("router='softmax_topk' with renormalize=False (Switch)"
                if self.router == "topk_softmax" else "renormalize=False (Switch: the raw gate "
                "value)"))
    for name in ("group_size", "compact_experts_per_token"):
      _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
               f"model.moe.{name} must be an integer >= 0, got {getattr(self, name)!r}")
    _require(self.compact_experts_per_token == 0 or self.router == "dense_to_sparse",
             f"model.moe.compact_experts_per_token={self.compact_experts_per_token} belongs to "
             f"the dense_to_sparse router, not to router={self.router!r}")
    _require(self.compact_experts_per_token <= self.num_experts,
             f"model.moe.compact_experts_per_token={self.compact_experts_per_token} exceeds "
             f"model.moe.num_experts={self.num_experts}")
    for name in ("aux_loss_weight", "z_loss_weight", "bias_rate", "upcycle_noise", "moepp_tau",
                 "ep_buffer_factor", "num_zero_experts", "num_copy_experts",
                 "num_constant_experts", "num_shared_experts"):
      _require(getattr(self, name) >= 0,
               f"model.moe.{name} must be >= 0, got {getattr(self, name)!r}")
    _require(0 <= self.jitter < 1, f"model.moe.jitter must be in [0, 1), got {self.jitter}")
    _require(0 <= self.upcycle_mask < 1,
             f"model.moe.upcycle_mask must be in [0, 1), got {self.upcycle_mask}")
    for name, default in (("hard_gumbel", False), ("gate_activation", "none")):
      _require(getattr(self, name) == default or self.router == "dense_to_sparse",
               f"model.moe.{name}={getattr(self, name)!r} belongs to the dense_to_sparse "
               f"router, not to router={self.router!r}")
    _require(self.top_k <= self.num_routed,
             f"model.moe.top_k={self.top_k} exceeds the {self.num_routed} experts a token can "
             f"be routed to (model.moe.num_experts={self.num_experts} plus "
             f"{self.num_routed - self.num_experts} zero/copy/constant)")
    if self.router == "dense_to_sparse":
      _positive("model.moe.temp_start", self.temp_start)
      _positive("model.moe.temp_end", self.temp_end)
      _positive("model.moe.anneal_steps", self.anneal_steps)
      _require(0 < self.threshold < 1,
               f"model.moe.threshold must be in (0, 1), got {self.threshold}")
    if self.router == "expert_choice":
      _require(self.allow_noncausal,
               "model.moe.router='expert_choice' lets each expert pick its top tokens among "
               "all tokens of the batch, future positions included, so a token's output "
               "depends on later tokens: it is not causal and cannot decode autoregressively. "
               "Set model.moe.allow_noncausal=True to train a causal LM with it anyway")
    if self.router in ("expert_choice", "dense_to_sparse"):
      _require(self.num_routed == self.num_experts,
               f"model.moe.router={self.router!r} does not support zero/copy/constant experts")
      _require(not self.ep_reroute,
               f"model.moe.ep_reroute needs a top-k router, not {self.router!r}")
    if self.ep_reroute:
      _require(2 * self.top_k <= self.num_experts,
               f"model.moe.ep_reroute needs 2 * top_k <= num_experts (a second choice for "
               f"each of the k slots), got top_k={self.top_k}, num_experts={self.num_experts}")

  @property
  def num_routed(self) -> int:
    """FFN experts plus zero, copy and constant experts: the router's output width."""
    return (self.num_experts + self.num_zero_experts + self.num_copy_experts
            + self.num_constant_experts)

  @property
  def active_ffn_experts(self) -> int:
    """Slots per token in the capacity formula: top_k (expert choice: C = cf * T * top_k / E);
    dense_to_sparse: all experts."""
    return self.num_experts if self.router == "dense_to_sparse" else self.top_k

  @property
  def ffn_experts_per_token(self) -> float:
    """FFN experts that run per token, counted in FLOPs: top_k (an upper bound with
    zero-computation experts); expert choice: capacity_factor * top_k, what its capacity makes
    it compute (training); dense_to_sparse: all (its dense start; the sparse phase with
    compact_experts_per_token costs that many)."""
    if self.router == "expert_choice":
      return min(self.capacity_factor * self.top_k, float(self.num_experts))
    return float(self.active_ffn_experts)

  @property
  def resolved_eval_capacity_factor(self) -> float:
    return self.eval_capacity_factor or self.capacity_factor


GEOMETRIES = ("euclidean", "hyperbolic")


@dataclasses.dataclass(frozen=True)
class HyperbolicConfig:
  """The fully hyperbolic LM (effjax/models/hyperbolic_lm.py, layers in
  effjax/layers/lorentz.py), used where `model.geometry == "hyperbolic"`.

  Points live on the hyperboloid of curvature -1/K (`curvature` = K, learned when
  `learn_curvature`). `time_scaling`: HyboNet's Lorentz linear time coordinate
  sqrt(K) (lambda sigmoid(z) + 1.1), lambda initialised to `time_scale` and learned unless
  `learn_time_scale` is False; without it the time coordinate is computed from the space part.
  `dropout`: HyboNet's dropout on the input of every Lorentz linear layer (training only).
  """
  curvature: float = 1.0
  learn_curvature: bool = False
  time_scaling: bool = True
  time_scale: float = 10.0
  learn_time_scale: bool = True
  dropout: float = 0.0

  def __post_init__(self):
    _positive("model.hyperbolic.curvature", self.curvature)
    _positive("model.hyperbolic.time_scale", self.time_scale)
    _require(0 <= self.dropout < 1,
             f"model.hyperbolic.dropout must be in [0, 1), got {self.dropout!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # 0 = the tokenizer's vocabulary rounded up to a multiple of 128 (config.resolve); the
  # default 384 is that for the byte tokenizer's 259
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
  sliding_window: int = 0  # w > 0: query i attends to keys i - w < j <= i only (0 = all)
  linear: LinearConfig = LinearConfig()
  ffn: str = "dense"  # "moe": Mixture-of-Experts FFN in the layers model.moe.every_n selects
  moe: MoEConfig = MoEConfig()
  scan_layers: bool = False
  remat: str = "none"
  param_dtype: str = "float32"
  dtype: str = "float32"
  geometry: str = "euclidean"  # GEOMETRIES; "hyperbolic": see HyperbolicConfig
  hyperbolic: HyperbolicConfig = HyperbolicConfig()

  def __post_init__(self):
    _require(isinstance(self.vocab_size, int) and self.vocab_size >= 0,
             f"model.vocab_size must be an integer >= 0 (0 = the tokenizer's size rounded up "
             f"to a multiple of 128), got {self.vocab_size!r}")
    for name in ("d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff"):
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
    _require(isinstance(self.sliding_window, int) and self.sliding_window >= 0,
             f"model.sliding_window must be an integer >= 0 (0 = no window), got "
             f"{self.sliding_window!r}")
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
      if self.linear.kind_for(group) in ("lora", "sst"):
        narrowest = min(min(shape) for shape in shapes)
        _require(self.linear.rank <= narrowest,
                 f"model.linear.rank={self.linear.rank} is larger than min(in, out)={narrowest} "
                 f"of the narrowest {group!r} projection (shapes {shapes})")
    _one_of("model.ffn", self.ffn, FFN_KINDS)
    if self.ffn == "moe":
      _require(self.moe.every_n <= self.num_layers,
               f"model.moe.every_n={self.moe.every_n} exceeds model.num_layers="
               f"{self.num_layers}: no layer would be MoE")
      _require(not self.scan_layers or self.moe.every_n == 1,
               f"model.scan_layers needs identical layers, so model.moe.every_n must be 1 "
               f"(got {self.moe.every_n})")
      _require(self.linear.kind_for("mlp") == "dense",
               f"model.ffn='moe' builds its experts dense; model.linear.mlp (or kind) must be "
               f"dense, got {self.linear.kind_for('mlp')!r}")
    self._check_geometry()
    if self.attention_impl == "cudnn":
      _require(self.dtype == "bfloat16",
               "model.attention_impl='cudnn' runs cuDNN flash attention, which needs "
               f"model.dtype='bfloat16' (got {self.dtype!r})")

  def _check_geometry(self) -> None:
    """What the hyperbolic LM does not define (HyboNet has no such layer) is refused."""
    _one_of("model.geometry", self.geometry, GEOMETRIES)
    if self.geometry == "euclidean":
      _require(self.hyperbolic == HyperbolicConfig(),
               f"model.hyperbolic={self.hyperbolic} is set but model.geometry='euclidean' "
               "ignores it; set model.geometry='hyperbolic' or leave model.hyperbolic at its "
               "defaults")
      return
    where = "model.geometry='hyperbolic'"
    _require(self.ffn == "dense", f"{where}: model.ffn={self.ffn!r} is not defined in "
             "HyboNet (its feed-forward is two Lorentz linear layers); use ffn='dense'")
    for group in LINEAR_GROUPS:
      _require(self.linear.kind_for(group) != "monarch",
               f"{where}: model.linear.{group} kind 'monarch' is not supported in a Lorentz "
               "linear layer (dense, lora and sst are)")
    _require(self.attention_impl == "xla",
             f"{where}: model.attention_impl={self.attention_impl!r} computes softmax(q k^T) "
             "dot-product attention; Lorentz attention (Lorentzian inner-product scores, "
             "centroid aggregation) exists only as attention_impl='xla'")
    for name in ("dtype", "param_dtype"):
      _require(getattr(self, name) == "float32",
               f"{where}: model.{name}={getattr(self, name)!r}; the hyperboloid constraint "
               "x_0^2 - |x_s|^2 = K cancels catastrophically below float32, so only "
               "'float32' is supported")
    _require(not self.scan_layers, f"{where}: model.scan_layers=True is not implemented for "
             "the hyperbolic LM; use scan_layers=False")
    _require(self.resolved_head_dim >= 3, f"{where}: head dim {self.resolved_head_dim} leaves "
             "a head fewer than 2 space-like coordinates (one is the time coordinate, RoPE "
             "rotates pairs of the rest); use a head dim >= 3")

  def is_moe_layer(self, layer: int) -> bool:
    """Whether layer `layer` (0-based) has a Mixture-of-Experts FFN."""
    return self.ffn == "moe" and (layer + 1) % self.moe.every_n == 0

  @property
  def moe_d_ff(self) -> int:
    return self.moe.d_ff or self.d_ff

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def projection_shapes(self) -> dict[str, list[tuple[int, int]]]:
    """(in, out) of each projection of one layer, by projection group."""
    d, h = self.d_model, self.resolved_head_dim
    return {"qkv": [(d, self.num_heads * h), (d, self.num_kv_heads * h),
                    (d, self.num_kv_heads * h)],
            "attn_out": [(self.num_heads * h, d)],
            # the hyperbolic LM's feed-forward is two Lorentz linear layers, not SwiGLU
            "mlp": ([(d, self.d_ff), (self.d_ff, d)] if self.geometry == "hyperbolic"
                    else [(d, self.d_ff), (d, self.d_ff), (self.d_ff, d)])}


# data.files: the formats a user's own files may have (effjax/data/own_files.py)
OWN_FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = "python_stdlib"  # the bundled offline corpus, or a TFDS name in array_record
  # Your own text instead of `dataset`: comma-separated globs of .txt (one document per file),
  # .jsonl / .jsonl.gz (one JSON object per line, the document under text_key) and .parquet
  # (the text_key column) files, prepared once into array_record under data_dir
  # (effjax/data/own_files.py). Relative globs are relative to the current directory.
  files: str = ""
  text_key: str = "text"
  # data.files: percent of the documents in the validation split, chosen by a hash of each
  # document's text (the rest is the train split)
  validation_percent: int = 5
  # "byte", "sentencepiece:PATH" (a .model) or "hf:PATH" (a tokenizer.json); see
  # effjax/data/tokenizer.py. A run copies the file into its workdir.
  tokenizer: str = "byte"
  data_dir: str = ""  # "" means the TFDS default directory
  seq_len: int = 256
  train_split: str = "train"
  eval_split: str = "validation"
  # Evaluations during training use N batches spread evenly over the evaluation split (0 = all
  # of it); the one at the last step uses final_eval_batches (0 = the whole split, the number
  # a run reports). See effjax/train/evaluation.py.
  eval_batches: int = 32
  final_eval_batches: int = 0
  # training rows are shuffled within windows of this many packed rows (1 = file order)
  shuffle_window: int = 8192
  # percent of train_split's files held out from training for choosing hyperparameters
  # (pipeline.selection_split); 0 = none
  select_percent: int = 0

  def __post_init__(self):
    _positive("data.seq_len", self.seq_len)
    _require(isinstance(self.eval_batches, int) and self.eval_batches >= 0,
             f"data.eval_batches must be an integer >= 0 (0 = whole split), got "
             f"{self.eval_batches!r}")
    _require(isinstance(self.final_eval_batches, int) and self.final_eval_batches >= 0,
             f"data.final_eval_batches must be an integer >= 0 (0 = whole split), got "
             f"{self.final_eval_batches!r}")
    _require(isinstance(self.shuffle_window, int) and self.shuffle_window >= 1,
             f"data.shuffle_window must be an integer >= 1 (1 = no row shuffle), got "
             f"{self.shuffle_window!r}")
    _require(isinstance(self.select_percent, int) and 0 <= self.select_percent < 50,
             f"data.select_percent must be an integer in [0, 50), got {self.select_percent!r}")
    _require(not self.select_percent or "[" not in self.train_split,
             f"data.select_percent={self.select_percent} slices data.train_split, which is "
             f"already a slice ({self.train_split!r})")
    _require(bool(self.dataset), "data.dataset must name a dataset")
    _require(isinstance(self.validation_percent, int) and 1 <= self.validation_percent <= 50,
             f"data.validation_percent must be an integer in [1, 50], got "
             f"{self.validation_percent!r}")
    _require(bool(self.files) or self.validation_percent == DataConfig.validation_percent,
             f"data.validation_percent={self.validation_percent} splits data.files, which is "
             f"not set (data.dataset={self.dataset!r} has its own splits)")
    _require(not self.files or self.dataset == DataConfig.dataset,
             f"data.files={self.files!r} and data.dataset={self.dataset!r} name two "
             "datasets; set one of them")
    _require(bool(self.text_key), "data.text_key must name the documents' field")
    from effjax.data import tokenizer  # pylint: disable=g-import-not-at-top
    tokenizer.parse_spec(self.tokenizer)

  def file_globs(self) -> list[str]:
    return [g.strip() for g in self.files.split(",") if g.strip()]

  def file_paths(self) -> list[str]:
    """The files data.files names: absolute, sorted, each once. ValueError naming the glob
    that matches nothing or the file of an unknown format."""
    import glob  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    paths = set()
    for pattern in self.file_globs():
      found = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
               if not os.path.isdir(p)]
      _require(bool(found), f"data.files: {pattern!r} matches no file")
      for path in found:
        _require(path.endswith(OWN_FILE_SUFFIXES),
                 f"data.files: {path} is not one of the formats {list(OWN_FILE_SUFFIXES)}")
        paths.add(os.path.abspath(path))
    _require(bool(paths), f"data.files={self.files!r} names no glob")
    return sorted(paths)


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
  # Low-rank methods (effjax/optim/lowrank.py). GaLore (effjax/optim/galore.py) on every dense
  # attention/MLP kernel when galore_rank > 0: projection refreshed every galore_every steps.
  galore_rank: int = 0
  galore_every: int = 200
  galore_scale: float = 0.25
  # after each ReLoRA merge / SST resample the learning rate re-warms linearly over this many
  # steps (the jagged schedule, effjax/optim/schedules.py); 0 = no re-warm-up
  rewarm_steps: int = 0

  def __post_init__(self):
    _positive("optim.learning_rate", self.learning_rate)
    _require(isinstance(self.galore_rank, int) and self.galore_rank >= 0,
             f"optim.galore_rank must be an integer >= 0 (0 = off), got {self.galore_rank!r}")
    _require(isinstance(self.galore_every, int) and self.galore_every >= 1,
             f"optim.galore_every must be an integer >= 1, got {self.galore_every!r}")
    _positive("optim.galore_scale", self.galore_scale)
    _require(isinstance(self.rewarm_steps, int) and self.rewarm_steps >= 0,
             f"optim.rewarm_steps must be an integer >= 0, got {self.rewarm_steps!r}")
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
  # dense weight and continue dense (0 = never). See effjax/train/methods/monarch.py.
  dense_from_step: int = 0
  # Dense-to-sparse: a workdir (or its checkpoints/ dir) of a run with the same shapes; its
  # latest params initialise this run, projected onto Monarch where this model uses Monarch.
  init_from: str = ""
  # A step whose loss, gradient or updated state is NaN/Inf is never checkpointed. 0: the run
  # stops there. N > 0: such an update is skipped (state unchanged, counted in the metric
  # skipped_nonfinite) and the run stops only after N skipped steps in a row.
  max_skipped_nonfinite: int = 0
  # k > 1: each step's global batch is run as k microbatches inside the one compiled step (a
  # scan: activations of one microbatch at a time), gradients summed in float32, one update;
  # global_batch_size / k rows must split over the data-parallel shards (effjax/train/step.py:
  # accumulated_gradients says what an MoE combines per microbatch)
  grad_accum_steps: int = 1
  # "START:END" writes a jax.profiler trace of steps START, ..., END - 1 (a Python slice of the
  # loop's step numbers, which start at 1; so END <= num_steps + 1) to WORKDIR/profile/, on
  # process 0 only. "" = no trace. A run resumed after START traces only the steps left.
  profile_steps: str = ""

  @property
  def profile_range(self) -> tuple[int, int] | None:
    """(START, END) of profile_steps, or None when no trace is asked for."""
    if not self.profile_steps:
      return None
    match = re.fullmatch(r"(\d+):(\d+)", self.profile_steps)
    return (int(match.group(1)), int(match.group(2))) if match else None

  def __post_init__(self):
    _positive("train.global_batch_size", self.global_batch_size)
    _require(isinstance(self.max_skipped_nonfinite, int) and self.max_skipped_nonfinite >= 0,
             f"train.max_skipped_nonfinite must be an integer >= 0, got "
             f"{self.max_skipped_nonfinite!r}")
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
    _require(isinstance(self.grad_accum_steps, int) and self.grad_accum_steps >= 1,
             f"train.grad_accum_steps must be an integer >= 1, got {self.grad_accum_steps!r}")
    _require(self.global_batch_size % self.grad_accum_steps == 0,
             f"train.global_batch_size={self.global_batch_size} is not divisible by "
             f"train.grad_accum_steps={self.grad_accum_steps}")
    self._check_profile_steps()

  def _check_profile_steps(self) -> None:
    value = self.profile_steps
    _require(isinstance(value, str), f"train.profile_steps must be a string 'START:END', got "
             f"{value!r}")
    if not value:
      return
    _require(self.profile_range is not None,
             f"train.profile_steps={value!r} is not 'START:END' (two integers, e.g. '10:15' "
             "traces steps 10 to 14)")
    start, end = self.profile_range
    _require(start >= 1, f"train.profile_steps={value!r}: START must be >= 1 (steps are "
             f"numbered from 1), got {start}")
    _require(end > start, f"train.profile_steps={value!r}: END must be > START (END is "
             f"excluded, like a Python slice), got {start}:{end}")
    _require(end <= self.num_steps + 1,
             f"train.profile_steps={value!r}: END must be <= train.num_steps + 1 = "
             f"{self.num_steps + 1} (END is excluded), got {end}")


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
    if self.data.tokenizer == "byte" and self.model.vocab_size:  # file tokenizers: resolve()
      from effjax.data import tokenizer  # pylint: disable=g-import-not-at-top
      _require(self.model.vocab_size >= tokenizer.VOCAB_SIZE,
               f"model.vocab_size={self.model.vocab_size} is smaller than the byte tokenizer's "
               f"{tokenizer.VOCAB_SIZE} tokens")
    _require(not self.train.dense_from_step or self.model.linear.uses_monarch,
             f"train.dense_from_step={self.train.dense_from_step} converts Monarch layers to "
             "dense, but model.linear uses no Monarch layer")
    self._check_lowrank()
    if self.model.ffn == "moe" and self.mesh.expert > 1:
      _require(self.model.moe.num_experts % self.mesh.expert == 0,
               f"model.moe.num_experts={self.model.moe.num_experts} is not divisible by "
               f"mesh.expert={self.mesh.expert}: every device of the expert axis must hold "
               "the same number of experts")
    _require(self.optim.warmup_steps < self.train.num_steps,
             f"optim.warmup_steps={self.optim.warmup_steps} exceeds train.num_steps="
             f"{self.train.num_steps}")

  def _check_lowrank(self) -> None:
    """Cross-field checks of the low-rank methods (LoRA/ReLoRA, SST, GaLore)."""
    linear, optim = self.model.linear, self.optim
    if optim.galore_rank:
      _require(all(linear.kind_for(g) == "dense" for g in LINEAR_GROUPS),
               f"optim.galore_rank={optim.galore_rank}: GaLore trains dense projections; "
               "model.linear must be dense in every group")
      narrowest = min(min(s) for shapes in self.model.projection_shapes().values()
                      for s in shapes)
      _require(optim.galore_rank <= narrowest,
               f"optim.galore_rank={optim.galore_rank} is larger than min(in, out)={narrowest} "
               "of the narrowest projection")
    period = (linear.sst_every if linear.uses("sst") else linear.relora_every
              if linear.uses("lora") else 0)
    _require(not optim.rewarm_steps or period,
             f"optim.rewarm_steps={optim.rewarm_steps} re-warms after ReLoRA merges or SST "
             "resamples, but the model has neither (model.linear.relora_every or kind 'sst')")
    _require(not period or optim.rewarm_steps <= period,
             f"optim.rewarm_steps={optim.rewarm_steps} is longer than the restart period "
             f"{period}")


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
  """ConfigDict (or plain dict) -> ExperimentConfig, with every check applied and its files
  resolved (see resolve)."""
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return resolve(from_dict(ExperimentConfig, values))


def resolve(cfg: ExperimentConfig, base_dir: str = "", *,
            check_files: bool = True) -> ExperimentConfig:
  """The checks that read files, and what they decide: data.files' globs must match files
  (made absolute, relative to the current directory), data.tokenizer's file must load (made
  absolute, relative to `base_dir`, default the current directory: a run's config.json names
  its copy relative to the run's directory), and model.vocab_size=0 becomes the tokenizer's
  size rounded up to a multiple of 128; an explicit size below the tokenizer's is refused.
  `check_files=False` leaves data.files unchecked (a finished run samples without its data).
  Idempotent."""
  import os  # pylint: disable=g-import-not-at-top
  from effjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  data, model = cfg.data, cfg.model
  if data.files:
    if check_files:
      data.file_paths()  # every glob matches a file of a known format
    files = ",".join(os.path.abspath(os.path.expanduser(g)) for g in data.file_globs())
    data = dataclasses.replace(data, files=files)
  if data.tokenizer != "byte":
    data = dataclasses.replace(data, tokenizer=tokenizer_lib.resolve_path(data.tokenizer,
                                                                          base_dir))
  tok = tokenizer_lib.load(data.tokenizer)
  if not model.vocab_size:
    model = dataclasses.replace(model, vocab_size=tokenizer_lib.padded_vocab_size(
        tok.vocab_size))
  tokens = (f"the byte tokenizer's {tok.vocab_size} tokens" if tok.kind == "byte"
            else f"the {tok.vocab_size} tokens of data.tokenizer={data.tokenizer!r}")
  _require(model.vocab_size >= tok.vocab_size,
           f"model.vocab_size={model.vocab_size} is smaller than {tokens}; set "
           f"model.vocab_size=0 to take the tokenizer's size rounded up to a multiple of 128 "
           f"({tokenizer_lib.padded_vocab_size(tok.vocab_size)})")
  if data is cfg.data and model is cfg.model:
    return cfg
  return dataclasses.replace(cfg, data=data, model=model)


def to_dict(config) -> dict[str, Any]:
  return dataclasses.asdict(config)
