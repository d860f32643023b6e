"""Helpers every kernel package shares: tile arithmetic, tile products, the platform's kernels.

  round_up, cdiv, next_pow2   static tile arithmetic (cdiv also works on traced int arrays)
  NN_DIMS, NT_DIMS, TN_DIMS   dot_general dimension numbers of a @ b, a @ b.T, a.T @ b
  dot                         a tile product accumulated in float32
  default_implementation      which kernel family the platform (or the interpret argument)
                              asks for; each package's own default_implementation wraps it
  tpu_vmem_tile_bytes, tpu_vmem_limit   a TPU kernel's VMEM: buffer sizes and the scoped limit
                              to ask Mosaic for (or a refusal before tracing)
"""
from __future__ import annotations

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels import compat

NN_DIMS = (((1,), (0,)), ((), ()))  # a [m, c] @ b [c, n] -> [m, n]
NT_DIMS = (((1,), (1,)), ((), ()))  # a [m, c] @ b [n, c].T -> [m, n]
TN_DIMS = (((0,), (0,)), ((), ()))  # a [c, m].T @ b [c, n] -> [m, n]


def round_up(x: int, m: int) -> int:
  """The smallest multiple of m that is >= x."""
  return -(-x // m) * m


def cdiv(a, b):
  """ceil(a / b) for non-negative a and positive b (Python ints or int arrays)."""
  return (a + b - 1) // b


def next_pow2(x: int) -> int:
  """The smallest power of two >= x (1 for x <= 1)."""
  return 1 << max(x - 1, 0).bit_length()


def dot(a, b, dims, *, transpose_in_register: bool = False):
  """A tile product accumulated in float32. Mosaic TPU wants a.T @ b written as an explicit
  transpose (transpose_in_register); Triton and the interpreters take the dims directly."""
  if transpose_in_register and dims == TN_DIMS:
    return lax.dot(a.T, b, preferred_element_type=jnp.float32)
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def default_implementation(interpret: Any = False, *, mosaic_gpu: bool = False) -> str | None:
  """The kernel family to run: "gpu", "mosaic_gpu", "tpu", or None (no kernel: a CPU run
  without an interpreter).

  Interpreter params pick their own family on any platform (TPU params: "tpu"; Mosaic GPU
  params: "mosaic_gpu"). Otherwise a TPU gives "tpu" and a GPU "gpu", or "mosaic_gpu" on
  Hopper (compute capability 9.x) when the caller has such a kernel (mosaic_gpu=True).
  Elsewhere interpret=True gives "gpu" (Pallas's generic interpreter runs the Triton-style
  kernels).
  """
  if interpret is not False and interpret is not None and interpret is not True:
    return "mosaic_gpu" if compat.is_gpu_interpret_params(interpret) else "tpu"
  platform = jax.default_backend()
  if platform in ("gpu", "cuda", "rocm"):
    capability = compat.cuda_compute_capability()
    hopper = capability is not None and capability[0] == 9
    return "mosaic_gpu" if mosaic_gpu and hopper else "gpu"
  if platform == "tpu":
    return "tpu"
  return "gpu" if interpret is True else None


# Mosaic's scoped VMEM per kernel: 16 MiB by default on v4, v5e and v5p (32 MiB on v6e) unless
# the kernel asks for more (vmem_limit_bytes). A kernel whose estimate needs more asks for the
# estimate * TPU_VMEM_HEADROOM, at most TPU_MAX_VMEM_LIMIT: under the physical VMEM per
# TensorCore of v5e and v6e (128 MiB) and v5p (64 MiB, the conservative reading of the sources
# in ../shared/reference/tpu_vmem.md). Past that a kernel is refused before tracing.
TPU_DEFAULT_SCOPED_VMEM = 16 << 20
TPU_MAX_VMEM_LIMIT = 48 << 20
TPU_VMEM_HEADROOM = 1.25


def tpu_vmem_tile_bytes(shape, itemsize: int) -> int:
  """Bytes of one VMEM buffer: its last two dims padded to Mosaic's (sublane, 128) tile (8
  sublanes for 32-bit types, 16 for 16-bit); non-int (squeezed) dims count as 1."""
  dims = [d for d in shape if isinstance(d, int)]
  dims[-1] = round_up(dims[-1], 128)
  if len(dims) > 1:
    dims[-2] = round_up(dims[-2], 8 * max(1, 4 // itemsize))
  n = itemsize
  for d in dims:
    n *= d
  return n


def tpu_vmem_limit(need_bytes: int, what: str, headroom: float = TPU_VMEM_HEADROOM,
                   advice: str = "use smaller blocks") -> int | None:
  """vmem_limit_bytes for a kernel estimated to need `need_bytes`: None while the default scope
  holds it with headroom, else the need with headroom rounded up to MiB. A ValueError naming
  `what` (the kernel and its blocks) past TPU_MAX_VMEM_LIMIT."""
  need = int(need_bytes * headroom)
  if need <= TPU_DEFAULT_SCOPED_VMEM:
    return None
  if need > TPU_MAX_VMEM_LIMIT:
    raise ValueError(f"{what} needs about {need / 2**20:.1f} MiB of VMEM with headroom, over the "
                     f"{TPU_MAX_VMEM_LIMIT >> 20} MiB limit effjax asks of any TPU generation "
                     f"(v5e, v5p, v6e): {advice}")
  return round_up(need, 1 << 20)
