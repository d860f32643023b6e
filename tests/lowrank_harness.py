"""The linear teacher-student check of docs/reference (shared by the SST and baseline tests).

A full-rank Gaussian teacher T [d, d]; a student layer y = x W starting from the usual random
init W0 (the same W0 for every method); fresh x ~ N(0, I) batches; loss = mean (x W - x T)^2.
The population loss of W is ||W - T||_F^2 / d, evaluated exactly at the end. The best any
rank-r update of W0 can do is the Eckart-Young floor: the energy of T - W0 beyond its r largest
singular values, / d. Every method uses the real layer, optimizer chain and between-step
function of effjax (LoRA must stop at the floor; ReLoRA, GaLore and SST must go far below it).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effjax.layers.linear import DenseLinear
from effjax.layers.lora import LORA_COLLECTION, LoRALinear, lora_dense_weight
from effjax.layers.spectral import SST_COLLECTION, SSTLinear, sst_dense_weight
from effjax.optim import lowrank
from effjax.optim.schedules import jagged_cosine
from effjax.train.methods import relora
from effjax.train.methods import sst as sst_methods
from effjax.train.step import TrainState, split_variables


def make_problem(d: int, seed: int = 0):
  kt, kx = jax.random.split(jax.random.key(seed))
  teacher = jax.random.normal(kt, (d, d)) / np.sqrt(d)
  return teacher, kx


def _layer(method: str, d: int, rank: int, sampling: str):
  std = 1.0 / np.sqrt(d)
  if method in ("full", "galore"):
    return DenseLinear(d, "embed", "mlp", init_std=std)
  if method in ("lora", "relora"):
    return LoRALinear(d, rank, "embed", "mlp", init_std=std)
  if method == "sst":
    return SSTLinear(d, rank, "embed", "mlp", sampling=sampling, init_std=std)
  raise ValueError(method)


def weight(method: str, state: TrainState):
  p = state.params
  if method in ("full", "galore"):
    return p["kernel"]
  if method in ("lora", "relora"):
    return lora_dense_weight(p, state.model_state[LORA_COLLECTION], 1.0)
  return sst_dense_weight(p, state.model_state[SST_COLLECTION])


def floor(teacher, w0, rank: int) -> float:
  s = np.linalg.svd(np.asarray(teacher - w0, np.float64), compute_uv=False)
  return float(np.sum(s[rank:] ** 2) / teacher.shape[0])


def population_loss(w, teacher) -> float:
  return float(jnp.sum(jnp.square(w - teacher)) / teacher.shape[0])


def run(method: str, *, d: int = 64, rank: int = 4, steps: int = 3000, batch: int = 256,
        lr: float = 1e-2, period: int = 200, rewarm: int = 10, sampling: str = "mixed",
        sst_round: int = 0, seed: int = 0):
  """(final population loss, floor, initial loss, final state)."""
  teacher, kx = make_problem(d, seed)
  layer = _layer(method, d, rank, sampling)
  variables = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(1), jnp.zeros((1, d))))
  params, model_state = split_variables(variables)
  restarts = period if method in ("relora", "sst") else 0
  lr_fn = jagged_cosine(lr, 0, steps, 1.0, restarts, rewarm if restarts else 0)
  tx = lowrank.lowrank_chain(lr_fn, b1=0.9, b2=0.999, eps=1e-8,
                             galore=(rank, period, 1.0) if method == "galore" else None,
                             sst=method == "sst")
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(2)), model_state=model_state)
  w_init = weight(method, state)

  def loss_fn(p, ms, x):
    y = layer.apply({"params": p, **ms}, x)
    return jnp.mean(jnp.square(y - x @ teacher))

  @functools.partial(jax.jit, static_argnums=1)
  def chunk(state, n):
    def body(state, _):
      x = jax.random.normal(jax.random.fold_in(kx, state.step), (batch, d))
      grads = jax.grad(loss_fn)(state.params, state.model_state, x)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = jax.tree.map(jnp.add, state.params, updates)
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), None
    return jax.lax.scan(body, state, None, length=n)[0]

  rounds = sst_round or -(-d // rank)
  merge = jax.jit(lambda s: relora.relora_merge_state(s, scale=1.0))
  resample = {b: jax.jit(functools.partial(sst_methods.sst_resample_state, sampling=sampling,
                                           do_resvd=b)) for b in (False, True)}
  done = 0
  while done < steps:
    n = min(period, steps - done)
    state = chunk(state, n)
    done += n
    if done < steps and done % period == 0:
      if method == "relora":
        state = merge(state)
      elif method == "sst":
        state = resample[(done // period) % rounds == 0](state)
  final = population_loss(weight(method, state), teacher)
  return (final, floor(teacher, w_init, rank), population_loss(w_init, teacher), state)
