"""The Monarch product in plain jnp: what every kernel implementation is checked against.

x [T, n_in] -> y [T, n_out] with factors w1 [k, q, p] and w2 [k, s, q] (effjax's layout; see
effjax/layers/monarch.py for the maths): zero-pad x to k p, block-diagonal w1, the stride
permutation, block-diagonal w2, the output permutation, cut to n_out. Products accumulate in
float32 and the intermediate is rounded to the input dtype, as a bf16 einsum does.
"""
from __future__ import annotations

import jax.numpy as jnp


def monarch_reference(x, w1, w2, out_features: int):
  k, q, p = w1.shape
  _, s, r = w2.shape
  t, n_in = x.shape
  x = jnp.pad(x, ((0, 0), (0, k * p - n_in))).reshape(t, k, p)
  h = jnp.einsum("tkp,kqp->tkq", x, w1, preferred_element_type=jnp.float32).astype(x.dtype)
  h = jnp.swapaxes(h.reshape(t, r, k), 1, 2)  # flat j q + a read as (a', l), a' k + l
  y = jnp.einsum("tlr,lsr->tls", h, w2, preferred_element_type=jnp.float32)
  return jnp.swapaxes(y, 1, 2).reshape(t, s * k)[:, :out_features].astype(x.dtype)
