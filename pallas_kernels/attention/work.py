"""The work the attention kernels schedule, counted in pure Python from their own plans.

`count_work` builds the same `common.Plan`s the kernels build their pallas_calls from (grid,
BlockSpec index maps, the (query block, key block) items each grid point computes) for the
padded shapes and blocks a call would use, and walks them:

  GPU (Triton-style): every program reads its per-program blocks once, and per computed item
      the sub-blocks it streams from whole-sequence BlockSpecs (K/V in the forward and dQ, Q/dO
      in dK/dV; segment ids for every item in range, since they decide the skip); outputs are
      written once per program. Loads read head_dim columns (masked), tiles compute the
      power-of-two width.
  Mosaic GPU: the same walk over the plans in mosaic_gpu.py: per program its TMA loads
      (a query block of all G heads, or a K/V block) and stores; per item in range the blocks
      its pipeline fetches (K/V, or Q/dO rows and statistics), skipped items included (the
      pipeline fetches before the step tests segment ids). head_dim is padded in memory to a
      multiple of 64, so bytes and MACs are those of the padded width; the dQ kernel runs
      with its own query block (mosaic_gpu.dq_block_q), and a split dK/dV grid writes float32
      partials (their sum by XLA is not counted).
  TPU (Mosaic): the grid runs in row-major order and the pipeline copies an operand's block
      only when its block index differs from the previous step's (outputs: written back when
      it changes).

Each count sits next to an ideal: MACs over visible (query, key) pairs at the true head_dim,
K/V bytes and operand bytes touched once, blocks that hold a visible pair, and of those the
blocks that straddle a mask boundary (causal diagonal, window edge, sequence end, segment
boundary), the only ones that need a mask. A "block" is one query head's [block_q, block_k]
tile, whatever number of heads a kernel item covers. Counts, not timings: a CPU run proves them.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from pallas_kernels import compat
from pallas_kernels.attention import api
from pallas_kernels.attention import common
from pallas_kernels.attention import reference

KERNELS = ("forward", "dq", "dkv")  # count_work's keys
IMPLEMENTATIONS = ("gpu", "mosaic_gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Work:
  """What one kernel launch does, next to the ideal for the same problem."""
  kernel: str
  grid: tuple[int, ...]
  programs: int  # independent programs: the whole grid (GPU), its parallel axes (TPU)
  grid_steps: int
  blocks_visited: int
  blocks_masked: int
  macs: int
  kv_bytes: int  # K and V bytes read
  bytes_moved: int  # every operand read and written
  ideal_blocks_visited: int
  ideal_blocks_masked: int
  ideal_macs: int
  ideal_kv_bytes: int
  ideal_bytes_moved: int

  def ratio(self, name: str) -> float:
    ideal = getattr(self, "ideal_" + name)
    return getattr(self, name) / ideal if ideal else float("inf")


def _visible_np(p: common.Problem, t: int, s: int, seg_row):
  """[t, s] visibility of one batch row at the true lengths (the reference's mask)."""
  q_pos, k_pos = np.arange(t)[:, None], np.arange(s)[None, :]
  q_seg = k_seg = None
  if seg_row is not None:
    q_seg, k_seg = seg_row[:t, None], seg_row[None, :s]
  mask = reference.visible(q_pos, k_pos, causal=p.causal, sliding_window=p.sliding_window,
                           q_seg=q_seg, k_seg=k_seg)
  return np.ones((t, s), bool) if mask is None else np.broadcast_to(mask, (t, s))


def _block_view(mask, bq: int, tq: int, bk: int, tk: int):
  """[nq, nk, bq, bk] tiles of mask zero-padded to [tq, tk]."""
  padded = np.zeros((tq, tk), bool)
  padded[:mask.shape[0], :mask.shape[1]] = mask
  return padded.reshape(tq // bq, bq, tk // bk, bk).transpose(0, 2, 1, 3)


def _walk(plan: common.Plan, batch: int, gpu: bool, classify):
  """(programs, steps, visited, masked, kv bytes, bytes moved) over the whole grid.

  classify(batch row, q_block, k_block) -> (computed, masked), the kernels' runtime tests.
  The batch axis is the grid's first and every index map carries it, so a change of batch
  always copies: the byte counts of batch 0 times `batch` are exact. Items are classified per
  batch row (segment ids differ by row); GPU streamed bytes follow batch 0's items.
  """
  kv_row = moved_row = 0  # copied blocks of batch row 0 (the same for every row)
  kv_streamed = moved_streamed = visited = masked = 0  # summed over all rows
  prev = {}
  for ids in itertools.product(range(1), *map(range, plan.grid[1:])):
    for o in plan.operands:
      if gpu and o.streamed is not None:
        continue
      if not gpu:
        index = tuple(int(i) for i in o.index_map(*ids))
        if prev.get(o.name) == index:
          continue
        prev[o.name] = index
      nbytes = o.block_elements * o.itemsize
      moved_row += nbytes
      kv_row += nbytes if o.kv else 0
    items = list(plan.items(*ids))
    for bi in range(batch):
      kinds = [classify(bi, qb, kb) for qb, kb in items]
      computed = sum(1 for c, _ in kinds if c)
      visited += computed
      masked += sum(1 for c, m in kinds if c and m)
      for o in plan.inputs if gpu else ():
        if o.streamed is not None:
          nbytes = (len(items) if o.read_when_skipped else computed) * o.streamed_elements \
              * o.itemsize
          moved_streamed += nbytes
          kv_streamed += nbytes if o.kv else 0
  steps = math.prod(plan.grid)
  programs = steps if gpu else math.prod(
      n for n, sem in zip(plan.grid, plan.semantics) if sem == "parallel")
  heads = plan.heads_per_item
  return (programs, steps, visited * heads, masked * heads, kv_row * batch + kv_streamed,
          moved_row * batch + moved_streamed)


def _classifier(p: common.Problem, seg, batch: int, q_len: int, kv_len: int, bq: int, tq: int,
                bk: int, tk: int):
  """(tiles holding a visible pair, of those the tiles on a boundary: per batch row, and
  classify(batch row, q_block, k_block) -> (computed, masked), the kernels' runtime tests)."""
  vis_tiles, boundary, seg_skip, seg_uniform = [], [], [], []
  straddles = np.array([[p.block_straddles_position_boundary(qb, kb, bq, bk)
                         for kb in range(tk // bk)] for qb in range(tq // bq)], bool)
  for bi in range(batch):
    row = None
    skip = np.zeros(straddles.shape, bool)
    uniform = np.ones(straddles.shape, bool)
    if seg is not None:
      row = np.zeros(max(tq, tk), np.int32)  # api pads segment ids with zeros
      row[:q_len] = seg[bi]
      qs, ks = row[:tq].reshape(-1, bq), row[:tk].reshape(-1, bk)
      skip, uniform = common.segment_block_test(
          qs.min(1)[:, None], qs.max(1)[:, None], ks.min(1)[None, :], ks.max(1)[None, :])
    any_visible = _block_view(_visible_np(p, q_len, kv_len, row), bq, tq, bk, tk).any((2, 3))
    vis_tiles.append(any_visible)
    boundary.append(any_visible & (straddles | ~uniform))
    seg_skip.append(skip)
    seg_uniform.append(uniform)

  def classify(bi, qb, kb):
    return (not seg_skip[bi][qb, kb], bool(straddles[qb, kb]) or not seg_uniform[bi][qb, kb])

  return vis_tiles, boundary, classify


def count_work(*, implementation: str, batch: int, q_heads: int, kv_heads: int, q_len: int,
               kv_len: int, head_dim: int, itemsize: int = 2, causal: bool = False,
               sliding_window: int | None = None, segment_ids=None,
               block_sizes: common.BlockSizes | None = None,
               gpu_cores: int = compat.ABSTRACT_H100[1]) -> dict[str, Work]:
  """Work of the forward, dQ and dK/dV kernels ("gpu", "mosaic_gpu" or "tpu") for one
  flash_attention call (block_sizes None: the implementation's defaults, as the call uses).

  segment_ids: optional [batch, q_len] integers (needs kv_len == q_len), as the call gets them;
  they decide which blocks straddle a segment boundary and which are skipped.
  gpu_cores: the SM count the GPU dK/dV grids are sized for (the kernels read the device's).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got "
                     f"{implementation!r}")
  if q_heads % kv_heads:
    raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
  seg = None
  if segment_ids is not None:
    seg = np.asarray(segment_ids, np.int32)
    if seg.shape != (batch, q_len) or kv_len != q_len:
      raise ValueError(f"segment_ids must be [batch, q_len] = {(batch, q_len)} with kv_len == "
                       f"q_len, got {seg.shape} and kv_len={kv_len}")
  c = api.make_call((batch, q_len, q_heads, head_dim), (batch, kv_len, kv_heads, head_dim),
                    causal=causal, sliding_window=sliding_window, logit_softcap=None,
                    has_segments=seg is not None, sm_scale=1.0, implementation=implementation,
                    block_sizes=block_sizes, interpret=False, itemsize=itemsize)
  kernels = api._kernels(implementation)  # pylint: disable=protected-access
  gpu = implementation in ("gpu", "mosaic_gpu")
  out = {}
  for fwd in (True, False):
    bq, tq, bk, tk, d = api.kernel_dims(c, q_len, kv_len, head_dim, fwd)
    p = api.problem_for(c, tk)
    if implementation == "gpu":  # head_dim unpadded in memory: the kernels pad it in registers
      q_shape, kv_shape = (batch, tq, q_heads, head_dim), (batch, tk, kv_heads, head_dim)
    elif implementation == "mosaic_gpu":  # head_dim padded in memory by api
      q_shape, kv_shape = (batch, tq, q_heads, d), (batch, tk, kv_heads, d)
    else:
      q_shape, kv_shape = (batch, q_heads, tq, d), (batch, kv_heads, tk, d)
    if fwd:
      plans = [kernels.forward_plan(p, q_shape, kv_shape, itemsize, block_q=bq, block_k=bk)]
    else:
      extra = dict(cores=gpu_cores) if gpu else {}
      plans = list(kernels.backward_plans(p, q_shape, kv_shape, itemsize, block_q=bq,
                                          block_k=bk, **extra))
    pairs = sum(int(_visible_np(p, q_len, kv_len, None if seg is None else seg[bi]).sum())
                for bi in range(batch))
    for plan in plans:
      # Blocks as this kernel tiles them (Mosaic GPU's dQ has its own query block).
      vis_tiles, boundary, classify = _classifier(p, seg, batch, q_len, kv_len, plan.block_q,
                                                  tq, plan.block_k, tk)
      programs, steps, visited, masked, kv_bytes, moved = _walk(plan, batch, gpu, classify)
      qkv = batch * (q_len * q_heads + 2 * kv_len * kv_heads) * head_dim * itemsize
      q_sized = batch * q_len * q_heads * head_dim * itemsize
      rows_f32 = batch * q_heads * q_len * 4
      seg_bytes = 2 * batch * q_len * 4 if seg is not None else 0
      if plan.name == "forward":  # q, k, v in; out, lse out
        ideal_moved = qkv + q_sized + rows_f32
      elif plan.name == "dq":  # q, k, v, dout, lse, delta in; dq out
        ideal_moved = qkv + q_sized + 2 * rows_f32 + q_sized
      else:  # q, k, v, dout, lse, delta in; dk, dv out
        ideal_moved = qkv + q_sized + 2 * rows_f32 + 2 * batch * kv_len * kv_heads * head_dim \
            * itemsize
      out[plan.name] = Work(
          kernel=plan.name, grid=plan.grid, programs=programs, grid_steps=steps,
          blocks_visited=visited, blocks_masked=masked,
          macs=visited * plan.block_q * plan.block_k * plan.head_dim * plan.matmuls,
          kv_bytes=kv_bytes, bytes_moved=moved,
          ideal_blocks_visited=q_heads * sum(int(v.sum()) for v in vis_tiles),
          ideal_blocks_masked=q_heads * sum(int(m.sum()) for m in boundary),
          ideal_macs=pairs * q_heads * head_dim * plan.matmuls,
          ideal_kv_bytes=2 * batch * kv_len * kv_heads * head_dim * itemsize,
          ideal_bytes_moved=ideal_moved + seg_bytes)
  return out
