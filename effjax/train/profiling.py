"""train.profile_steps=START:END: a jax.profiler trace of steps START, ..., END - 1.

The trace is written under WORKDIR/profile/ (jax.profiler's layout: plugins/profile/<time>/
<host>.xplane.pb and <host>.trace.json.gz) by process 0 only. It starts just before update
START is dispatched, and ends after iteration END - 1 of the loop (that update, plus any
transform, log flush, evaluation or checkpoint due at that step) once its device work has
finished; each update is annotated `StepTraceAnnotation("train", step_num=step)`. A run that
ends early (a stop, an exception) stops the trace where it is. Starting and stopping the
profiler is kept out of the step times the loop logs.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

from absl import logging
import jax


class StepProfiler:

  def __init__(self, tcfg, workdir: str, start_step: int,
               excluding_time: Callable[[Callable[[], Any]], Any] = lambda fn: fn()):
    """`start_step`: updates done before this run (a resumed run traces only what remains);
    `excluding_time(fn)` runs fn with its time kept out of the step times."""
    self.directory = os.path.join(workdir, "profile")
    self._excluding_time = excluding_time
    self.first = self.end = self.last_traced = None
    self.active = False
    span = tcfg.profile_range
    if span is None or jax.process_index() != 0:  # process 0 traces (its host and devices)
      return
    start, end = span
    first = max(start, start_step + 1)
    what = f"train.profile_steps={tcfg.profile_steps}"
    if first >= end:
      logging.info("%s: this run starts after step %d, past the traced steps; no trace.", what,
                   start_step)
      return
    if first > start:
      logging.info("%s: resumed at step %d, so only steps %d to %d are traced.", what,
                   start_step, first, end - 1)
    self.first, self.end = first, end

  @contextlib.contextmanager
  def step(self, step: int):
    """Dispatch update `step` inside this: starts the trace at the first traced step and
    annotates every traced one."""
    if step == self.first:
      self._excluding_time(self._start)
    if not self.active:
      yield
      return
    self.last_traced = step
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      yield

  def after(self, step: int, state, last: bool) -> None:
    """End of loop iteration `step`: after the last traced step, or at the run's last
    iteration, waits for the traced device work and stops the trace."""
    if self.active and (step >= self.end - 1 or last):
      jax.block_until_ready(state)  # device time: counted as step time, like any wait
      self._excluding_time(self.stop)

  def stop(self) -> None:
    if not self.active:
      return
    self.active = False
    jax.profiler.stop_trace()
    logging.info("Wrote the profiler trace of steps %d to %d to %s (TensorBoard's profile "
                 "plugin or XProf reads it; see the README's Profiling section).", self.first,
                 self.last_traced, self.directory)

  def close(self) -> None:
    """The run is ending (a stop or an exception): a trace still running is stopped here."""
    if self.active:
      logging.warning("The run ended while tracing; stopping the trace after step %s.",
                      self.last_traced)
      try:
        self.stop()
      except Exception as e:  # pylint: disable=broad-except  (never hide the run's own error)
        logging.warning("Stopping the profiler trace failed: %s", e)

  def _start(self) -> None:
    os.makedirs(self.directory, exist_ok=True)
    jax.profiler.start_trace(self.directory)
    self.active = True
    logging.info("Tracing steps %d to %d with jax.profiler into %s.", self.first, self.end - 1,
                 self.directory)
