"""Pure-jnp grouped matmul: the semantics every implementation in this package reproduces.

  gmm   out[r] = lhs[r] @ rhs[g]        (rhs[g].T with transpose_rhs) for r in local group g,
        out[r] = 0                       for rows in no local group (other shards' groups,
                                         rows past the sum of group_sizes).
  tgmm  out[g] = lhs[rows of g].T @ grad[rows of g]   ([G_local, k, n]; zero for empty groups).

Group bounds are common.local_group_bounds (see common.py for traced sizes past m).
Both loop over the local groups with lax.scan, one dense product per group masked to its rows:
G times the FLOPs of the kernels, but memory stays at O(m (k + n)) (a [G, m, k] masked copy of
lhs, as ragged_dot's generic lowering builds, would not fit at MoE sizes).
"""
from __future__ import annotations

from jax import lax
import jax.numpy as jnp

from pallas_kernels import tiling
from pallas_kernels.grouped_matmul import common


def gmm_reference(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, group_offset=None,
                  preferred_element_type=None):
  """lhs [m, k], rhs [G, k, n] (or [G, n, k]) -> [m, n] in preferred_element_type or lhs.dtype."""
  m = lhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = preferred_element_type or lhs.dtype
  starts, ends = common.local_group_bounds(group_sizes, group_offset, rhs.shape[0], m)
  dims = tiling.NT_DIMS if transpose_rhs else tiling.NN_DIMS

  def one_group(out_MN, group):
    w, start, end = group
    y_MN = lax.dot_general(lhs, w, dims, preferred_element_type=jnp.float32)
    return jnp.where(common.rows_in(0, (m, 1), start, end), y_MN, out_MN), None

  out_MN, _ = lax.scan(one_group, jnp.zeros((m, n), jnp.float32), (rhs, starts, ends))
  return out_MN.astype(out_dtype)


def tgmm_reference(lhs, grad, group_sizes, *, num_groups: int, group_offset=None,
                   preferred_element_type=None):
  """lhs [m, k], grad [m, n] -> [num_groups, k, n]: per group, lhs_g.T @ grad_g."""
  m = lhs.shape[0]
  out_dtype = preferred_element_type or lhs.dtype
  starts, ends = common.local_group_bounds(group_sizes, group_offset, num_groups, m)

  def one_group(_, bounds):
    mask = common.rows_in(0, (m, 1), *bounds)
    return None, lax.dot_general(common.masked_rows(lhs, mask), common.masked_rows(grad, mask),
                                 tiling.TN_DIMS, preferred_element_type=jnp.float32)

  _, out_GKN = lax.scan(one_group, None, (starts, ends))
  return out_GKN.astype(out_dtype)
