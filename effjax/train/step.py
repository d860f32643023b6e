"""Train state, optimizer, loss, and the sharded jitted train and eval steps."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax.data import tokenizer
from effjax.optim import lowrank
from effjax.parallel import (LOGICAL_RULES, data_parallel_size, logical_sharding,  # noqa: F401
                             sharding_context)


# Collections a layer writes during apply and the step reads back, never stored in the state:
#   "aux_loss"  scalars already multiplied by their weight; their sum is added to the loss
#   "metrics"   scalars or small vectors, logged under "<module path>/<name>"
TRANSIENT_COLLECTIONS = ("aux_loss", "metrics", "intermediates")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key; the step number is folded in each step
  # Every non-param variable collection the model created at init (e.g. a router's selection
  # bias, frozen low-rank bases), {} for most models. The optimizer never sees it; the train
  # step passes it as mutable so a layer may update it outside the optimizer, and it is
  # checkpointed with the rest of the state.
  model_state: Any = dataclasses.field(default_factory=dict)


def batch_sharding(mesh):
  return logical_sharding(mesh, ("batch", "length"))


def split_variables(variables) -> tuple[Any, dict[str, Any]]:
  """model.init's output -> (params, model_state without the transient collections)."""
  model_state = {k: v for k, v in variables.items()
                 if k != "params" and k not in TRANSIENT_COLLECTIONS}
  return variables["params"], model_state


def _state_init_fn(model, tx, seq_len: int):
  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    variables = model.init(params_rng, jnp.zeros((1, seq_len), jnp.int32))  # boxed
    params, model_state = split_variables(variables)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_rng), model_state=model_state)
  return init


def abstract_train_state(model, tx, mesh, seed: int, seq_len: int):
  """(ShapeDtypeStructs carrying their shardings, the shardings): the restore target."""
  init = _state_init_fn(model, tx, seq_len)
  with sharding_context(mesh):
    # The key is made inside the trace: under the mesh an eager jax.random.key would run on
    # the mesh's devices, which compile-only devices (experiments/aot_check.py --target) cannot.
    boxed = jax.eval_shape(lambda: init(jax.random.key(seed)))
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


@flax.struct.dataclass
class ModelOutputs:
  """What one apply returns besides the logits (see TRANSIENT_COLLECTIONS)."""
  aux_loss: jax.Array  # scalar: the sum of every sown "aux_loss" value (0 when none)
  metrics: dict[str, jax.Array]  # "<module path>/<name>" -> value
  model_state: Any  # the model state after this apply (updated only when train=True)


def _flatten_sown(collection) -> dict[str, jax.Array]:
  """{"layers_0": {"moe": {"load": (x,)}}} -> {"layers_0/moe/load": x} (sow stores tuples)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(collection)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path
             if not isinstance(k, jax.tree_util.SequenceKey)]
    key = "/".join(names)
    index = [k.idx for k in path if isinstance(k, jax.tree_util.SequenceKey)]
    if index and index[-1] > 0:  # sown more than once (e.g. a module called twice)
      key = f"{key}#{index[-1]}"
    flat[key] = leaf
  return flat


def apply_model(model, params, model_state, inputs, segment_ids, positions, *, train: bool,
                step=None, rng=None):
  """(logits, ModelOutputs): the one place the LM is applied for training and evaluation.

  `train` selects training behaviour (router noise, train capacity factors, state updates);
  `step` (int32 scalar, the number of updates applied) feeds schedules inside the model.
  """
  rngs = {} if rng is None else {"noise": rng}  # for stochastic layers (router noise, gates)
  step = jnp.zeros((), jnp.int32) if step is None else step
  mutable = list(TRANSIENT_COLLECTIONS) + (list(model_state) if train else [])
  logits, sown = model.apply({"params": params, **model_state}, inputs, segment_ids, positions,
                             train=train, step=step, rngs=rngs, mutable=mutable)
  aux_terms = jax.tree.leaves(sown.get("aux_loss", {}))
  # jnp.sum: under scan_layers each sown term has a leading layers axis
  aux_loss = sum((jnp.sum(t) for t in aux_terms), jnp.zeros((), jnp.float32))
  metrics = _flatten_sown(sown.get("metrics", {}))
  if aux_terms:
    metrics["aux_loss"] = aux_loss
  new_state = {k: sown.get(k, v) for k, v in model_state.items()} if train else model_state
  return logits, ModelOutputs(aux_loss=aux_loss, metrics=metrics, model_state=new_state)


def token_losses(model, params, batch, rng=None, *, model_state=None, train=False, step=None):
  """Per-target cross-entropy [B, L], the weights of the targets that count, the targets,
  and the ModelOutputs.

  A target counts when it continues the segment of its input token: the first token of a
  packed document (its BOS) is not predicted from the previous document, and padding
  (segment id 0) never counts.
  """
  tokens, segments, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  weights = ((segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)).astype(jnp.float32)
  logits, outputs = apply_model(model, params, model_state or {}, inputs, segments[:, :-1],
                                positions[:, :-1], train=train, step=step, rng=rng)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return nll, weights, targets, outputs


# Bits of the train step's "nonfinite" metric: which quantity was NaN or Inf.
NONFINITE_LOSS, NONFINITE_GRAD, NONFINITE_STATE = 1, 2, 4


def describe_nonfinite(code: int) -> str:
  names = [name for bit, name in ((NONFINITE_LOSS, "train_loss"), (NONFINITE_GRAD, "grad_norm"),
                                  (NONFINITE_STATE, "the updated parameters or optimizer state"))
           if code & bit]
  return " and ".join(names)


def _all_finite(tree) -> jax.Array:
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def microbatches(batch, k: int):
  """Each leaf [B, ...] -> [k, B / k, ...], microbatch i holding rows i, k + i, 2k + i, ...:
  every device's rows of the batch split evenly among the microbatches, so none moves."""
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _mean_over_microbatches(tree):
  """Stacked [k, ...] float leaves -> their mean; other leaves -> the last microbatch's."""
  return jax.tree.map(lambda x: jnp.mean(x, axis=0) if jnp.issubdtype(x.dtype, jnp.inexact)
                      else x[-1], tree)


def accumulated_gradients(model, state: TrainState, batch, step_rng, k: int):
  """(loss, ModelOutputs, grads) of the whole batch from k microbatches run in a scan (one
  microbatch's activations live at a time). The loss and gradients are the whole batch's:
  each microbatch's summed cross-entropy is divided by the whole batch's target count and the
  gradients are summed in float32. What the model computes per microbatch is combined by
  averaging: auxiliary losses (load balance, z-loss), sown metrics and the updated model state
  (an MoE's balancing bias moves by the mean of the microbatches' updates, all from the
  step's starting bias); capacity is counted per microbatch."""
  segments = batch["segment_ids"]
  counted = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
  total = jnp.maximum(jnp.sum(counted.astype(jnp.float32)), 1.0)

  def loss_fn(params, micro, rng):
    nll, weights, _, outputs = token_losses(model, params, micro, rng, train=True,
                                            model_state=state.model_state, step=state.step)
    loss = jnp.sum(nll * weights) / total
    return loss + outputs.aux_loss / k, (loss, outputs)

  def body(carry, xs):
    grads, loss = carry
    micro, i = xs
    (_, (micro_loss, outputs)), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, micro, jax.random.fold_in(step_rng, i))
    grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads, micro_grads)
    return (grads, loss + micro_loss), outputs

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  (grads, loss), stacked = jax.lax.scan(
      body, (zeros, jnp.zeros((), jnp.float32)), (microbatches(batch, k), jnp.arange(k)))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  return loss, _mean_over_microbatches(stacked), grads


def make_train_step(model, tx, lr_fn, *, skip_nonfinite: bool = False,
                    grad_accum_steps: int = 1):
  """The jitted-to-be train step. Its "nonfinite" metric flags (NONFINITE_* bits) a NaN/Inf loss,
  gradient or updated state, so the loop never checkpoints one. With `skip_nonfinite` such an
  update is dropped: the state keeps its old values and only the step advances. With
  `grad_accum_steps` k > 1 the batch's gradient is accumulated over k microbatches
  (accumulated_gradients); the update, clipping and the guard run once."""
  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      nll, weights, _, outputs = token_losses(model, params, batch, step_rng, train=True,
                                              model_state=state.model_state, step=state.step)
      loss = jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
      return loss + outputs.aux_loss, (loss, outputs)

    if grad_accum_steps == 1:
      (_, (loss, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    else:
      loss, outputs, grads = accumulated_gradients(model, state, batch, step_rng,
                                                   grad_accum_steps)
    # model_state: SST's clipping weighs its enhanced gradients by sigma[idx] (optim/lowrank.py)
    updates, opt_state = optax.with_extra_args_support(tx).update(
        grads, state.opt_state, state.params, model_state=state.model_state)
    params = optax.apply_updates(state.params, updates)
    # the true gradient's norm, the one clipping measures (not SST's enhanced gradients)
    grad_norm = lowrank.true_global_norm(grads, state.params, state.model_state)
    new = (params, opt_state, outputs.model_state)
    nonfinite = (jnp.where(jnp.isfinite(loss), 0, NONFINITE_LOSS)
                 | jnp.where(jnp.isfinite(grad_norm), 0, NONFINITE_GRAD)
                 | jnp.where(_all_finite(new), 0, NONFINITE_STATE)).astype(jnp.int32)
    if skip_nonfinite:
      old = (state.params, state.opt_state, state.model_state)
      new = jax.tree.map(lambda n, o: jnp.where(nonfinite == 0, n, o), new, old)
    params, opt_state, model_state = new
    # train_loss is the cross-entropy alone, comparable across models; the auxiliary losses,
    # when the model sows any, are optimised too and logged as aux_loss.
    metrics = {"train_loss": loss, "grad_norm": grad_norm, "nonfinite": nonfinite,
               "learning_rate": lr_fn(state.step), **outputs.metrics}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         model_state=model_state), metrics

  return train_step


def make_eval_step(model, byte_counts: tokenizer.ByteCounts | None = None):
  """The eval step; `byte_counts` (the run's tokenizer's, default the byte tokenizer's) says
  how many bytes of text each target stands for, so bits/byte compares across tokenizers."""
  counts = byte_counts or tokenizer.ByteTokenizer.byte_counts
  lengths = np.asarray(counts.lengths, np.float32)
  prefix = np.asarray(counts.prefix, np.float32) if counts.prefix.any() else None

  def eval_step(params, model_state, batch):
    """Sums over the batch; divide after accumulating over the whole evaluation."""
    nll, weights, targets, _ = token_losses(model, params, batch, model_state=model_state)
    target_bytes = jnp.asarray(lengths)[targets]
    if prefix is not None:  # a document's first token: its leading marker is no byte
      after_bos = batch["tokens"][:, :-1] == counts.bos_id
      target_bytes = target_bytes - jnp.where(after_bos, jnp.asarray(prefix)[targets], 0.0)
    return {"nll_sum": jnp.sum(nll * weights), "tokens": jnp.sum(weights),
            "bytes": jnp.sum(weights * target_bytes)}

  return eval_step


def eval_summary(sums) -> dict[str, float]:
  """eval_loss is nats per predicted token; eval_bpb charges all of them to the text's bytes."""
  nll, tokens, n_bytes = (float(sums[k]) for k in ("nll_sum", "tokens", "bytes"))
  loss = nll / max(tokens, 1.0)
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)),
          "eval_bpb": nll / max(n_bytes, 1.0) / math.log(2)}


def check_microbatches(global_batch_size: int, grad_accum_steps: int, mesh) -> None:
  """ValueError, naming the values, unless each of the grad_accum_steps microbatches splits
  evenly over the mesh's data-parallel shards (and so over the processes)."""
  shards = math.lcm(data_parallel_size(mesh), jax.process_count())
  if global_batch_size % (grad_accum_steps * shards):
    raise ValueError(f"train.global_batch_size={global_batch_size} does not split into "
                     f"train.grad_accum_steps={grad_accum_steps} microbatches whose rows are a "
                     f"multiple of the {data_parallel_size(mesh)} data-parallel shards of mesh "
                     f"{dict(mesh.shape)} and the {jax.process_count()} processes")


def compile_steps(model, tx, lr_fn, mesh, state, state_shardings, batch_shape, *,
                  skip_nonfinite: bool = False, with_eval: bool = True,
                  byte_counts: tokenizer.ByteCounts | None = None, grad_accum_steps: int = 1):
  """AOT-compiles the train and eval steps for these shardings and batch shape (the eval step
  is None without `with_eval`: sizing a job needs only the train step; `byte_counts` as in
  make_eval_step). ValueError, naming the values, when a microbatch (batch / grad_accum_steps
  rows) does not split over the mesh's data-parallel shards."""
  check_microbatches(batch_shape[0], grad_accum_steps, mesh)
  data = batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=data)
           for k in ("tokens", "segment_ids", "positions")}
  with sharding_context(mesh):
    train = jax.jit(make_train_step(model, tx, lr_fn, skip_nonfinite=skip_nonfinite,
                                    grad_accum_steps=grad_accum_steps),
                    in_shardings=(state_shardings, data), out_shardings=(state_shardings, None),
                    donate_argnums=0).lower(state, batch).compile()
    if not with_eval:
      return train, None
    evaluate = jax.jit(make_eval_step(model, byte_counts),
                       in_shardings=(state_shardings.params, state_shardings.model_state, data)
                       ).lower(state.params, state.model_state, batch).compile()
  return train, evaluate


def state_bytes_per_device(abstract_state) -> int:
  """Bytes one device holds of `abstract_state` (ShapeDtypeStructs carrying shardings):
  its shard of every params, optimizer and model-state array."""
  total = 0
  for leaf in jax.tree.leaves(abstract_state):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * leaf.dtype.itemsize
  return total
