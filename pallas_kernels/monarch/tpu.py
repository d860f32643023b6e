"""The fused Monarch layer as Mosaic TPU `pallas_call`s: forward, and one backward for dx, dw1
and dw2.

Grid: one step per tile of `Blocks.tokens` rows. Both factors stay in VMEM for the whole grid
(their block index never changes, so they are fetched once); x is read once and y written
once, in the layer's own token-major layout. Inside a step, with w1's rows reordered per block
(common.routing), block j's intermediate h_j = x_j w1'_j^T holds k contiguous runs, one per
output block l, and output block l accumulates h_j[run] w2_l[:, run']^T over j: the stride
permutation is static slicing, and the intermediate never leaves the chip. The output
permutation (column c k + l of y is row c of output block l) is an in-register interleave.

Backward (same grid, steps in order): the step recomputes h from x (one factor's work, instead
of writing h to memory in the forward and reading it back), then forms dh = dy w2 per block,
dx = dh w1', and adds the step's share of dw1' = dh^T x and dw2 = dy^T h into float32 output
blocks that stay resident across the grid (written back once at the end).

Status: checked against the reference in the TPU interpreter and lowered for "tpu" on a CPU;
not compiled by Mosaic on TPU hardware. On a TPU the runs and block widths should be
multiples of 128 lanes for the MXU; narrower ones are correct in the interpreter but untested
by Mosaic's layout passes.
"""
from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels import tiling
from pallas_kernels.monarch import common


def _intermediates(x, w1_ref, *, k, p, n_in, dtype):
  """Block j's reordered intermediate h_j [rows, q] (None where block j reads no input)."""
  hs = []
  for j in range(k):
    lo, hi = common.input_span(j, p, n_in)
    hs.append(None if hi == lo else
              tiling.dot(x[:, lo:hi], w1_ref[j, :, :hi - lo], tiling.NT_DIMS).astype(dtype))
  return hs


def _interleave(blocks, n_out):
  """[rows, s] per output block l -> [rows, n_out], column c k + l from row c of block l."""
  rows, s = blocks[0].shape
  return jnp.stack(blocks, axis=-1).reshape(rows, s * len(blocks))[:, :n_out]


def _deinterleave(y, k, s):
  rows, n_out = y.shape
  if n_out < s * k:
    y = jnp.concatenate([y, jnp.zeros((rows, s * k - n_out), y.dtype)], axis=1)
  y = y.reshape(rows, s, k)
  return [y[:, :, l] for l in range(k)]


def _forward_kernel(x_ref, w1_ref, w2_ref, y_ref, *, routes, p, n_in, n_out):
  k, s, _ = w2_ref.shape
  x = x_ref[...]
  hs = _intermediates(x, w1_ref, k=k, p=p, n_in=n_in, dtype=x.dtype)
  ys = [jnp.zeros((x.shape[0], s), jnp.float32) for _ in range(k)]
  for route in routes:
    h = hs[route.j]
    if h is None:
      continue
    run = h[:, route.offset:route.offset + route.count]
    ys[route.l] = ys[route.l] + tiling.dot(
        run, w2_ref[route.l, :, route.a_start:route.a_start + route.count], tiling.NT_DIMS)
  y_ref[...] = _interleave(ys, n_out).astype(y_ref.dtype)


def _backward_kernel(x_ref, w1_ref, w2_ref, dy_ref, dx_ref, dw1_ref, dw2_ref, *, routes, p,
                     n_in):
  k, s, _ = w2_ref.shape
  q = w1_ref.shape[1]

  @pl.when(pl.program_id(0) == 0)
  def _zero():
    dw1_ref[...] = jnp.zeros(dw1_ref.shape, dw1_ref.dtype)
    dw2_ref[...] = jnp.zeros(dw2_ref.shape, dw2_ref.dtype)

  x, dy = x_ref[...], dy_ref[...]
  dtype = x.dtype
  hs = _intermediates(x, w1_ref, k=k, p=p, n_in=n_in, dtype=dtype)
  dys = _deinterleave(dy, k, s)
  dh2s = [tiling.dot(dys[l], w2_ref[l], tiling.NN_DIMS).astype(dtype)  # [rows, r]
          for l in range(k)]
  dh_runs = [[] for _ in range(k)]
  for route in routes:
    a = slice(route.a_start, route.a_start + route.count)
    dh_runs[route.j].append(dh2s[route.l][:, a])
    h = hs[route.j]
    if h is not None:
      run = h[:, route.offset:route.offset + route.count]
      dw2_ref[route.l, :, a] += tiling.dot(dys[route.l], run, tiling.TN_DIMS)
  dxs = []
  for j in range(k):
    lo, hi = common.input_span(j, p, n_in)
    if hi == lo:
      continue
    dh = jnp.concatenate(dh_runs[j], axis=1) if len(dh_runs[j]) > 1 else dh_runs[j][0]
    assert dh.shape[1] == q
    dxs.append(tiling.dot(dh, w1_ref[j, :, :hi - lo], tiling.NN_DIMS))
    dw1_ref[j, :, :hi - lo] += tiling.dot(dh, x[:, lo:hi], tiling.TN_DIMS)
  dx = jnp.concatenate(dxs, axis=1) if len(dxs) > 1 else dxs[0]
  dx_ref[...] = dx.astype(dx_ref.dtype)


# Mosaic allocates far more than the buffers counted below: the unrolled per-block and
# per-route code keeps many [tokens, width] float32 values live. Measured (256-token blocks,
# nblocks 4, bf16, 8192 tokens), the backward used 36.2 MiB at 1024 -> 1024 on v5e (39.7 on
# v5p, 40.5 on v6e; counted 12.0), 72.4 at 2048 -> 2048 (counted 36.0) and 34.1 at 3072 -> 768
# (counted 18.0) on v5e; 768 -> 3072 given 47 MiB overflowed the whole VMEM (131.6 MiB used of
# v5e's 128). max(2.1 x counted, counted + 30 MiB) covers these, so it is the limit asked for
# as it is (no further headroom). No forward overflowed; it uses the same rule.
_VMEM_SCALE, _VMEM_FLOOR = 2.1, 30 << 20


def vmem_bytes(block_t: int, n_in: int, n_out: int, w1_shape, w2_shape, itemsize: int,
               direction: str) -> int:
  """Estimated VMEM of the forward or backward kernel: double-buffered token blocks and
  factors (resident, but pipelined like any block), float32 weight-gradient blocks in the
  backward, and a step's float32 intermediates (h, the output accumulators; dh in the
  backward), scaled by the calibration above."""
  k, q, p = w1_shape
  s = w2_shape[1]
  tile = tiling.tpu_vmem_tile_bytes
  factors = tile(w1_shape, itemsize) + tile(w2_shape, itemsize)
  if direction == "forward":
    blocks = tile((block_t, n_in), itemsize) + tile((block_t, n_out), itemsize) + factors
    temps = tile((block_t, k * q), 4) + tile((block_t, k * s), 4)
  else:
    blocks = (2 * tile((block_t, n_in), itemsize) + tile((block_t, n_out), itemsize) + factors
              + tile(w1_shape, 4) + tile(w2_shape, 4))
    temps = 2 * tile((block_t, k * q), 4) + tile((block_t, k * s), 4)
  counted = 2 * blocks + temps
  return int(max(_VMEM_SCALE * counted, counted + _VMEM_FLOOR))


def vmem_limits(block_t: int, n_in: int, n_out: int, w1_shape, w2_shape,
                itemsize: int) -> tuple[int | None, int | None]:
  """(forward, backward) vmem_limit_bytes; a ValueError naming the layer when the resident
  factors (and, backward, their float32 gradients) cannot fit (tiling.tpu_vmem_limit)."""
  what = (f"the fused Monarch TPU {{}} kernel for {n_in} -> {n_out} with factors {w1_shape} "
          f"and {w2_shape} ({itemsize}-byte) and {block_t}-token blocks, which keeps the whole "
          "factors in VMEM,")
  return tuple(tiling.tpu_vmem_limit(
      vmem_bytes(block_t, n_in, n_out, w1_shape, w2_shape, itemsize, d), what.format(d),
      headroom=1.0, advice="use the XLA layer (monarch_impl='xla') at this width")
      for d in ("forward", "backward"))


def _whole(shape):
  return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def _rows(block_t, width):
  return pl.BlockSpec((block_t, width), lambda i: (i, 0))


def forward(x, w1_reordered, w2, *, out_features: int, block_t: int, interpret=False):
  """x [T, n_in] (T a multiple of block_t), w1 with rows in routing order -> y [T, n_out]."""
  t, n_in = x.shape
  k, q, p = w1_reordered.shape
  _, routes = common.routing(k, q)
  flops, moved = common.work(t, n_in, out_features, w1_reordered.shape, w2.shape,
                             x.dtype.itemsize, "forward")
  return pl.pallas_call(
      functools.partial(_forward_kernel, routes=routes, p=p, n_in=n_in, n_out=out_features),
      grid=(t // block_t,),
      in_specs=[_rows(block_t, n_in), _whole(w1_reordered.shape), _whole(w2.shape)],
      out_specs=_rows(block_t, out_features),
      out_shape=jax.ShapeDtypeStruct((t, out_features), x.dtype),
      compiler_params=compat.tpu_compiler_params(("parallel",), vmem_limits(
          block_t, n_in, out_features, w1_reordered.shape, w2.shape, x.dtype.itemsize)[0]),
      interpret=interpret,
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=moved),
      name="effjax_monarch_fwd_tpu",
  )(x, w1_reordered, w2)


def backward(x, w1_reordered, w2, dy, *, block_t: int, interpret=False):
  """(dx [T, n_in], dw1 in routing order, dw2), the weight gradients in float32."""
  t, n_in = x.shape
  k, q, p = w1_reordered.shape
  _, routes = common.routing(k, q)
  flops, moved = common.work(t, n_in, dy.shape[1], w1_reordered.shape, w2.shape,
                             x.dtype.itemsize, "backward")
  return pl.pallas_call(
      functools.partial(_backward_kernel, routes=routes, p=p, n_in=n_in),
      grid=(t // block_t,),
      in_specs=[_rows(block_t, n_in), _whole(w1_reordered.shape), _whole(w2.shape),
                _rows(block_t, dy.shape[1])],
      out_specs=[_rows(block_t, n_in), _whole(w1_reordered.shape), _whole(w2.shape)],
      out_shape=[jax.ShapeDtypeStruct((t, n_in), x.dtype),
                 jax.ShapeDtypeStruct(w1_reordered.shape, jnp.float32),
                 jax.ShapeDtypeStruct(w2.shape, jnp.float32)],
      # the weight gradients accumulate over the token tiles: steps run in order
      compiler_params=compat.tpu_compiler_params(("arbitrary",), vmem_limits(
          block_t, n_in, dy.shape[1], w1_reordered.shape, w2.shape, x.dtype.itemsize)[1]),
      interpret=interpret,
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=moved),
      name="effjax_monarch_bwd_tpu",
  )(x, w1_reordered, w2, dy)
