"""Flash attention as Triton-style `pallas_call`s (GPU): forward, dK/dV and dQ kernels.

Layout [batch, seq, heads, head_dim] throughout, as the model produces it. Inputs reach these
functions with sequences padded to block multiples by api.py; head_dim stays as it is in
memory: Triton tiles must be powers of two, so the BlockSpecs round it up and every load and
store of a [rows, head_dim] tile masks the columns past it (zeros in, nothing out), as JAX's
own Pallas Triton `mha` does.

Grid and loops (G = N // K query heads share a kv head; query head n uses kv head n // G):
  forward  grid (B, K, query blocks); a program holds the query block of all G heads of its
           group and loops over the key blocks its rows can see: each K/V block is loaded
           once for the G heads (not once per head). Saves the base-2 log-sum-exp per row.
  dK/dV    grid (B, K, key blocks, splits); a program sums its share of the (head, query
           block) items that can see its keys. When B * K * key blocks is below the GPU's SM
           count, `splits` > 1 spreads each key block's items over several programs that
           write float32 partials [splits, B, S, K, D], summed by XLA (a few MB at the small
           batches where it applies); otherwise splits = 1 and dK/dV stay in registers.
  dQ       grid (B, K, query blocks), looping over key blocks like the forward.
Blocks inside every mask boundary skip the mask; with segment ids, a block whose query and key
ids share nothing is skipped (cond on the blocks' min/max ids).

Status: checked against the reference in Pallas's interpreter and lowered for "cuda" on a CPU
(Triton IR); not yet compiled and timed on a GPU (experiments/bench_attention.py does both).
"""
from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels import tiling
from pallas_kernels.attention import common

_S = compat.SQUEEZED


def _params(head_dim: int, num_stages: int, interpret):
  if not interpret:
    compat.note_triton_use()
  return compat.triton_compiler_params(num_warps=4 if head_dim <= 64 else 8,
                                       num_stages=num_stages)


def _specs(operands):
  return [pl.BlockSpec(o.block, o.index_map) for o in operands]


def smem_bytes(plan: common.Plan) -> int:
  """Estimated shared memory of one kernel: its matmul operands' tiles as a program loads them
  (Q and dO blocks of its G heads, K and V blocks, or the sub-blocks streamed per item), plus,
  in dK/dV, one [block_q, block_k] tile of the probabilities transposed for its products and,
  when split, the float32 partial dK / dV tiles (an estimate: Triton's layouts and pipelining
  decide the rest; see SMEM_HEADROOM)."""
  total = 0
  for o in plan.operands:
    if o.name in ("q", "k", "v", "dout"):
      total += math.prod(o.streamed or [x for x in o.block if isinstance(x, int)]) * o.itemsize
      itemsize = o.itemsize
  if plan.name == "dkv":
    total += plan.block_q * plan.block_k * itemsize
    if plan.grid[3] > 1:  # split: float32 partial dK and dV tiles (XLA's figure grows by them)
      total += 2 * plan.block_k * plan.head_dim * 4
  return total


# XLA's own figures for these kernels on an H100 equal smem_bytes for most of the compile
# matrix's cases and exceed it by up to about 1.2x (a split dK/dV): fit with this headroom.
SMEM_HEADROOM = 1.25


def check_smem(plan: common.Plan, groups: int) -> None:
  """ValueError, before tracing, when a kernel's tiles (with SMEM_HEADROOM) exceed the shared
  memory a thread block may use on the GPU compiled for (tiling.gpu_smem_budget)."""
  kind, limit = tiling.gpu_smem_budget()
  need = int(smem_bytes(plan) * SMEM_HEADROOM)
  if need > limit:
    raise ValueError(
        f"Triton flash attention's {plan.name} kernel with block_q={plan.block_q}, "
        f"block_k={plan.block_k}, {groups} query heads per kv head and head_dim tiles of "
        f"{plan.head_dim} needs about {need // 1024} KiB of shared memory with headroom, over "
        f"the {limit // 1024} KiB a thread block may use on {kind}: use smaller blocks")


def _padded(head_dim: int) -> int:
  """The head_dim of the kernels' tiles: Triton tensors have power-of-two sizes."""
  return max(16, tiling.next_pow2(head_dim))


def _head_mask(head_dim: int, padded: int):
  """[1, padded] columns that exist in memory, or None when head_dim is a power of two."""
  if padded == head_dim:
    return None
  return lax.broadcasted_iota(jnp.int32, (1, padded), 1) < head_dim


def _load(ref, head_mask):
  """A [rows, padded head_dim] tile; columns past head_dim read as zeros (masked load: no
  padded copy in memory)."""
  if head_mask is None:
    return ref[...]
  return plgpu.load(ref, mask=head_mask, other=0.0)


def _store(ref, value, head_mask):
  if head_mask is None:
    ref[...] = value
  else:
    plgpu.store(ref, value, mask=head_mask)


def _branch(pred, true_fn, false_fn, carry):
  """lax.cond, or the one branch when pred is a Python bool (no runtime test needed)."""
  if isinstance(pred, bool):
    return (true_fn if pred else false_fn)(carry)
  return lax.cond(pred, true_fn, false_fn, carry)


def _masked_step(p: common.Problem, q_block, k_block, block_q, block_k, q_seg, k_seg, step,
                 carry):
  """step(mask, carry) with the mask only where the block straddles a boundary, and skipped
  when segment ids share nothing. q_seg [bq] and k_seg [bk] (or None) are the blocks' ids."""
  needs_mask = p.block_straddles_position_boundary(q_block, k_block, block_q, block_k)
  skip = False
  if q_seg is not None:
    skip, uniform = common.segment_block_test(q_seg.min(), q_seg.max(), k_seg.min(),
                                              k_seg.max())
    needs_mask = jnp.logical_or(needs_mask, jnp.logical_not(uniform))

  def masked(carry):
    mask = p.mask(common.positions(q_block * block_q, block_q, axis=0),
                  common.positions(k_block * block_k, block_k, axis=1),
                  None if q_seg is None else q_seg[:, None],
                  None if k_seg is None else k_seg[None, :])
    return step(mask, carry)

  compute = lambda carry: _branch(needs_mask, masked, lambda c: step(None, c), carry)
  return _branch(skip, lambda c: c, compute, carry)


def _fwd_kernel(*refs, p: common.Problem, groups: int, head_dim: int, block_q: int,
                block_k: int, num_k_blocks: int):
  if p.has_segments:
    q_seg_ref, k_seg_ref, *refs = refs
  q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  q_block = pl.program_id(2)
  hm = _head_mask(head_dim, q_ref.shape[-1])
  # Heads index as int32 scalars: the interpreter's masked load rejects Python ints.
  qs = [_load(q_ref.at[:, jnp.int32(h), :], hm) for h in range(groups)]
  q_seg = q_seg_ref[...] if p.has_segments else None

  def body(kb, carry):
    start = pl.multiple_of(kb * block_k, block_k)
    rows = pl.ds(start, block_k)

    def step(mask, carry):
      k, v = _load(k_ref.at[rows, :], hm), _load(v_ref.at[rows, :], hm)  # once per group
      return tuple(common.fwd_block(p, qs[h], k, v, mask, *carry[h]) for h in range(groups))

    k_seg = k_seg_ref[rows] if p.has_segments else None
    return _masked_step(p, q_block, kb, block_q, block_k, q_seg, k_seg, step, carry)

  lo, hi = p.kv_block_range(q_block, block_q, block_k, num_k_blocks)
  d = qs[0].shape[1]
  init = tuple((jnp.zeros((block_q, d), jnp.float32),
                jnp.full((block_q, 1), common.reference.MASK_VALUE, jnp.float32),
                jnp.zeros((block_q, 1), jnp.float32)) for _ in range(groups))
  final = lax.fori_loop(lo, hi, body, init)
  for h in range(groups):
    out, lse = common.fwd_finish(*final[h])
    _store(o_ref.at[:, jnp.int32(h), :], out.astype(o_ref.dtype), hm)
    lse_ref[h, :] = lse[:, 0]


def forward_plan(p: common.Problem, q_shape, kv_shape, itemsize: int, *, block_q: int,
                 block_k: int) -> common.Plan:
  b, t, n, head_dim = q_shape
  s, kv = kv_shape[1], kv_shape[2]
  g = n // kv
  nq, nk = t // block_q, s // block_k
  d, rd = _padded(head_dim), dict(read_last=head_dim)
  group_map = lambda bi, h, qi: (bi, qi, h, 0)  # the N-axis block of G heads: kv head h's
  kv_map = lambda bi, h, qi: (bi, 0, h, 0)
  operands = [
      common.Operand("q", (_S, block_q, g, d), group_map, itemsize, **rd),
      common.Operand("k", (_S, s, _S, d), kv_map, itemsize, kv=True, streamed=(block_k, d),
                     **rd),
      common.Operand("v", (_S, s, _S, d), kv_map, itemsize, kv=True, streamed=(block_k, d),
                     **rd),
      common.Operand("out", (_S, block_q, g, d), group_map, itemsize, output=True, **rd),
      common.Operand("lse", (_S, g, block_q), lambda bi, h, qi: (bi, h, qi), 4, output=True),
  ]
  if p.has_segments:
    operands = [common.Operand("q_seg", (_S, block_q), lambda bi, h, qi: (bi, qi), 4),
                common.Operand("k_seg", (_S, s), lambda bi, h, qi: (bi, 0), 4,
                               streamed=(block_k,), read_when_skipped=True)] + operands

  return common.query_walk_plan("forward", p, (b, kv, nq), operands, block_q=block_q,
                                block_k=block_k, num_k_blocks=nk, groups=g, head_dim=d,
                                matmuls=2)


def forward(p: common.Problem, q, k, v, q_seg, k_seg, *, block_q: int, block_k: int,
            interpret: bool = False):
  """(out [B, T, N, D], base-2 lse [B, N, T] float32) for padded inputs."""
  b, t, n, d = q.shape
  nk = k.shape[1] // block_k
  plan = forward_plan(p, q.shape, k.shape, q.dtype.itemsize, block_q=block_q, block_k=block_k)
  kernel = functools.partial(_fwd_kernel, p=p, groups=n // k.shape[2], head_dim=d,
                             block_q=block_q, block_k=block_k, num_k_blocks=nk)
  args = ([q_seg, k_seg] if p.has_segments else []) + [q, k, v]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, n, t), jnp.float32)]
  return pl.pallas_call(
      kernel,
      grid=plan.grid,
      in_specs=_specs(plan.inputs),
      out_specs=_specs(plan.outputs),
      out_shape=out_shape,
      compiler_params=_params(_padded(d), num_stages=2, interpret=interpret),
      interpret=interpret,
      cost_estimate=common.cost_estimate(plan, p, args, out_shape),
      name="effjax_flash_fwd",
  )(*args)


def _dkv_kernel(*refs, p: common.Problem, groups: int, splits: int, head_dim: int,
                block_q: int, block_k: int, num_q_blocks: int):
  if p.has_segments:
    q_seg_ref, k_seg_ref, *refs = refs
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
  k_block, split = pl.program_id(2), pl.program_id(3)
  hm = _head_mask(head_dim, k_ref.shape[-1])
  k, v = _load(k_ref, hm), _load(v_ref, hm)
  k_seg = k_seg_ref[...] if p.has_segments else None
  first, end, lo, n_q = common.dkv_share(p, k_block, split, groups, splits, block_q,
                                         block_k, num_q_blocks)

  def item(j, carry):
    n = jnp.asarray(n_q, jnp.int32)
    head, qb = lax.div(j, n), lo + lax.rem(j, n)
    start = pl.multiple_of(qb * block_q, block_q)
    rows = pl.ds(start, block_q)

    def step(mask, carry):
      q, do = _load(q_ref.at[rows, head, :], hm), _load(do_ref.at[rows, head, :], hm)
      probs, ds = common.bwd_block(p, q, k, v, do, lse_ref[head, rows][:, None],
                                   delta_ref[head, rows][:, None], mask)
      return common.dkv_update(q, do, probs, ds, *carry, transpose_in_register=False)

    q_seg = q_seg_ref[rows] if p.has_segments else None
    return _masked_step(p, qb, k_block, block_q, block_k, q_seg, k_seg, step, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(first, end, item, (zeros, zeros))
  _store(dk_ref, dk.astype(dk_ref.dtype), hm)
  _store(dv_ref, dv.astype(dv_ref.dtype), hm)


def _dq_kernel(*refs, p: common.Problem, groups: int, head_dim: int, block_q: int,
               block_k: int, num_k_blocks: int):
  if p.has_segments:
    q_seg_ref, k_seg_ref, *refs = refs
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
  q_block = pl.program_id(2)
  hm = _head_mask(head_dim, q_ref.shape[-1])
  qs = [_load(q_ref.at[:, jnp.int32(h), :], hm) for h in range(groups)]
  dos = [_load(do_ref.at[:, jnp.int32(h), :], hm) for h in range(groups)]
  lses = [lse_ref[h, :][:, None] for h in range(groups)]
  deltas = [delta_ref[h, :][:, None] for h in range(groups)]
  q_seg = q_seg_ref[...] if p.has_segments else None

  def body(kb, carry):
    start = pl.multiple_of(kb * block_k, block_k)
    rows = pl.ds(start, block_k)

    def step(mask, carry):
      k, v = _load(k_ref.at[rows, :], hm), _load(v_ref.at[rows, :], hm)  # once per group
      out = []
      for h in range(groups):
        _, ds = common.bwd_block(p, qs[h], k, v, dos[h], lses[h], deltas[h], mask)
        out.append(common.dq_update(k, ds, carry[h]))
      return tuple(out)

    k_seg = k_seg_ref[rows] if p.has_segments else None
    return _masked_step(p, q_block, kb, block_q, block_k, q_seg, k_seg, step, carry)

  lo, hi = p.kv_block_range(q_block, block_q, block_k, num_k_blocks)
  zeros = tuple(jnp.zeros(qs[0].shape, jnp.float32) for _ in range(groups))
  dq = lax.fori_loop(lo, hi, body, zeros)
  for h in range(groups):
    _store(dq_ref.at[:, jnp.int32(h), :], dq[h].astype(dq_ref.dtype), hm)


def backward_plans(p: common.Problem, q_shape, kv_shape, itemsize: int, *, block_q: int,
                   block_k: int, cores: int = compat.ABSTRACT_H100[1]
                   ) -> tuple[common.Plan, common.Plan]:
  """(dK/dV plan, dQ plan); `cores`: the SM count the dK/dV grid should cover."""
  b, t, n, head_dim = q_shape
  s, kv = kv_shape[1], kv_shape[2]
  g = n // kv
  nq, nk = t // block_q, s // block_k
  d, rd = _padded(head_dim), dict(read_last=head_dim)
  splits = common.dkv_splits(b, kv, nk, g, nq, cores)
  group_map = lambda bi, h, ki, si: (bi, 0, h, 0)
  row_map = lambda bi, h, ki, si: (bi, h, 0)
  kv_map = lambda bi, h, ki, si: (bi, ki, h, 0)
  out_block, out_map, out_size = (_S, block_k, _S, d), kv_map, itemsize
  if splits > 1:  # float32 partials [splits, B, S, K, D]
    out_block, out_size = (_S, _S, block_k, _S, d), 4
    out_map = lambda bi, h, ki, si: (si, bi, ki, h, 0)
  dkv_operands = [
      common.Operand("q", (_S, t, g, d), group_map, itemsize, streamed=(block_q, d), **rd),
      common.Operand("k", (_S, block_k, _S, d), kv_map, itemsize, kv=True, **rd),
      common.Operand("v", (_S, block_k, _S, d), kv_map, itemsize, kv=True, **rd),
      common.Operand("dout", (_S, t, g, d), group_map, itemsize, streamed=(block_q, d), **rd),
      common.Operand("lse", (_S, g, t), row_map, 4, streamed=(block_q,)),
      common.Operand("delta", (_S, g, t), row_map, 4, streamed=(block_q,)),
      common.Operand("dk", out_block, out_map, out_size, output=True, **rd),
      common.Operand("dv", out_block, out_map, out_size, output=True, **rd),
  ]
  if p.has_segments:
    dkv_operands = [
        common.Operand("q_seg", (_S, t), lambda bi, h, ki, si: (bi, 0), 4,
                       streamed=(block_q,), read_when_skipped=True),
        common.Operand("k_seg", (_S, block_k), lambda bi, h, ki, si: (bi, ki), 4),
    ] + dkv_operands

  def dkv_items(bi, h, ki, si):
    del bi, h
    first, end, lo, n_q = common.dkv_share(p, ki, si, g, splits, block_q, block_k, nq)
    return [(lo + j % n_q, ki) for j in range(first, end)]

  dkv = common.Plan("dkv", (b, kv, nk, splits), ("parallel",) * 4, tuple(dkv_operands),
                    dkv_items, block_q=block_q, heads_per_item=1, block_k=block_k, head_dim=d,
                    matmuls=4)

  group_map = lambda bi, h, qi: (bi, qi, h, 0)
  row_map = lambda bi, h, qi: (bi, h, qi)
  kv_map = lambda bi, h, qi: (bi, 0, h, 0)
  dq_operands = [
      common.Operand("q", (_S, block_q, g, d), group_map, itemsize, **rd),
      common.Operand("k", (_S, s, _S, d), kv_map, itemsize, kv=True, streamed=(block_k, d),
                     **rd),
      common.Operand("v", (_S, s, _S, d), kv_map, itemsize, kv=True, streamed=(block_k, d),
                     **rd),
      common.Operand("dout", (_S, block_q, g, d), group_map, itemsize, **rd),
      common.Operand("lse", (_S, g, block_q), row_map, 4),
      common.Operand("delta", (_S, g, block_q), row_map, 4),
      common.Operand("dq", (_S, block_q, g, d), group_map, itemsize, output=True, **rd),
  ]
  if p.has_segments:
    dq_operands = [common.Operand("q_seg", (_S, block_q), lambda bi, h, qi: (bi, qi), 4),
                   common.Operand("k_seg", (_S, s), lambda bi, h, qi: (bi, 0), 4,
                                  streamed=(block_k,), read_when_skipped=True)] + dq_operands

  dq = common.query_walk_plan("dq", p, (b, kv, nq), dq_operands, block_q=block_q,
                              block_k=block_k, num_k_blocks=nk, groups=g, head_dim=d,
                              matmuls=3)
  return dkv, dq


def backward(p: common.Problem, q, k, v, q_seg, k_seg, out, lse, do, *, block_q: int,
             block_k: int, interpret: bool = False):
  """(dq, dk, dv) for padded inputs; lse [B, N, T] (base 2) from forward()."""
  b, t, n, d = q.shape
  g = n // k.shape[2]
  nq, nk = t // block_q, k.shape[1] // block_k
  # delta_i = sum_d out_id * dout_id, the softmax-backward row term; one fused XLA pass.
  delta = jnp.einsum("btnd,btnd->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
  seg_args = [q_seg, k_seg] if p.has_segments else []
  dkv_plan, dq_plan = backward_plans(p, q.shape, k.shape, q.dtype.itemsize, block_q=block_q,
                                     block_k=block_k, cores=compat.gpu_core_count())
  splits = dkv_plan.grid[3]
  partial_shape = (splits, *k.shape) if splits > 1 else k.shape
  partial_dtype = jnp.float32 if splits > 1 else k.dtype
  args = [*seg_args, q, k, v, do, lse, delta]
  dkv_out = [jax.ShapeDtypeStruct(partial_shape, partial_dtype)] * 2
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, p=p, groups=g, splits=splits, head_dim=d,
                        block_q=block_q, block_k=block_k, num_q_blocks=nq),
      grid=dkv_plan.grid,
      in_specs=_specs(dkv_plan.inputs),
      out_specs=_specs(dkv_plan.outputs),
      out_shape=dkv_out,
      compiler_params=_params(_padded(d), num_stages=2, interpret=interpret),
      interpret=interpret,
      cost_estimate=common.cost_estimate(dkv_plan, p, args, dkv_out),
      name="effjax_flash_dkv",
  )(*args)
  if splits > 1:
    dk, dv = dk.sum(0).astype(k.dtype), dv.sum(0).astype(v.dtype)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, p=p, groups=g, head_dim=d, block_q=block_q,
                        block_k=block_k, num_k_blocks=nk),
      grid=dq_plan.grid,
      in_specs=_specs(dq_plan.inputs),
      out_specs=_specs(dq_plan.outputs)[0],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(_padded(d), num_stages=2, interpret=interpret),
      interpret=interpret,
      cost_estimate=common.cost_estimate(dq_plan, p, args, [jax.ShapeDtypeStruct(q.shape,
                                                                                 q.dtype)]),
      name="effjax_flash_dq",
  )(*args)
  return dq, dk, dv
