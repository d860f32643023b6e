"""Metrics: one JSON object per line in WORKDIR/metrics.jsonl, plus TensorBoard event files.

Only process 0 writes. A resumed run appends; it first writes a line {"step": N, "event":
"resumed"}, and `read_metrics` keeps the last record per step, i.e. the resumed run's values.
A run that starts from step 0 first writes {"step": 0, "event": "fresh_start"}; `read_metrics`
forgets everything before it.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from absl import logging
import jax

from effjax import config as config_lib
from effjax.models.decoder_lm import count_params, flops_per_token
from effjax.moe.accounting import inactive_expert_params
from effjax.train import inflight, throughput


class MetricsWriter:

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self._enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in record.items():
      if name != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, global_step=int(step))

  def flush(self) -> None:
    if self._enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()


def _jsonable(value):
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep them visible as strings
  return value


def read_metrics(path: str) -> dict[int, dict[str, Any]]:
  """step -> merged record, later lines winning (so a resumed run's values replace earlier ones)."""
  by_step: dict[int, dict[str, Any]] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if record.get("event") == "fresh_start":  # a run started over in this workdir
        by_step = {}
        continue
      if record.get("event") == "resumed":
        resumed_at = record["step"]
        by_step = {s: r for s, r in by_step.items() if s <= resumed_at}
        continue
      by_step.setdefault(record["step"], {}).update(record)
  return by_step


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def describe_linear(model_cfg) -> str:
  linear = model_cfg.linear
  kinds = {g: linear.kind_for(g) for g in config_lib.LINEAR_GROUPS}
  text = ", ".join(f"{g} {k}" for g, k in kinds.items())
  return text + (f", nblocks {linear.nblocks}" if "monarch" in kinds.values() else "")


def log_model(writer: MetricsWriter, step: int, model_cfg, params, cfg) -> None:
  """Prints and logs a model's parameter count (active per token for MoE) and FLOPs per token."""
  n_params = count_params(params)
  flops = flops_per_token(model_cfg, cfg.data.seq_len)
  tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
  logging.info("model (%s): %s parameters; %.4g forward / %.4g training FLOPs per token; "
               "%d tokens per step; %d steps", describe_linear(model_cfg), f"{n_params:,}",
               flops["forward"], flops["train"], tokens_per_step, cfg.train.num_steps)
  writer.write(step, {"params": n_params, "flops_per_token": flops["train"],
                      "forward_flops_per_token": flops["forward"]})
  if model_cfg.ffn == "moe":  # total vs per-token parameters
    active = n_params - inactive_expert_params(model_cfg)
    logging.info("MoE: %s parameters active per token of %s", f"{active:,}", f"{n_params:,}")
    writer.write(step, {"active_params": active})


def mfu_peak(device, dtype: str) -> float | None:
  """The peak FLOP/s per device that MFU is measured against (None: no MFU); says which, or why
  there is none, in one line."""
  peak, about = throughput.device_peak_flops(device, dtype)
  if peak:
    logging.info("MFU is measured against %s.", about)
  else:
    logging.info("MFU is left out of the step logs: %s.", about)
  return peak


class StepLog:
  """The train steps' device metrics, fetched only when flushed (no host sync per step); every
  fetched step goes through `guard.check` (the non-finite guard) before anything is saved.

  Throughput per flush interval: tokens_per_sec (global), tokens_per_sec_per_device,
  model_tflops_per_device (the model's training FLOPs, `flops_per_token(...)["train"]` of the
  model that made each step, over `num_devices`) and, when `peak_flops` is known, mfu.
  """

  def __init__(self, tcfg, writer: MetricsWriter, seq_len: int, guard, *, num_devices: int = 1,
               peak_flops: float | None = None):
    self.tcfg, self.writer, self.guard = tcfg, writer, guard
    self.seq_len, self.num_devices, self.peak_flops = seq_len, num_devices, peak_flops
    self.tokens_per_step = tcfg.global_batch_size * seq_len
    self.flops_per_token = 0.0  # set_model
    self.pending = []  # (step, device metrics) not yet fetched
    self.inflight = inflight.InFlight("training")
    self.restart_clock()

  def set_model(self, model_cfg) -> None:
    """The model that makes the next steps (again after a phase changes it)."""
    self.flops_per_token = flops_per_token(model_cfg, self.seq_len)["train"]

  def restart_clock(self) -> None:
    self.t0, self.steps, self.flops = time.perf_counter(), 0, 0.0

  def append(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))
    self.inflight.add(f"train step {step}", metrics)  # waits for step - limit: no long queue
    self.steps += 1
    self.flops += self.tokens_per_step * self.flops_per_token  # an interval may span a phase

  def excluding_time(self, fn):
    """fn() with its wall time (a conversion, a compilation) not counted as step time."""
    start = time.perf_counter()
    try:
      return fn()
    finally:
      self.t0 += time.perf_counter() - start

  def flush(self, step: int) -> dict[str, float]:
    """Fetches pending metrics, stops on a non-finite step, logs the newest ones."""
    self.inflight.drain()
    fetched = jax.device_get(self.pending)
    self.pending.clear()
    for s, m in fetched:
      self.guard.check(s, m)
    if not fetched:
      return {}
    elapsed = time.perf_counter() - self.t0
    metrics = {k: float(v) if v.ndim == 0 else v.tolist() for k, v in fetched[-1][1].items()
               if k != "nonfinite"}
    if self.tcfg.max_skipped_nonfinite:
      metrics["skipped_nonfinite"] = self.guard.skipped_total
    elapsed = max(elapsed, 1e-9)
    metrics["tokens_per_sec"] = self.steps * self.tokens_per_step / elapsed
    metrics["step_time_sec"] = elapsed / max(self.steps, 1)
    metrics["tokens_per_sec_per_device"] = metrics["tokens_per_sec"] / self.num_devices
    model_flops_per_device = self.flops / elapsed / self.num_devices
    metrics["model_tflops_per_device"] = model_flops_per_device / 1e12
    mfu = ""
    if self.peak_flops:
      metrics["mfu"] = model_flops_per_device / self.peak_flops
      mfu = f" | MFU {metrics['mfu']:.1%}"
    eta = (self.tcfg.num_steps - step) * metrics["step_time_sec"]
    logging.info("step %d/%d | loss %.4f | %.0f tok/s | %.3f s/step%s | eta %s", step,
                 self.tcfg.num_steps, metrics["train_loss"], metrics["tokens_per_sec"],
                 metrics["step_time_sec"], mfu, format_duration(eta))
    self.writer.write(step, metrics)
    return metrics
