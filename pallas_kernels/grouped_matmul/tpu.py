"""Grouped matmul as Mosaic TPU `pallas_call`s: gmm (forward and input gradient), tgmm.

A TPU core runs the grid in order, so these kernels walk a visit schedule
(common.visit_schedule, scalar-prefetched into SMEM so the index maps can read it): a list of
(segment, row tile) pairs in row order, where a row tile that straddles a group boundary is
visited once per group in it. Consecutive visits of the same tile keep its output block in
VMEM; each visit fills in its own rows (a select), and Pallas writes the block back when the
tile changes. The schedule has a static length (row tiles + segments - 1), so one compilation
serves every group-size vector; visits past the real count do nothing and fetch nothing.

  gmm   grid (n tiles, visits, k tiles). Segments are the local groups plus one zero segment
        before them and one after (other shards' rows, rows past the sum, padding), so every
        row of every tile is written. A zero-segment visit skips the MXU and holds its input
        block indices fixed along k, so it fetches one block, not a k row of them.
  tgmm  grid (k tiles, n tiles, visits). Segments are the local groups, empty ones included
        (their one visit writes zeros). A float32 [block_k, block_n] accumulator in VMEM is
        reset at a group's first visit and stored at its last.

Status: checked against the reference in the TPU simulator (out-of-bounds reads raising) and
lowered for "tpu" on a CPU; not yet compiled by Mosaic on TPU hardware. Tiles there must follow
the (8, 128) layout rule (api.py checks it outside interpret mode).
"""
from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels import tiling
from pallas_kernels.grouped_matmul import common

_S = compat.SQUEEZED


def _gmm_kernel(segment_of_visit, tile_of_visit, seg_starts, seg_ends, num_visits,
                lhs_ref, rhs_ref, out_ref, acc_ref, *, block_m: int, num_k_tiles: int,
                num_segments: int, transpose_rhs: bool):
  visit, kt = pl.program_id(1), pl.program_id(2)
  segment = segment_of_visit[visit]
  real_visit = visit < num_visits[0]
  is_group = (segment > 0) & (segment < num_segments - 1)

  @pl.when(kt == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(real_visit & is_group)
  def _accumulate():
    dims = tiling.NT_DIMS if transpose_rhs else tiling.NN_DIMS
    acc_ref[...] += tiling.dot(lhs_ref[...], rhs_ref[...], dims)

  @pl.when(real_visit & (kt == num_k_tiles - 1))
  def _store():  # a zero segment stores its zero accumulator
    mask = common.rows_in(tile_of_visit[visit] * block_m, acc_ref.shape, seg_starts[segment],
                          seg_ends[segment])
    # select in float32: older TPUs have no bf16 vector unit
    kept = out_ref[...].astype(jnp.float32)
    out_ref[...] = jnp.where(mask, acc_ref[...], kept).astype(out_ref.dtype)


def gmm(lhs, rhs, starts, ends, *, tiles: common.Tiles, transpose_rhs: bool, out_dtype,
        interpret=False):
  """lhs [m, k], rhs [G, k, n] ([G, n, k] transposed), all tile multiples -> [m, n]."""
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  num_row_tiles, num_k_tiles = m // bm, k // bk
  # Segment 0: rows before the shard's groups; 1..G: the groups; G + 1: rows after them.
  seg_starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), starts, ends[-1:]])
  seg_ends = jnp.concatenate([starts[:1], ends, jnp.full((1,), m, jnp.int32)])
  num_segments = num_groups + 2
  segment_of_visit, tile_of_visit, num_visits = common.visit_schedule(
      seg_starts, seg_ends, bm, num_row_tiles, visit_empty=False)

  def k_tile(visit, kt, segment_of_visit):
    segment = segment_of_visit[visit]
    return jnp.where((segment > 0) & (segment < num_segments - 1), kt, 0)

  # Index maps get (grid indices..., prefetched refs...): (j, visit, kt, segment_of_visit,
  # tile_of_visit, seg_starts, seg_ends, num_visits).
  def lhs_index(j, visit, kt, segment_of_visit, tile_of_visit, *_):
    return tile_of_visit[visit], k_tile(visit, kt, segment_of_visit)

  def rhs_index(j, visit, kt, segment_of_visit, *_):
    group = jnp.clip(segment_of_visit[visit] - 1, 0, num_groups - 1)
    kt = k_tile(visit, kt, segment_of_visit)
    return (group, j, kt) if transpose_rhs else (group, kt, j)

  def out_index(j, visit, kt, segment_of_visit, tile_of_visit, *_):
    return tile_of_visit[visit], j

  rhs_block = (_S, bn, bk) if transpose_rhs else (_S, bk, bn)
  kernel = functools.partial(_gmm_kernel, block_m=bm, num_k_tiles=num_k_tiles,
                             num_segments=num_segments, transpose_rhs=transpose_rhs)
  grid_spec = compat.tpu_prefetch_scalar_grid_spec(
      num_scalar_prefetch=5,
      grid=(n // bn, segment_of_visit.shape[0], num_k_tiles),
      in_specs=[pl.BlockSpec((bm, bk), lhs_index), pl.BlockSpec(rhs_block, rhs_index)],
      out_specs=pl.BlockSpec((bm, bn), out_index),
      scratch_shapes=[compat.tpu_vmem((bm, bn), jnp.float32)])
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      # Visits revisit output blocks in order, so only the column axis may be split.
      compiler_params=compat.tpu_compiler_params(("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="effjax_gmm_tpu",
  )(segment_of_visit, tile_of_visit, seg_starts, seg_ends, num_visits, lhs, rhs)


def _tgmm_kernel(group_of_visit, tile_of_visit, starts, ends, num_visits, lhs_ref, grad_ref,
                 out_ref, acc_ref, *, block_m: int, max_visits: int):
  visit = pl.program_id(2)
  group = group_of_visit[visit]
  previous_group = group_of_visit[jnp.maximum(visit - 1, 0)]
  next_group = group_of_visit[jnp.minimum(visit + 1, max_visits - 1)]

  @pl.when((visit == 0) | (previous_group != group))
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(visit < num_visits[0])
  def _accumulate():
    first_row, start, end = tile_of_visit[visit] * block_m, starts[group], ends[group]
    x, y = lhs_ref[...], grad_ref[...]
    x = common.masked_rows(x, common.rows_in(first_row, x.shape, start, end))
    y = common.masked_rows(y, common.rows_in(first_row, y.shape, start, end))
    acc_ref[...] += tiling.dot(x, y, tiling.TN_DIMS, transpose_in_register=True)

  @pl.when((visit == max_visits - 1) | (next_group != group))
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, grad, starts, ends, *, tiles: common.Tiles, out_dtype, interpret=False):
  """lhs [m, k], grad [m, n], all tile multiples -> [G, k, n] (G = len(starts))."""
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = starts.shape[0]
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  group_of_visit, tile_of_visit, num_visits = common.visit_schedule(
      starts, ends, bm, m // bm, visit_empty=True)
  max_visits = group_of_visit.shape[0]

  # Index maps get (i, j, visit, group_of_visit, tile_of_visit, starts, ends, num_visits).
  def lhs_index(i, j, visit, group_of_visit, tile_of_visit, *_):
    return tile_of_visit[visit], i

  def grad_index(i, j, visit, group_of_visit, tile_of_visit, *_):
    return tile_of_visit[visit], j

  def out_index(i, j, visit, group_of_visit, *_):
    return group_of_visit[visit], i, j

  grid_spec = compat.tpu_prefetch_scalar_grid_spec(
      num_scalar_prefetch=5,
      grid=(k // bk, n // bn, max_visits),
      in_specs=[pl.BlockSpec((bm, bk), lhs_index), pl.BlockSpec((bm, bn), grad_index)],
      out_specs=pl.BlockSpec((_S, bk, bn), out_index),
      scratch_shapes=[compat.tpu_vmem((bk, bn), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, block_m=bm, max_visits=max_visits),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      compiler_params=compat.tpu_compiler_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="effjax_tgmm_tpu",
  )(group_of_visit, tile_of_visit, starts, ends, num_visits, lhs, grad)
