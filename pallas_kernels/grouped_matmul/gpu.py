"""Grouped matmul as Triton-style `pallas_call`s (GPU): gmm (forward and input gradient), tgmm.

Inputs reach these functions padded by api.py to tile multiples (rows, contraction, columns),
with the shard's group bounds (common.local_group_bounds) as int32 vectors.

Work items are row chunks aligned to each group's start (common.row_chunks): a group's full
block_m-row chunks, then its remaining rows rounded up to 16 (tl.dot's minimum) as chunks of
block_m / 2, block_m / 4, ..., 16 rows. A group boundary inside a tile therefore costs fewer
than 16 extra rows, not a whole tile over all of k per group (the old per-tile loop over
groups issued 1.9x the useful MACs at 64 random groups of m = 8192, 4.9x at 256).

  gmm   grid (items, column tiles). A program multiplies its chunk by its group's weights over
        the whole k loop and stores only the rows it owns (a masked store; items own disjoint
        rows). Items of the rows before and after the shard's groups store zeros, so every
        row is written once. Items past the real count exit at once.
  tgmm  grid (groups, k tiles, n tiles). A program owns out[g, k tile, n tile] and loops over
        group g's items, masking rows it does not own in both operands. An empty group has no
        items and writes zeros.
The item metadata is read as scalars inside the programs (Triton has no scalar prefetch); the
operands are passed as whole-axis blocks and sliced with pl.ds at any row.

Status: checked against the reference in Pallas's interpreter and lowered for "cuda" on a CPU
(Triton IR); not yet compiled and timed on a GPU (experiments/bench_gmm.py does both).
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels import tiling
from pallas_kernels.grouped_matmul import common

_S = compat.SQUEEZED


def _params(tile_elements: int, interpret):
  if not interpret:
    compat.note_triton_use()
  return compat.triton_compiler_params(num_warps=8 if tile_elements >= 128 * 128 else 4,
                                       num_stages=3)


# Triton's tl.dot needs at least 16 rows: the smallest chunk height.
MIN_ROWS = 16


def gmm_schedule(starts, ends, *, m: int, block_m: int) -> common.RowChunks:
  """gmm's work items: row chunks of segment 0 (rows before the shard's groups), the groups
  1..G and segment G + 1 (rows after them); the zero segments' items write zeros."""
  return common.segment_row_chunks(starts, ends, num_rows=m, block_m=block_m,
                                   min_rows=MIN_ROWS)


def _gmm_kernel(segment_ref, row0_ref, class_ref, lo_ref, hi_ref, num_items_ref, lhs_ref,
                rhs_ref, out_ref, *, sizes: tuple[int, ...], block_k: int, num_k_tiles: int,
                num_groups: int, transpose_rhs: bool):
  item = pl.program_id(0)
  segment, row0, lo, hi = segment_ref[item], row0_ref[item], lo_ref[item], hi_ref[item]
  group = jnp.clip(segment - 1, 0, num_groups - 1)
  is_group = (segment > 0) & (segment <= num_groups)
  dims = tiling.NT_DIMS if transpose_rhs else tiling.NN_DIMS
  block_n = out_ref.shape[1]

  for size_class, rows in enumerate(sizes):
    @pl.when((item < num_items_ref[0]) & (class_ref[item] == size_class))
    def _chunk(rows=rows):
      def k_step(kt, acc):
        cols = pl.ds(pl.multiple_of(kt * block_k, block_k), block_k)
        w = rhs_ref[group, :, cols] if transpose_rhs else rhs_ref[group, cols, :]
        return acc + tiling.dot(lhs_ref[pl.ds(row0, rows), cols], w, dims)

      zeros = jnp.zeros((rows, block_n), jnp.float32)
      acc = lax.cond(is_group, lambda: lax.fori_loop(0, num_k_tiles, k_step, zeros),
                     lambda: zeros)
      pl_triton.store(out_ref.at[pl.ds(row0, rows), :], acc.astype(out_ref.dtype),
                      mask=common.rows_in(row0, acc.shape, lo, hi))


def gmm(lhs, rhs, starts, ends, *, tiles: common.Tiles, transpose_rhs: bool, out_dtype,
        interpret=False):
  """lhs [m, k], rhs [G, k, n] ([G, n, k] transposed), all tile multiples -> [m, n]."""
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  chunks = gmm_schedule(starts, ends, m=m, block_m=bm)
  if transpose_rhs:
    rhs_spec = pl.BlockSpec((num_groups, bn, k), lambda i, j: (0, j, 0))
  else:
    rhs_spec = pl.BlockSpec((num_groups, k, bn), lambda i, j: (0, 0, j))
  whole = lambda x: pl.BlockSpec(x.shape, lambda i, j: (0,) * x.ndim)
  metadata = (chunks.segment, chunks.row0, chunks.size_class, chunks.lo, chunks.hi,
              chunks.num_items)
  kernel = functools.partial(_gmm_kernel, sizes=chunks.sizes, block_k=bk, num_k_tiles=k // bk,
                             num_groups=num_groups, transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      grid=(chunks.max_items, n // bn),
      in_specs=[whole(x) for x in metadata] + [whole(lhs), rhs_spec],
      # Each item stores only the rows it owns (a masked store), so items never overlap.
      out_specs=pl.BlockSpec((m, bn), lambda i, j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      compiler_params=_params(bm * bn, interpret),
      interpret=interpret,
      cost_estimate=common.cost_estimate(m, lhs.shape[1], n, (lhs, rhs),
                                         jax.ShapeDtypeStruct((m, n), out_dtype)),
      name="effjax_gmm",
  )(*metadata, lhs, rhs)


def tgmm_schedule(starts, ends, *, m: int, block_m: int) -> common.RowChunks:
  """tgmm's work items: row chunks of the local groups (an empty group has none)."""
  return common.row_chunks(starts, ends, block_m=block_m, min_rows=MIN_ROWS, num_rows=m)


def _tgmm_kernel(first_item_ref, row0_ref, class_ref, lo_ref, hi_ref, lhs_ref, grad_ref,
                 out_ref, *, sizes: tuple[int, ...]):
  group = pl.program_id(0)

  def item_step(item, acc):
    row0, lo, hi = row0_ref[item], lo_ref[item], hi_ref[item]
    for size_class, rows in enumerate(sizes):
      def chunk(acc, rows=rows):
        x, y = lhs_ref[pl.ds(row0, rows), :], grad_ref[pl.ds(row0, rows), :]
        x = common.masked_rows(x, common.rows_in(row0, x.shape, lo, hi))
        y = common.masked_rows(y, common.rows_in(row0, y.shape, lo, hi))
        return acc + tiling.dot(x, y, tiling.TN_DIMS)
      acc = lax.cond(class_ref[item] == size_class, chunk, lambda acc: acc, acc)
    return acc

  acc = lax.fori_loop(first_item_ref[group], first_item_ref[group + 1], item_step,
                      jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs, grad, starts, ends, *, tiles: common.Tiles, out_dtype, interpret=False):
  """lhs [m, k], grad [m, n], all tile multiples -> [G, k, n] (G = len(starts))."""
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = starts.shape[0]
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  chunks = tgmm_schedule(starts, ends, m=m, block_m=bm)
  metadata = (chunks.first_item, chunks.row0, chunks.size_class, chunks.lo, chunks.hi)
  whole = lambda x: pl.BlockSpec(x.shape, lambda g, i, j: (0,) * x.ndim)
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, sizes=chunks.sizes),
      grid=(num_groups, k // bk, n // bn),
      in_specs=[whole(x) for x in metadata] + [
          pl.BlockSpec((m, bk), lambda g, i, j: (0, i)),
          pl.BlockSpec((m, bn), lambda g, i, j: (0, j))],
      out_specs=pl.BlockSpec((_S, bk, bn), lambda g, i, j: (g, i, j)),
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      compiler_params=_params(bk * bn, interpret),
      interpret=interpret,
      cost_estimate=common.cost_estimate(m, k, n, (lhs, grad),
                                         jax.ShapeDtypeStruct((num_groups, k, n), out_dtype)),
      name="effjax_tgmm",
  )(*metadata, lhs, grad)
