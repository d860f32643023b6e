"""Causal grouped-query self-attention with an implementation switch.

Every implementation computes the same function: softmax(q k^T * scale) v with a causal mask,
restricted to tokens of the same segment (packed documents never attend to each other).
  xla    explicit einsums, the reference; runs everywhere.
  cudnn  jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention
         (CUDA GPUs, bfloat16).
  pallas effjax's Pallas flash attention kernels (GPU Triton-style, TPU Mosaic; interpret
         mode on CPU).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.config import LinearConfig
from effjax.layers.embeddings import apply_rope
from effjax.layers.linear import make_linear


def attention_mask(segment_ids_BL):
  """[B, 1, L, L] boolean: causal and same segment."""
  length = segment_ids_BL.shape[1]
  causal_LL = jnp.tril(jnp.ones((length, length), jnp.bool_))
  same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return (causal_LL[None] & same_BLL)[:, None]


def attention_xla(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, scale: float):
  """Reference attention; K kv heads are shared by groups of N // K query heads."""
  b, l, n, h = q_BLNH.shape
  k = k_BSKH.shape[2]
  q_BLKGH = q_BLNH.reshape(b, l, k, n // k, h)
  logits_BKGLS = jnp.einsum("blkgh,bskh->bkgls", q_BLKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  mask_B11LS = attention_mask(segment_ids_BL)[:, :, None]
  logits_BKGLS = jnp.where(mask_B11LS, logits_BKGLS, jnp.finfo(jnp.float32).min)
  probs_BKGLS = jax.nn.softmax(logits_BKGLS, axis=-1).astype(v_BSKH.dtype)
  out_BLKGH = jnp.einsum("bkgls,bskh->blkgh", probs_BKGLS, v_BSKH)
  return out_BLKGH.reshape(b, l, n, h)


def attention_cudnn(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, scale: float):
  if jax.default_backend() != "gpu":
    raise NotImplementedError(
        f"attention_impl='cudnn' needs a CUDA GPU; this process runs on "
        f"{jax.default_backend()!r}. Use attention_impl='xla' there.")
  mask_B1LS = attention_mask(segment_ids_BL)
  return jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, mask=mask_B1LS, scale=scale,
                                      is_causal=True, implementation="cudnn")


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


def attention_pallas(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, scale: float):
  """effjax's Pallas flash attention (pallas_kernels.attention): the Triton-style kernel on
  GPUs, the Mosaic kernel on TPUs; on a CPU the same GPU kernel runs in interpret mode (slow,
  for tests: it checks the kernel, not speed)."""
  from pallas_kernels.attention import flash_attention  # pylint: disable=g-import-not-at-top
  interpret = jax.default_backend() not in ("gpu", "tpu")

  def attend(q, k, v, segment_ids):
    return flash_attention(q, k, v, causal=True, segment_ids=segment_ids, sm_scale=scale,
                           interpret=interpret)

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

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL):
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
    out_BLNH = ATTENTION_FNS[self.impl](q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, h ** -0.5)
    out_BLNH = nn.with_logical_constraint(out_BLNH, ("batch", "length", "heads", "kv"))
    return proj(d, "heads", "embed", "out", group="attn_out")(out_BLNH.reshape(b, l, n * h))
