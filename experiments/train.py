"""The main job: python -m experiments.train --config=configs/lm.py:tiny --workdir=DIR

Running again with the same --workdir resumes from its latest checkpoint.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from effjax import config as config_lib
from effjax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm.py:tiny", "Experiment config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config go here.",
                               required=True)


class _DropLibraryInfo(logging.logging.Filter):
  """Keeps the run's own progress readable: orbax logs every save step at INFO."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
  cfg = config_lib.from_config_dict(_CONFIG.value)  # every check runs before any compilation
  train_and_evaluate(cfg, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
