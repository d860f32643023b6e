"""Named compile targets: compile-only devices of real accelerators, on a host that has none.

  tpu:GEN:TOPOLOGY   libtpu's compiler for a TPU slice, e.g. tpu:v5e:1x1, tpu:v5e:2x2,
                     tpu:v5p:4x4x4 (64 chips, 16 hosts), tpu:v6e:16x16, tpu:v4:2x2x1
  gpu:KIND:N         XLA's GPU compiler (CUDA plugin) for N GPUs described by XLA's target
                     config, e.g. gpu:h100:8, gpu:h200:8

    devices = targets.get("tpu:v5e:2x2").devices
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2), ("data", "model"))
    jax.jit(f).lower(*shape_dtype_structs_with_shardings).compile()  # the real compiler

Nothing runs on these devices; `compile()` runs the target's compiler (XLA:TPU and Mosaic
with the chip's VMEM limits; XLA:GPU, Mosaic GPU and ptxas with the H100's limits), and
`memory_analysis()` / `cost_analysis()` are that compiler's figures (estimates, not
measurements). This is the only module that knows how libtpu and the CUDA plugin are reached:
TPU slices through the public `jax.experimental.topologies`; GPUs through a private JAX entry
(`_jax.get_default_c_api_topology`, the public one raises NotImplementedError for "cuda"),
checked by tests/test_compile_targets.py so a JAX that moves it fails loudly there. The GPU's
target config (XLA's `GpuTargetConfigProto` text, openxla/xla
`xla/backends/gpu/target_config/specs/`) is read from the CUDA plugin, which embeds XLA's specs.

Needs `jax[tpu]` (libtpu) for TPU targets and `jax[cuda12]` for GPU targets, installed with
the same JAX version (`make test-compile` does both); a missing one is a TargetUnavailable
error saying what to install.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import mmap
import os
import re
from typing import Any

# Read when JAX first initialises its backends: libtpu may be loaded by several processes (pytest
# workers, compile-only), and the CUDA plugin registers without a driver. Import this module
# (or set them) before anything calls jax.devices().
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
# XLA:GPU turns large sorts (an MoE step's routing sort at pod batch sizes) into CUB radix sorts
# and asks the CUDA runtime for their scratch size while compiling, which stops a compile-only
# build ("cudaErrorInvalidDevice"). Compile-only, XLA's own sort is kept; on a GPU the program
# may use CUB, whose scratch these memory figures then leave out. A value the user set wins.
if "xla_gpu_enable_cub_radix_sort" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_gpu_enable_cub_radix_sort=false").strip()

# TPU generations: libtpu's topology prefix, HBM per chip and peak bf16 dense TFLOP/s per chip
# (Google Cloud's TPU system-architecture pages: v4 32 GiB / 275, v5e 16 GiB / 197,
# v5p 95 GiB / 459, v6e 32 GiB / 918).
TPU_CHIPS = {
    "v4": {"hbm_bytes": 32 << 30, "peak_bf16_tflops": 275.0},
    "v5e": {"hbm_bytes": 16 << 30, "peak_bf16_tflops": 197.0},
    "v5p": {"hbm_bytes": 95 << 30, "peak_bf16_tflops": 459.0},
    "v6e": {"hbm_bytes": 32 << 30, "peak_bf16_tflops": 918.0},
}
# GPU kinds: the device description XLA's target config carries, and the dense bf16 peak
# (NVIDIA's H100/H200 SXM datasheets: 989 TFLOP/s dense bf16, 80 / 141 GB HBM).
GPU_KINDS = {
    "h100": {"description": "NVIDIA H100 80GB HBM3", "peak_bf16_tflops": 989.0},
    "h200": {"description": "NVIDIA H200 141GB HBM3e", "peak_bf16_tflops": 989.0},
}
EXAMPLES = ("tpu:v5e:1x1", "tpu:v5e:2x2", "tpu:v5p:4x4x4", "tpu:v6e:16x16", "tpu:v4:2x2x1",
            "gpu:h100:8", "gpu:h200:8")


class TargetError(ValueError):
  """A target name effjax does not know (the message lists the known ones)."""


class TargetUnavailable(RuntimeError):
  """The target's compiler is not installed here (the message says what to install)."""


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as given, e.g. "tpu:v5e:2x2"
  platform: str  # "tpu" or "gpu"
  chip: str  # "v5e", "h100", ...
  devices: tuple[Any, ...]  # compile-only jax devices
  hbm_bytes: int  # per device
  peak_bf16_tflops: float  # per device, dense

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def device_kind(self) -> str:
    return self.devices[0].device_kind


def _bad_name(name: str, why: str) -> TargetError:
  return TargetError(f"unknown compile target {name!r} ({why}); known: "
                     f"tpu:{{{','.join(TPU_CHIPS)}}}:TOPOLOGY or gpu:{{{','.join(GPU_KINDS)}}}:N, "
                     f"e.g. {', '.join(EXAMPLES)}")


def parse(name: str) -> tuple[str, str, str]:
  """(platform, chip, topology or count) of a target name; TargetError naming it if bad."""
  parts = name.split(":") if isinstance(name, str) else []
  if len(parts) != 3:
    raise _bad_name(name, "expected PLATFORM:CHIP:SHAPE")
  platform, chip, shape = parts
  if platform == "tpu":
    if chip not in TPU_CHIPS:
      raise _bad_name(name, f"TPU generation {chip!r}")
    if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*){1,2}", shape):
      raise _bad_name(name, f"TPU topology {shape!r} is not like 2x2 or 4x4x4")
  elif platform == "gpu":
    if chip not in GPU_KINDS:
      raise _bad_name(name, f"GPU kind {chip!r}")
    if not re.fullmatch(r"[1-9]\d*", shape):
      raise _bad_name(name, f"GPU count {shape!r} is not a positive integer")
  else:
    raise _bad_name(name, f"platform {platform!r}")
  return platform, chip, shape


@functools.lru_cache(maxsize=None)
def get(name: str) -> Target:
  """The named target's compile-only devices (cached: libtpu and the plugin load once)."""
  platform, chip, shape = parse(name)
  if platform == "tpu":
    devices = _tpu_devices(chip, shape)
    info = TPU_CHIPS[chip]
  else:
    devices = _gpu_devices(chip, int(shape))
    info = {"hbm_bytes": _gpu_memory_bytes(chip), **GPU_KINDS[chip]}
  return Target(name, platform, chip, tuple(devices), info["hbm_bytes"],
                info["peak_bf16_tflops"])


def _tpu_devices(chip: str, topology: str):
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise TargetUnavailable(
        "TPU targets need libtpu: pip install 'jax[tpu]==<this jax version>' (Python >= 3.12 "
        "for the newest; `make test-compile` builds such an environment)") from None
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc(topology_name=f"{chip}:{topology}", platform="tpu")
  except Exception as e:  # libtpu's message names what it disliked
    raise TargetError(f"libtpu refused the TPU topology {chip}:{topology}: "
                      f"{str(e).strip().splitlines()[0]}") from e
  return desc.devices


# --- GPUs through the CUDA plugin ----------------------------------------------------------


def _cuda_plugin_library() -> str:
  try:
    import jax_plugins.xla_cuda12 as plugin  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise TargetUnavailable(
        "GPU targets need the CUDA plugin: pip install 'jax[cuda12]==<this jax version>' "
        "(`make test-compile` builds such an environment)") from None
  found = glob.glob(os.path.join(os.path.dirname(plugin.__file__), "xla_cuda_plugin*.so"))
  if not found:
    raise TargetUnavailable(f"no xla_cuda_plugin*.so next to {plugin.__file__}")
  return found[0]


@functools.lru_cache(maxsize=None)
def gpu_target_configs() -> dict[str, str]:
  """XLA's GpuTargetConfigProto texts embedded in the CUDA plugin, by device description
  ("NVIDIA H100 80GB HBM3", ...)."""
  configs = {}
  with open(_cuda_plugin_library(), "rb") as f, \
      mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    start = data.find(b"gpu_device_info {")
    while start != -1:
      end = data.find(b"\0", start)
      text = data[start:end].decode("utf-8", errors="replace")
      described = re.search(r'^device_description_str: "([^"]*)"', text, re.MULTILINE)
      if described:
        configs[described.group(1)] = text
      start = data.find(b"gpu_device_info {", end)
  if not configs:
    raise TargetUnavailable("the CUDA plugin holds no GPU target configs this module can read "
                            "(a new plugin layout: update pallas_kernels/targets.py)")
  return configs


def gpu_target_config(chip: str) -> str:
  description = GPU_KINDS[chip]["description"]
  configs = gpu_target_configs()
  if description not in configs:
    raise TargetUnavailable(f"the CUDA plugin has no target config for {description!r}; it "
                            f"has {sorted(configs)}")
  return configs[description]


def _gpu_memory_bytes(chip: str) -> int:
  return int(re.search(r"device_memory_size: (\d+)", gpu_target_config(chip)).group(1))


def _gpu_devices(chip: str, count: int):
  config = gpu_target_config(chip)
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # loads the plugins (the CUDA one registers "cuda" even with no GPU)
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  make = getattr(_jax, "get_default_c_api_topology", None)
  if make is None:
    raise TargetUnavailable(f"jax {jax.__version__} has no _jax.get_default_c_api_topology: "
                            "the private entry GPU targets use moved; update "
                            "pallas_kernels/targets.py")
  try:
    topology = make("cuda", "effjax", {"target_config": config, "topology": f"1x1x{count}"})
  except jax.errors.JaxRuntimeError as e:
    raise TargetUnavailable(
        f"the CUDA plugin did not register ({str(e).strip().splitlines()[0]}): JAX initialised "
        "its backends before JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 was set; import "
        "pallas_kernels.targets (or set it) before the first jax.devices()") from e
  return topology._make_compile_only_devices()  # pylint: disable=protected-access
