"""The bound on dispatched-but-unfinished steps (effjax/train/inflight.py): it holds, the
evaluation and training loops use it, and a failing step is named in one line."""
import dataclasses

import jax
import jax.experimental  # io_callback
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.errors import RunError
from effjax.train import inflight
from effjax.train.inflight import InFlight, StepFailedError


def _failing_at(bad: int):
  """A jitted f(i) whose host callback raises for i == bad (a device-side failure)."""
  def callback(i):
    if int(i) == bad:
      raise ValueError(f"bad input {int(i)}")
    return np.float32(i)
  return jax.jit(lambda i: jax.experimental.io_callback(
      callback, jax.ShapeDtypeStruct((), jnp.float32), i))


def test_at_most_limit_steps_stay_unfinished_and_drain_waits_for_all():
  pending = InFlight("demo", limit=3)
  seen = []
  for i in range(10):
    pending.add(f"step {i}", jnp.full((4,), i) * 2)
    seen.append(len(pending))
  assert max(seen) == 3 and pending.waits == 7
  pending.drain()
  assert len(pending) == 0 and pending.waits == 10


@pytest.mark.parametrize("limit", [0, -1, 2.0])
def test_a_bad_limit_is_refused_by_value(limit):
  with pytest.raises(ValueError, match=repr(limit)):
    InFlight("demo", limit=limit)


def test_a_failing_step_is_named_in_one_line():
  f = _failing_at(3)
  pending = InFlight("demo loop", limit=2)
  with pytest.raises(StepFailedError) as raised:
    for i in range(6):
      with pending.naming(f"step {i}"):
        y = f(jnp.int32(i))
      pending.add(f"step {i}", y)
    pending.drain()
  message = str(raised.value)
  assert "\n" not in message and isinstance(raised.value, RunError)
  assert message.startswith("demo loop: step 3 failed on the device") and "bad input 3" in message


def _spy(monkeypatch):
  """Records, per loop name, how many steps were unfinished after each `add`."""
  sizes = {}
  original = InFlight.add

  def add(self, label, outputs):
    original(self, label, outputs)
    sizes.setdefault(self.what.split(" ")[0], []).append(len(self))
  monkeypatch.setattr(InFlight, "add", add)
  return sizes


def test_training_and_evaluation_keep_a_bounded_number_of_steps_in_flight(
    test_config, tmp_path, monkeypatch):
  from effjax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  sizes = _spy(monkeypatch)
  cfg = dataclasses.replace(
      test_config, data=dataclasses.replace(test_config.data, eval_batches=12,
                                            final_eval_batches=12),
      train=dataclasses.replace(test_config.train, num_steps=10, log_every=10, eval_every=10,
                                checkpoint_every=10))
  train_and_evaluate(cfg, str(tmp_path / "run"))
  # one add per train step and per evaluated batch (step 0 and step 10), never over the limit
  assert len(sizes["training"]) == 10 and len(sizes["evaluation"]) == 24
  for name, seen in sizes.items():
    assert max(seen) == inflight.DEFAULT_LIMIT, (name, seen)


def test_an_evaluation_batch_that_fails_names_the_split_step_and_batch(test_config):
  from effjax.parallel import build_mesh  # pylint: disable=g-import-not-at-top
  from effjax.train import evaluation  # pylint: disable=g-import-not-at-top
  mesh = build_mesh(test_config.mesh)
  calls = []
  bad = _failing_at(2)

  def eval_step(params, model_state, batch):
    del params, model_state
    n = len(calls)
    calls.append(n)
    return {"nll_sum": bad(jnp.int32(n)), "tokens": jnp.sum(batch["segment_ids"] > 0),
            "bytes": jnp.float32(1.0)}
  with pytest.raises(StepFailedError, match=r"^evaluation of the 'validation' split after step "
                     r"7: batch 2 of 5 failed on the device: .*bad input 2"):
    evaluation.evaluate(eval_step, {}, {}, test_config, mesh, max_batches=5, step=7)
