"""Train a SentencePiece tokenizer on a config's training split, offline.

  python -m experiments.train_tokenizer --config=configs/lm.py:tiny_spm \\
      --config.data.files='my_texts/*.txt' --vocab_size=4000 --model_type=bpe \\
      --out=my_tokenizer.model

The documents are those training would read: the config's data (data.files, or the bundled
corpus / a prepared dataset) prepared as training prepares it, its training split
(data.train_split less data.select_percent), so no validation text shapes the vocabulary.
Every line of every document is a sentence; the model encodes any text losslessly:
byte_fallback on (a byte no piece covers is a <0xNN> piece), identity normalisation, spaces
kept as they are, and the newline a piece of its own. Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS),
3 <pad>. Use it with --config.data.tokenizer=sentencepiece:PATH (and model.vocab_size=0 to
size the model's vocabulary from it, as configs/lm.py:tiny_spm does).
"""
from __future__ import annotations

import dataclasses
import io
import os
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS
SPECIAL_IDS = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_IDS) + 1  # the byte pieces, the special ids, the newline


def training_lines(data_cfg):
  """Every non-empty line of the training split's documents (the whole split: all shares)."""
  from effjax.data import pipeline  # pylint: disable=g-import-not-at-top
  key = pipeline.text_feature(data_cfg)
  for example in pipeline.data_source(data_cfg, pipeline.training_split(data_cfg),
                                      shard=(0, 1)):
    text = example[key]
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    for line in text.split("\n"):
      if line:
        yield line


def train(data_cfg, *, vocab_size: int, model_type: str, out: str,
          max_sentences: int = 2_000_000) -> dict:
  """Trains and writes the model to `out` (atomically); returns a summary. SystemExit in one
  line for a bad argument or a vocabulary the text cannot fill."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if vocab_size < MIN_VOCAB_SIZE:
    raise SystemExit(f"--vocab_size={vocab_size} is below {MIN_VOCAB_SIZE}: the 256 byte pieces, "
                     f"{len(SPECIAL_IDS)} special ids and the newline come first")
  out_dir = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(out_dir):
    raise SystemExit(f"--out={out}: no directory {out_dir}")
  lines = training_lines(data_cfg)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=["\n"],
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        max_sentence_length=1 << 14, num_threads=os.cpu_count() or 1, minloglevel=2,
        **SPECIAL_IDS)
  except RuntimeError as e:  # e.g. a vocabulary larger than the text supports
    raise SystemExit(f"error: sentencepiece: {' '.join(str(e).split())}") from None
  tmp = f"{out}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, out)
  processor = spm.SentencePieceProcessor(model_file=out)
  return {"out": out, "vocab_size": processor.get_piece_size(), "model_type": model_type}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from effjax.errors import RunError  # pylint: disable=g-import-not-at-top
  from effjax.train import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_libraries()
  try:  # the tokenizer is what this makes: the config's may not exist yet
    cfg = config_lib.from_dict(config_lib.ExperimentConfig, cli.config_value().to_dict())
    cfg = config_lib.resolve(dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, tokenizer="byte"),
        model=dataclasses.replace(cfg.model, vocab_size=0)))
  except ValueError as e:
    raise SystemExit(f"config error: {e}") from None
  try:
    summary = train(cfg.data, vocab_size=FLAGS.vocab_size, model_type=FLAGS.model_type,
                    out=FLAGS.out, max_sentences=FLAGS.max_sentences)
  except (RunError, OSError) as e:
    raise SystemExit(f"error: {' '.join(str(e).split())}") from None
  print(f"wrote {summary['out']}: SentencePiece {summary['model_type']}, "
        f"{summary['vocab_size']} pieces; use --config.data.tokenizer=sentencepiece:"
        f"{FLAGS.out}")


def define_flags():
  """The command line's flags (--config comes from effjax.train.cli); defined only when run as
  a script, so `train` can be imported next to other entry points."""
  flags.DEFINE_integer("vocab_size", None, "Vocabulary size (pieces, including the 4 special "
                       "ids, the 256 byte pieces and the newline).", required=True)
  flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece's algorithm.")
  flags.DEFINE_string("out", None, "Where to write the .model file.", required=True)
  flags.DEFINE_integer("max_sentences", 2_000_000,
                       "Train on at most this many lines, sampled evenly (memory).")


if __name__ == "__main__":
  define_flags()
  from effjax.train import cli  # pylint: disable=g-import-not-at-top  (defines --config)
  app.run(main, flags_parser=cli.flags_parser(__doc__, sys.modules[__name__]))
