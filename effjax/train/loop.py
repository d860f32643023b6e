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

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from typing import Callable

from absl import logging
import jax

from effjax import config as config_lib
from effjax.config import ExperimentConfig
from effjax.errors import ConfigError, RunError, WorkdirError
from effjax.data import pipeline
from effjax.models.decoder_lm import DecoderLM, count_params, flops_per_token
from effjax.moe.accounting import inactive_expert_params
from effjax.moe.upcycle import upcycle_params
from effjax.optim import lowrank
from effjax.parallel import build_mesh
from effjax.train import step as step_lib
from effjax.train import evaluation, surgery
from effjax.train import workdir as workdir_lib
from effjax.train.checkpoint import Checkpointer, IncompatibleCheckpointError, config_identity
from effjax.train.metrics import MetricsWriter, read_metrics


class NonFiniteError(RunError, FloatingPointError):
  """A step's loss, gradient or updated state was NaN/Inf; nothing after it was checkpointed."""


NonFiniteLossError = NonFiniteError  # the older name


class _StopFlag:
  """SIGTERM or SIGINT: the loop saves a checkpoint after the current step and returns.

  A second SIGINT (Ctrl-C twice) aborts at once. With several processes, SIGINT is passed on
  as SIGTERM to JAX's preemption service, so all processes agree on the step to stop at.
  """

  def __init__(self, multi_process: bool):
    self.requested = False
    self._multi_process = multi_process
    self._previous = {}

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread (e.g. not in a worker)
    signals = [signal.SIGINT] + ([] if self._multi_process else [signal.SIGTERM])
    for sig in signals:  # several processes: JAX's preemption service owns SIGTERM
      self._previous[sig] = signal.signal(sig, self)

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def __call__(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt("second Ctrl-C: aborted without saving")
    name = signal.Signals(signum).name
    if self._multi_process:
      logging.warning("Received %s: asking every process to save and stop.", name)
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      logging.warning("Received %s: saving a checkpoint after this step and stopping "
                      "(Ctrl-C again aborts without saving).", name)
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


def _device_memory_bytes(device) -> int | None:
  """Memory one device may use: the allocator's limit on accelerators; on a CPU, the host's
  available memory shared by its local devices."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    try:
      with open("/proc/meminfo", encoding="utf-8") as f:
        info = dict(line.split(":", 1) for line in f)
      return int(info["MemAvailable"].split()[0]) * 1024 // max(jax.local_device_count(), 1)
    except (OSError, KeyError, ValueError):
      return None
  return None


def _check_memory(compiled, cfg: ExperimentConfig) -> None:
  """Prints the compiled step's memory per device and refuses to run one that cannot fit."""
  try:
    analysis = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except  (not every backend implements it)
    logging.info("memory_analysis unavailable: %s", e)
    return
  if analysis is None:
    return
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  parts = [f"{f.removesuffix('_size_in_bytes')}={getattr(analysis, f, 0) / 2**20:.1f}MiB"
           for f in fields if hasattr(analysis, f)]
  logging.info("train step memory per device: %s", ", ".join(parts))
  size = lambda f: int(getattr(analysis, f"{f}_size_in_bytes", 0) or 0)
  needed = size("argument") + size("output") - size("alias") + size("temp")
  available = _device_memory_bytes(jax.local_devices()[0])
  if available is not None and needed > available:
    raise ConfigError(
        f"the compiled train step needs {needed / 2**30:.2f} GiB per device (state, batch and "
        f"{size('temp') / 2**30:.2f} GiB of temporaries) but a device has "
        f"{available / 2**30:.2f} GiB: lower data.seq_len={cfg.data.seq_len} or "
        f"train.global_batch_size={cfg.train.global_batch_size}, or add devices.")


def _describe_linear(model_cfg) -> str:
  linear = model_cfg.linear
  kinds = {g: linear.kind_for(g) for g in config_lib.LINEAR_GROUPS}
  text = ", ".join(f"{g} {k}" for g, k in kinds.items())
  return text + (f", nblocks {linear.nblocks}" if "monarch" in kinds.values() else "")


def _restore_latest(checkpointer: Checkpointer, abstract_for_step: Callable[[int], object],
                    identity: dict | None = None):
  """restore_latest with the target chosen by the checkpoint's step (structures differ across
  the reverse-sparsification switch). When the newest checkpoint was unreadable and moved
  aside, the next one may belong to the other phase, so the target is chosen again."""
  while True:
    latest = checkpointer.latest_step()
    if latest is None:
      return None
    try:
      return checkpointer.restore_latest(abstract_for_step(latest), identity)
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
                       should_stop: Callable[[int], bool] | None = None,
                       start_over: bool = False) -> dict[str, float]:
  """Trains `cfg` in `workdir`, resuming from its latest readable checkpoint.

  Returns the last logged metrics. `should_stop(step)` (for tests and drivers) stops like
  SIGTERM does: save a checkpoint, then return. One run at a time holds `workdir`; a workdir
  whose earlier progress cannot be restored is refused unless `start_over`.
  """
  workdir_lib.prepare(workdir)
  stop_flag = _StopFlag(multi_process=jax.process_count() > 1)
  stop_flag.install()  # before any compilation, so an early signal is not lost
  lock = workdir_lib.RunLock(workdir)
  try:
    lock.acquire()
    return _train(cfg, workdir, devices, should_stop, start_over, stop_flag)
  finally:
    lock.release()
    stop_flag.uninstall()


def _build_mesh_for(cfg: ExperimentConfig, devices):
  try:
    mesh = build_mesh(cfg.mesh, devices)
    pipeline.per_process_batch_size(cfg.train.global_batch_size, mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return mesh


def _train(cfg, workdir, devices, should_stop, start_over, stop_flag) -> dict[str, float]:
  tcfg = cfg.train
  mesh = _build_mesh_for(cfg, devices)  # fails early on a bad mesh or batch
  tx, lr_fn = lowrank.optimizer_for(cfg)  # AdamW unless a low-rank method is configured
  logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind)
  switch = tcfg.dense_from_step
  dense_model_cfg = dataclasses.replace(cfg.model, linear=cfg.model.linear.all_dense())
  identity = config_identity(cfg)
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
  had_checkpoint_dir = os.path.isdir(os.path.join(workdir, "checkpoints"))  # before orbax makes it
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints,
                              async_save=tcfg.async_checkpointing)
  try:
    restored = _restore_latest(checkpointer, lambda s: phase(dense_at(s))[2], identity)
  except BaseException:
    checkpointer.close()
    raise
  if restored is None:
    progress = workdir_lib.earlier_progress(workdir, had_checkpoint_dir)
    if progress and not start_over:
      checkpointer.close()
      raise WorkdirError(
          f"--workdir={workdir} holds an earlier run, but {progress}; refusing to start over "
          "silently. Pass --start_over to train from step 0 in it anyway, or use a new workdir.")
  elif restored[0] >= tcfg.num_steps:  # nothing to do: say so before compiling anything
    checkpointer.close()
    logging.info("The checkpoint at step %d already completes train.num_steps=%d; nothing to "
                 "do. Raise --config.train.num_steps to train further.", restored[0],
                 tcfg.num_steps)
    path = os.path.join(workdir, workdir_lib.METRICS_FILE)
    return read_metrics(path).get(restored[0], {}) if os.path.exists(path) else {}
  writer = MetricsWriter(workdir)
  if restored is None:
    start = 0
    writer.write(0, {"event": "fresh_start",
                     "acknowledged_unreadable": workdir_lib.unreadable_checkpoints(workdir)})
    _, model, abstract, shardings = phase(False)
    state, _ = step_lib.create_train_state(model, tx, mesh, tcfg.seed, cfg.data.seq_len)
    if tcfg.init_from:
      state = _initialise_from(cfg, state, abstract, shardings, dense_model_cfg, tx, mesh,
                               writer)
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
  workdir_lib.write_config(workdir, cfg, fresh=restored is None, start_step=start)

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
    compiled = step_lib.compile_steps(model, tx, lr_fn, mesh, abstract, shardings, batch_shape,
                                      skip_nonfinite=tcfg.max_skipped_nonfinite > 0)
    _check_memory(compiled[0], cfg)
    return compiled

  multi_process = jax.process_count() > 1
  last = {}
  pending = []  # (step, device metrics) not yet fetched
  guard = _NonFiniteGuard(tcfg.max_skipped_nonfinite, checkpointer)

  def flush(interval_start: float, interval_steps: int, step: int) -> dict[str, float]:
    """Fetches pending metrics, stops on a non-finite step, logs the newest ones."""
    fetched = jax.device_get(pending)
    pending.clear()
    for s, m in fetched:
      guard.check(s, m)
    if not fetched:
      return {}
    elapsed = time.perf_counter() - interval_start
    metrics = {k: float(v) if v.ndim == 0 else v.tolist() for k, v in fetched[-1][1].items()
               if k != "nonfinite"}
    if tcfg.max_skipped_nonfinite:
      metrics["skipped_nonfinite"] = guard.skipped_total
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
    before = step_lib.eval_summary(jax.device_get(
        monarch_eval_step(state.params, state.model_state, batch)))
    after = step_lib.eval_summary(jax.device_get(
        new_eval_step(dense_state.params, dense_state.model_state, batch)))
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

  def save(step: int) -> None:
    with _saving(checkpointer, step):
      checkpointer.save(step, state, train_iter.get_state(), identity)

  try:
    train_step, eval_step = enter_phase(dense_at(start), start, state.params)
    periodic = _lowrank_setup(cfg, mesh, phase(dense_at(start))[3], writer, start)
    if stop_flag.requested:  # a signal during set-up or compilation: nothing new to save
      logging.warning("Stopped before the first step; the workdir is as it was.")
      return last
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
        last.update(flush(t0, steps_since, step))  # checks every step since the last flush
        if evaluate_now:
          run_eval(step)
        if save_now:
          save(step)
        t0, steps_since = time.perf_counter(), 0
      if stop:
        logging.warning("Stopped at step %d after saving a checkpoint.", step)
        break
    with _saving(checkpointer, step):
      checkpointer.wait()
  finally:
    checkpointer.close()
    writer.close()
  return last


class _NonFiniteGuard:
  """Reads each step's "nonfinite" flags (see step.NONFINITE_*) before anything is saved."""

  def __init__(self, max_skipped: int, checkpointer: Checkpointer):
    self.max_skipped = max_skipped
    self.skipped_in_a_row = 0
    self.skipped_total = 0
    self._checkpointer = checkpointer

  def check(self, step: int, metrics) -> None:
    code = int(metrics["nonfinite"])
    if not code:
      self.skipped_in_a_row = 0
      return
    what = step_lib.describe_nonfinite(code)
    if self.max_skipped and self.skipped_in_a_row < self.max_skipped:
      self.skipped_in_a_row += 1
      self.skipped_total += 1
      logging.warning("step %d: %s not finite; update skipped (%d in a row, at most %d).", step,
                      what, self.skipped_in_a_row, self.max_skipped)
      if self.skipped_in_a_row < self.max_skipped:
        return
    latest = self._checkpointer.latest_step()
    kept = ("no checkpoint had been written" if latest is None else
            f"the last checkpoint (step {latest}) was written before it and is untouched")
    values = f"train_loss {float(metrics['train_loss'])}, grad_norm {float(metrics['grad_norm'])}"
    if self.max_skipped:
      raise NonFiniteError(f"{self.max_skipped} steps in a row up to step {step} were not "
                           f"finite ({what}; {values}); training stopped and {kept}.")
    raise NonFiniteError(f"{what} not finite at step {step} ({values}); training stopped and "
                         f"{kept}.")


@contextlib.contextmanager
def _saving(checkpointer: Checkpointer, step: int):
  """A failed write (disk full, permissions) becomes one clear error; older checkpoints stay."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (orbax wraps OS errors variously)
    cause = e
    while cause is not None and not isinstance(cause, OSError):
      cause = cause.__cause__ or cause.__context__
    if cause is None:
      raise
    raise WorkdirError(
        f"could not write the checkpoint at step {step} in {checkpointer.directory}: "
        f"{cause.strerror or cause}. The checkpoints before it are kept "
        f"({checkpointer.all_steps()}).") from e


def _initialise_from(cfg, state, abstract, shardings, dense_model_cfg, tx, mesh, writer):
  """train.init_from: this fresh state with params taken from another run (see module doc)."""
  tcfg = cfg.train
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
  return state


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
    restored = _restore_latest(checkpointer, abstract_for, config_identity(cfg))
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
  step, state, _ = restored
  return step, state, mesh
