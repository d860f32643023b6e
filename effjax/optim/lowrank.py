"""The optimizer and the between-step maintenance of the low-rank methods, built from config.

  optimizer_for(cfg)       (tx, lr_fn). Without LoRA/SST layers or GaLore: exactly
                           step.make_optimizer / step.learning_rate_fn. Otherwise the AdamW
                           chain clip -> Adam (GaLore-Adam when optim.galore_rank > 0) ->
                           decoupled weight decay -> learning rate [-> re-warm-up] [-> SST
                           projection]. Clipping measures the true gradient (SST's enhanced
                           gradients weighted by sigma_i); the re-warm-up after each restart
                           (optim.rewarm_steps > 0) scales only the params the restart resets
                           (reset_params), lr_fn is the envelope.
  sst_projection()         the last link of the chain for SST: turns the update into "projected
                           new params - old params": sigma clamped at 0, each active U/V column
                           renormalised to unit norm.
  make_periodic(cfg, ...)  None, or `periodic(step, state) -> state` run by the loop after each
                           update: SST resample every model.linear.sst_every steps (re-SVD
                           every round), ReLoRA merge every model.linear.relora_every steps.
  sst_resample_state, relora_merge_state   the pure TrainState -> TrainState functions.
  memory_report(cfg)       trainable params and optimizer-state bytes of the chosen method
                           next to full rank's (abstract shapes, nothing allocated).

Weight decay: on 2-D params as before, except SST's u_cols / v_cols (renormalised every step,
decay on them would do nothing but fight the renormalisation). sigma is 1-D (no decay).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from effjax import config as config_lib
from effjax.config import ExperimentConfig
from effjax.layers import lora as lora_lib
from effjax.layers import spectral
from effjax.optim.galore import scale_by_galore
from effjax.optim.schedules import jagged_cosine

# -- tree helpers -----------------------------------------------------------------------------


def _last_key(path) -> str:
  for k in reversed(path):
    if isinstance(k, jax.tree_util.DictKey):
      return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
      return k.name
  return ""


def _is_node(node, names) -> bool:
  return isinstance(node, Mapping) and all(n in node for n in names)


def _map_nodes(params, state, names, fn, path=()):
  """Walks params and state (same nesting) and replaces every node holding all of `names`
  (a layer) by fn(path, params_node, state_node) -> (params_node, state_node)."""
  if _is_node(params, names):
    return fn(path, params, state)
  if isinstance(params, Mapping):
    new_p, new_s = {}, {}
    for k, v in params.items():
      if isinstance(state, Mapping) and k in state:
        new_p[k], new_s[k] = _map_nodes(v, state[k], names, fn, path + (k,))
      else:
        new_p[k] = v
    if isinstance(state, Mapping):
      new_s = {**state, **new_s}
    return new_p, new_s
  return params, state


def reset_moments(opt_state, names, prune: float = 1.0):
  """opt_state with every leaf whose last dict key is in `names` (the moments of those params
  in any optax state that mirrors the params) magnitude-pruned: the `prune` fraction with the
  smallest |value| (per tensor) set to 0; prune = 1 zeroes them (an optimizer reset)."""
  names = set(names)

  def leaf(path, x):
    if _last_key(path) not in names or not jnp.issubdtype(x.dtype, jnp.floating) or x.size == 0:
      return x
    if prune >= 1.0:
      return jnp.zeros_like(x)
    mag = jnp.abs(x)
    threshold = jnp.quantile(mag.reshape(-1).astype(jnp.float32), prune)
    return jnp.where(mag > threshold, x, jnp.zeros_like(x))

  return jax.tree_util.tree_map_with_path(leaf, opt_state)


# -- the optimizer ----------------------------------------------------------------------------


def _true_gradient_weights(params, sst_state):
  """Per-leaf factors turning gradients into true gradients: sigma[idx] on the columns of SST's
  u_cols / v_cols (their gradient is the enhanced one, without sigma_i), 1 elsewhere."""
  if _is_node(params, spectral.PARAM_NAMES) and isinstance(sst_state, Mapping) and (
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
    weights = _true_gradient_weights(params, sst_state)
    squares = jax.tree.map(lambda g, w: jnp.sum(jnp.square(g.astype(jnp.float32) * w)),
                           updates, weights)
    norm = jnp.sqrt(sum(jax.tree.leaves(squares)))
    scale = jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def _has_sst(params) -> bool:
  if _is_node(params, spectral.PARAM_NAMES):
    return True
  return isinstance(params, Mapping) and any(_has_sst(v) for v in params.values())


def sst_projection() -> optax.GradientTransformation:
  """Makes the step land on SST's constraint set: sigma >= 0, unit-norm active columns."""

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("sst_projection needs params in update()")
    new = optax.apply_updates(params, updates)

    def project(node):
      if not _is_node(node, spectral.PARAM_NAMES):
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
      lambda path, p: p.ndim >= 2 and _last_key(path) not in ("u_cols", "v_cols"), params)


def _galore_target(path, p) -> bool:
  """GaLore projects the dense attention/MLP kernels only (not embeddings or the head)."""
  return _last_key(path) == "kernel" and p.ndim >= 2


def optimizer_for(cfg: ExperimentConfig):
  """(tx, lr_fn) for this experiment; see the module docstring."""
  from effjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  ocfg, steps = cfg.optim, cfg.train.num_steps
  if not uses_lowrank(cfg):
    return step_lib.make_optimizer(ocfg, steps), step_lib.learning_rate_fn(ocfg, steps)
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
        lambda path, u: (u * factor).astype(u.dtype) if _last_key(path) in names else u,
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


# -- between steps ----------------------------------------------------------------------------


def _layer_keys(rng_data, step, salt: int):
  return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng_data), step), salt)


def _keyed_map(params, state, names, key, fn):
  counter = [0]

  def node(path, p, s):
    counter[0] += 1
    return fn(jax.random.fold_in(key, counter[0]), p, s)

  return _map_nodes(params, state, names, node)


def sst_resample_state(state, *, sampling: str, do_resvd: bool):
  """After an SST iteration: every SST layer written back, re-SVD'd if `do_resvd`, a new active
  set drawn (keys from state.rng and state.step); the Adam moments of the active columns reset
  (and sigma's after a re-SVD, which reorders the singular values). Step counts are kept."""
  key = _layer_keys(state.rng, state.step, 0x55A)
  fn = lambda k, p, s: spectral.sst_resample(p, s, k, sampling=sampling, do_resvd=do_resvd)
  params, sst_state = _keyed_map(state.params, state.model_state[spectral.SST_COLLECTION],
                                 spectral.PARAM_NAMES, key, fn)
  names = ("u_cols", "v_cols") + (("sigma",) if do_resvd else ())
  opt_state = reset_moments(state.opt_state, names)
  model_state = {**state.model_state, spectral.SST_COLLECTION: sst_state}
  return state.replace(params=params, model_state=model_state, opt_state=opt_state)


def relora_merge_state(state, *, scale: float, prune: float = 1.0):
  """A ReLoRA restart: every LoRA layer merged into W0 with A re-drawn and B = 0 (the
  function is unchanged), the Adam moments of A and B pruned (`prune` = 1: reset)."""
  key = _layer_keys(state.rng, state.step, 0x7E1)
  fn = lambda k, p, s: lora_lib.relora_merge(p, s, k, scale=scale)
  params, lora_state = _keyed_map(state.params, state.model_state[lora_lib.LORA_COLLECTION],
                                  lora_lib.PARAM_NAMES, key, fn)
  opt_state = reset_moments(state.opt_state, lora_lib.PARAM_NAMES, prune)
  model_state = {**state.model_state, lora_lib.LORA_COLLECTION: lora_state}
  return state.replace(params=params, model_state=model_state, opt_state=opt_state)


def sst_round_iterations(cfg: ExperimentConfig) -> int:
  """Iterations per round (re-SVD period): model.linear.sst_round, or ceil(k / r) with k the
  widest min(in, out) of the SST projections, so every index can be drawn once per round."""
  linear = cfg.model.linear
  if linear.sst_round:
    return linear.sst_round
  widest = max(min(shape) for group, shapes in cfg.model.projection_shapes().items()
               if linear.kind_for(group) == "sst" for shape in shapes)
  return math.ceil(widest / linear.rank)


def make_periodic(cfg: ExperimentConfig, jit: Callable[[Callable], Callable] = jax.jit):
  """None, or periodic(step, state) -> state for the loop to call after update `step`.

  `jit(fn)` compiles a TrainState -> TrainState function (the loop passes one that fixes the
  state's shardings and donates the input)."""
  linear, total = cfg.model.linear, cfg.train.num_steps
  if linear.uses("sst"):
    every, rounds = linear.sst_every, sst_round_iterations(cfg)
    resample = {b: jit(lambda s, b=b: sst_resample_state(s, sampling=linear.sst_sampling,
                                                         do_resvd=b)) for b in (False, True)}

    def periodic(step: int, state):
      if step % every or step >= total:
        return state
      return resample[(step // every) % rounds == 0](state)
    return periodic
  if linear.uses("lora") and linear.relora_every:
    every = linear.relora_every
    scale = lora_lib.lora_scale(linear.lora_alpha, linear.rank)
    merge = jit(lambda s: relora_merge_state(s, scale=scale, prune=linear.relora_prune))

    def periodic(step: int, state):
      if step % every or step >= total:
        return state
      return merge(state)
    return periodic
  return None


# -- memory -----------------------------------------------------------------------------------


def _bytes(tree) -> int:
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def full_rank_config(cfg: ExperimentConfig) -> ExperimentConfig:
  """The same experiment with every projection dense and plain AdamW."""
  model = dataclasses.replace(cfg.model, linear=cfg.model.linear.all_dense())
  optim = dataclasses.replace(cfg.optim, galore_rank=0, rewarm_steps=0)
  return dataclasses.replace(cfg, model=model, optim=optim)


def _abstract(cfg: ExperimentConfig):
  from effjax.models.decoder_lm import DecoderLM  # pylint: disable=g-import-not-at-top
  from effjax.train.step import split_variables  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  model = DecoderLM(cfg.model)
  tx, _ = optimizer_for(cfg)

  def init():
    variables = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    params, model_state = split_variables(variables)
    return params, tx.init(params), model_state
  return jax.eval_shape(init)


def memory_report(cfg: ExperimentConfig) -> dict[str, Any]:
  """Trainable params, optimizer-state bytes and frozen model-state bytes of `cfg`'s method
  and of full rank (abstract shapes only, nothing is allocated)."""
  params, opt_state, model_state = _abstract(cfg)
  fparams, fopt, _ = _abstract(full_rank_config(cfg))
  return {"trainable_params": _count(params), "opt_state_bytes": _bytes(opt_state),
          "frozen_state_bytes": _bytes(model_state),
          "full_rank_trainable_params": _count(fparams), "full_rank_opt_state_bytes": _bytes(fopt)}


def describe_method(cfg: ExperimentConfig) -> str:
  linear, optim = cfg.model.linear, cfg.optim
  kinds = {g: linear.kind_for(g) for g in config_lib.LINEAR_GROUPS}
  if optim.galore_rank:
    return (f"GaLore rank {optim.galore_rank}, refresh every {optim.galore_every}, "
            f"scale {optim.galore_scale}")
  if "sst" in kinds.values():
    return (f"SST rank {linear.rank}, sampling {linear.sst_sampling}, resample every "
            f"{linear.sst_every} steps, re-SVD every {sst_round_iterations(cfg)} iterations")
  if "lora" in kinds.values():
    name = f"ReLoRA (merge every {linear.relora_every})" if linear.relora_every else "LoRA"
    return f"{name} rank {linear.rank}, scale {lora_lib.lora_scale(linear.lora_alpha, linear.rank)}"
  return "full rank"
