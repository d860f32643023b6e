"""Flash attention as Triton-style `pallas_call`s (GPU): forward, dK/dV and dQ kernels.

Layout [batch, seq, heads, head_dim] throughout, as the model produces it. Inputs reach these
functions already padded by api.py: sequences to block multiples, head_dim to a power of two
(Triton's tile shapes must be powers of two).

Grid and loops:
  forward  grid (B, N, query blocks); each program loops over the key blocks its rows can see
           and saves the log-sum-exp per row for the backward.
  dK/dV    grid (B, K, key blocks); each program loops over the N // K query heads of its
           group and, per head, over the query blocks that can see its keys. Summing the
           group inside the kernel keeps dK/dV in registers and needs no atomics and no
           [B, S, N, D] partials (which the wrapper would have to reduce: G times the memory).
  dQ       grid (B, N, query blocks), looping over key blocks like the forward.
Query head n reads kv head n // G through the BlockSpec index maps (G = N // K).

Status: checked against the reference in Pallas's interpreter and lowered for "cuda" on a CPU
(Triton IR); not yet compiled and timed on a GPU (experiments/bench_attention.py does both).
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


def _params(head_dim: int, num_stages: int, interpret):
  if not interpret:
    compat.note_triton_use()
  return compat.triton_compiler_params(num_warps=4 if head_dim <= 64 else 8,
                                       num_stages=num_stages)


def _fwd_kernel(*refs, p: common.Problem, block_q: int, block_k: int, num_k_blocks: int):
  if p.has_segments:
    q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  q_block = pl.program_id(2)
  q = q_ref[...]
  q_pos = common.positions(q_block * block_q, block_q, axis=0)
  q_seg = q_seg_ref[...][:, None] if p.has_segments else None

  def body(kb, carry):
    start = pl.multiple_of(kb * block_k, block_k)
    rows = pl.ds(start, block_k)
    k_seg = k_seg_ref[rows][None, :] if p.has_segments else None
    return common.fwd_block(p, q, k_ref[rows, :], v_ref[rows, :], q_pos,
                            common.positions(start, block_k, axis=1), q_seg, k_seg, *carry)

  lo, hi = p.kv_block_range(q_block, block_q, block_k, num_k_blocks)
  init = (jnp.zeros(q.shape, jnp.float32),
          jnp.full((block_q, 1), common.reference.MASK_VALUE, jnp.float32),
          jnp.zeros((block_q, 1), jnp.float32))
  acc, m, l = lax.fori_loop(lo, hi, body, init)
  out, lse = common.fwd_finish(acc, m, l)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def forward_plan(p: common.Problem, q_shape, kv_shape, itemsize: int, *, block_q: int,
                 block_k: int) -> common.Plan:
  b, t, n, d = q_shape
  s, kv = kv_shape[1], kv_shape[2]
  g = n // kv
  nq, nk = t // block_q, s // block_k
  q_map = lambda bi, h, qi: (bi, qi, h, 0)
  kv_map = lambda bi, h, qi: (bi, 0, common.idiv(h, g), 0)
  operands = [
      common.Operand("q", (_S, block_q, _S, d), q_map, itemsize),
      common.Operand("k", (_S, s, _S, d), kv_map, itemsize, kv=True, streamed=(block_k, d)),
      common.Operand("v", (_S, s, _S, d), kv_map, itemsize, kv=True, streamed=(block_k, d)),
      common.Operand("out", (_S, block_q, _S, d), q_map, itemsize, output=True),
      common.Operand("lse", (_S, _S, block_q), lambda bi, h, qi: (bi, h, qi), 4, output=True),
  ]
  if p.has_segments:
    operands = [common.Operand("q_seg", (_S, block_q), lambda bi, h, qi: (bi, qi), 4),
                common.Operand("k_seg", (_S, s), lambda bi, h, qi: (bi, 0), 4,
                               streamed=(block_k,))] + operands

  def items(bi, h, qi):
    del bi, h
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return [(qi, kb) for kb in range(lo, hi)]

  return common.Plan("forward", (b, n, nq), ("parallel",) * 3, tuple(operands), items,
                     block_q=block_q, heads_per_item=1, block_k=block_k, head_dim=d, matmuls=2,
                     masks_every_block=True)


def _specs(operands):
  return [pl.BlockSpec(o.block, o.index_map) for o in operands]


def forward(p: common.Problem, q, k, v, q_seg, k_seg, *, block_q: int, block_k: int,
            interpret: bool = False):
  """(out [B, T, N, D], lse [B, N, T] float32) for padded inputs."""
  b, t, n, d = q.shape
  nk = k.shape[1] // block_k
  plan = forward_plan(p, q.shape, k.shape, q.dtype.itemsize, block_q=block_q, block_k=block_k)
  kernel = functools.partial(_fwd_kernel, p=p, block_q=block_q, block_k=block_k,
                             num_k_blocks=nk)
  args = ([q_seg, k_seg] if p.has_segments else []) + [q, k, v]
  return pl.pallas_call(
      kernel,
      grid=plan.grid,
      in_specs=_specs(plan.inputs),
      out_specs=_specs(plan.outputs),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
      compiler_params=_params(d, num_stages=2, interpret=interpret),
      interpret=interpret,
      name="effjax_flash_fwd",
  )(*args)


def _dkv_kernel(*refs, p: common.Problem, block_q: int, block_k: int, num_q_blocks: int):
  if p.has_segments:
    q_seg_ref, k_seg_ref, *refs = refs
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
  k_block = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  k_pos = common.positions(k_block * block_k, block_k, axis=1)
  k_seg = k_seg_ref[...][None, :] if p.has_segments else None
  lo, hi = p.q_block_range(k_block, block_q, block_k, num_q_blocks)

  def q_body(qb, carry, head):
    start = pl.multiple_of(qb * block_q, block_q)
    rows = pl.ds(start, block_q)
    q, do = q_ref[rows, head, :], do_ref[rows, head, :]
    q_seg = q_seg_ref[rows][:, None] if p.has_segments else None
    probs, ds = common.bwd_block(p, q, k, v, do, lse_ref[head, rows][:, None],
                                 delta_ref[head, rows][:, None],
                                 common.positions(start, block_q, axis=0), k_pos, q_seg, k_seg)
    return common.dkv_update(q, do, probs, ds, *carry, transpose_in_register=False)

  def head_body(head, carry):
    return lax.fori_loop(lo, hi, functools.partial(q_body, head=head), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, p.groups, head_body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, p: common.Problem, block_q: int, block_k: int, num_k_blocks: int):
  if p.has_segments:
    q_seg_ref, k_seg_ref, *refs = refs
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
  q_block = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_pos = common.positions(q_block * block_q, block_q, axis=0)
  q_seg = q_seg_ref[...][:, None] if p.has_segments else None

  def body(kb, dq):
    start = pl.multiple_of(kb * block_k, block_k)
    rows = pl.ds(start, block_k)
    k = k_ref[rows, :]
    k_seg = k_seg_ref[rows][None, :] if p.has_segments else None
    _, ds = common.bwd_block(p, q, k, v_ref[rows, :], do, lse, delta, q_pos,
                             common.positions(start, block_k, axis=1), q_seg, k_seg)
    return common.dq_update(k, ds, dq)

  lo, hi = p.kv_block_range(q_block, block_q, block_k, num_k_blocks)
  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def backward_plans(p: common.Problem, q_shape, kv_shape, itemsize: int, *, block_q: int,
                   block_k: int) -> tuple[common.Plan, common.Plan]:
  """(dK/dV plan, dQ plan)."""
  b, t, n, d = q_shape
  s, kv = kv_shape[1], kv_shape[2]
  g = n // kv
  nq, nk = t // block_q, s // block_k
  # dK/dV: one program per (batch, kv head, key block); whole sequences of its G query heads.
  group_map = lambda bi, h, ki: (bi, 0, h, 0)
  row_map = lambda bi, h, ki: (bi, h, 0)
  kv_map = lambda bi, h, ki: (bi, ki, h, 0)
  dkv_operands = [
      common.Operand("q", (_S, t, g, d), group_map, itemsize, streamed=(block_q, d)),
      common.Operand("k", (_S, block_k, _S, d), kv_map, itemsize, kv=True),
      common.Operand("v", (_S, block_k, _S, d), kv_map, itemsize, kv=True),
      common.Operand("dout", (_S, t, g, d), group_map, itemsize, streamed=(block_q, d)),
      common.Operand("lse", (_S, g, t), row_map, 4, streamed=(block_q,)),
      common.Operand("delta", (_S, g, t), row_map, 4, streamed=(block_q,)),
      common.Operand("dk", (_S, block_k, _S, d), kv_map, itemsize, output=True),
      common.Operand("dv", (_S, block_k, _S, d), kv_map, itemsize, output=True),
  ]
  if p.has_segments:
    dkv_operands = [
        common.Operand("q_seg", (_S, t), lambda bi, h, ki: (bi, 0), 4, streamed=(block_q,)),
        common.Operand("k_seg", (_S, block_k), lambda bi, h, ki: (bi, ki), 4)] + dkv_operands

  def dkv_items(bi, h, ki):
    del bi, h
    lo, hi = p.q_block_range(ki, block_q, block_k, nq)
    return [(qb, ki) for _ in range(g) for qb in range(lo, hi)]

  dkv = common.Plan("dkv", (b, kv, nk), ("parallel",) * 3, tuple(dkv_operands), dkv_items,
                    block_q=block_q, heads_per_item=1, block_k=block_k, head_dim=d, matmuls=4,
                    masks_every_block=True)

  q_map = lambda bi, h, qi: (bi, qi, h, 0)
  row_map = lambda bi, h, qi: (bi, h, qi)
  kv_map = lambda bi, h, qi: (bi, 0, common.idiv(h, g), 0)
  dq_operands = [
      common.Operand("q", (_S, block_q, _S, d), q_map, itemsize),
      common.Operand("k", (_S, s, _S, d), kv_map, itemsize, kv=True, streamed=(block_k, d)),
      common.Operand("v", (_S, s, _S, d), kv_map, itemsize, kv=True, streamed=(block_k, d)),
      common.Operand("dout", (_S, block_q, _S, d), q_map, itemsize),
      common.Operand("lse", (_S, _S, block_q), row_map, 4),
      common.Operand("delta", (_S, _S, block_q), row_map, 4),
      common.Operand("dq", (_S, block_q, _S, d), q_map, itemsize, output=True),
  ]
  if p.has_segments:
    dq_operands = [common.Operand("q_seg", (_S, block_q), lambda bi, h, qi: (bi, qi), 4),
                   common.Operand("k_seg", (_S, s), lambda bi, h, qi: (bi, 0), 4,
                                  streamed=(block_k,))] + dq_operands

  def dq_items(bi, h, qi):
    del bi, h
    lo, hi = p.kv_block_range(qi, block_q, block_k, nk)
    return [(qi, kb) for kb in range(lo, hi)]

  dq = common.Plan("dq", (b, n, nq), ("parallel",) * 3, tuple(dq_operands), dq_items,
                   block_q=block_q, heads_per_item=1, block_k=block_k, head_dim=d, matmuls=3,
                   masks_every_block=True)
  return dkv, dq


def backward(p: common.Problem, q, k, v, q_seg, k_seg, out, lse, do, *, block_q: int,
             block_k: int, interpret: bool = False):
  """(dq, dk, dv) for padded inputs; lse [B, N, T] from forward()."""
  d = q.shape[3]
  nq, nk = q.shape[1] // block_q, k.shape[1] // block_k
  # delta_i = sum_d out_id * dout_id, the softmax-backward row term; one fused XLA pass.
  delta = jnp.einsum("btnd,btnd->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
  seg_args = [q_seg, k_seg] if p.has_segments else []
  dkv_plan, dq_plan = backward_plans(p, q.shape, k.shape, q.dtype.itemsize, block_q=block_q,
                                     block_k=block_k)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, p=p, block_q=block_q, block_k=block_k,
                        num_q_blocks=nq),
      grid=dkv_plan.grid,
      in_specs=_specs(dkv_plan.inputs),
      out_specs=_specs(dkv_plan.outputs),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(d, num_stages=2, interpret=interpret),
      interpret=interpret,
      name="effjax_flash_dkv",
  )(*seg_args, q, k, v, do, lse, delta)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, p=p, block_q=block_q, block_k=block_k,
                        num_k_blocks=nk),
      grid=dq_plan.grid,
      in_specs=_specs(dq_plan.inputs),
      out_specs=_specs(dq_plan.outputs)[0],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(d, num_stages=2, interpret=interpret),
      interpret=interpret,
      name="effjax_flash_dq",
  )(*seg_args, q, k, v, do, lse, delta)
  return dq, dk, dv
