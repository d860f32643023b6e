"""What the GPU and TPU kernels share: block sizes, the static problem, per-block math.

The per-block functions take plain arrays, so the same lines run inside a Triton-style kernel,
a Mosaic TPU kernel, and their interpreters; only how blocks reach them differs.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable

from jax import lax
import jax.numpy as jnp

from pallas_kernels import tiling
from pallas_kernels.attention import reference

LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles along the query (block_q) and key (block_k) sequence axes.

  The backward blocks default to the forward ones. Sequences shorter than a block use one
  smaller block; longer ones are padded up to a block multiple (padded keys are masked).
  """
  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int | None = None
  block_k_bwd: int | None = None

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

  @property
  def bwd(self) -> tuple[int, int]:
    return self.block_q_bwd or self.block_q, self.block_k_bwd or self.block_k


def _static(*xs) -> bool:
  return all(isinstance(x, int) for x in xs)


# Index arithmetic that runs on Python ints (the work counter) and on traced program ids (the
# kernels' index maps and loop bounds) alike, so both read one schedule.
def imin(a, b):
  return min(a, b) if _static(a, b) else jnp.minimum(a, b)


def imax(a, b):
  return max(a, b) if _static(a, b) else jnp.maximum(a, b)


def idiv(a, b):
  """a // b for a >= 0, b > 0."""
  return a // b if _static(a, b) else lax.div(a, jnp.int32(b))


def ior(a, b):
  return bool(a or b) if _static(a, b) else jnp.logical_or(a, b)


def clamp(i, lo, hi):
  """i moved into [lo, hi - 1] (lo when the range is empty)."""
  return imax(imin(i, hi - 1), lo)


@dataclasses.dataclass(frozen=True)
class Operand:
  """One pallas_call operand as its BlockSpec sees it, with what the work counter needs.

  streamed: the sub-block a GPU kernel loads per computed (query block, key block) item from a
  BlockSpec that spans the whole sequence (in-kernel loop); None: the block is read once per
  program (GPU) or DMA'd whenever its block index changes between grid steps (TPU).
  """
  name: str
  block: tuple[Any, ...]  # BlockSpec block shape; squeezed dims are not ints
  index_map: Callable[..., tuple]
  itemsize: int
  output: bool = False
  kv: bool = False  # a K or V input (its traffic is what GQA multiplies)
  streamed: tuple[int, ...] | None = None
  # streamed, and read for every item in range, computed or skipped: ids that decide the
  # skip, or blocks a pipeline fetches ahead of the step that tests it.
  read_when_skipped: bool = False
  # Elements read along the last (head) dim when the block pads it and loads are masked.
  read_last: int | None = None

  def _read(self, dims) -> int:
    dims = [d for d in dims if isinstance(d, int)]
    if self.read_last is not None:
      dims[-1] = self.read_last
    return math.prod(dims)

  @property
  def block_elements(self) -> int:
    return self._read(self.block)

  @property
  def streamed_elements(self) -> int:
    return self._read(self.streamed)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A kernel's schedule: its grid, operands and the (query block, key block) items each grid
  point may compute. The kernel builds its pallas_call from it; work.py counts from it. Every
  kernel masks only items that straddle a boundary (Problem.block_straddles_position_boundary,
  or segment ids that are not one id on both sides) and, with segment ids, skips items whose
  query and key ids have nothing in common (segment_block_test)."""
  name: str
  grid: tuple[int, ...]
  semantics: tuple[str, ...]  # "parallel" / "arbitrary" per grid axis
  operands: tuple[Operand, ...]
  items: Callable[..., Any]  # static grid ids -> iterable of (q_block, k_block)
  block_q: int
  heads_per_item: int  # query heads one item covers (its rows: block_q * heads_per_item)
  block_k: int
  head_dim: int
  matmuls: int  # [rows, block_k, head_dim] products per item

  @property
  def inputs(self):
    return [o for o in self.operands if not o.output]

  @property
  def outputs(self):
    return [o for o in self.operands if o.output]


def query_walk_plan(name: str, p: "Problem", grid, operands, *, block_q: int, block_k: int,
                    num_k_blocks: int, groups: int, head_dim: int, matmuls: int) -> Plan:
  """A Plan (forward, dQ) on a (batch, kv head, query block) grid whose programs each walk
  the key blocks their rows can see (kv_block_range), for all G heads of the group at once."""

  def items(bi, h, qi):
    del bi, h
    lo, hi = p.kv_block_range(qi, block_q, block_k, num_k_blocks)
    return [(qi, kb) for kb in range(lo, hi)]

  return Plan(name, tuple(grid), ("parallel",) * len(grid), tuple(operands), items,
              block_q=block_q, heads_per_item=groups, block_k=block_k, head_dim=head_dim,
              matmuls=matmuls)


@dataclasses.dataclass(frozen=True)
class Problem:
  """Static description of one attention call (hashable: it parameterises the kernels)."""
  causal: bool
  sliding_window: int | None
  logit_softcap: float | None
  sm_scale: float
  kv_len: int  # true key length; arrays reaching a kernel are padded to block multiples
  kv_padded: bool  # whether keys past kv_len exist and must be masked
  has_segments: bool

  def logits2(self, s):
    """log2(e) * softcap(sm_scale * s): logits in base-2 units, so the softmax runs on exp2
    with log2(e) folded into the scale (or the cap) instead of a multiply per exp."""
    if self.logit_softcap is None:
      return s * (self.sm_scale * LOG2_E)
    cap = self.logit_softcap
    return (cap * LOG2_E) * jnp.tanh(s * (self.sm_scale / cap))

  def logits_grad(self, ds, logits2):
    """d(loss)/d(q.k) from d(loss)/d(capped logits): the tanh derivative, then the scale."""
    if self.logit_softcap is not None:
      t = logits2 * (1.0 / (self.logit_softcap * LOG2_E))
      ds = ds * (1.0 - t * t)
    return ds * self.sm_scale

  def mask(self, q_pos, k_pos, q_seg, k_seg):
    return reference.visible(q_pos, k_pos, causal=self.causal,
                             sliding_window=self.sliding_window, q_seg=q_seg, k_seg=k_seg,
                             kv_len=self.kv_len if self.kv_padded else None)

  def kv_block_range(self, q_block, block_q: int, block_k: int, num_k_blocks: int):
    """[lo, hi) of the key blocks that can hold a key visible to query block q_block."""
    first_q = q_block * block_q
    last_q = first_q + (block_q - 1)
    w = self.sliding_window
    hi = num_k_blocks
    if self.causal:
      hi = imin(hi, idiv(last_q, block_k) + 1)
    elif w is not None:
      hi = imin(hi, idiv(last_q + (w - 1), block_k) + 1)
    lo = 0
    if w is not None:
      lo = idiv(imax(first_q - (w - 1), 0), block_k)
    return lo, hi

  def q_block_range(self, k_block, block_q: int, block_k: int, num_q_blocks: int):
    """[lo, hi) of the query blocks that can see a key of key block k_block."""
    first_k = k_block * block_k
    last_k = first_k + (block_k - 1)
    w = self.sliding_window
    lo = 0
    if self.causal:
      lo = idiv(first_k, block_q)
    elif w is not None:
      lo = idiv(imax(first_k - (w - 1), 0), block_q)
    hi = num_q_blocks
    if w is not None:
      hi = imin(hi, idiv(last_k + (w - 1), block_q) + 1)
    return lo, hi

  def block_straddles_position_boundary(self, q_block, k_block, block_q: int, block_k: int):
    """Whether some (query, key) pair of the block is hidden by position (causal diagonal,
    window edge, padded keys) while the block is in the visited range: only such blocks need
    the position mask. Python bool for ints, a traced bool for program ids."""
    first_q, first_k = q_block * block_q, k_block * block_k
    last_q, last_k = first_q + (block_q - 1), first_k + (block_k - 1)
    w = self.sliding_window
    hidden = []
    if self.kv_padded:
      hidden.append(last_k >= self.kv_len)
    if self.causal:
      hidden.append(last_k > first_q)
    if w is not None:
      hidden.append(first_k <= last_q - w)
      if not self.causal:
        hidden.append(last_k >= first_q + w)
    out = False
    for h in hidden:
      out = ior(out, h)
    return out


def dkv_share(p: Problem, k_block, split, groups: int, splits: int, block_q: int,
              block_k: int, num_q_blocks: int):
  """(first, end, lo, n_q): program (key block, split)'s items [first, end) of the key
  block's G * n_q (head, query block) items, head-major, query blocks from lo. Ints or
  traced alike (the GPU dK/dV kernels and the work counter)."""
  lo, hi = p.q_block_range(k_block, block_q, block_k, num_q_blocks)
  n_q = hi - lo
  per_split = idiv(groups * n_q + (splits - 1), splits)
  first = split * per_split
  return first, imin(first + per_split, groups * n_q), lo, n_q


def dkv_splits(batch: int, kv_heads: int, num_k_blocks: int, groups: int, num_q_blocks: int,
               cores: int) -> int:
  """Programs per key block of a GPU dK/dV grid: enough for B * K * key blocks * splits to
  cover `cores` SMs, at most one per (head, query block) item."""
  programs = batch * kv_heads * num_k_blocks
  if programs >= cores:
    return 1
  return max(1, min(groups * num_q_blocks, -(-cores // programs)))


def column(x):
  """[rows, 1] from a per-row statistic stored [rows, 1] or lane-dense [rows, 128] (its value
  repeated over the lanes, as the TPU kernels keep it)."""
  return x if x.shape[-1] == 1 else x.max(axis=-1, keepdims=True)


def _where(mask, x, fill):
  """x where mask, else fill; mask [bq, bk] covers x [G * bq, bk] (G heads' rows, head-major)
  by a free leading-dim reshape."""
  if mask is None:
    return x
  if mask.shape[0] == x.shape[0]:
    return jnp.where(mask, x, fill)
  g = x.shape[0] // mask.shape[0]
  return jnp.where(mask[None], x.reshape(g, *mask.shape), fill).reshape(x.shape)


def segment_block_test(q_lo, q_hi, k_lo, k_hi):
  """(skip, uniform) for a block from the min/max segment ids of its queries and keys: no id
  in common (nothing visible: skip), or one id on both sides (no segment mask needed). Works
  on ints, numpy and traced scalars."""
  skip = (q_hi < k_lo) | (k_hi < q_lo)
  uniform = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
  return skip, uniform


def fwd_block(p: Problem, q, k, v, mask, acc, m, l):
  """One online-softmax step over a key block, in base 2. q [rows, D]; mask [bq, bk] or None
  (a block inside every boundary); m, l [rows, 1] or lane-dense [rows, 128]; acc float32."""
  s = _where(mask, p.logits2(tiling.dot(q, k, tiling.NT_DIMS)), reference.MASK_VALUE)
  m_prev = column(m)
  m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
  alpha = jnp.exp2(m_prev - m_new)
  # An all-masked row keeps l == 0 instead of 1/bk.
  probs = _where(mask, jnp.exp2(s - m_new), 0.0)
  l_new = alpha * column(l) + probs.sum(axis=1, keepdims=True)
  acc_new = alpha * acc + tiling.dot(probs.astype(v.dtype), v, tiling.NN_DIMS)
  return acc_new, jnp.broadcast_to(m_new, m.shape), jnp.broadcast_to(l_new, l.shape)


def fwd_finish(acc, m, l):
  """Output rows and base-2 log-sum-exp [rows, 1]; a row that saw no key gives zeros (and a
  finite lse)."""
  l = column(l)
  l_safe = jnp.where(l == 0.0, 1.0, l)
  return acc / l_safe, column(m) + jnp.log2(l_safe)


def bwd_block(p: Problem, q, k, v, do, lse, delta, mask):
  """Probabilities and d(q.k) for one (query rows, key block) pair; lse (base 2) and delta
  [rows, 1] or lane-dense; mask as in fwd_block."""
  s = p.logits2(tiling.dot(q, k, tiling.NT_DIMS))
  probs = _where(mask, jnp.exp2(s - column(lse)), 0.0)
  dp = tiling.dot(do, v, tiling.NT_DIMS)
  ds = p.logits_grad(probs * (dp - column(delta)), s)
  return probs, ds


def dkv_update(q, do, probs, ds, dk, dv, *, transpose_in_register: bool):
  dv = dv + tiling.dot(probs.astype(do.dtype), do, tiling.TN_DIMS,
                       transpose_in_register=transpose_in_register)
  dk = dk + tiling.dot(ds.astype(q.dtype), q, tiling.TN_DIMS,
                       transpose_in_register=transpose_in_register)
  return dk, dv


def dq_update(k, ds, dq):
  return dq + tiling.dot(ds.astype(k.dtype), k, tiling.NN_DIMS)


def positions(start, size: int, axis: int):
  """Column (axis=0, [size, 1]) or row (axis=1, [1, size]) of positions start..start+size-1."""
  shape = (size, 1) if axis == 0 else (1, size)
  return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def block_positions(q_start, k_start, block_q: int, block_k: int):
  """Query and key positions of a block as full [block_q, block_k] iotas (the TPU layout: a
  [bq, 1] column or [1, bk] row would fill one lane or one sublane of each vreg)."""
  shape = (block_q, block_k)
  return (q_start + lax.broadcasted_iota(jnp.int32, shape, 0),
          k_start + lax.broadcasted_iota(jnp.int32, shape, 1))


def cost_estimate(plan: Plan, p: "Problem", args, out_shapes):
  """A pl.CostEstimate for one kernel, for XLA's scheduler and cost analysis (without it the
  cost model sees the kernel's flops as unknown): 2 flops per multiply-add of every item the
  plan can compute (segment skips are decided at run time: an upper bound with segment ids),
  one exp per logit (two transcendentals with soft-capping's tanh), every operand read and
  every output written once (a lower bound on traffic: work.py counts the re-reads). The same
  items work.py counts, so the compiled flops equal its MACs x 2."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  items = sum(len(list(plan.items(0, *ids)))
              for ids in itertools.product(*map(range, plan.grid[1:])))
  logits = plan.grid[0] * items * plan.heads_per_item * plan.block_q * plan.block_k
  moved = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in [*args, *out_shapes])
  return pl.CostEstimate(flops=2 * logits * plan.head_dim * plan.matmuls,
                         transcendentals=logits * (2 if p.logit_softcap else 1),
                         bytes_accessed=int(moved))
