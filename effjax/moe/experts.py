"""MoE++ zero-computation experts: computed locally on every device, never dispatched.

Routed expert ids past the E FFN experts: `num_zero` zero experts (output 0: the token's slot
is discarded), `num_copy` copy experts (output x: the slot skips the layer), `num_constant`
constant experts (output a1 * x + a2 * v_j with a learned vector v_j and
[a1, a2] = softmax(x W_j), W_j in R^{D x 2}). Each is weighted by its slot's combine weight.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def zero_computation_output(x_TD, expert_idx_TK, weights_TK, *, num_experts: int,
                            num_zero: int, num_copy: int, constant_vectors=None,
                            constant_gates=None):
  """[T, D] float32: the copy and constant experts' weighted outputs (zero experts add 0).

  `weights_TK` is zero where a slot is not used; constant_vectors [Nc, D], constant_gates
  [Nc, D, 2].
  """
  x = x_TD.astype(jnp.float32)
  out = jnp.zeros_like(x)
  copy_start = num_experts + num_zero
  const_start = copy_start + num_copy
  if num_copy:
    is_copy = (expert_idx_TK >= copy_start) & (expert_idx_TK < const_start)
    out = out + jnp.sum(weights_TK * is_copy, axis=-1)[:, None] * x
  if constant_vectors is not None and constant_vectors.shape[0]:
    num_const = constant_vectors.shape[0]
    onehot_TKC = jax.nn.one_hot(expert_idx_TK - const_start, num_const, dtype=jnp.float32)
    w_TC = jnp.einsum("tkc,tk->tc", onehot_TKC, weights_TK)
    mix_TC2 = jax.nn.softmax(jnp.einsum("td,cde->tce", x, constant_gates.astype(jnp.float32)),
                             axis=-1)
    out = out + jnp.einsum("tc,tc->t", w_TC, mix_TC2[..., 0])[:, None] * x
    out = out + jnp.einsum("tc,cd->td", w_TC * mix_TC2[..., 1],
                           constant_vectors.astype(jnp.float32))
  return out
