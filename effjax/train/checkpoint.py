"""Checkpointing: one small wrapper over orbax's CheckpointManager.

A checkpoint holds the train state (params, optimizer state, step, RNG) and the data
iterator's state of every process (each reads its own share of the data, so each has its own
position), so a resumed run sees exactly the batches it would have seen. Restoring goes
into an abstract target that carries shardings, so a checkpoint written on one mesh restores onto
another. A checkpoint that cannot be read is reported, moved aside (never deleted) and the
previous one is used. Every process must call save and restore.

Each checkpoint also records its run's *identity* (`config_identity`): the config fields that
change the model's function or the optimizer state's structure. Resuming refuses any change
to them by name, even when every array shape still matches (fewer heads with the same kernel
shapes would silently reinterpret the weights), and leaves the checkpoint untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

from absl import logging
import jax

from effjax.errors import RunError, WorkdirError

CORRUPT_DIR = "corrupt_checkpoints"

# Model fields a resume may change: they pick an implementation or a numeric precision, or act
# only when a run starts, so the trained function and the state's structure stay the same.
RESUMABLE_MODEL_FIELDS = ("attention_impl", "remat", "dtype", "moe.gmm_impl",
                          "moe.upcycle_noise", "moe.upcycle_mask", "linear.relora_every",
                          "linear.relora_prune", "linear.sst_every", "linear.sst_sampling",
                          "linear.sst_round")


class IncompatibleCheckpointError(RunError, ValueError):
  """A readable checkpoint written by a different model or optimizer."""


def config_identity(cfg) -> dict:
  """The fields of an ExperimentConfig a checkpoint belongs to: every model field except
  RESUMABLE_MODEL_FIELDS, and what decides the optimizer state's structure and phase."""
  from effjax.train.workdir import flat_config  # pylint: disable=g-import-not-at-top
  flat = flat_config(cfg)
  identity = {k: v for k, v in flat.items()
              if k.startswith("model.") and k[len("model."):] not in RESUMABLE_MODEL_FIELDS}
  identity["optim.grad_clip > 0"] = cfg.optim.grad_clip > 0
  identity["optim.galore_rank"] = cfg.optim.galore_rank
  identity["train.dense_from_step"] = cfg.train.dense_from_step
  return identity


def _shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
  """'opt_state/1/0/mu/embed/embedding' -> shape, for dataclasses, dicts and orbax metadata."""
  def part(key):
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {"/".join(part(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _describe_mismatch(on_disk: dict, expected: dict, limit: int = 5) -> str:
  missing = sorted(set(expected) - set(on_disk))[:limit]
  extra = sorted(set(on_disk) - set(expected))[:limit]
  reshaped = [f"{k}: {on_disk[k]} on disk vs {expected[k]} now"
              for k in sorted(set(on_disk) & set(expected)) if on_disk[k] != expected[k]][:limit]
  return "; ".join(f"{name}: {items}" for name, items in
                   (("not in checkpoint", missing), ("only in checkpoint", extra),
                    ("different shape", reshaped)) if items)


def _allgather_json(value) -> list:
  """[value of process 0, value of process 1, ...] for a JSON-able value, on every process."""
  if jax.process_count() == 1:
    return [value]
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:encoded.size] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(row[:int(n)].tobytes()) for row, n in zip(gathered, lengths.reshape(-1))]


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "identity": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, identity: dict | None = None) -> None:
    """Every process calls this with its own iterator state; all of them are stored."""
    data = {"processes": _allgather_json(data_state)}
    items = {"state": self._ocp.args.StandardSave(state), "data": self._ocp.args.JsonSave(data)}
    if identity is not None:
      items["identity"] = self._ocp.args.JsonSave(identity)
    args = self._ocp.args.Composite(**items)
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state):
    """(state, this process's data_state) of checkpoint `step`, placed with the target's
    shardings. data_state is None when the checkpoint was written by a different number of
    processes: the data shares differ, so no stored position applies."""
    args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract_state),
                                    data=self._ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    data = restored["data"]
    per_process = data["processes"] if "processes" in data else [data]  # older: one process
    if len(per_process) != jax.process_count():
      logging.warning("The checkpoint at step %d was written by %d process(es), this run has %d: "
                      "the data iterators cannot continue from their stored positions.", step,
                      len(per_process), jax.process_count())
      return restored["state"], None
    return restored["state"], per_process[jax.process_index()]

  def identity(self, step: int) -> dict | None:
    """The identity stored with checkpoint `step` (None for checkpoints written without one)."""
    if not os.path.isdir(os.path.join(self.directory, str(step), "identity")):
      return None
    restored = self._manager.restore(
        step, args=self._ocp.args.Composite(identity=self._ocp.args.JsonRestore()))
    return restored["identity"]

  def restore_latest(self, abstract_state, identity: dict | None = None):
    """(step, state, data_state) from the newest readable checkpoint, or None if there is none.

    An unreadable checkpoint is moved aside and the previous one tried. A readable one written
    with a different `identity` (config_identity) or whose arrays do not match
    `abstract_state` raises IncompatibleCheckpointError and is left exactly where it is.
    """
    self.wait()
    expected = _shapes_by_path(abstract_state)
    for step in reversed(self.all_steps()):
      try:
        metadata = self._manager.item_metadata(step)["state"]
        if metadata is None:
          raise ValueError("no readable metadata for the train state")
        on_disk = _shapes_by_path(metadata)
        stored_identity = self.identity(step)
      except Exception as e:  # orbax raises many kinds for damaged files
        self._report_corrupt(step, e)
        continue
      if identity is not None and stored_identity is not None:
        changed = [f"{k} {stored_identity[k]!r} -> {identity[k]!r}"
                   for k in sorted(set(stored_identity) & set(identity))
                   if stored_identity[k] != identity[k]]
        if changed:
          raise IncompatibleCheckpointError(
              f"the checkpoint at step {step} in {self.directory} was written by a different "
              f"model or optimizer: {'; '.join(changed)}. Resume with the config it was "
              "written with, or use a new --workdir.")
      if on_disk != expected:
        raise IncompatibleCheckpointError(
            f"the checkpoint at step {step} in {self.directory} does not match the current model "
            f"and optimizer config ({_describe_mismatch(on_disk, expected)}). Use the config it "
            "was written with, or a new --workdir.")
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as e:  # damaged array data shows only when it is read
        self._report_corrupt(step, e)
        continue
      return step, state, data_state
    return None

  def _report_corrupt(self, step: int, error: Exception) -> None:
    moved = self._move_aside(step)
    logging.error("Checkpoint at step %d cannot be read (%s: %s). Moved it to %s; trying the "
                  "previous checkpoint.", step, type(error).__name__, str(error)[:500], moved)

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


# -- restore targets --------------------------------------------------------------------------


def restore_latest_of_phase(checkpointer: Checkpointer, abstract_for_step, identity=None):
  """restore_latest with the target chosen by the checkpoint's step (a phase change, e.g.
  reverse sparsification, changes the structure). When the newest checkpoint was unreadable
  and moved aside, the next one may belong to another phase, so the target is chosen again."""
  while True:
    latest = checkpointer.latest_step()
    if latest is None:
      return None
    try:
      return checkpointer.restore_latest(abstract_for_step(latest), identity)
    except IncompatibleCheckpointError:
      if checkpointer.latest_step() == latest:
        raise  # the newest readable checkpoint itself does not match


@contextlib.contextmanager
def saving(checkpointer: Checkpointer, step: int):
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


def restore_source_params(source: str, abstract_state, keep: int):
  """(params, step) of the latest checkpoint of another run (train.init_from), restored into
  `abstract_state` (that run's model with this run's optimizer)."""
  directory = os.path.join(source, "checkpoints")
  if not os.path.isdir(directory):
    directory = source
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"train.init_from={source!r}: no such directory")
  checkpointer = Checkpointer(directory, keep=keep, async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"train.init_from={source!r}: no checkpoint in {directory}")
    try:
      state, _ = checkpointer.restore(step, abstract_state)
    except Exception as e:  # orbax reports structure mismatches in many ways
      raise IncompatibleCheckpointError(
          f"train.init_from={source!r}: the checkpoint at step {step} does not restore into "
          f"this model with every projection dense ({type(e).__name__}: {str(e)[:300]})") from e
  finally:
    checkpointer.close()
  return state.params, step


def read_run_config(workdir: str):
  """The ExperimentConfig a training run wrote to WORKDIR/config.json, its tokenizer read
  from the run's own copy."""
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir!r} holds no training run: there is no {path}")
  with open(path, encoding="utf-8") as f:
    cfg = config_lib.from_dict(config_lib.ExperimentConfig, json.load(f))
  return config_lib.resolve(cfg, base_dir=workdir, check_files=False)


def load_checkpoint(cfg, workdir: str, step: int | None = None, *, devices=None):
  """(step, TrainState, mesh) of `workdir`'s newest readable checkpoint (or the
  one at `step`), placed on the mesh `cfg.mesh` describes (which may differ from the mesh it
  was written on). For notebooks, sampling and analysis; training resumes by itself."""
  # the layers above this module: the model, optimizer and methods a checkpoint was made by
  from effjax.models.decoder_lm import DecoderLM  # pylint: disable=g-import-not-at-top
  from effjax.optim import lowrank  # pylint: disable=g-import-not-at-top
  from effjax.parallel import build_mesh  # pylint: disable=g-import-not-at-top
  from effjax.train import plugins  # pylint: disable=g-import-not-at-top
  from effjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir!r} has no checkpoints/ directory: nothing to load")
  mesh = build_mesh(cfg.mesh, devices)
  tx, _ = lowrank.optimizer_for(cfg)
  methods = plugins.enabled(cfg)

  def abstract_for(s: int):
    return step_lib.abstract_train_state(DecoderLM(methods.model_config_at(s)), tx, mesh,
                                         cfg.train.seed, cfg.data.seq_len)[0]

  checkpointer = Checkpointer(directory, keep=cfg.train.keep_checkpoints, async_save=False)
  try:
    if step is None:
      restored = restore_latest_of_phase(checkpointer, abstract_for, config_identity(cfg))
      if restored is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
      step, state, _ = restored
    else:
      steps = checkpointer.all_steps()
      if step not in steps:
        raise ValueError(f"no checkpoint at step {step} in {directory}; it has steps {steps}")
      state, _ = checkpointer.restore(step, abstract_for(step))
  finally:
    checkpointer.close()
  return step, state, mesh


def load_run(workdir: str, step: int | None = None, *, devices=None):
  """(ExperimentConfig, model config of that checkpoint, step, TrainState, mesh) of the run in
  `workdir`: its newest readable checkpoint, or the one at `step`."""
  from effjax.train import plugins  # pylint: disable=g-import-not-at-top
  cfg = read_run_config(workdir)
  found, state, mesh = load_checkpoint(cfg, workdir, step, devices=devices)
  return cfg, plugins.enabled(cfg).model_config_at(found), found, state, mesh


def load_sampler(workdir: str, step: int | None = None, *, max_length: int = 0, devices=None):
  """A decode.Sampler of the run in `workdir` (its newest readable checkpoint, or `step`) that
  reads and writes text with the run's own tokenizer: `.generate_text(prompts,
  max_new_tokens=N)`. `max_length` is the KV cache's (0 = the run's seq_len)."""
  from effjax.data import tokenizer  # pylint: disable=g-import-not-at-top
  from effjax.models import decode  # pylint: disable=g-import-not-at-top
  cfg, model_cfg, _, state, mesh = load_run(workdir, step, devices=devices)
  return decode.Sampler(model_cfg, state.params, state.model_state, mesh,
                        max_length=max_length or cfg.data.seq_len,
                        tokenizer=tokenizer.load(cfg.data.tokenizer))
