"""Causal grouped-query self-attention with an implementation switch.

Every implementation computes the same function: softmax(q k^T * scale) v with a causal mask,
restricted to tokens of the same segment (packed documents never attend to each other).
  xla    explicit einsums, the reference; runs everywhere.
  cudnn  jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention
         (CUDA GPUs, bfloat16).
  pallas effjax's Pallas flash attention kernels (GPU: Mosaic GPU on Hopper, Triton-style
         elsewhere; TPU Mosaic; interpret mode on CPU).
`sliding_window` w > 0 restricts query i to keys i - w < j <= i (0 = the whole prefix).

Decoding (`Attention.decode`, used by effjax/models/decode.py) keeps a KV cache in the
variable collection "cache": `cached_key`, `cached_value` [B, S, K, H] (grouped-query: the K
kv heads only), S the fixed maximum length, slot s holding the token at position s.
"prefill" starts a sequence: it writes the prompt's keys and values into their slots and
attends with the configured implementation over the prompt alone. "step" writes the new
tokens at their positions and attends over the cache with the reference einsums (the flash
kernels are built for long query blocks, not one token): query at position p sees slots
s <= p (and s > p - w), so slots past a row's length, stale or empty, are never read.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.config import LinearConfig
from effjax.layers.embeddings import apply_rope
from effjax.layers.linear import make_linear


CACHE_COLLECTION = "cache"
CACHE_AXES = ("cache_batch", "cache_length", "cache_heads", "cache_kv")  # [B, S, K, H]
DECODE_MODES = ("", "prefill", "step")


def attention_mask(segment_ids_BL, sliding_window: int = 0):
  """[B, 1, L, L] boolean: causal, same segment, and within the window when there is one."""
  length = segment_ids_BL.shape[1]
  causal_LL = jnp.tril(jnp.ones((length, length), jnp.bool_))
  if sliding_window:  # drop keys j <= i - w
    causal_LL = causal_LL & ~jnp.tril(jnp.ones((length, length), jnp.bool_), -sliding_window)
  same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return (causal_LL[None] & same_BLL)[:, None]


def attention_xla(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, scale: float,
                  sliding_window: int = 0):
  """Reference attention; K kv heads are shared by groups of N // K query heads."""
  return _grouped_attention(q_BLNH, k_BSKH, v_BSKH,
                            attention_mask(segment_ids_BL, sliding_window)[:, :, None], scale)


def attention_over_cache(q_BLNH, k_BSKH, v_BSKH, positions_BL, scale: float,
                         sliding_window: int = 0):
  """Queries at `positions_BL` against a KV cache whose slot s holds position s."""
  slots_11S = jnp.arange(k_BSKH.shape[1])[None, None, :]
  pos_BL1 = positions_BL[:, :, None]
  visible_BLS = slots_11S <= pos_BL1
  if sliding_window:
    visible_BLS = visible_BLS & (slots_11S > pos_BL1 - sliding_window)
  return _grouped_attention(q_BLNH, k_BSKH, v_BSKH, visible_BLS[:, None, None], scale)


def _grouped_attention(q_BLNH, k_BSKH, v_BSKH, mask_B11LS, scale: float):
  b, l, n, h = q_BLNH.shape
  k = k_BSKH.shape[2]
  q_BLKGH = q_BLNH.reshape(b, l, k, n // k, h)
  logits_BKGLS = jnp.einsum("blkgh,bskh->bkgls", q_BLKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  logits_BKGLS = jnp.where(mask_B11LS, logits_BKGLS, jnp.finfo(jnp.float32).min)
  probs_BKGLS = jax.nn.softmax(logits_BKGLS, axis=-1).astype(v_BSKH.dtype)
  out_BLKGH = jnp.einsum("bkgls,bskh->blkgh", probs_BKGLS, v_BSKH)
  return out_BLKGH.reshape(b, l, n, h)


def attention_cudnn(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, scale: float,
                    sliding_window: int = 0):
  from pallas_kernels import tiling  # pylint: disable=g-import-not-at-top
  if tiling.compiling_platform() != "gpu":
    raise NotImplementedError(
        f"attention_impl='cudnn' needs a CUDA GPU; this program is compiled for "
        f"{tiling.compiling_platform()!r}. Use attention_impl='xla' there.")
  mask_B1LS = attention_mask(segment_ids_BL)
  window = {"local_window_size": (sliding_window - 1, 0)} if sliding_window else {}
  return jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, mask=mask_B1LS, scale=scale,
                                      is_causal=True, implementation="cudnn", **window)


def _pallas_shard_specs(mesh, q_shape, k_shape):
  """Per-shard PartitionSpecs (q, kv, segment ids) from the logical rules in context: batch
  over the batch axes, heads over theirs; a dimension the axes do not divide stays whole."""
  import math  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  rules = nn.get_logical_axis_rules()
  to_mesh = lambda names: tuple(nn.logical_to_mesh_axes(names, rules))
  batch_axes, _, heads_axes, _ = to_mesh(("batch", "length", "heads", "kv"))

  def size(axes):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)

  batch = batch_axes if q_shape[0] % size(batch_axes) == 0 else None
  # q head n reads kv head n // (N // K): both split into the same number of contiguous
  # chunks keeps every group on one shard.
  heads = heads_axes if q_shape[2] % size(heads_axes) == 0 and k_shape[2] % size(
      heads_axes) == 0 else None
  return P(batch, None, heads, None), P(batch, None, heads, None), P(batch, None)


# flash_attention's `interpret` off GPUs and TPUs: True runs the Triton-style kernel in
# Pallas's interpreter; tests set Mosaic GPU interpreter params here to run the Mosaic GPU
# kernels instead (as they patch effjax.moe.gmm.GMM_IMPLS).
PALLAS_CPU_INTERPRET: Any = True


def attention_pallas(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, scale: float,
                     sliding_window: int = 0):
  """effjax's Pallas flash attention (pallas_kernels.attention): its platform default on
  GPUs (Mosaic GPU on Hopper, Triton-style elsewhere) and TPUs; on a CPU a GPU kernel in
  interpret mode (PALLAS_CPU_INTERPRET; slow, for tests: it checks the kernel, not speed)."""
  from pallas_kernels import tiling  # pylint: disable=g-import-not-at-top
  from pallas_kernels.attention import flash_attention  # pylint: disable=g-import-not-at-top
  interpret = PALLAS_CPU_INTERPRET if tiling.compiling_platform() not in ("gpu", "tpu") else False

  def attend(q, k, v, segment_ids):
    return flash_attention(q, k, v, causal=True, segment_ids=segment_ids, sm_scale=scale,
                           sliding_window=sliding_window or None, interpret=interpret)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or not nn.get_logical_axis_rules():
    return attend(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)
  # A pallas_call is opaque to XLA's partitioner, which would gather every operand onto every
  # device and compute the whole batch there; run the kernel per shard instead.
  q_spec, kv_spec, seg_spec = _pallas_shard_specs(mesh, q_BLNH.shape, k_BSKH.shape)
  return jax.shard_map(attend, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                       check_vma=False)(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)


ATTENTION_FNS = {"xla": attention_xla, "cudnn": attention_cudnn, "pallas": attention_pallas}


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  impl: str = "xla"
  linear: LinearConfig = LinearConfig()
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  sliding_window: int = 0  # 0 = every earlier key of the segment
  decode: str = ""  # DECODE_MODES: "" trains/evaluates; "prefill" / "step" use the KV cache

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL):
    if self.decode not in DECODE_MODES:
      raise ValueError(f"Attention.decode={self.decode!r} is not one of {list(DECODE_MODES)}")
    if self.sliding_window < 0:
      raise ValueError(f"Attention.sliding_window must be >= 0, got {self.sliding_window}")
    b, l, d = x_BLD.shape
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim

    def proj(features, in_axis, out_axis, name, group="qkv"):
      return make_linear(self.linear, features, group=group, in_axis=in_axis, out_axis=out_axis,
                         name=name, init_std=self.init_std, dtype=self.dtype,
                         param_dtype=self.param_dtype)

    q_BLNH = proj(n * h, "embed", "heads", "query")(x_BLD).reshape(b, l, n, h)
    k_BLKH = proj(k * h, "embed", "heads", "key")(x_BLD).reshape(b, l, k, h)
    v_BLKH = proj(k * h, "embed", "heads", "value")(x_BLD).reshape(b, l, k, h)
    q_BLNH = nn.with_logical_constraint(apply_rope(q_BLNH, positions_BL, self.rope_theta),
                                        ("batch", "length", "heads", "kv"))
    k_BLKH = apply_rope(k_BLKH, positions_BL, self.rope_theta)
    if self.decode:
      out_BLNH = self._attend_with_cache(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, positions_BL)
    elif self.sliding_window:
      out_BLNH = ATTENTION_FNS[self.impl](q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, h ** -0.5,
                                         sliding_window=self.sliding_window)
    else:
      out_BLNH = ATTENTION_FNS[self.impl](q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, h ** -0.5)
    out_BLNH = nn.with_logical_constraint(out_BLNH, ("batch", "length", "heads", "kv"))
    return proj(d, "heads", "embed", "out", group="attn_out")(out_BLNH.reshape(b, l, n * h))

  def _attend_with_cache(self, q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, positions_BL):
    """Writes k, v into the cache at their positions; attention as the module docstring says.

    The cache is created with this call's length when it is not passed in (to size it, call
    once with the maximum length under jax.eval_shape)."""
    b, l, k, h = k_BLKH.shape
    zeros = nn.with_logical_partitioning(jnp.zeros, CACHE_AXES)
    key = self.variable(CACHE_COLLECTION, "cached_key", zeros, (b, l, k, h), k_BLKH.dtype)
    value = self.variable(CACHE_COLLECTION, "cached_value", zeros, (b, l, k, h), v_BLKH.dtype)
    rows_B1 = jnp.arange(b)[:, None]
    key.value = nn.with_logical_constraint(
        key.value.at[rows_B1, positions_BL].set(k_BLKH.astype(key.value.dtype)), CACHE_AXES)
    value.value = nn.with_logical_constraint(
        value.value.at[rows_B1, positions_BL].set(v_BLKH.astype(value.value.dtype)), CACHE_AXES)
    scale = self.head_dim ** -0.5
    window = {"sliding_window": self.sliding_window} if self.sliding_window else {}
    if self.decode == "prefill":  # the sequence starts here: its own keys are all there is
      return ATTENTION_FNS[self.impl](q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, scale, **window)
    return attention_over_cache(q_BLNH, key.value.astype(q_BLNH.dtype),
                                value.value.astype(q_BLNH.dtype), positions_BL, scale,
                                self.sliding_window)
