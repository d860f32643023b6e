"""Dispatch: tokens to FFN experts and back, on one device (or under XLA's sharding).

Shapes: T tokens, D model width, K slots per token, E FFN experts, C capacity, P = K * T
(token, slot) pairs in slot-major order (pair p = k * T + t: every token's first choice comes
before any second choice, which sets the priority when a buffer is full).

  capacity_dispatch  GShard/flaxformer one-hot einsums into [E, C, D]; a pair beyond its
                     expert's capacity is dropped (its residual passes through). The oracle.
                     `grouped_capacity_dispatch` runs it per group of tokens (GShard
                     group_size), so its [T, E, C] tensors grow linearly, not quadratically.
  dropless_dispatch  sort the pairs by expert, one grouped matmul per SwiGLU weight
                     (effjax.moe.gmm), unsort, weighted sum of the k outputs in a fixed order.
                     The gathers have custom VJPs that are gathers too (no scatter-add), so
                     forward and backward are deterministic.

Both take the slots' combine weights already zeroed where a slot is not an FFN assignment,
and return the output, the dropped pair count and the load each expert computed.
dropless_dispatch's `max_rows` cuts the grouped matmul to a row budget, so a sparse
dense-to-sparse gate (all E slots per token, most empty) pays for the experts it uses.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn

from effjax.moe.gmm import grouped_matmul


# ----------------------------------------------------------------------------- gathers

@jax.custom_vjp
def gather_rows(x, idx, inv_idx):
  """out[i] = x[idx[i]], 0 where idx[i] is out of range.

  `idx` must be a partial injection (no row gathered twice) and `inv_idx` its inverse:
  inv_idx[j] = i where idx[i] = j, out of range where row j is not gathered. The gradient is
  then the gather dx[j] = g[inv_idx[j]]: no scatter-add.
  """
  return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x, idx, inv_idx):
  return gather_rows(x, idx, inv_idx), (idx, inv_idx)


def _gather_rows_bwd(res, g):
  idx, inv_idx = res
  return jnp.take(g, inv_idx, axis=0, mode="fill", fill_value=0), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_pairs(x_TD, order_P, inv_order_P, k):
  """x_TD's rows for the pairs in `order_P` (a permutation of the K * T slot-major pairs):
  out[i] = x[order[i] % T]. Gradient: the pairs' gradients unsorted by the inverse permutation
  (a gather) and summed over the k slots in a fixed order."""
  del inv_order_P, k
  return jnp.take(x_TD, order_P % x_TD.shape[0], axis=0)


def _gather_pairs_fwd(x_TD, order_P, inv_order_P, k):
  return gather_pairs(x_TD, order_P, inv_order_P, k), (order_P, inv_order_P)


def _gather_pairs_bwd(k, res, g_PD):
  order_P, inv_order_P = res
  g_KTD = jnp.take(g_PD, inv_order_P, axis=0).reshape(k, -1, g_PD.shape[-1])
  dx = g_KTD[0]
  for i in range(1, k):
    dx = dx + g_KTD[i]
  return dx, None, None


gather_pairs.defvjp(_gather_pairs_fwd, _gather_pairs_bwd)


def inverse_permutation(perm):
  """inv with inv[perm[i]] = i (a scatter that sets, never adds: deterministic)."""
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def sort_by_group(group_P, num_groups: int):
  """(order, inverse order, group sizes [num_groups]) of a stable sort by group id; ids >=
  num_groups (unused pairs) sort to the end and are in no group."""
  order = jnp.argsort(group_P, stable=True).astype(jnp.int32)
  sorted_groups = group_P[order]
  bounds = jnp.searchsorted(sorted_groups, jnp.arange(num_groups + 1, dtype=group_P.dtype),
                            side="left")
  return order, inverse_permutation(order), jnp.diff(bounds).astype(jnp.int32)


# ----------------------------------------------------------------------------- experts

def swiglu_grouped(x_MD, group_sizes, wi_gate, wi_up, wo, impl: str, dtype):
  """Rows sorted by expert -> SwiGLU of each row's expert ([G, D, F], [G, D, F], [G, F, D])."""
  x = x_MD.astype(dtype)
  gate = grouped_matmul(x, wi_gate.astype(dtype), group_sizes, impl)
  up = grouped_matmul(x, wi_up.astype(dtype), group_sizes, impl)
  return grouped_matmul(nn.silu(gate) * up, wo.astype(dtype), group_sizes, impl)


def swiglu_stacked(x_ECD, wi_gate, wi_up, wo, dtype):
  """[E, C, D] -> [E, C, D]: expert e's SwiGLU on its C rows."""
  x = x_ECD.astype(dtype)
  gate = jnp.einsum("ecd,edf->ecf", x, wi_gate.astype(dtype))
  up = jnp.einsum("ecd,edf->ecf", x, wi_up.astype(dtype))
  h = nn.with_logical_constraint(nn.silu(gate) * up, ("expert", None, "mlp"))
  return jnp.einsum("ecf,efd->ecd", h, wo.astype(dtype))


def combine_slots(y_KTD, weights_TK):
  """sum_k weights[:, k] * y[k], accumulated in float32 in slot order."""
  out = weights_TK[:, 0, None] * y_KTD[0].astype(jnp.float32)
  for k in range(1, y_KTD.shape[0]):
    out = out + weights_TK[:, k, None] * y_KTD[k].astype(jnp.float32)
  return out


# ----------------------------------------------------------------------------- dispatch

def pair_experts(expert_idx_TK, ffn_valid_TK, num_experts: int):
  """[P] slot-major expert id of each pair, `num_experts` where the pair is no FFN assignment."""
  return jnp.where(ffn_valid_TK, expert_idx_TK, num_experts).T.reshape(-1).astype(jnp.int32)


def dropless_dispatch(x_TD, expert_idx_TK, ffn_valid_TK, weights_TK, experts, *, impl, dtype,
                      max_rows: int | None = None):
  """(y [T, D] float32, dropped pair count, computed load [E]). `experts`: dict wi_gate,
  wi_up, wo ([E, ...]). Invalid pairs (padding, non-FFN slots) sort past every group.

  `max_rows`: only the first max_rows sorted pairs go through the grouped matmul (its static
  row count), so a routing with many empty slots (a sparse dense-to-sparse gate keeps all E
  per token) pays for the pairs it has; valid pairs past max_rows are dropped and counted."""
  num_tokens, k = expert_idx_TK.shape
  num_experts = experts["wi_gate"].shape[0]
  e_P = pair_experts(expert_idx_TK, ffn_valid_TK, num_experts)
  order, inv_order, group_sizes = sort_by_group(e_P, num_experts)
  x_sorted = gather_pairs(x_TD, order, inv_order, k)
  dropped = jnp.zeros((), jnp.float32)
  order_kept = order
  if max_rows is not None and max_rows < order.shape[0]:
    # groups are contiguous from row 0: cut them at max_rows
    ends = jnp.minimum(jnp.cumsum(group_sizes), max_rows)
    kept_sizes = jnp.diff(ends, prepend=0).astype(jnp.int32)
    dropped = jnp.sum(group_sizes - kept_sizes).astype(jnp.float32)
    group_sizes, x_sorted, order_kept = kept_sizes, x_sorted[:max_rows], order[:max_rows]
  y_sorted = swiglu_grouped(x_sorted, group_sizes, experts["wi_gate"], experts["wi_up"],
                            experts["wo"], impl, dtype)
  y_KTD = gather_rows(y_sorted, inv_order, order_kept).reshape(k, num_tokens, -1)
  return combine_slots(y_KTD, weights_TK), dropped, group_sizes.astype(jnp.float32)


def capacity_dispatch(x_TD, expert_idx_TK, ffn_valid_TK, weights_TK, experts, *, capacity,
                      dense_slots, dtype, limit=None):
  """(y [T, D] float32, dropped pair count, computed load [E]). Pairs claim capacity in
  slot-major order; `capacity` is the static buffer, `limit` (<= capacity, default capacity)
  a traced capacity, e.g. from the number of real tokens."""
  num_experts = experts["wi_gate"].shape[0]
  limit = capacity if limit is None else limit
  if dense_slots:  # slot k is expert k: the [T, E] mask is the validity itself
    mask_TE = ffn_valid_TK[:, :num_experts].astype(jnp.int32)
    pos_TE = jnp.cumsum(mask_TE, axis=0) - 1
    keep_TE = (mask_TE > 0) & (pos_TE < limit)
    dispatch_TEC = keep_TE[..., None] * jax.nn.one_hot(pos_TE, capacity, dtype=jnp.float32)
    combine_TEC = dispatch_TEC * weights_TK[:, :num_experts, None]
    dropped = jnp.sum(mask_TE) - jnp.sum(keep_TE)
    computed = jnp.sum(keep_TE, axis=0)
  else:
    mask_KTE = jax.nn.one_hot(expert_idx_TK.T, num_experts, dtype=jnp.int32) * \
        ffn_valid_TK.T[..., None]
    k, t, e = mask_KTE.shape
    pos_KTE = (jnp.cumsum(mask_KTE.reshape(k * t, e), axis=0) - 1).reshape(k, t, e)
    pos_KT = jnp.sum(pos_KTE * mask_KTE, axis=-1)  # the position at the chosen expert
    keep_KT = ffn_valid_TK.T & (pos_KT < limit)
    dispatch_TEC = jnp.zeros((t, e, capacity), jnp.float32)
    combine_TEC = jnp.zeros((t, e, capacity), jnp.float32)
    for i in range(k):  # fixed order; each pair lands in one (expert, position) cell
      cell = (mask_KTE[i].astype(jnp.float32)[..., None]
              * jax.nn.one_hot(pos_KT[i], capacity, dtype=jnp.float32)[:, None, :]
              * keep_KT[i][:, None, None])
      dispatch_TEC = dispatch_TEC + cell
      combine_TEC = combine_TEC + cell * weights_TK[:, i, None, None]
    dropped = jnp.sum(ffn_valid_TK) - jnp.sum(keep_KT)
    computed = jnp.einsum("kte,kt->e", mask_KTE, keep_KT.astype(jnp.int32))
  x_ECD = jnp.einsum("tec,td->ecd", dispatch_TEC.astype(dtype), x_TD.astype(dtype))
  x_ECD = nn.with_logical_constraint(x_ECD, ("expert", None, None))
  y_ECD = swiglu_stacked(x_ECD, experts["wi_gate"], experts["wi_up"], experts["wo"], dtype)
  y_ECD = nn.with_logical_constraint(y_ECD, ("expert", None, None))
  y_TD = jnp.einsum("tec,ecd->td", combine_TEC, y_ECD.astype(jnp.float32))
  return y_TD, dropped.astype(jnp.float32), computed.astype(jnp.float32)


def grouped_capacity_dispatch(x_TD, expert_idx_TK, ffn_valid_TK, weights_TK, experts, *,
                              num_groups: int, capacity, dense_slots, dtype, limit_N=None):
  """capacity_dispatch within each of `num_groups` consecutive token groups (GShard groups):
  the dispatch/combine tensors are [N, T / N, E, C] with C from the group size, so memory is
  linear in T. `limit_N`: [N] traced capacities. Same outputs as capacity_dispatch."""
  if num_groups == 1:
    return capacity_dispatch(x_TD, expert_idx_TK, ffn_valid_TK, weights_TK, experts,
                             capacity=capacity, dense_slots=dense_slots, dtype=dtype,
                             limit=None if limit_N is None else limit_N[0])
  split = lambda a: a.reshape((num_groups, -1) + a.shape[1:])
  limit_N = jnp.full((num_groups,), capacity, jnp.int32) if limit_N is None else limit_N
  per_group = lambda x, i, v, w, lim: capacity_dispatch(
      x, i, v, w, experts, capacity=capacity, dense_slots=dense_slots, dtype=dtype, limit=lim)
  y_NGD, dropped_N, computed_NE = jax.vmap(per_group)(
      split(x_TD), split(expert_idx_TK), split(ffn_valid_TK), split(weights_TK), limit_N)
  return (y_NGD.reshape(x_TD.shape[0], -1), jnp.sum(dropped_N),
          jnp.sum(computed_NE, axis=0))
