"""Training on your own text: data.files, tokenizers, honest bits/byte, the README's commands."""
import dataclasses
import gzip
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from effjax import config as config_lib
from effjax.config import DataConfig, ExperimentConfig, ModelConfig
from effjax.data import own_files, pipeline, tokenizer
from effjax.errors import DataFileError, WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the of and to in is was for on that with as by at from it an be this are which or "
         "model token bytes piece split train data file line text word space river stone "
         "light window garden number quickly slowly über café naïve façade").split()
# the cases byte counting must get exactly right: leading spaces and newlines, runs of
# spaces, tabs, CRLF, accents, CJK, emoji (byte fallback), a trailing space
SPECIAL_DOCS = (" leading space", "  two leading spaces", "\nnewline first", "\tindented",
                "windows\r\nline end", "日本語のテキスト", "emoji 😀 and 🚀!", "trailing ",
                "a    run   of spaces", "x")


def make_documents(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(n):
    lines = []
    for _ in range(int(rng.integers(1, 8))):
      indent = " " * int(rng.choice([0, 0, 4, 8]))
      lines.append(indent + " ".join(rng.choice(WORDS, int(rng.integers(3, 14)))) + ".")
    docs.append("\n".join(lines) + "\n")
  return docs + list(SPECIAL_DOCS)


def write_txt(directory, docs) -> None:
  os.makedirs(directory, exist_ok=True)
  for i, doc in enumerate(docs):
    with open(os.path.join(directory, f"doc{i:04d}.txt"), "w", encoding="utf-8",
              newline="") as f:
      f.write(doc)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(data config over 160 .txt documents, their texts)."""
  root = tmp_path_factory.mktemp("corpus")
  docs = make_documents(150)
  write_txt(root / "texts", docs)
  cfg = DataConfig(files=str(root / "texts" / "*.txt"), data_dir=str(root / "tfds"), seq_len=64,
                   validation_percent=20)
  return cfg, docs


@pytest.fixture(scope="module")
def spm_path(corpus, tmp_path_factory):
  """A byte-fallback SentencePiece model trained by experiments.train_tokenizer."""
  from experiments import train_tokenizer
  out = str(tmp_path_factory.mktemp("spm") / "tok.model")
  train_tokenizer.train(corpus[0], vocab_size=400, model_type="bpe", out=out)
  return out


def _texts(cfg, split):
  key = pipeline.text_feature(cfg)
  return [ex[key].decode("utf-8") for ex in pipeline.data_source(cfg, split, shard=(0, 1))]


# --- data.files: formats, split, cache ---

def test_every_format_is_read_as_its_documents(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  docs = make_documents(40, seed=1)
  (tmp_path / "a.txt").write_text(docs[0], encoding="utf-8")
  (tmp_path / "empty.txt").write_text("", encoding="utf-8")  # no document
  with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
    for d in docs[1:15]:
      f.write(json.dumps({"body": d, "id": 1}) + "\n")
    f.write("\n")  # a blank line is no document
  with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
    for d in docs[15:30]:
      f.write(json.dumps({"body": d}) + "\n")
  pq.write_table(pa.table({"body": docs[30:], "n": list(range(len(docs) - 30))}),
                 tmp_path / "d.parquet")
  cfg = DataConfig(files=f"{tmp_path}/*.txt,{tmp_path}/*.jsonl*,{tmp_path}/*.parquet",
                   text_key="body", data_dir=str(tmp_path / "tfds"), validation_percent=20)
  texts = _texts(cfg, "train") + _texts(cfg, "validation")
  assert sorted(texts) == sorted(docs)
  sources = {ex["source"].decode() for s in ("train", "validation")
             for ex in pipeline.data_source(cfg, s, shard=(0, 1))}
  assert f"{tmp_path}/b.jsonl:3" in sources and f"{tmp_path}/d.parquet:row0" in sources


def test_validation_percent_splits_by_document_hash_and_ignores_file_order(corpus, tmp_path):
  cfg, docs = corpus
  validation = _texts(cfg, "validation")

  def by_hash(text):  # the documented rule, computed independently
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < 20
  assert sorted(validation) == sorted(d for d in docs if by_hash(d))
  assert 0.1 < len(validation) / len(docs) < 0.3
  assert set(validation).isdisjoint(_texts(cfg, "train"))
  # the same documents, other files in another order: the same split
  write_txt(tmp_path / "shuffled", docs[::-1])
  other = dataclasses.replace(cfg, files=str(tmp_path / "shuffled" / "*.txt"),
                              data_dir=str(tmp_path / "tfds"))
  assert sorted(_texts(other, "validation")) == sorted(validation)
  wider = dataclasses.replace(other, validation_percent=40)
  assert set(validation) < set(_texts(wider, "validation"))


def test_changed_files_are_prepared_again_and_unchanged_ones_reused(tmp_path):
  docs = make_documents(60, seed=2)
  write_txt(tmp_path / "t", docs)
  cfg = DataConfig(files=str(tmp_path / "t" / "*.txt"), data_dir=str(tmp_path / "tfds"),
                   validation_percent=20)
  first = pipeline.get_builder(cfg).data_dir
  marker = os.path.join(first, "untouched")
  open(marker, "w").close()
  assert pipeline.get_builder(cfg).data_dir == first and os.path.exists(marker)  # reused
  with open(tmp_path / "t" / "doc0000.txt", "a", encoding="utf-8") as f:
    f.write("a new last line\n")
  second = pipeline.get_builder(cfg).data_dir
  assert second != first
  texts = _texts(cfg, "train") + _texts(cfg, "validation")
  assert docs[0] + "a new last line\n" in texts and docs[0] not in texts


def test_each_process_reads_only_its_share(corpus):
  cfg, _ = corpus
  shares = [{ex["source"] for ex in pipeline.data_source(cfg, "train", shard=(i, 2))}
            for i in range(2)]
  whole = {ex["source"] for ex in pipeline.data_source(cfg, "train", shard=(0, 1))}
  assert shares[0] and shares[1] and shares[0].isdisjoint(shares[1])
  assert shares[0] | shares[1] == whole


def _bad_json_files(d):
  (d / "ok.jsonl").write_text('{"text": "fine"}\n', encoding="utf-8")
  (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n', encoding="utf-8")
  return "*.jsonl", r"bad\.jsonl:2: not JSON"


def _missing_key_files(d):
  (d / "a.jsonl").write_text('{"text": "x"}\n{"body": "y"}\n', encoding="utf-8")
  return "*.jsonl", r"a\.jsonl:2: no 'text' key \(data\.text_key\)"


def _not_utf8_files(d):
  (d / "good.txt").write_text("fine", encoding="utf-8")
  (d / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
  return "*.txt", r"latin\.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"


def _unreadable_files(d):
  (d / "broken.jsonl.gz").write_bytes(b"not gzip at all")
  return "*.jsonl.gz", r"broken\.jsonl\.gz cannot be read"


def _not_parquet_files(d):
  (d / "t.parquet").write_bytes(b"PAR1 but not really")
  return "*.parquet", r"t\.parquet: not a readable Parquet file"


def _surrogate_files(d):
  (d / "s.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800"}\n', encoding="utf-8")
  return "*.jsonl", r"s\.jsonl:2: 'text' holds a lone surrogate"


def _dangling_link_files(d):
  os.symlink(d / "gone.txt", d / "link.txt")
  return "*.txt", r"link\.txt cannot be read"


def _empty_split_files(d):
  docs = [t for t in make_documents(20, seed=3) if own_files.split_of(t, 5) == "train"]
  write_txt(d, docs[:4])
  return "*.txt", r"leave the validation split empty with data\.validation_percent=5"


def _no_documents_files(d):
  (d / "a.txt").write_text("", encoding="utf-8")
  return "*.txt", r"the 0 non-empty documents of 1 file\(s\) leave the train split empty"


@pytest.mark.parametrize("make", [_bad_json_files, _missing_key_files, _not_utf8_files,
                                  _unreadable_files, _not_parquet_files, _surrogate_files,
                                  _dangling_link_files, _empty_split_files, _no_documents_files])
def test_bad_files_fail_in_one_line_and_leave_nothing_prepared(tmp_path, make):
  data = tmp_path / "data"
  data.mkdir()
  glob, message = make(data)
  cfg = DataConfig(files=str(data / glob), data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DataFileError, match=message) as e:
    pipeline.get_builder(cfg)
  assert "\n" not in str(e.value)
  # nothing half-prepared: no version directory, no temporary one
  left = [os.path.join(r, n) for r, ds, _ in os.walk(tmp_path / "tfds") for n in ds]
  assert not [p for p in left if p.endswith("1.0.0") or "incomplete" in p], left


@pytest.mark.parametrize("files, message", [
    ("{d}/*.txt", r"data\.files: '.*\*\.txt' matches no file"),
    ("{d}/x.csv", r"data\.files: '.*x\.csv' matches no file"),
])
def test_empty_globs_are_refused_before_any_work(tmp_path, files, message):
  c = _lm_config(data=dict(files=files.format(d=tmp_path)))
  with pytest.raises(ValueError, match=message):
    config_lib.from_config_dict(c)


def test_unknown_format_is_named(tmp_path):
  (tmp_path / "x.csv").write_text("a,b\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"x\.csv is not one of the formats"):
    DataConfig(files=str(tmp_path / "x.csv")).file_paths()


@pytest.mark.parametrize("values, message", [
    (dict(validation_percent=0), r"data\.validation_percent must be an integer in \[1, 50\]"),
    (dict(files="a.txt", dataset="lm1b"), r"name two datasets"),
])
def test_bad_data_values_are_named(values, message):
  with pytest.raises(ValueError, match=message):
    DataConfig(**values)


def test_validation_percent_without_files_is_refused():
  with pytest.raises(ValueError, match=r"validation_percent=10 splits data\.files"):
    DataConfig(validation_percent=10)


# --- tokenizers ---

def test_byte_tokenizer_is_the_old_one():
  tok = tokenizer.load("byte")
  text = "déjà vu 😀\n"
  np.testing.assert_array_equal(tok.encode(text), tokenizer.encode(text))
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
  assert tok.byte_counts.count(tok.encode(text)) == len(text.encode("utf-8"))
  assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_counts_every_byte_of_the_validation_split(corpus, spm_path):
  cfg, _ = corpus
  tok = tokenizer.load(f"sentencepiece:{spm_path}")
  texts = _texts(cfg, "validation") + list(SPECIAL_DOCS)
  ids = [tok.encode(t) for t in texts]
  # the dummy "▁" SentencePiece puts in front of each document is really there, and no byte
  first = [tok._sp.id_to_piece(int(i[1])) for i in ids]  # pylint: disable=protected-access
  assert all(p.startswith(tokenizer.SPACE_MARKER) for p in first)
  assert sum(tok.byte_counts.count(i) for i in ids) == sum(len(t.encode()) for t in texts)
  for text, i in zip(texts, ids):
    assert tok.byte_counts.count(i) == len(text.encode("utf-8")), repr(text)
    assert tok.decode(i) == text
  stream = np.concatenate(ids)  # documents back to back, as packing puts them
  assert tok.byte_counts.count(stream) == sum(len(t.encode()) for t in texts)
  sp = tok._sp  # pylint: disable=protected-access
  pieces = {sp.id_to_piece(i) for i in range(tok.vocab_size)}
  assert "<0xF0>" in pieces and "\n" in pieces  # byte fallback; the newline is a piece


def _eval_bytes(model_cfg, byte_counts, docs_ids, width):
  """The eval step's byte count over whole documents, one per row."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from effjax.models.decoder_lm import DecoderLM
  from effjax.train import step as step_lib
  model = DecoderLM(model_cfg)
  params = nn.meta.unbox(jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32)))(
      jax.random.key(0))["params"])
  batch = {k: np.zeros((len(docs_ids), width), np.int32)
           for k in ("tokens", "segment_ids", "positions")}
  for r, ids in enumerate(docs_ids):
    batch["tokens"][r, :len(ids)] = ids
    batch["segment_ids"][r, :len(ids)] = 1
    batch["positions"][r, :len(ids)] = np.arange(len(ids))
  out = jax.jit(step_lib.make_eval_step(model, byte_counts))(params, {}, batch)
  return float(out["bytes"])


def test_eval_step_counts_the_bytes_the_targets_stand_for(spm_path):
  tok = tokenizer.load(f"sentencepiece:{spm_path}")
  texts = list(SPECIAL_DOCS) + ["the model reads a file", " café"]
  ids = [tok.encode(t) for t in texts]
  width = max(len(i) for i in ids)
  model_cfg = ModelConfig(vocab_size=512, d_model=16, num_layers=1, num_heads=2,
                          num_kv_heads=1, d_ff=32)
  assert _eval_bytes(model_cfg, tok.byte_counts, ids, width) == sum(
      len(t.encode("utf-8")) for t in texts)
  byte_ids = [tokenizer.encode(t) for t in texts]  # the default: the byte tokenizer's
  assert _eval_bytes(model_cfg, None, byte_ids, max(len(i) for i in byte_ids)) == sum(
      len(t.encode("utf-8")) for t in texts)


def test_unigram_baseline_is_over_the_tokenizers_tokens(corpus, spm_path):
  cfg, _ = corpus
  spm_cfg = dataclasses.replace(cfg, tokenizer=f"sentencepiece:{spm_path}")
  tok = tokenizer.load(spm_cfg.tokenizer)
  counts = np.zeros(tok.vocab_size)
  for text in _texts(cfg, "train"):
    counts += np.bincount(tok.encode(text)[1:], minlength=tok.vocab_size)
  counts += 1
  counts[[tok.bos_id, tok.pad_id]] = 0
  log2p = np.log2(np.where(counts > 0, counts, 1) / counts.sum())
  valid = _texts(cfg, "validation")
  bits = -sum(log2p[tok.encode(t)[1:]].sum() for t in valid)
  want = bits / sum(len(t.encode("utf-8")) for t in valid)
  assert pipeline.unigram_baseline_bpb(spm_cfg) == pytest.approx(want, rel=1e-12)
  assert pipeline.unigram_baseline_bpb(spm_cfg) != pytest.approx(
      pipeline.unigram_baseline_bpb(cfg), rel=1e-3)


def test_packed_rows_carry_the_tokenizers_ids(corpus, spm_path):
  cfg, _ = corpus
  spm_cfg = dataclasses.replace(cfg, tokenizer=f"sentencepiece:{spm_path}")
  tok = tokenizer.load(spm_cfg.tokenizer)
  rows = list(pipeline.packed_rows(spm_cfg, "validation", seed=0, train=False))
  stream = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
  want = np.concatenate([tok.encode(t) for t in _texts(cfg, "validation")])
  np.testing.assert_array_equal(stream, want[:len(stream)])
  assert len(want) - len(stream) < cfg.seq_len + 1  # at most the last, partial row


def _hf_tokenizer(tmp_path, texts, kind: str) -> str:
  """A BPE tokenizer.json trained here: GPT-2's byte level, or a Metaspace ("▁") one."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  if kind == "bytelevel":
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  else:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    alphabet = []
  trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=alphabet,
                                special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
  tok.train_from_iterator(texts, trainer)
  path = str(tmp_path / f"{kind}.json")
  tok.save(path)
  return path


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_hf_tokenizer_encodes_as_the_tokenizers_library_does(tmp_path, kind):
  from tokenizers import Tokenizer
  docs = make_documents(60, seed=4)
  path = _hf_tokenizer(tmp_path, docs + list(SPECIAL_DOCS), kind)
  tok = tokenizer.load(f"hf:{path}")
  reference = Tokenizer.from_file(path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(
      reference.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
  assert tok.vocab_size == reference.get_vocab_size()
  for text in docs[:20] + list(SPECIAL_DOCS):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.dtype == np.int32
    assert ids[1:-1].tolist() == reference.encode(text, add_special_tokens=False).ids
    # bytes counted = the UTF-8 length of what the ids decode to (the text, at byte level;
    # Metaspace drops a document's leading space, and so does the count)
    decoded = tok.decode(ids)
    assert tok.byte_counts.count(ids) == len(decoded.encode("utf-8")), repr(text)
    assert decoded == (text if kind == "bytelevel" else text[1:] if text[0] == " " else text)
  # special-token text inside a document is text, not the document's end
  literal = tok.encode("a literal </s> here")
  assert tok.eos_id not in literal[1:-1]
  reference.encode_special_tokens = True
  assert literal[1:-1].tolist() == reference.encode("a literal </s> here",
                                                    add_special_tokens=False).ids


@pytest.mark.parametrize("spec, message", [
    ("wordpiece:x.json", r"data\.tokenizer='wordpiece:x\.json': the kind 'wordpiece' is not one"),
    ("sentencepiece:", r"data\.tokenizer='sentencepiece:' names no file: give "
                       r"--config\.data\.tokenizer=sentencepiece:PATH"),
    ("sentencepiece:{d}/missing.model", r"no such file .*missing\.model"),
    ("sentencepiece:{d}/tok.json", r"tok\.json is not a SentencePiece model"),
    ("hf:{d}/tok.model", r"tok\.model is not a Hugging Face tokenizer\.json"),
])
def test_bad_tokenizer_files_are_named(tmp_path, spm_path, spec, message):
  import shutil
  shutil.copy(spm_path, tmp_path / "tok.model")
  (tmp_path / "tok.json").write_text('{"version": "1.0"}', encoding="utf-8")
  c = _lm_config(data=dict(tokenizer=spec.format(d=tmp_path)))
  with pytest.raises(ValueError, match=message) as e:
    config_lib.from_config_dict(c)
  assert "\n" not in str(e.value)


def _lm_config(**sections):
  sys.path.insert(0, REPO)
  from configs import lm
  c = lm.get_config("test").to_dict()
  for section, values in sections.items():
    c[section].update(values)
  return c


def test_vocab_size_zero_rounds_the_tokenizers_size_up_to_128(spm_path):
  spec = f"sentencepiece:{spm_path}"
  cfg = config_lib.from_config_dict(_lm_config(data=dict(tokenizer=spec),
                                               model=dict(vocab_size=0)))
  assert tokenizer.load(spec).vocab_size == 400 and cfg.model.vocab_size == 512
  byte = config_lib.from_config_dict(_lm_config(model=dict(vocab_size=0)))
  assert byte.model.vocab_size == 384
  assert config_lib.from_config_dict(_lm_config(data=dict(tokenizer=spec),
                                                model=dict(vocab_size=400))).model.vocab_size == 400
  with pytest.raises(ValueError, match=r"model\.vocab_size=300 is smaller than the 400 tokens "
                                       r"of data\.tokenizer='sentencepiece:.*tok\.model'; set "
                                       r"model\.vocab_size=0 .*\(512\)"):
    config_lib.from_config_dict(_lm_config(data=dict(tokenizer=spec), model=dict(vocab_size=300)))


def test_tiny_spm_needs_the_tokenizer_path_and_sizes_its_vocabulary(spm_path):
  sys.path.insert(0, REPO)
  from configs import lm
  with pytest.raises(ValueError, match=r"names no file: give --config\.data\.tokenizer="):
    config_lib.from_config_dict(lm.get_config("tiny_spm"))
  c = lm.get_config("tiny_spm")
  c.data.tokenizer = f"sentencepiece:{spm_path}"
  cfg = config_lib.from_config_dict(c)
  tiny = config_lib.from_config_dict(lm.get_config("tiny"))
  assert cfg.model == dataclasses.replace(tiny.model, vocab_size=512)


def test_a_checkpointed_workdir_keeps_its_tokenizer(tmp_path, spm_path):
  from effjax.train import workdir as workdir_lib
  import shutil
  workdir = tmp_path / "run"
  workdir.mkdir()
  cfg = ExperimentConfig(data=DataConfig(tokenizer=f"sentencepiece:{spm_path}"),
                         model=ModelConfig(vocab_size=512))
  installed = workdir_lib.install_tokenizer(str(workdir), cfg)
  assert installed.data.tokenizer == f"sentencepiece:{workdir}/tokenizer.model"
  assert open(workdir / "tokenizer.model", "rb").read() == open(spm_path, "rb").read()
  (workdir / "checkpoints" / "10").mkdir(parents=True)  # the run saved
  assert workdir_lib.install_tokenizer(str(workdir), cfg) == installed  # same file: resumes
  other = tmp_path / "other.model"
  shutil.copy(spm_path, other)
  with open(other, "ab") as f:
    f.write(b"\0")
  with pytest.raises(WorkdirError, match=r"not the tokenizer the checkpoints of .* were "
                                         r"trained with \(.*tokenizer\.model\)"):
    workdir_lib.install_tokenizer(str(workdir), dataclasses.replace(
        cfg, data=DataConfig(tokenizer=f"sentencepiece:{other}")))
  with pytest.raises(WorkdirError, match=r"data\.tokenizer='byte' is not the tokenizer"):
    workdir_lib.install_tokenizer(str(workdir), ExperimentConfig())


# --- the command line: errors before compilation, and the README's four commands ---

def _run(args, cwd, timeout=300):
  """A user's command: one CPU device (not the suite's 8 simulated ones), from `cwd`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_bad_line_stops_the_run_before_compiling(tmp_path):
  (tmp_path / "t").mkdir()
  write_txt(tmp_path / "t", make_documents(30))
  (tmp_path / "t" / "x.jsonl").write_text('{"text": "ok"}\n{"txt": "oops"}\n', encoding="utf-8")
  out = _run([sys.executable, "-m", "experiments.train", "--config=configs/lm.py:test",
              f"--workdir={tmp_path}/run", f"--config.data.files={tmp_path}/t/*",
              f"--config.data.data_dir={tmp_path}/tfds"], cwd=tmp_path)
  assert out.returncode == 1, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert errors == [f"error: data.files: {tmp_path}/t/x.jsonl:2: no 'text' key "
                    "(data.text_key); the line has ['txt']"]
  assert "Traceback" not in out.stderr and "train step memory" not in out.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def readme_commands() -> list[str]:
  """The commands of the README's "Train on your own text" section, in order."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  section = readme.split("## Train on your own text", 1)[1].split("\n## ", 1)[0]
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
  return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


# small sizes for the test, appended to the README's commands (absl: the last value wins)
SMALL = {
    "experiments.train_tokenizer": ["--vocab_size=500"],
    "experiments.train": ["--config.train.num_steps=4", "--config.train.eval_every=4",
                          "--config.train.checkpoint_every=4", "--config.optim.warmup_steps=1",
                          "--config.data.seq_len=32", "--config.train.global_batch_size=4",
                          "--config.model.d_model=32", "--config.model.num_layers=1",
                          "--config.model.d_ff=64", "--config.data.eval_batches=2"],
    "experiments.sample": ["--max_new_tokens=8"],
    "experiments.evaluate": ["--max_batches=2"],
}


@pytest.mark.slow
def test_the_readme_takes_a_folder_of_files_to_an_evaluation(tmp_path):
  commands = readme_commands()
  modules = [shlex.split(c)[2] for c in commands]
  assert modules == list(SMALL), commands
  texts = re.search(r"--config\.data\.files='?([^' ]+?)/\*\.txt", commands[0]).group(1)
  write_txt(tmp_path / texts, make_documents(150))
  data_dir = f"--config.data.data_dir={tmp_path}/tfds"  # not the user's TFDS directory
  outputs = []
  for command, module in zip(commands, modules):
    args = shlex.split(command)
    assert args[:2] == [".venv/bin/python", "-m"]
    extra = SMALL[module] + ([data_dir] if "--config" in command else [])
    out = _run([sys.executable] + args[1:] + extra, cwd=tmp_path)
    assert out.returncode == 0, (command, out.stderr[-3000:])
    outputs.append(out.stdout)
    if module == "experiments.train":  # the run directory is self-contained from here on
      tokenizer_file = re.search(r"sentencepiece:(\S+)", command).group(1)
      os.rename(tmp_path / tokenizer_file, tmp_path / "moved.model")
  workdir = re.search(r"--workdir=(\S+)", commands[1]).group(1)
  with open(tmp_path / workdir / "config.json", encoding="utf-8") as f:
    recorded = json.load(f)
  assert recorded["data"]["tokenizer"] == "sentencepiece:tokenizer.model"
  assert recorded["model"]["vocab_size"] == 512  # 500 rounded up to 128
  assert "--- sample 0 ---" in outputs[2]
  result = re.search(r"([0-9.]+) bits/byte", outputs[3])
  assert result and 0 < float(result.group(1)) < 16 and math.isfinite(float(result.group(1)))
