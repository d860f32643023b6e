"""Train state, optimizer, loss, and the sharded jitted train and eval steps."""
from __future__ import annotations

import contextlib
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from effjax.config import OptimConfig
from effjax.data import tokenizer
from effjax.parallel import LOGICAL_RULES, logical_sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key; the step number is folded in each step


def make_optimizer(config: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up then cosine decay; no weight decay on norms (1-D weights)."""
  adamw = optax.adamw(learning_rate_fn(config, num_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay,
                      mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
  if config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
  return adamw


def learning_rate_fn(config: OptimConfig, num_steps: int):
  """Linear warm-up from 0 to learning_rate, then cosine decay to learning_rate * min_lr_ratio."""
  return optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, num_steps,
      config.learning_rate * config.min_lr_ratio)


@contextlib.contextmanager
def sharding_context(mesh):
  """Mesh and logical rules active while tracing, so logical constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def batch_sharding(mesh):
  return logical_sharding(mesh, ("batch", "length"))


def _state_init_fn(model, tx, seq_len: int):
  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = model.init(params_rng, jnp.zeros((1, seq_len), jnp.int32))["params"]  # boxed
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_rng))
  return init


def abstract_train_state(model, tx, mesh, seed: int, seq_len: int):
  """(ShapeDtypeStructs carrying their shardings, the shardings): the restore target."""
  with sharding_context(mesh):
    boxed = jax.eval_shape(_state_init_fn(model, tx, seq_len), jax.random.key(seed))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_RULES)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def create_train_state(model, tx, mesh, seed: int, seq_len: int):
  """Initialises the state directly into its shardings. Returns (state, shardings)."""
  _, shardings = abstract_train_state(model, tx, mesh, seed, seq_len)
  with sharding_context(mesh):
    state = jax.jit(_state_init_fn(model, tx, seq_len), out_shardings=shardings)(
        jax.random.key(seed))
  return nn.meta.unbox(state), shardings


def token_losses(model, params, batch, rng=None):
  """Per-target cross-entropy [B, L] and the weights of the targets that count.

  A target counts when it continues the segment of its input token: the first token of a
  packed document (its BOS) is not predicted from the previous document, and padding
  (segment id 0) never counts.
  """
  tokens, segments, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  weights = ((segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)).astype(jnp.float32)
  rngs = {} if rng is None else {"noise": rng}  # for stochastic layers (router noise, gates)
  logits = model.apply({"params": params}, inputs, segments[:, :-1], positions[:, :-1], rngs=rngs)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return nll, weights, targets


def make_train_step(model, tx, lr_fn):
  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      nll, weights, _ = token_losses(model, params, batch, step_rng)
      return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train_loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": lr_fn(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model):
  def eval_step(params, batch):
    """Sums over the batch; divide after accumulating over the whole evaluation."""
    nll, weights, targets = token_losses(model, params, batch)
    return {"nll_sum": jnp.sum(nll * weights), "tokens": jnp.sum(weights),
            "bytes": jnp.sum(weights * (targets < tokenizer.BOS))}

  return eval_step


def eval_summary(sums) -> dict[str, float]:
  """eval_loss is nats per predicted token; eval_bpb charges all of them to the text's bytes."""
  nll, tokens, n_bytes = (float(sums[k]) for k in ("nll_sum", "tokens", "bytes"))
  loss = nll / max(tokens, 1.0)
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)),
          "eval_bpb": nll / max(n_bytes, 1.0) / math.log(2)}


def compile_steps(model, tx, lr_fn, mesh, state, state_shardings, batch_shape):
  """AOT-compiles the train and eval steps for these shardings and batch shape."""
  data = batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=data)
           for k in ("tokens", "segment_ids", "positions")}
  with sharding_context(mesh):
    train = jax.jit(make_train_step(model, tx, lr_fn),
                    in_shardings=(state_shardings, data), out_shardings=(state_shardings, None),
                    donate_argnums=0).lower(state, batch).compile()
    evaluate = jax.jit(make_eval_step(model), in_shardings=(state_shardings.params, data)
                       ).lower(state.params, batch).compile()
  return train, evaluate
