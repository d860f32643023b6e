"""Multi-process start-up flags and the ahead-of-time sizing check (the multi-process drill
itself is tests/test_multiprocess.py)."""
import os
import re
import subprocess
import sys

import jax
import pytest

from effjax.optim import adamw
from effjax.parallel import build_mesh, distributed
from effjax.config import MeshConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="cluster"), r"--distributed='cluster' is not one of"),
    (dict(mode="manual", coordinator_address="10.0.0.1:1234"),
     r"needs --num_processes, --process_id"),
    (dict(mode="manual", coordinator_address="host", num_processes=2, process_id=0),
     r"--coordinator_address='host' must be host:port"),
    (dict(mode="manual", coordinator_address="h:1", num_processes=2, process_id=2),
     r"--process_id=2 must be in \[0, --num_processes=2\)"),
    (dict(mode="off", num_processes=4), r"only used with --distributed=manual"),
])
def test_bad_distributed_flags_name_the_value(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.DistributedConfig(**kwargs)


def test_off_is_a_no_op_for_a_single_process():
  assert distributed.initialize(distributed.DistributedConfig()) is False
  assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_state_bytes_per_device_follows_the_sharding(test_config):
  from effjax.models.decoder_lm import DecoderLM
  from effjax.train import step as step_lib
  model = DecoderLM(test_config.model)
  tx = adamw.make_optimizer(test_config.optim, 10)

  def per_device(**degrees):
    mesh = build_mesh(MeshConfig(**{"data": 1, **degrees}), jax.devices()[:4])
    abstract, _ = step_lib.abstract_train_state(model, tx, mesh, 0, test_config.data.seq_len)
    return step_lib.state_bytes_per_device(abstract), abstract

  replicated, abstract = per_device(data=4)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  assert replicated == total  # pure data parallelism: every device holds everything
  sharded, _ = per_device(fsdp=4)
  assert total / 4 <= sharded < total / 2  # embed-sharded weights and moments; norms replicated


def _aot(*args):
  return subprocess.run([sys.executable, "-m", "experiments.aot_check", "--config=configs/lm.py:test",
                         *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, XLA_FLAGS=""))


@pytest.mark.drill  # minutes of training; `make test-drills` (CI) runs it
def test_aot_check_compiles_for_a_bigger_mesh_and_reports_memory():
  ok = _aot("--num_devices=16", "--config.mesh.data=4", "--config.mesh.fsdp=4",
            "--config.train.global_batch_size=16")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "{'data': 4, 'fsdp': 4, 'tensor': 1, 'expert': 1}" in ok.stdout
  state = float(re.search(r"state per device \(exact\)\s+([\d.,]+) MiB", ok.stdout).group(1))
  temp = float(re.search(r"temp per device \(CPU compiler\)\s+([\d.,]+) MiB", ok.stdout).group(1))
  assert state > 0 and temp > 0
  bad = _aot("--num_devices=16", "--config.mesh.data=16", "--config.train.global_batch_size=8")
  assert bad.returncode != 0
  assert "train.global_batch_size=8 is not divisible by the 16 data-parallel shards" in bad.stderr
