"""The training loop: resume-or-init, evaluate, log, checkpoint, stop cleanly.

Step numbering: step s is the s-th update. `train_loss` at step s is the loss of the batch used
for that update; `eval_*` at step s is measured after s updates (step 0 = initialisation); the
checkpoint at step s holds the state after s updates and the data iterator positioned for the
next batch.

Reverse sparsification (`train.dense_from_step = S > 0`): steps 1..S train the configured
(Monarch) model. Right after update S every Monarch layer is multiplied out into its dense
weight and training continues with all projections dense
(`surgery.densify_train_state`: same function, step counts and unchanged params' moments kept,
zero moments for the new dense kernels). Evaluation and the checkpoint at step S already see
the dense model, so a checkpoint at step s holds the dense structure iff s >= S; resume picks
its restore target by that rule. metrics.jsonl records at step S the training batch's loss
before and after the conversion (`densify_loss_before` / `densify_loss_after`).

Dense-to-sparse (`train.init_from = DIR`): a fresh run (no checkpoint in its own workdir)
takes the params of DIR's latest checkpoint, written by a run of the same model with every
projection dense, projects them onto this model's Monarch layers (`surgery.
project_params_to_monarch`) and starts with fresh optimizer state and step 0. When this
model has MoE FFN layers (sparse upcycling), DIR's run has dense FFNs there, and each is first
copied into every expert (`effjax.moe.upcycle_params`; optional noise model.moe.upcycle_noise
and EvoMoE's random masking model.moe.upcycle_mask make the copies differ; routers start fresh).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Callable

from absl import logging
import jax

from effjax import config as config_lib
from effjax.config import ExperimentConfig
from effjax.data import pipeline
from effjax.models.decoder_lm import DecoderLM, count_params, flops_per_token
from effjax.moe.accounting import inactive_expert_params
from effjax.moe.upcycle import upcycle_params
from effjax.optim import lowrank
from effjax.parallel import build_mesh
from effjax.train import step as step_lib
from effjax.train import evaluation, surgery
from effjax.train.checkpoint import Checkpointer, IncompatibleCheckpointError
from effjax.train.metrics import MetricsWriter


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or Inf loss; no checkpoint was written after it."""


class _StopFlag:
  """Set by SIGTERM; the loop saves a checkpoint at the next step and returns."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self.requested = True


def _preemption_agreed(step: int) -> bool:
  """True on every process at the same step once any process got SIGTERM (multi-process)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if multihost_utils.reached_preemption_sync_point(step):
    logging.warning("Preemption notice on some process: all processes save at step %d and "
                    "stop.", step)
    return True
  return False


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _print_memory_analysis(compiled) -> None:
  try:
    analysis = compiled.memory_analysis()
  except Exception as e:  # not every backend implements it
    logging.info("memory_analysis unavailable: %s", e)
    return
  if analysis is None:
    return
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  parts = [f"{f.removesuffix('_size_in_bytes')}={getattr(analysis, f, 0) / 2**20:.1f}MiB"
           for f in fields if hasattr(analysis, f)]
  logging.info("train step memory per device: %s", ", ".join(parts))


def _describe_linear(model_cfg) -> str:
  linear = model_cfg.linear
  kinds = {g: linear.kind_for(g) for g in config_lib.LINEAR_GROUPS}
  text = ", ".join(f"{g} {k}" for g, k in kinds.items())
  return text + (f", nblocks {linear.nblocks}" if "monarch" in kinds.values() else "")


def _write_config(workdir: str, cfg: ExperimentConfig, start_step: int) -> None:
  if jax.process_index() != 0:
    return
  resolved = config_lib.to_dict(cfg)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    if previous == resolved:
      return
    path = os.path.join(workdir, f"config.resumed_at_{start_step}.json")
    logging.warning("Config differs from %s/config.json; the new one is written to %s.",
                    workdir, path)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(resolved, f, indent=2, sort_keys=True)


def _restore_latest(checkpointer: Checkpointer, abstract_for_step: Callable[[int], object]):
  """restore_latest with the target chosen by the checkpoint's step (structures differ across
  the reverse-sparsification switch). When the newest checkpoint was unreadable and moved
  aside, the next one may belong to the other phase, so the target is chosen again."""
  while True:
    latest = checkpointer.latest_step()
    if latest is None:
      return None
    try:
      return checkpointer.restore_latest(abstract_for_step(latest))
    except IncompatibleCheckpointError:
      if checkpointer.latest_step() == latest:
        raise  # the newest readable checkpoint itself does not match


def _init_from_dense(source: str, dense_model, model_abstract, model_shardings, tx, mesh,
                     tcfg, seq_len: int, moe_params=None, moe_cfg=None):
  """(params of this model projected from `source`'s latest checkpoint, its step, rel. error).

  With `moe_params` (this model's fresh params, when it has MoE layers) the dense FFNs are
  first upcycled into every expert (`effjax.moe.upcycle_params` with `moe_cfg`'s noise and
  mask; router etc. kept fresh)."""
  directory = os.path.join(source, "checkpoints")
  if not os.path.isdir(directory):
    directory = source
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"train.init_from={source!r}: no such directory")
  source_ckpt = Checkpointer(directory, keep=tcfg.keep_checkpoints, async_save=False)
  try:
    step = source_ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"train.init_from={source!r}: no checkpoint in {directory}")
    dense_abstract, _ = step_lib.abstract_train_state(dense_model, tx, mesh, tcfg.seed, seq_len)
    try:
      dense_state, _ = source_ckpt.restore(step, dense_abstract)
    except Exception as e:  # orbax reports structure mismatches in many ways
      raise IncompatibleCheckpointError(
          f"train.init_from={source!r}: the checkpoint at step {step} does not restore into "
          f"this model with every projection dense ({type(e).__name__}: {str(e)[:300]})") from e
  finally:
    source_ckpt.close()
  with step_lib.sharding_context(mesh):
    source_params = dense_state.params
    if moe_params is not None:
      upcycle = lambda d, m: upcycle_params(d, m, jax.random.key(tcfg.seed + 1),
                                            moe_cfg.upcycle_noise, moe_cfg.upcycle_mask)
      source_params = jax.jit(upcycle)(source_params, moe_params)
    params = jax.jit(surgery.project_params_to_monarch,
                     out_shardings=model_shardings.params)(source_params,
                                                           model_abstract.params)
    rel = float(jax.jit(surgery.projection_error)(source_params, model_abstract.params))
  return params, step, rel


def compiled_step_on_one_batch(cfg: ExperimentConfig):
  """(compiled train step, fresh state, one real training batch) for timing the bare step."""
  mesh = build_mesh(cfg.mesh)
  model = DecoderLM(cfg.model)
  tx, lr_fn = lowrank.optimizer_for(cfg)  # AdamW unless a low-rank method is configured
  state, shardings = step_lib.create_train_state(model, tx, mesh, cfg.train.seed,
                                                 cfg.data.seq_len)
  train_step, _ = step_lib.compile_steps(model, tx, lr_fn, mesh, state, shardings,
                                         (cfg.train.global_batch_size, cfg.data.seq_len + 1))
  batch = next(pipeline.train_batches(cfg.data, mesh, global_batch_size=cfg.train.global_batch_size,
                                      seed=cfg.train.seed))  # real text, not zeros
  return train_step, state, batch


def _lowrank_setup(cfg: ExperimentConfig, mesh, shardings, writer, step: int):
  """Prints and logs trainable params and optimizer-state bytes of the configured method next
  to full rank's (low-rank methods only); returns the between-step function, or None."""
  if not lowrank.uses_lowrank(cfg):
    return None
  report = lowrank.memory_report(cfg)
  logging.info("%s: %s trainable params, %.3f MiB optimizer state (%.3f MiB frozen model "
               "state); full rank: %s trainable params, %.3f MiB optimizer state",
               lowrank.describe_method(cfg), f"{report['trainable_params']:,}",
               report["opt_state_bytes"] / 2**20, report["frozen_state_bytes"] / 2**20,
               f"{report['full_rank_trainable_params']:,}",
               report["full_rank_opt_state_bytes"] / 2**20)
  writer.write(step, report)

  def jit(fn):
    with step_lib.sharding_context(mesh):
      compiled = jax.jit(fn, in_shardings=(shardings,), out_shardings=shardings,
                         donate_argnums=0)

    def run(state):
      with step_lib.sharding_context(mesh):
        return compiled(state)
    return run
  return lowrank.make_periodic(cfg, jit)


def train_and_evaluate(cfg: ExperimentConfig, workdir: str, *, devices=None,
                       should_stop: Callable[[int], bool] | None = None) -> dict[str, float]:
  """Trains `cfg` in `workdir`, resuming from its latest readable checkpoint.

  Returns the last logged metrics. `should_stop(step)` (for tests and drivers) stops like
  SIGTERM does: save a checkpoint, then return.
  """
  tcfg = cfg.train
  os.makedirs(workdir, exist_ok=True)
  mesh = build_mesh(cfg.mesh, devices)
  pipeline.per_process_batch_size(tcfg.global_batch_size, mesh)  # fail early on a bad batch
  tx, lr_fn = lowrank.optimizer_for(cfg)  # AdamW unless a low-rank method is configured
  logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind)
  switch = tcfg.dense_from_step
  dense_model_cfg = dataclasses.replace(cfg.model, linear=cfg.model.linear.all_dense())
  phases = {}  # dense? -> (model config, model, abstract state, shardings)

  def phase(dense: bool):
    if dense not in phases:
      model_cfg = dense_model_cfg if dense else cfg.model
      model = DecoderLM(model_cfg)
      abstract, shardings = step_lib.abstract_train_state(model, tx, mesh, tcfg.seed,
                                                          cfg.data.seq_len)
      phases[dense] = (model_cfg, model, abstract, shardings)
    return phases[dense]

  def dense_at(step: int) -> bool:
    return bool(switch) and step >= switch

  train_iter = pipeline.train_batches(cfg.data, mesh, global_batch_size=tcfg.global_batch_size,
                                      seed=tcfg.seed)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints,
                              async_save=tcfg.async_checkpointing)
  restored = _restore_latest(checkpointer, lambda s: phase(dense_at(s))[2])
  writer = MetricsWriter(workdir)
  if restored is None:
    start = 0
    _, model, abstract, shardings = phase(False)
    state, _ = step_lib.create_train_state(model, tx, mesh, tcfg.seed, cfg.data.seq_len)
    if tcfg.init_from:
      moe = cfg.model.ffn == "moe"  # upcycling: the source has dense FFNs
      params, source_step, rel = _init_from_dense(
          tcfg.init_from, DecoderLM(dataclasses.replace(dense_model_cfg, ffn="dense")),
          abstract, shardings, tx, mesh, tcfg, cfg.data.seq_len,
          moe_params=state.params if moe else None, moe_cfg=cfg.model.moe)
      state = state.replace(params=params)  # AdamW's fresh state does not depend on values
      if moe:
        logging.info("Initialised from %s (step %d): each dense FFN copied into %d experts "
                     "(noise %g, mask %g).", tcfg.init_from, source_step,
                     cfg.model.moe.num_experts, cfg.model.moe.upcycle_noise,
                     cfg.model.moe.upcycle_mask)
      if cfg.model.linear.uses_monarch:
        logging.info("Initialised from %s (step %d): dense weights projected onto Monarch "
                     "with relative Frobenius error %.4f.", tcfg.init_from, source_step, rel)
      elif not moe:
        logging.info("Initialised from %s (step %d): params copied, fresh optimizer state.",
                     tcfg.init_from, source_step)
      writer.write(0, {"init_from_step": source_step, "projection_rel_error": rel})
  else:
    start, state, data_state = restored
    if data_state is None:  # written by another process count: fresh shares, a new order
      train_iter = pipeline.train_batches(cfg.data, mesh,
                                          global_batch_size=tcfg.global_batch_size,
                                          seed=tcfg.seed + start)
      logging.warning("Data iterators restart on this run's per-process shares with seed %d.",
                      tcfg.seed + start)
    else:
      train_iter.set_state(data_state)
    writer.write(start, {"event": "resumed"})
    logging.info("Resumed from the checkpoint at step %d.", start)
  _write_config(workdir, cfg, start)

  tokens_per_step = tcfg.global_batch_size * cfg.data.seq_len
  batch_shape = (tcfg.global_batch_size, cfg.data.seq_len + 1)

  def enter_phase(dense: bool, step: int, params):
    """Compiles the phase's steps; prints and logs its parameter count and FLOPs per token."""
    model_cfg, model, abstract, shardings = phase(dense)
    n_params = count_params(params)
    flops = flops_per_token(model_cfg, cfg.data.seq_len)
    logging.info("model (%s): %s parameters; %.4g forward / %.4g training FLOPs per token; "
                 "%d tokens per step; %d steps", _describe_linear(model_cfg), f"{n_params:,}",
                 flops["forward"], flops["train"], tokens_per_step, tcfg.num_steps)
    writer.write(step, {"params": n_params, "flops_per_token": flops["train"],
                        "forward_flops_per_token": flops["forward"]})
    if model_cfg.ffn == "moe":  # total vs per-token parameters
      active = n_params - inactive_expert_params(model_cfg)
      logging.info("MoE: %s parameters active per token of %s", f"{active:,}", f"{n_params:,}")
      writer.write(step, {"active_params": active})
    compiled = step_lib.compile_steps(model, tx, lr_fn, mesh, abstract, shardings, batch_shape)
    _print_memory_analysis(compiled[0])
    return compiled

  train_step, eval_step = enter_phase(dense_at(start), start, state.params)
  periodic = _lowrank_setup(cfg, mesh, phase(dense_at(start))[3], writer, start)

  if start >= tcfg.num_steps:
    logging.info("The checkpoint at step %d already completes train.num_steps=%d; nothing to "
                 "do. Raise --config.train.num_steps to train further.", start, tcfg.num_steps)
  stop_flag = _StopFlag()
  # One process: our own SIGTERM handler. Several: JAX's preemption service already catches
  # SIGTERM on whichever process gets it and all processes agree on the step to stop at.
  multi_process = jax.process_count() > 1
  previous_handler = (None if multi_process else signal.signal(signal.SIGTERM, stop_flag))
  last = {}
  pending = []  # (step, device metrics) not yet fetched

  def flush(interval_start: float, interval_steps: int, step: int) -> dict[str, float]:
    """Fetches pending metrics, stops on a non-finite loss, logs the newest ones."""
    fetched = jax.device_get(pending)
    pending.clear()
    for s, m in fetched:
      if not math.isfinite(float(m["train_loss"])):
        latest = checkpointer.latest_step()
        kept = ("no checkpoint had been written" if latest is None else
                f"the last checkpoint (step {latest}) was written before it and is untouched")
        raise NonFiniteLossError(
            f"train_loss is {float(m['train_loss'])} at step {s}; training stopped and {kept}.")
    if not fetched:
      return {}
    elapsed = time.perf_counter() - interval_start
    metrics = {k: float(v) if v.ndim == 0 else v.tolist() for k, v in fetched[-1][1].items()}
    metrics["tokens_per_sec"] = interval_steps * tokens_per_step / max(elapsed, 1e-9)
    metrics["step_time_sec"] = elapsed / max(interval_steps, 1)
    eta = (tcfg.num_steps - step) * metrics["step_time_sec"]
    logging.info("step %d/%d | loss %.4f | %.0f tok/s | %.3f s/step | eta %s", step,
                 tcfg.num_steps, metrics["train_loss"], metrics["tokens_per_sec"],
                 metrics["step_time_sec"], _format_duration(eta))
    writer.write(step, metrics)
    return metrics

  def densify(state, batch, monarch_eval_step):
    _, _, dense_abstract, dense_shardings = phase(True)
    with step_lib.sharding_context(mesh):
      convert = jax.jit(lambda s: surgery.densify_train_state(s, dense_abstract.params, tx),
                        out_shardings=dense_shardings)
      dense_state = convert(state)
    new_train_step, new_eval_step = enter_phase(True, switch, dense_state.params)
    before = step_lib.eval_summary(jax.device_get(monarch_eval_step(state.params, state.model_state, batch)))
    after = step_lib.eval_summary(jax.device_get(new_eval_step(dense_state.params, dense_state.model_state, batch)))
    logging.info("step %d: Monarch layers converted to dense; loss on this batch %.6f before, "
                 "%.6f after", switch, before["eval_loss"], after["eval_loss"])
    writer.write(switch, {"densify_loss_before": before["eval_loss"],
                          "densify_loss_after": after["eval_loss"]})
    return dense_state, new_train_step, new_eval_step

  def run_eval(step: int) -> None:
    t = time.perf_counter()
    result = evaluation.evaluate(  # the last one (the reported number) on final_eval_batches
        eval_step, state.params, state.model_state, cfg, mesh,
        max_batches=cfg.data.final_eval_batches if step == tcfg.num_steps else None)
    logging.info("eval at step %d | loss %.4f | ppl %.2f | %.4f bits/byte | %.1fs", step,
                 result["eval_loss"], result["eval_perplexity"], result["eval_bpb"],
                 time.perf_counter() - t)
    writer.write(step, result)
    last.update(result)

  try:
    if start == 0 and tcfg.eval_every:
      baseline = pipeline.unigram_baseline_bpb(cfg.data)
      logging.info("unigram baseline of %s: %.4f bits/byte (train-split byte frequencies on "
                   "the %s split)", cfg.data.dataset, baseline, cfg.data.eval_split)
      writer.write(0, {"unigram_baseline_bpb": baseline})
      run_eval(0)
    t0, steps_since = time.perf_counter(), 0
    step = start
    while step < tcfg.num_steps:
      batch = next(train_iter)
      state, metrics = train_step(state, batch)
      step += 1
      steps_since += 1
      pending.append((step, metrics))
      if periodic is not None:  # between-step surgery: SST resample / ReLoRA merge when due
        state = periodic(step, state)
      if switch and step == switch:  # reverse sparsification: Monarch -> dense, same function
        switch_start = time.perf_counter()
        state, train_step, eval_step = densify(state, batch, eval_step)
        t0 += time.perf_counter() - switch_start  # conversion and compilation are not step time
      final = step == tcfg.num_steps
      stop = (stop_flag.requested or (should_stop is not None and should_stop(step))
              or (multi_process and _preemption_agreed(step)))
      evaluate_now = tcfg.eval_every and (step % tcfg.eval_every == 0 or final)
      save_now = final or stop or (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0)
      if step % tcfg.log_every == 0 or final or evaluate_now or save_now:
        last.update(flush(t0, steps_since, step))
        if evaluate_now:
          run_eval(step)
        if save_now:
          checkpointer.save(step, state, train_iter.get_state())
        t0, steps_since = time.perf_counter(), 0
      if stop:
        logging.warning("Stopped at step %d after saving a checkpoint.", step)
        break
    checkpointer.wait()
  finally:
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
    checkpointer.close()
    writer.close()
  return last


def load_checkpoint(cfg: ExperimentConfig, workdir: str, *, devices=None):
  """(step, TrainState, mesh) of the newest readable checkpoint in `workdir`, placed on the
  mesh `cfg.mesh` describes (which may differ from the mesh it was written on).

  For notebooks and analysis; training resumes by itself in train_and_evaluate.
  """
  mesh = build_mesh(cfg.mesh, devices)
  tx, _ = lowrank.optimizer_for(cfg)
  switch = cfg.train.dense_from_step
  dense_cfg = dataclasses.replace(cfg.model, linear=cfg.model.linear.all_dense())

  def abstract_for(step: int):
    model_cfg = dense_cfg if switch and step >= switch else cfg.model
    return step_lib.abstract_train_state(DecoderLM(model_cfg), tx, mesh, cfg.train.seed,
                                         cfg.data.seq_len)[0]

  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=cfg.train.keep_checkpoints, async_save=False)
  try:
    restored = _restore_latest(checkpointer, abstract_for)
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
  step, state, _ = restored
  return step, state, mesh
