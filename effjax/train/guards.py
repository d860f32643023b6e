"""What keeps a run safe: stopping cleanly on a signal, never saving a non-finite state, and
refusing a compiled step that cannot fit in device memory."""
from __future__ import annotations

import os
import signal
import threading

from absl import logging
import jax

from effjax.config import ExperimentConfig
from effjax.errors import ConfigError, RunError
from effjax.train import step as step_lib
from effjax.train.checkpoint import Checkpointer


class NonFiniteError(RunError, FloatingPointError):
  """A step's loss, gradient or updated state was NaN/Inf; nothing after it was checkpointed."""


NonFiniteLossError = NonFiniteError  # the older name


class StopFlag:
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


def preemption_agreed(step: int) -> bool:
  """True on every process at the same step once any process got SIGTERM (multi-process)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if multihost_utils.reached_preemption_sync_point(step):
    logging.warning("Preemption notice on some process: all processes save at step %d and "
                    "stop.", step)
    return True
  return False


class NonFiniteGuard:
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


def memory_needed_bytes(analysis) -> int:
  """Bytes per device a compiled step needs at its peak, from its memory_analysis(): its
  arguments and outputs (less the donated ones the outputs reuse) and its temporaries."""
  size = lambda f: int(getattr(analysis, f"{f}_size_in_bytes", 0) or 0)
  return size("argument") + size("output") - size("alias") + size("temp")


def check_memory(compiled, cfg: ExperimentConfig) -> None:
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
  needed = memory_needed_bytes(analysis)
  available = _device_memory_bytes(jax.local_devices()[0])
  if available is not None and needed > available:
    raise ConfigError(
        f"the compiled train step needs {needed / 2**30:.2f} GiB per device (state, batch and "
        f"{size('temp') / 2**30:.2f} GiB of temporaries) but a device has "
        f"{available / 2**30:.2f} GiB: lower data.seq_len={cfg.data.seq_len} or "
        f"train.global_batch_size={cfg.train.global_batch_size}, or add devices.")
