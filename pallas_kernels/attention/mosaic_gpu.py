"""Flash attention as Mosaic GPU kernels (Hopper, sm90a): forward, dQ and dK/dV.

Layout [batch, seq, heads, head_dim] as the model produces it. Inputs reach these functions
from api.py with sequences padded to block multiples and head_dim padded to a multiple of 16
where it is not one (zeros: they add nothing to q.k, and the extra output columns are sliced
off). Operands are bf16/fp16; every product is a wgmma with a float32 accumulator; K/V blocks
stream from GMEM into a multi-stage shared-memory pipeline (plgpu.emit_pipeline: TMA copies,
one barrier per stage). G = N // K query heads share a kv head.

  forward  grid (B, K, query blocks). A block holds the query rows of all G heads of its kv
           group stacked head-major into one [G * block_q, D] SMEM tile (G TMA loads), so
           each K/V block is loaded once per group and one wgmma covers all G heads (the
           rows of a wgmma: G * block_q, a multiple of 64). It walks only the key blocks its
           rows can see (causal / window block skipping, common.Problem.kv_block_range),
           masks only blocks that straddle a boundary, and skips blocks whose segment ids
           share nothing (per-block min/max ids computed by XLA). Saves the base-2
           log-sum-exp per row for the backward.
  dQ       grid (B, K, query blocks), the same stacked rows and key walk as the forward.
  dK/dV    grid (B, K, key blocks, splits). A program loads its K/V tile once and walks
           its share of the (head, query block) items that can see it: the G heads of the
           group accumulate into one float32 dK/dV in registers. When B * K * key blocks is
           below the SM count, splits > 1 spreads a key block's items over programs that
           write float32 partials, summed by XLA (race-free, deterministic; see backward);
           otherwise splits = 1 and dK/dV are written once in the input dtype.

The grids and the traffic they cause are counted from forward_plan / backward_plans (the
plans these kernels launch with) by work.count_work(implementation="mosaic_gpu"). What the
count shows: the forward and dQ load each K/V block once per kv group and query block, but
at the default blocks a query block holds 128 / G positions (G * block_q = 128 stacked rows,
what one warpgroup's registers hold), so their K/V bytes still grow with G, as a per-head
kernel's would; a K/V tile shared by more rows needs more consumer warpgroups or a cluster
multicasting K/V.

What it is not (yet): no warp specialisation (one warpgroup both issues the TMA loads and
computes; the pipeline overlaps loads with compute but not softmax with wgmma, so no
FlashAttention-3 producer/consumer split or ping-pong), and no intra-warpgroup overlap of
the matmuls of a step. Two choices made for Mosaic GPU's interpreter, which takes wgmma
operands from SMEM only and does not run pl.run_state: probabilities and
dS pass through an SMEM tile (written, commit_smem, then read by wgmma) instead of feeding
wgmma from registers, and the forward's P @ V goes into a fresh accumulator that is added to
the rescaled one in registers (one more [rows, head_dim] float32 tile live). Both cost
registers or SMEM bandwidth on a real H100; they are the first things to revisit once the
kernels can be timed there. float32 inputs are refused: wgmma would compute them in tf32.

Status: checked against the float64 reference in Mosaic GPU's interpreter (simulated SMEM,
TMA, barriers and wgmma, with its race detector raising) on JAX >= 0.12 and lowered for an
abstract H100 on JAX 0.10.2 and 0.12; not yet compiled or timed on a GPU
(experiments/bench_attention.py does both).
"""
from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels import tiling
from pallas_kernels.attention import common
from pallas_kernels.attention import reference

_S = compat.SQUEEZED
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
ROW_MULTIPLE = 64  # a warpgroup's wgmma rows: G * block_q and block_k must be multiples
SEQ_MULTIPLE = 8  # a query block's rows per head (TMA boxes of whole 8-row tiles)
# wgmma's k step for 16-bit operands; each SMEM tile then takes the widest swizzle its rows
# allow (Mosaic GPU infers it: 128 bytes at head_dim 64 / 128 / 192 / 256, 64 at 96, 32 at
# 80 or 112), so only head_dims off a multiple of 16 are padded in memory.
HEAD_DIM_MULTIPLE = 16
MAX_HEAD_DIM = 256  # wgmma's largest N (the [rows, head_dim] output accumulator)
# Default query rows of one block (all G heads together): 128 fits the accumulators in one
# warpgroup's registers up to head_dim 128; 64 beyond.
TARGET_ROWS = 128
_STAGES = 2
SMEM_BYTES = 232448  # shared memory one H100/H200 block may hold
# What the kernels' SMEM holds beyond their tiles (barriers, alignment): about 4.4 KB was
# measured at G = 3, head_dim 128; the defaults keep twice that free.
_SMEM_SLACK = 8192


def _params():
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def check(dtype, head_dim: int, groups: int, block_q: int, block_k: int, suffix: str = ""):
  """Refuses what these kernels cannot run, naming the value: before any tracing."""
  if jnp.dtype(dtype) not in DTYPES:
    raise NotImplementedError(
        f"implementation='mosaic_gpu' takes bfloat16/float16 inputs, got {jnp.dtype(dtype)} "
        "(wgmma computes float32 operands in tf32); use implementation='gpu'")
  if head_dim > MAX_HEAD_DIM:
    raise NotImplementedError(f"implementation='mosaic_gpu' with head_dim={head_dim} > "
                              f"{MAX_HEAD_DIM}")
  if block_q % SEQ_MULTIPLE or (groups * block_q) % ROW_MULTIPLE:
    raise ValueError(
        f"BlockSizes.block_q{suffix}={block_q}: Mosaic GPU query blocks must be multiples of "
        f"{SEQ_MULTIPLE} whose rows over the {groups} heads of a kv group (G * block_q = "
        f"{groups * block_q}) are a multiple of {ROW_MULTIPLE} (a warpgroup's wgmma rows)")
  if block_k % ROW_MULTIPLE:
    raise ValueError(f"BlockSizes.block_k{suffix}={block_k}: Mosaic GPU key blocks must be "
                     f"multiples of {ROW_MULTIPLE}")


def block_q_step(groups: int) -> int:
  """The smallest query block that both rules allow for G heads per kv group."""
  need = ROW_MULTIPLE // math.gcd(groups, ROW_MULTIPLE)
  return need * SEQ_MULTIPLE // math.gcd(need, SEQ_MULTIPLE)


def default_block_q(groups: int, head_dim: int) -> int:
  """Positions per query block so that G heads' rows come to TARGET_ROWS (64 past
  head_dim 128), or the smallest block that tiles."""
  rows = TARGET_ROWS if head_dim <= 128 else ROW_MULTIPLE
  step = block_q_step(groups)
  return max(step, (rows // groups) // step * step)


def smem_bytes(groups: int, head_dim: int, block_q: int, block_k: int, block_q_bwd: int,
               block_k_bwd: int) -> int:
  """The largest SMEM tile footprint of the three kernels (16-bit inputs, segment ids
  included), from the scratch and pipeline stages they allocate."""
  d = head_dim
  rows = groups * block_q
  fwd = rows * d * 2 + rows * block_k * 2 + 2 * rows * 4 + _STAGES * (
      2 * block_k * d * 2 + block_k * 4)
  rows = groups * dq_block_q(groups, d, block_q_bwd)
  dq = 2 * rows * d * 2 + rows * block_k_bwd * 2 + 3 * rows * 4 + _STAGES * (
      2 * block_k_bwd * d * 2 + block_k_bwd * 4)
  # dK/dV: the pipeline's stages, then (split grids) a float32 staging tile in their place
  dkv = 2 * block_k_bwd * d * 2 + block_k_bwd * block_q_bwd * 2 + block_k_bwd * 4 + max(
      _STAGES * (2 * block_q_bwd * d * 2 + 3 * block_q_bwd * 4), block_k_bwd * d * 4)
  return max(fwd, dq, dkv)


def default_block_sizes(groups: int, head_dim: int) -> tuple[int, int, int, int]:
  """(block_q, block_k, block_q_bwd, block_k_bwd): G * block_q = TARGET_ROWS stacked query
  rows (64 past head_dim 128) or the smallest block that tiles, key blocks of 128 where the
  shared memory allows (else 64), backward blocks of 64. Refuses a group size and head_dim
  whose smallest blocks do not fit (e.g. G = 3 at head_dim 256: 192 stacked rows)."""
  block_q = default_block_q(groups, head_dim)
  for block_k in (128, 64):
    blocks = (block_q, block_k, ROW_MULTIPLE, ROW_MULTIPLE)
    if smem_bytes(groups, head_dim, *blocks) + _SMEM_SLACK <= SMEM_BYTES:
      return blocks
  raise NotImplementedError(
      f"implementation='mosaic_gpu' with {groups} query heads per kv head at head_dim "
      f"{head_dim}: the smallest blocks (G * block_q = {groups * block_q} stacked rows) need "
      f"{smem_bytes(groups, head_dim, *blocks)} bytes of shared memory, more than "
      f"{SMEM_BYTES - _SMEM_SLACK}; use implementation='gpu'")


def padded_head_dim(head_dim: int) -> int:
  return tiling.round_up(head_dim, HEAD_DIM_MULTIPLE)


def segment_bounds(seg, block: int):
  """Per-block (min, max) segment ids [B, T / block] of a padded [B, T] id array: the
  kernels' skip test reads them as scalars instead of reducing a vector in the kernel."""
  b, t = seg.shape
  blocks = seg.reshape(b, t // block, block)
  return blocks.min(axis=-1), blocks.max(axis=-1)


# ------------------------------------------------------------------------ in-kernel helpers

def _iota(shape, axis):
  return plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA)


def _row_vector(x, shape):
  """A per-row [rows] vector broadcast over the columns of `shape`."""
  return lax.broadcast_in_dim(x, shape, [0])


def _col_vector(x, shape):
  return lax.broadcast_in_dim(x, shape, [1])


def _matmul(shape, a, b):
  """a @ b by wgmma into a fresh float32 accumulator of `shape`; waits for the result."""
  def scope(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def _via_smem(value, smem):
  """value (registers) written to smem for a wgmma operand: Mosaic GPU's interpreter takes
  wgmma operands from SMEM only."""
  smem[...] = value.astype(smem.dtype)
  plgpu.commit_smem()  # wgmma reads through the async proxy
  return smem


def _t(ref):
  return ref.transpose((1, 0))


def _branch(pred, true_fn, false_fn, carry):
  if isinstance(pred, bool):
    return (true_fn if pred else false_fn)(carry)
  return lax.cond(pred, true_fn, false_fn, carry)


def _masked_step(p: common.Problem, q_block, k_block, block_q, block_k, seg_test, make_mask,
                 step, carry):
  """step(mask, carry), with a mask only where the block straddles a boundary; skipped when
  its segment ids share nothing. seg_test: None or (skip, uniform) of the block."""
  needs_mask = p.block_straddles_position_boundary(q_block, k_block, block_q, block_k)
  skip = False
  if seg_test is not None:
    skip, uniform = seg_test
    needs_mask = jnp.logical_or(needs_mask, jnp.logical_not(uniform))
  compute = lambda c: _branch(needs_mask, lambda c: step(make_mask(), c),
                              lambda c: step(None, c), c)
  return _branch(skip, lambda c: c, compute, carry)


def _load_stacked(src_gmem_rows, dst_smem, barrier, groups: int, block_q: int):
  """G TMA copies: head g's rows (src_gmem_rows(g)) into dst rows [g * bq, (g + 1) * bq)."""
  for g in range(groups):
    plgpu.copy_gmem_to_smem(src_gmem_rows(g), dst_smem.at[pl.ds(g * block_q, block_q)],
                            barrier)


def _store_stacked(value, smem, dst_gmem_rows, groups: int, block_q: int):
  """value (registers, [G * bq, ...]) -> smem -> head g's rows of GMEM by TMA; waits."""
  smem[...] = value.astype(smem.dtype)
  plgpu.commit_smem()  # the register writes must be visible to the TMA unit
  for g in range(groups):
    plgpu.copy_smem_to_gmem(smem.at[pl.ds(g * block_q, block_q)], dst_gmem_rows(g))
  plgpu.wait_smem_to_gmem(0)


def _stacked_positions(q_start, rows: int, cols: int, block_q: int):
  """Query position of each row of a head-major stacked [G * bq, cols] tile."""
  return q_start + lax.rem(_iota((rows, cols), 0), jnp.int32(block_q))


def _stacked_mask(p: common.Problem, q_start, k_block, block_q: int, shape, q_seg,
                  k_seg_smem):
  """The mask of a stacked [G * bq, bk] logits tile (forward and dQ) against key block
  k_block; q_seg: the rows' ids (None without segments), k_seg_smem: the key ids' SMEM."""
  rows, block_k = shape
  q_pos = _stacked_positions(q_start, rows, block_k, block_q)
  k_pos = k_block * block_k + _iota(shape, 1)
  segs = ((None, None) if not p.has_segments else
          (_row_vector(q_seg, shape), _col_vector(k_seg_smem[0][...], shape)))
  return p.mask(q_pos, k_pos, *segs)


# --------------------------------------------------------------------------------- forward

def _fwd_kernel(*refs, p: common.Problem, groups: int, block_q: int, block_k: int,
                num_k_blocks: int):
  if p.has_segments:
    q_lo, q_hi, k_lo, k_hi, q_seg_gmem, k_seg_gmem, *refs = refs
  q_gmem, k_gmem, v_gmem, out_gmem, lse_gmem = refs
  b, h, qb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("q")
  d = q_gmem.shape[-1]
  rows = groups * block_q
  q0 = qb * block_q
  head = lambda g: h * groups + g
  scratch = [plgpu.SMEM((rows, d), q_gmem.dtype), plgpu.SMEM((rows, block_k), q_gmem.dtype),
             plgpu.SMEM((rows,), jnp.float32)]
  if p.has_segments:
    scratch.append(plgpu.SMEM((rows,), jnp.int32))
  copies = groups * (2 if p.has_segments else 1)

  def scope(q_smem, probs_smem, lse_smem, *seg_smem, barrier):
    _load_stacked(lambda g: q_gmem.at[b, pl.ds(q0, block_q), head(g)], q_smem, barrier.at[0],
                  groups, block_q)
    if p.has_segments:
      _load_stacked(lambda g: q_seg_gmem.at[b, pl.ds(q0, block_q)], seg_smem[0],
                    barrier.at[0], groups, block_q)
    plgpu.barrier_wait(barrier.at[0])
    q_seg = seg_smem[0][...] if p.has_segments else None
    shape = (rows, block_k)
    lo, hi = p.kv_block_range(qb, block_q, block_k, num_k_blocks)

    def step(indices, k_smem, v_smem, *rest):
      *k_seg_smem, carry = rest
      kb = lo + indices[0]

      make_mask = lambda: _stacked_mask(p, q0, kb, block_q, shape, q_seg, k_seg_smem)

      def compute(mask, carry):
        acc, m, l = carry
        s = p.logits2(_matmul(shape, q_smem, _t(k_smem)))
        if mask is not None:
          s = jnp.where(mask, s, reference.MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        probs = jnp.exp2(s - _row_vector(m_new, shape))
        if mask is not None:  # an all-masked row keeps l == 0
          probs = jnp.where(mask, probs, 0.0)
        l = alpha * l + probs.sum(axis=1)
        # A fresh accumulator added in registers: the rescaled one cannot be handed back to
        # wgmma (pl.run_state), which Mosaic GPU's interpreter does not run.
        pv = _matmul(acc.shape, _via_smem(probs, probs_smem), v_smem)
        acc = acc * _row_vector(alpha, acc.shape) + pv
        return acc, m_new, l

      seg_test = None
      if p.has_segments:
        seg_test = common.segment_block_test(q_lo[b, qb], q_hi[b, qb], k_lo[b, kb],
                                             k_hi[b, kb])
      return _masked_step(p, qb, kb, block_q, block_k, seg_test, make_mask, compute, carry)

    init = (plgpu.layout_cast(jnp.zeros((rows, d), jnp.float32), plgpu.Layout.WGMMA),
            jnp.full((rows,), reference.MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    specs = [plgpu.BlockSpec((block_k, d), lambda j: (lo + j, 0))] * 2
    operands = [k_gmem.at[b, :, h], v_gmem.at[b, :, h]]
    if p.has_segments:
      specs.append(plgpu.BlockSpec((block_k,), lambda j: (lo + j,)))
      operands.append(k_seg_gmem.at[b])
    acc, m, l = plgpu.emit_pipeline(step, grid=(hi - lo,), in_specs=specs,
                                    max_concurrent_steps=_STAGES, init_carry=init)(*operands)
    l_safe = jnp.where(l == 0.0, 1.0, l)  # a row that saw no key: zeros, finite lse
    _store_stacked(acc / _row_vector(l_safe, acc.shape), q_smem,
                   lambda g: out_gmem.at[b, pl.ds(q0, block_q), head(g)], groups, block_q)
    _store_stacked(m + jnp.log2(l_safe), lse_smem,
                   lambda g: lse_gmem.at[b, head(g), pl.ds(q0, block_q)], groups, block_q)

  pl.run_scoped(lambda *r: scope(*r[:-1], barrier=r[-1]), *scratch,
                plgpu.Barrier(num_arrivals=copies, num_barriers=1))


def _seg_operands(p: common.Problem, groups: int, own: str, own_block: int, own_map,
                  walked: str, walked_len: int, walked_block: int, walk_map):
  """Segment-id operands of a kernel whose programs own one block of the `own` ids (loaded
  once per stacked head when groups > 1) and pipeline the `walked` ids per item; plus the
  per-item min/max scalars of both blocks that decide the skip (segment_bounds)."""
  if not p.has_segments:
    return []
  return [common.Operand(own, (groups, own_block), own_map, 4),
          common.Operand(walked, (_S, walked_len), walk_map, 4, streamed=(walked_block,),
                         read_when_skipped=True),
          common.Operand("segment_bounds", (_S, 4), walk_map, 4, streamed=(4,),
                         read_when_skipped=True)]


_GROUP_MAP = lambda bi, h, qi: (bi, qi, h, 0)  # the N-axis block of kv head h's G heads


def _query_walk_operands(p: common.Problem, g: int, block_q: int, s: int, block_k: int, d: int,
                         itemsize: int):
  """The ids, stacked query block and walked K/V of a (batch, kv head, query block) program
  (forward and dQ): the pipeline fetches a step's blocks before the step tests its segment
  ids, so skipped blocks are read too."""
  kv_map = lambda bi, h, qi: (bi, 0, h, 0)
  walk = dict(kv=True, streamed=(block_k, d), read_when_skipped=True)
  return _seg_operands(p, g, "q_seg", block_q, lambda bi, h, qi: (bi, qi), "k_seg", s,
                       block_k, lambda bi, h, qi: (bi, 0)) + [
      common.Operand("q", (_S, block_q, g, d), _GROUP_MAP, itemsize),
      common.Operand("k", (_S, s, _S, d), kv_map, itemsize, **walk),
      common.Operand("v", (_S, s, _S, d), kv_map, itemsize, **walk),
  ]


def forward_plan(p: common.Problem, q_shape, kv_shape, itemsize: int, *, block_q: int,
                 block_k: int) -> common.Plan:
  """The forward's grid and traffic for padded [B, T, N, D] / [B, S, K, D] shapes: per
  program G TMA loads of a query block (and G stores of out and lse); per key block in
  kv_block_range, K and V (and key ids) through the pipeline, which fetches a step's blocks
  before the step tests its segment ids (so skipped blocks are read too)."""
  b, t, n, d = q_shape
  s, kv = kv_shape[1], kv_shape[2]
  g = n // kv
  nq, nk = t // block_q, s // block_k
  operands = _query_walk_operands(p, g, block_q, s, block_k, d, itemsize) + [
      common.Operand("out", (_S, block_q, g, d), _GROUP_MAP, itemsize, output=True),
      common.Operand("lse", (_S, g, block_q), lambda bi, h, qi: (bi, h, qi), 4, output=True),
  ]

  return common.query_walk_plan("forward", p, (b, kv, nq), operands, block_q=block_q,
                                block_k=block_k, num_k_blocks=nk, groups=g, head_dim=d,
                                matmuls=2)


def forward(p: common.Problem, q, k, v, q_seg, k_seg, *, block_q: int, block_k: int,
            interpret=False):
  """(out [B, T, N, D], base-2 lse [B, N, T] float32) for padded inputs."""
  b, t, n, d = q.shape
  kv = k.shape[2]
  groups = n // kv
  check(q.dtype, d, groups, block_q, block_k)
  plan = forward_plan(p, q.shape, k.shape, q.dtype.itemsize, block_q=block_q, block_k=block_k)
  kernel = functools.partial(_fwd_kernel, p=p, groups=groups, block_q=block_q,
                             block_k=block_k, num_k_blocks=k.shape[1] // block_k)
  seg_args = []
  if p.has_segments:
    seg_args = [*segment_bounds(q_seg, block_q), *segment_bounds(k_seg, block_k), q_seg, k_seg]
  out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((b, n, t), jnp.float32)]
  return plgpu.kernel(
      kernel, out_type=out_type, grid=plan.grid, grid_names=("b", "h", "q"),
      compiler_params=_params(), interpret=interpret or None,
      **compat.mosaic_gpu_cost(common.cost_estimate(plan, p, [q, k, v], out_type)),
  )(*seg_args, q, k, v)


# -------------------------------------------------------------------------------- backward

def dq_block_q(groups: int, head_dim: int, block_q: int) -> int:
  """The dQ kernel's query block: the stacked default when it divides the backward's
  block_q (the axis is padded to block_q), else block_q itself."""
  stacked = default_block_q(groups, head_dim)
  return stacked if stacked <= block_q and block_q % stacked == 0 else block_q


def check_bwd(dtype, head_dim: int, groups: int, block_q: int, block_k: int):
  """The dK/dV kernel contracts over a query block (wgmma K dim): multiples of 64."""
  check(dtype, head_dim, groups, dq_block_q(groups, head_dim, block_q), block_k, "_bwd")
  if block_q % ROW_MULTIPLE:
    raise ValueError(f"BlockSizes.block_q_bwd={block_q}: Mosaic GPU backward query blocks "
                     f"must be multiples of {ROW_MULTIPLE} (the dK/dV products contract "
                     "over them)")


def _dq_kernel(*refs, p: common.Problem, groups: int, block_q: int, block_k: int,
               num_k_blocks: int):
  if p.has_segments:
    q_lo, q_hi, k_lo, k_hi, q_seg_gmem, k_seg_gmem, *refs = refs
  q_gmem, k_gmem, v_gmem, do_gmem, lse_gmem, delta_gmem, dq_gmem = refs
  b, h, qb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("q")
  d = q_gmem.shape[-1]
  rows = groups * block_q
  q0 = qb * block_q
  head = lambda g: h * groups + g
  dtype = q_gmem.dtype
  scratch = [plgpu.SMEM((rows, d), dtype), plgpu.SMEM((rows, d), dtype),
             plgpu.SMEM((rows, block_k), dtype), plgpu.SMEM((rows,), jnp.float32),
             plgpu.SMEM((rows,), jnp.float32)]
  if p.has_segments:
    scratch.append(plgpu.SMEM((rows,), jnp.int32))
  copies = groups * (5 if p.has_segments else 4)

  def scope(q_smem, do_smem, ds_smem, lse_smem, delta_smem, *seg_smem, barrier):
    rows_of = lambda ref: (lambda g: ref.at[b, pl.ds(q0, block_q), head(g)])
    stats_of = lambda ref: (lambda g: ref.at[b, head(g), pl.ds(q0, block_q)])
    _load_stacked(rows_of(q_gmem), q_smem, barrier.at[0], groups, block_q)
    _load_stacked(rows_of(do_gmem), do_smem, barrier.at[0], groups, block_q)
    _load_stacked(stats_of(lse_gmem), lse_smem, barrier.at[0], groups, block_q)
    _load_stacked(stats_of(delta_gmem), delta_smem, barrier.at[0], groups, block_q)
    if p.has_segments:
      _load_stacked(lambda g: q_seg_gmem.at[b, pl.ds(q0, block_q)], seg_smem[0],
                    barrier.at[0], groups, block_q)
    plgpu.barrier_wait(barrier.at[0])
    shape = (rows, block_k)
    lse = _row_vector(lse_smem[...], shape)
    delta = _row_vector(delta_smem[...], shape)
    q_seg = seg_smem[0][...] if p.has_segments else None
    lo, hi = p.kv_block_range(qb, block_q, block_k, num_k_blocks)

    def acc_scope(dq_acc):
      def step(indices, k_smem, v_smem, *k_seg_smem):
        kb = lo + indices[0]

        make_mask = lambda: _stacked_mask(p, q0, kb, block_q, shape, q_seg, k_seg_smem)

        def compute(mask, carry):
          s = p.logits2(_matmul(shape, q_smem, _t(k_smem)))
          probs = jnp.exp2(s - lse)
          if mask is not None:
            probs = jnp.where(mask, probs, 0.0)
          dp = _matmul(shape, do_smem, _t(v_smem))
          ds = p.logits_grad(probs * (dp - delta), s)
          plgpu.wgmma(dq_acc, _via_smem(ds, ds_smem), k_smem)
          plgpu.wgmma_wait(0)  # k_smem's stage is released when the step returns
          return carry

        seg_test = None
        if p.has_segments:
          seg_test = common.segment_block_test(q_lo[b, qb], q_hi[b, qb], k_lo[b, kb],
                                               k_hi[b, kb])
        _masked_step(p, qb, kb, block_q, block_k, seg_test, make_mask, compute, ())

      specs = [plgpu.BlockSpec((block_k, d), lambda j: (lo + j, 0))] * 2
      operands = [k_gmem.at[b, :, h], v_gmem.at[b, :, h]]
      if p.has_segments:
        specs.append(plgpu.BlockSpec((block_k,), lambda j: (lo + j,)))
        operands.append(k_seg_gmem.at[b])
      plgpu.emit_pipeline(step, grid=(hi - lo,), in_specs=specs,
                          max_concurrent_steps=_STAGES)(*operands)
      return dq_acc[...]

    dq = pl.run_scoped(acc_scope, plgpu.ACC((rows, d), jnp.float32))
    _store_stacked(dq, q_smem, rows_of(dq_gmem), groups, block_q)

  pl.run_scoped(lambda *r: scope(*r[:-1], barrier=r[-1]), *scratch,
                plgpu.Barrier(num_arrivals=copies, num_barriers=1))


def _dkv_kernel(*refs, p: common.Problem, groups: int, splits: int, block_q: int,
                block_k: int, num_q_blocks: int):
  if p.has_segments:
    q_lo, q_hi, k_lo, k_hi, q_seg_gmem, k_seg_gmem, *refs = refs
  # q, dout: [B, T, N * D]; lse, delta: [B, N * T] (see backward); dk, dv: [B, S, K, D], or
  # float32 partials [splits * B, S, K, D] when splits > 1
  q_gmem, k_gmem, v_gmem, do_gmem, lse_gmem, delta_gmem, dk_gmem, dv_gmem = refs
  b, h, kb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("k")
  split = lax.axis_index("split")
  d = k_gmem.shape[-1]
  k0 = kb * block_k
  dtype = k_gmem.dtype
  shape = (block_k, block_q)  # transposed logits: keys down, queries across
  scratch = [plgpu.SMEM((block_k, d), dtype), plgpu.SMEM((block_k, d), dtype),
             plgpu.SMEM(shape, dtype)]
  if p.has_segments:
    scratch.append(plgpu.SMEM((block_k,), jnp.int32))

  def scope(k_smem, v_smem, t_smem, *seg_smem, barrier):
    kv_rows = (b, pl.ds(k0, block_k), h)
    plgpu.copy_gmem_to_smem(k_gmem.at[kv_rows], k_smem, barrier.at[0])
    plgpu.copy_gmem_to_smem(v_gmem.at[kv_rows], v_smem, barrier.at[0])
    if p.has_segments:
      plgpu.copy_gmem_to_smem(k_seg_gmem.at[b, pl.ds(k0, block_k)], seg_smem[0],
                              barrier.at[0])
    plgpu.barrier_wait(barrier.at[0])
    k_seg = _row_vector(seg_smem[0][...], shape) if p.has_segments else None
    # This program's share [first, end) of the key block's (head g, query block lo + j)
    # items, head-major, over 2-D views of the [B, T, N, D] arrays ([T, N * D]: head g's rows
    # of a block are one TMA box) and of [B, N, T] stats.
    first, end, lo, n_q = common.dkv_share(p, kb, split, groups, splits, block_q, block_k,
                                           num_q_blocks)
    n_q = jnp.asarray(n_q, jnp.int32)
    item_head = lambda i: h * groups + lax.div(first + i, n_q)
    item_block = lambda i: lo + lax.rem(first + i, n_q)

    def acc_scope(dk_acc, dv_acc):
      def step(indices, q_smem, do_smem, lse_smem, delta_smem, *q_seg_smem):
        i = indices[0]
        qb = item_block(i)

        def make_mask():
          q_pos = qb * block_q + _iota(shape, 1)
          k_pos = k0 + _iota(shape, 0)
          segs = ((None, None) if not p.has_segments else
                  (_col_vector(q_seg_smem[0][...], shape), k_seg))
          return p.mask(q_pos, k_pos, *segs)

        def compute(mask, carry):
          s = p.logits2(_matmul(shape, k_smem, _t(q_smem)))
          probs = jnp.exp2(s - _col_vector(lse_smem[...], shape))
          if mask is not None:
            probs = jnp.where(mask, probs, 0.0)
          plgpu.wgmma(dv_acc, _via_smem(probs, t_smem), do_smem)
          dp = _matmul(shape, v_smem, _t(do_smem))  # also waits for the dV product
          ds = p.logits_grad(probs * (dp - _col_vector(delta_smem[...], shape)), s)
          plgpu.wgmma(dk_acc, _via_smem(ds, t_smem), q_smem)
          plgpu.wgmma_wait(0)  # the stage is released when the step returns
          return carry

        seg_test = None
        if p.has_segments:
          seg_test = common.segment_block_test(q_lo[b, qb], q_hi[b, qb], k_lo[b, kb],
                                               k_hi[b, kb])
        _masked_step(p, qb, kb, block_q, block_k, seg_test, make_mask, compute, ())

      rows_spec = plgpu.BlockSpec((block_q, d), lambda i: (item_block(i), item_head(i)))
      stats_spec = plgpu.BlockSpec(
          (block_q,), lambda i: (item_head(i) * num_q_blocks + item_block(i),))
      specs = [rows_spec, rows_spec, stats_spec, stats_spec]
      operands = [q_gmem.at[b], do_gmem.at[b], lse_gmem.at[b], delta_gmem.at[b]]
      if p.has_segments:
        specs.append(plgpu.BlockSpec((block_q,), lambda i: (item_block(i),)))
        operands.append(q_seg_gmem.at[b])
      # A split past the key block's items has none (end < first): it writes zeros.
      plgpu.emit_pipeline(step, grid=(jnp.maximum(end - first, 0),), in_specs=specs,
                          max_concurrent_steps=_STAGES)(*operands)
      return dk_acc[...], dv_acc[...]

    dk, dv = pl.run_scoped(acc_scope, plgpu.ACC((block_k, d), jnp.float32),
                           plgpu.ACC((block_k, d), jnp.float32))
    if splits == 1:
      k_smem[...] = dk.astype(dtype)  # K/V are no longer read: their SMEM stages the results
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_gmem.at[kv_rows])
      plgpu.copy_smem_to_gmem(v_smem, dv_gmem.at[kv_rows])
      plgpu.wait_smem_to_gmem(0)
      return
    # Float32 partials, staged one at a time in a scope that reuses the pipeline's SMEM.
    partial_rows = (split * (dk_gmem.shape[0] // splits) + b, pl.ds(k0, block_k), h)

    def store_partials(stage):
      for value, dst in ((dk, dk_gmem), (dv, dv_gmem)):
        stage[...] = value
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage, dst.at[partial_rows])
        plgpu.wait_smem_to_gmem(0)  # the TMA has read stage before it is rewritten

    pl.run_scoped(store_partials, plgpu.SMEM((block_k, d), jnp.float32))

  copies = 3 if p.has_segments else 2
  pl.run_scoped(lambda *r: scope(*r[:-1], barrier=r[-1]), *scratch,
                plgpu.Barrier(num_arrivals=copies, num_barriers=1))


def backward_plans(p: common.Problem, q_shape, kv_shape, itemsize: int, *, block_q: int,
                   block_k: int, cores: int = compat.ABSTRACT_H100[1]
                   ) -> tuple[common.Plan, common.Plan]:
  """(dK/dV plan, dQ plan) for padded shapes; block_q: the backward's query block (dQ runs
  with dq_block_q of it); `cores`: the SM count the dK/dV grid should cover.

  dK/dV grid (B, K, key blocks, splits): a program loads its K/V block once and walks its
  share of the key block's (head, query block) items (common.dkv_share), Q/dO rows and their
  statistics through the pipeline. splits > 1 (common.dkv_splits: B * K * key blocks below
  `cores`) writes float32 partials [splits * B, S, K, D] that XLA sums.
  """
  b, t, n, d = q_shape
  s, kv = kv_shape[1], kv_shape[2]
  g = n // kv
  nq, nk = t // block_q, s // block_k
  splits = common.dkv_splits(b, kv, nk, g, nq, cores)
  kv_map = lambda bi, h, ki, si: (bi, ki, h, 0)
  out_block, out_map, out_size = (_S, block_k, _S, d), kv_map, itemsize
  if splits > 1:
    out_map = lambda bi, h, ki, si: (si * b + bi, ki, h, 0)
    out_size = 4
  rows_map = lambda bi, h, ki, si: (bi, 0, 0)
  item = dict(read_when_skipped=True)
  dkv_operands = _seg_operands(p, 1, "k_seg", block_k, lambda bi, h, ki, si: (bi, ki), "q_seg",
                               t, block_q, lambda bi, h, ki, si: (bi, 0)) + [
      common.Operand("q", (_S, t, n * d), rows_map, itemsize, streamed=(block_q, d), **item),
      common.Operand("k", (_S, block_k, _S, d), kv_map, itemsize, kv=True),
      common.Operand("v", (_S, block_k, _S, d), kv_map, itemsize, kv=True),
      common.Operand("dout", (_S, t, n * d), rows_map, itemsize, streamed=(block_q, d), **item),
      common.Operand("lse", (_S, n * t), lambda bi, h, ki, si: (bi, 0), 4, streamed=(block_q,),
                     **item),
      common.Operand("delta", (_S, n * t), lambda bi, h, ki, si: (bi, 0), 4,
                     streamed=(block_q,), **item),
      common.Operand("dk", out_block, out_map, out_size, output=True),
      common.Operand("dv", out_block, out_map, out_size, output=True),
  ]

  def dkv_items(bi, h, ki, si):
    del bi, h
    first, end, lo, n_q = common.dkv_share(p, ki, si, g, splits, block_q, block_k, nq)
    return [(lo + j % n_q, ki) for j in range(first, end)]

  dkv = common.Plan("dkv", (b, kv, nk, splits), ("parallel",) * 4, tuple(dkv_operands),
                    dkv_items, block_q=block_q, heads_per_item=1, block_k=block_k, head_dim=d,
                    matmuls=4)

  bq = dq_block_q(g, d, block_q)
  ndq = t // bq
  stats_map = lambda bi, h, qi: (bi, h, qi)
  dq_operands = _query_walk_operands(p, g, bq, s, block_k, d, itemsize) + [
      common.Operand("dout", (_S, bq, g, d), _GROUP_MAP, itemsize),
      common.Operand("lse", (_S, g, bq), stats_map, 4),
      common.Operand("delta", (_S, g, bq), stats_map, 4),
      common.Operand("dq", (_S, bq, g, d), _GROUP_MAP, itemsize, output=True),
  ]

  dq = common.query_walk_plan("dq", p, (b, kv, ndq), dq_operands, block_q=bq,
                              block_k=block_k, num_k_blocks=nk, groups=g, head_dim=d,
                              matmuls=3)
  return dkv, dq


def backward(p: common.Problem, q, k, v, q_seg, k_seg, out, lse, do, *, block_q: int,
             block_k: int, interpret=False):
  """(dq, dk, dv) for padded inputs; lse [B, N, T] (base 2) from forward().

  When B * K * key blocks is below the GPU's SM count, the dK/dV grid splits each key
  block's query walk over several programs (see backward_plans). Their float32 partials go
  to separate slices of one array and XLA sums them afterwards: race-free and deterministic,
  where float32 atomic adds into one dK/dV would land in no fixed order (results that change
  run to run) and would need a zeroed output first; the cost is splits x the dK/dV writes,
  a few MB at the small batches where it applies.
  """
  b, t, n, d = q.shape
  kv = k.shape[2]
  groups = n // kv
  check_bwd(q.dtype, d, groups, block_q, block_k)
  # delta_i = sum_d out_id * dout_id, the softmax-backward row term; one fused XLA pass.
  delta = jnp.einsum("btnd,btnd->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
  dkv_plan, dq_plan = backward_plans(p, q.shape, k.shape, q.dtype.itemsize, block_q=block_q,
                                     block_k=block_k, cores=compat.gpu_core_count())
  dq_block = dq_plan.block_q
  nq, nk = t // block_q, k.shape[1] // block_k

  def seg_args(q_block):
    if not p.has_segments:
      return []
    return [*segment_bounds(q_seg, q_block), *segment_bounds(k_seg, block_k), q_seg, k_seg]

  dq = plgpu.kernel(
      functools.partial(_dq_kernel, p=p, groups=groups, block_q=dq_block, block_k=block_k,
                        num_k_blocks=nk),
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=dq_plan.grid,
      grid_names=("b", "h", "q"), compiler_params=_params(), interpret=interpret or None,
      **compat.mosaic_gpu_cost(common.cost_estimate(
          dq_plan, p, [q, k, v, do, lse, delta], [jax.ShapeDtypeStruct(q.shape, q.dtype)])),
  )(*seg_args(dq_block), q, k, v, do, lse, delta)
  splits = dkv_plan.grid[3]
  out_type = jax.ShapeDtypeStruct(k.shape, k.dtype)
  if splits > 1:
    out_type = jax.ShapeDtypeStruct((splits * b, *k.shape[1:]), jnp.float32)
  # Free row-major views: head g's rows of a query block are one [block_q, D] box of
  # [T, N * D], and its statistics one run of [N * T].
  dk, dv = plgpu.kernel(
      functools.partial(_dkv_kernel, p=p, groups=groups, splits=splits, block_q=block_q,
                        block_k=block_k, num_q_blocks=nq),
      out_type=[out_type] * 2, grid=dkv_plan.grid, grid_names=("b", "h", "k", "split"),
      compiler_params=_params(), interpret=interpret or None,
      **compat.mosaic_gpu_cost(common.cost_estimate(
          dkv_plan, p, [q, k, v, do, lse, delta], [out_type] * 2)),
  )(*seg_args(block_q), q.reshape(b, t, n * d), k, v, do.reshape(b, t, n * d),
    lse.reshape(b, n * t), delta.reshape(b, n * t))
  if splits > 1:
    dk, dv = (x.reshape(splits, *k.shape).sum(0).astype(k.dtype) for x in (dk, dv))
  return dq, dk, dv
