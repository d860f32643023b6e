"""SST vs LoRA / ReLoRA* / Full inside the fully hyperbolic LM (configs/hyperbolic.py): the SST
paper's claim that SST is more stable than the other low-rank methods in hyperbolic space.

  python -m experiments.repro_sst_hyperbolic --workdir=runs/rsh --out=runs/rsh.json \
      --seeds=0,1                                                    # ~45 min on 2 CPU cores
  python -m experiments.repro_sst_hyperbolic --workdir=runs/rsh_q --preset=quick --allow_dirty

(The Euclidean experiment is experiments/repro_sst.py; this sibling shares experiments/runs.py.)

Protocol (the fair one of the Euclidean experiment): one rank ratio r/d; SST with a new active
set every sst_every >= 40 steps and at least 5 rounds (steps >= 5 x sst_every x ceil(d / r));
ReLoRA* (no full-rank warm start) merging every 1/6 of the steps; both re-warm only the params
a restart resets, over 10% of their period; shuffled batches (the default pipeline). Every
method runs at every learning rate of a small sweep and every seed. The learning rate per
method is chosen on the held-out selection slice (data.select_percent of the training files;
mean over seeds, diverged settings excluded); the reported numbers are on the whole validation
split, mean and range over seeds.

To fit the CPU budget the sweep runs on the first seed; the other seeds run each method at
the learning rate chosen there (the selection loss of the first seed).

Stability, per run: a non-finite stop (the trainer stops at the first NaN/Inf loss, gradient or
state and never checkpoints it), a divergence (a non-finite stop, or a final validation loss
more than DIVERGE_NATS above the lowest validation loss of the run's periodic evaluations),
loss spikes (logged training losses more than SPIKE_NATS above the run's running minimum,
after the warm-up), whether the final validation bits/byte beat the unigram baseline, and
the largest logged gradient norm. Counted over every run, per method.

Verdict on "SST is more stable than the other low-rank methods": SST has fewer unstable runs
(non-finite stops, divergences or spiking runs) over the sweep than each of LoRA and ReLoRA*;
and on quality, "A < B" only where the gap between seed means exceeds both seed ranges
(experiments/runs.py:ordered).
"""
from __future__ import annotations

import json
import math
import os
import time

from absl import app
from absl import flags
from absl import logging

from configs import hyperbolic as hyperbolic_configs
from effjax import config as config_lib
from effjax.train.methods.sst import sst_round_iterations
from experiments import runs

_WORKDIR = flags.DEFINE_string("workdir", None, "One subdirectory per run.", required=True)
_PRESET = flags.DEFINE_enum("preset", "full", ["full", "quick"],
                            "full: d 64, 2 layers, 800 steps, r/d 1/4; quick: the test model, "
                            "a few minutes.")
_METHODS = flags.DEFINE_list("methods", ["full", "lora", "relora", "sst"],
                             "configs/hyperbolic.py methods to run (galore also allowed).")
_RATIO = flags.DEFINE_integer("rank_ratio", 0, "r = d_model / N (default: the preset's).")
_LRS = flags.DEFINE_list("lrs", [], "Learning-rate sweep (default: the preset's).")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps (default: the preset's); refused "
                              "below the SST round requirement.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir (default: the TFDS default).")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for all runs.")

PRESETS = {
    # ~0.2 s per step on 2 busy cores; 800 steps = 5 SST rounds of 4 iterations of 40 steps
    "full": dict(base="tiny", model=dict(d_model=64, num_layers=2, num_heads=4,
                                         num_kv_heads=2, d_ff=256),
                 seq_len=64, batch=16, steps=800, warmup=40, eval_every=200, eval_batches=8,
                 lrs=(3e-3, 1e-2), ratio=4, sst_every=40, select_percent=5,
                 final_eval_batches=0, select_batches=16),
    "quick": dict(base="test", model={}, seq_len=32, batch=8, steps=40, warmup=4,
                  eval_every=20, eval_batches=2, lrs=(3e-3,), ratio=4, sst_every=5,
                  select_percent=5, final_eval_batches=4, select_batches=4),
}
NAMES = {"full": "Full", "lora": "LoRA", "relora": "ReLoRA*", "galore": "GaLore", "sst": "SST"}
SPIKE_NATS = 1.0
DIVERGE_NATS = 0.5


def run_config(method: str, lr: float, seed: int):
  p = PRESETS[_PRESET.value]
  c = hyperbolic_configs.get_config(f"{p['base']},{method}")
  steps = _STEPS.value or p["steps"]
  rank = max(1, (p["model"].get("d_model") or c.model.d_model) // (_RATIO.value or p["ratio"]))
  cfg = runs.low_rank_run_config(c, p, method, steps=steps, lr=lr, seed=seed, rank=rank,
                                 data_dir=_DATA_DIR.value)
  if method == "sst" and _PRESET.value == "full":
    rounds = steps // cfg.model.linear.sst_every / sst_round_iterations(cfg)
    if rounds < 5:
      raise app.UsageError(f"--steps={steps}: SST gets {rounds:.2f} rounds; the protocol needs "
                           f">= 5 (steps >= 5 x sst_every x ceil(d / r))")
  return cfg, rank


def stability(cfg, workdir: str, stopped: str) -> dict:
  from effjax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  m = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  baseline = m.get(0, {}).get("unigram_baseline_bpb", math.nan)
  train = [(s, v["train_loss"]) for s, v in sorted(m.items()) if "train_loss" in v]
  grads = [v["grad_norm"] for v in m.values() if "grad_norm" in v]
  spikes, low = 0, math.inf
  for s, loss in train:
    if s > cfg.optim.warmup_steps and math.isfinite(loss) and loss > low + SPIKE_NATS:
      spikes += 1
    low = min(low, loss)
  final = m.get(cfg.train.num_steps, {})
  evals = [v["eval_loss"] for v in m.values() if "eval_loss" in v]
  last = final.get("eval_loss", math.nan)
  diverged = bool(stopped) or not math.isfinite(last) or last > min(evals) + DIVERGE_NATS
  return dict(nonfinite_stop=stopped, unigram_bpb=baseline, loss_spikes=spikes,
              max_grad_norm=max(grads) if grads else math.nan, diverged=diverged,
              beats_unigram=final.get("eval_bpb", math.nan) < baseline)


def run_one(method: str, lr: float, seed: int) -> dict:
  from effjax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  cfg, rank = run_config(method, lr, seed)
  name = (f"{method}_r{rank}" if method != "full" else "full") + f"_lr{lr:g}_s{seed}"
  workdir = os.path.join(_WORKDIR.value, name)
  stopped = ""
  start = time.perf_counter()
  if not runs.is_finished(cfg, workdir):
    try:
      train_and_evaluate(cfg, workdir)
    except FloatingPointError as e:  # the trainer's non-finite stop (loop.NonFiniteError)
      stopped = str(e)
  wall = time.perf_counter() - start
  row = dict(method=method, name=NAMES[method], rank=rank if method != "full" else None, lr=lr,
             seed=seed, run=name, wall_s=wall, **stability(cfg, workdir, stopped))
  if not stopped:
    summary = runs.run_summary(cfg, workdir)
    summary.pop("first")
    row.update({k: summary[k] for k in ("eval_loss", "eval_ppl", "eval_bpb", "tokens",
                                        "median_step_s", "eval_curve", "train_curve")})
    row["select_loss"] = runs.selection_loss(cfg, workdir,
                                             PRESETS[_PRESET.value]["select_batches"])
  return row


def best_settings(rows) -> dict[str, dict]:
  """{method: the lr with the lowest selection loss on the first seed (the sweep; diverged
  runs excluded), with validation stats over every seed's finished run at that lr}."""
  best = {}
  first = rows[0]["seed"] if rows else None
  for method in dict.fromkeys(r["method"] for r in rows):
    sweep = [r for r in rows if r["method"] == method and r["seed"] == first
             and not r["diverged"] and math.isfinite(r.get("select_loss", math.nan))]
    if not sweep:
      continue
    lr = min(sweep, key=lambda r: r["select_loss"])["lr"]
    members = [r for r in rows if r["method"] == method and r["lr"] == lr]
    done = [r for r in members if math.isfinite(r.get("eval_loss", math.nan))]
    best[method] = dict(lr=lr, members=members, diverged=sum(r["diverged"] for r in members),
                        **{m: runs.stats([r[m] for r in done])
                           for m in ("eval_loss", "eval_ppl", "eval_bpb")})
  return best


def summarize(rows) -> tuple[str, dict]:
  best = best_settings(rows)
  lines, verdicts = [], {}
  seeds = sorted({r["seed"] for r in rows})
  lrs = sorted({r["lr"] for r in rows})
  ranks = {r["rank"] for r in rows if r["rank"]}
  lines.append(f"preset {_PRESET.value}; seeds {seeds}; learning rates {lrs} (swept on seed "
               f"{seeds[0]}); rank {sorted(ranks)}; lr chosen per method on the selection "
               "slice; validation = the whole split, mean ± half the range over seeds")
  lines += ["", "| method | chosen lr | val loss (nats/token) | val ppl | val bits/byte | "
            "runs | non-finite stops | diverged | runs with loss spikes | runs above unigram | "
            "max grad norm |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  unstable = {}
  for method in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == method]
    stops = sum(bool(r["nonfinite_stop"]) for r in mine)
    div = sum(r["diverged"] for r in mine)
    spiky = sum(r["loss_spikes"] > 0 for r in mine)
    unstable[method] = sum(bool(r["nonfinite_stop"]) or r["diverged"] or r["loss_spikes"] > 0
                           for r in mine)
    b = best.get(method)
    cells = ([f"{b['lr']:g}", runs.cell(b["eval_loss"]), runs.cell(b["eval_ppl"], 3),
              runs.cell(b["eval_bpb"])] if b else ["-", "all diverged", "-", "-"])
    gmax = max((r["max_grad_norm"] for r in mine if math.isfinite(r["max_grad_norm"])),
               default=math.nan)
    above = sum(not r["beats_unigram"] for r in mine)
    lines.append(f"| {NAMES[method]} | " + " | ".join(cells) +
                 f" | {len(mine)} | {stops} | {div} | {spiky} | {above} | {gmax:.2f} |")
  lines += ["", "Every run (final validation loss; selection loss):", "",
            "| method | " + " | ".join(f"lr {x:g}" for x in lrs) + " |",
            "|---|" + "---|" * len(lrs)]
  for method in dict.fromkeys(r["method"] for r in rows):
    cells = []
    for x in lrs:
      mine = [r for r in rows if r["method"] == method and r["lr"] == x]
      cells.append(", ".join(
          "non-finite stop" if r["nonfinite_stop"] else
          f"s{r['seed']}: {r['eval_loss']:.4f}; {r['select_loss']:.4f}"
          + (" (diverged)" if r["diverged"] else "") + (f" ({r['loss_spikes']} spikes)"
                                                        if r["loss_spikes"] else "")
          for r in mine) or "-")
    lines.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
  lines.append("")
  others = [m for m in ("lora", "relora") if m in unstable]
  if "sst" in unstable and others:
    more_stable = all(unstable["sst"] < unstable[m] for m in others)
    verdicts["sst_more_stable"] = more_stable
    lines.append("Stability (unstable runs over the sweep: non-finite, diverged or spiking): " +
                 ", ".join(f"{NAMES[m]} {unstable[m]}" for m in unstable) + ". "
                 f"'SST is more stable than {'/'.join(NAMES[m] for m in others)}': "
                 f"{'SUPPORTED' if more_stable else 'NOT supported'} at this scale.")
  if "sst" in best:
    for m in [m for m in ("full", "lora", "relora", "galore") if m in best]:
      claim = runs.ordered(best["sst"]["eval_loss"], best[m]["eval_loss"])
      text = ("not resolved by the seeds" if claim is None else
              "SST lower" if claim else f"{NAMES[m]} lower")
      verdicts[f"sst_vs_{m}"] = text
      lines.append(f"Validation loss, SST vs {NAMES[m]}: {text} "
                   f"({runs.describe('SST', best['sst']['eval_loss'])}; "
                   f"{runs.describe(NAMES[m], best[m]['eval_loss'])})")
  return "\n".join(lines), verdicts


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  p = PRESETS[_PRESET.value]
  lrs = [float(x) for x in _LRS.value] or list(p["lrs"])
  for m in _METHODS.value:
    if m not in NAMES:
      raise app.UsageError(f"unknown method {m!r}; choose from {list(NAMES)}")
  seeds = runs.seeds()
  for m in _METHODS.value:  # bad settings fail before any training
    run_config(m, lrs[0], seeds[0])
  runs.guard(_WORKDIR.value)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  rows = []

  def run(method, lr, seed):
    print(f"running {method} lr={lr:g} seed={seed} ...", flush=True)
    row = run_one(method, lr, seed)
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if "curve" not in k}), flush=True)
    runs.write(_OUT.value, {"runs": rows, "complete": False})

  for method in _METHODS.value:  # the sweep on the first seed
    for lr in lrs:
      run(method, lr, seeds[0])
  chosen = {m: b["lr"] for m, b in best_settings(rows).items()}
  for method in _METHODS.value:  # the chosen lr (or every lr if all diverged) on the others
    for lr in ([chosen[method]] if method in chosen else lrs):
      for seed in seeds[1:]:
        run(method, lr, seed)
  table, verdicts = summarize(rows)
  print()
  print(table)
  configs = {m: config_lib.to_dict(run_config(m, lrs[0], seeds[0])[0])
             for m in _METHODS.value}
  runs.write(_OUT.value, {"runs": rows, "verdicts": verdicts, "table": table,
                          "configs_at_first_lr": configs, "complete": True})


if __name__ == "__main__":
  app.run(main)
