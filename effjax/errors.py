"""Known failures of a run. The command line prints their message as one line (no traceback);
anything else is a bug and keeps its traceback."""


class RunError(Exception):
  """A failure the user can act on: the message names the bad value and what to do."""


class ConfigError(RunError, ValueError):
  """A config value that does not fit the machine or the data (mesh, batch, memory)."""


class DatasetUnavailableError(RunError, FileNotFoundError):
  """The dataset is unknown, not prepared, or its directory is unusable."""


class DataFileError(RunError, ValueError):
  """A file of data.files that cannot be read as the documents it should hold (unreadable, not
  UTF-8, a bad JSON line, a missing field), or documents that leave a split empty."""


class WorkdirError(RunError):
  """The workdir cannot be used: not a directory, not writable, locked, or would lose work."""


class StepFailedError(RunError, RuntimeError):
  """A dispatched device program (a train or eval step) failed; the message names the loop and
  the step or batch (effjax/train/inflight.py)."""
