"""The trainer's contract under faults and bad input: nothing non-finite or foreign is ever
checkpointed or resumed, one run per workdir, no silent fresh start, one-line errors."""
import dataclasses
import errno
import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from effjax.optim import adamw
from effjax import errors
from effjax.train import checkpoint as checkpoint_lib
from effjax.train import guards
from effjax.train import step as step_lib
from effjax.train import workdir as workdir_lib
from effjax.train.checkpoint import Checkpointer, IncompatibleCheckpointError
from effjax.train.checkpoint import load_checkpoint
from effjax.train.loop import NonFiniteError, train_and_evaluate
from effjax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _replace(cfg, section, **values):
  return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


def _short(cfg, **train):
  cfg = _replace(cfg, "optim", warmup_steps=1)
  return _replace(cfg, "train", **{"num_steps": 6, "log_every": 1, "checkpoint_every": 2,
                                   "eval_every": 0, **train})


def _files(directory):
  return {f: open(f, "rb").read() for f in glob.glob(os.path.join(directory, "**", "*"),
                                                     recursive=True) if os.path.isfile(f)}


def _assert_every_checkpoint_finite(cfg, workdir):
  steps = Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
  assert steps
  for step in steps:  # restore each one in turn as the newest
    keep = {s for s in steps if s <= step}
    cut = str(workdir) + f".upto{step}"
    os.makedirs(os.path.join(cut, "checkpoints"))
    for s in keep:
      os.symlink(os.path.join(workdir, "checkpoints", str(s)), os.path.join(cut, "checkpoints", str(s)))
    restored_step, state, _ = load_checkpoint(cfg, cut)
    assert restored_step == step
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.model_state)):
      if np.issubdtype(leaf.dtype, np.inexact):
        assert np.isfinite(np.asarray(leaf)).all(), f"non-finite array in checkpoint {step}"


# --- 1. a non-finite step is never checkpointed -------------------------------------------

def test_update_that_overflows_the_weights_is_caught_before_its_checkpoint(test_config, tmp_path):
  """The loss of step s is computed before its update, so a finite loss can still leave NaN
  weights behind; the guard checks the gradient and the updated state too."""
  cfg = _short(_replace(test_config, "optim", learning_rate=1e30, warmup_steps=0),
               checkpoint_every=1, num_steps=8)
  workdir = str(tmp_path / "run")
  with pytest.raises(NonFiniteError, match=r"not finite at step (\d).*last checkpoint \(step "
                                           r"\d\) .* untouched") as info:
    train_and_evaluate(cfg, workdir)
  assert isinstance(info.value, errors.RunError)
  _assert_every_checkpoint_finite(cfg, workdir)


def test_skipping_a_nonfinite_update_keeps_the_state_and_advances_the_step(test_config):
  from effjax.models.decoder_lm import DecoderLM  # pylint: disable=g-import-not-at-top
  from effjax.parallel import build_mesh  # pylint: disable=g-import-not-at-top
  cfg = _replace(test_config, "optim", learning_rate=1e30, warmup_steps=0)
  mesh = build_mesh(cfg.mesh, jax.devices()[:1])
  model = DecoderLM(cfg.model)
  tx = adamw.make_optimizer(cfg.optim, cfg.train.num_steps)
  lr_fn = adamw.learning_rate_fn(cfg.optim, cfg.train.num_steps)
  state, _ = step_lib.create_train_state(model, tx, mesh, 0, cfg.data.seq_len)
  tokens = np.random.default_rng(0).integers(0, 256, (2, cfg.data.seq_len + 1)).astype(np.int32)
  batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
           "positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).astype(np.int32)}
  state, metrics = jax.jit(step_lib.make_train_step(model, tx, lr_fn))(state, batch)
  assert int(metrics["nonfinite"]) == 0  # weights of about 1e30: still finite
  before = jax.device_get(state)
  for skip in (False, True):
    new, metrics = jax.jit(step_lib.make_train_step(model, tx, lr_fn, skip_nonfinite=skip))(
        state, batch)
    assert int(metrics["nonfinite"]) != 0
    assert int(new.step) == int(before.step) + 1
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(new.params)),
                                                     jax.tree.leaves(before.params)))
    assert same == skip


def test_max_skipped_nonfinite_stops_after_that_many_in_a_row(test_config, tmp_path):
  cfg = _short(_replace(test_config, "optim", learning_rate=1e30, warmup_steps=0),
               checkpoint_every=1, num_steps=12, max_skipped_nonfinite=3)
  workdir = str(tmp_path / "run")
  with pytest.raises(NonFiniteError, match=r"3 steps in a row up to step (\d+)"):
    train_and_evaluate(cfg, workdir)
  metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert max(m.get("skipped_nonfinite", 0) for m in metrics.values()) >= 1
  _assert_every_checkpoint_finite(cfg, workdir)


# --- 2. one run per workdir ----------------------------------------------------------------

def test_second_run_on_a_locked_workdir_is_refused_naming_the_holder(test_config, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  holder = workdir_lib.RunLock(workdir)
  holder.acquire()
  try:
    with pytest.raises(errors.WorkdirError, match=rf"in use by another run: pid {os.getpid()} "
                                                  r"on host"):
      train_and_evaluate(_short(test_config), workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  finally:
    holder.release()


def test_stale_lock_of_a_dead_run_is_taken_over(test_config, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE), "w") as f:  # left by a kill -9
    json.dump({"host": "node7", "pid": 999999, "since": "earlier"}, f)
  with caplog.at_level(logging.WARNING):
    train_and_evaluate(_short(test_config, num_steps=2), workdir)
  assert "Taking over the lock" in caplog.text and "pid 999999 on host node7" in caplog.text
  assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2]


# --- 3. a checkpoint knows what it is --------------------------------------------------------

def test_same_shapes_different_model_is_refused_by_field_name(test_config, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _short(test_config, num_steps=2)
  train_and_evaluate(cfg, workdir)
  before = _files(os.path.join(workdir, "checkpoints"))
  fewer_heads = _replace(cfg, "model", num_heads=2, num_kv_heads=1, head_dim=8)
  with pytest.raises(IncompatibleCheckpointError,
                     match=r"model\.num_heads 4 -> 2.*model\.num_kv_heads 2 -> 1"):
    train_and_evaluate(_replace(fewer_heads, "train", num_steps=4), workdir)
  assert _files(os.path.join(workdir, "checkpoints")) == before


def test_accepted_changes_are_named_in_the_warning(test_config, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  cfg = _short(test_config, num_steps=2)
  train_and_evaluate(cfg, workdir)
  more = _replace(_replace(cfg, "train", num_steps=4), "optim", learning_rate=1e-3)
  with caplog.at_level(logging.WARNING):
    train_and_evaluate(more, workdir)
  assert "optim.learning_rate 0.003 -> 0.001" in caplog.text
  assert "train.num_steps 2 -> 4" in caplog.text
  assert os.path.exists(os.path.join(workdir, "config.resumed_at_2.json"))


def test_identity_covers_model_and_optimizer_structure_not_cadences(test_config):
  identity = checkpoint_lib.config_identity(test_config)
  assert "model.num_heads" in identity and "optim.grad_clip > 0" in identity
  assert "model.attention_impl" not in identity and "optim.learning_rate" not in identity
  assert not any(k.startswith(("train.num_steps", "train.log_every", "mesh.")) for k in identity)


# --- 4. no silent fresh start ------------------------------------------------------------------

def _remove_checkpoints(checkpoint_dir):
  for step in Checkpointer(checkpoint_dir).all_steps():
    shutil.rmtree(os.path.join(checkpoint_dir, str(step)))


def _corrupt(checkpoint_dir):
  for f in glob.glob(os.path.join(checkpoint_dir, "**", "*"), recursive=True):
    if os.path.isfile(f) and os.path.getsize(f) > 1000:
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 3)


def test_run_killed_before_its_first_checkpoint_starts_over_with_a_marker(test_config, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _short(test_config, num_steps=4)
  train_and_evaluate(cfg, workdir)
  _remove_checkpoints(os.path.join(workdir, "checkpoints"))  # as if no save had completed
  train_and_evaluate(cfg, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.read().count('"event": "fresh_start"') == 2
  assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2, 4]


@pytest.mark.parametrize("damage", ["all_checkpoints_unreadable", "checkpoints_deleted"])
def test_lost_progress_is_refused_unless_start_over(damage, test_config, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _short(test_config, num_steps=4)
  train_and_evaluate(cfg, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  if damage == "checkpoints_deleted":
    shutil.rmtree(ckpts)
    expected = r"records training up to step 4 but its checkpoints/ directory is missing"
  else:
    _corrupt(ckpts)
    expected = r"every checkpoint of it is unreadable"
  with pytest.raises(errors.WorkdirError, match=expected + r".*--start_over"):
    train_and_evaluate(cfg, workdir)
  assert not Checkpointer(ckpts).all_steps()  # nothing new was written
  train_and_evaluate(cfg, workdir, start_over=True)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert '"event": "fresh_start"' in f.read()
  assert sorted(read_metrics(os.path.join(workdir, "metrics.jsonl"))) == [0, 1, 2, 3, 4]
  if damage == "all_checkpoints_unreadable":  # acknowledged by the fresh start, not refused
    _remove_checkpoints(ckpts)  # again after a later crash before the first checkpoint
    train_and_evaluate(cfg, workdir)
    assert Checkpointer(ckpts).all_steps() == [2, 4]


# --- 5 and 10. known failures: one clear error, nothing written ---------------------------------

def test_known_failures_raise_run_errors_naming_the_value(test_config, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  cases = [
      (_replace(test_config, "train", global_batch_size=6), str(tmp_path / "w1"),
       errors.ConfigError, r"global_batch_size=6"),
      (_replace(test_config, "mesh", data=3), str(tmp_path / "w2"), errors.ConfigError,
       r"mesh degrees"),
      (_replace(test_config, "data", dataset="no_such_corpus"), str(tmp_path / "w3"),
       errors.ConfigError, r"'no_such_corpus' is not a TFDS dataset"),
      (_replace(test_config, "data", data_dir=str(a_file)), str(tmp_path / "w4"),
       errors.DatasetUnavailableError, r"data_dir=.*a_file' is a file"),
      (test_config, str(a_file), errors.WorkdirError, r"a_file is a file"),
      (test_config, str(a_file / "sub"), errors.WorkdirError, r"cannot be created"),
  ]
  for cfg, workdir, kind, message in cases:
    with pytest.raises(kind, match=message):
      train_and_evaluate(_short(cfg), workdir, devices=jax.devices()[:4])


@pytest.mark.drill  # minutes of training; `make test-drills` (CI) runs it
def test_step_beyond_device_memory_is_refused_before_training(test_config, tmp_path):
  workdir = str(tmp_path / "run")
  huge = _replace(_short(test_config), "data", seq_len=1 << 17)  # [8, 4, L, L] attention scores
  with pytest.raises(errors.ConfigError, match=r"needs .* GiB per device .*data\.seq_len=131072"):
    train_and_evaluate(huge, workdir, devices=jax.devices()[:1])
  assert not Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
  # the failed first run's config.json does not push the next run's config aside
  good = _short(test_config, num_steps=2)
  train_and_evaluate(good, workdir, devices=jax.devices()[:1])
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["data"]["seq_len"] == good.data.seq_len
  assert not glob.glob(os.path.join(workdir, "config.resumed_at_*"))


def test_full_disk_on_save_is_one_error_and_older_checkpoints_stay(test_config, tmp_path,
                                                                   monkeypatch):
  workdir = str(tmp_path / "run")
  cfg = _short(test_config, num_steps=4)
  original = Checkpointer.save

  def save(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return original(self, step, *args, **kwargs)
  monkeypatch.setattr(Checkpointer, "save", save)
  with pytest.raises(errors.WorkdirError, match=r"checkpoint at step 4 .*No space left on "
                                                r"device.*kept \(\[2\]\)"):
    train_and_evaluate(cfg, workdir)
  monkeypatch.setattr(Checkpointer, "save", original)
  assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2]
  train_and_evaluate(cfg, workdir)  # resumes from step 2 once there is space again
  assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2, 4]


def test_garbage_config_json_is_kept_aside_not_fatal(test_config, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _short(test_config, num_steps=2)
  train_and_evaluate(cfg, workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("{ not json")
  train_and_evaluate(_replace(cfg, "train", num_steps=4), workdir)
  kept = glob.glob(os.path.join(workdir, "config.json.unreadable.*"))
  assert len(kept) == 1 and open(kept[0]).read() == "{ not json"
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["num_steps"] == 4


def test_nothing_to_do_returns_without_compiling(test_config, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  cfg = _short(test_config, num_steps=2)
  train_and_evaluate(cfg, workdir)

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled although the run is complete")
  monkeypatch.setattr(step_lib, "compile_steps", no_compile)
  last = train_and_evaluate(cfg, workdir)
  assert last["train_loss"] == read_metrics(os.path.join(workdir, "metrics.jsonl"))[2]["train_loss"]


# --- the command line ------------------------------------------------------------------------

def _cli(args, cwd, timeout=180):
  exe = os.path.join(os.path.dirname(sys.executable), "effjax-train")
  cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "experiments.train"]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_help_exits_zero_and_explains_overrides(tmp_path):
  out = _cli(["--help"], cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert "--config.SECTION.FIELD=VALUE" in out.stdout and "start_over" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--config=configs/nope.py:tiny"], r"^config error: --config=configs/nope.py:tiny: no such "
                                        r"file 'configs/nope.py'"),
    (["--config=configs/lm.py:huge"], r"^config error: ValueError: unknown variant 'huge'"),
    (["--config=configs/lm.py:test", "--config.mesh.data=4"],
     r"^error: mesh degrees .* multiply to 4"),
])
def test_cli_failures_are_one_line_from_any_directory(args, message, tfds_dir, tmp_path):
  out = _cli(args + [f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={tfds_dir}"],
             cwd=tmp_path)
  assert out.returncode == 1
  lines = [l for l in out.stderr.splitlines() if l and not l[0] in "IW"]  # drop log lines
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
  assert __import__("re").search(message, lines[0]), lines[0]


@pytest.mark.slow
def test_cli_trains_from_another_directory_with_readable_logs(tfds_dir, tmp_path):
  out = _cli(["--config=configs/lm.py:test", f"--workdir={tmp_path / 'run'}",
              f"--config.data.data_dir={tfds_dir}", "--config.train.num_steps=40",
              "--config.train.log_every=1", "--config.train.checkpoint_every=10"], cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  info = [l for l in out.stderr.splitlines() if l.startswith("I")]
  own = [l for l in info if l.split()[3].split(":")[0] in
         {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "effjax", "**", "*.py"),
                                                 recursive=True)}]
  assert len(info) >= 40 and own == info, [l for l in info if l not in own][:5]


@pytest.mark.slow
def test_two_first_runs_prepare_the_corpus_once_without_colliding(tmp_path):
  data_dir = str(tmp_path / "fresh_tfds")
  code = ("import sys; from effjax.config import DataConfig; from effjax.data import pipeline; "
          "b = pipeline.get_builder(DataConfig(data_dir=sys.argv[1])); "
          "print(b.info.splits['train'].num_examples)")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", code, data_dir], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [r[1][-1500:] for r in results]
  counts = [out.split()[-1] for out, _ in results]
  assert counts[0] == counts[1] and int(counts[0]) > 0
  assert sum("Downloading and preparing" in out + err for out, err in results) == 1  # once


def _popen_cli(args, log_path):
  exe = os.path.join(os.path.dirname(sys.executable), "effjax-train")
  cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "experiments.train"]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.Popen(cmd + args, cwd=REPO, env=env, stdout=open(log_path, "w"),
                          stderr=subprocess.STDOUT)


def _wait_for_text(proc, log_path, text, timeout=240.0):
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.monotonic() + timeout
  while text not in open(log_path).read():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"{text!r} never appeared: {open(log_path).read()[-2000:]}")
    time.sleep(0.005)


@pytest.mark.slow
def test_sigterm_during_compilation_exits_cleanly_and_leaves_the_workdir(tfds_dir, tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  workdir, log = str(tmp_path / "early"), str(tmp_path / "early.log")
  proc = _popen_cli(["--config=configs/lm.py:test", f"--config.data.data_dir={tfds_dir}",
                     f"--workdir={workdir}"], log)
  _wait_for_text(proc, log, "mesh {")  # handlers are in place; compilation comes next
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, open(log).read()[-2000:]
  assert "Stopped before the first step" in open(log).read()
  assert not Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()


def test_first_ctrl_c_asks_for_a_save_and_the_second_aborts():
  import signal  # pylint: disable=g-import-not-at-top
  flag = guards.StopFlag(multi_process=False)  # pylint: disable=protected-access
  flag(signal.SIGINT, None)
  assert flag.requested
  with pytest.raises(KeyboardInterrupt):
    flag(signal.SIGINT, None)
  flag = guards.StopFlag(multi_process=False)  # pylint: disable=protected-access
  flag(signal.SIGTERM, None)
  flag(signal.SIGTERM, None)  # SIGTERM repeated (a scheduler's retry) still saves
  assert flag.requested
