"""Test set-up: 8 simulated CPU devices, fixed before JAX is imported anywhere."""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must follow the environment set-up above)
import pytest  # noqa: E402


def _platform() -> str:
  return jax.devices()[0].platform


def pytest_collection_modifyitems(config, items):
  del config
  platform = _platform()
  for item in items:
    # real markers only: item.keywords also holds test names and parameter ids
    if item.get_closest_marker("gpu") and platform != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    if item.get_closest_marker("tpu") and platform != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A private TFDS data dir; the stdlib corpus is prepared into it on first use (~1 s)."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def test_config(tfds_dir):
  """The `test` variant of configs/lm.py reading from the session's data dir, as a dataclass."""
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
  from configs import lm  # pylint: disable=g-import-not-at-top
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = lm.get_config("test")
  c.data.data_dir = tfds_dir
  return config_lib.from_config_dict(c)
