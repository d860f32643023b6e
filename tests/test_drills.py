"""Kill drills on the real command line: a run killed at awkward moments (mid-step, during an
async checkpoint write, at its rename, during an evaluation), stopped by SIGTERM and by Ctrl-C,
and resumed each time, logs exactly what one uninterrupted run logs: every train loss, learning
rate and eval value, bit for bit.

Marked `drill` (minutes, not seconds): `make test-drills` runs them, and so does CI."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from effjax.train.metrics import read_metrics

pytestmark = pytest.mark.drill

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY_CKPT, EVERY_EVAL = 40, 5, 10


def _launch(workdir, tfds_dir):
  """The real entry point; its log goes to WORKDIR.log (a pipe could fill and block it)."""
  cmd = [sys.executable, "-m", "experiments.train", "--config=configs/lm.py:test",
         f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}",
         f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
         f"--config.train.checkpoint_every={EVERY_CKPT}",
         f"--config.train.eval_every={EVERY_EVAL}", "--config.train.async_checkpointing=True"]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  log = open(workdir + ".log", "a")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _log(workdir):
  with open(workdir + ".log") as f:
    return f.read()


def _wait(proc, workdir, ready, what, timeout=240.0):
  deadline = time.monotonic() + timeout
  while not ready():
    if proc.poll() is not None:
      raise AssertionError(f"run exited ({proc.returncode}) before {what}: {_log(workdir)[-3000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"no {what} within {timeout}s: {_log(workdir)[-3000:]}")
    time.sleep(0.001)


def _checkpoint_entries(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return os.listdir(directory) if os.path.isdir(directory) else []


def _logged_step(workdir):
  metrics = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(metrics):
    return 0
  with open(metrics, encoding="utf-8") as f:
    lines = f.read().split("\n")
  # the last piece is the line the run may be writing right now: read only finished lines
  steps = [json.loads(l)["step"] for l in lines[:-1] if '"train_loss"' in l]
  return max(steps, default=0)


def _trigger(point, workdir):
  """A predicate that turns true at the moment to strike, in a run resumed from step `base`."""
  base = _logged_step(workdir)
  if point == "async_save":  # orbax is writing into a temporary directory
    return lambda: any("tmp" in e for e in _checkpoint_entries(workdir))
  if point == "rename":  # the moment a new step directory appears under its final name
    existing = {e for e in _checkpoint_entries(workdir) if e.isdigit()}
    return lambda: any(e.isdigit() and e not in existing for e in _checkpoint_entries(workdir))
  if point == "eval":  # the train step before an eval has been logged; evaluation runs now
    target = (base // EVERY_EVAL + 1) * EVERY_EVAL
    return lambda: f"step {target}/{STEPS} |" in _log(workdir)
  if point in ("mid_step", "sigterm", "sigint"):
    return lambda: _logged_step(workdir) >= base + 3
  raise ValueError(point)


@pytest.mark.slow
def test_kill_drill_reproduces_the_uninterrupted_run_bit_for_bit(tfds_dir, tmp_path):
  straight = str(tmp_path / "straight")
  proc = _launch(straight, tfds_dir)
  assert proc.wait(timeout=600) == 0, _log(straight)[-3000:]

  drill = str(tmp_path / "drill")
  record = []
  for point in ("async_save", "eval", "mid_step", "rename", "sigterm", "async_save", "sigint"):
    proc = _launch(drill, tfds_dir)
    try:
      _wait(proc, drill, _trigger(point, drill), point)
      on_disk = sorted(_checkpoint_entries(drill))
      sig = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}.get(point, signal.SIGKILL)
      proc.send_signal(sig)
      code = proc.wait(timeout=120)
    finally:
      proc.kill()
    record.append({"kill": point, "signal": sig.name, "exit": code,
                   "checkpoints_at_kill": on_disk, "logged_step": _logged_step(drill)})
    if sig != signal.SIGKILL:  # a clean stop saves where it stopped and exits 0
      assert code == 0, _log(drill)[-3000:]
      assert str(_logged_step(drill)) in _checkpoint_entries(drill)
  proc = _launch(drill, tfds_dir)
  assert proc.wait(timeout=600) == 0, _log(drill)[-3000:]
  print(json.dumps(record, indent=1))

  want = read_metrics(os.path.join(straight, "metrics.jsonl"))
  got = read_metrics(os.path.join(drill, "metrics.jsonl"))
  keys = ("train_loss", "learning_rate", "grad_norm", "eval_loss", "eval_bpb")
  assert sorted(s for s in got if "train_loss" in got[s]) == list(range(1, STEPS + 1))
  for step, expected in want.items():
    for key in keys:
      if key in expected:
        assert got[step][key] == expected[key], (step, key)  # exact, not approximate
  assert any(r["kill"] == "rename" for r in record) and len(record) >= 5
