"""The public fused Monarch entry: validation, implementation choice, token padding,
custom_vjp.

monarch(x, w1, w2, out_features) computes effjax's MonarchLinear product (factors in the
layer's own parameter layout) in fused kernels:

  forward   x -> y, the intermediate kept on chip (tpu.forward, mosaic_gpu.forward);
  backward  (x, dy) -> (dx, dw1, dw2): on a TPU one kernel that recomputes the intermediate
            (tpu.backward); on Mosaic GPU a token-tile kernel for dx (recomputing the
            intermediate) and two weight-gradient kernels (mosaic_gpu.backward says why).
            The weight gradients accumulate in float32 and are cast to the factors' dtype.

w1's rows are reordered per block into routing order before the kernels and its gradient is
put back after (common.routing: weight-sized gathers, no activation moves). Tokens are padded
with zero rows up to a multiple of the token block only when they are not one already; for
Mosaic GPU, x's columns are zero-padded to k p and y's cut to out_features only when the
layer is padded (n_in < k p, n_out < k s).
Implementations: "tpu" (Mosaic TPU; runs on a CPU in the TPU interpreter), "mosaic_gpu"
(Hopper; bfloat16/float16; runs on a CPU in Mosaic GPU's interpreter, jax >= 0.12) and
"reference" (plain jnp).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels import tiling
from pallas_kernels.monarch import common
from pallas_kernels.monarch import mosaic_gpu
from pallas_kernels.monarch import reference
from pallas_kernels.monarch import tpu

IMPLEMENTATIONS = ("reference", "tpu", "mosaic_gpu")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_TPU_DTYPES = DTYPES[:2]


@dataclasses.dataclass(frozen=True)
class _Call:
  """Everything static about one call: hashable, so it can parameterise custom_vjp."""
  out_features: int
  block_t: int
  interpret: Any
  implementation: str = "tpu"
  gpu_plan: Any = None  # mosaic_gpu.Plan


def default_implementation(interpret=False, dtype=None) -> str:
  """The kernel for this platform: "tpu" on a TPU or with TPU interpreter params;
  "mosaic_gpu" on a GPU of compute capability 9.x (Hopper) for bfloat16/float16 (dtype None:
  assumed so) or with Mosaic GPU interpreter params. Anything else has no fused kernel: a
  NotImplementedError saying why."""
  family = tiling.default_implementation(interpret, mosaic_gpu=True)
  if family == "tpu":
    return "tpu"
  use_xla = "use the XLA layer (monarch_impl='xla') or implementation='reference'"
  if family == "mosaic_gpu":
    if dtype is not None and jnp.dtype(dtype) == jnp.float32:
      raise NotImplementedError(
          "pallas_kernels.monarch: the fused Monarch GPU kernel (Mosaic GPU) takes "
          "bfloat16/float16, got float32 (wgmma computes float32 operands in tf32); "
          + use_xla)
    return "mosaic_gpu"
  if family == "gpu" and interpret is not True:
    capability = compat.cuda_compute_capability()
    raise NotImplementedError(
        f"pallas_kernels.monarch: no fused Monarch kernel for this GPU (compute capability "
        f"{'unknown' if capability is None else '.'.join(map(str, capability))}; the Mosaic "
        "GPU kernel needs Hopper, 9.x); " + use_xla)
  raise NotImplementedError(
      f"pallas_kernels.monarch: no fused Monarch kernel for platform "
      f"{tiling.compiling_platform()!r}{' with interpret=True' if interpret is True else ''} (TPU "
      "and Hopper GPU kernels only; on a CPU run them in their interpreters: "
      "interpret=pltpu.InterpretParams() or, jax >= 0.12, compat.gpu_interpret_params()); "
      + use_xla)


def _reorder_rows(w, order):
  return jnp.take_along_axis(w, jnp.asarray(order)[:, :, None], axis=1)


def _unorder_rows(w, order):
  inverse = jnp.argsort(jnp.asarray(order), axis=1)
  return jnp.take_along_axis(w, inverse[:, :, None], axis=1)


def _pad_rows(a, rows):
  return a if a.shape[0] == rows else jnp.pad(a, ((0, rows - a.shape[0]), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(x, w1, w2, call: _Call):
  return _fused_forward(x, w1, w2, call)[0]


def _pad_columns(a, columns):
  return a if a.shape[1] == columns else jnp.pad(a, ((0, 0), (0, columns - a.shape[1])))


def _fused_forward(x, w1, w2, call: _Call):
  k, q, p = w1.shape
  order, _ = common.routing(k, q)
  t = x.shape[0]
  padded = tiling.round_up(max(t, 1), call.block_t)
  if call.implementation == "mosaic_gpu":
    y = mosaic_gpu.forward(_pad_columns(_pad_rows(x, padded), k * p), _reorder_rows(w1, order),
                           w2, plan=call.gpu_plan, interpret=call.interpret)
    return y[:t, :call.out_features], (x, w1, w2)
  y = tpu.forward(_pad_rows(x, padded), _reorder_rows(w1, order), w2,
                  out_features=call.out_features, block_t=call.block_t,
                  interpret=call.interpret)
  return y[:t], (x, w1, w2)


def _fused_backward(call: _Call, residuals, dy):
  x, w1, w2 = residuals
  k, q, p = w1.shape
  order, _ = common.routing(k, q)
  t, n_in = x.shape
  padded = tiling.round_up(max(t, 1), call.block_t)
  if call.implementation == "mosaic_gpu":
    dx, dw1, dw2 = mosaic_gpu.backward(
        _pad_columns(_pad_rows(x, padded), k * p), _reorder_rows(w1, order), w2,
        _pad_columns(_pad_rows(dy.astype(x.dtype), padded), k * w2.shape[1]),
        plan=call.gpu_plan, interpret=call.interpret)
    dx = dx[:t, :n_in]
  else:
    dx, dw1, dw2 = tpu.backward(_pad_rows(x, padded), _reorder_rows(w1, order), w2,
                                _pad_rows(dy.astype(x.dtype), padded), block_t=call.block_t,
                                interpret=call.interpret)
    dx = dx[:t]
  return dx, _unorder_rows(dw1, order).astype(w1.dtype), dw2.astype(w2.dtype)


_fused.defvjp(_fused_forward, _fused_backward)


def monarch(x, w1, w2, out_features: int, *, implementation: str | None = None,
            blocks: common.Blocks = common.Blocks(), interpret=False):
  """x [..., n_in] -> [..., out_features] with factors w1 [k, q, p], w2 [k, s, q].

  `implementation`: "tpu", "mosaic_gpu", "reference", or None for the platform's kernel
  (default_implementation). `interpret`: False on a device; `pltpu.InterpretParams(...)`
  runs the TPU kernel in the TPU interpreter on a CPU, `compat.gpu_interpret_params(...)`
  (jax >= 0.12) the Mosaic GPU kernels in Mosaic GPU's interpreter. Differentiable in x, w1
  and w2. Mosaic GPU's shape rules: mosaic_gpu.plan (checked here, before tracing).
  """
  if w1.ndim != 3 or w2.ndim != 3 or w1.shape[0] != w2.shape[0] or w2.shape[2] != w1.shape[1]:
    raise ValueError(f"monarch: w1 {w1.shape} and w2 {w2.shape} are not the factors of one "
                     "Monarch layer ([k, q, p] and [k, s, q])")
  k, _, p = w1.shape
  s = w2.shape[1]
  n_in = x.shape[-1]
  if not 0 < n_in <= k * p or not 0 < out_features <= k * s:
    raise ValueError(f"monarch: x [..., {n_in}] -> {out_features} does not fit factors "
                     f"w1 {w1.shape} and w2 {w2.shape}")
  if not x.dtype == w1.dtype == w2.dtype or jnp.dtype(x.dtype) not in DTYPES:
    raise ValueError(f"monarch: x, w1, w2 must share one dtype of {[str(d) for d in DTYPES]}, "
                     f"got {x.dtype}, {w1.dtype}, {w2.dtype}")
  if blocks.tokens is not None and (blocks.tokens < 8 or blocks.tokens % 8):
    raise ValueError(f"monarch: Blocks.tokens must be a positive multiple of 8, got "
                     f"{blocks.tokens}")
  implementation = implementation or default_implementation(interpret, x.dtype)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"monarch: implementation {implementation!r} is not one of "
                     f"{IMPLEMENTATIONS}")
  lead = x.shape[:-1]
  x2 = x.reshape(math.prod(lead), n_in)
  if implementation == "reference":
    y = reference.monarch_reference(x2, w1, w2, out_features)
  elif implementation == "mosaic_gpu":
    if interpret is not False and not compat.is_gpu_interpret_params(interpret):
      raise ValueError(f"monarch: implementation='mosaic_gpu' runs on a CPU only in Mosaic "
                       f"GPU's interpreter: pass interpret=compat.gpu_interpret_params(...) "
                       f"(jax >= 0.12), got interpret={interpret!r}")
    if blocks.tokens not in (None, mosaic_gpu.TILE_ROWS):
      raise ValueError(f"monarch: the Mosaic GPU kernels take tiles of {mosaic_gpu.TILE_ROWS} "
                       f"tokens (one wgmma's rows), got Blocks.tokens={blocks.tokens}")
    plan = mosaic_gpu.plan(n_in, out_features, w1.shape, w2.shape, x.dtype)  # before tracing
    y = _fused(x2, w1, w2, _Call(out_features, mosaic_gpu.TILE_ROWS, interpret,
                                 "mosaic_gpu", plan))
  else:
    if jnp.dtype(x.dtype) not in _TPU_DTYPES:
      raise ValueError(f"monarch: implementation='tpu' takes float32 or bfloat16, got "
                       f"{x.dtype}")
    tokens = common.Blocks.TPU_TOKENS if blocks.tokens is None else blocks.tokens
    block_t = min(tokens, tiling.round_up(max(x2.shape[0], 1), 8))
    tpu.vmem_limits(block_t, n_in, out_features, w1.shape, w2.shape,  # refuses before tracing
                    x.dtype.itemsize)
    y = _fused(x2, w1, w2, _Call(out_features, block_t, interpret))
  return y.reshape(*lead, out_features)
