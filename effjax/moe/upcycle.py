"""Sparse upcycling: a dense LM's params -> the params of the same LM with MoE FFN layers.

A pure function. Every MoE layer's experts become copies of the dense SwiGLU at the same place;
two optional ways make the copies differ: Gaussian noise of `noise` x the weight's standard
deviation, and EvoMoE's expert-diversify, which zeroes a random fraction `mask` of each copy's
weights (an independent mask per expert and weight; the kept weights are not rescaled). The router, gating residual, constant and shared experts keep the values
of `moe_params` (a fresh initialisation of the MoE model); every other param is copied from
the dense model. With renormalised top-k weights (softmax_topk with renormalize, topk_softmax,
sigmoid_bias with renormalize), dropless dispatch, no zero/copy/constant or shared experts and
no noise, the MoE model computes the dense model's function.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

EXPERT_WEIGHTS = ("wi_gate", "wi_up", "wo")


def _is_moe(node) -> bool:
  return isinstance(node, Mapping) and "router" in node and "wi_gate" in node and not \
      isinstance(node["wi_gate"], Mapping)


def _is_dense_ffn(node) -> bool:
  return isinstance(node, Mapping) and all(
      isinstance(node.get(w), Mapping) and "kernel" in node[w] for w in EXPERT_WEIGHTS)


def upcycle_params(dense_params, moe_params, rng=None, noise: float = 0.0, mask: float = 0.0):
  """`moe_params`' structure, with each MoE layer's experts copied from `dense_params`.

  Params that differ in kind elsewhere (e.g. a dense kernel where `moe_params` has Monarch
  factors) are left as in `dense_params`, for a later projection. Scanned layers (a leading
  layers axis on both) are handled: the expert axis goes after it. `noise` and `mask` need `rng`.
  """
  if (noise or mask) and rng is None:
    raise ValueError(f"upcycle_params: noise={noise} and mask={mask} need an rng")
  if not 0 <= mask < 1:
    raise ValueError(f"upcycle_params: mask={mask} must be in [0, 1)")
  counter = [0]

  def walk(p, t, path):
    if _is_moe(t):
      if not _is_dense_ffn(p):
        raise ValueError(f"{path}: the MoE layer has no dense SwiGLU (wi_gate, wi_up, wo "
                         f"kernels) at the same place in the dense params (found "
                         f"{sorted(p) if isinstance(p, Mapping) else type(p).__name__})")
      out = dict(t)
      for name in EXPERT_WEIGHTS:
        w = p[name]["kernel"]
        target = t[name]
        lead = w.ndim - 2  # scanned layers
        if w.shape[:lead] + w.shape[lead:] != target.shape[:lead] + target.shape[lead + 1:]:
          raise ValueError(f"{path}/{name}: dense kernel {w.shape} does not match the experts "
                           f"{target.shape} (expert width model.moe.d_ff must equal "
                           "model.d_ff)")
        copies = jnp.broadcast_to(jnp.expand_dims(w, lead),
                                  target.shape).astype(target.dtype)
        key = jax.random.fold_in(rng, counter[0]) if rng is not None else None
        counter[0] += 1
        if noise:
          std = jnp.std(w.astype(jnp.float32))
          copies = copies + (noise * std * jax.random.normal(
              jax.random.fold_in(key, 0), target.shape)).astype(target.dtype)
        if mask:
          keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 1.0 - mask, target.shape)
          copies = jnp.where(keep, copies, jnp.zeros((), target.dtype))
        out[name] = copies
      return out
    if isinstance(t, Mapping) and isinstance(p, Mapping):
      if set(p) != set(t):
        if "kernel" in p and "kernel" not in t:
          return p  # another kind of projection: converted later (e.g. Monarch projection)
        raise ValueError(f"param tree mismatch at {path or '/'}: {sorted(p)} vs {sorted(t)}")
      return {k: walk(p[k], t[k], f"{path}/{k}") for k in p}
    if isinstance(t, Mapping) or isinstance(p, Mapping):
      raise ValueError(f"param tree mismatch at {path or '/'}")
    if tuple(p.shape) != tuple(t.shape):
      raise ValueError(f"param {path}: shape {p.shape} does not match the target's {t.shape}")
    return p

  return walk(dense_params, moe_params, "")
