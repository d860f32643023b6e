"""Checkpointing: one small wrapper over orbax's CheckpointManager.

A checkpoint holds the train state (params, optimizer state, step, RNG) and the data
iterator's state, so a resumed run sees exactly the batches it would have seen. Restoring goes
into an abstract target that carries shardings, so a checkpoint written on one mesh restores onto
another. A checkpoint that cannot be read is reported, moved aside (never deleted) and the
previous one is used. Every process must call save and restore.
"""
from __future__ import annotations

import os
import shutil
import time

from absl import logging
import jax

CORRUPT_DIR = "corrupt_checkpoints"


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(state),
                                    data=self._ocp.args.JsonSave(data_state))
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state):
    """(state, data_state) of checkpoint `step`, placed with the target's shardings."""
    args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract_state),
                                    data=self._ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    return restored["state"], restored["data"]

  def restore_latest(self, abstract_state):
    """(step, state, data_state) from the newest readable checkpoint, or None if there is none."""
    self.wait()
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as e:  # orbax/tensorstore raise many kinds for damaged files
        moved = self._move_aside(step)
        logging.error("Checkpoint at step %d cannot be read (%s: %s). Moved it to %s; trying the "
                      "previous checkpoint.", step, type(e).__name__, str(e)[:500], moved)
        continue
      return step, state, data_state
    return None

  def _move_aside(self, step: int) -> str:
    parent = os.path.dirname(self.directory)
    target = os.path.join(parent, CORRUPT_DIR, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"effjax_move_aside_{step}")
    self._manager.reload()
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
