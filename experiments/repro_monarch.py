"""Monarch vs dense on the bundled corpus: the paper's "quality parity at about half the FLOPs".

  python -m experiments.repro_monarch --workdir=runs/repro_monarch --seeds=0,1 \
      --out=runs/repro_monarch.json                                            # ~1 h, 2 CPUs
  python -m experiments.repro_monarch --workdir=runs/rm_quick --preset=quick --allow_dirty

Every variant runs once per --seeds seed (dense_to_mlp starts from the dense run of its seed);
final bits/byte is reported as mean and range, and a variant is called better or worse than
dense only when the gap exceeds the seed ranges. Refuses a dirty tree or a non-empty
--workdir (--allow_dirty, --allow_resume); the results file records provenance and configs.

Variants, configs/lm.py:tiny and configs/monarch.py:VARIANT (on configs/lm.py:test for
--preset=quick), with the same seed, data order and number of tokens:

  dense            every projection dense (the `make train` run)
  monarch_mlp      the three SwiGLU weights Monarch (nblocks 4), attention dense (the paper's
                   GPT-2 setting)
  monarch_all      every attention and MLP projection Monarch (nblocks 4)
  reverse_sparse   monarch_all for the first 90% of the steps, then multiplied out to dense
  dense_to_mlp     (with --finetune_steps > 0) the final dense checkpoint projected onto
                   monarch_mlp, then fine-tuned: its step-0 evaluation is the projection alone

For each it reports parameters, training FLOPs per token (for reverse_sparse: averaged over
its steps), validation bits per byte, wall time (compilation and evaluation included; exposed
to whatever else runs on the machine), the median logged step time, and a bare step time
(the compiled train step alone, the variants timed interleaved, best of 3 rounds; for
reverse_sparse the step-weighted mix of its two phases), and prints a markdown table; --out
writes the rows as JSON.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax

from configs import lm
from configs import monarch as monarch_configs
from effjax import config as config_lib
from experiments import runs

_WORKDIR = flags.DEFINE_string("workdir", None, "A new directory; one subdirectory per variant.",
                               required=True)
_PRESET = flags.DEFINE_enum("preset", "full", ["full", "quick"],
                            "full: the tiny config, 600 steps; quick: the test config.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["dense", "monarch_mlp", "monarch_all", "reverse_sparse", "dense_to_mlp"],
    "Variants to run, in order (dense_to_mlp needs dense first).")
_NBLOCKS = flags.DEFINE_integer("nblocks", 4, "Monarch blocks.")
_DENSE_FRACTION = flags.DEFINE_float("dense_fraction", 0.1,
                                     "reverse_sparse: final fraction of steps trained dense.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 100,
                                       "dense_to_mlp: fine-tuning steps (0 skips it).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir (default: the TFDS default).")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for the results.")
_TIME_ONLY = flags.DEFINE_bool("time_only", False, "Skip training; only the bare step times "
                                "(e.g. to re-time on a quiet machine).")
_BARE_STEPS = flags.DEFINE_integer(
    "bare_steps", 10, "After the runs, time this many compiled train steps per variant, "
    "variants interleaved over 3 rounds (less exposed to other load than wall time; 0: skip).")


VARIANT_CONFIGS = {"monarch_mlp": "mlp", "monarch_all": "all", "reverse_sparse": "reverse",
                   "dense_to_mlp": "finetune"}  # configs/monarch.py variants


def variant_config(name: str, dense_workdir: str = "", seed: int = 0):
  """configs/lm.py (dense) or configs/monarch.py (the rest) on the preset's base config."""
  if name != "dense" and name not in VARIANT_CONFIGS:
    raise ValueError(f"unknown variant {name!r}")
  base = "tiny" if _PRESET.value == "full" else "test"
  if name == "dense":
    c = lm.get_config(base)
  else:
    c = monarch_configs.get_config(f"{VARIANT_CONFIGS[name]},{base}")
  c.data.data_dir = _DATA_DIR.value
  c.train.update(async_checkpointing=False, seed=seed)
  if _PRESET.value == "quick" and name != "dense_to_mlp":
    c.train.update(num_steps=40, eval_every=20, checkpoint_every=20, log_every=10)
  c.model.linear.nblocks = _NBLOCKS.value
  steps = c.train.num_steps
  if name == "reverse_sparse":
    c.train.dense_from_step = steps - round(steps * _DENSE_FRACTION.value)
  elif name == "dense_to_mlp":
    n = _FINETUNE_STEPS.value
    c.train.update(init_from=dense_workdir, num_steps=n, eval_every=max(n // 2, 1),
                   checkpoint_every=n)
    c.optim.warmup_steps = max(n // 10, 1)
  return config_lib.from_config_dict(c)


def bare_step_seconds(cfg) -> Callable[[], float]:
  """A timer: each call runs `--bare_steps` compiled train steps on one batch, returns s/step."""
  train_step, state, batch = runs.compiled_step_on_one_batch(cfg)
  box = [jax.block_until_ready(train_step(state, batch))[0]]  # warm-up

  def timer() -> float:
    start = time.perf_counter()
    for _ in range(_BARE_STEPS.value):
      box[0], metrics = train_step(box[0], batch)
    jax.block_until_ready((box[0], metrics))
    return (time.perf_counter() - start) / _BARE_STEPS.value
  return timer


def run_variant(name: str, workdir: str, seed: int) -> dict:
  cfg = variant_config(name, os.path.join(_WORKDIR.value, f"dense_s{seed}"), seed)
  metrics, wall = runs.train_timed(cfg, workdir)
  steps = cfg.train.num_steps
  switch = cfg.train.dense_from_step
  flops0 = metrics[0]["flops_per_token"]
  flops = flops0
  params = f"{metrics[0]['params']:,}"
  if switch:  # the step-weighted FLOPs of the two phases
    flops = (switch * flops0 + (steps - switch) * metrics[switch]["flops_per_token"]) / steps
    params = f"{metrics[0]['params']:,} -> {metrics[switch]['params']:,}"
  evals = runs.curve(metrics, "eval_bpb")
  row = dict(variant=name, seed=seed, config=config_lib.to_dict(cfg), params=params,
             train_flops_per_token=flops,
             eval_bpb=evals, final_bpb=evals[max(evals)], wall_s=wall, steps=steps,
             tokens=steps * cfg.train.global_batch_size * cfg.data.seq_len,
             median_step_s=runs.median(metrics, "step_time_sec"))
  if switch:
    row.update(densify_loss_before=metrics[switch]["densify_loss_before"],
               densify_loss_after=metrics[switch]["densify_loss_after"], dense_from_step=switch)
  if "projection_rel_error" in metrics.get(0, {}):
    row["projection_rel_error"] = metrics[0]["projection_rel_error"]
  return row


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  seeds = runs.seeds()
  if not _TIME_ONLY.value:
    runs.guard(_WORKDIR.value)
  rows = []
  for name in _VARIANTS.value:
    if name == "dense_to_mlp" and not _FINETUNE_STEPS.value:
      continue
    if _TIME_ONLY.value:
      cfg = variant_config(name)
      rows.append(dict(variant=name, steps=cfg.train.num_steps,
                       dense_from_step=cfg.train.dense_from_step))
      continue
    rows += runs.run_each([name], seeds, lambda n, seed: run_variant(
        n, os.path.join(_WORKDIR.value, f"{n}_s{seed}"), seed))

  if _BARE_STEPS.value:  # steady-state step time, the variants interleaved
    names = [r["variant"] for r in rows]
    phases = {n: [n] for n in names}
    if "reverse_sparse" in phases:  # its two phases are the monarch_all and dense models
      phases["reverse_sparse"] = ["monarch_all", "dense"]
    timers = {n: bare_step_seconds(variant_config(n)) for n in
              sorted({p for ps in phases.values() for p in ps} - {"dense_to_mlp"})}
    if "dense_to_mlp" in names:
      timers["dense_to_mlp"] = timers.get("monarch_mlp") or bare_step_seconds(
          variant_config("monarch_mlp"))
    samples = {n: [] for n in timers}
    for _ in range(3):
      for n, timer in timers.items():
        samples[n].append(timer())
    for r in rows:
      ps = phases[r["variant"]]
      if r["variant"] == "reverse_sparse":
        frac = 1 - r["dense_from_step"] / r["steps"]
        r["bare_step_s"] = ((1 - frac) * min(samples[ps[0]]) + frac * min(samples[ps[1]]))
      else:
        r["bare_step_s"] = min(samples[ps[0]])

  dense = next((r for r in rows if r["variant"] == "dense"), None)
  if _TIME_ONLY.value:
    print("| variant | bare s/step | vs dense |\n|---|---:|---:|")
    for r in rows:
      ratio = f"{r['bare_step_s'] / dense['bare_step_s']:.2f}" if dense else "-"
      print(f"| {r['variant']} | {r['bare_step_s']:.3f} | {ratio} |")
  else:
    _print_table(rows, dense)
  if _TIME_ONLY.value:
    runs.write(_OUT.value, {"rows": rows})
  else:
    runs.report_versus_baseline(rows, _OUT.value)



def _print_table(rows, dense):
  print(f"\npreset {_PRESET.value}, nblocks {_NBLOCKS.value}, "
        f"{rows[0]['tokens']:,} training tokens per variant (dense_to_mlp: its fine-tuning)")
  print("| variant | params | train FLOPs/token | FLOPs vs dense | eval bits/byte by step | "
        "final eval bits/byte | wall time (s) | median s/step | bare s/step |")
  print("|---|---|---:|---:|---|---:|---:|---:|---:|")
  for r in rows:
    ratio = f"{r['train_flops_per_token'] / dense['train_flops_per_token']:.2f}" if dense else "-"
    by_step = ", ".join(f"{s}: {b:.4f}" for s, b in r["eval_bpb"].items())
    print(f"| {r['variant']} s{r['seed']} | {r['params']} | "
          f"{r['train_flops_per_token']:,.0f} | {ratio} | "
          f"{by_step} | {r['final_bpb']:.4f} | {r['wall_s']:.0f} | {r['median_step_s']:.3f} | "
          f"{r.get('bare_step_s', float('nan')):.3f} |")
  for r in rows:
    if "densify_loss_before" in r:
      print(f"{r['variant']}: loss on the switch batch at step {r['dense_from_step']}: "
            f"{r['densify_loss_before']:.6f} (Monarch) vs {r['densify_loss_after']:.6f} (dense)")
    if "projection_rel_error" in r:
      print(f"{r['variant']}: relative Frobenius error of the projection "
            f"{r['projection_rel_error']:.4f}")


if __name__ == "__main__":
  app.run(main)
