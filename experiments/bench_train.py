"""Training throughput: the full loop vs a bare jitted step of the same model, side by side.

  python -m experiments.bench_train                       # tiny and small, config shapes
  python -m experiments.bench_train --variants=small --batch=4 --seq_len=256   # small on a CPU
  python -m experiments.bench_train --variants=tiny \
      --tokenizers=byte,sentencepiece:my_tokenizer.model      # a row per tokenizer

For each variant it times (a) the real loop, `train_and_evaluate` with evaluation off (data
pipeline, host-to-device transfer, metric fetches, progress lines) over the last `--steps`
steps of a 2 x `--steps` run, and (b) the bare compiled train step called `--steps` times on one
resident batch after `--steps` warm-up calls. loop/bare > 1 is the loop's overhead. Model
TFLOP/s are per device (effjax's structure-aware `flops_per_token`); on a device whose peak is
known (effjax/train/throughput.py: the dense peak for the model's matmul dtype) it also prints
model FLOPs utilisation, as the training loop logs it.

`--tokenizers` times each variant once per tokenizer (data.tokenizer values; a file
tokenizer sizes the model's vocabulary from itself, model.vocab_size=0), so one run shows
what tokenising in the input pipeline costs the loop: its loop/bare next to the byte row's.
`--files` trains on your own files (data.files) instead of the bundled corpus.
"""
from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax

from configs import lm
from effjax import config as config_lib
from effjax.models.decoder_lm import count_params, flops_per_token
from effjax.train import throughput
from effjax.train.loop import train_and_evaluate
from experiments.runs import compiled_step_on_one_batch
from effjax.train.metrics import read_metrics

_VARIANTS = flags.DEFINE_list("variants", ["tiny", "small"], "configs/lm.py variants to time.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (as many again are warm-up).")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch size override (0: the config's).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Sequence length override (0: the config's).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir (default: the TFDS default).")
_TOKENIZERS = flags.DEFINE_list(
    "tokenizers", ["byte"], "data.tokenizer values to time each variant with (byte, "
    "sentencepiece:PATH, hf:PATH); a row per variant and tokenizer.")
_FILES = flags.DEFINE_string("files", "", "data.files globs to train on (default: the "
                             "bundled corpus).")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for the results.")

def _config(variant: str, tokenizer: str = "byte") -> config_lib.ExperimentConfig:
  c = lm.get_config(variant)
  c.data.tokenizer = tokenizer
  if tokenizer != "byte":
    c.model.vocab_size = 0  # the tokenizer's size, rounded up to a multiple of 128
  c.data.files = _FILES.value
  if _BATCH.value:
    c.train.global_batch_size = _BATCH.value
  if _SEQ_LEN.value:
    c.data.seq_len = _SEQ_LEN.value
  c.data.data_dir = _DATA_DIR.value
  c.train.update(num_steps=2 * _STEPS.value, log_every=_STEPS.value, eval_every=0,
                 checkpoint_every=0, async_checkpointing=False)
  c.optim.warmup_steps = min(c.optim.warmup_steps, _STEPS.value)
  return config_lib.from_config_dict(c)


def time_bare_step(cfg: config_lib.ExperimentConfig) -> tuple[float, int]:
  """(seconds per step, parameter count) of the compiled train step alone."""
  train_step, state, batch = compiled_step_on_one_batch(cfg)
  for _ in range(_STEPS.value):
    state, metrics = train_step(state, batch)
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = train_step(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / _STEPS.value, count_params(state.params)


def time_loop(cfg: config_lib.ExperimentConfig) -> float:
  """Seconds per step of the full loop over its last log interval (compilation excluded)."""
  with tempfile.TemporaryDirectory() as workdir:
    train_and_evaluate(cfg, workdir)
    record = read_metrics(os.path.join(workdir, "metrics.jsonl"))[cfg.train.num_steps]
  return record["step_time_sec"]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  device = jax.devices()[0]
  rows, peaks = [], {}
  for variant, tokenizer in ((v, t) for v in _VARIANTS.value for t in _TOKENIZERS.value):
    cfg = _config(variant, tokenizer)
    bare, n_params = time_bare_step(cfg)
    loop = time_loop(cfg)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    # per device: the step runs on all of them (mesh.data=-1)
    flops = flops_per_token(cfg.model, cfg.data.seq_len)["train"] * tokens / jax.device_count()
    row = dict(variant=variant, tokenizer=tokenizer.split(":", 1)[0], params=n_params,
               batch=cfg.train.global_batch_size, seq_len=cfg.data.seq_len,
               dtype=cfg.model.dtype, bare_step_s=bare,
               bare_tokens_per_s=tokens / bare, loop_step_s=loop, loop_tokens_per_s=tokens / loop,
               loop_over_bare=loop / bare, model_tflops_per_device=flops / bare / 1e12)
    peak, about = throughput.device_peak_flops(device, cfg.model.dtype)
    peaks[cfg.model.dtype] = (peak, about)
    if peak:
      row.update(mfu_bare=flops / bare / peak, mfu_loop=flops / loop / peak)
    rows.append(row)
  with_mfu = any("mfu_bare" in r for r in rows)

  print(f"\ndevice: {jax.device_count()} x {device.device_kind} ({device.platform}), "
        f"jax {jax.__version__}, {_STEPS.value} timed steps")
  for dtype, (peak, about) in peaks.items():
    print(f"MFU of {dtype} models: against {about}" if peak else f"no MFU for {dtype} models: "
          f"{about}")
  header = ["variant", "tokenizer", "params", "batch x len", "dtype", "bare s/step",
            "bare tok/s", "loop s/step", "loop tok/s", "loop/bare", "model TF/s/device"] + (
                ["MFU bare", "MFU loop"] if with_mfu else [])
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    cells = [r["variant"], r["tokenizer"], f"{r['params'] / 1e6:.2f}M",
             f"{r['batch']} x {r['seq_len']}", r["dtype"], f"{r['bare_step_s']:.4f}",
             f"{r['bare_tokens_per_s']:,.0f}",
             f"{r['loop_step_s']:.4f}", f"{r['loop_tokens_per_s']:,.0f}",
             f"{r['loop_over_bare']:.3f}", f"{r['model_tflops_per_device']:.3f}"]
    if with_mfu:
      cells += ([f"{r['mfu_bare']:.1%}", f"{r['mfu_loop']:.1%}"] if "mfu_bare" in r
                else ["-", "-"])
    print("| " + " | ".join(cells) + " |")
  if _OUT.value:
    from effjax import provenance  # pylint: disable=g-import-not-at-top
    provenance.write_json(_OUT.value, dict(device=device.device_kind, jax=jax.__version__,
                                           rows=rows))


if __name__ == "__main__":
  app.run(main)
