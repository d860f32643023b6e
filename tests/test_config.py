import dataclasses

import pytest

from configs import lm
from effjax import config as config_lib


@pytest.mark.parametrize("variant", ["tiny", "small", "test"])
def test_variants_are_valid(variant):
  cfg = config_lib.from_config_dict(lm.get_config(variant))
  assert isinstance(cfg, config_lib.ExperimentConfig)


def test_small_is_about_gpt2_small():
  import jax
  import jax.numpy as jnp
  from effjax.models.decoder_lm import DecoderLM, count_params
  cfg = config_lib.from_config_dict(lm.get_config("small")).model
  shapes = jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  assert 70e6 < count_params(shapes["params"]) < 130e6


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    lm.get_config("huge")


def test_unknown_key_is_named():
  c = lm.get_config("tiny").to_dict()
  c["model"]["d_modle"] = 3
  with pytest.raises(ValueError, match=r"model\.d_modle"):
    config_lib.from_config_dict(c)


def test_locked_config_rejects_unknown_override():
  c = lm.get_config("tiny")
  c.lock()
  with pytest.raises(AttributeError, match="d_modle"):
    c.model.d_modle = 3


@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=130, num_heads=4), r"d_model=130 is not divisible by model.num_heads=4"),
    (dict(num_heads=4, num_kv_heads=3), r"num_heads=4 is not a multiple of model.num_kv_heads=3"),
    (dict(attention_impl="flash"), r"attention_impl='flash' is not one of"),
    (dict(attention_impl="cudnn", dtype="float32"), r"needs model.dtype='bfloat16'"),
    (dict(num_layers=0), r"model.num_layers must be > 0, got 0"),
    (dict(remat="some"), r"model.remat='some'"),
    (dict(vocab_size=100), r"vocab_size=100 is smaller than the byte tokenizer's 259"),
])
def test_inconsistent_model_values_fail_clearly(overrides, message):
  c = lm.get_config("tiny")
  c.model.update(overrides)
  with pytest.raises(ValueError, match=message):
    config_lib.from_config_dict(c)


def test_linear_kind_is_checked():
  with pytest.raises(ValueError, match=r"model.linear.kind='sparse'"):
    config_lib.LinearConfig(kind="sparse")


@pytest.mark.parametrize("overrides, message", [
    (dict(train=dict(keep_checkpoints=1)), "keep_checkpoints must be >= 2"),
    (dict(mesh=dict(data=-1, fsdp=-1)), "at most one mesh axis may be -1"),
    (dict(mesh=dict(tensor=0)), "mesh.tensor must be a positive device count or -1, got 0"),
    (dict(optim=dict(warmup_steps=700)), "warmup_steps=700 exceeds train.num_steps=600"),
])
def test_other_sections_fail_clearly(overrides, message):
  c = lm.get_config("tiny").to_dict()
  for section, values in overrides.items():
    c[section].update(values)
  with pytest.raises(ValueError, match=message):
    config_lib.from_config_dict(c)


def test_dataclasses_are_frozen():
  cfg = config_lib.ExperimentConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.model.d_model = 3  # type: ignore[misc]


@pytest.mark.parametrize("override, message", [
    ("--config.model.d_model=130", "config error: model.d_model=130 is not divisible"),
    ("--config.model.d_modle=3", "d_modle"),
    ("--config.train.profile_steps=5:3", "config error: train.profile_steps='5:3': END must be"),
])
def test_command_line_rejects_bad_config_before_work(override, message, tmp_path):
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "run"
  out = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/lm.py:tiny",
                        f"--workdir={workdir}", override], cwd=repo, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode != 0
  assert message in out.stderr
  assert "Traceback" not in out.stderr
  assert not workdir.exists()  # nothing was started
