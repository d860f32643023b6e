"""Grouped matmul as Mosaic GPU kernels (Hopper, sm90a): gmm (forward and input gradient), tgmm.

Inputs reach these functions padded by api.py to tile multiples, with the shard's group bounds
(common.local_group_bounds) as int32 vectors. Operands stay in GMEM; each kernel streams its
tiles into a multi-stage shared-memory pipeline (plgpu.emit_pipeline: TMA copies, one barrier
per stage) and multiplies them with wgmma into a float32 accumulator.

  gmm   grid (row tiles, column tiles). A block owns one [block_m, block_n] output tile and
        loops over the local groups that own rows of it (common.tile_group_range); per group
        it runs the k pipeline against that group's weights and keeps that group's rows (a
        select in registers). Rows of no local group stay zero. The tile is written once, by
        one block, through SMEM and a TMA store: no atomics, no partial-row stores.
  tgmm  grid (groups, k tiles, n tiles). A block owns out[g, k tile, n tile] and pipelines
        over the row tiles of group g only (a dynamic trip count); in the first and last tile,
        rows of other groups are zeroed in SMEM (both operands, so a NaN there cannot leak)
        before wgmma reads them. An empty group runs no step and writes zeros.

Operands are bf16/fp16 only: wgmma on float32 operands computes in tf32, which would be a
silent loss of precision. Tiles are multiples of 64 (a warpgroup's wgmma rows).

Boundary cost: unlike the Triton kernels (row chunks aligned to each group), gmm here still
runs a whole [block_m, block_n] tile over all of k once per group the tile holds: about
1 + (G - 1) block_m / m times the useful MACs (work.py counts it: 1.9x at 64 random groups of
m = 8192, 4.9x at 256). tgmm likewise visits each (group, row tile) pair.

Status: checked against the reference in Mosaic GPU's interpreter (with its race detector)
on JAX >= 0.12 and lowered for an abstract H100 on 0.10.2 and 0.12; not yet compiled or timed
on a GPU (experiments/bench_gmm.py does both).
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels import tiling
from pallas_kernels.grouped_matmul import common

TILE_MULTIPLE = 64
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Pipeline depth (SMEM stages); delay_release=1 keeps a stage alive while its wgmma may still
# read it, so a step overlaps one wgmma with the TMA loads of the next stages.
_STAGES = 3


def _params():
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _rows_mask(first_row, shape, start, end):
  rows = first_row + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  return (rows >= start) & (rows < end)


def _store_tile(value, out_gmem_tile):
  """value (registers) -> SMEM -> out_gmem_tile by TMA; waits until SMEM may be reused."""
  def scope(out_smem):
    out_smem[...] = value.astype(out_smem.dtype)
    plgpu.commit_smem()  # make the register writes visible to the TMA unit
    plgpu.copy_smem_to_gmem(out_smem, out_gmem_tile)
    plgpu.wait_smem_to_gmem(0)
  pl.run_scoped(scope, plgpu.SMEM(out_gmem_tile.shape, out_gmem_tile.dtype))


def _gmm_kernel(first_group_gmem, stop_group_gmem, starts_gmem, ends_gmem, lhs_gmem, rhs_gmem,
                out_gmem, *, tiles: common.Tiles, transpose_rhs: bool):
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  row_tile, col_tile = lax.axis_index("m"), lax.axis_index("n")
  num_k_tiles = lhs_gmem.shape[1] // bk
  rhs_block = (bn, bk) if transpose_rhs else (bk, bn)
  rhs_index = (lambda kt: (col_tile, kt)) if transpose_rhs else (lambda kt: (kt, col_tile))

  def group_product(group):
    """lhs row tile @ rhs[group] over the whole contraction, float32 in registers."""
    def acc_scope(acc_ref):
      def step(_, lhs_smem, rhs_smem):
        w = compat.transposed_ref(rhs_smem) if transpose_rhs else rhs_smem
        plgpu.wgmma(acc_ref, lhs_smem, w)
        plgpu.wgmma_wait(1)  # at most one wgmma in flight: the stage before is free again

      plgpu.emit_pipeline(
          step, grid=(num_k_tiles,),
          in_specs=[plgpu.BlockSpec((bm, bk), lambda kt: (row_tile, kt), delay_release=1),
                    plgpu.BlockSpec(rhs_block, rhs_index, delay_release=1)],
          max_concurrent_steps=_STAGES)(lhs_gmem, rhs_gmem.at[group])
      return acc_ref[...]
    return pl.run_scoped(acc_scope, plgpu.ACC((bm, bn), jnp.float32))

  def one_group(group, out):
    start, end = starts_gmem[group], ends_gmem[group]
    keep = lambda: jnp.where(_rows_mask(row_tile * bm, (bm, bn), start, end),
                             group_product(group), out)
    return lax.cond(end > start, keep, lambda: out)

  zeros = plgpu.layout_cast(jnp.zeros((bm, bn), jnp.float32), plgpu.Layout.WGMMA)
  out = lax.fori_loop(first_group_gmem[row_tile], stop_group_gmem[row_tile], one_group, zeros)
  _store_tile(out, out_gmem.at[pl.ds(row_tile * bm, bm), pl.ds(col_tile * bn, bn)])


def _check(name: str, tiles: common.Tiles, dtype):
  if jnp.dtype(dtype) not in DTYPES:
    raise NotImplementedError(
        f"Mosaic GPU {name} takes bfloat16/float16 operands, got {jnp.dtype(dtype)} (wgmma "
        "computes float32 operands in tf32); use implementation='gpu' or 'ragged_dot'")
  for field in ("block_m", "block_k", "block_n"):
    value = getattr(tiles, field)
    if value % TILE_MULTIPLE:
      raise ValueError(f"Mosaic GPU tiles must be multiples of {TILE_MULTIPLE}, got "
                       f"Tiles.{field}={value}")


def gmm(lhs, rhs, starts, ends, *, tiles: common.Tiles, transpose_rhs: bool, out_dtype,
        interpret=False):
  """lhs [m, k], rhs [G, k, n] ([G, n, k] transposed), all tile multiples -> [m, n]."""
  _check("gmm", tiles, lhs.dtype)
  m, _ = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  bm, bn = tiles.block_m, tiles.block_n
  first_group, stop_group = common.tile_group_range(starts, ends, bm, m // bm)
  kernel = functools.partial(_gmm_kernel, tiles=tiles, transpose_rhs=transpose_rhs)
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(m // bm, n // bn),
      grid_names=("m", "n"), compiler_params=_params(), interpret=interpret or None,
  )(first_group, stop_group, starts, ends, lhs, rhs)


def _tgmm_kernel(starts_gmem, ends_gmem, lhs_gmem, grad_gmem, out_gmem, *, tiles: common.Tiles):
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  group, k_tile, n_tile = lax.axis_index("g"), lax.axis_index("k"), lax.axis_index("n")
  start, end = starts_gmem[group], ends_gmem[group]
  first_tile = start // bm
  num_tiles = jnp.where(end > start, tiling.cdiv(end, bm) - first_tile, 0)

  def acc_scope(acc_ref):
    def step(indices, lhs_smem, grad_smem):
      row0 = (first_tile + indices[0]) * bm

      # Only a tile that a group boundary cuts holds rows of other groups.
      @pl.when((row0 < start) | (row0 + bm > end))
      def _():
        for ref in (lhs_smem, grad_smem):
          ref[...] = jnp.where(_rows_mask(row0, ref.shape, start, end), ref[...],
                               jnp.zeros((), ref.dtype))
        plgpu.commit_smem()  # the masked tile must be what wgmma (async proxy) reads

      plgpu.wgmma(acc_ref, compat.transposed_ref(lhs_smem), grad_smem)
      plgpu.wgmma_wait(1)  # at most one wgmma in flight: the stage before is free again

    plgpu.emit_pipeline(
        step, grid=(num_tiles,),
        in_specs=[plgpu.BlockSpec((bm, bk), lambda t: (first_tile + t, k_tile), delay_release=1),
                  plgpu.BlockSpec((bm, bn), lambda t: (first_tile + t, n_tile), delay_release=1)],
        max_concurrent_steps=_STAGES)(lhs_gmem, grad_gmem)
    return acc_ref[...]

  acc = pl.run_scoped(acc_scope, plgpu.ACC((bk, bn), jnp.float32))
  _store_tile(acc, out_gmem.at[group, pl.ds(k_tile * bk, bk), pl.ds(n_tile * bn, bn)])


def tgmm(lhs, grad, starts, ends, *, tiles: common.Tiles, out_dtype, interpret=False):
  """lhs [m, k], grad [m, n], all tile multiples -> [G, k, n] (G = len(starts))."""
  _check("tgmm", tiles, lhs.dtype)
  k, n = lhs.shape[1], grad.shape[1]
  num_groups = starts.shape[0]
  return plgpu.kernel(
      functools.partial(_tgmm_kernel, tiles=tiles),
      out_type=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid=(num_groups, k // tiles.block_k, n // tiles.block_n), grid_names=("g", "k", "n"),
      compiler_params=_params(), interpret=interpret or None,
  )(starts, ends, lhs, grad)
