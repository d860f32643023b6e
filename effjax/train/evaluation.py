"""Evaluation over a whole split, or a fixed sample of batches spread evenly across it.

Rows are packed in file order (no shuffle), so batch i of a split is the same on every call.
The last partial batch is kept: its missing rows are padding (segment id 0), which the eval
step's weights exclude from every sum (effjax/train/step.py token_losses). With several
processes, each reads its own share of the split; the process with fewer batches feeds
all-padding batches so every process runs the same number of steps.

`max_batches=N` (default `data.eval_batches`; 0 = all) evaluates N batches at evenly spaced
indices 0 .. n-1 of the n batches of the split, so the sample reaches every part of it
rather than its first files.
"""
from __future__ import annotations

import time

from absl import logging
import jax
import numpy as np

from effjax.config import ExperimentConfig
from effjax.data import pipeline
from effjax.parallel import logical_sharding
from effjax.train import inflight as inflight_lib
from effjax.train import step as step_lib

_KEYS = ("tokens", "segment_ids", "positions")


def _host_batches(cfg: ExperimentConfig, split: str, batch_size: int):
  """This process's batches of `split` as numpy dicts, the last one padded to `batch_size`."""
  rows = iter(pipeline.packed_rows(cfg.data, split, seed=0, train=False))
  width = cfg.data.seq_len + 1
  while True:
    chunk = [row for _, row in zip(range(batch_size), rows)]
    if not chunk:
      return
    batch = {k: np.zeros((batch_size, width), np.int32) for k in _KEYS}
    for i, row in enumerate(chunk):
      for k in _KEYS:
        batch[k][i] = row[k]
    yield batch
    if len(chunk) < batch_size:
      return


def _count_batches(cfg: ExperimentConfig, split: str, batch_size: int) -> int:
  rows = sum(1 for _ in pipeline.packed_rows(cfg.data, split, seed=0, train=False))
  return -(-rows // batch_size)


def _max_over_processes(n: int) -> int:
  if jax.process_count() == 1:
    return n
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.asarray(n, np.int64))))


def spread_indices(num_batches: int, max_batches: int) -> np.ndarray:
  """`max_batches` evenly spaced batch indices of `num_batches` (all when 0 or more)."""
  if not max_batches or max_batches >= num_batches:
    return np.arange(num_batches)
  return np.unique(np.round(np.linspace(0, num_batches - 1, max_batches)).astype(np.int64))


# (data config, split, batch size, max_batches, process) -> the chosen host batches. The rows
# are deterministic, and finding spread batches means reading the whole split twice.
_CACHE: dict = {}
_CACHE_LIMIT_BYTES = 1 << 28


def _chosen_host_batches(cfg: ExperimentConfig, split: str, batch_size: int,
                         max_batches: int) -> list[dict[str, np.ndarray]]:
  key = (cfg.data, split, batch_size, max_batches, jax.process_index(), jax.process_count())
  if key in _CACHE:
    return _CACHE[key]
  num_batches = _max_over_processes(_count_batches(cfg, split, batch_size))
  if num_batches == 0:
    raise ValueError(f"evaluation split {split!r} of {cfg.data.dataset!r} is empty")
  chosen = set(spread_indices(num_batches, max_batches).tolist())
  padding = {k: np.zeros((batch_size, cfg.data.seq_len + 1), np.int32) for k in _KEYS}
  local = _host_batches(cfg, split, batch_size)
  batches = []
  for index in range(num_batches):
    host = next(local, padding)
    if index in chosen:
      batches.append(host)
  if len(batches) * batch_size * (cfg.data.seq_len + 1) * 4 * len(_KEYS) <= _CACHE_LIMIT_BYTES:
    _CACHE[key] = batches
  return batches


def evaluate(eval_step, params, model_state, cfg: ExperimentConfig, mesh, *,
             split: str | None = None, max_batches: int | None = None,
             step: int | None = None) -> dict:
  """Token-weighted eval loss, perplexity and bits/byte of `split` (default data.eval_split)
  over all its batches, or `max_batches` spread ones (default data.eval_batches; 0 = all).

  Returns step.eval_summary's keys plus eval_tokens (targets counted) and eval_batches. At
  most inflight.DEFAULT_LIMIT batches are in flight; a batch that fails on the device raises
  inflight.StepFailedError naming the split, `step` (the checkpoint's, for the message) and
  the batch.
  """
  split = split or cfg.data.eval_split
  max_batches = cfg.data.eval_batches if max_batches is None else max_batches
  if not isinstance(max_batches, int) or max_batches < 0:
    raise ValueError(f"max_batches must be an integer >= 0 (0 = the whole split), got "
                     f"{max_batches!r}")
  batch_size = pipeline.per_process_batch_size(cfg.train.global_batch_size, mesh)
  sharding = logical_sharding(mesh, ("batch", "length"))
  sums = None
  batches = _chosen_host_batches(cfg, split, batch_size, max_batches)
  # The eval steps do not depend on each other: without a bound the loop would queue every
  # batch's program at once (effjax/train/inflight.py says why that aborted on CPUs).
  where = f"evaluation of the {split!r} split" + ("" if step is None else f" after step {step}")
  inflight = inflight_lib.InFlight(where)
  for i, host in enumerate(batches):
    label = f"batch {i} of {len(batches)}"
    batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}
    with inflight.naming(label):
      out = eval_step(params, model_state, batch)
      sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    inflight.add(label, sums)
  inflight.drain()
  sums = jax.device_get(sums)
  result = step_lib.eval_summary(sums)
  result.update(eval_tokens=float(sums["tokens"]), eval_batches=float(len(batches)))
  return result


def evaluate_and_log(eval_step, state, cfg: ExperimentConfig, mesh, step: int,
                     writer) -> dict[str, float]:
  """The loop's evaluation after `step` updates, printed and written to metrics; the last one
  (the reported number) on data.final_eval_batches, the others on data.eval_batches."""
  t = time.perf_counter()
  final = step == cfg.train.num_steps
  result = evaluate(eval_step, state.params, state.model_state, cfg, mesh,
                    max_batches=cfg.data.final_eval_batches if final else None, step=step)
  logging.info("eval at step %d | loss %.4f | ppl %.2f | %.4f bits/byte | %.1fs", step,
               result["eval_loss"], result["eval_perplexity"], result["eval_bpb"],
               time.perf_counter() - t)
  writer.write(step, result)
  return result
