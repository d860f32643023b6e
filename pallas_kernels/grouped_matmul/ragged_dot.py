"""The grouped matmul on `jax.lax.ragged_dot`, wrapped to the semantics of reference.py.

What the wrapper adds to ragged_dot (checked on jax 0.10.2, CPU):
  - group_offset: ragged_dot's own argument raises NotImplementedError, so the shard's rows
    (one contiguous range: rows are sorted by group) are rotated to the top with jnp.roll,
    multiplied with the local group sizes, masked, and rotated back.
  - rows past the groups: ragged_dot leaves them zero in its generic lowering; the wrapper
    zeroes them explicitly so no backend's choice matters. For the weight gradient both
    operands are masked: a NaN in an unused row would otherwise survive 0 * NaN.
  - sizes summing past m (traced) are truncated at m, as everywhere in this package.
Costs: an elementwise pass over the operands for the masks (and two rolls with group_offset).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import common

def _ragged_rows(rhs_contracting_dim: int):
  """out[r] = lhs[r] @ rhs[g] (contracting rhs dim 1) or rhs[g].T (dim 2), rows ragged."""
  return jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([1], [rhs_contracting_dim]), ([], [])),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


# out[g] = lhs_g.T @ grad_g: the rows (lhs dim 0) are ragged and contracted.
_RAGGED_CONTRACTION = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[])


def _shard_rows(group_sizes, group_offset, num_local: int, m: int):
  """(first row of the shard, local sizes, rows the shard owns)."""
  starts, ends = common.local_group_bounds(group_sizes, group_offset, num_local, m)
  return starts[0], ends - starts, ends[-1] - starts[0]


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool, group_offset, out_dtype):
  m = lhs.shape[0]
  first_row, local_sizes, local_rows = _shard_rows(group_sizes, group_offset, rhs.shape[0], m)
  if group_offset is not None:
    lhs = jnp.roll(lhs, -first_row, axis=0)
  # [G, n, k] weights are contracted in place (no transposed copy)
  out = jax.lax.ragged_dot_general(lhs, rhs, local_sizes, _ragged_rows(2 if transpose_rhs else 1),
                                   preferred_element_type=jnp.float32)
  out = common.masked_rows(out, common.rows_in(0, (m, 1), 0, local_rows))
  if group_offset is not None:
    out = jnp.roll(out, first_row, axis=0)
  return out.astype(out_dtype)


def tgmm(lhs, grad, group_sizes, *, num_groups: int, group_offset, out_dtype):
  m = lhs.shape[0]
  first_row, local_sizes, local_rows = _shard_rows(group_sizes, group_offset, num_groups, m)
  if group_offset is not None:
    lhs = jnp.roll(lhs, -first_row, axis=0)
    grad = jnp.roll(grad, -first_row, axis=0)
  mask = common.rows_in(0, (m, 1), 0, local_rows)
  out = jax.lax.ragged_dot_general(common.masked_rows(lhs, mask), common.masked_rows(grad, mask),
                                   local_sizes, _RAGGED_CONTRACTION,
                                   preferred_element_type=jnp.float32)
  return out.astype(out_dtype)
