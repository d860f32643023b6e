import dataclasses
import glob
import os
import shutil

import numpy as np
import pytest

from effjax.train.checkpoint import CORRUPT_DIR, Checkpointer, IncompatibleCheckpointError
from effjax.train.loop import NonFiniteLossError, train_and_evaluate
from effjax.train.metrics import read_metrics



def _with(cfg, **train):
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def _losses(workdir):
  metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return {s: m["train_loss"] for s, m in sorted(metrics.items()) if "train_loss" in m}


def test_stop_and_resume_reproduces_uninterrupted_losses_bit_exactly(test_config, tmp_path):
  cfg = _with(test_config, num_steps=8, log_every=1, checkpoint_every=3)
  straight = str(tmp_path / "straight")
  train_and_evaluate(cfg, straight)
  resumed = str(tmp_path / "resumed")
  train_and_evaluate(cfg, resumed, should_stop=lambda step: step == 5)
  assert max(_losses(resumed)) == 5
  assert sorted(Checkpointer(os.path.join(resumed, "checkpoints")).all_steps()) == [3, 5]
  train_and_evaluate(cfg, resumed)
  assert _losses(resumed) == _losses(straight)  # exact float equality, data order included
  final = read_metrics(os.path.join(resumed, "metrics.jsonl"))[8]
  assert final["eval_loss"] == read_metrics(os.path.join(straight, "metrics.jsonl"))[8]["eval_loss"]


def test_corrupt_latest_checkpoint_falls_back_to_previous(test_config, tmp_path):
  cfg = _with(test_config, num_steps=6, log_every=1, checkpoint_every=2, keep_checkpoints=3)
  workdir = str(tmp_path / "run")
  train_and_evaluate(cfg, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert Checkpointer(ckpt_dir).all_steps() == [2, 4, 6]
  # truncate every data file of the newest checkpoint's train state
  files = [f for f in glob.glob(os.path.join(ckpt_dir, "6", "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and os.path.getsize(f) > 1000]
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 3)
  expected = _losses(workdir)
  train_and_evaluate(cfg, workdir)  # resumes from step 4 and redoes steps 5 and 6
  moved = glob.glob(os.path.join(workdir, CORRUPT_DIR, "6.*"))
  assert len(moved) == 1  # reported and kept, not deleted
  metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert _losses(workdir) == expected
  assert Checkpointer(ckpt_dir).all_steps() == [2, 4, 6]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert '{"step": 4, "event": "resumed"}' in f.read()
  assert metrics[6]["train_loss"] == expected[6]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(test_config, tmp_path):
  workdir = str(tmp_path / "run")
  good = _with(test_config, num_steps=8, log_every=1, checkpoint_every=4)
  train_and_evaluate(good, workdir, should_stop=lambda step: step == 4)
  ckpt = os.path.join(workdir, "checkpoints", "4")
  before = {f: open(f, "rb").read() for f in glob.glob(os.path.join(ckpt, "**", "*"),
                                                         recursive=True) if os.path.isfile(f)}
  # An absurd learning rate overflows the weights, so a later loss is not finite.
  exploding = dataclasses.replace(good, optim=dataclasses.replace(good.optim, learning_rate=1e38,
                                                                  warmup_steps=0))
  with pytest.raises(NonFiniteLossError, match=r"not finite at step [5-8] .*checkpoint \(step 4\) .* untouched"):
    train_and_evaluate(exploding, workdir)
  assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [4]
  after = {f: open(f, "rb").read() for f in before}
  assert after == before


def test_checkpoint_from_another_config_is_refused_not_moved(test_config, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _with(test_config, num_steps=4, checkpoint_every=4, eval_every=0)
  train_and_evaluate(cfg, workdir)
  wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_ff=96))
  with pytest.raises(IncompatibleCheckpointError, match=r"step 4 .*different model or optimizer: model\.d_ff 64 -> 96"):
    train_and_evaluate(wider, workdir)
  assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [4]
  assert not os.path.exists(os.path.join(workdir, CORRUPT_DIR))


def _moe_test_config(tfds_dir):
  from configs import moe  # pylint: disable=g-import-not-at-top  (conftest puts configs on the path)
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = moe.get_config("top2,test")
  c.data.data_dir = tfds_dir
  return config_lib.from_config_dict(c)


@pytest.mark.drill  # minutes of training; `make test-drills` (CI) runs it
@pytest.mark.parametrize("model, written_on, resumed_on", [
    ("dense", dict(fsdp=4), dict(data=2, fsdp=2)),
    ("moe", dict(expert=4), dict(data=2, expert=2)),  # the experts move between devices
])
def test_checkpoint_restores_onto_another_mesh_and_training_continues_the_same(
    model, written_on, resumed_on, test_config, tfds_dir, tmp_path):
  """Written on one mesh, resumed on another: the same losses as a run that never moved (up to
  float reduction order: the two meshes sum gradients in different orders)."""
  import jax
  base = test_config if model == "dense" else _moe_test_config(tfds_dir)
  cfg = _with(base, num_steps=8, log_every=1, checkpoint_every=4, eval_every=0)

  def on(degrees):
    return dataclasses.replace(cfg, mesh=dataclasses.replace(
        cfg.mesh, **{"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **degrees}))

  devices = jax.devices()[:4]
  unmoved = str(tmp_path / "unmoved")
  train_and_evaluate(on(written_on), unmoved, devices=devices)
  moved = str(tmp_path / "moved")  # the same run, cut back to its checkpoint at step 4
  shutil.copytree(unmoved, moved)
  shutil.rmtree(os.path.join(moved, "checkpoints", "8"))
  train_and_evaluate(on(resumed_on), moved, devices=devices)
  assert os.path.exists(os.path.join(moved, "config.resumed_at_4.json"))  # the mesh changed
  expected, got = _losses(unmoved), _losses(moved)
  assert sorted(got) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)],
                             rtol=1e-6)
