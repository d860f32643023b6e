"""The main job's command line (`effjax-train`, or `python -m experiments.train`).

  effjax-train --config=configs/lm.py:tiny --workdir=runs/tiny

Running again with the same --workdir resumes from its latest checkpoint.

Config: --config=FILE:VARIANT selects a Python config file and its variant; a path that does
not exist relative to the current directory is looked up in this effjax checkout, so
`configs/lm.py:tiny` works from anywhere. Override any field with
--config.SECTION.FIELD=VALUE, e.g. --config.model.d_model=256 --config.train.num_steps=1000
(every field and its default: effjax/config.py). A bad value stops the run in one line.

Faults: SIGTERM or Ctrl-C saves a checkpoint and exits 0 (Ctrl-C twice aborts at once). A
known failure (bad config, locked or damaged workdir, non-finite step, full disk, missing data)
prints one line and exits 1; --traceback shows the full traceback.

Multi-host: every process runs the same command with --distributed=auto (TPU pod slices,
SLURM) or --distributed=manual --coordinator_address=HOST:PORT --num_processes=N
--process_id=I.
"""
from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from effjax import config as config_lib
from effjax.errors import RunError
from effjax.parallel import distributed

# The checkout this module belongs to: configs/ lives there.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = "configs/lm.py:tiny"

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, DEFAULT_CONFIG),
    "Experiment config FILE:VARIANT; override fields with --config.SECTION.FIELD=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config go here.")
_START_OVER = flags.DEFINE_bool(
    "start_over", False, "Train from step 0 in a workdir whose earlier progress cannot be "
    "restored (all checkpoints unreadable, or metrics without checkpoints).")
_TRACEBACK = flags.DEFINE_bool("traceback", False,
                               "Show the full traceback of a known failure, not one line.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", distributed.MODES,
    "off: one process. auto: jax.distributed.initialize() detects the cluster (TPU pod, SLURM). "
    "manual: use --coordinator_address, --num_processes and --process_id.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "host:port of process 0 (--distributed=manual).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Process count (--distributed=manual).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's id (--distributed=manual).")

_OWN_CODE = tuple(os.path.join(ROOT, d) + os.sep
                  for d in ("effjax", "experiments", "pallas_kernels", "configs"))


class _OwnLinesOnly(std_logging.Filter):
  """Keeps the run's output readable: libraries (orbax, jax, ...) speak only to warn."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_OWN_CODE)


def quiet_libraries() -> None:
  """Progress lines from effjax's own code only; libraries speak only to warn."""
  logging.get_absl_handler().addFilter(_OwnLinesOnly())


def resolve_config_path(value: str) -> str:
  """FILE[:VARIANT] with FILE made absolute: as given, else inside the effjax checkout."""
  path, sep, variant = value.partition(":")
  for candidate in (path, os.path.join(ROOT, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate) + sep + variant
  raise SystemExit(f"config error: --config={value}: no such file {path!r} (looked in "
                   f"{os.getcwd()} and {ROOT})")


def _resolve_config_args(argv: list[str]) -> list[str]:
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config="):
      arg = "--config=" + resolve_config_path(arg[len("--config="):])
    elif arg == "--config" and i + 1 < len(argv):
      out.append(arg)
      i += 1
      arg = resolve_config_path(argv[i])
    out.append(arg)
    i += 1
  return out


def flags_parser(doc: str, module):
  """absl's flag parser for an entry point taking --config: --help prints `doc` and `module`'s
  flags and exits 0, --config=FILE:VARIANT is found in this checkout when not in the current
  directory, and a bad --config or override ends in one line."""
  def parse(argv):
    if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
      print(doc)
      print(flags.FLAGS.module_help(module))
      raise SystemExit(0)
    argv = [argv[0]] + _resolve_config_args(list(argv[1:]))
    if ROOT not in sys.path:  # config files import their siblings as `configs.*`
      sys.path.insert(0, ROOT)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      if "Error whilst parsing config file" in str(e):  # the config file itself raised
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        raise SystemExit(f"config error: {lines[-1]}") from None
      message = " ".join(str(e).split())
      raise SystemExit(f"error: {message} (run with --help for the flags)") from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      while e.args and isinstance(e.args[0], BaseException):  # ml_collections nests a KeyError
        e = e.args[0]
      message = " ".join(str(e.args[0] if e.args else e).split())
      raise SystemExit(f"config error: bad override: {message}") from None
  return parse


def parse_flags(argv):
  """absl's parser, but --help exits 0 and a bad --config or override ends in one line."""
  return flags_parser(__doc__, sys.modules[__name__])(argv)


def config_value():
  """The --config ConfigDict after overrides (for other entry points taking --config)."""
  return _CONFIG.value


def _one_line(error: BaseException) -> str:
  if isinstance(error, OSError) and not isinstance(error, RunError):
    where = f": {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}"
  return " ".join(str(error).split())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise SystemExit("error: --workdir is required (checkpoints, metrics and config go there)")
  quiet_libraries()
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
  try:
    train_and_evaluate(cfg, _WORKDIR.value, start_over=_START_OVER.value)
  except (RunError, OSError) as e:
    if _TRACEBACK.value:
      raise
    raise SystemExit(f"error: {_one_line(e)}") from None
  except KeyboardInterrupt:
    if _TRACEBACK.value:
      raise
    print("aborted (second Ctrl-C); the last checkpoint is as it was", file=sys.stderr)
    raise SystemExit(130) from None


def run():
  """Console entry point `effjax-train`."""
  app.run(main, flags_parser=parse_flags)
