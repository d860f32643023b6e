"""The training loop: resume-or-init, train, evaluate, log, checkpoint, stop cleanly.

Step numbering: step s is the s-th update. `train_loss` at step s is the loss of the batch used
for that update; `eval_*` at step s is measured after s updates (step 0 = initialisation); the
checkpoint at step s holds the state after s updates and the data iterator positioned for the
next batch.

Research methods plug in through effjax/train/plugins.py (state transforms after an update,
phases that change the model's structure, initialisers from another run); this file names
none of them. A phase starting at S converts the state right after update S, so evaluation and
the checkpoint at step S already see the new structure; metrics.jsonl records the training
batch's loss before and after the conversion (`<phase>_loss_before` / `_after`).
"""
from __future__ import annotations

import os
from typing import Callable

from absl import logging
import jax

from effjax import config as config_lib
from effjax.config import ExperimentConfig
from effjax.data import pipeline, tokenizer
from effjax.errors import ConfigError, WorkdirError
from effjax.models.decoder_lm import DecoderLM
from effjax.optim import lowrank
from effjax.parallel import build_mesh
from effjax.train import checkpoint as ckpt
from effjax.train import evaluation, guards, plugins, profiling, surgery
from effjax.train import metrics as metrics_lib
from effjax.train import step as step_lib
from effjax.train import workdir as workdir_lib
from effjax.train.guards import NonFiniteError, NonFiniteLossError  # noqa: F401  (re-exported)


def train_and_evaluate(cfg: ExperimentConfig, workdir: str, *, devices=None,
                       should_stop: Callable[[int], bool] | None = None,
                       start_over: bool = False) -> dict[str, float]:
  """Trains `cfg` in `workdir`, resuming from its latest readable checkpoint.

  Returns the last logged metrics. `should_stop(step)` (for tests and drivers) stops like
  SIGTERM does: save a checkpoint, then return. One run at a time holds `workdir`; a workdir
  whose earlier progress cannot be restored is refused unless `start_over`.
  """
  workdir_lib.prepare(workdir)
  stop_flag = guards.StopFlag(multi_process=jax.process_count() > 1)
  stop_flag.install()  # before any compilation, so an early signal is not lost
  lock = workdir_lib.RunLock(workdir)
  try:
    lock.acquire()
    try:  # the tokenizer file and the vocabulary it sets; no-ops for a resolved config
      cfg = config_lib.resolve(cfg)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    cfg = workdir_lib.install_tokenizer(workdir, cfg)
    run = _Run(cfg, workdir, devices)
    try:
      return run.train(should_stop, start_over, stop_flag)
    finally:
      run.close()
  finally:
    lock.release()
    stop_flag.uninstall()


class _Run:
  """One run's mesh, optimizer, enabled methods, compiled programs, checkpoints and metrics."""

  def __init__(self, cfg: ExperimentConfig, workdir: str, devices):
    self.cfg, self.tcfg, self.workdir = cfg, cfg.train, workdir
    try:  # fails early on a bad mesh or batch
      self.mesh = build_mesh(cfg.mesh, devices)
      pipeline.per_process_batch_size(cfg.train.global_batch_size, self.mesh)
      step_lib.check_microbatches(cfg.train.global_batch_size, cfg.train.grad_accum_steps,
                                  self.mesh)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    logging.info("mesh %s over %d devices (%s)", dict(self.mesh.shape), self.mesh.size,
                 jax.devices()[0].device_kind)
    self.tx, self.lr_fn = lowrank.optimizer_for(cfg)  # AdamW unless a low-rank method is set
    self.methods = plugins.enabled(cfg)
    self.identity = ckpt.config_identity(cfg)
    self.tokenizer = tokenizer.load(cfg.data.tokenizer)
    if self.tokenizer.note:
      logging.warning("%s", self.tokenizer.note)
    self._structures = {}  # model config -> (model, abstract state, shardings)
    self._compiled_transforms = {}  # (transform function, phase) -> compiled
    self.data = pipeline.train_batches(cfg.data, self.mesh, seed=cfg.train.seed,
                                       global_batch_size=cfg.train.global_batch_size)
    self._had_checkpoints = os.path.isdir(os.path.join(workdir, "checkpoints"))
    self.checkpointer = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"),
                                          keep=cfg.train.keep_checkpoints,
                                          async_save=cfg.train.async_checkpointing)
    self.writer = self.profiler = None
    self.train_step = self.eval_step = self.state_shardings = None  # of the current phase

  def close(self) -> None:
    if self.profiler is not None:  # a run ending while tracing still writes its trace
      self.profiler.close()
    self.checkpointer.close()
    if self.writer is not None:
      self.writer.close()

  def structure(self, step: int):
    """(model config, model, abstract state, shardings) of the phase a step belongs to."""
    model_cfg = self.methods.model_config_at(step)
    if model_cfg not in self._structures:
      model = DecoderLM(model_cfg)
      abstract, shardings = step_lib.abstract_train_state(model, self.tx, self.mesh,
                                                          self.tcfg.seed, self.cfg.data.seq_len)
      self._structures[model_cfg] = (model, abstract, shardings)
    return (model_cfg, *self._structures[model_cfg])

  def train(self, should_stop, start_over: bool, stop_flag) -> dict[str, float]:
    cfg, tcfg = self.cfg, self.tcfg
    restored = ckpt.restore_latest_of_phase(self.checkpointer, lambda s: self.structure(s)[2],
                                            self.identity)
    if restored is None:
      progress = workdir_lib.earlier_progress(self.workdir, self._had_checkpoints)
      if progress and not start_over:
        raise WorkdirError(
            f"--workdir={self.workdir} holds an earlier run, but {progress}; refusing to start "
            "over silently. Pass --start_over to train from step 0 in it anyway, or use a new "
            "workdir.")
    elif restored[0] >= tcfg.num_steps:  # nothing to do: say so before compiling anything
      logging.info("The checkpoint at step %d already completes train.num_steps=%d; nothing "
                   "to do. Raise --config.train.num_steps to train further.", restored[0],
                   tcfg.num_steps)
      path = os.path.join(self.workdir, workdir_lib.METRICS_FILE)
      return metrics_lib.read_metrics(path).get(restored[0], {}) if os.path.exists(path) else {}
    self.writer = metrics_lib.MetricsWriter(self.workdir)
    step, state = self._start(restored)
    workdir_lib.write_config(self.workdir, cfg, fresh=restored is None, start_step=step)
    self._enter(step, state.params)
    for method in self.methods.methods:
      if method.report is not None:
        line, values = method.report()
        logging.info("%s", line)
        self.writer.write(step, values)
    if stop_flag.requested:  # a signal during set-up or compilation: nothing new to save
      logging.warning("Stopped before the first step; the workdir is as it was.")
      return {}
    last = {}
    if step == 0 and tcfg.eval_every:
      baseline = pipeline.unigram_baseline_bpb(cfg.data)
      logging.info("unigram baseline of %s: %.4f bits/byte (train-split %s frequencies on "
                   "the %s split)", "data.files" if cfg.data.files else cfg.data.dataset,
                   baseline, "byte" if self.tokenizer.kind == "byte" else "token",
                   cfg.data.eval_split)
      self.writer.write(0, {"unigram_baseline_bpb": baseline})
      last.update(evaluation.evaluate_and_log(self.eval_step, state, cfg, self.mesh, 0,
                                                 self.writer))
    log = metrics_lib.StepLog(tcfg, self.writer, cfg.data.seq_len,
                              guards.NonFiniteGuard(tcfg.max_skipped_nonfinite, self.checkpointer),
                              num_devices=self.mesh.size, peak_flops=metrics_lib.mfu_peak(
                                  self.mesh.devices.flat[0], cfg.model.dtype))
    log.set_model(self.structure(step)[0])
    self.profiler = profiling.StepProfiler(tcfg, self.workdir, step, log.excluding_time)
    multi_process = jax.process_count() > 1
    while step < tcfg.num_steps:
      batch = next(self.data)
      with log.inflight.naming(f"train step {step + 1}"), self.profiler.step(step + 1):
        state, metrics = self.train_step(state, batch)
      step += 1
      log.append(step, metrics)
      for fn in self.methods.transforms_at(step):  # between-step work of the enabled methods
        state = self._transform(fn, state)
      phase = self.methods.phase_starting_at(step)
      if phase is not None:
        state = log.excluding_time(lambda: self._change_phase(phase, state, batch))
        log.set_model(self.structure(step)[0])  # MFU counts the new model's FLOPs
      final = step == tcfg.num_steps
      stop = (stop_flag.requested or (should_stop is not None and should_stop(step))
              or (multi_process and guards.preemption_agreed(step)))
      evaluate_now = tcfg.eval_every and (step % tcfg.eval_every == 0 or final)
      save_now = final or stop or (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0)
      if step % tcfg.log_every == 0 or final or evaluate_now or save_now:
        last.update(log.flush(step))  # checks every step since the last flush
        if evaluate_now:
          last.update(evaluation.evaluate_and_log(self.eval_step, state, cfg, self.mesh,
                                                   step, self.writer))
        if save_now:
          with ckpt.saving(self.checkpointer, step):
            self.checkpointer.save(step, state, self.data.get_state(), self.identity)
        log.restart_clock()
      self.profiler.after(step, state, last=stop)
      if stop:
        logging.warning("Stopped at step %d after saving a checkpoint.", step)
        break
    with ckpt.saving(self.checkpointer, step):
      self.checkpointer.wait()
    return last

  def _start(self, restored):
    """(step, state): a fresh (or initialised-from) state, or the restored one."""
    if restored is None:
      self.writer.write(0, {"event": "fresh_start", "acknowledged_unreadable":
                            workdir_lib.unreadable_checkpoints(self.workdir)})
      _, model, _, shardings = self.structure(0)
      state, _ = step_lib.create_train_state(model, self.tx, self.mesh, self.tcfg.seed,
                                             self.cfg.data.seq_len)
      if self.tcfg.init_from:
        state = state.replace(params=self._initialise_from(state.params, shardings))
      return 0, state
    step, state, data_state = restored
    if data_state is None:  # written by another process count: fresh shares, a new order
      self.data = pipeline.train_batches(self.cfg.data, self.mesh, seed=self.tcfg.seed + step,
                                         global_batch_size=self.tcfg.global_batch_size)
      logging.warning("Data iterators restart on this run's per-process shares with seed %d.",
                      self.tcfg.seed + step)
    else:
      self.data.set_state(data_state)
    self.writer.write(step, {"event": "resumed"})
    logging.info("Resumed from the checkpoint at step %d.", step)
    return step, state

  def _enter(self, step: int, params) -> None:
    """Compiles the train and eval steps of the phase `step` belongs to; logs its size."""
    model_cfg, model, abstract, shardings = self.structure(step)
    self.state_shardings = shardings
    metrics_lib.log_model(self.writer, step, model_cfg, params, self.cfg)
    batch_shape = (self.tcfg.global_batch_size, self.cfg.data.seq_len + 1)
    self.train_step, self.eval_step = step_lib.compile_steps(
        model, self.tx, self.lr_fn, self.mesh, abstract, shardings, batch_shape,
        skip_nonfinite=self.tcfg.max_skipped_nonfinite > 0,
        byte_counts=self.tokenizer.byte_counts, grad_accum_steps=self.tcfg.grad_accum_steps)
    guards.check_memory(self.train_step, self.cfg)

  def _transform(self, fn, state):
    key = (fn, id(self.state_shardings))  # compiled once per function and phase
    if key not in self._compiled_transforms:
      shardings = self.state_shardings
      with step_lib.sharding_context(self.mesh):
        self._compiled_transforms[key] = jax.jit(fn, in_shardings=(shardings,),
                                                 out_shardings=shardings, donate_argnums=0)
    with step_lib.sharding_context(self.mesh):
      return self._compiled_transforms[key](state)

  def _change_phase(self, phase: plugins.Phase, state, batch):
    old_eval_step = self.eval_step
    _, _, abstract, shardings = self.structure(phase.start)
    with step_lib.sharding_context(self.mesh):
      convert = jax.jit(lambda s: phase.enter(s, abstract.params, self.tx),
                        out_shardings=shardings)
      new_state = convert(state)
    self._enter(phase.start, new_state.params)
    before, after = (step_lib.eval_summary(jax.device_get(fn(s.params, s.model_state, batch)))
                     for fn, s in ((old_eval_step, state), (self.eval_step, new_state)))
    logging.info("step %d: %s; loss on this batch %.6f before, %.6f after", phase.start,
                 phase.description or phase.name, before["eval_loss"], after["eval_loss"])
    self.writer.write(phase.start, {f"{phase.name}_loss_before": before["eval_loss"],
                                    f"{phase.name}_loss_after": after["eval_loss"]})
    return new_state

  def _initialise_from(self, fresh_params, shardings):
    """train.init_from: this model's params made from another run's latest checkpoint by the
    enabled initialisers, then copied onto this model's shardings."""
    source_model = self.cfg.model
    for init in self.methods.initialisers:
      source_model = init.source_model(source_model)
    abstract, _ = step_lib.abstract_train_state(DecoderLM(source_model), self.tx, self.mesh,
                                                self.tcfg.seed, self.cfg.data.seq_len)
    params, source_step = ckpt.restore_source_params(self.tcfg.init_from, abstract,
                                                     self.tcfg.keep_checkpoints)
    done, values = [], {"init_from_step": source_step}
    key = jax.random.key(self.tcfg.seed + 1)
    with step_lib.sharding_context(self.mesh):
      for init in self.methods.initialisers:
        line, more = init.describe(params, fresh_params)
        params = jax.jit(init.apply)(params, fresh_params, key)
        done.append(line)
        values.update(more)
      params = jax.jit(surgery.copy_params, out_shardings=shardings.params)(params, fresh_params)
    logging.info("Initialised from %s (step %d): %s; fresh optimizer state.", self.tcfg.init_from,
                 source_step, "; ".join(done) or "params copied")
    self.writer.write(0, values)
    return params
