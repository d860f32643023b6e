"""Input pipeline: TFDS array_record source -> grain -> packed token sequences -> global arrays.

The source is the bundled corpus, a prepared TFDS dataset, or the user's own files
(`data.files`, effjax/data/own_files.py). Each process reads only its share of a split
(`tfds.split_for_jax_process`). Documents are tokenised by `data.tokenizer` as [BOS, ids...,
EOS] inside grain's map, which its prefetch threads run ahead of the training step,
concatenated and cut into rows of `seq_len + 1` tokens with segment ids and positions, so the
model can keep packed documents apart. The training iterator is checkpointable: its state is a
small JSON-able dict saved with every checkpoint.
"""
from __future__ import annotations

import math
import os

from absl import logging
import jax
import numpy as np

from effjax.config import DataConfig
from effjax.errors import ConfigError, DatasetUnavailableError
from effjax.filelock import FileLock
from effjax.data import tokenizer
from effjax.parallel import logical_sharding

BUILTIN = "python_stdlib"


def get_builder(config: DataConfig):
  """The TFDS builder for `config.dataset`, prepared in array_record format."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = config.data_dir or None
  if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise DatasetUnavailableError(f"data.data_dir={data_dir!r} is a file, not a directory")
  if config.files:
    from effjax.data import own_files  # pylint: disable=g-import-not-at-top
    return _prepared(lambda: own_files.builder(config, data_dir))
  if config.dataset == BUILTIN:
    from effjax.data import stdlib_corpus  # pylint: disable=g-import-not-at-top
    return _prepared(lambda: stdlib_corpus.PythonStdlib(data_dir=data_dir,
                                                        file_format="array_record"))
  try:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  except Exception as e:  # tfds raises several kinds for an unknown name
    raise ConfigError(f"data.dataset={config.dataset!r} is not a TFDS dataset known here "
                      f"({type(e).__name__}: {e})") from e
  if not builder.is_prepared():
    raise DatasetUnavailableError(
        f"data.dataset={config.dataset!r} is not prepared under {builder.data_dir}. effjax never "
        "downloads at run time. On a machine with network access, prepare it in array_record "
        f"format (tfds.builder({config.dataset!r}, file_format='array_record')"
        ".download_and_prepare()) and copy the result to --config.data.data_dir, or use "
        f"--config.data.dataset={BUILTIN} (the offline corpus).")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ConfigError(
        f"data.dataset={config.dataset!r} under {builder.data_dir} is stored as "
        f"{builder.info.file_format.value}; random access needs array_record. Prepare it again "
        "with file_format='array_record'.")
  return builder


def _prepared(make_builder):
  """The builder `make_builder()` returns, prepared on first use: by process 0, while the
  others wait for it."""
  builder = make_builder()
  if not builder.is_prepared():
    if jax.process_index() == 0:
      _prepare_once(builder, make_builder)
    _sync("effjax_prepare_data")
    builder = make_builder()
  return builder


def _prepare_once(builder, rebuild) -> None:
  """Prepares `builder` unless another process on this filesystem is doing it: that one holds
  a lock file next to the data, this one waits for it and then reuses its result."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir)))  # .../name/cfg/ver
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as e:
    raise DatasetUnavailableError(f"cannot create the data directory {root}: {e.strerror}") from e
  lock = FileLock(os.path.join(root, f".{builder.name}.prepare.lock"))
  if not lock.acquire(blocking=False):
    logging.info("Another process is preparing %s in %s; waiting for it.", builder.name, root)
    lock.acquire(blocking=True)
  try:
    if not rebuild().is_prepared():  # prepared by the process that held the lock
      builder.download_and_prepare()
  finally:
    lock.release()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def data_source(config: DataConfig, split: str, shard: tuple[int, int] | None = None):
  """Share `shard = (index, count)` of `split` (default: this process's), random access.

  `split` may carry a TFDS slice, e.g. "train[:95%]" (see training_split)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = get_builder(config)
  base = split.split("[", 1)[0]
  if base not in builder.info.splits:
    name = "data.files" if config.files else repr(config.dataset)
    raise ValueError(f"split {split!r} not in {name}; it has {sorted(builder.info.splits)}")
  index, count = shard if shard is not None else (jax.process_index(), jax.process_count())
  return builder.as_data_source(
      split=tfds.split_for_jax_process(split, process_index=index, process_count=count))


def training_split(config: DataConfig) -> str:
  """The split training reads: `train_split` less its last `select_percent` percent."""
  if not config.select_percent:
    return config.train_split
  return f"{config.train_split}[:{100 - config.select_percent}%]"


def selection_split(config: DataConfig) -> str:
  """The held-out slice for choosing hyperparameters: the last `select_percent` percent of
  `train_split` (whole files, in the order TFDS stored them), never trained on and disjoint
  from `eval_split`, so reported numbers are not the ones they were selected on."""
  if not config.select_percent:
    raise ValueError("data.select_percent=0: there is no held-out selection slice; set it "
                     "to the percent of the training split to hold out (e.g. 5)")
  return f"{config.train_split}[{100 - config.select_percent}%:]"


def text_feature(config: DataConfig) -> str:
  """The feature holding the documents: own files are prepared with it under "text"."""
  return "text" if config.files else config.text_key


def _text_of(example, key: str):
  if key not in example:
    raise KeyError(f"data.text_key={key!r} is not a feature of this dataset; features: "
                   f"{sorted(example)}")
  return example[key]


def _window_seed(seed: int) -> int:
  # decorrelated from the file-shuffle seed; grain adds the window index to it
  return int(np.random.SeedSequence([seed, 0x5E0]).generate_state(1)[0] >> 2)


def packed_rows(config: DataConfig, split: str, *, seed: int, train: bool,
                shard: tuple[int, int] | None = None):
  """grain IterDataset of packed rows {tokens, segment_ids, positions}, each [L+1].

  Training rows are shuffled twice: files before packing (a new order every epoch), then
  rows within windows of `config.shuffle_window` rows after packing, because consecutive
  packed rows continue one file. Evaluation rows come in file order."""
  import grain  # pylint: disable=g-import-not-at-top
  ds = grain.MapDataset.source(data_source(config, split, shard))
  if train:  # a new shuffle every epoch, forever
    ds = ds.seed(seed).shuffle().repeat(None)
  key, encode = text_feature(config), tokenizer.load(config.tokenizer).encode
  # grain's prefetch threads run this map ahead of the consumer: tokenising stays off the
  # training step's path
  ds = ds.map(lambda ex: {"tokens": encode(_text_of(ex, key))}).to_iter_dataset()
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"tokens": config.seq_len + 1})
  ds = ds.map(lambda ex: {"tokens": ex["tokens"], "segment_ids": ex["tokens_segment_ids"],
                          "positions": ex["tokens_positions"]})
  if train and config.shuffle_window > 1:
    # Its state is where the current window started in the stream plus the position in it;
    # set_state refills that window, so a restored iterator yields exactly the same rows.
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=config.shuffle_window, seed=_window_seed(seed))
  return ds


def packed_dataset(config: DataConfig, split: str, *, batch_size: int, seed: int, train: bool,
                   shard: tuple[int, int] | None = None):
  """grain IterDataset of per-process batches {tokens, segment_ids, positions}, each [b, L+1]
  (`shard` as in data_source); only full batches."""
  return packed_rows(config, split, seed=seed, train=train, shard=shard).batch(
      batch_size, drop_remainder=True)


class GlobalBatches:
  """Iterates global `jax.Array` batches sharded over the mesh's batch axes."""

  def __init__(self, dataset, mesh):
    self._iterator = iter(dataset)
    self._sharding = logical_sharding(mesh, ("batch", "length"))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    local = next(self._iterator)
    return {k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v))
            for k, v in local.items()}

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(_slices_as_tuples(state))


def _slices_as_tuples(state):
  """grain's packing compares its slices with the tuple (-1, -1); a state that went through
  JSON (every checkpoint) holds lists there, which would restore a phantom remainder."""
  if isinstance(state, dict):
    return {k: ({f: tuple(v) for f, v in s.items()} if k == "remainder_slices"
                else _slices_as_tuples(s)) for k, s in state.items()}
  return state


def per_process_batch_size(global_batch_size: int, mesh) -> int:
  from effjax.parallel import data_parallel_size  # pylint: disable=g-import-not-at-top
  shards = data_parallel_size(mesh)
  if global_batch_size % shards:
    raise ValueError(f"train.global_batch_size={global_batch_size} is not divisible by the "
                     f"{shards} data-parallel shards of mesh {dict(mesh.shape)}")
  if global_batch_size % jax.process_count():
    raise ValueError(f"train.global_batch_size={global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def train_batches(config: DataConfig, mesh, *, global_batch_size: int, seed: int) -> GlobalBatches:
  batch = per_process_batch_size(global_batch_size, mesh)
  return GlobalBatches(packed_dataset(config, training_split(config), batch_size=batch,
                                      seed=seed, train=True), mesh)


def eval_batches(config: DataConfig, mesh, *, global_batch_size: int,
                 split: str | None = None) -> GlobalBatches:
  """A fresh pass over `split` (default the evaluation split) in file order, full batches
  only. effjax.train.evaluation.evaluate covers the last partial batch too."""
  batch = per_process_batch_size(global_batch_size, mesh)
  return GlobalBatches(packed_dataset(config, split or config.eval_split, batch_size=batch,
                                      seed=0, train=False), mesh)


def unigram_baseline_bpb(config: DataConfig) -> float:
  """Bits per byte of the evaluation split under the training split's unigram model over the
  same tokens (data.tokenizer's).

  Counted like the model's eval_bpb: the cost of every token after BOS (EOS included),
  divided by the bytes those tokens stand for (tokenizer.ByteCounts). Add-one smoothing keeps
  unseen tokens finite.
  """
  tok = tokenizer.load(config.tokenizer)
  key = text_feature(config)

  def counts(split):
    c, n_bytes = np.zeros(tok.vocab_size, np.int64), 0
    for example in data_source(config, split):
      ids = tok.encode(_text_of(example, key))
      c += np.bincount(ids[1:], minlength=tok.vocab_size)
      n_bytes += tok.byte_counts.count(ids)
    return c, n_bytes

  train = counts(training_split(config))[0].astype(np.float64) + 1.0
  never_predicted = sorted({tok.bos_id, tok.pad_id} - {tok.eos_id})
  train[never_predicted] = 0.0
  log2p = np.log2(np.where(train > 0, train, 1.0) / train.sum())
  held_out, n_bytes = counts(config.eval_split)
  return float(-(held_out * log2p).sum() / max(n_bytes, 1)) if n_bytes else math.nan
