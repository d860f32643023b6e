"""The main job: python -m experiments.train --config=configs/lm.py:tiny --workdir=DIR

Running again with the same --workdir resumes from its latest checkpoint. Multi-host: every
process runs the same command with --distributed=auto (TPU pod slices, SLURM) or
--distributed=manual --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from effjax import config as config_lib
from effjax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm.py:tiny", "Experiment config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config go here.",
                               required=True)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", distributed.MODES,
    "off: one process. auto: jax.distributed.initialize() detects the cluster (TPU pod, SLURM). "
    "manual: use --coordinator_address, --num_processes and --process_id.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "host:port of process 0 (--distributed=manual).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Process count (--distributed=manual).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's id (--distributed=manual).")


class _DropLibraryInfo(logging.logging.Filter):
  """Keeps the run's own progress readable: orbax logs every save step at INFO."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def parse_flags(argv):
  """absl's parser, but a bad --config.* override ends with one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(f"{e}\nPass --helpfull to see all flags.") from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    while e.args and isinstance(e.args[0], BaseException):  # ml_collections nests a KeyError
      e = e.args[0]
    message = " ".join(str(e.args[0] if e.args else e).split())
    raise SystemExit(f"config error: bad override: {message}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
  try:  # every config check runs here, before any data, device or compilation
    cfg = config_lib.from_config_dict(_CONFIG.value)
    dist = distributed.DistributedConfig(_DISTRIBUTED.value, _COORDINATOR.value,
                                         _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    raise SystemExit(f"config error: {e}") from None
  distributed.initialize(dist)
  import jax  # pylint: disable=g-import-not-at-top  (after the distributed runtime is up)
  # Only process 0 reports progress; the others speak only to warn.
  logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  from effjax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  train_and_evaluate(cfg, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
