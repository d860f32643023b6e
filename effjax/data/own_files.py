"""Your own text files as a dataset: `data.files=GLOB[,GLOB]`.

Formats: `.txt` (one document per file), `.jsonl` / `.jsonl.gz` (one JSON object per line,
the document under `data.text_key`) and `.parquet` (the `data.text_key` column, read with
pyarrow). Empty documents are skipped. They are prepared once, like the bundled corpus, by a
TFDS builder into array_record (under the same preparation lock; TFDS writes into a temporary
directory and renames it when complete, so a failed preparation leaves nothing to reuse), and
read by grain as every dataset is.

The split is by document and deterministic: a document is in `validation` when the BLAKE2b
hash of its UTF-8 text falls in the lowest `data.validation_percent` percent of the hash
range, so it does not depend on the files' order or names, and identical documents share a
split.

The prepared data is cached under a fingerprint of the files' absolute paths, sizes and
modification times (with text_key, validation_percent and FORMAT_VERSION): a changed file
gets a new fingerprint, so it is prepared again, never silently reused.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from typing import Iterator
import zlib

import tensorflow_datasets as tfds

from effjax.config import DataConfig
from effjax.errors import DataFileError

NAME = "own_files"
FORMAT_VERSION = 1  # raise when the preparation writes something different from the same files
_PARQUET_BATCH_ROWS = 1024


def fingerprint(paths: list[str], text_key: str, validation_percent: int) -> str:
  """16 hex digits over what the prepared data depends on."""
  entries = []
  for path in sorted(paths):
    try:
      stat = os.stat(path)
    except OSError as e:
      raise DataFileError(f"data.files: {path} cannot be read: {e.strerror}") from None
    entries.append([path, stat.st_size, stat.st_mtime_ns])
  key = json.dumps({"files": entries, "text_key": text_key,
                    "validation_percent": validation_percent, "format": FORMAT_VERSION})
  return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def split_of(text: str, validation_percent: int) -> str:
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return "validation" if int.from_bytes(digest, "big") % 100 < validation_percent else "train"


def _utf8(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataFileError(f"data.files: {where}: not UTF-8 text (byte 0x{data[e.start]:02x} at "
                        f"offset {e.start})") from None


def documents(path: str, text_key: str) -> Iterator[tuple[str, str]]:
  """(where, text) of each non-empty document of `path`; `where` is the path, with the line
  (JSON lines) or row (Parquet). DataFileError in one line naming the file (and line) that
  cannot be read as documents."""
  try:
    if path.endswith(".txt"):
      with open(path, "rb") as f:
        text = _utf8(f.read(), path)
      if text:
        yield path, text
    elif path.endswith((".jsonl", ".jsonl.gz")):
      yield from _json_lines(path, text_key)
    elif path.endswith(".parquet"):
      yield from _parquet_rows(path, text_key)
    else:
      raise DataFileError(f"data.files: {path} is not .txt, .jsonl, .jsonl.gz or .parquet")
  except (OSError, EOFError, zlib.error) as e:  # unreadable, vanished, or a broken gzip
    reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
    raise DataFileError(f"data.files: {path} cannot be read: {reason}") from None


def _json_lines(path: str, text_key: str) -> Iterator[tuple[str, str]]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      where = f"{path}:{number}"
      line = _utf8(raw, where).strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise DataFileError(f"data.files: {where}: not JSON ({e.msg} at column "
                            f"{e.colno})") from None
      if not isinstance(record, dict) or text_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataFileError(f"data.files: {where}: no {text_key!r} key (data.text_key); the "
                            f"line has {keys}")
      text = record[text_key]
      if not isinstance(text, str):
        raise DataFileError(f"data.files: {where}: {text_key!r} is a "
                            f"{type(text).__name__}, not a string")
      try:
        text.encode("utf-8")
      except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\ud800")
        raise DataFileError(f"data.files: {where}: {text_key!r} holds a lone surrogate, "
                            "not Unicode text") from None
      if text:
        yield where, text


def _parquet_rows(path: str, text_key: str) -> Iterator[tuple[str, str]]:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    table_file = pq.ParquetFile(path)
    names = table_file.schema_arrow.names
    if text_key not in names:
      raise DataFileError(f"data.files: {path}: no column {text_key!r} (data.text_key); its "
                          f"columns are {names}")
    column_type = table_file.schema_arrow.field(text_key).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
      raise DataFileError(f"data.files: {path}: column {text_key!r} holds {column_type}, "
                          "not strings")
    row = 0
    for batch in table_file.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_key]):
      for text in batch.column(0).to_pylist():
        if text is None:
          raise DataFileError(f"data.files: {path}: row {row}: {text_key!r} is null")
        if text:
          yield f"{path}:row{row}", text
        row += 1
  except pa.ArrowException as e:  # not Parquet, or a damaged page
    if isinstance(e, OSError) and e.strerror:
      raise  # unreadable: reported as such by documents()
    raise DataFileError(f"data.files: {path}: not a readable Parquet file "
                        f"({' '.join(str(e).split())[:200]})") from None


class _OwnFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents of a list of files, one example per document."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, paths: list[str], text_key: str, validation_percent: int, **kwargs):
    self._paths, self._text_key = paths, text_key
    self._validation_percent = validation_percent
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "source": tfds.features.Text(),  # path, and line or row
        }),
    )

  def _documents(self):
    for path in self._paths:
      yield from documents(path, self._text_key)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    counts = {"train": 0, "validation": 0}
    for _, text in self._documents():  # reads every file once: bad input fails here
      counts[split_of(text, self._validation_percent)] += 1
    for split, n in counts.items():
      if not n:
        raise DataFileError(
            f"data.files: the {sum(counts.values())} non-empty documents of "
            f"{len(self._paths)} file(s) leave the {split} split empty with "
            f"data.validation_percent={self._validation_percent}; add documents"
            + (" or raise data.validation_percent" if split == "validation" else ""))
    return {split: self._generate_examples(split) for split in counts}

  def _generate_examples(self, split: str):
    for where, text in self._documents():
      if split_of(text, self._validation_percent) == split:
        yield where, {"text": text, "source": where}


@functools.lru_cache(maxsize=None)
def _builder_class(config_name: str):
  """A builder class whose one config is `config_name`: TFDS stores each config in its own
  directory (data_dir/own_files/CONFIG/1.0.0), one per fingerprint."""
  class OwnFiles(_OwnFilesBuilder, skip_registration=True):
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(
        name=config_name, description="documents of the files with this fingerprint")]
  return OwnFiles


def builder(config: DataConfig, data_dir: str | None):
  """The (possibly not yet prepared) builder of the files `config.files` names now."""
  try:
    paths = config.file_paths()
  except ValueError as e:
    raise DataFileError(str(e)) from None
  config_name = "files_" + fingerprint(paths, config.text_key, config.validation_percent)
  return _builder_class(config_name)(
      paths=paths, text_key=config.text_key, validation_percent=config.validation_percent,
      data_dir=data_dir, config=config_name, file_format="array_record")
