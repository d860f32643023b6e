"""Where a research method plugs into training.

A method that needs more than a layer (effjax/layers/) and an optimizer (effjax/optim/) gives
the loop up to four things, all built from the config:

  StateTransform  a pure TrainState -> TrainState function due after some updates (SST's
                  resample and re-SVD, ReLoRA's merge). The loop compiles each distinct
                  function once, with the state's shardings, the input donated.
  Phase           a change of model structure after update `start` (reverse sparsification:
                  Monarch -> dense). From then on the loop trains `model`; a checkpoint at step
                  s holds the structure of the last phase with start <= s, and resume restores
                  by that rule (`model_config_at`).
  Initialiser     maps a dense source run's params into this model's fresh params, for
                  train.init_from (upcycling dense FFNs into experts, projection onto Monarch).
  report          a (log line, metrics) pair written once when a run starts.

A method registers a factory `cfg -> Method | None` with `register`, in its own module under
effjax/train/methods/; the loop asks `enabled(cfg)` and never names a method. Worked example,
SST (effjax/train/methods/sst.py): the layer is effjax/layers/spectral.py, the optimizer chain
(true-gradient clipping, the projection onto SST's constraint set, re-warm-up) is in
effjax/optim/lowrank.py, and the module registers

    @plugins.register
    def sst(cfg):
      if not cfg.model.linear.uses("sst"):
        return None
      return plugins.Method("sst", transforms=(plugins.StateTransform("sst resample", at),))

where `at(step)` returns `resample` (or `resample_and_resvd` once a round) every
model.linear.sst_every updates, else None.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from effjax.config import ExperimentConfig, ModelConfig
from effjax.trees import is_layer, last_key

TrainStateFn = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class StateTransform:
  """`at(step)`: the pure function to apply to the state after update `step`, or None.
  Return the same function objects every time: the loop compiles each one once."""
  name: str
  at: Callable[[int], TrainStateFn | None]


@dataclasses.dataclass(frozen=True)
class Phase:
  """After update `start` the model becomes `model`; `enter(state, target_params, tx)` converts
  the state (target_params: the new model's abstract params). The loop logs the training
  batch's loss before and after as `<name>_loss_before` / `<name>_loss_after`."""
  name: str
  start: int
  model: ModelConfig
  enter: Callable[[Any, Any, Any], Any]
  description: str = ""


@dataclasses.dataclass(frozen=True)
class Initialiser:
  """`apply(source_params, fresh_params, key) -> params` (traced, jitted by the loop) maps the
  params of a run of `source_model(this model)` towards this model's structure; the result
  goes to the next initialiser, the last one's is this run's. `describe(source_params,
  fresh_params) -> (log line, metrics)` reports what was done."""
  name: str
  source_model: Callable[[ModelConfig], ModelConfig]
  apply: Callable[[Any, Any, jax.Array], Any]
  describe: Callable[[Any, Any], tuple[str, dict]]


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  transforms: tuple[StateTransform, ...] = ()
  phases: tuple[Phase, ...] = ()
  initialisers: tuple[Initialiser, ...] = ()
  report: Callable[[], tuple[str, dict]] | None = None


_FACTORIES: list[Callable[[ExperimentConfig], Method | None]] = []


def register(factory: Callable[[ExperimentConfig], Method | None]):
  """Adds a method; factories run in registration order (initialisers chain in that order)."""
  _FACTORIES.append(factory)
  return factory


@dataclasses.dataclass(frozen=True)
class Enabled:
  """The methods a config enables, flattened for the loop."""
  cfg: ExperimentConfig
  methods: tuple[Method, ...]

  @property
  def transforms(self) -> tuple[StateTransform, ...]:
    return tuple(t for m in self.methods for t in m.transforms)

  @property
  def phases(self) -> tuple[Phase, ...]:
    return tuple(sorted((p for m in self.methods for p in m.phases), key=lambda p: p.start))

  @property
  def initialisers(self) -> tuple[Initialiser, ...]:
    return tuple(i for m in self.methods for i in m.initialisers)

  def model_config_at(self, step: int) -> ModelConfig:
    """The model a checkpoint at `step` holds (the state after `step` updates)."""
    model = self.cfg.model
    for p in self.phases:
      if step >= p.start:
        model = p.model
    return model

  def phase_starting_at(self, step: int) -> Phase | None:
    return next((p for p in self.phases if p.start == step), None)

  def transforms_at(self, step: int) -> list[TrainStateFn]:
    return [fn for t in self.transforms if (fn := t.at(step)) is not None]


def enabled(cfg: ExperimentConfig) -> Enabled:
  import effjax.train.methods  # pylint: disable=g-import-not-at-top,unused-import  (registers)
  return Enabled(cfg, tuple(m for f in _FACTORIES if (m := f(cfg)) is not None))


# -- helpers for state transforms -------------------------------------------------------------


def _map_layers(params, state, names, fn, path=()):
  if is_layer(params, names):
    return fn(path, params, state)
  if isinstance(params, Mapping):
    new_p, new_s = {}, {}
    for k, v in params.items():
      if isinstance(state, Mapping) and k in state:
        new_p[k], new_s[k] = _map_layers(v, state[k], names, fn, path + (k,))
      else:
        new_p[k] = v
    if isinstance(state, Mapping):
      new_s = {**state, **new_s}
    return new_p, new_s
  return params, state


def map_layers_keyed(params, state, names, key, fn):
  """Walks params and a model-state collection (same nesting) and replaces every layer (a node
  holding all of `names`) by fn(layer_key, params_node, state_node) -> (params, state), each
  layer with its own key folded from `key`."""
  counter = [0]

  def node(path, p, s):
    del path
    counter[0] += 1
    return fn(jax.random.fold_in(key, counter[0]), p, s)

  return _map_layers(params, state, names, node)


def step_key(state, salt: int) -> jax.Array:
  """A key for a transform after update state.step, distinct per method (`salt`)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                               state.step), salt)


def reset_moments(opt_state, names, prune: float = 1.0):
  """opt_state with every leaf whose last dict key is in `names` (the moments of those params
  in any optax state that mirrors the params) magnitude-pruned: the `prune` fraction with the
  smallest |value| (per tensor) set to 0; prune = 1 zeroes them (an optimizer reset)."""
  names = set(names)

  def leaf(path, x):
    if last_key(path) not in names or not jnp.issubdtype(x.dtype, jnp.floating) or x.size == 0:
      return x
    if prune >= 1.0:
      return jnp.zeros_like(x)
    mag = jnp.abs(x)
    threshold = jnp.quantile(mag.reshape(-1).astype(jnp.float32), prune)
    return jnp.where(mag > threshold, x, jnp.zeros_like(x))

  return jax.tree_util.tree_map_with_path(leaf, opt_state)
