"""Routers: float32 router logits -> a `Routing` (which experts each token uses, and weights).

Shapes: T tokens, R routed experts (FFN + zero/copy/constant), K slots per token, E FFN experts.
Every router returns the same structure, so dispatch never depends on the router:

  softmax_topk     probabilities = softmax(logits), the top k, optionally renormalised (Switch,
                   GShard). Ties go to the lower expert index (lax.top_k), so runs agree.
  topk_softmax     top k of the logits, softmax over those k (Mixtral).
  sigmoid_bias     sigmoid scores; the top k of scores + a selection bias choose the experts,
                   the chosen scores (renormalised) weight them (DeepSeek-V3). The bias is
                   state, updated outside the optimizer (`bias_update`).
  expert_choice    each FFN expert takes its top-C tokens by probability (Zhou et al. 2022):
                   exact balance, a variable number of experts per token; not causal.
  dense_to_sparse  EvoMoE's gate: Gumbel-softmax at temperature tau(step), annealed from
                   temp_start to temp_end; every expert whose gate >= threshold is used (always
                   at least the best one), weighted by its gate: dense at high tau, top-1 at low.
                   With hard_gumbel, once tau has reached temp_end the gate is hard top-1
                   (weight 1, straight-through gradient), EvoMoE's final phase. With
                   gate_activation the logits pass through tanh or sigmoid first (the
                   "activation dense-to-sparse gate" of the sample-efficiency analysis).

For expert_choice and dense_to_sparse K = E and slot k is expert k (`dense_slots`).
"""
from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp

from effjax.config import MoEConfig


@flax.struct.dataclass
class Routing:
  expert_idx: jax.Array  # [T, K] int32 in [0, R)
  weights: jax.Array  # [T, K] float32 combine weights, 0 where not valid
  valid: jax.Array  # [T, K] bool: the slot is used
  probs: jax.Array  # [T, R] float32 router probabilities (load-balancing loss, entropy)
  alt_idx: jax.Array | None = None  # [T, K] next-ranked FFN experts (expert-parallel reroute)
  dense_slots: bool = flax.struct.field(pytree_node=False, default=False)


def capacity(num_tokens: int, cfg: MoEConfig, factor: float) -> int:
  """C = ceil(factor * tokens * active experts per token / E), at least 1, at most tokens."""
  c = math.ceil(factor * num_tokens * cfg.active_ffn_experts / cfg.num_experts)
  return max(1, min(c, num_tokens))


def temperature(step, cfg: MoEConfig):
  """dense_to_sparse temperature after `step` updates (held at temp_end after anneal_steps)."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / cfg.anneal_steps, 0.0, 1.0)
  if cfg.anneal == "linear":
    tau = cfg.temp_start + (cfg.temp_end - cfg.temp_start) * frac
  else:
    tau = cfg.temp_start * (cfg.temp_end / cfg.temp_start) ** frac
  # exactly temp_end once annealed (rounding could leave it an ulp off): hard_gumbel keys on it
  return jnp.where(frac >= 1.0, jnp.float32(cfg.temp_end), tau)


def _alternates(select_TR, idx_TK, num_experts: int):
  """For each slot, a different FFN expert not chosen by the token: its (K + k)-th best."""
  k = idx_TK.shape[1]
  chosen = jnp.any(jax.nn.one_hot(idx_TK, select_TR.shape[1], dtype=jnp.bool_), axis=1)
  masked = jnp.where(chosen, -jnp.inf, select_TR)[:, :num_experts]
  return jax.lax.top_k(masked, k)[1].astype(jnp.int32)


def route(logits_TR, cfg: MoEConfig, *, train: bool, temperature=None, rng=None, bias_R=None,
          with_alternates: bool = False) -> tuple[Routing, dict[str, jax.Array]]:
  """(Routing, extra metrics). dense_to_sparse: `temperature` (default temp_start), `rng`
  Gumbel noise (training only)."""
  logits_TR = logits_TR.astype(jnp.float32)
  num_tokens = logits_TR.shape[0]
  extra = {}
  name = cfg.router
  if name in ("softmax_topk", "topk_softmax", "sigmoid_bias"):
    if name == "softmax_topk":
      probs = jax.nn.softmax(logits_TR, axis=-1)
      select = probs
      weights, idx = jax.lax.top_k(probs, cfg.top_k)
      if cfg.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    elif name == "topk_softmax":
      probs = jax.nn.softmax(logits_TR, axis=-1)
      select = logits_TR
      top_logits, idx = jax.lax.top_k(logits_TR, cfg.top_k)
      weights = jax.nn.softmax(top_logits, axis=-1)
    else:
      scores = jax.nn.sigmoid(logits_TR)
      probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
      select = scores + jax.lax.stop_gradient(bias_R)[None, :]
      _, idx = jax.lax.top_k(select, cfg.top_k)
      weights = jnp.take_along_axis(scores, idx, axis=-1)
      if cfg.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    idx = idx.astype(jnp.int32)
    alt = _alternates(select, idx, cfg.num_experts) if with_alternates else None
    valid = jnp.ones(idx.shape, jnp.bool_)
    return Routing(idx, weights, valid, probs, alt), extra

  num_experts = cfg.num_experts
  slots = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, num_experts))
  probs = jax.nn.softmax(logits_TR, axis=-1)
  if name == "expert_choice":
    c = capacity(num_tokens, cfg, cfg.capacity_factor if train else cfg.eval_capacity_factor)
    _, token_EC = jax.lax.top_k(probs.T, c)  # ties: the earlier token
    chosen_ET = jnp.zeros((num_experts, num_tokens), jnp.bool_).at[
        jnp.arange(num_experts)[:, None], token_EC].set(True)  # a set, not an add
    valid = chosen_ET.T
    return Routing(slots, probs * valid, valid, probs, None, dense_slots=True), extra
  if name == "dense_to_sparse":
    tau = jnp.asarray(cfg.temp_start if temperature is None else temperature, jnp.float32)
    noisy = {"none": lambda z: z, "tanh": jnp.tanh,
             "sigmoid": jax.nn.sigmoid}[cfg.gate_activation](logits_TR)
    if train and rng is not None:
      noisy = logits_TR + jax.random.gumbel(rng, logits_TR.shape, jnp.float32)
    gate = jax.nn.softmax(noisy / tau, axis=-1)
    best = jax.nn.one_hot(jnp.argmax(gate, axis=-1), num_experts, dtype=jnp.bool_)
    valid = (gate >= cfg.threshold) | best
    weights = gate * valid
    extra["temperature"] = tau
    if cfg.hard_gumbel:
      # annealed: hard top-1 with weight 1, gradients straight through the soft gate
      hard = tau <= jnp.float32(cfg.temp_end)
      valid = jnp.where(hard, best, valid)
      weights = jnp.where(hard, best * (1.0 + gate - jax.lax.stop_gradient(gate)), weights)
      extra["hard_gate"] = hard.astype(jnp.float32)
    return Routing(slots, weights, valid, probs, None, dense_slots=True), extra
  raise ValueError(f"model.moe.router={name!r} is not one of the known routers")


def expert_load(routing: Routing, num_routed: int):
  """[R] float32: how many (token, slot) assignments each routed expert received."""
  if routing.dense_slots:
    return jnp.sum(routing.valid, axis=0).astype(jnp.float32)
  one_hot = jax.nn.one_hot(routing.expert_idx, num_routed, dtype=jnp.float32)
  return jnp.einsum("tkr,tk->r", one_hot, routing.valid.astype(jnp.float32))


def load_balancing_loss(routing: Routing, load_R):
  """Switch: R * sum_r f_r * P_r (1 when balanced); f = assignment fractions, P = mean probs."""
  num_routed = routing.probs.shape[1]
  f = jax.lax.stop_gradient(load_R / jnp.maximum(jnp.sum(load_R), 1.0))
  p = jnp.mean(routing.probs, axis=0)
  return num_routed * jnp.sum(f * p)


def z_loss(logits_TR):
  """ST-MoE router z-loss: mean of logsumexp(logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TR.astype(jnp.float32), axis=-1)))


def router_entropy(routing: Routing):
  p = routing.probs
  return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))


def bias_update(bias_R, load_R, rate: float):
  """Aux-loss-free balancing: bias += rate * sign(mean load - load) (from a stop-gradient load)."""
  load_R = jax.lax.stop_gradient(load_R)
  return bias_R + rate * jnp.sign(jnp.mean(load_R) - load_R)
