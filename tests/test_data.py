import json

import jax
import numpy as np
import pytest

from effjax.config import DataConfig, MeshConfig
from effjax.data import pipeline, stdlib_corpus, tokenizer
from effjax.parallel import build_mesh


@pytest.fixture
def data_config(tfds_dir):
  return DataConfig(data_dir=tfds_dir, seq_len=32)


@pytest.fixture
def mesh():
  return build_mesh(MeshConfig(), jax.devices()[:1])


def test_tokenizer_round_trip():
  ids = tokenizer.encode("déjà vu\n")
  assert ids[0] == tokenizer.BOS and ids[-1] == tokenizer.EOS and ids.dtype == np.int32
  assert ids.max() < tokenizer.VOCAB_SIZE
  assert tokenizer.decode(ids) == "déjà vu\n"


def test_split_is_by_file_disjoint_and_deterministic(data_config):
  files = stdlib_corpus.stdlib_files()
  assert len(files) > 100
  assert not any("site-packages" in f or f.startswith("test/") for f in files)
  splits = {s: [f for f in files if stdlib_corpus.split_of(f) == s] for s in ("train", "validation")}
  assert 0.02 < len(splits["validation"]) / len(files) < 0.1
  assert splits == {s: [f for f in stdlib_corpus.stdlib_files()
                        if stdlib_corpus.split_of(f) == s] for s in splits}
  paths = {s: {ex["path"].decode() for ex in pipeline.data_source(data_config, s)}
           for s in ("train", "validation")}
  assert paths["train"].isdisjoint(paths["validation"])
  assert paths == {s: set(v) for s, v in splits.items()}


def test_batches_are_packed_and_sharded(data_config, mesh):
  batches = pipeline.train_batches(data_config, mesh, global_batch_size=4, seed=0)
  batch = next(batches)
  assert set(batch) == {"tokens", "segment_ids", "positions"}
  for v in batch.values():
    assert v.shape == (4, 33) and v.dtype == np.int32
  tokens, segments, positions = (np.asarray(batch[k]) for k in ("tokens", "segment_ids",
                                                                  "positions"))
  assert tokens.max() < tokenizer.VOCAB_SIZE
  # positions restart at every new segment and count up inside it
  starts = np.concatenate([np.ones((4, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  assert (positions[starts] == 0).all()
  assert (positions[:, 1:][~starts[:, 1:]] == positions[:, :-1][~starts[:, 1:]] + 1).all()


def test_iterator_state_restores_exactly_through_json(data_config, mesh):
  first = pipeline.train_batches(data_config, mesh, global_batch_size=4, seed=3)
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  expected = [np.asarray(next(first)["tokens"]) for _ in range(4)]
  second = pipeline.train_batches(data_config, mesh, global_batch_size=4, seed=3)
  second.set_state(state)
  got = [np.asarray(next(second)["tokens"]) for _ in range(4)]
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)


def test_seed_changes_order(data_config, mesh):
  a = next(pipeline.train_batches(data_config, mesh, global_batch_size=4, seed=0))["tokens"]
  b = next(pipeline.train_batches(data_config, mesh, global_batch_size=4, seed=1))["tokens"]
  assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_batch_not_divisible_by_data_shards(data_config):
  mesh = build_mesh(MeshConfig(data=4, tensor=2))
  with pytest.raises(ValueError, match=r"global_batch_size=6 is not divisible by the 4"):
    pipeline.train_batches(data_config, mesh, global_batch_size=6, seed=0)


def test_unprepared_registered_dataset_says_what_to_do(tmp_path):
  cfg = DataConfig(dataset="lm1b", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"never downloads at run time.*array_record"):
    pipeline.get_builder(cfg)


def test_unknown_dataset_and_text_key(tmp_path, data_config, mesh):
  with pytest.raises(ValueError, match=r"'no_such_corpus' is not a TFDS dataset"):
    pipeline.get_builder(DataConfig(dataset="no_such_corpus", data_dir=str(tmp_path)))
  bad_key = DataConfig(data_dir=data_config.data_dir, seq_len=32, text_key="content")
  with pytest.raises(KeyError, match=r"text_key='content' is not a feature"):
    next(pipeline.train_batches(bad_key, mesh, global_batch_size=4, seed=0))


def test_unigram_baseline_is_a_sensible_entropy(data_config):
  bpb = pipeline.unigram_baseline_bpb(data_config)
  assert 3.0 < bpb < 6.0  # English-like source code bytes; uniform would be 8


def test_registered_array_record_dataset_is_read_by_name(data_config, mesh):
  """The generic TFDS path: a registered builder already prepared as array_record."""
  import sys
  pipeline.get_builder(data_config)  # prepares the corpus, which also registers its builder
  name = f"python_stdlib/py{sys.version_info.major}.{sys.version_info.minor}"
  generic = DataConfig(dataset=name, data_dir=data_config.data_dir, seq_len=32)
  a = next(pipeline.train_batches(generic, mesh, global_batch_size=4, seed=0))
  b = next(pipeline.train_batches(data_config, mesh, global_batch_size=4, seed=0))
  np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
