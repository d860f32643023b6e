"""The bundled offline corpus: this Python installation's own standard-library `.py` files.

Every Python has them on disk, so the main job needs no download. Tests, third-party packages
and caches are left out. The split is by file and deterministic: a file is in `validation` when
the CRC32 of its relative path is below 5% of the hash range. The builder config is named
after the Python version whose stdlib was read, since each version's files differ.
"""
from __future__ import annotations

import os
import pathlib
import sys
import sysconfig
import zlib

import tensorflow_datasets as tfds

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})
VALIDATION_PERCENT = 5


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: pathlib.Path | None = None) -> list[str]:
  """Relative paths of the corpus files, sorted."""
  root = stdlib_root() if root is None else root
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
    for name in filenames:
      if name.endswith(".py"):
        paths.append(os.path.relpath(os.path.join(dirpath, name), root))
  return sorted(paths)


def split_of(relative_path: str) -> str:
  bucket = zlib.crc32(relative_path.encode("utf-8")) % 100
  return "validation" if bucket < VALIDATION_PERCENT else "train"


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
  """Source files of the Python standard library, one example per file."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=f"py{sys.version_info.major}.{sys.version_info.minor}",
                              description="stdlib of the running Python version")
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    files = stdlib_files()
    if not files:
      raise FileNotFoundError(f"no .py files found under {stdlib_root()}")
    return {split: self._generate_examples([f for f in files if split_of(f) == split])
            for split in ("train", "validation")}

  def _generate_examples(self, files):
    root = stdlib_root()
    for relative_path in files:
      yield relative_path, {"text": (root / relative_path).read_bytes(), "path": relative_path}
