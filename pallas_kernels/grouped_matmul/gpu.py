"""Grouped matmul as Triton-style `pallas_call`s (GPU): gmm (forward and input gradient), tgmm.

Inputs reach these functions padded by api.py to tile multiples (rows, contraction, columns),
with the shard's group bounds (common.local_group_bounds) as int32 vectors.

  gmm   grid (row tiles, column tiles). A program owns one [block_m, block_n] output tile and
        loops over the local groups that own rows of it (common.tile_group_range: usually one,
        more where group boundaries fall inside the tile); per group it runs the k loop against
        that group's weights and keeps the rows of that group. Rows of no local group stay
        zero. Each output tile is written once, by one program: no atomics, no masked stores.
  tgmm  grid (groups, k tiles, n tiles). A program owns out[g, k tile, n tile] and loops over
        the row tiles of group g, masking rows of other groups in both operands. An empty
        group loops zero times and writes zeros.
Group bounds and per-tile ranges are read as scalars inside the programs (Triton has no scalar
prefetch); the operands are passed as whole-axis blocks and sliced with pl.ds.

Status: checked against the reference in Pallas's interpreter and lowered for "cuda" on a CPU
(Triton IR); not yet compiled and timed on a GPU (experiments/bench_gmm.py does both).
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
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


def _gmm_kernel(first_group_ref, stop_group_ref, starts_ref, ends_ref, lhs_ref, rhs_ref,
                out_ref, *, tiles: common.Tiles, num_k_tiles: int, transpose_rhs: bool):
  row_tile = pl.program_id(0)
  bm, bk = tiles.block_m, tiles.block_k
  dims = tiling.NT_DIMS if transpose_rhs else tiling.NN_DIMS

  def one_group(group, out):
    start, end = starts_ref[group], ends_ref[group]

    def k_step(kt, acc):
      cols = pl.ds(pl.multiple_of(kt * bk, bk), bk)
      w = rhs_ref[group, :, cols] if transpose_rhs else rhs_ref[group, cols, :]
      return acc + tiling.dot(lhs_ref[:, cols], w, dims)

    def product():
      acc = lax.fori_loop(0, num_k_tiles, k_step, jnp.zeros(out.shape, jnp.float32))
      return jnp.where(common.rows_in(row_tile * bm, acc.shape, start, end), acc, out)

    return lax.cond(end > start, product, lambda: out)

  out = lax.fori_loop(first_group_ref[row_tile], stop_group_ref[row_tile], one_group,
                      jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = out.astype(out_ref.dtype)


def gmm(lhs, rhs, starts, ends, *, tiles: common.Tiles, transpose_rhs: bool, out_dtype,
        interpret=False):
  """lhs [m, k], rhs [G, k, n] ([G, n, k] transposed), all tile multiples -> [m, n]."""
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  num_row_tiles = m // bm
  first_group, stop_group = common.tile_group_range(starts, ends, bm, num_row_tiles)
  if transpose_rhs:
    rhs_spec = pl.BlockSpec((num_groups, bn, k), lambda i, j: (0, j, 0))
  else:
    rhs_spec = pl.BlockSpec((num_groups, k, bn), lambda i, j: (0, 0, j))
  whole = lambda x: pl.BlockSpec(x.shape, lambda i, j: (0,) * x.ndim)
  kernel = functools.partial(_gmm_kernel, tiles=tiles, num_k_tiles=k // bk,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      grid=(num_row_tiles, n // bn),
      in_specs=[whole(first_group), whole(stop_group), whole(starts), whole(ends),
                pl.BlockSpec((bm, k), lambda i, j: (i, 0)), rhs_spec],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      compiler_params=_params(bm * bn, interpret),
      interpret=interpret,
      name="effjax_gmm",
  )(first_group, stop_group, starts, ends, lhs, rhs)


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref, *, block_m: int):
  group = pl.program_id(0)
  start, end = starts_ref[group], ends_ref[group]
  first_tile = start // block_m
  stop_tile = jnp.where(end > start, tiling.cdiv(end, block_m), first_tile)

  def row_step(t, acc):
    rows = pl.ds(pl.multiple_of(t * block_m, block_m), block_m)
    x, y = lhs_ref[rows, :], grad_ref[rows, :]
    x = common.masked_rows(x, common.rows_in(t * block_m, x.shape, start, end))
    y = common.masked_rows(y, common.rows_in(t * block_m, y.shape, start, end))
    return acc + tiling.dot(x, y, tiling.TN_DIMS)

  acc = lax.fori_loop(first_tile, stop_tile, row_step, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs, grad, starts, ends, *, tiles: common.Tiles, out_dtype, interpret=False):
  """lhs [m, k], grad [m, n], all tile multiples -> [G, k, n] (G = len(starts))."""
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = starts.shape[0]
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  whole = lambda x: pl.BlockSpec(x.shape, lambda g, i, j: (0,) * x.ndim)
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, block_m=bm),
      grid=(num_groups, k // bk, n // bn),
      in_specs=[whole(starts), whole(ends),
                pl.BlockSpec((m, bk), lambda g, i, j: (0, i)),
                pl.BlockSpec((m, bn), lambda g, i, j: (0, j))],
      out_specs=pl.BlockSpec((_S, bk, bn), lambda g, i, j: (g, i, j)),
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      compiler_params=_params(bk * bn, interpret),
      interpret=interpret,
      name="effjax_tgmm",
  )(starts, ends, lhs, grad)
