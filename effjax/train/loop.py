"""The training loop: resume-or-init, evaluate, log, checkpoint, stop cleanly.

Step numbering: step s is the s-th update. `train_loss` at step s is the loss of the batch used
for that update; `eval_*` at step s is measured after s updates (step 0 = initialisation); the
checkpoint at step s holds the state after s updates and the data iterator positioned for the
next batch.
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
import numpy as np

from effjax import config as config_lib
from effjax.config import ExperimentConfig
from effjax.data import pipeline
from effjax.models.decoder_lm import DecoderLM, count_params
from effjax.parallel import build_mesh
from effjax.train import step as step_lib
from effjax.train.checkpoint import Checkpointer
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


def evaluate(eval_step, params, cfg: ExperimentConfig, mesh) -> dict[str, float]:
  batches = pipeline.eval_batches(cfg.data, mesh, global_batch_size=cfg.train.global_batch_size)
  sums = None
  for i, batch in enumerate(batches):
    if cfg.data.eval_batches and i >= cfg.data.eval_batches:
      break
    out = eval_step(params, batch)
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
  if sums is None:
    raise ValueError(f"evaluation split {cfg.data.eval_split!r} yields no full batch of "
                     f"{cfg.train.global_batch_size} x {cfg.data.seq_len + 1} tokens")
  return step_lib.eval_summary(jax.device_get(sums))


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
  model = DecoderLM(cfg.model)
  lr_fn = step_lib.learning_rate_fn(cfg.optim, tcfg.num_steps)
  tx = step_lib.make_optimizer(cfg.optim, tcfg.num_steps)
  logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind)

  train_iter = pipeline.train_batches(cfg.data, mesh, global_batch_size=tcfg.global_batch_size,
                                      seed=tcfg.seed)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints,
                              async_save=tcfg.async_checkpointing)
  abstract, shardings = step_lib.abstract_train_state(model, tx, mesh, tcfg.seed,
                                                      cfg.data.seq_len)
  restored = checkpointer.restore_latest(abstract)
  writer = MetricsWriter(workdir)
  if restored is None:
    state, _ = step_lib.create_train_state(model, tx, mesh, tcfg.seed, cfg.data.seq_len)
    start = 0
  else:
    start, state, data_state = restored
    train_iter.set_state(data_state)
    writer.write(start, {"event": "resumed"})
    logging.info("Resumed from the checkpoint at step %d.", start)
  _write_config(workdir, cfg, start)

  n_params = count_params(state.params)
  tokens_per_step = tcfg.global_batch_size * cfg.data.seq_len
  logging.info("model: %s parameters; %d tokens per step; %d steps", f"{n_params:,}",
               tokens_per_step, tcfg.num_steps)
  train_step, eval_step = step_lib.compile_steps(
      model, tx, lr_fn, mesh, abstract, shardings,
      (tcfg.global_batch_size, cfg.data.seq_len + 1))
  _print_memory_analysis(train_step)

  if start >= tcfg.num_steps:
    logging.info("The checkpoint at step %d already completes train.num_steps=%d; nothing to "
                 "do. Raise --config.train.num_steps to train further.", start, tcfg.num_steps)
  stop_flag = _StopFlag()
  previous_handler = signal.signal(signal.SIGTERM, stop_flag)
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
    metrics = {k: float(v) for k, v in fetched[-1][1].items()}
    metrics["tokens_per_sec"] = interval_steps * tokens_per_step / max(elapsed, 1e-9)
    metrics["step_time_sec"] = elapsed / max(interval_steps, 1)
    eta = (tcfg.num_steps - step) * metrics["step_time_sec"]
    logging.info("step %d/%d | loss %.4f | %.0f tok/s | %.3f s/step | eta %s", step,
                 tcfg.num_steps, metrics["train_loss"], metrics["tokens_per_sec"],
                 metrics["step_time_sec"], _format_duration(eta))
    writer.write(step, metrics)
    return metrics

  def run_eval(step: int) -> None:
    t = time.perf_counter()
    result = evaluate(eval_step, state.params, cfg, mesh)
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
      final = step == tcfg.num_steps
      stop = stop_flag.requested or (should_stop is not None and should_stop(step))
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
    signal.signal(signal.SIGTERM, previous_handler)
    checkpointer.close()
    writer.close()
  return last
