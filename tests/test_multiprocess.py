"""Two real processes on localhost (gloo CPU collectives), each with 2 simulated CPU devices,
running the real entry point `python -m experiments.train --distributed=manual ...`.

One drill covers: distributed start-up, per-process data shares, a consistent multi-process
checkpoint after SIGTERM reaches only one process, resume, and equality with one process
driving the same 4-device mesh on the same global batches.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from effjax.optim import adamw
from effjax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Long enough that the preemption agreement (about a second of wall time) lands inside the run,
# short enough that float reduction-order differences between gloo's cross-process all-reduce
# and the in-process one stay far below the tolerance (they grow with steps: ~1e-6 by step 100).
NUM_STEPS = 120
LOG_EVERY = 5
LAUNCH_TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _overrides(tfds_dir):
  return [f"--config.data.data_dir={tfds_dir}", f"--config.train.num_steps={NUM_STEPS}",
          f"--config.train.log_every={LOG_EVERY}", "--config.train.eval_every=0",
          "--config.train.checkpoint_every=0", "--config.mesh.data=2", "--config.mesh.fsdp=2"]


def _launch(workdir, tfds_dir):
  """Starts both processes; returns the Popen objects (stdout+stderr to files in workdir)."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs = []
  for pid in range(2):
    log = open(os.path.join(workdir, f"process_{pid}.log"), "ab")
    cmd = [sys.executable, "-m", "experiments.train", "--config=configs/lm.py:test",
           f"--workdir={workdir}", "--distributed=manual",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={pid}", *_overrides(tfds_dir)]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log))
  return procs


def _tail(workdir, pid, n=3000):
  with open(os.path.join(workdir, f"process_{pid}.log"), "rb") as f:
    return f.read()[-n:].decode(errors="replace")


def _wait(procs, workdir, *, on_poll=None):
  """Waits for both; a hung or failed peer becomes a test failure with both logs."""
  deadline = time.monotonic() + LAUNCH_TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline:
        pytest.fail(f"processes still running after {LAUNCH_TIMEOUT_S}s:\n"
                    + "\n".join(_tail(workdir, i) for i in range(2)))
      if on_poll is not None:
        on_poll()
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  codes = [p.returncode for p in procs]
  assert codes == [0, 0], f"exit codes {codes}:\n" + "\n".join(_tail(workdir, i)
                                                                 for i in range(2))


def _losses(workdir):
  metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return {s: m["train_loss"] for s, m in metrics.items() if "train_loss" in m}


def _single_process_losses(cfg):
  """One process, 4 of the simulated devices, the global batches the 2 processes assemble:
  process p contributes its own data share's batch as rows [4p, 4p + 4)."""
  from effjax.data import pipeline
  from effjax.models.decoder_lm import DecoderLM
  from effjax.parallel import build_mesh, logical_sharding
  from effjax.train import step as step_lib
  mesh = build_mesh(cfg.mesh, jax.devices()[:4])
  model = DecoderLM(cfg.model)
  tx = adamw.make_optimizer(cfg.optim, cfg.train.num_steps)
  lr_fn = adamw.learning_rate_fn(cfg.optim, cfg.train.num_steps)
  state, shardings = step_lib.create_train_state(model, tx, mesh, cfg.train.seed, cfg.data.seq_len)
  train_step, _ = step_lib.compile_steps(model, tx, lr_fn, mesh, state, shardings,
                                         (cfg.train.global_batch_size, cfg.data.seq_len + 1))
  per_process = cfg.train.global_batch_size // 2
  shards = [iter(pipeline.packed_dataset(cfg.data, cfg.data.train_split, batch_size=per_process,
                                         seed=cfg.train.seed, train=True, shard=(p, 2)))
            for p in range(2)]
  sharding = logical_sharding(mesh, ("batch", "length"))
  losses = {}
  for step in range(1, cfg.train.num_steps + 1):
    parts = [next(it) for it in shards]
    batch = {k: jax.device_put(np.concatenate([p[k] for p in parts]), sharding)
             for k in parts[0]}
    state, metrics = train_step(state, batch)
    if step % LOG_EVERY == 0 or step == cfg.train.num_steps:
      losses[step] = float(jax.block_until_ready(metrics["train_loss"]))
  return losses


@pytest.mark.drill  # two real processes for minutes: `make test-drills` (CI runs it)
def test_two_processes_preempted_and_resumed_match_one_process(test_config, tfds_dir, tmp_path):
  import dataclasses
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  sent = []

  def preempt_process_1_once_training():  # SIGTERM to one process only, mid-run
    if sent or not os.path.exists(metrics_path):
      return
    if any("train_loss" in json.loads(line) for line in open(metrics_path)):
      procs[1].send_signal(signal.SIGTERM)
      sent.append(time.monotonic())

  procs = _launch(workdir, tfds_dir)
  _wait(procs, workdir, on_poll=preempt_process_1_once_training)
  assert sent, "training never logged a step before the run ended"
  stopped_at = max(_losses(workdir))
  assert stopped_at < NUM_STEPS, "the preemption was not acted on before the end of the run"
  ckpt_steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                      if d.isdigit())
  assert ckpt_steps == [stopped_at], "expected one checkpoint, at the agreed stop step"
  assert "save at step" in _tail(workdir, 0, 200_000)  # process 0 acted on process 1's signal
  with open(os.path.join(workdir, "checkpoints", str(stopped_at), "data", "metadata")) as f:
    assert len(json.load(f)["processes"]) == 2  # each process's own data position is stored

  procs = _launch(workdir, tfds_dir)  # resume from the agreed step, to the end
  _wait(procs, workdir)
  resumed = _losses(workdir)
  assert max(resumed) == NUM_STEPS

  cfg = dataclasses.replace(
      test_config,
      train=dataclasses.replace(test_config.train, num_steps=NUM_STEPS),
      mesh=dataclasses.replace(test_config.mesh, data=2, fsdp=2))
  expected = _single_process_losses(cfg)
  common = sorted(set(expected) & set(resumed))
  assert len(common) >= NUM_STEPS // LOG_EVERY - 1
  np.testing.assert_allclose([resumed[s] for s in common], [expected[s] for s in common],
                             rtol=1e-5)
