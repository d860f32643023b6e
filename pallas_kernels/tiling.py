"""Helpers every kernel package shares: tile arithmetic, tile products, the platform's kernels.

  round_up, cdiv, next_pow2   static tile arithmetic (cdiv also works on traced int arrays)
  NN_DIMS, NT_DIMS, TN_DIMS   dot_general dimension numbers of a @ b, a @ b.T, a.T @ b
  dot                         a tile product accumulated in float32
  default_implementation      which kernel family the platform (or the interpret argument)
                              asks for; each package's own default_implementation wraps it
  tpu_vmem_tile_bytes, tpu_vmem_limit   a TPU kernel's VMEM: buffer sizes and the scoped limit
                              to ask Mosaic for (or a refusal before tracing)
  compiling_for, compiling_platform   the device kind and platform being compiled for (the
                              mesh in force, else the default device)
  tpu_vmem_budget             the VMEM budget (TPU_VMEM) of the generation being compiled for
  gpu_smem_budget             the shared memory per block of the GPU being compiled for
"""
from __future__ import annotations

import dataclasses
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
  kernels). The platform is the one compiled for (compiling_platform).
  """
  if interpret is not False and interpret is not None and interpret is not True:
    return "mosaic_gpu" if compat.is_gpu_interpret_params(interpret) else "tpu"
  platform = compiling_platform()
  if platform in ("gpu", "cuda", "rocm"):
    capability = compat.cuda_compute_capability()
    hopper = capability is not None and capability[0] == 9
    return "mosaic_gpu" if mosaic_gpu and hopper else "gpu"
  if platform == "tpu":
    return "tpu"
  return "gpu" if interpret is True else None


@dataclasses.dataclass(frozen=True)
class TpuVmem:
  """One TPU generation's VMEM budget for a kernel: Mosaic's default scoped limit, and the
  most effjax asks for (vmem_limit_bytes) when a kernel's estimate needs more."""
  generation: str
  scoped: int
  most: int


# Physical VMEM per TensorCore (JAX's tpu_info; ../shared/reference/tpu_vmem.md): v4 16 MiB,
# v5e and v6e 128 MiB, v5p 64 MiB (the conservative reading of conflicting sources). Default
# scope: 16 MiB, 32 MiB on v6e. effjax asks for at most 48 MiB past v4 (v4: its whole 16 MiB,
# the default scope): the kernels' estimates are checked by the real compiler up to there;
# given more, Monarch's GPT-2 up projection ran out of the whole 128 MiB of v5e and v6e.
TPU_VMEM = {
    "TPU v4": TpuVmem("v4", 16 << 20, 16 << 20),
    "TPU v5 lite": TpuVmem("v5e", 16 << 20, 48 << 20),
    "TPU v5": TpuVmem("v5p", 16 << 20, 48 << 20),
    "TPU v5p": TpuVmem("v5p", 16 << 20, 48 << 20),
    "TPU v6 lite": TpuVmem("v6e", 32 << 20, 48 << 20),
}
# Off TPU (interpreters, lowering on a CPU host) or an unlisted generation: what v5e, v5p and
# v6e all grant, so blocks tested in the interpreters compile on each of them.
TPU_VMEM_ANY = TpuVmem("v5e, v5p or v6e", 16 << 20, 48 << 20)
TPU_VMEM_HEADROOM = 1.25


def compiling_for() -> str:
  """The device kind being compiled for, read as JAX's own TPU info reads it: the abstract
  mesh's in force (`jax.set_mesh(mesh)` over a target's devices, or `use_abstract_mesh`), else
  the default device's."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.device_kind if device is not None else jax.devices()[0].device_kind


def compiling_platform() -> str:
  """"tpu", "gpu" or "cpu": the platform being compiled for, read like compiling_for (so code
  traced under `jax.set_mesh` over a target's compile-only devices picks that target's
  kernels on a host that has none)."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  platform = device.platform if device is not None else jax.default_backend()
  return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def tpu_vmem_budget() -> TpuVmem:
  """The VMEM budget of the TPU being compiled for (compiling_for); TPU_VMEM_ANY when that is
  not a known TPU."""
  return TPU_VMEM.get(compiling_for(), TPU_VMEM_ANY)


# Shared memory one GPU thread block may use (the opt-in limit, CUDA's per-architecture table):
# Hopper 227 KiB (XLA's H100 target config: shared_memory_per_block_optin 232448), A100 163 KiB;
# other GPUs 99 KiB (sm_86 / sm_89). Off GPU (interpreters, lowering on a CPU host): the H100's.
GPU_SMEM_OPTIN = {"H100": 232448, "H200": 232448, "H800": 232448, "H20": 232448,
                  "A100": 166912, "A800": 166912}
GPU_SMEM_OTHER = 101376


def gpu_smem_budget() -> tuple[str, int]:
  """(device kind, shared-memory bytes per block) of the GPU being compiled for."""
  kind = compiling_for()
  for name, limit in GPU_SMEM_OPTIN.items():
    if name in kind:
      return kind, limit
  if "NVIDIA" in kind:
    return kind, GPU_SMEM_OTHER
  return "H100 (no GPU here)", GPU_SMEM_OPTIN["H100"]


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
                   advice: str = "use smaller blocks",
                   budget: TpuVmem | None = None) -> int | None:
  """vmem_limit_bytes for a kernel estimated to need `need_bytes` on `budget`'s generation
  (default: tpu_vmem_budget()): None while the default scope holds it with headroom, else the
  need with headroom rounded up to MiB. A ValueError naming `what` (the kernel and its blocks),
  the generation and its limit past `budget.most`."""
  budget = budget or tpu_vmem_budget()
  need = int(need_bytes * headroom)
  if need <= budget.scoped:
    return None
  if need > budget.most:
    raise ValueError(f"{what} needs about {need / 2**20:.1f} MiB of VMEM with headroom, over the "
                     f"{budget.most >> 20} MiB limit effjax asks of TPU {budget.generation}: "
                     f"{advice}")
  return round_up(need, 1 << 20)
