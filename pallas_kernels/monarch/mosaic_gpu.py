"""The fused Monarch layer as Mosaic GPU kernels (Hopper, sm90a): forward, and a backward of
one token-tile kernel (dx) and one weight-gradient kernel per factor.

Forward: one CTA (one warpgroup) per tile of TILE_ROWS = 64 tokens, the rows of one wgmma.

  factor 1  for each input block j, h_j = x_j w1'_j^T over p in 64-column chunks (a
            two-stage pipeline of TMA loads of x and w1 chunks into swizzled SMEM, wgmma
            into a float32 accumulator). w1's rows are in routing order (common.routing),
            so h_j is k runs of consecutive columns, run (j, l) holding channels
            [a_start, a_start + count) of output block l. Each run is stored, rounded to
            the dtype as the reference does, at those channels of H_l, the permuted
            intermediate, kept in SMEM for the whole tile ([k, 64, q]): the stride
            permutation is these static run stores.
  factor 2  for each chunk of C = 64 output channels and each output block l, H_l times a
            TMA-loaded [C, q] chunk of w2_l by wgmma. Column c k + l of y is row c of block
            l: the product goes to an unswizzled SMEM tile in the accumulator's layout, is
            read back one element per thread (128 at a time) and stored to y at stride k.
            x is read once, y written once, the intermediate never leaves the chip.

  Why the interleave goes element by element: Mosaic GPU has no register shuffle for it,
  cannot store the accumulator's layout at a stride, and TMA needs 16-byte strides (a
  [T, s, k] view of y has 2k-byte ones); a wgmma producing interleaved columns directly
  would redo factor 2 once per block (k times its FLOPs).

Backward (backward()): dy is first put block-major by XLA (one copy of dy, read twice).

  data      grid over 64-token tiles: H again (as the forward; cheaper than writing it in
            the forward), dH_l = dy_l w2_l, each run of dH_l written back where it came
            from (dh_j, in H's SMEM), dx_j = dh_j w1'_j by TMA-stored tiles. H and dh are also
            written to memory ([T, k q] each) for the weight gradients.
  weights   dw2_l = dy_l^T H_l and dw1'_j = dh_j^T x_j: a grid over (block, 64 x 64 output
            tile), each CTA pipelining over all token tiles into a float32 accumulator.
            Why not in the data kernel (as tpu.py does): GPU CTAs run concurrently, so
            per-token-tile partial weight gradients would need atomics (unordered, and races
            to the race detector) or a [T / 64, weights] partial sum in memory (128 copies of
            the factors in float32 at 8192 tokens); a grid over weight tiles that loops over
            tokens reads H, dh, dy and x (T / 64 tiles each) instead, far fewer bytes.

Factor 1 (forward and backward), dH and the weight-gradient kernels overlap the next step's
TMA loads with the current wgmma (two-stage plgpu.emit_pipeline); factor 2 and dx load a
chunk and await it before its wgmma. Nothing here has been compiled by ptxas, run or timed
on a GPU.

Shape rules (plan() checks them before tracing; api.py pads tokens to 64, x's columns to
k p and cuts y to out_features): bfloat16/float16 only (wgmma computes float32 operands in
tf32); p, q and s multiples of 64 (64-column swizzled tiles); q <= 256 (one TMA box, one
accumulator); every run of the stride permutation starting and ending on a multiple of 16
channels (for k dividing q: q / k a multiple of 16; routing fixes q, so it cannot be padded);
and SMEM within 227 KiB: the intermediate of 64 tokens (2 k q bytes per token) plus one
phase's staging tiles, so k q + 2 q <= 1656 in 16-bit (GPT-2 small's MLP, k q = 768, and
1024 -> 1024 with 4 blocks fit; 2048 -> 2048 with 4 or 8 blocks does not and is refused).

Status: checked against the reference in Mosaic GPU's interpreter with its race detector
(jax >= 0.12) and lowered for an abstract H100 on 0.10.2 and 0.12.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels.monarch import common

TILE_ROWS = 64  # tokens per CTA: the rows of one wgmma
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SMEM_BYTES = 227 * 1024  # Hopper's largest shared memory per block
_MAX_BOX = 256  # TMA box extent and wgmma N
_WG_THREADS = 128
_CHUNK = 64  # columns per TMA tile and wgmma step (128-byte swizzle rows)
_SMEM_ALIGNMENT_SLACK = 4096  # swizzled tiles start on 1024-byte boundaries


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static tiling of one forward call (hashable)."""
  k: int
  p: int
  q: int
  s: int
  x_chunk: int  # columns of x (and w1) per TMA load and wgmma
  h_swizzle: int  # elements per swizzle row of H and w2 (factor 2's contraction)
  out_chunk: int  # C: output channels per block per step
  smem_bytes: int  # what the forward and the token-tile backward allocate, at most


def _widest_swizzle(n: int) -> int | None:
  """The widest swizzle row (in 16-bit elements: 64, 32 or 16) that divides n."""
  for elems in (64, 32, 16):
    if n % elems == 0:
      return elems
  return None


def plan(n_in: int, n_out: int, w1_shape, w2_shape, dtype) -> Plan:
  """The kernels' tiling, or an error naming the dtype or size that breaks a rule."""
  del n_in, n_out  # api.py pads x's columns to k p and cuts y's to out_features
  if jnp.dtype(dtype) not in DTYPES:
    raise NotImplementedError(
        f"monarch: implementation='mosaic_gpu' takes bfloat16/float16, got "
        f"{jnp.dtype(dtype)} (wgmma computes float32 operands in tf32); use the XLA layer "
        "(monarch_impl='xla') or implementation='reference' for float32")
  k, q, p = w1_shape
  s = w2_shape[1]
  for name, value in (("input block width p", p), ("intermediate block width q", q),
                      ("output block width s", s)):
    if value % _CHUNK:
      raise ValueError(f"monarch (mosaic_gpu): {name}={value} must be a multiple of {_CHUNK} "
                       "(the kernels move 64-wide swizzled tiles; the widths come from "
                       "in_features / nblocks and out_features / nblocks, rounded up)")
  if q > _MAX_BOX:
    raise ValueError(f"monarch (mosaic_gpu): intermediate block width q={q} must be at most "
                     f"{_MAX_BOX} (one TMA box of w1, one float32 accumulator)")
  _, routes = common.routing(k, q)
  h_swizzle = _widest_swizzle(math.gcd(q, *(v for r in routes
                                          for v in (r.offset, r.count, r.a_start))))
  if h_swizzle is None:
    raise ValueError(f"monarch (mosaic_gpu): the stride permutation of k={k} blocks of q={q} "
                     f"moves runs of {sorted({r.count for r in routes})} channels; every run "
                     "must start and end on a multiple of 16 channels (q / k a multiple of "
                     "16), the narrowest swizzle a wgmma reads")
  out_chunk = _CHUNK  # output channels per block per step (s is a multiple)
  # H for 64 tokens, plus one phase's staging tiles at a time (sibling scopes share SMEM):
  # a [64, 64] activation tile and a [q, 64] or [64, q] factor tile, two stages of them in
  # factor 1's pipeline
  smem = (jnp.dtype(dtype).itemsize * TILE_ROWS * (k * q + 2 * (_CHUNK + q))
          + _SMEM_ALIGNMENT_SLACK)
  if smem > SMEM_BYTES:
    raise ValueError(f"monarch (mosaic_gpu): the intermediate of {TILE_ROWS} tokens (k q = "
                     f"{k * q} channels) and the staging tiles need {smem} bytes of SMEM, over "
                     f"the {SMEM_BYTES} a Hopper block has; use the XLA layer or more blocks")
  return Plan(k, p, q, s, _CHUNK, h_swizzle, out_chunk, smem)


def _tiles(dtype, swizzle_elems):
  item = jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, swizzle_elems)),
          plgpu.SwizzleTransform(swizzle_elems * item))


def _smem(shape, dtype, swizzle_elems):
  return plgpu.SMEM(shape, dtype, transforms=_tiles(dtype, swizzle_elems))


def _intermediate_into(h_smem, x_gmem, w1_gmem, *, plan: Plan, dtype):
  """Factor 1 for this CTA's 64 tokens: H_l's runs from each input block j into h_smem.

  Per block, a two-stage pipeline over p's 64-column chunks (TMA loads of the next chunk
  of x and w1 overlap the current wgmma)."""
  k, p, q, kx = plan.k, plan.p, plan.q, plan.x_chunk
  row_tile = lax.axis_index("m")
  _, routes = common.routing(k, q)
  for j in range(k):
    def block_product(acc_ref, j=j):
      def step(_, x_smem, w1_smem):
        plgpu.wgmma(acc_ref, x_smem, compat.transposed_ref(w1_smem))
        plgpu.wgmma_wait(1)  # at most one wgmma in flight: the stage before is free again

      plgpu.emit_pipeline(
          step, grid=(p // kx,),
          in_specs=[plgpu.BlockSpec((TILE_ROWS, kx), lambda t, j=j: (row_tile, j * (p // kx) + t),
                                    transforms=_tiles(dtype, kx), delay_release=1),
                    plgpu.BlockSpec((q, kx), lambda t: (0, t), transforms=_tiles(dtype, kx),
                                    delay_release=1)],
          max_concurrent_steps=2)(x_gmem, w1_gmem.at[j])
      plgpu.wgmma_wait(0)
      return acc_ref[...]
    acc = pl.run_scoped(block_product, plgpu.ACC((TILE_ROWS, q), jnp.float32))
    for r in (r for r in routes if r.j == j):
      h_smem.at[r.l, :, pl.ds(r.a_start, r.count)][...] = (
          acc[:, r.offset:r.offset + r.count].astype(dtype))
  plgpu.commit_smem()  # H was written by threads; wgmma and TMA read it (async proxy)


def _load_and_wait(barriers, *copies):
  """(src GMEM, dst SMEM, barrier index) TMA copies, issued together, then awaited."""
  for src, dst, which in copies:
    plgpu.copy_gmem_to_smem(src, dst, barriers.at[which])
  for _, _, which in copies:
    plgpu.barrier_wait(barriers.at[which])


def _forward_kernel(x_gmem, w1_gmem, w2_gmem, y_gmem, *, plan: Plan, dtype):
  """y_gmem is [T, s, k]: [t, c, l] is column c k + l of y (a free reshape outside)."""
  k, q, s, c_out = plan.k, plan.q, plan.s, plan.out_chunk
  bm = TILE_ROWS
  row0 = lax.axis_index("m") * bm
  piece_rows = _WG_THREADS // c_out  # one element per thread per interleave step

  def scope(h_smem, barriers):
    load = functools.partial(_load_and_wait, barriers)

    def factor2(w2_smem, one_block):
      """Factor 2 and the output interleave, C output channels of every block at a time."""
      for ci in range(s // c_out):
        for l in range(k):
          load((w2_gmem.at[pl.ds(l * s + ci * c_out, c_out), :], w2_smem, 0))

          def product(acc_ref, l=l):
            plgpu.wgmma(acc_ref, h_smem.at[l], compat.transposed_ref(w2_smem))
            plgpu.wgmma_wait(0)  # w2_smem is reloaded next step
            return acc_ref[...]
          y_l = pl.run_scoped(product, plgpu.ACC((bm, c_out), jnp.float32))
          compat.gpu_store_unoptimized(one_block, y_l.astype(dtype))

          def interleave(i, carry, l=l, ci=ci):
            piece = pl.ds(i * piece_rows, piece_rows)
            values = plgpu.layout_cast(one_block.at[piece, :][...], plgpu.Layout.WG_STRIDED(
                (piece_rows, c_out), vec_size=1))
            y_gmem.at[pl.ds(row0 + i * piece_rows, piece_rows), pl.ds(ci * c_out, c_out),
                      l][...] = values
            return carry
          lax.fori_loop(0, bm // piece_rows, interleave, 0)

    _intermediate_into(h_smem, x_gmem, w1_gmem, plan=plan, dtype=dtype)
    pl.run_scoped(factor2, _smem((c_out, q), dtype, plan.h_swizzle),
                  plgpu.SMEM((bm, c_out), dtype))

  pl.run_scoped(
      scope,
      _smem((k, bm, q), dtype, plan.h_swizzle),
      plgpu.Barrier(num_barriers=1),  # the w2 chunk loads (factor 1 pipelines its own)
  )


def _cost(flops: int, moved: int) -> dict:
  """The kernel's counted work (common.work) for the compiler's cost model."""
  return compat.mosaic_gpu_cost(pl.CostEstimate(flops=flops, transcendentals=0,
                                                bytes_accessed=moved))


def _params():
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


def forward(x, w1_reordered, w2, *, plan: Plan, interpret=False):
  """x [T, k p] (T a multiple of 64), w1 with rows in routing order, w2 [k, s, q] ->
  y [T, k s] in the layer's output order (the caller cuts it to out_features)."""
  t = x.shape[0]
  k, s, q = w2.shape
  if t % TILE_ROWS or x.shape[1] != plan.k * plan.p:
    raise ValueError(f"mosaic_gpu.forward: x {x.shape} must be [a multiple of {TILE_ROWS}, "
                     f"{plan.k * plan.p}] (api.py pads it)")
  kernel = functools.partial(_forward_kernel, plan=plan, dtype=x.dtype)
  flops, moved = common.work(t, k * plan.p, k * s, w1_reordered.shape, w2.shape,
                             x.dtype.itemsize, "forward", kernel="mosaic_gpu",
                             tile_rows=TILE_ROWS)
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((t, s, k), x.dtype), grid=(t // TILE_ROWS,),
      grid_names=("m",), compiler_params=_params(), interpret=interpret or None,
      kernel_name="effjax_monarch_fwd_mosaic_gpu", **_cost(flops, moved),
  )(x, w1_reordered, w2.reshape(k * s, q)).reshape(t, s * k)  # [c, l] is column c k + l


# ----------------------------------------------------------------------------- backward

def _backward_data_kernel(x_gmem, w1_gmem, w2_gmem, dy_gmem, dx_gmem, h_gmem, dh_gmem, *,
                          plan: Plan, dtype):
  """One token tile: H again (factor 1, as the forward), dH_l = dy_l w2_l, routed back to
  dh_j, dx_j = dh_j w1'_j; H and dh also go to memory for the weight-gradient kernel."""
  k, p, q, s = plan.k, plan.p, plan.q, plan.s
  sw = plan.h_swizzle
  bm, chunk = TILE_ROWS, _CHUNK
  row_tile = lax.axis_index("m")
  rows = pl.ds(row_tile * bm, bm)
  _, routes = common.routing(k, q)

  def scope(h_smem, barriers):
    load = functools.partial(_load_and_wait, barriers)

    def store(src_smem, dst_gmem):
      plgpu.commit_smem()  # written by threads; the TMA unit reads it
      plgpu.copy_smem_to_gmem(src_smem, dst_gmem)
      plgpu.wait_smem_to_gmem(0)  # src_smem is rewritten later

    def grad_h():
      """dH_l = dy_l w2_l (a two-stage pipeline over s's chunks), its runs written back where
      they came from: dh_j, in H's SMEM."""
      dh_runs = {}
      for l in range(k):
        def grad_product(acc_ref, l=l):
          def step(_, dy_smem, w2_smem):
            plgpu.wgmma(acc_ref, dy_smem, w2_smem)
            plgpu.wgmma_wait(1)  # at most one wgmma in flight: the stage before is free
          plgpu.emit_pipeline(
              step, grid=(s // chunk,),
              in_specs=[plgpu.BlockSpec((bm, chunk),
                                        lambda t, l=l: (row_tile, l * (s // chunk) + t),
                                        transforms=_tiles(dtype, chunk), delay_release=1),
                        plgpu.BlockSpec((chunk, q), lambda t, l=l: (l * (s // chunk) + t, 0),
                                        transforms=_tiles(dtype, chunk), delay_release=1)],
              max_concurrent_steps=2)(dy_gmem, w2_gmem)
          plgpu.wgmma_wait(0)
          return acc_ref[...]
        dh_l = pl.run_scoped(grad_product, plgpu.ACC((bm, q), jnp.float32))
        for r in (r for r in routes if r.l == l):
          dh_runs[r] = dh_l[:, r.a_start:r.a_start + r.count].astype(dtype)
      for r, run in dh_runs.items():
        h_smem.at[r.j, :, pl.ds(r.offset, r.count)][...] = run
      for j in range(k):
        store(h_smem.at[j], dh_gmem.at[rows, pl.ds(j * q, q)])

    def grad_x(w1_smem, out_smem):
      """dx_j = dh_j w1'_j, p in chunks of 64."""
      for j in range(k):
        for t in range(p // chunk):
          load((w1_gmem.at[j, :, pl.ds(t * chunk, chunk)], w1_smem, 0))

          def data_product(acc_ref, j=j):
            plgpu.wgmma(acc_ref, h_smem.at[j], w1_smem)
            plgpu.wgmma_wait(0)
            return acc_ref[...]
          dx = pl.run_scoped(data_product, plgpu.ACC((bm, chunk), jnp.float32))
          out_smem[...] = dx.astype(dtype)
          store(out_smem, dx_gmem.at[rows, pl.ds(j * p + t * chunk, chunk)])

    # each phase's staging tiles in its own scope: they share SMEM
    _intermediate_into(h_smem, x_gmem, w1_gmem, plan=plan, dtype=dtype)  # H, as the forward
    for l in range(k):
      store(h_smem.at[l], h_gmem.at[rows, pl.ds(l * q, q)])  # for dw2
    grad_h()
    pl.run_scoped(grad_x, _smem((q, chunk), dtype, sw), _smem((bm, chunk), dtype, 64))

  pl.run_scoped(
      scope,
      _smem((k, bm, q), dtype, sw),
      plgpu.Barrier(num_barriers=1),  # grad_x's w1 chunks (the other phases pipeline theirs)
  )


def _weight_grad_kernel(lhs_gmem, rhs_gmem, out_gmem, *, a: int, b: int):
  """out[blk, i tile, j tile] = sum over token tiles of lhs[:, blk a + i]^T rhs[:, blk b + j]."""
  blk, i, j = lax.axis_index("blk"), lax.axis_index("i"), lax.axis_index("j")
  tile = _GRAD_TILE
  a_tiles, b_tiles = a // tile, b // tile

  def acc_scope(acc_ref):
    def step(_, lhs_smem, rhs_smem):
      plgpu.wgmma(acc_ref, compat.transposed_ref(lhs_smem), rhs_smem)
      plgpu.wgmma_wait(1)  # at most one wgmma in flight: the stage before is free again

    plgpu.emit_pipeline(
        step, grid=(lhs_gmem.shape[0] // TILE_ROWS,),
        in_specs=[plgpu.BlockSpec((TILE_ROWS, tile), lambda t: (t, blk * a_tiles + i),
                                  delay_release=1),
                  plgpu.BlockSpec((TILE_ROWS, tile), lambda t: (t, blk * b_tiles + j),
                                  delay_release=1)],
        max_concurrent_steps=2)(lhs_gmem, rhs_gmem)
    plgpu.wgmma_wait(0)
    return acc_ref[...]

  acc = pl.run_scoped(acc_scope, plgpu.ACC((tile, tile), jnp.float32))

  def store(out_smem):
    out_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[blk, pl.ds(i * tile, tile),
                                                  pl.ds(j * tile, tile)])
    plgpu.wait_smem_to_gmem(0)
  pl.run_scoped(store, plgpu.SMEM((tile, tile), jnp.float32))


_GRAD_TILE = _CHUNK  # weight-gradient output tiles


def _weight_grad(lhs, rhs, k: int, a: int, b: int, interpret, *, name: str, cost):
  """[k, a, b] float32: per block, lhs's a columns transposed times rhs's b columns."""
  return plgpu.kernel(
      functools.partial(_weight_grad_kernel, a=a, b=b),
      out_type=jax.ShapeDtypeStruct((k, a, b), jnp.float32),
      grid=(k, a // _GRAD_TILE, b // _GRAD_TILE), grid_names=("blk", "i", "j"),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret or None, kernel_name=name, **_cost(*cost),
  )(lhs, rhs)


def backward(x, w1_reordered, w2, dy, *, plan: Plan, interpret=False):
  """(dx [T, k p], dw1 in routing order, dw2), the weight gradients in float32.

  dy [T, k s] in the layer's output order is first put block-major by XLA (one copy of
  dy; the forward interleaves on chip, but the deinterleaved dy is read twice here)."""
  t = x.shape[0]
  k, s, q = w2.shape
  p = plan.p
  dy_blocks = dy.reshape(t, s, k).swapaxes(1, 2).reshape(t, k * s)  # column l s + c
  costs = common.mosaic_gpu_backward_work(t, k * p, k * s, w1_reordered.shape, w2.shape,
                                          x.dtype.itemsize, tile_rows=TILE_ROWS,
                                          grad_tile=_GRAD_TILE)
  dx, h, dh = plgpu.kernel(
      functools.partial(_backward_data_kernel, plan=plan, dtype=x.dtype),
      out_type=(jax.ShapeDtypeStruct((t, k * p), x.dtype),
                jax.ShapeDtypeStruct((t, k * q), x.dtype),
                jax.ShapeDtypeStruct((t, k * q), x.dtype)),
      grid=(t // TILE_ROWS,), grid_names=("m",), compiler_params=_params(),
      interpret=interpret or None, kernel_name="effjax_monarch_bwd_mosaic_gpu",
      **_cost(*costs["effjax_monarch_bwd_mosaic_gpu"]),
  )(x, w1_reordered, w2.reshape(k * s, q), dy_blocks)
  dw2 = _weight_grad(dy_blocks, h, k, s, q, interpret, name="effjax_monarch_dw2_mosaic_gpu",
                     cost=costs["effjax_monarch_dw2_mosaic_gpu"])
  dw1 = _weight_grad(dh, x, k, q, p, interpret, name="effjax_monarch_dw1_mosaic_gpu",
                     cost=costs["effjax_monarch_dw1_mosaic_gpu"])
  return dx, dw1, dw2
