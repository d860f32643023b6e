"""Test set-up: 8 simulated CPU devices, fixed before JAX is imported anywhere, and a JAX
compilation cache private to this pytest session (see pytest_configure)."""
import os
import shutil
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must follow the environment set-up above)
import pytest  # noqa: E402


_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_created_cache = []


def pytest_configure(config):
  """Many tests train the same small configs, each run compiling the same programs again (new
  closures miss jit's in-memory cache). A persistent compilation cache in a fresh directory per
  session makes the repeats cheap without carrying anything over between sessions. It is set
  in the environment before pytest-xdist starts its workers, so they and the training
  subprocesses some tests launch share it. A cache the user configured is left alone."""
  del config
  if os.environ.get(_CACHE_ENV):
    return
  directory = tempfile.mkdtemp(prefix="effjax-test-jax-cache-")
  _created_cache.append(directory)
  settings = {_CACHE_ENV: directory, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": 0.5,
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": 0}
  os.environ.update({name: str(value) for name, value in settings.items()})
  for name, value in settings.items():  # this process imported jax before the variables
    jax.config.update(name.lower(), value)


def pytest_unconfigure(config):
  del config
  for directory in _created_cache:
    shutil.rmtree(directory, ignore_errors=True)


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
    if item.get_closest_marker("drill") and not os.environ.get("EFFJAX_DRILLS"):
      item.add_marker(pytest.mark.skip(reason="long drill: run `make test-drills`"))


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
