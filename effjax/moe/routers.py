"""Routers: float32 router logits -> a `Routing` (which experts each token uses, and weights).

Shapes: T tokens, R routed experts (FFN + zero/copy/constant), K slots per token, E FFN experts.
Every router returns the same structure, so dispatch never depends on the router:

  softmax_topk     probabilities = softmax(logits), the top k, optionally renormalised (GShard;
                   top-1 must not renormalise, or its weight is 1 and the task loss never
                   reaches the router: Switch scales by the raw gate value). Ties go to the
                   lower expert index (lax.top_k), so runs agree.
  topk_softmax     top k of the logits, softmax over those k (Mixtral; k >= 2).
  sigmoid_bias     sigmoid scores; the top k of scores + a selection bias choose the experts,
                   the chosen scores (renormalised) weight them (DeepSeek-V3). The bias is
                   state, updated outside the optimizer (`bias_update`).
  expert_choice    each FFN expert takes its top-C tokens by probability (Zhou et al. 2022),
                   C = ceil(cf * T * k / E) per group of tokens: exact balance, a variable
                   number of experts per token (cf * k on average); not causal.
  dense_to_sparse  EvoMoE's gate: Gumbel-softmax at temperature tau(step), annealed from
                   temp_start to temp_end; every expert whose gate >= threshold is used (always
                   at least the best one), weighted by its gate: dense at high tau, top-1 at low.
                   With hard_gumbel, once tau has reached temp_end the gate is hard top-1
                   (weight 1, straight-through gradient), EvoMoE's final phase. With
                   gate_activation the logits pass through tanh or sigmoid first (the
                   "activation dense-to-sparse gate" of the sample-efficiency analysis).

For expert_choice and dense_to_sparse K = E and slot k is expert k (`dense_slots`).

Padding: `token_mask` (False = a padding token, segment id 0) makes a token's slots invalid
(weight 0) for every router, so it takes no expert, no capacity and no compute, and the
statistics (load, balancing loss, z-loss, entropy) are taken over the real tokens only.
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
  # [T, K] the weight the router gives alt_idx, on the same scale as `weights` (a rerouted
  # pair is combined with the weight of the expert that computed it)
  alt_weights: jax.Array | None = None
  token_mask: jax.Array | None = None  # [T] bool, False for padding; None = all real
  dense_slots: bool = flax.struct.field(pytree_node=False, default=False)


def capacity(num_tokens: int, cfg: MoEConfig, factor: float) -> int:
  """C = ceil(factor * tokens * active experts per token / E), at least 1, at most tokens."""
  c = math.ceil(factor * num_tokens * cfg.active_ffn_experts / cfg.num_experts)
  return max(1, min(c, num_tokens))


def dynamic_capacity(num_real, cfg: MoEConfig, factor: float, static_capacity: int):
  """int32 C from the number of real (non-padding) tokens, <= the static buffer size: padding
  takes no capacity, so adding it changes no real token's routing."""
  c = jnp.ceil(jnp.float32(factor * cfg.active_ffn_experts / cfg.num_experts)
               * num_real.astype(jnp.float32)).astype(jnp.int32)
  return jnp.minimum(jnp.clip(c, 1, jnp.maximum(num_real, 1)), static_capacity)


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


def group_count(num_tokens: int, cfg: MoEConfig) -> int:
  """Number of routing groups (model.moe.group_size tokens each; 0 = one group)."""
  size = cfg.group_size or num_tokens
  if num_tokens % size:
    raise ValueError(f"model.moe.group_size={cfg.group_size} does not divide the {num_tokens} "
                     "tokens of the batch (batch x length)")
  return num_tokens // size


def _expert_choice(probs_TE, cfg: MoEConfig, factor: float, mask_T):
  """[T, E] bool: expert e takes its top-C real tokens of each group (C from the group's real
  tokens); ties go to the earlier token."""
  t, e = probs_TE.shape
  n = group_count(t, cfg)
  g = t // n
  c = capacity(g, cfg, factor)
  mask_NG = mask_T.reshape(n, g)
  limit_N = dynamic_capacity(jnp.sum(mask_NG, axis=1), cfg, factor, c)
  score_NEG = jnp.swapaxes(jnp.where(mask_NG[..., None], probs_TE.reshape(n, g, e), -1.0), 1, 2)
  _, token_NEC = jax.lax.top_k(score_NEG, c)
  take_NEC = jnp.arange(c)[None, None, :] < limit_N[:, None, None]
  chosen_NEG = jnp.zeros((n, e, g), jnp.bool_).at[
      jnp.arange(n)[:, None, None], jnp.arange(e)[None, :, None], token_NEC].set(take_NEC)
  return jnp.swapaxes(chosen_NEG, 1, 2).reshape(t, e) & mask_T[:, None]


def route(logits_TR, cfg: MoEConfig, *, train: bool, temperature=None, rng=None, bias_R=None,
          with_alternates: bool = False, token_mask_T=None) -> tuple[Routing, dict[str, jax.Array]]:
  """(Routing, extra metrics). dense_to_sparse: `temperature` (default temp_start), `rng`
  Gumbel noise (training only). `token_mask_T`: [T] bool, False for padding."""
  logits_TR = logits_TR.astype(jnp.float32)
  num_tokens = logits_TR.shape[0]
  mask = (jnp.ones((num_tokens,), jnp.bool_) if token_mask_T is None
          else token_mask_T.reshape(num_tokens).astype(jnp.bool_))
  extra = {}
  name = cfg.router
  if name in ("softmax_topk", "topk_softmax", "sigmoid_bias"):
    if cfg.top_k == 1 and (name == "topk_softmax" or cfg.renormalize):
      raise ValueError(f"model.moe.router={name!r} with top_k=1 and renormalize={cfg.renormalize}"
                       " gives the chosen expert weight 1: no task gradient for the router")
    alt = alt_weights = None
    if name == "softmax_topk":
      probs = jax.nn.softmax(logits_TR, axis=-1)
      select = probs
      weights, idx = jax.lax.top_k(probs, cfg.top_k)
      scale = jnp.sum(weights, axis=-1, keepdims=True) if cfg.renormalize else 1.0
      weights = weights / scale
      if with_alternates:
        alt = _alternates(select, idx, cfg.num_experts)
        alt_weights = jnp.take_along_axis(probs, alt, axis=-1) / scale
    elif name == "topk_softmax":
      probs = jax.nn.softmax(logits_TR, axis=-1)
      select = logits_TR
      top_logits, idx = jax.lax.top_k(logits_TR, cfg.top_k)
      weights = jax.nn.softmax(top_logits, axis=-1)
      if with_alternates:  # on the scale of the softmax over the chosen k logits
        alt = _alternates(select, idx, cfg.num_experts)
        alt_weights = jnp.exp(jnp.take_along_axis(logits_TR, alt, axis=-1)
                              - jax.nn.logsumexp(top_logits, axis=-1, keepdims=True))
    else:
      scores = jax.nn.sigmoid(logits_TR)
      probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
      select = scores + jax.lax.stop_gradient(bias_R)[None, :]
      _, idx = jax.lax.top_k(select, cfg.top_k)
      weights = jnp.take_along_axis(scores, idx, axis=-1)
      scale = jnp.sum(weights, axis=-1, keepdims=True) if cfg.renormalize else 1.0
      weights = weights / scale
      if with_alternates:
        alt = _alternates(select, idx, cfg.num_experts)
        alt_weights = jnp.take_along_axis(scores, alt, axis=-1) / scale
    idx = idx.astype(jnp.int32)
    valid = jnp.broadcast_to(mask[:, None], idx.shape)
    return Routing(idx, weights * valid, valid, probs, alt, alt_weights, mask), extra

  num_experts = cfg.num_experts
  slots = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, num_experts))
  probs = jax.nn.softmax(logits_TR, axis=-1)
  if name == "expert_choice":
    factor = cfg.capacity_factor if train else cfg.resolved_eval_capacity_factor
    valid = _expert_choice(probs, cfg, factor, mask)
    return Routing(slots, probs * valid, valid, probs, token_mask=mask, dense_slots=True), extra
  if name == "dense_to_sparse":
    tau = jnp.asarray(cfg.temp_start if temperature is None else temperature, jnp.float32)
    activated = {"none": lambda z: z, "tanh": jnp.tanh,
                 "sigmoid": jax.nn.sigmoid}[cfg.gate_activation](logits_TR)
    noisy = activated
    if train and rng is not None:  # Gumbel noise on the activated logits, as in evaluation
      noisy = activated + jax.random.gumbel(rng, logits_TR.shape, jnp.float32)
    gate = jax.nn.softmax(noisy / tau, axis=-1)
    best = jax.nn.one_hot(jnp.argmax(gate, axis=-1), num_experts, dtype=jnp.bool_)
    valid = ((gate >= cfg.threshold) | best) & mask[:, None]
    weights = gate * valid
    extra["temperature"] = tau
    if cfg.hard_gumbel:
      # annealed: hard top-1 with weight 1, gradients straight through the soft gate
      hard = tau <= jnp.float32(cfg.temp_end)
      best = best & mask[:, None]
      valid = jnp.where(hard, best, valid)
      weights = jnp.where(hard, best * (1.0 + gate - jax.lax.stop_gradient(gate)), weights)
      extra["hard_gate"] = hard.astype(jnp.float32)
    return Routing(slots, weights, valid, probs, token_mask=mask, dense_slots=True), extra
  raise ValueError(f"model.moe.router={name!r} is not one of the known routers")


def expert_load(routing: Routing, num_routed: int):
  """[R] float32: how many (token, slot) assignments the router gave each routed expert
  (padding has none). What ran after drops and reroutes is the layer's "computed_load"."""
  if routing.dense_slots:
    return jnp.sum(routing.valid, axis=0).astype(jnp.float32)
  one_hot = jax.nn.one_hot(routing.expert_idx, num_routed, dtype=jnp.float32)
  return jnp.einsum("tkr,tk->r", one_hot, routing.valid.astype(jnp.float32))


def _token_mean(values_T, mask_T):
  if mask_T is None:
    return jnp.mean(values_T, axis=0)
  m = mask_T.astype(jnp.float32).reshape((-1,) + (1,) * (values_T.ndim - 1))
  return jnp.sum(values_T * m, axis=0) / jnp.maximum(jnp.sum(m), 1.0)


def balance_weights(cfg: MoEConfig):
  """[R] eta of MoE++'s heterogeneous load-balance loss: 1 for FFN experts, moepp_tau for the
  zero/copy/constant experts (all 1 without them: the Switch loss)."""
  return jnp.concatenate([jnp.ones((cfg.num_experts,), jnp.float32),
                          jnp.full((cfg.num_routed - cfg.num_experts,), cfg.moepp_tau,
                                   jnp.float32)])


def load_balancing_loss(routing: Routing, load_R, eta_R=None):
  """R * sum_r eta_r f_r P_r (Switch with eta = 1: 1 when balanced); f = assignment fractions,
  P = mean router probabilities over the real tokens; eta: `balance_weights` (MoE++)."""
  num_routed = routing.probs.shape[1]
  f = jax.lax.stop_gradient(load_R / jnp.maximum(jnp.sum(load_R), 1.0))
  p = _token_mean(routing.probs, routing.token_mask)
  eta = jnp.ones_like(p) if eta_R is None else eta_R
  return num_routed * jnp.sum(eta * f * p)


def z_loss(logits_TR, token_mask_T=None):
  """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2."""
  lse = jax.nn.logsumexp(logits_TR.astype(jnp.float32), axis=-1)
  return _token_mean(jnp.square(lse), token_mask_T)


def router_entropy(routing: Routing):
  p = routing.probs
  return _token_mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1), routing.token_mask)


def bias_update(bias_R, load_R, rate: float):
  """Aux-loss-free balancing: bias += rate * sign(mean load - load) (from a stop-gradient load)."""
  load_R = jax.lax.stop_gradient(load_R)
  return bias_R + rate * jnp.sign(jnp.mean(load_R) - load_R)
