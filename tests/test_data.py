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


# --- sequence-level shuffle, evaluation coverage, the selection slice (issue 14) ---

def _document_of(row_tokens, row_segments, texts):
  """The training files containing this row's longest packed piece. Identical text in
  several files (licence headers) maps to one shared key, so distinctness is undercounted."""
  ids, counts = np.unique(row_segments[row_segments > 0], return_counts=True)
  piece = row_tokens[row_segments == ids[np.argmax(counts)]]
  text = bytes(piece[piece < 256].astype(np.uint8))
  return frozenset(i for i, t in enumerate(texts) if text in t)


@pytest.mark.parametrize("window, min_distinct", [(DataConfig().shuffle_window, 8), (1, None)])
def test_tiny_training_batches_mix_documents(tfds_dir, mesh, window, min_distinct):
  from effjax.config import TrainConfig
  cfg = DataConfig(data_dir=tfds_dir, shuffle_window=window)  # the tiny config's data
  batch_size = TrainConfig().global_batch_size
  texts = [ex["text"] for ex in pipeline.data_source(cfg, cfg.train_split)]
  batches = pipeline.train_batches(cfg, mesh, global_batch_size=batch_size, seed=0)
  distinct = []
  for _ in range(4):
    batch = {k: np.asarray(v) for k, v in next(batches).items()}
    docs = [_document_of(batch["tokens"][r], batch["segment_ids"][r], texts)
            for r in range(batch_size)]
    assert all(docs)  # every row was found in the corpus
    distinct.append(len(set(docs)))
  if min_distinct:
    assert min(distinct) >= min_distinct, distinct
  else:  # without the row shuffle a batch is one contiguous run of a file
    assert max(distinct) <= 2, distinct


@pytest.mark.parametrize("skip", [5, 8])  # mid-window and exactly at a window's end
def test_window_shuffle_state_resumes_exactly(data_config, mesh, skip):
  import dataclasses
  cfg = dataclasses.replace(data_config, shuffle_window=16)  # 4 batches of 4 per window
  first = pipeline.train_batches(cfg, mesh, global_batch_size=4, seed=3)
  for _ in range(skip):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  expected = [np.asarray(next(first)["tokens"]) for _ in range(9)]
  second = pipeline.train_batches(cfg, mesh, global_batch_size=4, seed=3)
  second.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(np.asarray(next(second)["tokens"]), want)


def test_window_shuffle_permutes_the_packed_rows(data_config):
  import dataclasses
  def rows(window, n):
    cfg = dataclasses.replace(data_config, shuffle_window=window)
    it = iter(pipeline.packed_rows(cfg, "train", seed=0, train=True))
    return [tuple(next(it)["tokens"]) for _ in range(n)]
  plain, shuffled = rows(1, 64), rows(64, 64)
  assert plain != shuffled and sorted(plain) == sorted(shuffled)  # same window, new order


def test_selection_slice_is_held_out_from_training_and_validation(tfds_dir):
  cfg = DataConfig(data_dir=tfds_dir, seq_len=32, select_percent=10)
  paths = {name: {ex["path"] for ex in pipeline.data_source(cfg, split)}
           for name, split in (("train", pipeline.training_split(cfg)),
                               ("select", pipeline.selection_split(cfg)),
                               ("validation", cfg.eval_split),
                               ("all_train", cfg.train_split))}
  assert paths["train"].isdisjoint(paths["select"])
  assert paths["select"].isdisjoint(paths["validation"])
  assert paths["train"] | paths["select"] == paths["all_train"]
  assert 0.05 < len(paths["select"]) / len(paths["all_train"]) < 0.15
  with pytest.raises(ValueError, match=r"select_percent=0"):
    pipeline.selection_split(DataConfig(data_dir=tfds_dir))


@pytest.mark.parametrize("field, value", [("shuffle_window", 0), ("select_percent", 50),
                                          ("select_percent", -1), ("eval_batches", -2),
                                          ("final_eval_batches", -1)])
def test_bad_data_fields_are_named(field, value):
  with pytest.raises(ValueError, match=rf"data\.{field} .*{value}"):
    DataConfig(**{field: value})


def test_spread_indices_reach_both_ends():
  from effjax.train.evaluation import spread_indices
  idx = spread_indices(100, 5)
  assert idx.tolist() == [0, 25, 50, 74, 99]
  assert spread_indices(3, 0).tolist() == [0, 1, 2] == spread_indices(3, 10).tolist()


def _eval_setup(tfds_dir, batch_sizes, split):
  import flax.linen as nn
  import jax.numpy as jnp
  from effjax.config import ExperimentConfig, ModelConfig, TrainConfig
  from effjax.models.decoder_lm import DecoderLM
  from effjax.train import step as step_lib
  model_cfg = ModelConfig(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64)
  cfgs = {b: ExperimentConfig(model=model_cfg,
                              data=DataConfig(data_dir=tfds_dir, seq_len=32, eval_split=split),
                              train=TrainConfig(global_batch_size=b, num_steps=100))
          for b in batch_sizes}
  model = DecoderLM(model_cfg)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
  return cfgs, jax.jit(step_lib.make_eval_step(model)), nn.meta.unbox(init(jax.random.key(0)))


def test_evaluation_covers_every_row_including_the_last_partial_batch(tfds_dir, mesh):
  from effjax.train.evaluation import evaluate
  split = "validation[:3]"  # three files: fast, and not a multiple of either batch size
  rows = list(pipeline.packed_rows(DataConfig(data_dir=tfds_dir, seq_len=32), split, seed=0,
                                   train=False))
  segments = np.stack([r["segment_ids"] for r in rows])
  targets = int(((segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)).sum())
  results = {}
  cfgs, eval_step, params = _eval_setup(tfds_dir, (8, 10), split)
  for batch_size, cfg in cfgs.items():
    assert len(rows) % batch_size  # a partial last batch is there to be dropped
    results[batch_size] = evaluate(eval_step, params, {}, cfg, mesh)
    assert results[batch_size]["eval_tokens"] == targets
    assert results[batch_size]["eval_batches"] == -(-len(rows) // batch_size)
  # the same rows, differently batched and padded: the same loss (padding adds nothing)
  np.testing.assert_allclose(results[8]["eval_loss"], results[10]["eval_loss"], rtol=1e-5)
  sample = evaluate(eval_step, params, {}, cfg, mesh, max_batches=2)
  assert sample["eval_batches"] == 2 and sample["eval_tokens"] < targets
  with pytest.raises(ValueError, match=r"max_batches must be an integer >= 0.*-1"):
    evaluate(eval_step, params, {}, cfg, mesh, max_batches=-1)
