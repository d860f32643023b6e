"""Static routing of the stride permutation, shared by the kernels and the API.

Between the factors, channel a of input block j (flat index f = j q + a) feeds channel
a' = f // k of output block l = f % k. For one pair (j, l) the channels a that route j to l
step by k, and their a' are consecutive. So if w1's rows are reordered per block, grouping
them by l (and by a' within a group), the intermediate of block j comes out as k contiguous
column groups, group l holding a run of consecutive a' of block l: the permutation becomes
static slices, no gather and no transpose, and the intermediate never has to leave the chip.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Kernel block sizes: `tokens` rows of x per grid step. None: the implementation's own
  (TPU: 256, a multiple of 8 when given; Mosaic GPU: 64, one wgmma's rows, the only size
  its kernels take)."""
  tokens: int | None = None

  TPU_TOKENS = 256  # the TPU kernel's default (a class constant, not a field)


@dataclasses.dataclass(frozen=True)
class Route:
  """One (input block j, output block l) run: columns [offset, offset + count) of block j's
  reordered intermediate are channels [a_start, a_start + count) of output block l."""
  j: int
  l: int
  offset: int
  count: int
  a_start: int


@functools.lru_cache(maxsize=None)
def routing(k: int, q: int) -> tuple[np.ndarray, tuple[Route, ...]]:
  """(row_order [k, q], routes): w1[j][row_order[j]] is block j's reordered factor; routes
  lists every non-empty (j, l) run, j-major, l-minor."""
  order = np.zeros((k, q), np.int32)
  routes = []
  for j in range(k):
    flat = j * q + np.arange(q)
    rows = sorted(range(q), key=lambda a, flat=flat: (flat[a] % k, flat[a] // k))
    order[j] = rows
    offset = 0
    for l in range(k):
      run = [a for a in rows if flat[a] % k == l]
      if run:
        a_primes = [int(flat[a] // k) for a in run]
        assert a_primes == list(range(a_primes[0], a_primes[0] + len(run)))  # consecutive
        routes.append(Route(j, l, offset, len(run), a_primes[0]))
        offset += len(run)
  return order, tuple(routes)


def input_span(j: int, p: int, n_in: int) -> tuple[int, int]:
  """Columns [lo, hi) of x that block j reads (fewer than p, or none, at the padded end)."""
  return min(j * p, n_in), min((j + 1) * p, n_in)


def work(tokens: int, n_in: int, n_out: int, w1_shape, w2_shape, itemsize: int,
         direction: str, *, kernel: str = "tpu", tile_rows: int = 64,
         grad_tile: int = 64) -> tuple[int, int]:
  """(flops, bytes moved) of one direction: the kernels' own count (TPU: for CostEstimate).

  kernel="tpu" (one pallas_call per direction, the factors resident in VMEM):
    forward   2 factors; reads x and both factors once, writes y once.
    backward  5 factor-sized products (the intermediate recomputed, dh, dx, dw1, dw2); reads
              x, dy and the factors once, writes dx once and both gradients in float32.
  kernel="mosaic_gpu" (mosaic_gpu.py; n_in, n_out as the kernels see them: k p and k s):
    forward   the same flops; x read and y written once, but every 64-token CTA loads both
              factors (from L2 mostly): tokens / tile_rows passes over them.
    backward  the same flops; XLA's block-major copy of dy (read + write), the token-tile
              kernel (reads x, dy, w1 twice and w2 once per tile; writes dx, H and dh), and
              the weight-gradient kernels, whose grid_tile^2 output tiles each read their
              two [tokens, grid_tile] operand columns (dy and H for dw2, dh and x for dw1)
              and write float32 gradients.
  """
  k, q, p = w1_shape
  _, s, r = w2_shape
  macs1, macs2 = k * q * p, k * s * r
  weights = (macs1 + macs2) * itemsize
  if direction not in ("forward", "backward"):
    raise ValueError(f"work: direction must be 'forward' or 'backward', got {direction!r}")
  if kernel not in ("tpu", "mosaic_gpu"):
    raise ValueError(f"work: kernel must be 'tpu' or 'mosaic_gpu', got {kernel!r}")
  if direction == "forward":
    flops = 2 * tokens * (macs1 + macs2)
    weight_passes = 1 if kernel == "tpu" else -(-tokens // tile_rows)
    return flops, tokens * (n_in + n_out) * itemsize + weight_passes * weights
  flops = 2 * tokens * (3 * macs1 + 2 * macs2)
  if kernel == "tpu":
    return flops, tokens * (2 * n_in + n_out) * itemsize + weights + (macs1 + macs2) * 4
  deinterleave = 2 * tokens * n_out * itemsize
  parts = mosaic_gpu_backward_work(tokens, n_in, n_out, w1_shape, w2_shape, itemsize,
                                   tile_rows=tile_rows, grad_tile=grad_tile)
  assert sum(f for f, _ in parts.values()) == flops
  return flops, deinterleave + sum(b for _, b in parts.values())


def mosaic_gpu_backward_work(tokens: int, n_in: int, n_out: int, w1_shape, w2_shape,
                             itemsize: int, *, tile_rows: int = 64,
                             grad_tile: int = 64) -> dict[str, tuple[int, int]]:
  """{kernel name: (flops, bytes moved)} for each Mosaic GPU backward kernel (`work` with
  kernel="mosaic_gpu" is their sum plus XLA's copy of dy): the token-tile kernel recomputes
  H (w1), then dH (w2) and dx (w1); dw2 and dw1 are one product each."""
  k, q, p = w1_shape
  _, s, r = w2_shape
  macs1, macs2 = k * q * p, k * s * r
  tiles = -(-tokens // tile_rows)
  data = (tokens * (2 * n_in + n_out + 2 * k * q) * itemsize
          + tiles * (2 * macs1 + macs2) * itemsize)

  def grad(a, b):  # (rows / g) x (cols / g) output tiles, each reading [tokens, g] of both
    return (k * (a // grad_tile) * (b // grad_tile) * 2 * tokens * grad_tile * itemsize
            + k * a * b * 4)
  return {"effjax_monarch_bwd_mosaic_gpu": (2 * tokens * (2 * macs1 + macs2), data),
          "effjax_monarch_dw2_mosaic_gpu": (2 * tokens * macs2, grad(s, r)),
          "effjax_monarch_dw1_mosaic_gpu": (2 * tokens * macs1, grad(q, p))}
