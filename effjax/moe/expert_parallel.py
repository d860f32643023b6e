"""Expert parallelism: dropless dispatch inside `jax.shard_map` over the `expert` mesh axis.

Each device of the expert axis holds E / EP experts (the global [E, ...] weights sharded on
their `expert` axis) and its shard of the tokens (the batch is sharded over data, fsdp and
expert). On each device:

  1. pairs (token, slot) sorted by expert, hence by destination device (slot-major priority);
  2. packed into a static buffer [EP, S, D] with S rows per destination (S = P_local, the worst
     case, when model.moe.ep_buffer_factor = 0, else ceil(factor * P_local / EP)); a pair that
     does not fit is counted as overflow (reported as dropped; its residual passes through),
     or, with ep_reroute, first offered to its token's next-ranked expert where there is room;
     a rerouted pair is combined with the router's weight for the expert that computed it
     (`Routing.alt_weights`, so the gradient reaches that expert's router logit) and counted
     in that expert's computed load;
  3. `jax.lax.all_to_all` sends row block d to device d; the received rows are sorted by local
     expert and computed with one grouped matmul per SwiGLU weight;
  4. a second all_to_all returns them; they are unpacked, unsorted and combined in slot order.

Every gather has a gather for its gradient (effjax.moe.dispatch), and the all-to-all's
transpose is the reverse all-to-all, so gradients flow to the tokens, the combine weights
(the router) and each device's local experts. Zero/copy/constant experts never come here.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from effjax.moe import dispatch as dispatch_lib
from effjax.parallel.mesh import mesh_spec

EXPERT_AXIS = "expert"


def expert_parallel_size(mesh) -> int:
  """Size of the `expert` axis of `mesh` (an abstract or concrete mesh; 1 when absent)."""
  if mesh is None or getattr(mesh, "empty", True):
    return 1
  return dict(mesh.shape).get(EXPERT_AXIS, 1)


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes the batch is sharded over (the `batch` logical rule), present in `mesh`."""
  spec = mesh_spec(("batch",))[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return tuple(a for a in axes if a in mesh.axis_names)


def buffer_rows(pairs_local: int, ep: int, factor: float) -> int:
  """Rows per destination in the all-to-all buffer."""
  if factor <= 0:
    return pairs_local
  return max(1, min(pairs_local, math.ceil(factor * pairs_local / ep)))


def _fit(dest_P, room_D, num_dest: int):
  """keep[p]: pair p (destination dest_P[p], num_dest = none) fits into its destination's
  `room`, pairs taking room in pair order."""
  onehot = jax.nn.one_hot(dest_P, num_dest, dtype=jnp.int32)  # zero row for "none"
  rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
  room = jnp.take(room_D, jnp.minimum(dest_P, num_dest - 1))
  return (dest_P < num_dest) & (rank < room)


def _local_dropless(x_TD, idx_TK, valid_TK, w_TK, alt_TK, alt_w_TK, wg, wu, wo, *, num_experts,
                    ep, factor, reroute, impl, dtype, axes):
  num_tokens, k = idx_TK.shape
  local_experts = wg.shape[0]
  pairs = num_tokens * k
  rows = buffer_rows(pairs, ep, factor)
  e_P = dispatch_lib.pair_experts(idx_TK, valid_TK, num_experts)
  dest_P = e_P // local_experts  # ep for "no FFN assignment"
  full_room = jnp.full((ep,), rows, jnp.int32)
  keep_P = _fit(dest_P, full_room, ep)
  rerouted = jnp.zeros((), jnp.float32)
  w_P = w_TK.T.reshape(-1)
  if reroute:
    alt_P = alt_TK.T.reshape(-1).astype(jnp.int32)
    kept_per_dest = jnp.sum(jax.nn.one_hot(dest_P, ep, dtype=jnp.int32) * keep_P[:, None], 0)
    overflow = (dest_P < ep) & ~keep_P
    alt_dest = jnp.where(overflow, alt_P // local_experts, ep)
    keep_alt = _fit(alt_dest, rows - kept_per_dest, ep)
    e_P = jnp.where(keep_P, e_P, jnp.where(keep_alt, alt_P, num_experts))
    rerouted = jnp.sum(keep_alt).astype(jnp.float32)
    w_P = jnp.where(keep_P, w_P, alt_w_TK.T.reshape(-1))
    keep_P = keep_P | keep_alt
  else:
    e_P = jnp.where(keep_P, e_P, num_experts)
  overflowed = jnp.sum(valid_TK) - jnp.sum(keep_P)  # valid FFN pairs that found no room

  # sort the kept pairs by expert (so by destination); pack row j of block d from the
  # sorted position starts[d] + j
  order, inv_order, group_sizes = dispatch_lib.sort_by_group(e_P, num_experts)
  per_dest = jnp.sum(group_sizes.reshape(ep, local_experts), axis=1)  # <= rows each
  starts = jnp.cumsum(per_dest) - per_dest
  j = jnp.arange(rows, dtype=jnp.int32)
  src_DS = jnp.where(j[None, :] < per_dest[:, None], starts[:, None] + j[None, :], pairs)
  src = src_DS.reshape(-1)  # sorted pair feeding each buffer row (pairs = empty row)
  e_sorted = jnp.take(e_P, order)
  dest_sorted = e_sorted // local_experts
  slot_of_sorted = jnp.where(e_sorted < num_experts,
                             dest_sorted * rows + jnp.arange(pairs) -
                             jnp.take(starts, jnp.minimum(dest_sorted, ep - 1)),
                             ep * rows).astype(jnp.int32)
  x_sorted = dispatch_lib.gather_pairs(x_TD, order, inv_order, k)
  send = dispatch_lib.gather_rows(x_sorted, src, slot_of_sorted)  # [EP * S, D]
  send_e = jnp.where(src < pairs, jnp.take(e_sorted, jnp.minimum(src, pairs - 1))
                     - jnp.repeat(jnp.arange(ep) * local_experts, rows), local_experts)
  d = x_TD.shape[-1]
  recv = jax.lax.all_to_all(send.reshape(ep, rows, d), EXPERT_AXIS, 0, 0, tiled=True)
  recv_e = jax.lax.all_to_all(send_e.reshape(ep, rows).astype(jnp.int32), EXPERT_AXIS, 0, 0,
                              tiled=True)
  recv = recv.reshape(ep * rows, d)
  l_order, l_inv, l_sizes = dispatch_lib.sort_by_group(recv_e.reshape(-1), local_experts)
  y_local = dispatch_lib.swiglu_grouped(dispatch_lib.gather_rows(recv, l_order, l_inv), l_sizes,
                                        wg, wu, wo, impl, dtype)
  y_recv = dispatch_lib.gather_rows(y_local, l_inv, l_order)
  back = jax.lax.all_to_all(y_recv.reshape(ep, rows, d), EXPERT_AXIS, 0, 0, tiled=True)
  y_sorted = dispatch_lib.gather_rows(back.reshape(ep * rows, d), slot_of_sorted, src)
  y_KTD = dispatch_lib.gather_rows(y_sorted, inv_order, order).reshape(k, num_tokens, d)
  w_TK = (w_P * keep_P).reshape(k, num_tokens).T
  y_TD = dispatch_lib.combine_slots(y_KTD, w_TK)
  stats = jnp.concatenate([jnp.stack([overflowed.astype(jnp.float32), rerouted]),
                           group_sizes.astype(jnp.float32)])  # + load where the work ran
  return y_TD, jax.lax.psum(stats, axes)


def expert_parallel_dispatch(x_TD, expert_idx_TK, ffn_valid_TK, weights_TK, alt_TK, experts, *,
                             mesh, factor: float, reroute: bool, impl: str, dtype,
                             alt_weights_TK=None):
  """(y [T, D] float32, dropped pair count, rerouted pair count, computed load [E]) over
  `mesh`'s expert axis. `alt_TK`, `alt_weights_TK`: each slot's next expert and its weight."""
  ep = expert_parallel_size(mesh)
  num_experts = experts["wi_gate"].shape[0]
  if num_experts % ep:
    raise ValueError(f"model.moe.num_experts={num_experts} is not divisible by the expert "
                     f"mesh axis ({ep} devices)")
  axes = batch_axes(mesh)
  tok = P(axes)
  if reroute and (alt_TK is None or alt_weights_TK is None):
    raise ValueError("expert_parallel_dispatch: reroute=True needs alt_TK and alt_weights_TK")
  if alt_TK is None:
    alt_TK = jnp.zeros_like(expert_idx_TK)
  if alt_weights_TK is None:
    alt_weights_TK = jnp.zeros_like(weights_TK)
  fn = lambda *a: _local_dropless(*a, num_experts=num_experts, ep=ep, factor=factor,
                                  reroute=reroute, impl=impl, dtype=dtype, axes=axes)
  w_spec = P(EXPERT_AXIS)
  # check_vma=False: a Pallas gmm's pallas_call output carries no varying-axes type. The
  # weights' cotangents are still summed over the axes they are replicated on (data).
  y_TD, stats = jax.shard_map(
      fn, mesh=mesh, in_specs=(tok, tok, tok, tok, tok, tok, w_spec, w_spec, w_spec),
      out_specs=(tok, P()), check_vma=False)(x_TD, expert_idx_TK, ffn_valid_TK, weights_TK, alt_TK,
                           alt_weights_TK, experts["wi_gate"], experts["wi_up"], experts["wo"])
  return y_TD, stats[0], stats[1], stats[2:]
