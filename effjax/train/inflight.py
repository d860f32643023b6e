"""A bound on how many dispatched device programs a host loop leaves unfinished.

JAX dispatches asynchronously: a Python loop of independent steps (the batches of an
evaluation) can enqueue thousands of programs before the first one ends. On XLA's CPU client
every device of a multi-device program is a task of one shared thread pool, and the
participants of a collective wait for each other in a rendezvous that XLA ends with a fatal
error ("Termination timeout ... of 40 seconds exceeded", SIGABRT) when one participant is
not scheduled in time. With thousands of programs queued on a loaded machine, one device's
task of an early program can wait behind later ones for that long: the whole-split evaluation
aborted this way (issue 41). Waiting for step i - limit before dispatching step i + 1 keeps
the queue short while still overlapping dispatch with execution; on the 2-core CPU the
whole-split evaluation of the `test` LM took as long as unbounded (4.6 vs 4.5 s, 3,249 batches).
"""
from __future__ import annotations

import collections
import contextlib
from typing import Any

import jax

from effjax.errors import StepFailedError

DEFAULT_LIMIT = 4


class InFlight:
  """Tracks the outputs of the last `limit` dispatched steps; `add` waits for the oldest one
  once more are pending, and `drain` for all of them.

  A device error, surfacing at dispatch (inside `naming`) or while waiting, is re-raised as
  one line naming `what` and the step's label (a batch, a step number) rather than a
  traceback deep in JAX.
  """

  def __init__(self, what: str, limit: int = DEFAULT_LIMIT):
    if not isinstance(limit, int) or limit < 1:
      raise ValueError(f"in-flight limit must be an integer >= 1, got {limit!r}")
    self.what, self.limit = what, limit
    self._pending: collections.deque[tuple[str, Any]] = collections.deque()
    self.waits = 0  # steps waited for (the bound at work; tests read it)

  def __len__(self) -> int:
    return len(self._pending)

  @contextlib.contextmanager
  def naming(self, label: str):
    """Dispatch a step inside this: a device error it raises names `label`."""
    try:
      yield
    except jax.errors.JaxRuntimeError as e:
      raise self._failed(label, e) from e

  def add(self, label: str, outputs: Any) -> None:
    """Registers a step's outputs (a pytree of arrays it does not donate later); waits while
    more than `limit` are unfinished."""
    self._pending.append((label, outputs))
    while len(self._pending) > self.limit:
      self._wait(*self._pending.popleft())

  def drain(self) -> None:
    while self._pending:
      self._wait(*self._pending.popleft())

  def _wait(self, label: str, outputs: Any) -> None:
    self.waits += 1
    with self.naming(label):
      jax.block_until_ready(outputs)

  def _failed(self, label: str, error: Exception) -> StepFailedError:
    lines = [line.strip() for line in str(error).strip().splitlines()] or [type(error).__name__]
    summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"  # status, cause
    return StepFailedError(f"{self.what}: {label} failed on the device: {summary}")
