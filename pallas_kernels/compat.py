"""Everything that differs between the JAX versions effjax runs on (0.10.2 and 0.11.x).

Kernels import Pallas through here for the version-sensitive pieces only:
  - Triton compiler params: in 0.10.2 they are what makes a GPU pallas_call use Triton rather
    than Mosaic GPU; in 0.11 the Triton backend still works but warns, at every lowering,
    that it is deprecated (filtered here, that message only).
  - Squeezed block dimensions (`pl.squeezed`, formerly `None`).
  - TPU compiler params, VMEM scratch, scalar-prefetch grid specs and interpret params.
"""
from __future__ import annotations

import warnings

from jax.experimental import pallas as pl

# A block dimension of size one that the kernel sees removed.
SQUEEZED = getattr(pl, "squeezed", None)

TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


def quiet_triton_deprecation() -> None:
  """Ignores 0.11's DeprecationWarning for the Pallas Triton backend, that message only.

  We choose Triton on purpose: it is the portable GPU form and runs on every CUDA GPU JAX
  supports (Mosaic GPU needs Hopper). JAX warns when the pallas_call is *lowered*, i.e. when
  the enclosing jit compiles, long after our call returned, so a filter scoped to the call site
  would miss it: this one is process-wide, (re)installed whenever a Triton kernel is built
  (filterwarnings drops an identical earlier entry, so repeats do not pile up). On 0.10.2 the
  message never appears and the filter is inert.
  """
  warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


def triton_compiler_params(num_warps: int, num_stages: int):
  quiet_triton_deprecation()
  from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_compiler_params(dimension_semantics: tuple[str, ...]):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


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
