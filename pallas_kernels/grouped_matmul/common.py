"""What the grouped-matmul kernels share: tiles, group bounds, tile schedules, per-tile math.

Everything here is plain jnp on small int32 vectors (computed once per call, outside the
kernels) or on tiles inside a kernel, so the GPU and TPU kernels, their interpreters and the
reference all read group boundaries the same way.

Group bounds. Rows are sorted by group: global group g owns rows [start_g, end_g) with
end_g = min(sum(group_sizes[:g + 1]), m). A shard (group_offset = o, G_local local weights)
sees groups o .. o + G_local - 1 as local groups 0 .. G_local - 1; every other row is outside
all local groups and gives zero output. Sizes are read as max(size, 0) and the running sum is
clipped at m, so a traced input whose sizes sum past m is truncated at row m (the rows past m
do not exist) and a traced negative size counts as 0; concrete inputs of either kind are
rejected by api.py before they get here.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels import tiling


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tiles of one grouped matmul `out[m, n] = lhs[m, k] @ w[k, n]` (or its weight gradient).

  block_m tiles the rows (the ragged, grouped axis), block_k the contraction, block_n the
  output columns. In the input-gradient direction the contraction is the forward's n and the
  output columns are the forward's k; in the weight-gradient direction the output tile is
  [block_k, block_n] and the contraction runs over rows in steps of block_m.
  """
  block_m: int = 128
  block_k: int = 64
  block_n: int = 128

  def __post_init__(self):
    for name in ("block_m", "block_k", "block_n"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Tiles.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tiles per direction: forward, input gradient (dlhs), weight gradient (drhs).

  The best tiles differ per direction (the weight gradient's output is a [k, n] tile per group
  and it contracts over rows), so each has its own; dlhs and drhs default to fwd.
  """
  fwd: Tiles = Tiles()
  dlhs: Tiles | None = None
  drhs: Tiles | None = None

  def __post_init__(self):
    for name in ("fwd", "dlhs", "drhs"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, Tiles):
        raise ValueError(f"Tiling.{name} must be a Tiles, got {value!r}")

  @property
  def dlhs_tiles(self) -> Tiles:
    return self.dlhs or self.fwd

  @property
  def drhs_tiles(self) -> Tiles:
    return self.drhs or self.fwd


def local_group_bounds(group_sizes, group_offset, num_local: int, num_rows: int):
  """(starts, ends): int32 [num_local] row ranges [start, end) of the shard's groups.

  Local groups past the last global group (a traced group_offset too large) are empty; a
  traced group_offset is clipped into [0, num_groups].
  """
  num_groups = group_sizes.shape[0]
  # boundaries[g] = first row of global group g; boundaries[num_groups] = end of the last.
  boundaries = jnp.concatenate([
      jnp.zeros((1,), jnp.int32),
      jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes, 0)), num_rows).astype(jnp.int32)])
  if group_offset is None:
    return boundaries[:-1], boundaries[1:]
  # Padded by empty groups so that a window starting at any offset in [0, num_groups] fits
  # (dynamic_slice would otherwise move the window back silently).
  boundaries = jnp.concatenate(
      [boundaries, jnp.broadcast_to(boundaries[-1:], (num_local,))])
  offset = jnp.clip(jnp.asarray(group_offset, jnp.int32).reshape(()), 0, num_groups)
  starts = lax.dynamic_slice(boundaries, (offset,), (num_local,))
  ends = lax.dynamic_slice(boundaries, (offset + 1,), (num_local,))
  return starts, ends


def rows_in(first_row, shape: tuple[int, ...], start, end):
  """Mask of a tile of `shape` whose rows are first_row, first_row + 1, ...: the rows in
  [start, end). Built at the tile's full shape: no broadcast of a boolean column in-kernel."""
  rows = first_row + lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= start) & (rows < end)


def tile_group_range(starts, ends, block_m: int, num_row_tiles: int):
  """(first, stop): int32 [num_row_tiles]; local groups first .. stop - 1 may own rows of the tile.

  Empty groups can fall inside the range (kernels skip them); a tile holding no local row has
  first >= stop.
  """
  tile_lo = jnp.arange(num_row_tiles, dtype=jnp.int32) * block_m
  first = jnp.searchsorted(ends, tile_lo, side="right").astype(jnp.int32)
  stop = jnp.searchsorted(starts, tile_lo + block_m, side="left").astype(jnp.int32)
  return first, stop


def visit_schedule(starts, ends, block_m: int, num_row_tiles: int, *, visit_empty: bool):
  """The (segment, row tile) pairs a sequential kernel visits, in row order.

  Segments are contiguous, sorted row ranges [starts[s], ends[s]). Each nonempty segment is
  visited once per row tile it touches, so a tile straddling a boundary is visited once per
  segment in it (the kernel masks the other rows); with visit_empty an empty segment gets one
  visit too (the weight gradient must write zeros for it).

  Returns (segment_of_visit, tile_of_visit, num_visits): int32 [max_visits] twice, and [1].
  max_visits = num_row_tiles + num_segments - 1 is a static upper bound (each boundary inside a
  tile adds one visit; each empty segment adds one instead), so the kernel compiles once for
  all group sizes. Visits past num_visits repeat the last real visit: a kernel skips their
  work, and since their blocks do not change the pipeline fetches nothing for them.
  """
  num_segments = starts.shape[0]
  max_visits = num_row_tiles + num_segments - 1
  first_tile = starts // block_m
  nonempty = ends > starts
  tiles_touched = jnp.where(nonempty, tiling.cdiv(ends, block_m) - first_tile, int(visit_empty))
  visits_end = jnp.cumsum(tiles_touched)
  num_visits = visits_end[-1]
  visit = jnp.minimum(jnp.arange(max_visits, dtype=jnp.int32), num_visits - 1)
  segment = jnp.searchsorted(visits_end, visit, side="right").astype(jnp.int32)
  tile = first_tile[segment] + visit - (visits_end[segment] - tiles_touched[segment])
  # An empty segment at row m_padded would name the tile past the end.
  tile = jnp.clip(tile, 0, num_row_tiles - 1).astype(jnp.int32)
  return segment, tile, num_visits.reshape(1).astype(jnp.int32)


@functools.partial(jax.tree_util.register_dataclass, meta_fields=["sizes"],
                   data_fields=["segment", "row0", "size_class", "lo", "hi", "first_item",
                                "num_items"])
@dataclasses.dataclass(frozen=True)
class RowChunks:
  """Work items covering sorted segments of rows with chunks aligned to each segment's start.

  Item i multiplies rows [row0[i], row0[i] + sizes[size_class[i]]) (a static height per class)
  with segment segment[i]'s weights and owns rows [lo[i], hi[i]) of it: it stores (or, in a
  weight gradient, contracts) only those. Every row of every segment is owned by exactly one
  item. Items of segment s are first_item[s] .. first_item[s + 1] - 1, in row order; items
  from num_items[0] on are padding (a kernel skips them).
  """
  segment: jax.Array
  row0: jax.Array
  size_class: jax.Array
  lo: jax.Array
  hi: jax.Array
  first_item: jax.Array
  num_items: jax.Array
  sizes: tuple[int, ...]

  @property
  def max_items(self) -> int:
    return self.segment.shape[0]


def chunk_sizes(block_m: int, min_rows: int) -> tuple[int, ...]:
  """block_m, block_m / 2, ..., min_rows: the static chunk heights of row_chunks."""
  if min_rows < 1 or block_m < min_rows or block_m % min_rows or (
      (block_m // min_rows) & (block_m // min_rows - 1)):
    raise ValueError(f"row chunks need block_m / min_rows a power of two, got block_m="
                     f"{block_m}, min_rows={min_rows}")
  sizes = [block_m]
  while sizes[-1] > min_rows:
    sizes.append(sizes[-1] // 2)
  return tuple(sizes)


def row_chunks(seg_starts, seg_ends, *, block_m: int, min_rows: int, num_rows: int) -> RowChunks:
  """Row-chunk work items for segments [seg_starts[s], seg_ends[s]) (sorted, disjoint, within
  [0, num_rows), num_rows a multiple of block_m).

  A segment of L rows gets L // block_m full chunks from its start, then its remaining
  t = L % block_m rows rounded up to min_rows, R = round_up(t, min_rows), as one chunk per set
  bit of R (block_m / 2, block_m / 4, ..., min_rows rows; one block_m chunk when R = block_m).
  The rounded tail is placed to end at the segment's end (or at row 0 when it would start
  before it), so no chunk reads past num_rows; rows a tail chunk covers outside the segment's
  tail belong to other items. A segment therefore issues fewer than min_rows rows beyond its
  own, wherever its boundaries fall (a global row-tile grid issues a whole tile per boundary).

  Static bound: num_rows // block_m + num_segments * max(1, log2(block_m / min_rows)) items.
  """
  sizes = chunk_sizes(block_m, min_rows)
  num_segments = seg_starts.shape[0]
  max_items = num_rows // block_m + num_segments * max(1, len(sizes) - 1)
  size_arr = jnp.asarray(sizes, jnp.int32)
  length = jnp.maximum(seg_ends - seg_starts, 0)
  full = length // block_m
  tail = tiling.cdiv(length % block_m, min_rows) * min_rows  # 0 .. block_m
  present = (tail[:, None] & size_arr[None, :]) != 0  # [S, classes]; sizes are powers of two
  count = full + present.sum(axis=1)
  first_item = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                jnp.cumsum(count).astype(jnp.int32)])
  num_items = first_item[-1]
  # Offset of each class's chunk inside the tail (larger chunks first).
  offset = jnp.cumsum(jnp.where(present, size_arr[None, :], 0), axis=1) - jnp.where(
      present, size_arr[None, :], 0)
  tail_row0 = jnp.maximum(seg_ends - tail, 0)
  tail_own = seg_starts + full * block_m

  item = jnp.minimum(jnp.arange(max_items, dtype=jnp.int32), jnp.maximum(num_items - 1, 0))
  segment = jnp.clip(jnp.searchsorted(first_item[1:], item, side="right"), 0,
                     num_segments - 1).astype(jnp.int32)
  q = item - first_item[segment]
  is_full = q < full[segment]
  tail_q = q - full[segment]
  cls = jnp.argmax(jnp.cumsum(present[segment], axis=1) > tail_q[:, None], axis=1)
  cls = jnp.where(is_full, 0, cls).astype(jnp.int32)
  full_row0 = seg_starts[segment] + q * block_m
  chunk_row0 = tail_row0[segment] + jnp.take_along_axis(offset[segment], cls[:, None], 1)[:, 0]
  row0 = jnp.where(is_full, full_row0, chunk_row0).astype(jnp.int32)
  lo = jnp.where(is_full, full_row0, jnp.maximum(chunk_row0, tail_own[segment]))
  hi = jnp.where(is_full, full_row0 + block_m,
                 jnp.minimum(chunk_row0 + size_arr[cls], seg_ends[segment]))
  return RowChunks(segment, row0, cls, lo.astype(jnp.int32), hi.astype(jnp.int32), first_item,
                   num_items.reshape(1).astype(jnp.int32), sizes)


def segment_row_chunks(starts, ends, *, num_rows: int, block_m: int, min_rows: int,
                       align: int = 1) -> RowChunks:
  """row_chunks over every row: segment 0 (rows before the groups [starts, ends)), the groups
  as segments 1..G, and segment G + 1 (rows after them). A gmm kernel multiplies the groups'
  items and stores zeros for the other two, so each output row is written once.

  align > 1 (a power of two dividing min_rows): every chunk starts at a multiple of align. The
  nonempty segments are rounded out to multiples of align before chunking (neighbours then
  share up to align - 1 rows) and each item's owned rows are clipped back to its segment."""
  seg_starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), starts, ends[-1:]])
  seg_ends = jnp.concatenate([starts[:1], ends, jnp.full((1,), num_rows, jnp.int32)])
  if align == 1:
    return row_chunks(seg_starts, seg_ends, block_m=block_m, min_rows=min_rows,
                      num_rows=num_rows)
  if min_rows % align or align & (align - 1):
    raise ValueError(f"align must be a power of two dividing min_rows={min_rows}, got {align}")
  nonempty = seg_ends > seg_starts
  out_starts = seg_starts // align * align
  out_ends = jnp.where(nonempty, tiling.cdiv(seg_ends, align) * align, out_starts)
  chunks = row_chunks(out_starts, out_ends, block_m=block_m, min_rows=min_rows,
                      num_rows=num_rows)
  return dataclasses.replace(
      chunks, lo=jnp.maximum(chunks.lo, seg_starts[chunks.segment]),
      hi=jnp.minimum(chunks.hi, seg_ends[chunks.segment]))


def masked_rows(x, mask):
  """x where mask holds, else zero (a select: NaN or inf there does not leak through)."""
  return jnp.where(mask, x, jnp.zeros((), x.dtype))


def cost_estimate(m: int, k: int, n: int, operands, out_shape):
  """A pl.CostEstimate for a gmm or tgmm kernel, for XLA's scheduler and cost analysis
  (without it the cost model sees the kernel's flops as unknown): every one of the m rows
  through one group's [k, n] weights (rows past the groups are skipped at run time: an upper
  bound), each operand read and the output written once (a lower bound: work.py counts the
  re-reads)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  moved = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in [*operands, out_shape])
  return pl.CostEstimate(flops=2 * m * k * n, transcendentals=0, bytes_accessed=int(moved))
