"""The grouped-matmul seam: every expert matmul of the dropless path goes through here.

  grouped_matmul(lhs[m, k], rhs[G, k, n], group_sizes[G] int32, impl) -> [m, n]

Rows of `lhs` are sorted by group: rows [0, s0) use rhs[0], the next s1 rows rhs[1], ...; rows
past sum(group_sizes) give zeros. An implementation is any function with the signature
`gmm(lhs, rhs, group_sizes, group_offset=None)` that is differentiable (a Pallas kernel with
its custom_vjp); register it in `GMM_IMPLS` and its name in effjax.config.MOE_GMM_IMPLS.

  ragged_dot  jax.lax.ragged_dot
  pallas      pallas_kernels.grouped_matmul.gmm with its platform default: the Triton-style
              Pallas kernel on GPUs, the Mosaic one on TPUs, its pure-jnp reference (a loop
              over groups, no Pallas) on CPUs. Tests run the GPU kernel on a CPU by patching
              GMM_IMPLS["pallas"] = functools.partial(gmm, interpret=True).

Expert parallelism calls this inside shard_map with the device's local experts' rhs and local
group sizes, so no implementation needs group_offset there.
"""
from __future__ import annotations

from typing import Callable

import jax

from pallas_kernels.grouped_matmul import gmm as pallas_gmm  # imports only jax and numpy


def ragged_dot_gmm(lhs, rhs, group_sizes, group_offset=None):
  """jax.lax.ragged_dot: correct on every backend (on CPU it runs G masked dense dots)."""
  if group_offset is not None:
    raise NotImplementedError("ragged_dot_gmm: group_offset is not supported; pass the "
                              "local experts' rhs instead")
  return jax.lax.ragged_dot(lhs, rhs, group_sizes)


GMM_IMPLS: dict[str, Callable] = {
    "ragged_dot": ragged_dot_gmm,
    "pallas": pallas_gmm,
}


def grouped_matmul(lhs, rhs, group_sizes, impl: str = "ragged_dot"):
  """lhs[m, k] (rows sorted by group) x rhs[G, k, n] -> [m, n] with implementation `impl`."""
  if impl not in GMM_IMPLS:
    raise ValueError(f"model.moe.gmm_impl={impl!r} is not one of {sorted(GMM_IMPLS)}")
  if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f"grouped_matmul: expected lhs[m, k], rhs[G, k, n], group_sizes[G]; got "
                     f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
  return GMM_IMPLS[impl](lhs, rhs, group_sizes.astype("int32"))
