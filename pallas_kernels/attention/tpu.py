"""Flash attention as Mosaic TPU `pallas_call`s: forward, dK/dV and dQ kernels.

Layout [batch, heads, seq, head_dim] (api.py transposes), so every block's last two dims are
(sequence tile, head_dim) as Mosaic's (sublane, lane) tiling wants. Unlike the GPU kernels,
which loop over key blocks inside a program, the key (or query) loop is the innermost grid
axis ("arbitrary"), with float32 accumulators in VMEM scratch: Mosaic pipelines the block
copies of a grid axis for us. Blocks no query can see are skipped with `pl.when`, and their
index maps are clamped into the visible range so the pipeline does not fetch them either.

dK/dV sums the N // K query heads of a group on a grid axis (B, K, key blocks, G, query
blocks), accumulating in the same scratch: no partials, no atomics.
Segment ids arrive as [B, T, 1] (queries, a column per block) and [B, 1, S] (keys, a row).

Status: checked against the reference in the TPU simulator and lowered for "tpu" on a CPU;
not yet compiled by Mosaic on TPU hardware (its layout rules for the [bq, 1] statistics and
segment-id blocks are the likeliest thing to need a change there).
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels.attention import common

_S = compat.SQUEEZED


def _clamp(i, lo, hi, n: int):
  """Index i moved into [lo, hi) (and into [0, n)): skipped steps re-use a fetched block."""
  return common.clamp(common.clamp(i, lo, hi), 0, n)


def _specs(operands):
  return [pl.BlockSpec(o.block, o.index_map) for o in operands]


def _fwd_kernel(*refs, p: common.Problem, block_q: int, block_k: int, num_k_blocks: int):
  if p.has_segments:
    q_seg_ref, k_seg_ref, *refs = refs
  q_ref, k_ref, v_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
  q_block, k_block = pl.program_id(2), pl.program_id(3)

  @pl.when(k_block == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, common.reference.MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  lo, hi = p.kv_block_range(q_block, block_q, block_k, num_k_blocks)

  @pl.when((k_block >= lo) & (k_block < hi))
  def _step():
    acc, m, l = common.fwd_block(
        p, q_ref[...], k_ref[...], v_ref[...],
        common.positions(q_block * block_q, block_q, axis=0),
        common.positions(k_block * block_k, block_k, axis=1),
        q_seg_ref[...] if p.has_segments else None,
        k_seg_ref[...] if p.has_segments else None,
        acc_ref[...], m_ref[...], l_ref[...])
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l

  @pl.when(k_block == num_k_blocks - 1)
  def _finish():
    out, lse = common.fwd_finish(acc_ref[...], m_ref[...], l_ref[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def forward_plan(p: common.Problem, q_shape, kv_shape, itemsize: int, *, block_q: int,
                 block_k: int) -> common.Plan:
  b, n, t, d = q_shape
  kv, s = kv_shape[1], kv_shape[2]
  g = n // kv
  nq, nk = t // block_q, s // block_k

  def kv_index(bi, h, qi, ki):
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return bi, common.idiv(h, g), _clamp(ki, lo, hi, nk), 0

  def k_seg_index(bi, h, qi, ki):
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return bi, 0, _clamp(ki, lo, hi, nk)

  q_map = lambda bi, h, qi, ki: (bi, h, qi, 0)
  operands = [
      common.Operand("q", (_S, _S, block_q, d), q_map, itemsize),
      common.Operand("k", (_S, _S, block_k, d), kv_index, itemsize, kv=True),
      common.Operand("v", (_S, _S, block_k, d), kv_index, itemsize, kv=True),
      common.Operand("out", (_S, _S, block_q, d), q_map, itemsize, output=True),
      common.Operand("lse", (_S, _S, block_q, 1), q_map, 4, output=True),
  ]
  if p.has_segments:
    operands = [common.Operand("q_seg", (_S, block_q, 1), lambda bi, h, qi, ki: (bi, qi, 0), 4),
                common.Operand("k_seg", (_S, 1, block_k), k_seg_index, 4)] + operands

  def items(bi, h, qi, ki):
    del bi, h
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return [(qi, ki)] if lo <= ki < hi else []

  return common.Plan("forward", (b, n, nq, nk), ("parallel",) * 3 + ("arbitrary",),
                     tuple(operands), items, block_q=block_q, heads_per_item=1, block_k=block_k, head_dim=d,
                     matmuls=2, masks_every_block=True)


def forward(p: common.Problem, q, k, v, q_seg, k_seg, *, block_q: int, block_k: int,
            interpret=False):
  """(out [B, N, T, D], lse [B, N, T, 1] float32) for padded [B, N, T, D] inputs."""
  b, n, t, d = q.shape
  nk = k.shape[2] // block_k
  plan = forward_plan(p, q.shape, k.shape, q.dtype.itemsize, block_q=block_q, block_k=block_k)
  args = ([q_seg, k_seg] if p.has_segments else []) + [q, k, v]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, p=p, block_q=block_q, block_k=block_k, num_k_blocks=nk),
      grid=plan.grid,
      in_specs=_specs(plan.inputs),
      out_specs=_specs(plan.outputs),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)],
      scratch_shapes=[compat.tpu_vmem((block_q, d), jnp.float32),
                      compat.tpu_vmem((block_q, 1), jnp.float32),
                      compat.tpu_vmem((block_q, 1), jnp.float32)],
      compiler_params=compat.tpu_compiler_params(plan.semantics),
      interpret=interpret,
      name="effjax_flash_fwd_tpu",
  )(*args)


def _dkv_kernel(*refs, p: common.Problem, block_q: int, block_k: int, num_q_blocks: int):
  if p.has_segments:
    q_seg_ref, k_seg_ref, *refs = refs
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
  k_block, head, q_block = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((head == 0) & (q_block == 0))
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  lo, hi = p.q_block_range(k_block, block_q, block_k, num_q_blocks)

  @pl.when((q_block >= lo) & (q_block < hi))
  def _step():
    q, do = q_ref[...], do_ref[...]
    probs, ds = common.bwd_block(
        p, q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...],
        common.positions(q_block * block_q, block_q, axis=0),
        common.positions(k_block * block_k, block_k, axis=1),
        q_seg_ref[...] if p.has_segments else None,
        k_seg_ref[...] if p.has_segments else None)
    dk_acc[...], dv_acc[...] = common.dkv_update(q, do, probs, ds, dk_acc[...], dv_acc[...],
                                                 transpose_in_register=True)

  @pl.when((head == p.groups - 1) & (q_block == num_q_blocks - 1))
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, p: common.Problem, block_q: int, block_k: int, num_k_blocks: int):
  if p.has_segments:
    q_seg_ref, k_seg_ref, *refs = refs
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc = refs
  q_block, k_block = pl.program_id(2), pl.program_id(3)

  @pl.when(k_block == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  lo, hi = p.kv_block_range(q_block, block_q, block_k, num_k_blocks)

  @pl.when((k_block >= lo) & (k_block < hi))
  def _step():
    k = k_ref[...]
    _, ds = common.bwd_block(
        p, q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
        common.positions(q_block * block_q, block_q, axis=0),
        common.positions(k_block * block_k, block_k, axis=1),
        q_seg_ref[...] if p.has_segments else None,
        k_seg_ref[...] if p.has_segments else None)
    dq_acc[...] = common.dq_update(k, ds, dq_acc[...])

  @pl.when(k_block == num_k_blocks - 1)
  def _finish():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def backward_plans(p: common.Problem, q_shape, kv_shape, itemsize: int, *, block_q: int,
                   block_k: int) -> tuple[common.Plan, common.Plan]:
  """(dK/dV plan, dQ plan)."""
  b, n, t, d = q_shape
  kv, s = kv_shape[1], kv_shape[2]
  g = n // kv
  nq, nk = t // block_q, s // block_k

  # dK/dV: grid (B, K, key blocks, group head, query blocks).
  def q_index(bi, h, ki, gi, qi):
    lo, hi = p.q_block_range(ki, block_q, block_k, nq)
    return bi, h * g + gi, _clamp(qi, lo, hi, nq), 0

  def q_seg_index(bi, h, ki, gi, qi):
    lo, hi = p.q_block_range(ki, block_q, block_k, nq)
    return bi, _clamp(qi, lo, hi, nq), 0

  kv_map = lambda bi, h, ki, gi, qi: (bi, h, ki, 0)
  dkv_operands = [
      common.Operand("q", (_S, _S, block_q, d), q_index, itemsize),
      common.Operand("k", (_S, _S, block_k, d), kv_map, itemsize, kv=True),
      common.Operand("v", (_S, _S, block_k, d), kv_map, itemsize, kv=True),
      common.Operand("dout", (_S, _S, block_q, d), q_index, itemsize),
      common.Operand("lse", (_S, _S, block_q, 1), q_index, 4),
      common.Operand("delta", (_S, _S, block_q, 1), q_index, 4),
      common.Operand("dk", (_S, _S, block_k, d), kv_map, itemsize, output=True),
      common.Operand("dv", (_S, _S, block_k, d), kv_map, itemsize, output=True),
  ]
  if p.has_segments:
    dkv_operands = [
        common.Operand("q_seg", (_S, block_q, 1), q_seg_index, 4),
        common.Operand("k_seg", (_S, 1, block_k), lambda bi, h, ki, gi, qi: (bi, 0, ki), 4),
    ] + dkv_operands

  def dkv_items(bi, h, ki, gi, qi):
    del bi, h, gi
    lo, hi = p.q_block_range(ki, block_q, block_k, nq)
    return [(qi, ki)] if lo <= qi < hi else []

  dkv = common.Plan("dkv", (b, kv, nk, g, nq), ("parallel",) * 3 + ("arbitrary",) * 2,
                    tuple(dkv_operands), dkv_items, block_q=block_q, heads_per_item=1, block_k=block_k,
                    head_dim=d, matmuls=4, masks_every_block=True)

  # dQ: grid (B, N, query blocks, key blocks).
  def kv_index(bi, h, qi, ki):
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return bi, common.idiv(h, g), _clamp(ki, lo, hi, nk), 0

  def k_seg_index(bi, h, qi, ki):
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return bi, 0, _clamp(ki, lo, hi, nk)

  q_map = lambda bi, h, qi, ki: (bi, h, qi, 0)
  dq_operands = [
      common.Operand("q", (_S, _S, block_q, d), q_map, itemsize),
      common.Operand("k", (_S, _S, block_k, d), kv_index, itemsize, kv=True),
      common.Operand("v", (_S, _S, block_k, d), kv_index, itemsize, kv=True),
      common.Operand("dout", (_S, _S, block_q, d), q_map, itemsize),
      common.Operand("lse", (_S, _S, block_q, 1), q_map, 4),
      common.Operand("delta", (_S, _S, block_q, 1), q_map, 4),
      common.Operand("dq", (_S, _S, block_q, d), q_map, itemsize, output=True),
  ]
  if p.has_segments:
    dq_operands = [
        common.Operand("q_seg", (_S, block_q, 1), lambda bi, h, qi, ki: (bi, qi, 0), 4),
        common.Operand("k_seg", (_S, 1, block_k), k_seg_index, 4)] + dq_operands

  def dq_items(bi, h, qi, ki):
    del bi, h
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return [(qi, ki)] if lo <= ki < hi else []

  dq = common.Plan("dq", (b, n, nq, nk), ("parallel",) * 3 + ("arbitrary",),
                   tuple(dq_operands), dq_items, block_q=block_q, heads_per_item=1, block_k=block_k, head_dim=d,
                   matmuls=3, masks_every_block=True)
  return dkv, dq


def backward(p: common.Problem, q, k, v, q_seg, k_seg, out, lse, do, *, block_q: int,
             block_k: int, interpret=False):
  """(dq, dk, dv) in [B, heads, T, D] for padded inputs; lse [B, N, T, 1] from forward()."""
  d = q.shape[3]
  nq, nk = q.shape[2] // block_q, k.shape[2] // block_k
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  seg_args = [q_seg, k_seg] if p.has_segments else []
  dkv_plan, dq_plan = backward_plans(p, q.shape, k.shape, q.dtype.itemsize, block_q=block_q,
                                     block_k=block_k)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, p=p, block_q=block_q, block_k=block_k, num_q_blocks=nq),
      grid=dkv_plan.grid,
      in_specs=_specs(dkv_plan.inputs),
      out_specs=_specs(dkv_plan.outputs),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[compat.tpu_vmem((block_k, d), jnp.float32),
                      compat.tpu_vmem((block_k, d), jnp.float32)],
      compiler_params=compat.tpu_compiler_params(dkv_plan.semantics),
      interpret=interpret,
      name="effjax_flash_dkv_tpu",
  )(*seg_args, q, k, v, do, lse, delta)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, p=p, block_q=block_q, block_k=block_k, num_k_blocks=nk),
      grid=dq_plan.grid,
      in_specs=_specs(dq_plan.inputs),
      out_specs=_specs(dq_plan.outputs)[0],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[compat.tpu_vmem((block_q, d), jnp.float32)],
      compiler_params=compat.tpu_compiler_params(dq_plan.semantics),
      interpret=interpret,
      name="effjax_flash_dq_tpu",
  )(*seg_args, q, k, v, do, lse, delta)
  return dq, dk, dv
