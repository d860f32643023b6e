"""Multi-process start-up: `jax.distributed` initialisation, once, only when asked.

Every process of a multi-host job runs the same command. Three ways to start:

  off     (default) a single process; nothing is initialised.
  auto    `jax.distributed.initialize()` with no arguments: JAX detects the cluster itself
          (Cloud TPU pod slices, SLURM, Open MPI, ...).
  manual  coordinator address, process count and this process's id given explicitly (any
          launcher, or several processes on one machine for testing).

On CPUs the cross-process collectives use gloo (JAX has no other CPU implementation); GPUs
and TPUs are unaffected by that setting.
"""
from __future__ import annotations

import dataclasses

import jax

MODES = ("off", "auto", "manual")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  mode: str = "off"
  coordinator_address: str = ""  # host:port of process 0's coordination service
  num_processes: int = 0
  process_id: int = -1
  initialization_timeout: int = 300  # seconds to wait for every process to join

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"--distributed={self.mode!r} is not one of {list(MODES)}")
    manual = (self.coordinator_address, self.num_processes > 0, self.process_id >= 0)
    if self.mode == "manual":
      missing = [name for name, given in zip(
          ("--coordinator_address", "--num_processes", "--process_id"), manual) if not given]
      if missing:
        raise ValueError(f"--distributed=manual needs {', '.join(missing)}")
      if ":" not in self.coordinator_address:
        raise ValueError(f"--coordinator_address={self.coordinator_address!r} must be host:port")
      if not 0 <= self.process_id < self.num_processes:
        raise ValueError(f"--process_id={self.process_id} must be in [0, --num_processes="
                         f"{self.num_processes})")
    elif any(manual):
      raise ValueError(f"--coordinator_address/--num_processes/--process_id are only used with "
                       f"--distributed=manual (got --distributed={self.mode})")
    if self.initialization_timeout <= 0:
      raise ValueError(f"initialization_timeout must be > 0 seconds, got "
                       f"{self.initialization_timeout}")


def initialize(config: DistributedConfig) -> bool:
  """Starts JAX's distributed runtime as `config` says. Returns whether it is running.

  Idempotent: a second call (or a runtime someone else started) changes nothing. Must run
  before anything touches a device.
  """
  if config.mode == "off":
    return jax.distributed.is_initialized()
  if jax.distributed.is_initialized():
    return True
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if config.mode == "auto":
    jax.distributed.initialize(initialization_timeout=config.initialization_timeout)
  else:
    jax.distributed.initialize(config.coordinator_address, config.num_processes,
                               config.process_id,
                               initialization_timeout=config.initialization_timeout)
  return True
