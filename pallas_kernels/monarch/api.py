"""The public fused Monarch entry: validation, implementation choice, token padding,
custom_vjp.

monarch(x, w1, w2, out_features) computes effjax's MonarchLinear product (factors in the
layer's own parameter layout) in one kernel per direction:

  forward   x -> y, the intermediate kept on chip (tpu.forward);
  backward  (x, dy) -> (dx, dw1, dw2) in one kernel that recomputes the intermediate
            (tpu.backward); the weight gradients accumulate in float32 and are cast to the
            factors' dtype.

w1's rows are reordered per block into routing order before the kernels and its gradient is
put back after (common.routing: weight-sized gathers, no activation moves). Tokens are padded
with zero rows up to a multiple of the token block only when they are not one already.
Implementations: "tpu" (Mosaic TPU; runs on a CPU in the TPU interpreter) and "reference"
(plain jnp). There is no GPU kernel yet: asking for one is a NotImplementedError.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import tiling
from pallas_kernels.monarch import common
from pallas_kernels.monarch import reference
from pallas_kernels.monarch import tpu

IMPLEMENTATIONS = ("reference", "tpu")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class _Call:
  """Everything static about one call: hashable, so it can parameterise custom_vjp."""
  out_features: int
  block_t: int
  interpret: Any


def default_implementation(interpret=False) -> str:
  """"tpu" on a TPU or in the TPU interpreter; otherwise there is no kernel to pick."""
  if tiling.default_implementation(interpret) == "tpu":
    return "tpu"
  raise NotImplementedError(
      f"pallas_kernels.monarch: no fused Monarch kernel for platform "
      f"{jax.default_backend()!r} (a TPU kernel only; run it on a CPU with "
      "interpret=pltpu.InterpretParams()); use the XLA layer (monarch_impl='xla') or "
      "implementation='reference'")


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


def _fused_forward(x, w1, w2, call: _Call):
  k, q, _ = w1.shape
  order, _ = common.routing(k, q)
  t = x.shape[0]
  padded = tiling.round_up(max(t, 1), call.block_t)
  y = tpu.forward(_pad_rows(x, padded), _reorder_rows(w1, order), w2,
                  out_features=call.out_features, block_t=call.block_t,
                  interpret=call.interpret)
  return y[:t], (x, w1, w2)


def _fused_backward(call: _Call, residuals, dy):
  x, w1, w2 = residuals
  k, q, _ = w1.shape
  order, _ = common.routing(k, q)
  t = x.shape[0]
  padded = tiling.round_up(max(t, 1), call.block_t)
  dx, dw1, dw2 = tpu.backward(_pad_rows(x, padded), _reorder_rows(w1, order), w2,
                              _pad_rows(dy.astype(x.dtype), padded), block_t=call.block_t,
                              interpret=call.interpret)
  return dx[:t], _unorder_rows(dw1, order).astype(w1.dtype), dw2.astype(w2.dtype)


_fused.defvjp(_fused_forward, _fused_backward)


def monarch(x, w1, w2, out_features: int, *, implementation: str | None = None,
            blocks: common.Blocks = common.Blocks(), interpret=False):
  """x [..., n_in] -> [..., out_features] with factors w1 [k, q, p], w2 [k, s, q].

  `interpret`: False on a TPU; `pltpu.InterpretParams(...)` runs the TPU kernel in the TPU
  interpreter on a CPU. Differentiable in x, w1 and w2.
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
  if blocks.tokens < 8 or blocks.tokens % 8:
    raise ValueError(f"monarch: Blocks.tokens must be a positive multiple of 8, got "
                     f"{blocks.tokens}")
  implementation = implementation or default_implementation(interpret)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"monarch: implementation {implementation!r} is not one of "
                     f"{IMPLEMENTATIONS}")
  lead = x.shape[:-1]
  x2 = x.reshape(math.prod(lead), n_in)
  if implementation == "reference":
    y = reference.monarch_reference(x2, w1, w2, out_features)
  else:
    block_t = min(blocks.tokens, tiling.round_up(max(x2.shape[0], 1), 8))
    y = _fused(x2, w1, w2, _Call(out_features, block_t, interpret))
  return y.reshape(*lead, out_features)
