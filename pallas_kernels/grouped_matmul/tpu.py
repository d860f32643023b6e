"""Grouped matmul as Mosaic TPU `pallas_call`s: gmm (forward and input gradient), tgmm.

A TPU core runs the grid in order, so these kernels walk a visit schedule
(common.visit_schedule, scalar-prefetched into SMEM so the index maps can read it): a list of
(segment, row tile) pairs in row order, where a row tile that straddles a group boundary is
visited once per group in it. Consecutive visits of the same tile keep its output block in
VMEM; each visit fills in its own rows (a select), and Pallas writes the block back when the
tile changes. The schedule has a static length (row tiles + segments - 1), so one compilation
serves every group-size vector; visits past the real count do nothing and fetch nothing.

A visit multiplies only its segment's rows of the tile, rounded out to sublane tiles (8 rows
for 32-bit operands, 16 for 16-bit; visit_rows), as a binary decomposition into static chunk
heights (block_m / 2^j) at aligned offsets in the VMEM block: a tile holding several groups
costs about its rows once, not a whole tile per group. The blocks are still fetched whole
(the bytes do not change), and where a chunk is much shorter than the MXU the weights are
pushed for few rows: work.py counts MACs, not MXU cycles.

  gmm   grid (n tiles, visits, k tiles). Segments are the local groups plus one zero segment
        before them and one after (other shards' rows, rows past the sum, padding), so every
        row of every tile is written. A zero-segment visit skips the MXU and holds its input
        block indices fixed along k, so it fetches one block, not a k row of them.
  tgmm  grid (k tiles, n tiles, visits). Segments are the local groups, empty ones included
        (their one visit writes zeros). A float32 [block_k, block_n] accumulator in VMEM is
        reset at a group's first visit and stored at its last.

Status: checked against the reference in the TPU simulator (out-of-bounds reads raising) and
lowered for "tpu" on a CPU; not yet compiled by Mosaic on TPU hardware (the dynamic, aligned
sublane slices of the chunks are untested by Mosaic's layout passes). Tiles there must follow
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


def row_granularity(block_m: int, dtype) -> int:
  """Rows per sublane tile of the dtype (8 for 32-bit, 16 for 16-bit), or 8 where block_m is
  no multiple of 16: a visit multiplies its rows rounded out to this granularity."""
  return 16 if jnp.dtype(dtype).itemsize == 2 and block_m % 16 == 0 else 8


def chunk_sizes(block_m: int, granularity: int) -> tuple[int, ...]:
  """The static chunk heights a visit's rows are split into: granularity * 2^j <= block_m,
  largest first (a binary decomposition of any multiple of granularity up to block_m)."""
  sizes = [granularity]
  while sizes[-1] * 2 <= block_m:
    sizes.append(sizes[-1] * 2)
  return tuple(reversed(sizes))


def visit_rows(first_row, start, end, *, block_m: int, granularity: int):
  """(offset, length): the rows of segment [start, end) inside the tile at first_row, rounded
  out to multiples of granularity, as an offset into the tile and a row count (0 if none).
  Chunk of size z is present when length & z; it starts at offset + (length & ~(2 z - 1))."""
  lo = jnp.clip(start - first_row, 0, block_m)
  hi = jnp.clip(end - first_row, 0, block_m)
  # Bit masks, not //: both are >= 0 and granularity is a power of two (and Mosaic lowers
  # integer floor division through sign(), which asks for the TPU generation).
  offset = lo & -granularity
  length = jnp.where(hi > lo, ((hi + granularity - 1) & -granularity) - offset, 0)
  return offset, length


def _gmm_kernel(segment_of_visit, tile_of_visit, seg_starts, seg_ends, num_visits,
                lhs_ref, rhs_ref, out_ref, acc_ref, *, block_m: int, granularity: int,
                num_k_tiles: int, num_segments: int, transpose_rhs: bool):
  visit, kt = pl.program_id(1), pl.program_id(2)
  segment = segment_of_visit[visit]
  real_visit = visit < num_visits[0]
  is_group = (segment > 0) & (segment < num_segments - 1)
  offset, length = visit_rows(tile_of_visit[visit] * block_m, seg_starts[segment],
                              seg_ends[segment], block_m=block_m, granularity=granularity)

  @pl.when(kt == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  # Only the segment's rows (rounded out to sublane tiles) go through the MXU: a tile that
  # holds several groups costs about its rows once, not the whole tile once per group.
  dims = tiling.NT_DIMS if transpose_rhs else tiling.NN_DIMS
  for rows in chunk_sizes(block_m, granularity):
    @pl.when(real_visit & is_group & ((length & rows) != 0))
    def _accumulate(rows=rows):
      at = pl.ds(pl.multiple_of(offset + (length & ~(2 * rows - 1)), granularity), rows)
      acc_ref[at, :] += tiling.dot(lhs_ref[at, :], rhs_ref[...], dims)

  @pl.when(real_visit & (kt == num_k_tiles - 1))
  def _store():  # a zero segment stores its zero accumulator
    mask = common.rows_in(tile_of_visit[visit] * block_m, acc_ref.shape, seg_starts[segment],
                          seg_ends[segment])
    # select in float32: older TPUs have no bf16 vector unit
    kept = out_ref[...].astype(jnp.float32)
    out_ref[...] = jnp.where(mask, acc_ref[...], kept).astype(out_ref.dtype)


def gmm_schedule(starts, ends, *, m: int, block_m: int):
  """The scalar-prefetched operands of gmm: (segment_of_visit, tile_of_visit, seg_starts,
  seg_ends, num_visits). Segment 0: rows before the shard's groups; 1..G: the groups; G + 1:
  rows after them."""
  seg_starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), starts, ends[-1:]])
  seg_ends = jnp.concatenate([starts[:1], ends, jnp.full((1,), m, jnp.int32)])
  segment_of_visit, tile_of_visit, num_visits = common.visit_schedule(
      seg_starts, seg_ends, block_m, m // block_m, visit_empty=False)
  return segment_of_visit, tile_of_visit, seg_starts, seg_ends, num_visits


def gmm_index_maps(num_groups: int, transpose_rhs: bool):
  """(lhs, rhs, out) index maps of gmm, called as (j, visit, kt, *gmm_schedule(...))."""
  num_segments = num_groups + 2

  def k_tile(visit, kt, segment_of_visit):
    segment = segment_of_visit[visit]
    return jnp.where((segment > 0) & (segment < num_segments - 1), kt, 0)

  def lhs_index(j, visit, kt, segment_of_visit, tile_of_visit, *_):
    del j
    return tile_of_visit[visit], k_tile(visit, kt, segment_of_visit)

  def rhs_index(j, visit, kt, segment_of_visit, *_):
    group = jnp.clip(segment_of_visit[visit] - 1, 0, num_groups - 1)
    kt = k_tile(visit, kt, segment_of_visit)
    return (group, j, kt) if transpose_rhs else (group, kt, j)

  def out_index(j, visit, kt, segment_of_visit, tile_of_visit, *_):
    del kt
    return tile_of_visit[visit], j

  return lhs_index, rhs_index, out_index


def gmm(lhs, rhs, starts, ends, *, tiles: common.Tiles, transpose_rhs: bool, out_dtype,
        interpret=False):
  """lhs [m, k], rhs [G, k, n] ([G, n, k] transposed), all tile multiples -> [m, n]."""
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  num_k_tiles = k // bk
  num_segments = num_groups + 2
  schedule = gmm_schedule(starts, ends, m=m, block_m=bm)
  lhs_index, rhs_index, out_index = gmm_index_maps(num_groups, transpose_rhs)

  rhs_block = (_S, bn, bk) if transpose_rhs else (_S, bk, bn)
  kernel = functools.partial(_gmm_kernel, block_m=bm,
                             granularity=row_granularity(bm, lhs.dtype),
                             num_k_tiles=num_k_tiles, num_segments=num_segments,
                             transpose_rhs=transpose_rhs)
  grid_spec = compat.tpu_prefetch_scalar_grid_spec(
      num_scalar_prefetch=5,
      grid=(n // bn, schedule[0].shape[0], num_k_tiles),
      in_specs=[pl.BlockSpec((bm, bk), lhs_index), pl.BlockSpec(rhs_block, rhs_index)],
      out_specs=pl.BlockSpec((bm, bn), out_index),
      scratch_shapes=[compat.tpu_vmem((bm, bn), jnp.float32)])
  out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=out_shape,
      # Visits revisit output blocks in order, so only the column axis may be split.
      compiler_params=compat.tpu_compiler_params(("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      cost_estimate=common.cost_estimate(m, k, n, (lhs, rhs), out_shape),
      name="effjax_gmm_tpu",
  )(*schedule, lhs, rhs)


def _select_rows_f32(x, mask):
  """x where mask holds, else zero, selected in float32 (older TPUs have no bf16 vector unit)
  and cast back to x's dtype for the MXU."""
  return jnp.where(mask, x.astype(jnp.float32), 0.0).astype(x.dtype)


def _tgmm_kernel(group_of_visit, tile_of_visit, starts, ends, num_visits, lhs_ref, grad_ref,
                 out_ref, acc_ref, *, block_m: int, granularity: int, max_visits: int):
  visit = pl.program_id(2)
  group = group_of_visit[visit]
  previous_group = group_of_visit[jnp.maximum(visit - 1, 0)]
  next_group = group_of_visit[jnp.minimum(visit + 1, max_visits - 1)]

  @pl.when((visit == 0) | (previous_group != group))
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  first_row, start, end = tile_of_visit[visit] * block_m, starts[group], ends[group]
  offset, length = visit_rows(first_row, start, end, block_m=block_m, granularity=granularity)
  for rows in chunk_sizes(block_m, granularity):
    @pl.when((visit < num_visits[0]) & ((length & rows) != 0))
    def _accumulate(rows=rows):
      chunk_row = pl.multiple_of(offset + (length & ~(2 * rows - 1)), granularity)
      at = pl.ds(chunk_row, rows)
      x, y = lhs_ref[at, :], grad_ref[at, :]
      x = _select_rows_f32(x, common.rows_in(first_row + chunk_row, x.shape, start, end))
      y = _select_rows_f32(y, common.rows_in(first_row + chunk_row, y.shape, start, end))
      acc_ref[...] += tiling.dot(x, y, tiling.TN_DIMS, transpose_in_register=True)

  @pl.when((visit == max_visits - 1) | (next_group != group))
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm_schedule(starts, ends, *, m: int, block_m: int):
  """The scalar-prefetched operands of tgmm: (group_of_visit, tile_of_visit, starts, ends,
  num_visits); every local group gets a visit, empty ones included (they write zeros)."""
  group_of_visit, tile_of_visit, num_visits = common.visit_schedule(
      starts, ends, block_m, m // block_m, visit_empty=True)
  return group_of_visit, tile_of_visit, starts, ends, num_visits


def tgmm_index_maps():
  """(lhs, grad, out) index maps of tgmm, called as (i, j, visit, *tgmm_schedule(...))."""
  def lhs_index(i, j, visit, group_of_visit, tile_of_visit, *_):
    del j
    return tile_of_visit[visit], i

  def grad_index(i, j, visit, group_of_visit, tile_of_visit, *_):
    del i
    return tile_of_visit[visit], j

  def out_index(i, j, visit, group_of_visit, *_):
    return group_of_visit[visit], i, j

  return lhs_index, grad_index, out_index


def tgmm(lhs, grad, starts, ends, *, tiles: common.Tiles, out_dtype, interpret=False):
  """lhs [m, k], grad [m, n], all tile multiples -> [G, k, n] (G = len(starts))."""
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = starts.shape[0]
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  schedule = tgmm_schedule(starts, ends, m=m, block_m=bm)
  max_visits = schedule[0].shape[0]
  lhs_index, grad_index, out_index = tgmm_index_maps()

  grid_spec = compat.tpu_prefetch_scalar_grid_spec(
      num_scalar_prefetch=5,
      grid=(k // bk, n // bn, max_visits),
      in_specs=[pl.BlockSpec((bm, bk), lhs_index), pl.BlockSpec((bm, bn), grad_index)],
      out_specs=pl.BlockSpec((_S, bk, bn), out_index),
      scratch_shapes=[compat.tpu_vmem((bk, bn), jnp.float32)])
  out_shape = jax.ShapeDtypeStruct((num_groups, k, n), out_dtype)
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, block_m=bm, granularity=row_granularity(bm, lhs.dtype),
                        max_visits=max_visits),
      grid_spec=grid_spec,
      out_shape=out_shape,
      compiler_params=compat.tpu_compiler_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=common.cost_estimate(m, k, n, (lhs, grad), out_shape),
      name="effjax_tgmm_tpu",
  )(*schedule, lhs, grad)
