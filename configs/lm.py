"""Decoder LM configs. Select a variant with --config=configs/lm.py:VARIANT.

  tiny   the CPU default: about 1M parameters, finishes in a few minutes on 2 cores.
  tiny_spm  tiny with a SentencePiece tokenizer and the vocabulary sized from it
         (model.vocab_size=0). Give the model file: --config.data.tokenizer=sentencepiece:PATH
         (train one: python -m experiments.train_tokenizer); see README "Train on your own text".
  small  about GPT-2 small (12 x 768; 83M parameters, GPT-2 small has 85M outside its
         embeddings), for one GPU.
  test   a few-second model for the test suite.

Override any field: --config.model.d_model=256 --config.train.num_steps=1000.
"""
import ml_collections

from effjax import config as config_lib


def _defaults() -> ml_collections.ConfigDict:
  """Every field of ExperimentConfig, at its default, so overrides of unknown keys fail."""
  return ml_collections.ConfigDict(config_lib.to_dict(config_lib.ExperimentConfig()))


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = _defaults()
  if variant == "tiny":
    pass  # the dataclass defaults are the tiny CPU run
  elif variant == "tiny_spm":
    # no path: a run without --config.data.tokenizer=sentencepiece:PATH stops in one line
    c.data.tokenizer = "sentencepiece:"
    c.model.vocab_size = 0
  elif variant == "small":
    c.model.update(d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, d_ff=2304,
                   vocab_size=384, dtype="bfloat16", remat="dots_no_batch")
    c.data.seq_len = 1024
    c.optim.update(learning_rate=1e-3, warmup_steps=500)
    c.train.update(global_batch_size=64, num_steps=20_000, log_every=50, eval_every=1000,
                   checkpoint_every=1000)
  elif variant == "test":
    c.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)
    c.data.update(seq_len=32, eval_batches=2, final_eval_batches=2)
    c.optim.update(warmup_steps=2)
    c.train.update(global_batch_size=8, num_steps=8, log_every=2, eval_every=4,
                   checkpoint_every=2, async_checkpointing=False)
  else:
    raise ValueError(f"unknown variant {variant!r} of configs/lm.py; choose tiny, tiny_spm, "
                     "small or test")
  return c
