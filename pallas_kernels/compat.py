"""Everything that differs between the JAX versions effjax runs on (0.10.2, 0.11.x, 0.12.x).

Kernels import Pallas through here for the version-sensitive pieces only:
  - Triton compiler params: in 0.10.2 they are what makes a GPU pallas_call use Triton rather
    than Mosaic GPU; from 0.11 the Triton backend is deprecated (JAX warns when it lowers one).
    effjax says so once itself, the first time a Triton kernel is built for a real GPU
    (`note_triton_use`); JAX's own warning is left alone.
  - Lowering GPU kernels on a host without a GPU: from 0.11 Pallas asks the device for its
    compute capability, so a CPU host must trace and lower inside `abstract_gpu()`.
  - Mosaic GPU's interpreter (`plgpu.InterpretGPUParams`, exported from 0.12).
  - Squeezed block dimensions (`pl.squeezed`, formerly `None`).
  - TPU compiler params, VMEM scratch, scalar-prefetch grid specs and interpret params.
"""
from __future__ import annotations

import warnings

import jax
from jax.experimental import pallas as pl

# A block dimension of size one that the kernel sees removed.
SQUEEZED = getattr(pl, "squeezed", None)

TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"

_triton_noted = False


def note_triton_use() -> None:
  """Warns once per process that a (deprecated) Triton kernel is being built for a GPU.

  A FutureWarning, so it is shown by default: JAX's own DeprecationWarning (0.11+) is hidden
  outside __main__ and arrives only when the enclosing jit lowers. Called by the Triton-style
  kernels when they are not interpreted.
  """
  global _triton_noted
  if _triton_noted:
    return
  _triton_noted = True
  warnings.warn(
      "effjax is running a Pallas kernel on the Triton backend (implementation='gpu'), which "
      "JAX deprecates from 0.11 in favour of Mosaic GPU; on Hopper (compute capability 9.x) "
      "pass implementation='mosaic_gpu' where the kernel has one.", FutureWarning, stacklevel=3)


def triton_compiler_params(num_warps: int, num_stages: int):
  from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


ABSTRACT_H100 = ("NVIDIA H100", 132)  # device kind and SM count as JAX reports them


def gpu_core_count() -> int:
  """SMs of the first GPU (what a grid should cover), or the H100's count without a GPU (for
  interpreted runs and lowering on a CPU host)."""
  try:
    device = jax.devices("gpu")[0]
  except RuntimeError:
    return ABSTRACT_H100[1]
  return int(getattr(device, "core_count", None) or ABSTRACT_H100[1])


def abstract_gpu(device_kind: str = ABSTRACT_H100[0], num_cores: int = ABSTRACT_H100[1]):
  """A context in which GPU kernels trace and lower for `device_kind` on a host without one.

  Create the inputs outside it, then `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`
  inside. Pallas (0.11+) reads the compute capability from the abstract device; on 0.10.2 it
  is harmless.
  """
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(device_kind, num_cores, "gpu"))
  return jax.sharding.use_abstract_mesh(mesh)


def jax_version() -> tuple[int, ...]:
  """This JAX's release as ints, e.g. (0, 12, 0)."""
  return tuple(int(part) for part in jax.__version__.split(".")[:3] if part.isdigit())


def has_gpu_interpreter() -> bool:
  """Whether Mosaic GPU kernels can run on the CPU here (plgpu.InterpretGPUParams, jax 0.12+)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  return hasattr(plgpu, "InterpretGPUParams")


def gpu_interpret_params(**kwargs):
  """Mosaic GPU's simulator params (e.g. detect_races=True) for `interpret=`."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  if not hasattr(plgpu, "InterpretGPUParams"):
    raise NotImplementedError(f"Mosaic GPU interpret mode needs jax >= 0.12 "
                              f"(plgpu.InterpretGPUParams); this is jax {jax.__version__}")
  return plgpu.InterpretGPUParams(**kwargs)


def is_gpu_interpret_params(interpret) -> bool:
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  cls = getattr(plgpu, "InterpretGPUParams", None)
  return cls is not None and isinstance(interpret, cls)


def tpu_compiler_params(dimension_semantics: tuple[str, ...],
                        vmem_limit_bytes: int | None = None):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.CompilerParams(dimension_semantics=dimension_semantics,
                              vmem_limit_bytes=vmem_limit_bytes)


def tpu_vmem(shape: tuple[int, ...], dtype):
  """A VMEM scratch buffer for `scratch_shapes`."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.VMEM(shape, dtype)


def tpu_interpret_params(**kwargs):
  """The TPU simulator's params (e.g. out_of_bounds_reads="raise") for `interpret=`."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.InterpretParams(**kwargs)


def tpu_prefetch_scalar_grid_spec(*, num_scalar_prefetch: int, grid, in_specs, out_specs,
                                  scratch_shapes=()):
  """A grid spec whose first `num_scalar_prefetch` operands go to SMEM before the grid runs,
  so index maps (called as `index_map(*grid_indices, *prefetch_refs)`) can read them."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=num_scalar_prefetch, grid=grid,
                                      in_specs=in_specs, out_specs=out_specs,
                                      scratch_shapes=scratch_shapes)


# Compute capability by device kind, for a GPU compiled for without being present.
_CAPABILITY_BY_KIND = {"H100": (9, 0), "H200": (9, 0), "H800": (9, 0), "H20": (9, 0),
                       "A100": (8, 0), "A800": (8, 0), "B200": (10, 0)}


def cuda_compute_capability() -> tuple[int, int] | None:
  """(major, minor) of the GPU compiled for: the abstract mesh's device in force (`jax.set_mesh`
  over a target's compile-only GPUs), else the first CUDA GPU; None when there is none (or it
  does not say)."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if device is not None and device.platform in ("gpu", "cuda"):
    for name, capability in _CAPABILITY_BY_KIND.items():
      if name in device.device_kind:
        return capability
  try:
    device = jax.devices("gpu")[0]
  except RuntimeError:
    return None
  capability = getattr(device, "compute_capability", None)
  if capability is None:
    return None
  major, minor = str(capability).split(".")[:2]
  return int(major), int(minor)


def transposed_ref(ref):
  """A 2-D ref read transposed (an MMA operand): `ref.transpose` where refs have it, else the
  older `plgpu.transpose_ref` (deprecated in 0.12)."""
  if hasattr(ref, "transpose"):
    return ref.transpose((1, 0))
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  return plgpu.transpose_ref(ref, (1, 0))


def reset_gpu_interpreter() -> None:
  """Clears Mosaic GPU interpret mode's global state, which JAX requires after a kernel raised
  under it (e.g. on a detected race) before the next interpreted kernel in the process."""
  # pylint: disable-next=g-import-not-at-top
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  interpret_pallas_call.reset_gpu_interpret_mode_state()


def gpu_store_unoptimized(ref, value) -> None:
  """ref[...] = value in a Mosaic GPU kernel, allowing a store with bank conflicts (e.g. an
  accumulator into an unswizzled SMEM tile): `plgpu.store(optimized=False)` from 0.12, where
  a plain store must be conflict-free; 0.10.2's plain store already allows them."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  if hasattr(plgpu, "store"):
    plgpu.store(ref, value, optimized=False)
  else:
    ref[...] = value


def mosaic_gpu_cost(cost) -> dict:
  """`cost_estimate=cost` for plgpu.kernel where it takes one (jax >= 0.12), else nothing."""
  import inspect  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  if "cost_estimate" in inspect.signature(plgpu.kernel).parameters:
    return {"cost_estimate": cost}
  return {}
