"""Evaluate a checkpoint on a whole split: loss, perplexity and bits per byte.

  python -m experiments.evaluate --workdir=runs/tiny                       # validation, all
  python -m experiments.evaluate --workdir=runs/tiny --split=train --max_batches=64 --step=400

The run's config is read from WORKDIR/config.json and its checkpoint (`--step`, default the
newest) restored onto that config's mesh; text is tokenised by the run's tokenizer (the
workdir's copy) and bits/byte counts the bytes its tokens stand for. Every batch of the split
is evaluated, the last partial one included (effjax/train/evaluation.py), unless
--max_batches=N picks N batches spread evenly over it. The result is printed and written as
JSON (default WORKDIR/eval_SPLIT_stepN.json) with the provenance of the code that computed it.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def _provenance(cfg) -> dict:
  try:
    from effjax import provenance  # pylint: disable=g-import-not-at-top
  except ImportError:  # older checkouts: versions and device only
    import jax  # pylint: disable=g-import-not-at-top
    return {"jax": jax.__version__, "device": jax.devices()[0].device_kind}
  return provenance.collect(cfg)


def evaluate_run(workdir: str, *, split: str = "", max_batches: int = 0,
                 step: int | None = None, out: str = "", data_dir: str | None = None,
                 echo=print) -> dict:
  """The evaluation's result dict (also written to `out`); bad arguments end with a one-line
  SystemExit before the checkpoint is read."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from effjax.data import tokenizer  # pylint: disable=g-import-not-at-top
  from effjax.models.decoder_lm import DecoderLM  # pylint: disable=g-import-not-at-top
  from effjax.train import checkpoint, evaluation, inflight  # pylint: disable=g-import-not-at-top
  from effjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  if max_batches < 0:
    raise SystemExit(f"--max_batches must be >= 0 (0 = the whole split), got {max_batches}")
  try:
    cfg = checkpoint.read_run_config(workdir)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(str(e)) from None
  if data_dir is not None:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
  split = split or cfg.data.eval_split
  try:
    cfg, model_cfg, found, state, mesh = checkpoint.load_run(workdir, step)
    if data_dir is not None:
      cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
    byte_counts = tokenizer.load(cfg.data.tokenizer).byte_counts  # the run's own copy
    with step_lib.sharding_context(mesh):
      eval_step = jax.jit(step_lib.make_eval_step(DecoderLM(model_cfg), byte_counts))
      result = evaluation.evaluate(eval_step, state.params, state.model_state, cfg, mesh,
                                   split=split, max_batches=max_batches, step=found)
  except (ValueError, FileNotFoundError, inflight.StepFailedError) as e:
    raise SystemExit(" ".join(str(e).split())) from None
  record = {"workdir": os.path.abspath(workdir), "step": found, "split": split,
            "max_batches": max_batches, **result, "provenance": _provenance(cfg)}
  path = out or os.path.join(workdir, f"eval_{split}_step{found}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, sort_keys=True, default=str)
  scope = "the whole split" if not max_batches else f"{int(result['eval_batches'])} spread batches"
  echo(f"{workdir} step {found}, {split} ({scope}; {int(result['eval_tokens']):,} predicted "
       f"tokens): loss {result['eval_loss']:.4f} | perplexity {result['eval_perplexity']:.3f} | "
       f"{result['eval_bpb']:.4f} bits/byte -> {path}")
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  evaluate_run(FLAGS.workdir, split=FLAGS.split, max_batches=FLAGS.max_batches,
               step=FLAGS.step, out=FLAGS.out, data_dir=FLAGS.data_dir)


def define_flags():
  """The command line's flags; defined only when run as a script, so the functions above can be
  imported next to other entry points."""
  flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
  flags.DEFINE_string("split", "", "Split to evaluate (default: the run's eval split).")
  flags.DEFINE_integer("max_batches", 0,
                       "0 = the whole split; N = N batches spread over it.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_string("out", "", "JSON file (default WORKDIR/eval_SPLIT_stepN.json).")
  flags.DEFINE_string("data_dir", None,
                      "TFDS data dir (default: the one the run trained from).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
