"""The run's directory: checked before any work, locked for one run at a time, and never
silently restarted or overwritten.

Layout: `checkpoints/`, `metrics.jsonl`, `config.json` (written atomically), `tensorboard/`,
`corrupt_checkpoints/` (unreadable checkpoints moved aside), `run.lock` (held while a run is
alive; records its host and pid), and the run's copy of its tokenizer file, `tokenizer.model`
(SentencePiece) or `tokenizer.json` (Hugging Face), which config.json names relative to the
workdir, so the directory is self-contained.
"""
from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import shutil
import time
from typing import Any

from absl import logging
import jax

from effjax import config as config_lib
from effjax import filelock
from effjax.errors import WorkdirError

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


def prepare(workdir: str) -> None:
  """Creates `workdir`, or fails with one line when it is a file or cannot be written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created: {e.strerror}") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir} is not writable by this user")


class RunLock:
  """One run per workdir. Process 0 holds the lock for all processes of a multi-process run.

  A lock whose holder died (kill -9, a lost node on the same filesystem) is free again: the
  operating system drops it with the process; taking it over is logged with the old holder.
  """

  def __init__(self, workdir: str):
    self._lock = filelock.FileLock(os.path.join(workdir, LOCK_FILE))
    self._workdir = workdir
    self._held = False

  def acquire(self) -> None:
    ok, message = True, ""
    if jax.process_index() == 0:
      previous = self._lock.holder()
      ok = self._lock.acquire(blocking=False)
      if ok:
        if previous:
          logging.warning("Taking over the lock of %s left by %s, which is no longer running.",
                          self._workdir, filelock.describe(previous))
        self._lock.record_holder()
        self._held = True
      else:
        message = (f"--workdir={self._workdir} is in use by another run: "
                   f"{filelock.describe(self._lock.holder())}. Stop it or use another workdir.")
    if jax.process_count() > 1:
      import numpy as np  # pylint: disable=g-import-not-at-top
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
      if not ok and not message:
        message = f"--workdir={self._workdir} is in use by another run (see process 0's log)"
    if not ok:
      raise WorkdirError(message)

  def release(self) -> None:
    if self._held:
      self._lock.release()
      self._held = False


def _has_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def install_tokenizer(workdir: str, cfg):
  """`cfg` reading its tokenizer from the workdir's own copy, made now (process 0).

  A workdir with checkpoints keeps the tokenizer it was trained with: a different file or
  kind is refused by name, before any compilation. Without checkpoints the copy is
  (re)written, and a copy of the other kind is removed."""
  from effjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  kind, source = tokenizer_lib.parse_spec(cfg.data.tokenizer)
  copies = {k: os.path.join(os.path.abspath(workdir), name)
            for k, name in tokenizer_lib.WORKDIR_FILES.items()}
  present = {k: p for k, p in copies.items() if os.path.exists(p)}
  target = copies.get(kind)
  if _has_checkpoints(workdir):
    trained = next(iter(present), "byte")
    same = (trained == kind and (kind == "byte" or os.path.abspath(source) == target
                                 or filecmp.cmp(source, target, shallow=False)))
    if not same:
      was = "the byte tokenizer" if trained == "byte" else present[trained]
      raise WorkdirError(
          f"data.tokenizer={cfg.data.tokenizer!r} is not the tokenizer the checkpoints of "
          f"--workdir={workdir} were trained with ({was}); resume with that one, or use a new "
          "workdir")
  elif jax.process_index() == 0:
    for other, path in present.items():
      if other != kind:
        os.remove(path)
    if target is not None and os.path.abspath(source) != target:
      tmp = f"{target}.tmp.{os.getpid()}"
      shutil.copyfile(source, tmp)
      os.replace(tmp, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("effjax_install_tokenizer")
  if target is None:
    return cfg
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                           tokenizer=f"{kind}:{target}"))


def _workdir_relative(resolved: dict, workdir: str) -> dict:
  """config.json names the workdir's tokenizer copy by its name alone (read_run_config
  resolves it against the workdir), so the directory can move."""
  spec = resolved.get("data", {}).get("tokenizer", "byte")
  kind, _, path = spec.partition(":")
  if path and os.path.dirname(path) == os.path.abspath(workdir):
    resolved["data"]["tokenizer"] = f"{kind}:{os.path.basename(path)}"
  return resolved


def flat_config(cfg) -> dict[str, Any]:
  """{"model.linear.kind": "dense", ...} for an ExperimentConfig or its to_dict()."""
  values = config_lib.to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
  flat = {}

  def walk(prefix, node):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(f"{prefix}{key}.", value)
      else:
        flat[prefix + key] = value
  walk("", values)
  return flat


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """["optim.learning_rate 0.003 -> 0.001", ...] over the keys both have (flat dicts)."""
  return [f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new))
          if old[k] != new[k]]


def earlier_progress(workdir: str, had_checkpoint_dir: bool) -> str | None:
  """Why `workdir` holds an earlier run's progress that no checkpoint restored, or None.

  `had_checkpoint_dir`: whether `checkpoints/` existed before this run opened it. A run killed
  before its first checkpoint was complete leaves metrics and an empty `checkpoints/`: starting
  over loses nothing that was saved, so that is not progress. Unreadable checkpoints (not yet
  acknowledged by a fresh start), or metrics without a `checkpoints/` directory, are.
  """
  last_step, acknowledged = _metrics_since_fresh_start(os.path.join(workdir, METRICS_FILE))
  corrupt_dir = os.path.join(workdir, "corrupt_checkpoints")
  corrupt = sorted(set(os.listdir(corrupt_dir)) - acknowledged
                   if os.path.isdir(corrupt_dir) else [])
  if corrupt:
    return f"every checkpoint of it is unreadable (moved to {corrupt_dir}: {corrupt})"
  if last_step is not None and not had_checkpoint_dir:
    return (f"{os.path.join(workdir, METRICS_FILE)} records training up to step {last_step} but "
            "its checkpoints/ directory is missing")
  return None


def unreadable_checkpoints(workdir: str) -> list[str]:
  """What `corrupt_checkpoints/` holds: a fresh start records these as acknowledged."""
  corrupt_dir = os.path.join(workdir, "corrupt_checkpoints")
  return sorted(os.listdir(corrupt_dir)) if os.path.isdir(corrupt_dir) else []


def _metrics_since_fresh_start(path: str) -> tuple[int | None, set[str]]:
  """(last step with a train loss since the last fresh start or None, the unreadable
  checkpoints that fresh start acknowledged)."""
  last_step, acknowledged = None, set()
  if not os.path.exists(path):
    return last_step, acknowledged
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut by a kill; not progress either way
      if record.get("event") == "fresh_start":
        last_step, acknowledged = None, set(record.get("acknowledged_unreadable", []))
      elif "train_loss" in record:
        last_step = record["step"]
  return last_step, acknowledged


def write_config(workdir: str, cfg, *, fresh: bool, start_step: int) -> None:
  """config.json holds the config the run started with; a resume with a different config
  writes config.resumed_at_<step>.json and names the changed fields. A fresh start replaces a
  config.json left by a run that never saved; an unreadable one is kept under another name."""
  if jax.process_index() != 0:
    return
  resolved = _workdir_relative(config_lib.to_dict(cfg), workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path) and not fresh:
    try:
      with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    except (OSError, ValueError) as e:
      kept = f"{path}.unreadable.{time.strftime('%Y%m%d-%H%M%S')}"
      os.replace(path, kept)
      logging.warning("%s is unreadable (%s); kept as %s, writing the current config.", path,
                      e, kept)
    else:
      if previous == resolved:
        return
      changes = describe_changes(flat_config(previous), flat_config(resolved))
      path = os.path.join(workdir, f"config.resumed_at_{start_step}.json")
      logging.warning("Resuming with a config that differs from %s/config.json in: %s. The new "
                      "config is written to %s.", workdir, "; ".join(changes) or "(new fields)",
                      path)
  elif os.path.exists(path):  # fresh start: the file came from a run that never saved
    kept = f"{path}.replaced.{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, kept)
    logging.info("Fresh start: the earlier %s is kept as %s.", path, kept)
  _write_json_atomically(path, resolved)


def _write_json_atomically(path: str, value) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
