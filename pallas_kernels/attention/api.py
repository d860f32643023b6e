"""The public flash attention entry: validation, padding, implementation choice, custom_vjp.

Any sequence length: the wrapper pads queries and keys with zeros up to block multiples, the
kernels mask keys at or past the true kv length, and outputs are sliced back. Padded query
rows compute finite values that are dropped; their output cotangents are zero, so they add
nothing to dK/dV. The custom_vjp saves (q, k, v, segment ids, out, log-sum-exp); the backward
re-pads with its own block sizes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels import tiling
from pallas_kernels.attention import common
from pallas_kernels.attention import reference

IMPLEMENTATIONS = ("reference", "gpu", "mosaic_gpu", "tpu")
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# GPU default; the TPU default is shape-aware (tpu_default_block_sizes). Tests and the
# benchmark pass their own.
GPU_BLOCK_SIZES = common.BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)
GPU_MAX_HEAD_DIM = 256  # the Triton kernels keep [block, head_dim] tiles in registers
# A TPU grid step costs about 0.35 us of fixed overhead: blocks of 512 keep the matrix unit
# busy well past it. A step holds G heads' query rows, capped here to bound VMEM.
TPU_TARGET_BLOCK = 512
TPU_MAX_QUERY_ROWS = 2048
TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class _Call:
  """Everything static about one call: hashable, so it can parameterise jit and custom_vjp."""
  problem: common.Problem
  implementation: str
  block_sizes: common.BlockSizes
  interpret: Any
  itemsize: int
  groups: int = 1  # query heads per kv head


def _tpu_sublanes(itemsize: int) -> int:
  """Rows of one Mosaic tile: (8, 128) for 32-bit types, (16, 128) for 16-bit ones (a step's
  [G, block_q, D] block is reshaped to [G * block_q, D], free only on whole tiles)."""
  return 8 if itemsize >= 4 else 16


def _tpu_default_block(length: int, sublanes: int, cap: int) -> int:
  """The whole (padded) axis when it fits in one block of `cap`; else the block of `cap` or
  its halves down to 128 that pads the axis least (ties to the larger block)."""
  if length <= cap:
    return tiling.round_up(max(length, 1), sublanes)
  candidates = [b for b in (cap, cap // 2, cap // 4) if b >= TPU_LANES] or [cap]
  return min(candidates, key=lambda b: (tiling.round_up(length, b), -b))


def tpu_default_block_sizes(q_len: int, kv_len: int, groups: int,
                            itemsize: int) -> common.BlockSizes:
  """512 wherever the sequence allows (query blocks: fewer when G heads would pass
  TPU_MAX_QUERY_ROWS rows per step, never under 128)."""
  sub = _tpu_sublanes(itemsize)
  q_cap = max(TPU_LANES, min(TPU_TARGET_BLOCK, TPU_MAX_QUERY_ROWS // groups))
  bq = _tpu_default_block(q_len, sub, q_cap)
  bk = _tpu_default_block(kv_len, sub, TPU_TARGET_BLOCK)
  return common.BlockSizes(bq, bk, bq, bk)


def _blocks(c: _Call, name: str, length: int) -> tuple[int, int]:
  """(block, padded length) for one sequence axis; BlockSizes field `name` gives the block.

  Refuses, naming the block and the rule, what the platform cannot tile: Triton tiles are
  powers of two; Mosaic blocks follow the (8, 128) rule (second-minor dim a multiple of 8,
  16 for 16-bit types; minor dim a multiple of 128 or the whole axis), which with segment ids
  binds block_k: the key ids reach the kernel as [8, block_k] blocks.
  """
  block = getattr(c.block_sizes, name)
  if block is None:
    block = getattr(c.block_sizes, name.removesuffix("_bwd"))
  if c.implementation == "mosaic_gpu":
    return _mosaic_gpu_block(c, name, block, length)
  if c.implementation == "gpu":
    if block < 16 or block & (block - 1):
      raise ValueError(f"BlockSizes.{name}={block}: GPU block sizes must be powers of two "
                       ">= 16 (Triton tiles)")
    block = min(block, max(16, tiling.next_pow2(length)))
    return block, tiling.round_up(length, block)
  sub = _tpu_sublanes(c.itemsize)
  if block % sub:
    raise ValueError(f"BlockSizes.{name}={block} breaks Mosaic's ({sub}, 128) block rule: "
                     f"TPU sequence blocks must be multiples of {sub} for "
                     f"{c.itemsize}-byte inputs")
  block = min(block, tiling.round_up(length, sub))
  padded = tiling.round_up(length, block)
  if (name.startswith("block_k") and c.problem.has_segments and block % TPU_LANES
      and block != padded):
    raise ValueError(
        f"{c.block_sizes} with segment_ids breaks Mosaic's (8, 128) block rule: "
        f"BlockSizes.{name}={block} makes the key segment ids an [8, {block}] block, whose "
        f"last dim must be a multiple of 128 or the whole padded key axis ({padded})")
  return block, padded


def _mosaic_gpu_block(c: _Call, name: str, block: int, length: int) -> tuple[int, int]:
  """Mosaic GPU blocks: key blocks and backward query blocks multiples of 64 (wgmma rows or
  contraction); forward query blocks multiples of 8 whose rows over a kv group's G heads are
  a multiple of 64. A block past the (rounded-up) sequence shrinks to it."""
  from pallas_kernels.attention import mosaic_gpu  # pylint: disable=g-import-not-at-top
  step = mosaic_gpu.ROW_MULTIPLE
  if name == "block_q":
    step = mosaic_gpu.block_q_step(c.groups)
  if block % step:
    rule = (f"a multiple of {mosaic_gpu.SEQ_MULTIPLE} with G * block_q a multiple of "
            f"{mosaic_gpu.ROW_MULTIPLE} (G = {c.groups} query heads per kv head)"
            if name == "block_q" else f"a multiple of {mosaic_gpu.ROW_MULTIPLE}")
    raise ValueError(f"BlockSizes.{name}={block}: a Mosaic GPU block must be {rule}")
  block = min(block, tiling.round_up(length, step))
  return block, tiling.round_up(length, block)


def kernel_dims(c: _Call, q_len: int, kv_len: int, head_dim: int, fwd: bool):
  """(block_q, padded q_len, block_k, padded kv_len, head_dim the kernels compute with) of one
  call: Triton tiles round head_dim up to a power of two (in registers, not in memory)."""
  suffix = "" if fwd else "_bwd"
  bq, tq = _blocks(c, "block_q" + suffix, q_len)
  bk, tk = _blocks(c, "block_k" + suffix, kv_len)
  d = head_dim
  if c.implementation == "gpu":
    d = max(16, tiling.next_pow2(head_dim))
  elif c.implementation == "mosaic_gpu":
    from pallas_kernels.attention import mosaic_gpu  # pylint: disable=g-import-not-at-top
    d = mosaic_gpu.padded_head_dim(head_dim)  # in memory, to wgmma's k step (16)
  return bq, tq, bk, tk, d


def mosaic_gpu_default_block_sizes(groups: int, head_dim: int) -> common.BlockSizes:
  """Forward query blocks of G * block_q = 128 stacked rows (64 past head_dim 128), key
  blocks of 128 where shared memory allows (else 64), backward blocks of 64; see
  mosaic_gpu.default_block_sizes."""
  from pallas_kernels.attention import mosaic_gpu  # pylint: disable=g-import-not-at-top
  return common.BlockSizes(*mosaic_gpu.default_block_sizes(
      groups, mosaic_gpu.padded_head_dim(head_dim)))


def make_call(q_shape, kv_shape, *, causal, sliding_window, logit_softcap, has_segments,
              sm_scale, implementation, block_sizes, interpret, itemsize: int) -> _Call:
  groups = q_shape[2] // kv_shape[2]
  if block_sizes is None and implementation == "mosaic_gpu":
    block_sizes = mosaic_gpu_default_block_sizes(groups, q_shape[3])
  elif block_sizes is None:
    block_sizes = (GPU_BLOCK_SIZES if implementation == "gpu" else
                   tpu_default_block_sizes(q_shape[1], kv_shape[1], groups, itemsize))
  problem = common.Problem(
      causal=bool(causal), sliding_window=sliding_window,
      logit_softcap=None if logit_softcap is None else float(logit_softcap),
      sm_scale=float(sm_scale), kv_len=kv_shape[1], kv_padded=False,
      has_segments=has_segments)
  return _Call(problem, implementation, block_sizes, interpret, itemsize, groups)


def _pad_axis(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _to_kernel_layout(c: _Call, x, length: int):
  """[B, T, H, D] -> padded to `length`; [B, H, T, D] for the TPU kernels. head_dim is
  padded in memory (with zeros) only for Mosaic GPU, to a multiple of 16: Mosaic TPU blocks
  take the whole head_dim, and the Triton kernels load a power-of-two tile with the columns
  past head_dim masked to zero."""
  x = _pad_axis(x, 1, length)
  if c.implementation == "mosaic_gpu":
    from pallas_kernels.attention import mosaic_gpu  # pylint: disable=g-import-not-at-top
    return _pad_axis(x, 3, mosaic_gpu.padded_head_dim(x.shape[3]))
  return jnp.swapaxes(x, 1, 2) if c.implementation == "tpu" else x


def _prepare(c: _Call, q, k, v, seg, fwd: bool):
  """Inputs in the kernels' layout, and the (block_q, block_k) to run them with."""
  bq, tq, bk, tk, _ = kernel_dims(c, q.shape[1], k.shape[1], q.shape[3], fwd)
  q = _to_kernel_layout(c, q, tq)
  k, v = _to_kernel_layout(c, k, tk), _to_kernel_layout(c, v, tk)
  q_seg = k_seg = None
  if seg is not None:  # padded positions get any id: padded keys are masked by position
    q_seg, k_seg = _pad_axis(seg, 1, tq), _pad_axis(seg, 1, tk)
    if c.implementation == "tpu":  # query ids over the 128 lanes, key ids over 8 sublanes
      q_seg = jnp.broadcast_to(q_seg[:, :, None], (*q_seg.shape, TPU_LANES))
      k_seg = jnp.broadcast_to(k_seg[:, None, :], (k_seg.shape[0], 8, k_seg.shape[1]))
  return q, k, v, q_seg, k_seg, bq, bk


def problem_for(c: _Call, kv_padded_len: int) -> common.Problem:
  return dataclasses.replace(c.problem, kv_padded=kv_padded_len != c.problem.kv_len)


def _unprepare(c: _Call, x, length: int, d: int):
  if c.implementation == "tpu":
    x = jnp.swapaxes(x, 1, 2)
  return x[:, :length, :, :d]


def _kernels(impl: str):
  if impl == "gpu":
    from pallas_kernels.attention import gpu  # pylint: disable=g-import-not-at-top
    return gpu
  if impl == "mosaic_gpu":
    from pallas_kernels.attention import mosaic_gpu  # pylint: disable=g-import-not-at-top
    return mosaic_gpu
  from pallas_kernels.attention import tpu  # pylint: disable=g-import-not-at-top
  return tpu


def _fwd_impl(c: _Call, q, k, v, seg):
  qp, kp, vp, q_seg, k_seg, bq, bk = _prepare(c, q, k, v, seg, fwd=True)
  s_axis = 2 if c.implementation == "tpu" else 1
  p = problem_for(c, kp.shape[s_axis])
  out, lse = _kernels(c.implementation).forward(p, qp, kp, vp, q_seg, k_seg, block_q=bq,
                                                block_k=bk, interpret=c.interpret)
  return _unprepare(c, out, q.shape[1], q.shape[3]), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c: _Call, q, k, v, seg):
  return _fwd_impl(c, q, k, v, seg)[0]


def _flash_fwd(c: _Call, q, k, v, seg):
  out, lse = _fwd_impl(c, q, k, v, seg)
  return out, (q, k, v, seg, out, lse)


def _flash_bwd(c: _Call, residuals, dout):
  q, k, v, seg, out, lse = residuals
  qp, kp, vp, q_seg, k_seg, bq, bk = _prepare(c, q, k, v, seg, fwd=False)
  # The backward may use other blocks than the forward: out and dout are padded to this
  # query length, and lse (padded to the forward's) is cut or padded to it.
  tq = qp.shape[2] if c.implementation == "tpu" else qp.shape[1]
  outp, doutp = _to_kernel_layout(c, out, tq), _to_kernel_layout(c, dout, tq)
  lse = _pad_axis(lse[:, :, :tq], 2, tq)
  s_axis = 2 if c.implementation == "tpu" else 1
  p = problem_for(c, kp.shape[s_axis])
  dq, dk, dv = _kernels(c.implementation).backward(p, qp, kp, vp, q_seg, k_seg, outp, lse,
                                                   doutp, block_q=bq, block_k=bk,
                                                   interpret=c.interpret)
  d = q.shape[3]
  return (_unprepare(c, dq, q.shape[1], d), _unprepare(c, dk, k.shape[1], d),
          _unprepare(c, dv, k.shape[1], d), None)


_flash.defvjp(_flash_fwd, _flash_bwd)
_flash_jit = jax.jit(_flash, static_argnums=(0,))


def _check(q, k, v, causal, sliding_window, logit_softcap, segment_ids):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got shapes {q.shape}, "
                     f"{k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
  b, t, n, d = q.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"q {q.shape} and k/v {k.shape} must agree on batch and head_dim")
  if n % k.shape[2]:
    raise ValueError(f"q has {n} heads, which is not a multiple of k/v's {k.shape[2]} heads; "
                     "grouped-query attention shares each kv head by a whole number of query "
                     "heads")
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
    raise ValueError(f"q, k, v must share one dtype of float32/bfloat16/float16, got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")
  if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
    raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
  if logit_softcap is not None and not logit_softcap > 0:
    raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap!r}")
  if segment_ids is not None:
    if segment_ids.shape != (b, t) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be integers of shape [batch, seq] = {(b, t)}, got "
                       f"{segment_ids.dtype}{list(segment_ids.shape)}")
    if k.shape[1] != t:
      raise NotImplementedError(
          f"segment_ids with different query ({t}) and key ({k.shape[1]}) lengths: one "
          "[batch, seq] array labels both, so the lengths must match")
  del causal


def _check_memory(c: _Call, q_shape, kv_shape, fwd: bool) -> None:
  """ValueError naming the kernel, its blocks and the limit when one direction's kernels
  cannot fit the memory of the chip compiled for: VMEM on TPU (tpu.vmem_limit), shared memory
  per thread block on GPU (gpu.check_smem)."""
  bq, tq, bk, tk, _ = kernel_dims(c, q_shape[1], kv_shape[1], q_shape[3], fwd)
  b, _, n, d = q_shape
  q_kernel, kv_kernel = (b, tq, n, d), (b, tk, kv_shape[2], d)
  p = problem_for(c, tk)
  if c.implementation == "tpu":
    from pallas_kernels.attention import tpu  # pylint: disable=g-import-not-at-top
    q_kernel, kv_kernel = (b, n, tq, d), (b, kv_shape[2], tk, d)  # TPU kernels: [B, N, T, D]
    plans = ([tpu.forward_plan(p, q_kernel, kv_kernel, c.itemsize, block_q=bq, block_k=bk)]
             if fwd else tpu.backward_plans(p, q_kernel, kv_kernel, c.itemsize, block_q=bq,
                                            block_k=bk))
    for plan in plans:
      tpu.vmem_limit(plan)
    return
  from pallas_kernels.attention import gpu  # pylint: disable=g-import-not-at-top
  plans = ([gpu.forward_plan(p, q_kernel, kv_kernel, c.itemsize, block_q=bq, block_k=bk)]
           if fwd else gpu.backward_plans(p, q_kernel, kv_kernel, c.itemsize, block_q=bq,
                                          block_k=bk))
  for plan in plans:
    gpu.check_smem(plan, c.groups)


def _fit_memory(c: _Call, q_shape, kv_shape, fwd: bool) -> _Call:
  """c with its default blocks of one direction halved until every kernel of that direction
  fits the chip compiled for (_check_memory): TPU, the larger block first, to multiples of 128
  (never under 128): the 512 defaults fit v5e, v5p and v6e, v4's 16 MiB takes smaller ones;
  GPU (Triton), the query block first, then the key block, never under 16: a program holds the
  query rows of all G heads of a group, which past G * head_dim ~ 1024 exceed an H100's
  227 KiB. Raises _check_memory's error when the smallest blocks do not fit."""
  names = ("block_q", "block_k") if fwd else ("block_q_bwd", "block_k_bwd")
  floor = TPU_LANES if c.implementation == "tpu" else 16
  while True:
    bq, _, bk, _, _ = kernel_dims(c, q_shape[1], kv_shape[1], q_shape[3], fwd)
    try:
      _check_memory(c, q_shape, kv_shape, fwd)
      return c
    except ValueError:
      if max(bq, bk) <= floor:
        raise
    if c.implementation == "tpu":
      name, block = (names[1], bk) if bk >= bq else (names[0], bq)
      smaller = max(floor, tiling.round_up(block // 2, floor))
    else:
      name, block = (names[0], bq) if bq > floor else (names[1], bk)
      smaller = block // 2
    c = dataclasses.replace(c, block_sizes=dataclasses.replace(c.block_sizes, **{name: smaller}))


def _check_mosaic_gpu(q, interpret):
  from pallas_kernels.attention import mosaic_gpu  # pylint: disable=g-import-not-at-top
  if interpret is not False and interpret is not None and (
      not compat.is_gpu_interpret_params(interpret)):
    raise ValueError(f"implementation='mosaic_gpu' runs on a CPU only in Mosaic GPU's "
                     f"interpreter: pass interpret=compat.gpu_interpret_params(...) (jax >= "
                     f"0.12), got interpret={interpret!r}")
  if jnp.dtype(q.dtype) not in mosaic_gpu.DTYPES:
    raise NotImplementedError(
        f"implementation='mosaic_gpu' takes bfloat16/float16 inputs, got {q.dtype} (wgmma "
        "computes float32 operands in tf32); use implementation='gpu'")
  if q.shape[-1] > mosaic_gpu.MAX_HEAD_DIM:
    raise NotImplementedError(f"implementation='mosaic_gpu' with head_dim={q.shape[-1]} > "
                              f"{mosaic_gpu.MAX_HEAD_DIM}")


def default_implementation(interpret: Any = False, dtype=None) -> str:
  """The platform's kernels (tiling.default_implementation): mosaic_gpu on Hopper (compute
  capability 9.x) for bf16/fp16 inputs (dtype None: assumed so), gpu (Triton) for float32
  there and on other GPUs, tpu on TPUs; elsewhere the reference, or under interpret mode the
  family the interpret argument asks for (True: the Triton-style kernel; Mosaic GPU params:
  mosaic_gpu; TPU params: tpu)."""
  impl = tiling.default_implementation(interpret, mosaic_gpu=True)
  if impl == "mosaic_gpu" and not compat.is_gpu_interpret_params(interpret) and (
      dtype is not None and jnp.dtype(dtype) == jnp.float32):
    return "gpu"  # wgmma on float32 operands would compute in tf32
  return impl or "reference"


def flash_attention(q, k, v, *, causal: bool = False, sliding_window: int | None = None,
                    logit_softcap: float | None = None, segment_ids=None,
                    sm_scale: float | None = None,
                    block_sizes: common.BlockSizes | None = None,
                    implementation: str | None = None, interpret: Any = False):
  """Memory-efficient attention on [batch, seq, heads, head_dim] arrays, with gradients.

  Args:
    q: [B, T, N, D] queries.
    k, v: [B, S, K, D] keys and values; N must be a multiple of K (grouped-query attention:
      query head n uses kv head n // (N // K)).
    causal: query i sees keys j <= i.
    sliding_window: w; causal: i - w < j <= i; not causal: |i - j| < w.
    logit_softcap: cap; logits become cap * tanh(logits / cap) after scaling.
    segment_ids: [B, T] integers (needs S == T); tokens attend only within their segment. A
      query that sees no key at all outputs zeros.
    sm_scale: logit scale, default D ** -0.5.
    block_sizes: tiles (see common.BlockSizes); defaults per implementation (TPU: shape-aware,
      see tpu_default_block_sizes). On TPU blocks follow Mosaic's (8, 128) rule (multiples of
      8, 16 for 16-bit inputs; with segment_ids block_k a multiple of 128 unless one block
      covers the keys); a bad block is a ValueError naming it and the rule.
    implementation: "reference" (pure jnp, differentiated by JAX), "gpu" (Triton-style
      Pallas), "mosaic_gpu" (Hopper: TMA pipelines and wgmma; bf16/fp16 only; see
      mosaic_gpu.py) or "tpu" (Mosaic Pallas); None picks by platform (see
      default_implementation).
    interpret: run the Pallas kernels in an interpreter (True: the generic one; a
      `pltpu.InterpretParams`: the TPU simulator; a `plgpu.InterpretGPUParams`, jax >= 0.12:
      Mosaic GPU's simulator).

  Returns:
    [B, T, N, D] in q's dtype (softmax statistics in float32).
  """
  _check(q, k, v, causal, sliding_window, logit_softcap, segment_ids)
  impl = implementation or default_implementation(interpret, q.dtype)
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={impl!r} is not one of {list(IMPLEMENTATIONS)} or None")
  if impl == "mosaic_gpu":
    _check_mosaic_gpu(q, interpret)
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  if 0 in q.shape or 0 in k.shape:  # nothing to attend to (or with): rows of zeros, no kernel
    return jnp.zeros_like(q)
  if impl == "reference":
    return reference.attention_reference(q, k, v, causal=causal, sliding_window=sliding_window,
                                         logit_softcap=logit_softcap,
                                         segment_ids_BT=segment_ids, sm_scale=sm_scale)
  if impl == "gpu" and q.shape[-1] > GPU_MAX_HEAD_DIM:
    raise NotImplementedError(f"implementation='gpu' with head_dim={q.shape[-1]} > "
                              f"{GPU_MAX_HEAD_DIM}")
  call = make_call(q.shape, k.shape, causal=causal, sliding_window=sliding_window,
                   logit_softcap=logit_softcap, has_segments=segment_ids is not None,
                   sm_scale=sm_scale, implementation=impl, block_sizes=block_sizes,
                   interpret=interpret, itemsize=q.dtype.itemsize)
  for fwd in (True, False):  # refuse blocks the platform cannot tile or hold before tracing
    kernel_dims(call, q.shape[1], k.shape[1], q.shape[3], fwd)  # the block rules
    if impl in ("tpu", "gpu") and block_sizes is None:
      call = _fit_memory(call, q.shape, k.shape, fwd)
    elif impl in ("tpu", "gpu"):
      _check_memory(call, q.shape, k.shape, fwd)
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  return _flash_jit(call, q, k, v, seg)
