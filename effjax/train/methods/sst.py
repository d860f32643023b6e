"""Sparse Spectral Training's between-step work: resample the active singular vectors every
model.linear.sst_every updates, re-SVD once a round (effjax/layers/spectral.py has the layer
and the per-layer functions, effjax/optim/lowrank.py the optimizer side)."""
from __future__ import annotations

import math

from effjax.config import ExperimentConfig
from effjax.layers import spectral
from effjax.train import plugins


def sst_resample_state(state, *, sampling: str, do_resvd: bool):
  """After an SST iteration: every SST layer written back, re-SVD'd if `do_resvd`, a new active
  set drawn (keys from state.rng and state.step); the Adam moments of the active columns reset
  (and sigma's after a re-SVD, which reorders the singular values). Step counts are kept."""
  fn = lambda k, p, s: spectral.sst_resample(p, s, k, sampling=sampling, do_resvd=do_resvd)
  params, sst_state = plugins.map_layers_keyed(
      state.params, state.model_state[spectral.SST_COLLECTION], spectral.PARAM_NAMES,
      plugins.step_key(state, 0x55A), fn)
  names = ("u_cols", "v_cols") + (("sigma",) if do_resvd else ())
  opt_state = plugins.reset_moments(state.opt_state, names)
  model_state = {**state.model_state, spectral.SST_COLLECTION: sst_state}
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


@plugins.register
def sst(cfg: ExperimentConfig) -> plugins.Method | None:
  linear, total = cfg.model.linear, cfg.train.num_steps
  if not linear.uses("sst"):
    return None
  every, rounds = linear.sst_every, sst_round_iterations(cfg)
  resample = {b: lambda s, b=b: sst_resample_state(s, sampling=linear.sst_sampling, do_resvd=b)
              for b in (False, True)}

  def at(step: int):
    if step % every or step >= total:
      return None
    return resample[(step // every) % rounds == 0]
  return plugins.Method("sst", transforms=(plugins.StateTransform("sst resample", at),))
