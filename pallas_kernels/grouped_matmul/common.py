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


def masked_rows(x, mask):
  """x where mask holds, else zero (a select: NaN or inf there does not leak through)."""
  return jnp.where(mask, x, jnp.zeros((), x.dtype))
