"""Print what a trained run writes: KV-cache decoding from one of its checkpoints.

  python -m experiments.sample --workdir=runs/tiny --prompt="def "
  python -m experiments.sample --workdir=runs/tiny --prompt="import " --prompt="class " \
      --temperature=0.8 --top_k=40 --max_new_tokens=300 --seed=1
  python -m experiments.sample --workdir=runs/tiny --prompt_file=start.py --temperature=0

The run's config is read from WORKDIR/config.json and the checkpoint (`--step`, default the
newest) restored onto that config's mesh. Prompts are tokenised by the run's tokenizer (its
data.tokenizer, read from the workdir's own copy: [BOS, ids]) and decoded together as one
batch; generation stops at EOS or after --max_new_tokens. The continuation is printed after
its prompt, with the decoding rate (generated tokens per second of the compiled
generate call, compilation excluded). --temperature=0 is greedy.
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def sample(workdir: str, prompts: list[str], *, max_new_tokens: int = 200,
           temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           step: int | None = None, max_length: int = 0, merge_lora: bool = False,
           echo=print) -> tuple[list[str], dict]:
  """(continuations, timing); bad arguments end with a one-line SystemExit, checked before
  the checkpoint is read."""
  from effjax.data import tokenizer  # pylint: disable=g-import-not-at-top
  from effjax.models import decode  # pylint: disable=g-import-not-at-top
  from effjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  if not prompts:
    raise SystemExit("give at least one --prompt or a --prompt_file")
  for i, text in enumerate(prompts):
    if not text:
      raise SystemExit(f"prompt {i} is empty: give some text to continue")
  if max_new_tokens < 1:
    raise SystemExit(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
  try:
    sampling = decode.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    cfg = checkpoint.read_run_config(workdir)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(str(e)) from None
  length = max_length or cfg.data.seq_len
  try:
    tok = tokenizer.load(cfg.data.tokenizer)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  longest = max(len(tok.encode(t)) - 1 for t in prompts)  # [BOS, ids]
  if longest + max_new_tokens > length:
    raise SystemExit(f"the longest prompt ({longest} tokens) plus --max_new_tokens="
                     f"{max_new_tokens} is {longest + max_new_tokens}, beyond the cache's "
                     f"max_length={length}; shorten them or raise --max_length")
  if length > cfg.data.seq_len:
    echo(f"note: max_length={length} exceeds the run's training length {cfg.data.seq_len}; "
         "positions past it were never trained")
  try:
    decode.decode_config(cfg.model)  # refuses expert choice before the restore
    _, model_cfg, found, state, mesh = checkpoint.load_run(workdir, step)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(" ".join(str(e).split())) from None
  params, model_state = state.params, state.model_state
  if merge_lora:
    if not model_cfg.linear.uses("lora"):
      raise SystemExit("--merge_lora: the run has no LoRA layer")
    model_cfg, params, model_state = decode.merge_lora(model_cfg, params, model_state)
  sampler = decode.Sampler(model_cfg, params, model_state, mesh, max_length=length,
                           tokenizer=tok)
  texts, stats = sampler.generate_text(prompts, max_new_tokens=max_new_tokens,
                                       sampling=sampling, seed=seed)
  echo(f"{workdir} step {found}; mesh {dict(mesh.shape)}; temperature {temperature}, top_k "
       f"{top_k}, top_p {top_p}, seed {seed}")
  for i, (prompt, text) in enumerate(zip(prompts, texts)):
    echo(f"--- sample {i} ---")
    echo(prompt + text)
  echo(f"--- {stats['tokens']} tokens in {stats['seconds']:.3f} s: "
       f"{stats['tokens_per_sec']:.1f} tokens/s ({len(prompts)} prompt(s) in one batch; "
       f"compiled in {stats['compile_seconds']:.1f} s)")
  return texts, stats


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  prompts = list(FLAGS.prompt)
  if FLAGS.prompt_file:
    if not os.path.isfile(FLAGS.prompt_file):
      raise SystemExit(f"--prompt_file={FLAGS.prompt_file!r}: no such file")
    with open(FLAGS.prompt_file, encoding="utf-8", errors="replace") as f:
      prompts.append(f.read())
  # a continuation may hold any bytes: never let printing it fail
  sys.stdout.reconfigure(errors="backslashreplace")
  sample(FLAGS.workdir, prompts, max_new_tokens=FLAGS.max_new_tokens,
         temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
         seed=FLAGS.seed, step=FLAGS.step, max_length=FLAGS.max_length,
         merge_lora=FLAGS.merge_lora)


def define_flags():
  """The command line's flags; defined only when run as a script, so the functions above can be
  imported next to other entry points."""
  flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).")
  flags.DEFINE_string("prompt_file", "", "A file whose whole text is one prompt.")
  flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per prompt.")
  flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_integer(
      "max_length", 0, "KV cache length: prompt + new tokens must fit (0 = the run's seq_len).")
  flags.DEFINE_bool("merge_lora", False,
                    "Fold LoRA layers into dense kernels before decoding.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
