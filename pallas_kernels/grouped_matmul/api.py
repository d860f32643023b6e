"""The public grouped-matmul entries: validation, implementation choice, padding, custom_vjp.

gmm(lhs, rhs, group_sizes) multiplies each group of sorted rows by its own weights; tgmm is
its weight gradient on its own. Any m, k, n: the kernel implementations pad every axis with
zeros up to a tile multiple (padded rows lie in no group, padded k columns add zero, padded n
columns are sliced off) and group boundaries may fall anywhere inside a row tile. Nothing is
padded when the sizes already are tile multiples, and a k or n tile that does not divide its
axis is first lowered (to at least half) to one that does (fit_tile), or on TPU raised to one
that does while the blocks fit VMEM (fit_tiles): padding the weights copies them on every call.
work.py counts what each kernel then issues.

Gradients (one custom_vjp for every implementation, so each direction can use its own tiles):
  d lhs = gmm(d out, rhs, transpose_rhs=not transpose_rhs)     (zero for rows in no group)
  d rhs = tgmm(lhs, d out) -> [G, k, n]  (tgmm(d out, lhs) -> [G, n, k] with transpose_rhs)
The cotangent is cast to the operands' dtype before the backward kernels (as the forward's
operands are), which matters only when preferred_element_type is wider than the operands.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import compat
from pallas_kernels import tiling
from pallas_kernels.grouped_matmul import common
from pallas_kernels.grouped_matmul import ragged_dot
from pallas_kernels.grouped_matmul import reference

IMPLEMENTATIONS = ("reference", "ragged_dot", "gpu", "mosaic_gpu", "tpu")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Starting points, not tuned on hardware yet (see WORKSPACE.md); callers pass their own.
GPU_TILING = common.Tiling(fwd=common.Tiles(128, 64, 128), dlhs=common.Tiles(128, 64, 128),
                           drhs=common.Tiles(64, 128, 128))
TPU_TILING = common.Tiling(fwd=common.Tiles(256, 512, 512))
# Mosaic GPU: multiples of 64; drhs contracts over rows (block_m) into a [block_k, block_n] tile.
MOSAIC_GPU_TILING = common.Tiling(fwd=common.Tiles(128, 64, 128),
                                  drhs=common.Tiles(64, 128, 128))
_TPU_LANES, _TPU_SUBLANES = 128, 8
# Mosaic's default scoped VMEM is 16 MiB on v4 and v5 (32 MiB on v6e): a lane tile raised to
# divide a weight axis keeps its blocks under this, leaving room for Mosaic's own buffers.
TPU_VMEM_BUDGET = 12 * 2**20


@dataclasses.dataclass(frozen=True)
class _Call:
  """Everything static about one call: hashable, so it can parameterise jit and custom_vjp."""
  implementation: str
  transpose_rhs: bool
  tiling: common.Tiling
  out_dtype: Any
  interpret: Any


def _dividing(tile: int, dim: int, step: int, allowed=lambda t: True) -> int:
  """tile, or the largest allowed multiple of step in [tile / 2, tile) that divides dim when
  tile does not: a k or n tile that divides the weights' axis spares padding them (a full
  copy of the weights on every call) and the padded MACs. Smaller tiles are left to the
  caller: each halving re-reads the other operand once more (work.py counts both; e.g. TPU
  n = 1408 in 128-wide tiles moves more bytes than padding it to 1536 in 512-wide ones)."""
  if dim % tile == 0:
    return tile
  for t in range(tile - step, tile // 2 - 1, -step):
    if t > 0 and dim % t == 0 and allowed(t):
      return t
  return tile


def fit_tile(implementation: str, interpret, name: str, tile: int, dim: int, *,
             lane: bool) -> tuple[int, int]:
  """(tile, padded dim) for one axis of one kernel call; lane: a weight axis (k or n, a TPU
  lane axis), where a slightly smaller tile that divides the axis is taken over padding."""
  if implementation == "mosaic_gpu":
    from pallas_kernels.grouped_matmul import mosaic_gpu  # pylint: disable=g-import-not-at-top
    if tile % mosaic_gpu.TILE_MULTIPLE:
      raise ValueError(f"Mosaic GPU tiles must be multiples of {mosaic_gpu.TILE_MULTIPLE} (a "
                       f"warpgroup's wgmma rows), got Tiles.{name}={tile}")
    multiple = mosaic_gpu.TILE_MULTIPLE
    if name == "block_m":  # halved to the rows there are: gmm's chunk heights are powers of two
      while tile > multiple and tile // 2 >= dim and (tile // 2) % multiple == 0:
        tile //= 2
    if name != "block_m" or tile & (tile - 1):
      tile = min(tile, tiling.round_up(dim, multiple))
    if lane:
      tile = _dividing(tile, dim, mosaic_gpu.TILE_MULTIPLE)
    return tile, tiling.round_up(dim, tile)
  if implementation == "gpu":
    if tile < 16 or tile & (tile - 1):
      raise ValueError(f"GPU tiles must be powers of two >= 16 (Triton tiles), got "
                       f"Tiles.{name}={tile}")
    tile = min(tile, max(16, tiling.next_pow2(dim)))
    if lane:
      tile = _dividing(tile, dim, 16, allowed=lambda t: t & (t - 1) == 0)
    return tile, tiling.round_up(dim, tile)
  if tile % _TPU_SUBLANES:
    raise ValueError(f"TPU tiles must be multiples of {_TPU_SUBLANES}, got Tiles.{name}={tile}")
  if lane and dim <= tile:
    return dim, dim  # one block spanning the whole axis: allowed at any size
  if lane and tile % _TPU_LANES and interpret is False:
    raise ValueError(f"Tiles.{name}={tile} tiles a TPU lane axis of size {dim}: Mosaic needs a "
                     f"multiple of {_TPU_LANES} (or a tile covering the whole axis)")
  tile = min(tile, tiling.round_up(dim, _TPU_SUBLANES))
  if lane:
    tile = _dividing(tile, dim, _TPU_LANES if tile % _TPU_LANES == 0 else _TPU_SUBLANES)
  return tile, tiling.round_up(dim, tile)


def tpu_vmem_bytes(tiles: common.Tiles, itemsize: int) -> int:
  """VMEM the TPU kernels hold for these tiles, the larger of gmm's and tgmm's: double-buffered
  input and output blocks (outputs counted as float32, the widest out_dtype) and the float32
  accumulator."""
  bm, bk, bn = tiles.block_m, tiles.block_k, tiles.block_n
  gmm = 2 * (bm * bk + bk * bn) * itemsize + 3 * bm * bn * 4
  tgmm = 2 * (bm * bk + bm * bn) * itemsize + 3 * bk * bn * 4
  return max(gmm, tgmm)


def _raised_lane_tile(tiles: common.Tiles, axis: str, dim: int, itemsize: int) -> int:
  """The smallest lane tile above tiles.<axis> that divides dim (a multiple of 128, of 8 for
  the interpreter's narrower tiles, or dim itself: a block spanning the axis is allowed at any
  size) and keeps the blocks within TPU_VMEM_BUDGET; tiles.<axis> (so the axis is padded)
  when none does. n = 1408 = 11 x 128 with 512-wide tiles takes 1408: no weight copy, no
  padded MACs, and the rows are read once per call instead of three times. The cost is
  parallelism across the axis: gmm splits only its n tiles between the two TensorCores of a
  v4 / v5p chip."""
  tile = getattr(tiles, axis)
  step = _TPU_LANES if tile % _TPU_LANES == 0 else _TPU_SUBLANES
  for t in [*range(tile + step, dim, step), dim]:
    if dim % t == 0 and tpu_vmem_bytes(dataclasses.replace(tiles, **{axis: t}),
                                       itemsize) <= TPU_VMEM_BUDGET:
      return t
  return tile


def fit_tiles(implementation: str, interpret, tiles: common.Tiles, m: int, k: int, n: int, *,
              itemsize: int):
  """(tiles the kernel runs with, (m, k, n) padded to them) for one call's [m, k] x [k, n]
  with operands of itemsize bytes (which sizes TPU blocks in VMEM)."""
  bm, m_pad = fit_tile(implementation, interpret, "block_m", tiles.block_m, m, lane=False)
  bk, k_pad = fit_tile(implementation, interpret, "block_k", tiles.block_k, k, lane=True)
  bn, n_pad = fit_tile(implementation, interpret, "block_n", tiles.block_n, n, lane=True)
  fitted = common.Tiles(bm, bk, bn)
  if implementation == "tpu":
    if k_pad != k:
      fitted = dataclasses.replace(fitted, block_k=_raised_lane_tile(fitted, "block_k", k,
                                                                     itemsize))
    if n_pad != n:
      fitted = dataclasses.replace(fitted, block_n=_raised_lane_tile(fitted, "block_n", n,
                                                                     itemsize))
    k_pad, n_pad = tiling.round_up(k, fitted.block_k), tiling.round_up(n, fitted.block_n)
  return fitted, (m_pad, k_pad, n_pad)


def _itemsize(*operands) -> int:
  return max(jnp.dtype(x.dtype).itemsize for x in operands)


def _pad_to(x, shape):
  if x.shape == tuple(shape):
    return x
  return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def _kernels(implementation: str):
  if implementation == "mosaic_gpu":
    from pallas_kernels.grouped_matmul import mosaic_gpu  # pylint: disable=g-import-not-at-top
    return mosaic_gpu
  if implementation == "gpu":
    from pallas_kernels.grouped_matmul import gpu  # pylint: disable=g-import-not-at-top
    return gpu
  from pallas_kernels.grouped_matmul import tpu  # pylint: disable=g-import-not-at-top
  return tpu


def _run_gmm(c: _Call, tiles: common.Tiles, lhs, rhs, group_sizes, group_offset, *,
             transpose_rhs: bool, out_dtype):
  """One gmm call (forward or input gradient) with the given implementation and tiles."""
  if c.implementation == "reference":
    return reference.gmm_reference(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                                   group_offset=group_offset, preferred_element_type=out_dtype)
  if c.implementation == "ragged_dot":
    return ragged_dot.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                          group_offset=group_offset, out_dtype=out_dtype)
  (m, k), num_local = lhs.shape, rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  fitted, (m_pad, k_pad, n_pad) = fit_tiles(c.implementation, c.interpret, tiles, m, k, n,
                                            itemsize=_itemsize(lhs, rhs))
  starts, ends = common.local_group_bounds(group_sizes, group_offset, num_local, m)
  lhs = _pad_to(lhs, (m_pad, k_pad))
  rhs = _pad_to(rhs, (num_local, n_pad, k_pad) if transpose_rhs else (num_local, k_pad, n_pad))
  out = _kernels(c.implementation).gmm(lhs, rhs, starts, ends, tiles=fitted,
                                       transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                                       interpret=c.interpret)
  return out[:m, :n]


def _run_tgmm(c: _Call, tiles: common.Tiles, lhs, grad, group_sizes, group_offset, *,
              num_groups: int, out_dtype):
  """One tgmm call: per local group, lhs_g.T @ grad_g -> [num_groups, k, n]."""
  if c.implementation == "reference":
    return reference.tgmm_reference(lhs, grad, group_sizes, num_groups=num_groups,
                                    group_offset=group_offset, preferred_element_type=out_dtype)
  if c.implementation == "ragged_dot":
    return ragged_dot.tgmm(lhs, grad, group_sizes, num_groups=num_groups,
                           group_offset=group_offset, out_dtype=out_dtype)
  (m, k), n = lhs.shape, grad.shape[1]
  fitted, (m_pad, k_pad, n_pad) = fit_tiles(c.implementation, c.interpret, tiles, m, k, n,
                                            itemsize=_itemsize(lhs, grad))
  starts, ends = common.local_group_bounds(group_sizes, group_offset, num_groups, m)
  out = _kernels(c.implementation).tgmm(
      _pad_to(lhs, (m_pad, k_pad)), _pad_to(grad, (m_pad, n_pad)), starts, ends,
      tiles=fitted, out_dtype=out_dtype, interpret=c.interpret)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(c: _Call, lhs, rhs, group_sizes, group_offset):
  return _run_gmm(c, c.tiling.fwd, lhs, rhs, group_sizes, group_offset,
                  transpose_rhs=c.transpose_rhs, out_dtype=c.out_dtype)


def _gmm_fwd(c: _Call, lhs, rhs, group_sizes, group_offset):
  return _gmm(c, lhs, rhs, group_sizes, group_offset), (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(c: _Call, residuals, dout):
  lhs, rhs, group_sizes, group_offset = residuals
  dlhs = _run_gmm(c, c.tiling.dlhs_tiles, dout.astype(rhs.dtype), rhs, group_sizes,
                  group_offset, transpose_rhs=not c.transpose_rhs, out_dtype=lhs.dtype)
  x, y = (dout.astype(lhs.dtype), lhs) if c.transpose_rhs else (lhs, dout.astype(lhs.dtype))
  drhs = _run_tgmm(c, c.tiling.drhs_tiles, x, y, group_sizes, group_offset,
                   num_groups=rhs.shape[0], out_dtype=rhs.dtype)
  return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
_gmm_jit = jax.jit(_gmm, static_argnums=(0,))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _tgmm_jit(c: _Call, lhs, grad, group_sizes, group_offset, num_groups: int):
  return _run_tgmm(c, c.tiling.drhs_tiles, lhs, grad, group_sizes, group_offset,
                   num_groups=num_groups, out_dtype=c.out_dtype)


# ------------------------------------------------------------------------------ validation

def _concrete(x):
  """x as a numpy array, or None when it is traced (its value is not known yet)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _as_offset(group_offset):
  """A Python int offset becomes an int32 scalar; arrays are checked as they are."""
  if isinstance(group_offset, int) and not isinstance(group_offset, bool):
    return jnp.asarray(group_offset, jnp.int32)
  return group_offset


def _check_group_args(group_sizes, group_offset, *, num_local: int, num_rows: int):
  if not hasattr(group_sizes, "dtype") or group_sizes.dtype != jnp.int32:
    raise ValueError(f"group_sizes must be an int32 array, got "
                     f"{getattr(group_sizes, 'dtype', type(group_sizes).__name__)}")
  if group_sizes.ndim != 1:
    raise ValueError(f"group_sizes must be 1-D [num_groups], got shape {group_sizes.shape}")
  num_groups = group_sizes.shape[0]
  if group_offset is None:
    if num_groups != num_local:
      raise ValueError(f"group_sizes has {num_groups} groups but the weights have {num_local} "
                       "(for a shard of the groups pass group_offset)")
  else:
    offset_dtype = getattr(group_offset, "dtype", None)
    if offset_dtype != jnp.int32 or np.size(group_offset) != 1 or np.ndim(group_offset) > 1:
      raise ValueError(f"group_offset must be an int32 scalar (or [1] array), got "
                       f"{offset_dtype}{list(np.shape(group_offset))}")
    offset = _concrete(group_offset)
    if offset is not None:
      offset = int(offset.reshape(()))
      if not 0 <= offset <= num_groups - num_local:
        raise ValueError(f"group_offset={offset} with {num_local} local groups needs "
                         f"0 <= group_offset <= {num_groups - num_local} (group_sizes has "
                         f"{num_groups} groups)")
  sizes = _concrete(group_sizes)
  if sizes is not None:
    if (sizes < 0).any():
      raise ValueError(f"group_sizes must be >= 0, got {sizes.min()} at group "
                       f"{int(np.argmin(sizes))}")
    total = int(sizes.sum(dtype=np.int64))
    if total > num_rows:
      raise ValueError(f"group_sizes sum to {total}, more than the {num_rows} rows of lhs")


def _check_dtype(name: str, dtype):
  if jnp.dtype(dtype) not in DTYPES:
    raise ValueError(f"{name} must be one of float32/bfloat16/float16, got {jnp.dtype(dtype)}")


def _call(implementation, interpret, tiling, transpose_rhs, out_dtype, dtype) -> _Call:
  impl = implementation or default_implementation(interpret, dtype)
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={impl!r} is not one of {list(IMPLEMENTATIONS)} or None")
  if impl == "mosaic_gpu" and interpret is not False and interpret is not None and (
      not compat.is_gpu_interpret_params(interpret)):
    raise ValueError(f"implementation='mosaic_gpu' runs on a CPU only in Mosaic GPU's "
                     f"interpreter: pass interpret=compat.gpu_interpret_params(...) (jax >= "
                     f"0.12), got interpret={interpret!r}")
  if impl == "mosaic_gpu" and jnp.dtype(dtype) == jnp.float32:
    raise NotImplementedError("implementation='mosaic_gpu' takes bfloat16/float16 operands, got "
                              "float32 (wgmma computes float32 operands in tf32); use "
                              "implementation='gpu' or 'ragged_dot'")
  if tiling is None:
    tiling = {"tpu": TPU_TILING, "mosaic_gpu": MOSAIC_GPU_TILING}.get(impl, GPU_TILING)
  if not isinstance(tiling, common.Tiling):
    raise ValueError(f"tiling must be a grouped_matmul.Tiling, got {tiling!r}")
  return _Call(impl, bool(transpose_rhs), tiling, jnp.dtype(out_dtype), interpret)


def default_implementation(interpret: Any = False, dtype=None) -> str:
  """The kernels of the platform (tiling.default_implementation): interpreter params pick
  their own family anywhere (Mosaic GPU params: mosaic_gpu; TPU params: tpu); mosaic_gpu on
  Hopper (compute capability 9.x) for bf16/fp16 operands (dtype None: assumed so), gpu
  (Triton) for float32 there and on other GPUs, tpu on TPUs. Elsewhere gpu with
  interpret=True, else the reference (ragged_dot's CPU lowering builds a [G, m, k] masked
  copy of lhs; the reference loops over groups instead)."""
  family = tiling.default_implementation(interpret, mosaic_gpu=True)
  if family == "mosaic_gpu" and not compat.is_gpu_interpret_params(interpret) and (
      dtype is not None and jnp.dtype(dtype) == jnp.float32):
    return "gpu"  # wgmma on float32 operands would compute in tf32
  return family or "reference"


# ---------------------------------------------------------------------------------- public

def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, group_offset=None,
        preferred_element_type=None, tiling: common.Tiling | None = None,
        implementation: str | None = None, interpret: Any = False):
  """Grouped matmul: each group of (sorted) rows of lhs times its own weights, with gradients.

  Args:
    lhs: [m, k]; rows sorted by group: group g owns the group_sizes[g] rows after group g - 1.
    rhs: [G, k, n] weights, or [G, n, k] with transpose_rhs (row r of group g is multiplied by
      rhs[g].T). With group_offset, G = G_local weights of groups
      group_offset .. group_offset + G_local - 1.
    group_sizes: int32 [G_total] rows per group, summing to at most m. Rows past the sum are
      zero in the output (and get zero gradient). Concrete sizes that are negative or sum past
      m are a ValueError; traced ones are read as max(size, 0) and the groups are truncated at
      row m (nothing past lhs is ever read).
    group_offset: optional int32 scalar: compute only this shard's groups; rows of every other
      group are zero in the output. Summing the shards' outputs gives the full product.
      A concrete offset must lie in [0, G_total - G]; a traced one is clipped to [0, G_total]
      (local groups past the end are empty).
    preferred_element_type: output dtype (default lhs.dtype); accumulation is float32.
    tiling: a Tiling (tiles per direction); defaults per implementation (GPU_TILING,
      TPU_TILING, MOSAIC_GPU_TILING). GPU tiles: powers of two >= 16. Mosaic GPU tiles:
      multiples of 64. TPU tiles: multiples of 8, and the k/n
      tiles multiples of 128 outside interpret mode (or at least the axis).
    implementation: "reference" (pure jnp), "ragged_dot" (jax.lax.ragged_dot, wrapped to
      these semantics), "gpu" (Triton-style Pallas), "mosaic_gpu" (Mosaic GPU Pallas,
      Hopper; bf16/fp16 operands), "tpu" (Mosaic TPU Pallas); None picks by platform (see
      default_implementation).
    interpret: run the Pallas kernels in an interpreter (True: the generic one; a
      `pltpu.InterpretParams`: the TPU simulator; `compat.gpu_interpret_params(...)`: the
      Mosaic GPU simulator, jax >= 0.12).

  Returns:
    [m, n] in preferred_element_type or lhs.dtype.
  """
  group_offset = _as_offset(group_offset)
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f"lhs must be [m, k] and rhs [G, k, n] (or [G, n, k] with transpose_rhs); "
                     f"got shapes {lhs.shape} and {rhs.shape}")
  (m, k), num_local = lhs.shape, rhs.shape[0]
  rhs_k, n = (rhs.shape[2], rhs.shape[1]) if transpose_rhs else rhs.shape[1:]
  if rhs_k != k:
    layout = "[G, n, k] (transpose_rhs)" if transpose_rhs else "[G, k, n]"
    raise ValueError(f"lhs {lhs.shape} has k={k} but rhs {rhs.shape}, read as {layout}, has "
                     f"k={rhs_k}")
  _check_dtype("lhs", lhs.dtype)
  if rhs.dtype != lhs.dtype:
    raise ValueError(f"lhs and rhs must share one dtype, got {lhs.dtype} and {rhs.dtype}")
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  _check_dtype("preferred_element_type", out_dtype)
  _check_group_args(group_sizes, group_offset, num_local=num_local, num_rows=m)
  c = _call(implementation, interpret, tiling, transpose_rhs, out_dtype, lhs.dtype)
  if 0 in (m, k, n, num_local):  # nothing to multiply: zeros, and zero gradients
    return jnp.zeros((m, n), out_dtype)
  return _gmm_jit(c, lhs, rhs, group_sizes, group_offset)


def tgmm(lhs, grad, group_sizes, *, group_offset=None, num_groups: int | None = None,
         preferred_element_type=None, tiling: common.Tiling | None = None,
         implementation: str | None = None, interpret: Any = False):
  """The weight gradient of gmm on its own: out[g] = lhs[rows of g].T @ grad[rows of g].

  Args:
    lhs: [m, k]; grad: [m, n]; rows sorted by group as in gmm.
    group_sizes, group_offset, implementation, interpret: as in gmm.
    num_groups: how many (local) groups to produce; default len(group_sizes), required with
      group_offset.
    preferred_element_type: output dtype (default lhs.dtype); accumulation is float32.
    tiling: its drhs tiles are used (block_m: rows per step; output tile block_k x block_n).

  Returns:
    [num_groups, k, n]; zero for empty groups. Not differentiable with the Pallas kernels.
  """
  group_offset = _as_offset(group_offset)
  if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
    raise ValueError(f"lhs must be [m, k] and grad [m, n] with the same m; got shapes "
                     f"{lhs.shape} and {grad.shape}")
  _check_dtype("lhs", lhs.dtype)
  if grad.dtype != lhs.dtype:
    raise ValueError(f"lhs and grad must share one dtype, got {lhs.dtype} and {grad.dtype}")
  if num_groups is None:
    if group_offset is not None:
      raise ValueError("tgmm with group_offset needs num_groups (the shard's group count)")
    num_groups = getattr(group_sizes, "shape", (0,))[0]
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  _check_dtype("preferred_element_type", out_dtype)
  _check_group_args(group_sizes, group_offset, num_local=num_groups, num_rows=lhs.shape[0])
  c = _call(implementation, interpret, tiling, False, out_dtype, lhs.dtype)
  (m, k), n = lhs.shape, grad.shape[1]
  if 0 in (m, k, n, num_groups):
    return jnp.zeros((num_groups, k, n), out_dtype)
  return _tgmm_jit(c, lhs, grad, group_sizes, group_offset, num_groups)
