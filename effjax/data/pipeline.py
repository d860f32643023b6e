"""Input pipeline: TFDS array_record source -> grain -> packed byte sequences -> global arrays.

Each process reads only its share of a split (`tfds.split_for_jax_process`). Documents are
tokenised as [BOS, bytes..., EOS], concatenated and cut into rows of `seq_len + 1` tokens with
segment ids and positions, so the model can keep packed documents apart. The training iterator
is checkpointable: its state is a small JSON-able dict saved with every checkpoint.
"""
from __future__ import annotations

import math

import jax
import numpy as np

from effjax.config import DataConfig
from effjax.data import tokenizer
from effjax.parallel import logical_sharding

BUILTIN = "python_stdlib"


def get_builder(config: DataConfig):
  """The TFDS builder for `config.dataset`, prepared in array_record format."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = config.data_dir or None
  if config.dataset == BUILTIN:
    from effjax.data import stdlib_corpus  # pylint: disable=g-import-not-at-top
    builder = stdlib_corpus.PythonStdlib(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      if jax.process_index() == 0:
        builder.download_and_prepare()
      _sync("effjax_prepare_data")
      builder = stdlib_corpus.PythonStdlib(data_dir=data_dir, file_format="array_record")
    return builder
  try:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  except Exception as e:  # tfds raises several kinds for an unknown name
    raise ValueError(f"data.dataset={config.dataset!r} is not a TFDS dataset known here "
                     f"({type(e).__name__}: {e})") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"data.dataset={config.dataset!r} is not prepared under {builder.data_dir}. effjax never "
        "downloads at run time. On a machine with network access, prepare it in array_record "
        f"format (tfds.builder({config.dataset!r}, file_format='array_record')"
        ".download_and_prepare()) and copy the result to --config.data.data_dir, or use "
        f"--config.data.dataset={BUILTIN} (the offline corpus).")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f"data.dataset={config.dataset!r} under {builder.data_dir} is stored as "
        f"{builder.info.file_format.value}; random access needs array_record. Prepare it again "
        "with file_format='array_record'.")
  return builder


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def data_source(config: DataConfig, split: str, shard: tuple[int, int] | None = None):
  """Share `shard = (index, count)` of `split` (default: this process's), random access."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = get_builder(config)
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not in {config.dataset!r}; it has "
                     f"{sorted(builder.info.splits)}")
  index, count = shard if shard is not None else (jax.process_index(), jax.process_count())
  return builder.as_data_source(
      split=tfds.split_for_jax_process(split, process_index=index, process_count=count))


def _text_of(example, key: str):
  if key not in example:
    raise KeyError(f"data.text_key={key!r} is not a feature of this dataset; features: "
                   f"{sorted(example)}")
  return example[key]


def packed_dataset(config: DataConfig, split: str, *, batch_size: int, seed: int, train: bool,
                   shard: tuple[int, int] | None = None):
  """grain IterDataset of per-process batches {tokens, segment_ids, positions}, each [b, L+1]
  (`shard` as in data_source)."""
  import grain  # pylint: disable=g-import-not-at-top
  ds = grain.MapDataset.source(data_source(config, split, shard))
  if train:  # a new shuffle every epoch, forever
    ds = ds.seed(seed).shuffle().repeat(None)
  key = config.text_key
  ds = ds.map(lambda ex: {"tokens": tokenizer.encode(_text_of(ex, key))}).to_iter_dataset()
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"tokens": config.seq_len + 1})
  ds = ds.map(lambda ex: {"tokens": ex["tokens"], "segment_ids": ex["tokens_segment_ids"],
                          "positions": ex["tokens_positions"]})
  return ds.batch(batch_size, drop_remainder=True)


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
    self._iterator.set_state(state)


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
  return GlobalBatches(packed_dataset(config, config.train_split, batch_size=batch, seed=seed,
                                      train=True), mesh)


def eval_batches(config: DataConfig, mesh, *, global_batch_size: int) -> GlobalBatches:
  """A fresh pass over the evaluation split, in file order."""
  batch = per_process_batch_size(global_batch_size, mesh)
  return GlobalBatches(packed_dataset(config, config.eval_split, batch_size=batch, seed=0,
                                      train=False), mesh)


def unigram_baseline_bpb(config: DataConfig) -> float:
  """Bits per byte of the evaluation split under the training split's byte unigram model.

  Counted like the model's eval_bpb: the cost of every byte and EOS token, divided by the
  number of bytes. Add-one smoothing keeps unseen bytes finite.
  """
  def counts(split):
    c = np.zeros(tokenizer.VOCAB_SIZE, np.int64)
    for example in data_source(config, split):
      c += np.bincount(tokenizer.encode(_text_of(example, config.text_key))[1:],
                       minlength=tokenizer.VOCAB_SIZE)
    return c

  train = counts(config.train_split).astype(np.float64) + 1.0
  train[[tokenizer.BOS, tokenizer.PAD]] = 0.0  # never predicted
  log2p = np.log2(np.where(train > 0, train, 1.0) / train.sum())
  held_out = counts(config.eval_split)
  n_bytes = held_out[:256].sum()
  return float(-(held_out * log2p).sum() / max(n_bytes, 1)) if n_bytes else math.nan
