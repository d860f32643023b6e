"""Flash attention as Mosaic TPU `pallas_call`s: forward, dK/dV and dQ kernels.

Layout [batch, heads, seq, head_dim] (api.py transposes), so every block's last two dims are
(sequence tile, head_dim) as Mosaic's (sublane, lane) tiling wants. The key (or query) loop is
the innermost grid axis ("arbitrary"), with float32 accumulators in VMEM scratch: Mosaic
pipelines the block copies of a grid axis, and copies a block only when its index changes.

GQA: every kernel's grid runs over kv heads; a step holds the query block of all G = N // K
heads of the group as one [G * block_q, head_dim] tile (a free leading-dim reshape), so each
K/V block is copied once per group, not once per query head. dK/dV sums the group's rows in
the same tile products: no partials, no atomics.

Layouts as JAX's own TPU kernels keep them (a [rows, 1] column would fill one lane per vreg):
  - max/sum statistics: [rows, 128] VMEM scratch, the value repeated over the lanes;
  - log-sum-exp (base 2) and delta reach the backward as [B, N, T, 128] (the forward writes
    lse so and the wrapper keeps lane 0 as the residual);
  - query segment ids [B, T, 128] (lanes), key segment ids [B, 8, S] (sublanes);
  - positions as full [block_q, block_k] iotas.
Blocks no query can see are skipped with `pl.when` and their index maps clamped into the
visible range (the pipeline does not copy them). Only blocks that straddle a boundary are
masked; with segment ids, the blocks' min/max ids (computed by XLA, scalar-prefetched to SMEM)
decide whether a block needs the segment mask or can be skipped.

Status: checked against the reference in the TPU simulator and lowered for "tpu" on a CPU;
not yet compiled by Mosaic on TPU hardware (its layout passes run only there).
"""
from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels import tiling
from pallas_kernels.attention import common

_S = compat.SQUEEZED
LANES, SUBLANES = 128, 8

# float32 [rows, block_k] values a step keeps live (logits and probabilities; in the backward
# also dP and dS), which Mosaic holds in VMEM: at 2048 rows x 512 keys they outweigh the blocks.
# Calibrated on the v5e compiler: the segment-ids dK/dV kernel at G * block_q = 2048 rows,
# block_k = 512, head_dim 64 used 16.75 MiB where its blocks and scratch take 8 MiB.
_F32_STEP_TILES = {"forward": 2, "dkv": 3, "dq": 3}


def scratch_shapes(plan: common.Plan) -> list[tuple[int, int]]:
  """The float32 VMEM scratch of each kernel: accumulators and softmax statistics."""
  rows, d = plan.heads_per_item * plan.block_q, plan.head_dim
  return {"forward": [(rows, d), (rows, LANES), (rows, LANES)],
          "dkv": [(plan.block_k, d), (plan.block_k, d)],
          "dq": [(rows, d)]}[plan.name]


def vmem_bytes(plan: common.Plan) -> int:
  """Estimated VMEM of one kernel: double-buffered blocks, scratch and the step's float32
  temporaries (an estimate: the compiler's layout decides the rest)."""
  blocks = sum(2 * tiling.tpu_vmem_tile_bytes(o.block, o.itemsize) for o in plan.operands)
  scratch = sum(tiling.tpu_vmem_tile_bytes(shape, 4) for shape in scratch_shapes(plan))
  rows = plan.heads_per_item * plan.block_q
  temps = _F32_STEP_TILES[plan.name] * tiling.tpu_vmem_tile_bytes((rows, plan.block_k), 4)
  return blocks + scratch + temps


def vmem_limit(plan: common.Plan) -> int | None:
  """The kernel's vmem_limit_bytes (tiling.tpu_vmem_limit); ValueError if it cannot fit."""
  return tiling.tpu_vmem_limit(
      vmem_bytes(plan), f"TPU flash attention's {plan.name} kernel with block_q={plan.block_q}, "
      f"block_k={plan.block_k}, {plan.heads_per_item} query heads per kv head and head_dim "
      f"{plan.head_dim}")


def _clamp(i, lo, hi, n: int):
  """Index i moved into [lo, hi) (and into [0, n)): skipped steps re-use a fetched block."""
  return common.clamp(common.clamp(i, lo, hi), 0, n)


def _specs(operands):
  return [pl.BlockSpec(o.block, o.index_map) for o in operands]


def _run_block(p: common.Problem, in_range, q_block, k_block, block_q: int, block_k: int,
               seg, step):
  """step(mask) for an in-range, not skipped block; the mask only where it straddles a
  boundary. seg: (q_seg_ref, k_seg_ref, (q_lo, q_hi, k_lo, k_hi) scalars) or None."""
  needs_mask = p.block_straddles_position_boundary(q_block, k_block, block_q, block_k)
  compute = in_range
  if seg is not None:
    skip, uniform = common.segment_block_test(*seg[2])
    compute = jnp.logical_and(compute, jnp.logical_not(skip))
    needs_mask = jnp.logical_or(needs_mask, jnp.logical_not(uniform))

  def masked():
    q_pos, k_pos = common.block_positions(q_block * block_q, k_block * block_k, block_q,
                                          block_k)
    q_seg = k_seg = None
    if seg is not None:
      q_seg, k_seg = common.column(seg[0][...]), seg[1][:1, :]  # [bq, 1] and [1, bk]
    step(p.mask(q_pos, k_pos, q_seg, k_seg))

  if isinstance(needs_mask, bool):
    pl.when(compute)(masked if needs_mask else lambda: step(None))
  else:
    pl.when(jnp.logical_and(compute, needs_mask))(masked)
    pl.when(jnp.logical_and(compute, jnp.logical_not(needs_mask)))(lambda: step(None))


def _segment_bounds(q_seg, k_seg, block_q: int, block_k: int):
  """Per-block min and max segment ids, flattened [B * blocks] for SMEM."""
  q, k = q_seg[:, :, 0], k_seg[:, 0, :]
  b = q.shape[0]
  qb, kb = q.reshape(b, -1, block_q), k.reshape(b, -1, block_k)
  return [x.reshape(-1) for x in (qb.min(-1), qb.max(-1), kb.min(-1), kb.max(-1))]


def _seg_scalars(refs, bi, q_block, k_block, nq: int, nk: int):
  q_lo, q_hi, k_lo, k_hi = refs
  qi, ki = bi * nq + q_block, bi * nk + k_block
  return q_lo[qi], q_hi[qi], k_lo[ki], k_hi[ki]


def _call(plan: common.Plan, p: common.Problem, kernel, args, bounds, out_shape, scratch, name,
          interpret):
  """pallas_call of a plan, with the segment bounds scalar-prefetched when there are any."""
  params = compat.tpu_compiler_params(plan.semantics, vmem_limit(plan))
  cost = common.cost_estimate(plan, p, args, out_shape)
  if not bounds:
    return pl.pallas_call(kernel, grid=plan.grid, in_specs=_specs(plan.inputs),
                          out_specs=_specs(plan.outputs), out_shape=out_shape,
                          scratch_shapes=scratch, compiler_params=params, interpret=interpret,
                          cost_estimate=cost, name=name)(*args)
  grid_spec = compat.tpu_prefetch_scalar_grid_spec(
      num_scalar_prefetch=len(bounds), grid=plan.grid, in_specs=_specs(plan.inputs),
      out_specs=_specs(plan.outputs), scratch_shapes=scratch)
  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                        compiler_params=params, interpret=interpret, cost_estimate=cost,
                        name=name)(*bounds, *args)


def _scratch(plan: common.Plan):
  return [compat.tpu_vmem(shape, jnp.float32) for shape in scratch_shapes(plan)]


def _seg_operands(p: common.Problem, block_q: int, block_k: int, q_map, k_map):
  if not p.has_segments:
    return []
  return [common.Operand("q_seg", (_S, block_q, LANES), q_map, 4),
          common.Operand("k_seg", (_S, SUBLANES, block_k), k_map, 4)]


def _fwd_kernel(*refs, p: common.Problem, groups: int, block_q: int, block_k: int,
                num_q_blocks: int, num_k_blocks: int):
  seg = None
  if p.has_segments:
    *bounds, q_seg_ref, k_seg_ref = refs[:6]
    refs = refs[6:]
  q_ref, k_ref, v_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
  bi, q_block, k_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  rows, d = groups * block_q, q_ref.shape[-1]
  if p.has_segments:
    seg = (q_seg_ref, k_seg_ref,
           _seg_scalars(bounds, bi, q_block, k_block, num_q_blocks, num_k_blocks))

  @pl.when(k_block == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, common.reference.MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  def step(mask):
    acc, m, l = common.fwd_block(p, q_ref[...].reshape(rows, d), k_ref[...], v_ref[...], mask,
                                 acc_ref[...], m_ref[...], l_ref[...])
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l

  lo, hi = p.kv_block_range(q_block, block_q, block_k, num_k_blocks)
  _run_block(p, jnp.logical_and(k_block >= lo, k_block < hi), q_block, k_block, block_q,
             block_k, seg, step)

  @pl.when(k_block == num_k_blocks - 1)
  def _finish():
    out, lse = common.fwd_finish(acc_ref[...], m_ref[...], l_ref[...])
    o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, (rows, LANES)).reshape(lse_ref.shape)


def forward_plan(p: common.Problem, q_shape, kv_shape, itemsize: int, *, block_q: int,
                 block_k: int) -> common.Plan:
  b, n, t, d = q_shape
  kv, s = kv_shape[1], kv_shape[2]
  g = n // kv
  nq, nk = t // block_q, s // block_k

  def kv_index(bi, h, qi, ki, *_):
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return bi, h, _clamp(ki, lo, hi, nk), 0

  def k_seg_index(bi, h, qi, ki, *_):
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return bi, 0, _clamp(ki, lo, hi, nk)

  group_map = lambda bi, h, qi, ki, *_: (bi, h, qi, 0)  # head-axis block of G: kv head h's
  operands = _seg_operands(p, block_q, block_k, lambda bi, h, qi, ki, *_: (bi, qi, 0),
                           k_seg_index) + [
      common.Operand("q", (_S, g, block_q, d), group_map, itemsize),
      common.Operand("k", (_S, _S, block_k, d), kv_index, itemsize, kv=True),
      common.Operand("v", (_S, _S, block_k, d), kv_index, itemsize, kv=True),
      common.Operand("out", (_S, g, block_q, d), group_map, itemsize, output=True),
      common.Operand("lse", (_S, g, block_q, LANES), group_map, 4, output=True),
  ]

  def items(bi, h, qi, ki):
    del bi, h
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return [(qi, ki)] if lo <= ki < hi else []

  return common.Plan("forward", (b, kv, nq, nk), ("parallel",) * 3 + ("arbitrary",),
                     tuple(operands), items, block_q=block_q, heads_per_item=g,
                     block_k=block_k, head_dim=d, matmuls=2)


def _segments(p, q_seg, k_seg, block_q, block_k):
  if not p.has_segments:
    return [], []
  return _segment_bounds(q_seg, k_seg, block_q, block_k), [q_seg, k_seg]


def forward(p: common.Problem, q, k, v, q_seg, k_seg, *, block_q: int, block_k: int,
            interpret=False):
  """(out [B, N, T, D], base-2 lse [B, N, T] float32) for padded [B, N, T, D] inputs;
  segment ids as [B, T, 128] and [B, 8, S]."""
  b, n, t, d = q.shape
  g = n // k.shape[1]
  nq, nk = t // block_q, k.shape[2] // block_k
  plan = forward_plan(p, q.shape, k.shape, q.dtype.itemsize, block_q=block_q, block_k=block_k)
  bounds, seg_args = _segments(p, q_seg, k_seg, block_q, block_k)
  rows = g * block_q
  out, lse = _call(
      plan, p,
      functools.partial(_fwd_kernel, p=p, groups=g, block_q=block_q, block_k=block_k,
                        num_q_blocks=nq, num_k_blocks=nk),
      seg_args + [q, k, v], bounds,
      [jax.ShapeDtypeStruct(q.shape, q.dtype),
       jax.ShapeDtypeStruct((b, n, t, LANES), jnp.float32)],
      _scratch(plan), "effjax_flash_fwd_tpu", interpret)
  return out, lse[..., 0]


def _dkv_kernel(*refs, p: common.Problem, groups: int, block_q: int, block_k: int,
                num_q_blocks: int, num_k_blocks: int):
  seg = None
  if p.has_segments:
    *bounds, q_seg_ref, k_seg_ref = refs[:6]
    refs = refs[6:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
  bi, k_block, q_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  rows, d = groups * block_q, q_ref.shape[-1]
  if p.has_segments:
    seg = (q_seg_ref, k_seg_ref,
           _seg_scalars(bounds, bi, q_block, k_block, num_q_blocks, num_k_blocks))

  @pl.when(q_block == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def step(mask):
    q, do = q_ref[...].reshape(rows, d), do_ref[...].reshape(rows, d)
    probs, ds = common.bwd_block(p, q, k_ref[...], v_ref[...], do,
                                 lse_ref[...].reshape(rows, LANES),
                                 delta_ref[...].reshape(rows, LANES), mask)
    dk_acc[...], dv_acc[...] = common.dkv_update(q, do, probs, ds, dk_acc[...], dv_acc[...],
                                                 transpose_in_register=True)

  lo, hi = p.q_block_range(k_block, block_q, block_k, num_q_blocks)
  _run_block(p, jnp.logical_and(q_block >= lo, q_block < hi), q_block, k_block, block_q,
             block_k, seg, step)

  @pl.when(q_block == num_q_blocks - 1)
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, p: common.Problem, groups: int, block_q: int, block_k: int,
               num_q_blocks: int, num_k_blocks: int):
  seg = None
  if p.has_segments:
    *bounds, q_seg_ref, k_seg_ref = refs[:6]
    refs = refs[6:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc = refs
  bi, q_block, k_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  rows, d = groups * block_q, q_ref.shape[-1]
  if p.has_segments:
    seg = (q_seg_ref, k_seg_ref,
           _seg_scalars(bounds, bi, q_block, k_block, num_q_blocks, num_k_blocks))

  @pl.when(k_block == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  def step(mask):
    k = k_ref[...]
    _, ds = common.bwd_block(p, q_ref[...].reshape(rows, d), k, v_ref[...],
                             do_ref[...].reshape(rows, d), lse_ref[...].reshape(rows, LANES),
                             delta_ref[...].reshape(rows, LANES), mask)
    dq_acc[...] = common.dq_update(k, ds, dq_acc[...])

  lo, hi = p.kv_block_range(q_block, block_q, block_k, num_k_blocks)
  _run_block(p, jnp.logical_and(k_block >= lo, k_block < hi), q_block, k_block, block_q,
             block_k, seg, step)

  @pl.when(k_block == num_k_blocks - 1)
  def _finish():
    dq_ref[...] = dq_acc[...].reshape(dq_ref.shape).astype(dq_ref.dtype)


def backward_plans(p: common.Problem, q_shape, kv_shape, itemsize: int, *, block_q: int,
                   block_k: int) -> tuple[common.Plan, common.Plan]:
  """(dK/dV plan, dQ plan)."""
  b, n, t, d = q_shape
  kv, s = kv_shape[1], kv_shape[2]
  g = n // kv
  nq, nk = t // block_q, s // block_k

  # dK/dV: grid (B, K, key blocks, query blocks); a step holds the group's G heads.
  def group_index(bi, h, ki, qi, *_):
    lo, hi = p.q_block_range(ki, block_q, block_k, nq)
    return bi, h, _clamp(qi, lo, hi, nq), 0

  def q_seg_index(bi, h, ki, qi, *_):
    lo, hi = p.q_block_range(ki, block_q, block_k, nq)
    return bi, _clamp(qi, lo, hi, nq), 0

  kv_map = lambda bi, h, ki, qi, *_: (bi, h, ki, 0)
  dkv_operands = _seg_operands(p, block_q, block_k, q_seg_index,
                               lambda bi, h, ki, qi, *_: (bi, 0, ki)) + [
      common.Operand("q", (_S, g, block_q, d), group_index, itemsize),
      common.Operand("k", (_S, _S, block_k, d), kv_map, itemsize, kv=True),
      common.Operand("v", (_S, _S, block_k, d), kv_map, itemsize, kv=True),
      common.Operand("dout", (_S, g, block_q, d), group_index, itemsize),
      common.Operand("lse", (_S, g, block_q, LANES), group_index, 4),
      common.Operand("delta", (_S, g, block_q, LANES), group_index, 4),
      common.Operand("dk", (_S, _S, block_k, d), kv_map, itemsize, output=True),
      common.Operand("dv", (_S, _S, block_k, d), kv_map, itemsize, output=True),
  ]

  def dkv_items(bi, h, ki, qi):
    del bi, h
    lo, hi = p.q_block_range(ki, block_q, block_k, nq)
    return [(qi, ki)] if lo <= qi < hi else []

  dkv = common.Plan("dkv", (b, kv, nk, nq), ("parallel",) * 3 + ("arbitrary",),
                    tuple(dkv_operands), dkv_items, block_q=block_q, heads_per_item=g,
                    block_k=block_k, head_dim=d, matmuls=4)

  # dQ: grid (B, K, query blocks, key blocks), like the forward.
  def kv_index(bi, h, qi, ki, *_):
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return bi, h, _clamp(ki, lo, hi, nk), 0

  def k_seg_index(bi, h, qi, ki, *_):
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return bi, 0, _clamp(ki, lo, hi, nk)

  group_map = lambda bi, h, qi, ki, *_: (bi, h, qi, 0)
  dq_operands = _seg_operands(p, block_q, block_k, lambda bi, h, qi, ki, *_: (bi, qi, 0),
                              k_seg_index) + [
      common.Operand("q", (_S, g, block_q, d), group_map, itemsize),
      common.Operand("k", (_S, _S, block_k, d), kv_index, itemsize, kv=True),
      common.Operand("v", (_S, _S, block_k, d), kv_index, itemsize, kv=True),
      common.Operand("dout", (_S, g, block_q, d), group_map, itemsize),
      common.Operand("lse", (_S, g, block_q, LANES), group_map, 4),
      common.Operand("delta", (_S, g, block_q, LANES), group_map, 4),
      common.Operand("dq", (_S, g, block_q, d), group_map, itemsize, output=True),
  ]

  def dq_items(bi, h, qi, ki):
    del bi, h
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return [(qi, ki)] if lo <= ki < hi else []

  dq = common.Plan("dq", (b, kv, nq, nk), ("parallel",) * 3 + ("arbitrary",),
                   tuple(dq_operands), dq_items, block_q=block_q, heads_per_item=g,
                   block_k=block_k, head_dim=d, matmuls=3)
  return dkv, dq


def backward(p: common.Problem, q, k, v, q_seg, k_seg, out, lse, do, *, block_q: int,
             block_k: int, interpret=False):
  """(dq, dk, dv) in [B, heads, T, D] for padded inputs; lse [B, N, T] (base 2) from
  forward()."""
  b, n, t, d = q.shape
  g = n // k.shape[1]
  nq, nk = t // block_q, k.shape[2] // block_k
  rows = g * block_q
  lanes = (b, n, t, LANES)
  lse = jnp.broadcast_to(lse[..., None], lanes)
  delta = jnp.broadcast_to(
      jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True), lanes)
  bounds, seg_args = _segments(p, q_seg, k_seg, block_q, block_k)
  dkv_plan, dq_plan = backward_plans(p, q.shape, k.shape, q.dtype.itemsize, block_q=block_q,
                                     block_k=block_k)
  kw = dict(p=p, groups=g, block_q=block_q, block_k=block_k, num_q_blocks=nq, num_k_blocks=nk)
  dk, dv = _call(
      dkv_plan, p, functools.partial(_dkv_kernel, **kw), seg_args + [q, k, v, do, lse, delta],
      bounds, [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      _scratch(dkv_plan), "effjax_flash_dkv_tpu", interpret)
  dq = _call(
      dq_plan, p, functools.partial(_dq_kernel, **kw), seg_args + [q, k, v, do, lse, delta],
      bounds, [jax.ShapeDtypeStruct(q.shape, q.dtype)], _scratch(dq_plan),
      "effjax_flash_dq_tpu", interpret)[0]
  return dq, dk, dv
