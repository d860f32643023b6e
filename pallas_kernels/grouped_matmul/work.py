"""Work counter: what each grouped-matmul kernel schedules, counted on the host, next to the ideal.

gmm_work / tgmm_work / direction_work take the shapes, the group sizes and the tiles, pick the
tiles and padding exactly as api.py does (api.fit_tiles), build the kernel's own schedule
(the metadata functions its pallas_call uses) and count what that schedule issues:

  tiles      MMA tile products issued ([block_m, block_k] x [block_k, block_n] steps)
  macs       multiply-accumulates issued: tiles x their rows x block_k x block_n (padded and
             masked rows included: a row tile computed once per group it holds counts once
             per group)
  bytes      operand blocks loaded plus output blocks stored by the kernel. GPU kernels: every
             block a program loads (cache hits not modelled). TPU kernels: the Pallas pipeline
             fetches a block only when its index differs from the previous grid step's, so the
             counter walks the kernel's index maps over the grid and counts changes.
  pad_bytes  the copies api.py makes around the kernel: operands padded up to tile multiples
             on every call (read + write) and the padded output sliced back.
  ideal      the useful products, rows in local groups x k x n, and each operand read once
             (weights of groups with rows only) and the output written once.

One itemsize for every array (the operands'; outputs in a wider dtype are undercounted).
Nothing here runs a kernel: the counts are plain integers for a benchmark column or a test.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.grouped_matmul import api
from pallas_kernels.grouped_matmul import common

KERNEL_IMPLEMENTATIONS = ("gpu", "mosaic_gpu", "tpu")
DIRECTIONS = ("fwd", "dlhs", "drhs")


@dataclasses.dataclass(frozen=True)
class Work:
  tiles: int
  macs: int
  bytes: int
  pad_bytes: int
  ideal_macs: int
  ideal_bytes: int

  @property
  def mac_ratio(self) -> float:
    return self.macs / self.ideal_macs if self.ideal_macs else float("inf")

  @property
  def byte_ratio(self) -> float:
    moved = self.bytes + self.pad_bytes
    return moved / self.ideal_bytes if self.ideal_bytes else float("inf")


def _check(implementation: str):
  if implementation not in KERNEL_IMPLEMENTATIONS:
    raise ValueError(f"work is counted for the kernels {list(KERNEL_IMPLEMENTATIONS)}, got "
                     f"implementation={implementation!r}")


def _bounds(group_sizes, group_offset, num_local: int, m: int):
  sizes = jnp.asarray(np.asarray(group_sizes, np.int32))
  offset = None if group_offset is None else jnp.asarray(group_offset, jnp.int32)
  starts, ends = common.local_group_bounds(sizes, offset, num_local, m)
  return starts, ends


def _dtype(itemsize: int):
  """The operand dtype the kernels see, from its size (granularity depends only on it)."""
  return {2: jnp.bfloat16, 4: jnp.float32}[itemsize]


def _pad_copy(shape, padded_shape) -> int:
  """Elements moved by padding an array of `shape` to `padded_shape` (read + write; 0 if equal)."""
  if tuple(shape) == tuple(padded_shape):
    return 0
  return int(np.prod(shape)) + int(np.prod(padded_shape))


def _fetches(indices: list[np.ndarray]) -> int:
  """Grid steps (in order) at which a block's index differs from the step before: fetches."""
  stacked = np.stack([np.broadcast_to(np.asarray(i), np.shape(indices[0])) for i in indices])
  changed = np.any(stacked[:, 1:] != stacked[:, :-1], axis=0)
  return 1 + int(changed.sum())


def _jit(schedule_fn, **static):
  """schedule_fn with its static arguments bound, compiled (eager op-by-op dispatch of the
  metadata code costs seconds of compilation per new shape); one jit per binding."""
  return _cached_jit(schedule_fn, tuple(sorted(static.items())))


@functools.lru_cache(maxsize=None)
def _cached_jit(schedule_fn, static):
  return jax.jit(functools.partial(schedule_fn, **dict(static)))


@functools.lru_cache(maxsize=None)
def _index_evaluator(index_maps_fn, args):
  index_maps = index_maps_fn(*args)
  return jax.jit(lambda grid, schedule: [index_map(*grid, *schedule)
                                         for index_map in index_maps])


def _blocks(index_maps_fn, args, grid_indices, schedule):
  """Each operand's block index at every grid step: the kernel's index maps
  (index_maps_fn(*args)), evaluated on the whole grid at once."""
  evaluate = _index_evaluator(index_maps_fn, args)
  return [[np.asarray(i) for i in block] for block in evaluate(grid_indices, schedule)]


def _grid(*sizes):
  """Grid indices in execution order (last axis fastest), each a flat int32 array."""
  return [jnp.asarray(a.ravel(), jnp.int32) for a in np.meshgrid(
      *[np.arange(s) for s in sizes], indexing="ij")]


def gmm_work(m: int, k: int, n: int, group_sizes, *, implementation: str, tiles: common.Tiles,
             transpose_rhs: bool = False, group_offset=None, num_local: int | None = None,
             itemsize: int = 2, interpret=False) -> Work:
  """Work of one gmm call out[m, n] = lhs[m, k] @ rhs[g] (the forward, or the input gradient
  with the forward's n as k)."""
  _check(implementation)
  sizes = np.asarray(group_sizes)
  num_local = len(sizes) if num_local is None else num_local
  fitted, (m_pad, k_pad, n_pad) = api.fit_tiles(implementation, interpret, tiles, m, k, n,
                                                 itemsize=itemsize)
  bm, bk, bn = fitted.block_m, fitted.block_k, fitted.block_n
  starts, ends = _bounds(sizes, group_offset, num_local, m)
  nonempty = np.asarray(ends > starts)
  rows = int(np.asarray(ends - starts).sum())
  k_tiles, n_tiles = k_pad // bk, n_pad // bn
  w_shape = (num_local, n, k) if transpose_rhs else (num_local, k, n)
  w_pad = (num_local, n_pad, k_pad) if transpose_rhs else (num_local, k_pad, n_pad)
  pad = (_pad_copy((m, k), (m_pad, k_pad)) + _pad_copy(w_shape, w_pad) +
         _pad_copy((m_pad, n_pad), (m, n)))
  ideal_macs = rows * k * n
  ideal_bytes = itemsize * (rows * k + int(nonempty.sum()) * k * n + m * n)

  from pallas_kernels.grouped_matmul import mosaic_gpu  # pylint: disable=g-import-not-at-top
  if implementation == "mosaic_gpu" and not mosaic_gpu.chunked_gmm():
    # One program per [block_m, block_n] output tile; it runs the whole k loop once per
    # nonempty local group in common.tile_group_range (the kernel's loop bounds).
    first, stop = (np.asarray(a) for a in common.tile_group_range(starts, ends, bm,
                                                                   m_pad // bm))
    group_visits = sum(int(nonempty[f:s].sum()) for f, s in zip(first, stop))
    steps = group_visits * k_tiles * n_tiles
    moved = steps * (bm * bk + bk * bn) + m_pad * n_pad
    return Work(steps, steps * bm * bk * bn, itemsize * moved, itemsize * pad, ideal_macs,
                ideal_bytes)

  if implementation in ("gpu", "mosaic_gpu"):
    # One program per (row-chunk item, n tile): the whole k loop on its chunk if the item is a
    # group's, then a store of the rows it owns (zero segments' items store zeros). Triton's
    # chunks are 16-row multiples from each group's start; Mosaic GPU's 8-row multiples from
    # 8-row-aligned starts.
    if implementation == "gpu":
      from pallas_kernels.grouped_matmul import gpu as kernel  # pylint: disable=g-import-not-at-top
    else:
      kernel = mosaic_gpu
    chunks = _jit(kernel.gmm_schedule, m=m_pad, block_m=bm)(starts, ends)
    real = np.arange(chunks.max_items) < int(chunks.num_items[0])
    segment = np.asarray(chunks.segment)
    rows = np.asarray(chunks.sizes)[np.asarray(chunks.size_class)]
    multiplies = real & (segment > 0) & (segment <= num_local)
    steps = int(multiplies.sum()) * k_tiles * n_tiles
    issued_rows = int(rows[multiplies].sum())
    owned = int(np.maximum(np.asarray(chunks.hi - chunks.lo), 0)[real].sum())
    moved = (issued_rows * k_tiles * n_tiles * bk + steps * bk * bn) + owned * n_pad
    return Work(steps, issued_rows * k_pad * n_pad, itemsize * moved, itemsize * pad,
                ideal_macs, ideal_bytes)

  from pallas_kernels.grouped_matmul import tpu  # pylint: disable=g-import-not-at-top
  schedule = _jit(tpu.gmm_schedule, m=m_pad, block_m=bm)(starts, ends)
  j, visit, kt = _grid(n_tiles, schedule[0].shape[0], k_tiles)
  lhs_block, rhs_block, out_block = _blocks(tpu.gmm_index_maps, (num_local, transpose_rhs),
                                            (j, visit, kt), schedule)
  segment_of_visit, tile_of_visit, seg_starts, seg_ends, num_visits = schedule
  _, rows_of_visit = tpu.visit_rows(  # the rows the kernel's _accumulate multiplies
      tile_of_visit * bm, seg_starts[segment_of_visit], seg_ends[segment_of_visit],
      block_m=bm, granularity=tpu.row_granularity(bm, _dtype(itemsize)))
  segment = np.asarray(segment_of_visit)[np.asarray(visit)]
  real = np.asarray(visit) < int(num_visits[0])
  multiplies = real & (segment > 0) & (segment < num_local + 1)
  steps = int(multiplies.sum())
  issued_rows = int(np.asarray(rows_of_visit)[np.asarray(visit)][multiplies].sum())
  moved = (_fetches(lhs_block) * bm * bk + _fetches(rhs_block) * bk * bn +
           _fetches(out_block) * bm * bn)
  return Work(steps, issued_rows * bk * bn, itemsize * moved, itemsize * pad, ideal_macs,
              ideal_bytes)


def tgmm_work(m: int, k: int, n: int, group_sizes, *, implementation: str, tiles: common.Tiles,
              group_offset=None, num_groups: int | None = None, itemsize: int = 2,
              interpret=False) -> Work:
  """Work of one tgmm call out[g] = lhs[rows of g].T @ grad[rows of g] -> [G, k, n]."""
  _check(implementation)
  sizes = np.asarray(group_sizes)
  num_groups = len(sizes) if num_groups is None else num_groups
  fitted, (m_pad, k_pad, n_pad) = api.fit_tiles(implementation, interpret, tiles, m, k, n,
                                                 itemsize=itemsize)
  bm, bk, bn = fitted.block_m, fitted.block_k, fitted.block_n
  starts, ends = _bounds(sizes, group_offset, num_groups, m)
  rows = int(np.asarray(ends - starts).sum())
  k_tiles, n_tiles = k_pad // bk, n_pad // bn
  pad = (_pad_copy((m, k), (m_pad, k_pad)) + _pad_copy((m, n), (m_pad, n_pad)) +
         _pad_copy((num_groups, k_pad, n_pad), (num_groups, k, n)))
  ideal_macs = rows * k * n
  ideal_bytes = itemsize * (rows * (k + n) + num_groups * k * n)

  if implementation == "gpu":
    # One program per (group, k tile, n tile); it loops over its group's row-chunk items.
    from pallas_kernels.grouped_matmul import gpu  # pylint: disable=g-import-not-at-top
    chunks = _jit(gpu.tgmm_schedule, m=m_pad, block_m=bm)(starts, ends)
    real = np.arange(chunks.max_items) < int(chunks.num_items[0])
    issued_rows = int(np.asarray(chunks.sizes)[np.asarray(chunks.size_class)][real].sum())
    steps = int(real.sum()) * k_tiles * n_tiles
    moved = issued_rows * k_tiles * n_tiles * (bk + bn) + num_groups * k_pad * n_pad
    return Work(steps, issued_rows * k_pad * n_pad, itemsize * moved, itemsize * pad,
                ideal_macs, ideal_bytes)

  if implementation == "mosaic_gpu":
    # One program per (group, k tile, n tile); it contracts its group's span (8-aligned start,
    # a multiple of 16 rows) in block_m-row tiles and one chunk per set bit of the rest.
    from pallas_kernels.grouped_matmul import mosaic_gpu  # pylint: disable=g-import-not-at-top
    _, span_rows = map(np.asarray, mosaic_gpu.tgmm_spans(starts, ends, m=m_pad))
    steps = int(np.sum(mosaic_gpu.tgmm_steps(span_rows, bm))) * k_tiles * n_tiles
    issued_rows = int(span_rows.sum())
    moved = issued_rows * k_tiles * n_tiles * (bk + bn) + num_groups * k_pad * n_pad
    return Work(steps, issued_rows * k_pad * n_pad, itemsize * moved, itemsize * pad,
                ideal_macs, ideal_bytes)

  from pallas_kernels.grouped_matmul import tpu  # pylint: disable=g-import-not-at-top
  schedule = _jit(tpu.tgmm_schedule, m=m_pad, block_m=bm)(starts, ends)
  group_of_visit, tile_of_visit, _, _, num_visits = schedule
  _, rows_of_visit = tpu.visit_rows(  # the rows the kernel's _accumulate contracts
      tile_of_visit * bm, starts[group_of_visit], ends[group_of_visit], block_m=bm,
      granularity=tpu.row_granularity(bm, _dtype(itemsize)))
  i, j, visit = _grid(k_tiles, n_tiles, group_of_visit.shape[0])
  lhs_block, grad_block, out_block = _blocks(tpu.tgmm_index_maps, (), (i, j, visit), schedule)
  real = np.asarray(visit) < int(num_visits[0])
  multiplies = real & (np.asarray(rows_of_visit)[np.asarray(visit)] > 0)
  steps = int(multiplies.sum())
  issued_rows = int(np.asarray(rows_of_visit)[np.asarray(visit)][multiplies].sum())
  moved = (_fetches(lhs_block) * bm * bk + _fetches(grad_block) * bm * bn +
           _fetches(out_block) * bk * bn)
  return Work(steps, issued_rows * bk * bn, itemsize * moved, itemsize * pad, ideal_macs,
              ideal_bytes)


def direction_work(direction: str, m: int, k: int, n: int, group_sizes, *,
                   implementation: str, tiling: common.Tiling | None = None,
                   transpose_rhs: bool = False, itemsize: int = 2, interpret=False) -> Work:
  """Work of one direction of gmm(lhs [m, k], rhs [G, k, n]) as its custom_vjp runs it:
  fwd (gmm), dlhs (gmm of the cotangent with the weights transposed), drhs (tgmm)."""
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
  if tiling is None:
    tiling = {"tpu": api.TPU_TILING, "mosaic_gpu": api.MOSAIC_GPU_TILING}.get(
        implementation, api.GPU_TILING)
  kw = dict(implementation=implementation, itemsize=itemsize, interpret=interpret)
  if direction == "fwd":
    return gmm_work(m, k, n, group_sizes, tiles=tiling.fwd, transpose_rhs=transpose_rhs, **kw)
  if direction == "dlhs":
    return gmm_work(m, n, k, group_sizes, tiles=tiling.dlhs_tiles,
                    transpose_rhs=not transpose_rhs, **kw)
  return tgmm_work(m, k, n, group_sizes, tiles=tiling.drhs_tiles, **kw)
