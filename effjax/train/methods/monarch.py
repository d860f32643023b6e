"""Monarch's two structure changes (effjax/layers/monarch.py has the layer):

  reverse sparsification (train.dense_from_step = S > 0): after update S every Monarch layer is
      multiplied out into its dense weight and training continues dense
      (surgery.densify_train_state: the same function; step counts and unchanged params'
      moments kept, zero moments for the new dense kernels). Evaluation and the checkpoint at
      step S already see the dense model.
  dense-to-sparse (train.init_from with Monarch layers): a dense run's kernels are projected
      onto this model's Monarch layers (per-block truncated SVD).
"""
from __future__ import annotations

import dataclasses

import jax

from effjax.config import ExperimentConfig
from effjax.train import plugins, surgery


def _densify(state, target_params, tx):
  return surgery.densify_train_state(state, target_params, tx)


@plugins.register
def reverse_sparsification(cfg: ExperimentConfig) -> plugins.Method | None:
  if not cfg.train.dense_from_step:
    return None
  dense = dataclasses.replace(cfg.model, linear=cfg.model.linear.all_dense())
  phase = plugins.Phase("densify", cfg.train.dense_from_step, dense, _densify,
                        "Monarch layers converted to dense")
  return plugins.Method("reverse sparsification", phases=(phase,))


@plugins.register
def monarch_projection(cfg: ExperimentConfig) -> plugins.Method | None:
  if not (cfg.train.init_from and cfg.model.linear.uses_monarch):
    return None

  def apply(source_params, fresh_params, key):
    del key
    return surgery.project_params_to_monarch(source_params, fresh_params)

  def describe(source_params, fresh_params):
    rel = float(jax.jit(surgery.projection_error)(source_params, fresh_params))
    return (f"dense weights projected onto Monarch with relative Frobenius error {rel:.4f}",
            {"projection_rel_error": rel})

  init = plugins.Initialiser(
      "monarch projection",
      lambda m: dataclasses.replace(m, linear=m.linear.all_dense()), apply, describe)
  return plugins.Method("dense-to-Monarch", initialisers=(init,))
