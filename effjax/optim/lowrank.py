"""The optimizer of every method, built from config: AdamW, or the low-rank methods' chain.

  optimizer_for(cfg)       (tx, lr_fn). Without LoRA/SST layers or GaLore: exactly
                           adamw.make_optimizer / adamw.learning_rate_fn. Otherwise the AdamW
                           chain clip -> Adam (GaLore-Adam when optim.galore_rank > 0) ->
                           decoupled weight decay -> learning rate [-> re-warm-up] [-> SST
                           projection]. Clipping measures the true gradient (SST's enhanced
                           gradients weighted by sigma_i); the re-warm-up after each restart
                           (optim.rewarm_steps > 0) scales only the params the restart resets
                           (reset_params), lr_fn is the envelope.
  sst_projection()         the last link of the chain for SST: turns the update into "projected
                           new params - old params": sigma clamped at 0, each active U/V column
                           renormalised to unit norm.

The restarts themselves (SST resample, ReLoRA merge) are state transforms in
effjax/train/methods/; the memory report is effjax/train/methods/low_rank.py.

Weight decay: on 2-D params as before, except SST's u_cols / v_cols (renormalised every step,
decay on them would do nothing but fight the renormalisation). sigma is 1-D (no decay).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from effjax.config import ExperimentConfig
from effjax.layers import lora as lora_lib
from effjax.layers import spectral
from effjax.optim.adamw import learning_rate_fn, make_optimizer
from effjax.optim.galore import scale_by_galore
from effjax.optim.schedules import jagged_cosine
from effjax.trees import is_layer, last_key

# -- the optimizer ----------------------------------------------------------------------------


def _true_gradient_weights(params, sst_state):
  """Per-leaf factors turning gradients into true gradients: sigma[idx] on the columns of SST's
  u_cols / v_cols (their gradient is the enhanced one, without sigma_i), 1 elsewhere."""
  if is_layer(params, spectral.PARAM_NAMES) and isinstance(sst_state, Mapping) and (
      "idx" in sst_state):
    active = jnp.take_along_axis(params["sigma"], sst_state["idx"], axis=-1)[..., None, :]
    return {k: active if k in ("u_cols", "v_cols") else jnp.ones((), jnp.float32)
            for k in params}
  if isinstance(params, Mapping):
    return {k: _true_gradient_weights(v, sst_state.get(k) if isinstance(sst_state, Mapping)
                                      else None) for k, v in params.items()}
  return jnp.ones((), jnp.float32)


def clip_by_true_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm with the norm taken over the true gradient.

  SST's u_cols / v_cols receive the enhanced gradient (effjax/layers/spectral.py), which is
  the true one divided by sigma_i; measuring those would clip far more often and shrink every
  other parameter's gradient with them. The one scale factor is applied to what was given
  (enhanced gradients stay enhanced). Needs `model_state=` (SST's idx) in update() when the
  params hold SST layers."""

  def update(updates, state, params=None, *, model_state=None, **extra):
    del extra
    sst_state = (model_state or {}).get(spectral.SST_COLLECTION)
    if params is None or (sst_state is None and _has_sst(params)):
      raise ValueError("clip_by_true_global_norm needs params and model_state (SST's active "
                       "indices) in update(); got params=%s, model_state=%s" % (
                           "None" if params is None else "given",
                           "None" if model_state is None else sorted(model_state)))
    norm = _weighted_norm(updates, _true_gradient_weights(params, sst_state))
    scale = jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def _weighted_norm(grads, weights) -> jax.Array:
  squares = jax.tree.map(lambda g, w: jnp.sum(jnp.square(g.astype(jnp.float32) * w)),
                         grads, weights)
  return jnp.sqrt(sum(jax.tree.leaves(squares)))


def true_global_norm(grads, params, model_state) -> jax.Array:
  """The global norm of the true gradient, the one clip_by_true_global_norm measures: with SST
  layers their enhanced u_cols / v_cols gradients are weighted by sigma_i; without them, the
  plain global norm."""
  sst_state = (model_state or {}).get(spectral.SST_COLLECTION)
  if sst_state is None:
    return optax.tree.norm(grads)
  return _weighted_norm(grads, _true_gradient_weights(params, sst_state))


def _has_sst(params) -> bool:
  if is_layer(params, spectral.PARAM_NAMES):
    return True
  return isinstance(params, Mapping) and any(_has_sst(v) for v in params.values())


def sst_projection() -> optax.GradientTransformation:
  """Makes the step land on SST's constraint set: sigma >= 0, unit-norm active columns."""

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("sst_projection needs params in update()")
    new = optax.apply_updates(params, updates)

    def project(node):
      if not is_layer(node, spectral.PARAM_NAMES):
        if isinstance(node, Mapping):
          return {k: project(v) for k, v in node.items()}
        return node
      def unit(c):
        return c / jnp.maximum(jnp.linalg.norm(c, axis=-2, keepdims=True), 1e-12)
      return dict(node, sigma=jnp.maximum(node["sigma"], 0.0), u_cols=unit(node["u_cols"]),
                  v_cols=unit(node["v_cols"]))

    projected = project(new)
    return jax.tree.map(lambda n, p: (n - p).astype(p.dtype), projected, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def restart_every(cfg: ExperimentConfig) -> int:
  """Steps between the restarts that re-warm the learning rate (0: none)."""
  linear = cfg.model.linear
  if linear.uses("sst"):
    return linear.sst_every
  if linear.uses("lora"):
    return linear.relora_every
  return 0


def uses_lowrank(cfg: ExperimentConfig) -> bool:
  linear = cfg.model.linear
  return linear.uses("sst") or linear.uses("lora") or cfg.optim.galore_rank > 0


def _decay_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and last_key(path) not in ("u_cols", "v_cols"), params)


def _galore_target(path, p) -> bool:
  """GaLore projects the dense attention/MLP kernels only (not embeddings or the head)."""
  return last_key(path) == "kernel" and p.ndim >= 2


def optimizer_for(cfg: ExperimentConfig):
  """(tx, lr_fn) for this experiment; see the module docstring."""
  ocfg, steps = cfg.optim, cfg.train.num_steps
  if not uses_lowrank(cfg):
    return make_optimizer(ocfg, steps), learning_rate_fn(ocfg, steps)
  # the envelope; the re-warm-up after restarts scales only the parameters a restart resets
  lr_fn = jagged_cosine(ocfg.learning_rate, ocfg.warmup_steps, steps, ocfg.min_lr_ratio)
  rewarm = None
  if ocfg.rewarm_steps and restart_every(cfg):
    rewarm = (restart_every(cfg), ocfg.rewarm_steps, reset_params(cfg))
  galore = ((ocfg.galore_rank, ocfg.galore_every, ocfg.galore_scale) if ocfg.galore_rank
            else None)
  tx = lowrank_chain(lr_fn, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                     weight_decay=ocfg.weight_decay, grad_clip=ocfg.grad_clip, galore=galore,
                     sst=cfg.model.linear.uses("sst"), rewarm=rewarm)
  return tx, lr_fn


def reset_params(cfg: ExperimentConfig) -> tuple[str, ...]:
  """Names of the params whose Adam moments every restart resets (and that re-warm)."""
  if cfg.model.linear.uses("sst"):
    return ("u_cols", "v_cols")  # sigma's are reset only at a re-SVD
  if cfg.model.linear.uses("lora"):
    return tuple(lora_lib.PARAM_NAMES)
  return ()


def scale_by_rewarm(restart_every: int, rewarm_steps: int,
                    names) -> optax.GradientTransformation:
  """Multiplies the updates of the params named `names` by a linear ramp over `rewarm_steps`
  updates after every restart (after updates restart_every, 2 restart_every, ...); every
  other param keeps the plain schedule."""
  names = frozenset(names)

  def ramp(count):
    since = count % restart_every
    warm = jnp.minimum(1.0, (since + 1).astype(jnp.float32) / rewarm_steps)
    return jnp.where(count >= restart_every, warm, 1.0)

  def update(updates, state, params=None):
    del params
    factor = ramp(state.count)
    new = jax.tree_util.tree_map_with_path(
        lambda path, u: (u * factor).astype(u.dtype) if last_key(path) in names else u,
        updates)
    return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(
      lambda params: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)), update)


def lowrank_chain(lr_fn, *, b1: float, b2: float, eps: float, weight_decay: float = 0.0,
                  grad_clip: float = 0.0, galore: tuple[int, int, float] | None = None,
                  sst: bool = False, rewarm: tuple[int, int, tuple[str, ...]] | None = None
                  ) -> optax.GradientTransformation:
  """clip -> Adam or GaLore-Adam (galore = (rank, refresh every, scale)) -> decoupled weight
  decay -> learning rate [-> SST projection]. With `sst`, clipping measures the true gradient
  (clip_by_true_global_norm) and update() needs model_state=."""
  links = []
  if grad_clip > 0:
    links.append(clip_by_true_global_norm(grad_clip) if sst
                 else optax.clip_by_global_norm(grad_clip))
  if galore:
    rank, every, scale = galore
    links.append(scale_by_galore(rank, every, scale, b1, b2, eps, is_projected=_galore_target))
  else:
    links.append(optax.scale_by_adam(b1, b2, eps))
  if weight_decay:
    links.append(optax.add_decayed_weights(weight_decay, _decay_mask))
  links.append(optax.scale_by_learning_rate(lr_fn))
  if rewarm:  # (restart period, re-warm-up steps, names of the params it applies to)
    links.append(scale_by_rewarm(*rewarm))
  if sst:
    links.append(sst_projection())
  return optax.chain(*links)
