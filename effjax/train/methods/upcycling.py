"""Sparse upcycling (train.init_from with MoE FFNs): each dense FFN of the source run is copied
into every expert (effjax/moe/upcycle.py; model.moe.upcycle_noise and EvoMoE's
model.moe.upcycle_mask make the copies differ), routers start fresh."""
from __future__ import annotations

import dataclasses

from effjax.config import ExperimentConfig
from effjax.moe.upcycle import upcycle_params
from effjax.train import plugins


@plugins.register
def upcycling(cfg: ExperimentConfig) -> plugins.Method | None:
  moe = cfg.model.moe
  if not (cfg.train.init_from and cfg.model.ffn == "moe"):
    return None

  def apply(source_params, fresh_params, key):
    return upcycle_params(source_params, fresh_params, key, moe.upcycle_noise, moe.upcycle_mask)

  def describe(source_params, fresh_params):
    del source_params, fresh_params
    return (f"each dense FFN copied into {moe.num_experts} experts (noise {moe.upcycle_noise:g}, "
            f"mask {moe.upcycle_mask:g})"), {}

  init = plugins.Initialiser("upcycling", lambda m: dataclasses.replace(m, ffn="dense"), apply,
                             describe)
  return plugins.Method("upcycling", initialisers=(init,))
