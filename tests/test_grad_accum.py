"""train.grad_accum_steps: k microbatches inside the one compiled step give the step of the
whole batch (effjax/train/step.py: accumulated_gradients)."""
import dataclasses
import os

import jax
import numpy as np
import pytest

from effjax.errors import ConfigError
from effjax.train import step as step_lib
from effjax.train.loop import train_and_evaluate
from effjax.train.metrics import read_metrics

STEPS = 20


def _with(cfg, model=None, optim=None, linear=None, moe=None, **train):
  m = cfg.model
  if linear:
    m = dataclasses.replace(m, linear=dataclasses.replace(m.linear, **linear))
  if moe:
    m = dataclasses.replace(m, ffn="moe", moe=dataclasses.replace(m.moe, **moe))
  m = dataclasses.replace(m, **(model or {}))
  o = dataclasses.replace(cfg.optim, **(optim or {}))
  t = dataclasses.replace(cfg.train, **{"num_steps": STEPS, "log_every": 1, "eval_every": 0,
                                        "checkpoint_every": 0, **train})
  return dataclasses.replace(cfg, model=m, optim=o, train=t)


def _losses(cfg, workdir):
  """Per-step train loss and gradient norm of a run on 2 devices (data-parallel)."""
  train_and_evaluate(cfg, workdir, devices=jax.devices()[:2])
  metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  steps = [s for s in sorted(metrics) if "train_loss" in metrics[s]]
  assert steps == list(range(1, STEPS + 1))
  return (np.array([metrics[s]["train_loss"] for s in steps]),
          np.array([metrics[s]["grad_norm"] for s in steps]))


METHODS = {
    "dense": {},
    "monarch": {"linear": {"kind": "monarch", "nblocks": 2}},
    "lora": {"linear": {"kind": "lora", "rank": 4}},
    "relora": {"linear": {"kind": "lora", "rank": 4, "relora_every": 5}},
    "sst": {"linear": {"kind": "sst", "rank": 4, "sst_every": 5}},
    "galore": {"optim": {"galore_rank": 4, "galore_every": 5}},
    # dropless top-k routes each token on its own; no auxiliary loss or bias, whose batch
    # statistics are combined per microbatch (accumulated_gradients)
    "moe_dropless": {"moe": {"num_experts": 4, "top_k": 2, "dispatch": "dropless",
                             "aux_loss_weight": 0.0, "z_loss_weight": 0.0}},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_four_microbatches_give_the_steps_of_the_whole_batch(method, test_config, tmp_path):
  cfg = _with(test_config, **METHODS[method])
  whole, whole_norm = _losses(cfg, str(tmp_path / "k1"))
  micro, micro_norm = _losses(_with(cfg, grad_accum_steps=4), str(tmp_path / "k4"))
  assert whole[-1] < whole[0]  # it trains: the comparison is of a moving trajectory
  np.testing.assert_allclose(micro, whole, rtol=1e-5)
  np.testing.assert_allclose(micro_norm, whole_norm, rtol=1e-5)


def test_microbatches_are_a_partition_that_keeps_each_devices_rows():
  """Row j*k + i goes to microbatch i: each microbatch takes the same share of every
  contiguous block of rows (a device's shard), and every row is used once."""
  batch = {"tokens": np.arange(16 * 3).reshape(16, 3)}
  micro = np.asarray(step_lib.microbatches(batch, 4)["tokens"])
  assert micro.shape == (4, 4, 3)
  rows = micro[..., 0] // 3  # the row each entry came from
  assert sorted(rows.ravel()) == list(range(16))
  for block in range(2):  # 2 devices of 8 rows each: 2 rows of each microbatch per device
    for i in range(4):
      assert np.sum((rows[i] >= 8 * block) & (rows[i] < 8 * (block + 1))) == 2


def test_an_moe_balancing_bias_moves_by_the_mean_of_its_microbatch_updates(test_config,
                                                                           tmp_path):
  """sigmoid_bias routing updates its selection bias by +-rate (or 0) per expert from each
  microbatch's expert load: with 4 microbatches a step moves it by the mean of those updates
  (a multiple of rate / 4, at most rate), not by their sum."""
  from effjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  rate, steps = 0.5, 3
  moe = {"num_experts": 4, "top_k": 2, "router": "sigmoid_bias", "dispatch": "dropless",
         "bias_rate": rate}
  biases = {}
  for k in (1, 4):
    workdir = str(tmp_path / f"k{k}")
    cfg = _with(test_config, moe=moe, grad_accum_steps=k, num_steps=steps)
    train_and_evaluate(cfg, workdir, devices=jax.devices()[:2])
    _, state, _ = checkpoint.load_checkpoint(cfg, workdir, devices=jax.devices()[:2])
    biases[k] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.model_state)])
  assert biases[1].size and np.any(biases[1] != 0)
  for k, bias in biases.items():
    assert np.all(np.abs(bias) <= steps * rate + 1e-6), k
    units = bias / (rate / k)  # k = 1: whole updates; k = 4: quarters of one
    np.testing.assert_allclose(units, np.round(units), atol=1e-4)
  assert np.any(np.abs(np.round(biases[4] / rate * 4)) % 4 != 0)  # some mean is a fraction


def test_a_microbatch_that_does_not_split_over_the_shards_is_refused(test_config, tmp_path):
  cfg = _with(test_config, grad_accum_steps=8)  # 8 rows: 1 per microbatch, 2 shards
  with pytest.raises(ConfigError, match=r"train.global_batch_size=8 does not split into "
                     r"train.grad_accum_steps=8 microbatches .* 2 data-parallel shards"):
    train_and_evaluate(cfg, str(tmp_path / "run"), devices=jax.devices()[:2])
  assert not os.path.exists(tmp_path / "run" / "checkpoints") or not os.listdir(
      tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("value, message", [
    (0, r"train.grad_accum_steps must be an integer >= 1, got 0"),
    (3, r"train.global_batch_size=8 is not divisible by train.grad_accum_steps=3"),
])
def test_bad_grad_accum_steps_are_named(value, message, test_config):
  with pytest.raises(ValueError, match=message):
    _with(test_config, grad_accum_steps=value)
