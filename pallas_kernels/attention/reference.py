"""Pure-jnp attention: the semantics every kernel in this package reproduces.

Masking (all conditions must hold for query i to see key j; indices are positions in the
query and key sequences, 0-based, so causal masks are aligned at the top-left):
  causal           j <= i
  sliding_window   causal: i - w < j <= i (the w most recent keys, itself included);
                   not causal: |i - j| < w (w - 1 keys either side, itself included)
  segment_ids      segment_ids[b, i] == segment_ids[b, j] (packed documents)
Logits are `sm_scale * q.k`, then `cap * tanh(logits / cap)` when logit_softcap is set.
A query row that sees no key at all (possible with non-causal segment masks) outputs zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so that max/exp of an all-masked block never makes inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def visible(q_pos, k_pos, *, causal: bool, sliding_window: int | None, q_seg=None,
            k_seg=None, kv_len: int | None = None):
  """Boolean mask, broadcast from q_pos [..., Tq, 1] and k_pos [..., 1, Tk] (jnp or in-kernel).

  kv_len masks keys at or past the true kv length (the kernels pad keys to a block multiple).
  """
  mask = None

  def both(a, b):
    return b if a is None else a & b

  if kv_len is not None:
    mask = both(mask, k_pos < kv_len)
  if causal:
    mask = both(mask, k_pos <= q_pos)
    if sliding_window is not None:
      mask = both(mask, k_pos > q_pos - sliding_window)
  elif sliding_window is not None:
    mask = both(mask, (k_pos > q_pos - sliding_window) & (k_pos < q_pos + sliding_window))
  if q_seg is not None:
    mask = both(mask, q_seg == k_seg)
  return mask


def softcap(logits, cap: float | None):
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def attention_reference(q_BTNH, k_BSKH, v_BSKH, *, causal: bool = False,
                        sliding_window: int | None = None, logit_softcap: float | None = None,
                        segment_ids_BT=None, sm_scale: float | None = None):
  """softmax(mask(softcap(sm_scale q k^T))) v with float32 softmax; output in q's dtype."""
  b, t, n, h = q_BTNH.shape
  s, kv = k_BSKH.shape[1], k_BSKH.shape[2]
  if sm_scale is None:
    sm_scale = h ** -0.5
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * sm_scale
  logits_BKGTS = softcap(logits_BKGTS, logit_softcap)
  q_pos = jnp.arange(t)[:, None]
  k_pos = jnp.arange(s)[None, :]
  q_seg = k_seg = None
  if segment_ids_BT is not None:
    q_seg = segment_ids_BT[:, None, None, :, None]
    k_seg = segment_ids_BT[:, None, None, None, :]
  mask = visible(q_pos, k_pos, causal=causal, sliding_window=sliding_window, q_seg=q_seg,
                 k_seg=k_seg)
  if mask is None:
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
  else:
    mask = jnp.broadcast_to(mask, logits_BKGTS.shape)
    logits_BKGTS = jnp.where(mask, logits_BKGTS, MASK_VALUE)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
    probs_BKGTS = probs_BKGTS * mask.any(axis=-1, keepdims=True)  # rows that see nothing -> 0
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH,
                         preferred_element_type=jnp.float32)
  return out_BTKGH.reshape(b, t, n, h).astype(q_BTNH.dtype)
