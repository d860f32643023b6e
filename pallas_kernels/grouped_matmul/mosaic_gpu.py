"""Grouped matmul as Mosaic GPU kernels (Hopper, sm90a): gmm (forward and input gradient), tgmm.

Inputs reach these functions padded by api.py to tile multiples, with the shard's group bounds
(common.local_group_bounds) as int32 vectors. Operands stay in GMEM; each kernel streams its
tiles into a multi-stage shared-memory pipeline (plgpu.emit_pipeline: TMA copies, one barrier
per stage) and multiplies them with wgmma into a float32 accumulator.

  gmm   grid (items, column tiles). Items are row chunks aligned to the groups
        (common.segment_row_chunks): a group's rows, rounded out to multiples of 8, as chunks
        of block_m, block_m / 2, ..., 8 rows, each starting at a multiple of 8 (the TMA of a
        swizzled tile needs that). The token rows are wgmma's N side (any multiple of 8) and
        the weights its 64-row side: the program computes out[chunk, col tile].T =
        w[:, col tile].T @ lhs[chunk].T over the k pipeline, then stores only the rows it owns
        (neighbouring chunks share up to 7 rows), as one TMA box per set bit of the row count.
        Items of the rows outside the shard's groups store zeros: every row is written once,
        by one program, with no atomics. JAX before 0.11.2 cannot lower the transposed store
        (chunked_gmm), so there gmm keeps its older schedule: grid (row tiles, column tiles),
        each program looping over the groups that own rows of its tile, a whole tile over k
        per group, keeping that group's rows.
  tgmm  grid (groups, k tiles, n tiles). A block owns out[g, k tile, n tile] and contracts
        its group's span (tgmm_spans): from the group's start rounded down to 8 rows, a
        multiple of 16 rows (wgmma's k step) long; a pipeline over the span's block_m-row
        tiles (a dynamic trip count), then one chunk per set bit of the rest (block_m / 2,
        ..., 16 rows). In a tile or chunk that a group boundary cuts, rows of other groups are
        zeroed in SMEM (both operands, so a NaN there cannot leak) before wgmma reads them. An
        empty group runs no step and writes zeros.

Operands are bf16/fp16 only: wgmma on float32 operands computes in tf32, which would be a
silent loss of precision. Tiles are multiples of 64; gmm's block_m is 64, 128 or 256 (the
chunk heights halve down to 8 and wgmma's N is at most 256).

Boundary cost (work.py counts it; m = 8192, random routing): gmm issues each group's rows
rounded out to 8, 1.006x / 1.051x / 1.220x the useful MACs at 8 / 64 / 256 groups (the
per-tile loop: 1.09x / 1.92x / 4.92x); tgmm's spans 1.010x / 1.088x / 1.357x (whole 64-row
tiles per group: 1.05x / 1.46x / 2.96x).

Status: both gmm schedules and tgmm checked against the reference in Mosaic GPU's interpreter
(with its race detector) on JAX >= 0.12; lowered for an abstract H100 on 0.10.2 (the tile
loop), 0.11.2 and 0.12; not yet compiled or timed on a GPU (experiments/bench_gmm.py does
both).
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import fragmented_array
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
# gmm puts token rows on wgmma's N side (multiples of 8), so a chunk is 8 rows at the least,
# not a warpgroup's 64; chunks start at multiples of 8 rows (the TMA of a swizzled tile).
MIN_ROWS = 8
TGMM_ROWS = 16  # tgmm contracts the rows: wgmma's k step for 16-bit operands
# tgmm's 16- and 32-row chunks: swizzled 32 bytes wide, the swizzle whose wgmma k step is 16
# rows (128 bytes, the default, steps by 64), and masked in registers in a layout for 16-row
# tiles (WGMMA's needs 64): each warp holds an 8-column strip of every 16 x 32 tile, in
# WGMMA's 8 x 8 cores.
_CHUNK_TRANSFORMS = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))
_CHUNK_LAYOUT = plgpu.Layout.TILED(
    fragmented_array.Tiling(((16, 32), (16, 8), (8, 8), (2,))), warp_dims=(-6,),
    lane_dims=(-3, -2), vector_dim=-1)
GMM_BLOCK_M = (64, 128, 256)  # powers of two (the chunk heights halve) within wgmma's N <= 256


def _params():
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _rows_mask(first_row, shape, start, end, layout=plgpu.Layout.WGMMA):
  rows = first_row + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=layout)
  return (rows >= start) & (rows < end)


def _store_tile(value, out_gmem_tile):
  """value (registers) -> SMEM -> out_gmem_tile by TMA; waits until SMEM may be reused."""
  def scope(out_smem):
    out_smem[...] = value.astype(out_smem.dtype)
    plgpu.commit_smem()  # make the register writes visible to the TMA unit
    plgpu.copy_smem_to_gmem(out_smem, out_gmem_tile)
    plgpu.wait_smem_to_gmem(0)
  pl.run_scoped(scope, plgpu.SMEM(out_gmem_tile.shape, out_gmem_tile.dtype))


def gmm_schedule(starts, ends, *, m: int, block_m: int) -> common.RowChunks:
  """gmm's work items: 8-row-aligned row chunks (block_m, block_m / 2, ..., 8 rows) of
  segment 0 (rows before the shard's groups), the groups and segment G + 1 (rows after them);
  the zero segments' items store zeros."""
  return common.segment_row_chunks(starts, ends, num_rows=m, block_m=block_m,
                                   min_rows=MIN_ROWS, align=MIN_ROWS)


def _store_owned_rows(value_t, out_gmem, row0, lo, hi, col0):
  """Rows [lo, hi) of value_t.T (value_t: [cols, rows] in registers; rows row0, row0 + 1, ...)
  -> out_gmem[:, col0 : col0 + cols]; no other row is written.

  TMA boxes have static shapes, so the owned rows go out as one box per set bit of hi - lo
  (rows, rows / 2, ..., 1 rows) from a dynamic SMEM offset. The transposed register store
  needs a swizzled SMEM tile (at least 64 rows) and a box at any row needs an unswizzled one,
  so the tile is written to the first and copied to the second."""
  cols, rows = value_t.shape
  height = max(rows, TILE_MULTIPLE)

  def scope(swizzled, plain):
    compat.transposed_ref(swizzled.at[pl.ds(0, rows)])[...] = value_t.astype(swizzled.dtype)
    plain[...] = swizzled[...]
    plgpu.commit_smem()  # make the register writes visible to the TMA unit
    count, offset, size = jnp.maximum(hi - lo, 0), lo - row0, rows
    while size:
      @pl.when((count & size) != 0)
      def _(size=size, offset=offset):
        plgpu.copy_smem_to_gmem(plain.at[pl.ds(offset, size)],
                                out_gmem.at[pl.ds(row0 + offset, size), pl.ds(col0, cols)])
      offset = offset + (count & size)
      size //= 2
    plgpu.wait_smem_to_gmem(0)
  pl.run_scoped(scope, plgpu.SMEM((height, cols), out_gmem.dtype),
                plgpu.SMEM((height, cols), out_gmem.dtype))


def _gmm_chunk_kernel(segment_gmem, row0_gmem, class_gmem, lo_gmem, hi_gmem, num_items_gmem,
                      lhs_gmem, rhs_gmem, out_gmem, *, sizes: tuple[int, ...],
                      tiles: common.Tiles, num_groups: int, transpose_rhs: bool):
  bk, bn = tiles.block_k, tiles.block_n
  item, col_tile = lax.axis_index("m"), lax.axis_index("n")
  num_k_tiles = lhs_gmem.shape[1] // bk
  rhs_block = (bn, bk) if transpose_rhs else (bk, bn)
  rhs_index = (lambda kt: (col_tile, kt)) if transpose_rhs else (lambda kt: (kt, col_tile))
  segment, row0 = segment_gmem[item], pl.multiple_of(row0_gmem[item], MIN_ROWS)
  group = jnp.clip(segment - 1, 0, num_groups - 1)
  is_group = (segment > 0) & (segment <= num_groups)

  def chunk_product(rows):
    """out[row0 : row0 + rows, col tile].T = w[group][:, col tile].T @ lhs[chunk].T: the
    weights are wgmma's 64-row side, the chunk's rows its N side; float32 in registers."""
    def acc_scope(acc_ref):
      def step(_, lhs_smem, rhs_smem):
        w_t = rhs_smem if transpose_rhs else compat.transposed_ref(rhs_smem)
        plgpu.wgmma(acc_ref, w_t, compat.transposed_ref(lhs_smem))
        plgpu.wgmma_wait(1)  # at most one wgmma in flight: the stage before is free again

      plgpu.emit_pipeline(
          step, grid=(num_k_tiles,),
          in_specs=[plgpu.BlockSpec((rows, bk), lambda kt: (0, kt), delay_release=1),
                    plgpu.BlockSpec(rhs_block, rhs_index, delay_release=1)],
          max_concurrent_steps=_STAGES)(lhs_gmem.at[pl.ds(row0, rows)], rhs_gmem.at[group])
      return acc_ref[...]
    return pl.run_scoped(acc_scope, plgpu.ACC((bn, rows), jnp.float32))

  for size_class, rows in enumerate(sizes):
    @pl.when((item < num_items_gmem[0]) & (class_gmem[item] == size_class))
    def _(rows=rows):
      zeros = plgpu.layout_cast(jnp.zeros((bn, rows), jnp.float32), plgpu.Layout.WGMMA)
      acc_t = lax.cond(is_group, lambda: chunk_product(rows), lambda: zeros)
      _store_owned_rows(acc_t, out_gmem, row0, lo_gmem[item], hi_gmem[item], col_tile * bn)


def _gmm_tile_kernel(first_group_gmem, stop_group_gmem, starts_gmem, ends_gmem, lhs_gmem,
                     rhs_gmem, out_gmem, *, tiles: common.Tiles, transpose_rhs: bool):
  """Older JAX (see chunked_gmm): a [block_m, block_n] output tile per program, the k loop run
  once per local group that owns rows of it, keeping that group's rows."""
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


def chunked_gmm() -> bool:
  """Whether gmm runs on group-aligned row chunks (else the per-tile loop over groups): the
  chunks' transposed register store lowers on jax 0.11.2 and 0.12 (0.10.2's layout inference
  rejects it; no version in between was tried)."""
  return compat.jax_version() >= (0, 11, 2)


def gmm(lhs, rhs, starts, ends, *, tiles: common.Tiles, transpose_rhs: bool, out_dtype,
        interpret=False):
  """lhs [m, k], rhs [G, k, n] ([G, n, k] transposed), all tile multiples -> [m, n]."""
  _check("gmm", tiles, lhs.dtype)
  m, _ = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if chunked_gmm():
    if tiles.block_m not in GMM_BLOCK_M:
      raise ValueError(f"Mosaic GPU gmm's block_m is a chunk's row count on wgmma's N side: "
                       f"one of {GMM_BLOCK_M}, got Tiles.block_m={tiles.block_m}")
    chunks = gmm_schedule(starts, ends, m=m, block_m=tiles.block_m)
    kernel = functools.partial(_gmm_chunk_kernel, sizes=chunks.sizes, tiles=tiles,
                               num_groups=num_groups, transpose_rhs=transpose_rhs)
    grid, operands = (chunks.max_items, n // tiles.block_n), (
        chunks.segment, chunks.row0, chunks.size_class, chunks.lo, chunks.hi, chunks.num_items)
  else:
    kernel = functools.partial(_gmm_tile_kernel, tiles=tiles, transpose_rhs=transpose_rhs)
    grid = (m // tiles.block_m, n // tiles.block_n)
    operands = (*common.tile_group_range(starts, ends, tiles.block_m, grid[0]), starts, ends)
  out_type = jax.ShapeDtypeStruct((m, n), out_dtype)
  return plgpu.kernel(
      kernel, out_type=out_type, grid=grid, grid_names=("m", "n"), compiler_params=_params(),
      interpret=interpret or None,
      **compat.mosaic_gpu_cost(common.cost_estimate(m, lhs.shape[1], n, (lhs, rhs), out_type)),
  )(*operands, lhs, rhs)


def tgmm_spans(starts, ends, *, m: int):
  """Per group, the rows tgmm contracts, (first, rows): [first, first + rows) covers the
  group's rows [start, end), first a multiple of 8 (MIN_ROWS: a swizzled tile's TMA) and rows
  a multiple of 16 (TGMM_ROWS: wgmma's k step for 16-bit operands). Where the span would pass
  m (a multiple of 64) it starts 8 rows earlier instead. Empty groups: rows 0."""
  first = starts // MIN_ROWS * MIN_ROWS
  rows = tiling.cdiv(tiling.cdiv(ends, MIN_ROWS) * MIN_ROWS - first, TGMM_ROWS) * TGMM_ROWS
  first = jnp.where(first + rows > m, first - MIN_ROWS, first)
  return first.astype(jnp.int32), jnp.where(ends > starts, rows, 0).astype(jnp.int32)


def tgmm_chunk_sizes(block_m: int) -> tuple[int, ...]:
  """The chunk heights after a span's block_m-row tiles: the powers of two from 16 below
  block_m, largest first. The rest (a multiple of 16, under block_m) is one chunk per set bit,
  also when block_m is not a power of two (192: 128, 64, 32, 16)."""
  sizes, size = [], TGMM_ROWS
  while size < block_m:
    sizes.append(size)
    size *= 2
  return tuple(reversed(sizes))


def tgmm_steps(rows, block_m: int):
  """Pipeline steps of a span of `rows` (a multiple of 16): its block_m-row tiles, then one
  chunk per set bit of the rest."""
  rest = rows % block_m
  return rows // block_m + sum((rest & size) != 0 for size in tgmm_chunk_sizes(block_m))


def _tgmm_kernel(starts_gmem, ends_gmem, first_gmem, rows_gmem, lhs_gmem, grad_gmem, out_gmem,
                 *, tiles: common.Tiles):
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  group, k_tile, n_tile = lax.axis_index("g"), lax.axis_index("k"), lax.axis_index("n")
  start, end = starts_gmem[group], ends_gmem[group]
  first, rows = pl.multiple_of(first_gmem[group], MIN_ROWS), rows_gmem[group]

  def acc_scope(acc_ref):
    def contract(row0, lhs_smem, grad_smem):
      height = lhs_smem.shape[0]

      # Only a tile that a group boundary cuts holds rows of other groups.
      @pl.when((row0 < start) | (row0 + height > end))
      def _():
        layout = plgpu.Layout.WGMMA if height % TILE_MULTIPLE == 0 else _CHUNK_LAYOUT
        for ref in (lhs_smem, grad_smem):
          ref[...] = jnp.where(_rows_mask(row0, ref.shape, start, end, layout), ref[...],
                               jnp.zeros((), ref.dtype))
        plgpu.commit_smem()  # the masked tile must be what wgmma (async proxy) reads

      plgpu.wgmma(acc_ref, compat.transposed_ref(lhs_smem), grad_smem)
      plgpu.wgmma_wait(1)  # at most one wgmma in flight: the stage before is free again

    def pipeline(height, row0_of_step, num_steps):
      row0 = lambda t: pl.multiple_of(row0_of_step(t), MIN_ROWS)
      # wgmma contracts in steps of the swizzle's width: 64 rows at 128 bytes, 16 at 32
      swizzle = () if height % TILE_MULTIPLE == 0 else _CHUNK_TRANSFORMS
      plgpu.emit_pipeline(
          lambda indices, lhs_smem, grad_smem: contract(row0(indices[0]), lhs_smem, grad_smem),
          grid=(num_steps,),
          in_specs=[plgpu.BlockSpec((pl.Element(height), bk), lambda t: (row0(t), k_tile),
                                    transforms=swizzle, delay_release=1),
                    plgpu.BlockSpec((pl.Element(height), bn), lambda t: (row0(t), n_tile),
                                    transforms=swizzle, delay_release=1)],
          max_concurrent_steps=_STAGES)(lhs_gmem, grad_gmem)
      plgpu.wgmma_wait(0)  # the pipeline's stages are freed: no wgmma may still read them

    pipeline(bm, lambda t: first + t * bm, rows // bm)  # the span's whole block_m tiles
    rest, offset = rows % bm, first + rows // bm * bm
    for size in tgmm_chunk_sizes(bm):  # the rest (a multiple of 16 rows): a chunk per set bit
      @pl.when((rest & size) != 0)
      def _(size=size, offset=offset):
        pipeline(size, lambda _: offset, 1)
      offset = offset + (rest & size)
    return acc_ref[...]

  acc = pl.run_scoped(acc_scope, plgpu.ACC((bk, bn), jnp.float32))
  _store_tile(acc, out_gmem.at[group, pl.ds(k_tile * bk, bk), pl.ds(n_tile * bn, bn)])


def tgmm(lhs, grad, starts, ends, *, tiles: common.Tiles, out_dtype, interpret=False):
  """lhs [m, k], grad [m, n], all tile multiples -> [G, k, n] (G = len(starts))."""
  _check("tgmm", tiles, lhs.dtype)
  k, n = lhs.shape[1], grad.shape[1]
  num_groups = starts.shape[0]
  first, rows = tgmm_spans(starts, ends, m=lhs.shape[0])
  out_type = jax.ShapeDtypeStruct((num_groups, k, n), out_dtype)
  return plgpu.kernel(
      functools.partial(_tgmm_kernel, tiles=tiles), out_type=out_type,
      grid=(num_groups, k // tiles.block_k, n // tiles.block_n), grid_names=("g", "k", "n"),
      compiler_params=_params(), interpret=interpret or None,
      **compat.mosaic_gpu_cost(common.cost_estimate(lhs.shape[0], k, n, (lhs, grad),
                                                    out_type)),
  )(starts, ends, first, rows, lhs, grad)
