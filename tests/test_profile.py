"""train.profile_steps: a jax.profiler trace of chosen steps under WORKDIR/profile/."""
import dataclasses
import glob
import gzip
import json
import logging
import os

import jax
import pytest

from effjax import config as config_lib
from effjax.train import profiling
from effjax.train.loop import train_and_evaluate


def _with(cfg, **train):
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def _traces(workdir):
  """One entry per trace written, oldest first: (xplane bytes, annotated train step numbers)."""
  runs = sorted(glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*")))
  traces = []
  for run in runs:
    (xplane,) = glob.glob(os.path.join(run, "*.xplane.pb"))
    (events,) = glob.glob(os.path.join(run, "*.trace.json.gz"))
    with gzip.open(events, "rt") as f:
      steps = {int(e["args"]["step_num"]) for e in json.load(f)["traceEvents"]
               if e.get("name") == "train" and "step_num" in e.get("args", {})}
    with open(xplane, "rb") as f:
      traces.append((f.read(), steps))
  return traces


def test_profile_steps_trace_exactly_the_named_steps(test_config, tmp_path):
  workdir = str(tmp_path / "run")
  train_and_evaluate(_with(test_config, num_steps=6, profile_steps="2:4"), workdir)
  (trace,) = _traces(workdir)
  xplane, steps = trace
  assert b"train_step" in xplane  # the jitted step ran inside the trace
  assert steps == {2, 3}  # START..END-1, numbered from 1


def test_stopped_run_ends_its_trace_and_the_resumed_run_traces_what_is_left(test_config, tmp_path,
                                                                          caplog):
  cfg = _with(test_config, num_steps=6, checkpoint_every=2, profile_steps="3:6")
  workdir = str(tmp_path / "run")
  train_and_evaluate(cfg, workdir, should_stop=lambda step: step == 4)
  assert [steps for _, steps in _traces(workdir)] == [{3, 4}]
  with caplog.at_level(logging.INFO):
    train_and_evaluate(cfg, workdir)
  assert "resumed at step 4, so only steps 5 to 5 are traced" in caplog.text
  assert [steps for _, steps in _traces(workdir)] == [{3, 4}, {5}]


def test_exception_while_tracing_stops_the_trace(test_config, tmp_path):
  def fail(step):
    if step == 3:
      raise RuntimeError("boom at step 3")
    return False

  workdir = str(tmp_path / "run")
  with pytest.raises(RuntimeError, match="boom at step 3"):
    train_and_evaluate(_with(test_config, profile_steps="2:6"), workdir, should_stop=fail)
  assert [steps for _, steps in _traces(workdir)] == [{2, 3}]
  jax.profiler.start_trace(str(tmp_path / "again"))  # raises if the run's trace were still on
  jax.profiler.stop_trace()


def test_run_resumed_past_the_range_traces_nothing_and_says_so(tmp_path, caplog):
  tcfg = config_lib.TrainConfig(num_steps=10, profile_steps="2:4")
  with caplog.at_level(logging.INFO):
    profiler = profiling.StepProfiler(tcfg, str(tmp_path), start_step=3)
  assert profiler.first is None
  assert "train.profile_steps=2:4: this run starts after step 3" in caplog.text
  with profiler.step(4):
    pass
  assert not profiler.active and not os.path.exists(tmp_path / "profile")
  assert profiling.StepProfiler(tcfg, str(tmp_path), start_step=2).first == 3
  assert profiling.StepProfiler(tcfg, str(tmp_path), start_step=0).first == 2


@pytest.mark.parametrize("value, message", [
    ("2-4", "train.profile_steps='2-4' is not 'START:END'"),
    ("a:b", "train.profile_steps='a:b' is not 'START:END'"),
    ("0:3", "train.profile_steps='0:3': START must be >= 1"),
    ("4:4", "train.profile_steps='4:4': END must be > START"),
    ("5:3", "train.profile_steps='5:3': END must be > START"),
    ("3:12", "train.profile_steps='3:12': END must be <= train.num_steps \\+ 1 = 11"),
    (7, "train.profile_steps must be a string 'START:END', got 7"),
])
def test_bad_profile_steps_are_refused_naming_the_value(value, message):
  with pytest.raises(ValueError, match=message):
    config_lib.TrainConfig(num_steps=10, profile_steps=value)


def test_profile_range_of_good_values():
  assert config_lib.TrainConfig(num_steps=10, profile_steps="10:11").profile_range == (10, 11)
  assert config_lib.TrainConfig(num_steps=10, profile_steps="1:2").profile_range == (1, 2)
  assert config_lib.TrainConfig(num_steps=10).profile_range is None
