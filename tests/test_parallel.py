import dataclasses
import os

import jax
import pytest
from jax.sharding import PartitionSpec as P

from effjax.config import MeshConfig
from effjax.parallel import build_mesh, data_parallel_size, mesh_spec, resolve_degrees
from effjax.train.loop import train_and_evaluate
from effjax.train.metrics import read_metrics


@pytest.mark.parametrize("logical, expected", [
    (("embed", "mlp"), P("fsdp", "tensor")),  # MLP input weight
    (("mlp", "embed"), P("tensor", "fsdp")),
    (("embed", "heads"), P("fsdp", "tensor")),  # attention projections
    (("vocab", "embed"), P("tensor", "fsdp")),  # embedding
    (("norm",), P(None)),
    (("layers", "embed", "mlp"), P(None, "fsdp", "tensor")),  # scanned weights
    (("batch", "length", "embed"), P(("data", "fsdp", "expert"), None, None)),  # activations
    (("batch", "length", "vocab"), P(("data", "fsdp", "expert"), None, "tensor")),
    (("expert", "embed", "mlp"), P("expert", "fsdp", "tensor")),
])
def test_logical_rules_give_expected_partition_specs(logical, expected):
  assert mesh_spec(logical) == expected


def test_mesh_fill_axis_and_errors():
  assert resolve_degrees(MeshConfig(data=-1, tensor=2), 8) == dict(data=4, fsdp=1, tensor=2,
                                                                   expert=1)
  with pytest.raises(ValueError, match=r"multiply to 6, but there are 8 devices"):
    resolve_degrees(MeshConfig(data=3, fsdp=2), 8)
  with pytest.raises(ValueError, match="does not divide the 8 available devices"):
    resolve_degrees(MeshConfig(data=-1, tensor=3), 8)


def test_build_mesh_axes():
  mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=2, expert=1)
  assert data_parallel_size(mesh) == 4


@pytest.mark.drill  # minutes of training; `make test-drills` (CI) runs it
def test_one_device_and_eight_devices_give_the_same_losses(test_config, tmp_path):
  assert len(jax.devices()) >= 8, "conftest sets 8 simulated CPU devices"
  cfg = dataclasses.replace(
      test_config, train=dataclasses.replace(test_config.train, num_steps=6, log_every=1,
                                             eval_every=0, checkpoint_every=0))
  one = str(tmp_path / "one")
  train_and_evaluate(cfg, one, devices=jax.devices()[:1])
  sharded_cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
  eight = str(tmp_path / "eight")
  train_and_evaluate(sharded_cfg, eight)
  a = read_metrics(os.path.join(one, "metrics.jsonl"))
  b = read_metrics(os.path.join(eight, "metrics.jsonl"))
  losses_a = [a[s]["train_loss"] for s in range(1, 7)]
  losses_b = [b[s]["train_loss"] for s in range(1, 7)]
  assert losses_a[-1] < losses_a[0]  # it trains
  for x, y in zip(losses_a, losses_b):
    assert abs(x - y) <= 1e-4 * abs(x), (losses_a, losses_b)
