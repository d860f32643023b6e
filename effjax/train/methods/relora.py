"""ReLoRA's restarts: every model.linear.relora_every updates each LoRA layer is merged into its
frozen base, A re-drawn, B zeroed and their Adam moments pruned (effjax/layers/lora.py has the
layer and the per-layer merge; the re-warm-up is in effjax/optim/lowrank.py)."""
from __future__ import annotations

from effjax.config import ExperimentConfig
from effjax.layers import lora as lora_lib
from effjax.train import plugins


def relora_merge_state(state, *, scale: float, prune: float = 1.0):
  """A ReLoRA restart: every LoRA layer merged into W0 with A re-drawn and B = 0 (the
  function is unchanged), the Adam moments of A and B pruned (`prune` = 1: reset)."""
  fn = lambda k, p, s: lora_lib.relora_merge(p, s, k, scale=scale)
  params, lora_state = plugins.map_layers_keyed(
      state.params, state.model_state[lora_lib.LORA_COLLECTION], lora_lib.PARAM_NAMES,
      plugins.step_key(state, 0x7E1), fn)
  opt_state = plugins.reset_moments(state.opt_state, lora_lib.PARAM_NAMES, prune)
  model_state = {**state.model_state, lora_lib.LORA_COLLECTION: lora_state}
  return state.replace(params=params, model_state=model_state, opt_state=opt_state)


@plugins.register
def relora(cfg: ExperimentConfig) -> plugins.Method | None:
  linear, total = cfg.model.linear, cfg.train.num_steps
  if not (linear.uses("lora") and linear.relora_every):
    return None
  every = linear.relora_every
  scale = lora_lib.lora_scale(linear.lora_alpha, linear.rank)
  merge = lambda s: relora_merge_state(s, scale=scale, prune=linear.relora_prune)

  def at(step: int):
    return None if step % every or step >= total else merge
  return plugins.Method("relora", transforms=(plugins.StateTransform("relora merge", at),))
