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
from typing import Any

import jax


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
