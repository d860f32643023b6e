"""What a low-rank method (LoRA, ReLoRA, SST, GaLore) saves: its trainable parameters and
optimizer-state bytes next to full rank's, logged when a run starts."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax import config as config_lib
from effjax.config import ExperimentConfig
from effjax.layers import lora as lora_lib
from effjax.models.decoder_lm import DecoderLM
from effjax.optim import lowrank
from effjax.train import plugins
from effjax.train.methods.sst import sst_round_iterations
from effjax.train.step import split_variables


def _bytes(tree) -> int:
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def full_rank_config(cfg: ExperimentConfig) -> ExperimentConfig:
  """The same experiment with every projection dense and plain AdamW."""
  model = dataclasses.replace(cfg.model, linear=cfg.model.linear.all_dense())
  optim = dataclasses.replace(cfg.optim, galore_rank=0, rewarm_steps=0)
  return dataclasses.replace(cfg, model=model, optim=optim)


def abstract_state(cfg: ExperimentConfig):
  """(params, optimizer state, model state) of `cfg` as ShapeDtypeStructs."""
  model = DecoderLM(cfg.model)
  tx, _ = lowrank.optimizer_for(cfg)

  def init():
    variables = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    params, model_state = split_variables(variables)
    return params, tx.init(params), model_state
  return jax.eval_shape(init)


def memory_report(cfg: ExperimentConfig) -> dict[str, Any]:
  """Trainable params, optimizer-state bytes and frozen model-state bytes of `cfg`'s method
  and of full rank (abstract shapes only, nothing is allocated)."""
  params, opt_state, model_state = abstract_state(cfg)
  fparams, fopt, _ = abstract_state(full_rank_config(cfg))
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


@plugins.register
def low_rank(cfg: ExperimentConfig) -> plugins.Method | None:
  if not lowrank.uses_lowrank(cfg):
    return None

  def report():
    r = memory_report(cfg)
    line = (f"{describe_method(cfg)}: {r['trainable_params']:,} trainable params, "
            f"{r['opt_state_bytes'] / 2**20:.3f} MiB optimizer state "
            f"({r['frozen_state_bytes'] / 2**20:.3f} MiB frozen model state); full rank: "
            f"{r['full_rank_trainable_params']:,} trainable params, "
            f"{r['full_rank_opt_state_bytes'] / 2**20:.3f} MiB optimizer state")
    return line, r
  return plugins.Method("low-rank memory", report=report)
