"""SST vs its low-rank baselines on the bundled corpus: the paper's ordering and gap reduction.

  python -m experiments.repro_sst --workdir=runs/repro_sst --out=runs/repro_sst.json  # ~1 h
  python -m experiments.repro_sst --workdir=runs/rs_quick --preset=quick              # minutes

Methods (configs/sst.py variants on one base config, same seed, data order and tokens):
Full (dense, AdamW), LoRA, ReLoRA* (merge every 1/6 of the steps, no full-rank warm start),
GaLore (refresh every 1/6 of the steps, scale 0.25) and SST (mixed sampling, a new active set
every 1/24 of the steps, re-SVD every round), each at two rank ratios r/d (Full once), each at
every learning rate of a small sweep; the best learning rate per method and rank (lowest
final validation loss) is reported. Embeddings and the head stay dense.

Reported per method and rank: validation loss (nats/token), perplexity, bits per byte,
trainable parameters and optimizer-state bytes (from the abstract state), median logged step
time; the gap reduction (best other low-rank - SST) / (best other low-rank - Full) in
perplexity, as the paper computes it, with "other" = {LoRA, ReLoRA*} (the paper's tables) and
also with GaLore included; and a verdict on the ordering Full < SST < {LoRA, ReLoRA*}.
Re-running the same command resumes: finished runs are read back, not retrained.
--out writes every run as JSON; --plot (default WORKDIR/loss_curves.png) draws the validation
and training loss curves of the best run of each method (needs matplotlib; skipped without).
"""
from __future__ import annotations

import json
import math
import os
import time

from absl import app
from absl import flags
from absl import logging

from configs import sst as sst_configs
from effjax import config as config_lib
from effjax.train.loop import train_and_evaluate
from effjax.train.metrics import read_metrics

_WORKDIR = flags.DEFINE_string("workdir", None, "One subdirectory per run.", required=True)
_PRESET = flags.DEFINE_enum("preset", "full", ["full", "quick"],
                            "full: d 128, 2 layers, 1200 steps (~1 h on 2 CPU cores); quick: "
                            "the test model, 60 steps, one learning rate (a few minutes).")
_METHODS = flags.DEFINE_list("methods", ["full", "lora", "relora", "galore", "sst"],
                             "configs/sst.py variants to run.")
_RATIOS = flags.DEFINE_list("rank_ratios", ["16", "8"], "r = d_model / N for each N.")
_LRS = flags.DEFINE_list("lrs", [], "Learning-rate sweep (default: the preset's).")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps (default: the preset's).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir (default: the TFDS default).")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for all runs.")
_PLOT = flags.DEFINE_string("plot", "", "Loss-curve PNG (default WORKDIR/loss_curves.png).")
_SWEEP_RATIOS = flags.DEFINE_list(
    "sweep_ratios", [], "Rank ratios (N of r = d / N) that get the learning-rate sweep; the "
    "other ratios run each method at its best learning rate of the first swept ratio "
    "(default: sweep every ratio).")
_EXTEND = flags.DEFINE_bool("extend_sweep", True, "If a method's best learning rate is at an "
                             "edge of the sweep, also run one step (x3) beyond that edge.")
_BARE_STEPS = flags.DEFINE_integer(
    "bare_steps", 0, "After the runs, time this many compiled train steps (one batch, no "
    "between-step work) for the best run of each method, methods interleaved over 3 rounds, "
    "best round kept: less exposed to other load than the logged step times (0: skip).")

PRESETS = {
    # d 128, 2 layers, seq 64, batch 16: ~70 ms per dense step on 2 cores
    "full": dict(base="tiny", model=dict(num_layers=2), seq_len=64, batch=16, steps=1200,
                 warmup=60, eval_every=200, eval_batches=16, lrs=(1e-3, 3e-3, 1e-2)),
    "quick": dict(base="test", model={}, seq_len=32, batch=8, steps=60, warmup=6,
                  eval_every=20, eval_batches=4, lrs=(3e-3,)),
}
NAMES = {"full": "Full", "lora": "LoRA", "relora": "ReLoRA*", "galore": "GaLore", "sst": "SST"}


def run_config(method: str, ratio: int, lr: float):
  p = PRESETS[_PRESET.value]
  c = sst_configs.get_config(f"{method},{p['base']}")
  steps = _STEPS.value or p["steps"]
  c.model.update(**p["model"])
  c.data.update(seq_len=p["seq_len"], eval_batches=p["eval_batches"], data_dir=_DATA_DIR.value)
  c.train.update(global_batch_size=p["batch"], num_steps=steps, eval_every=p["eval_every"],
                 checkpoint_every=steps, log_every=max(1, steps // 60),
                 async_checkpointing=False)
  c.optim.update(learning_rate=lr, warmup_steps=p["warmup"])
  # the variant's periods were derived from the base's step count: redo them for ours
  rank = max(1, c.model.d_model // ratio)
  rewarm = max(1, steps // 60)
  if method in ("lora", "relora", "sst"):
    c.model.linear.rank = rank
  if method == "relora":
    c.model.linear.relora_every = max(1, steps // 6)
    c.optim.rewarm_steps = rewarm
  elif method == "galore":
    c.optim.update(galore_rank=rank, galore_every=max(1, steps // 6))
  elif method == "sst":
    c.model.linear.sst_every = max(1, steps // 24)
    c.optim.rewarm_steps = min(rewarm, c.model.linear.sst_every)
  return config_lib.from_config_dict(c), rank


def run_one(method: str, ratio: int, lr: float) -> dict:
  cfg, rank = run_config(method, ratio, lr)
  name = f"{method}_r{rank}_lr{lr:g}" if method != "full" else f"full_lr{lr:g}"
  workdir = os.path.join(_WORKDIR.value, name)
  path = os.path.join(workdir, "metrics.jsonl")
  done = os.path.exists(path) and cfg.train.num_steps in read_metrics(path) and (
      "eval_loss" in read_metrics(path)[cfg.train.num_steps])
  start = time.perf_counter()
  if not done:
    train_and_evaluate(cfg, workdir)
  wall = time.perf_counter() - start
  m = read_metrics(path)
  steps = cfg.train.num_steps
  final = m[steps]
  evals = {s: v["eval_loss"] for s, v in sorted(m.items()) if "eval_loss" in v}
  train = {s: v["train_loss"] for s, v in sorted(m.items()) if "train_loss" in v}
  times = sorted(v["step_time_sec"] for v in m.values() if "step_time_sec" in v)
  report = m[0] if "opt_state_bytes" in m.get(0, {}) else {}
  row = dict(method=method, name=NAMES[method], rank=rank if method != "full" else None,
             ratio=ratio if method != "full" else None, lr=lr, run=name,
             eval_loss=final["eval_loss"], eval_ppl=final["eval_perplexity"],
             eval_bpb=final["eval_bpb"], eval_curve=evals, train_curve=train,
             trainable_params=report.get("trainable_params", m[0].get("params")),
             opt_state_bytes=report.get("opt_state_bytes"),
             median_step_s=times[len(times) // 2] if times else float("nan"),
             wall_s=None if done else wall,
             tokens=steps * cfg.train.global_batch_size * cfg.data.seq_len)
  if method == "full":  # dense AdamW: mu and nu of every param
    row["opt_state_bytes"] = row["opt_state_bytes"] or _adamw_bytes(cfg)
  return row


def _adamw_bytes(cfg) -> int:
  from effjax.optim import lowrank  # pylint: disable=g-import-not-at-top
  return lowrank.memory_report(cfg)["full_rank_opt_state_bytes"]


def bare_step_times(rows) -> None:
  """Adds `bare_step_s` to the best row of each method and rank (see --bare_steps)."""
  import jax  # pylint: disable=g-import-not-at-top
  from effjax.train.loop import compiled_step_on_one_batch  # pylint: disable=g-import-not-at-top
  timers = {}
  for key, row in best_rows(rows).items():
    cfg, _ = run_config(row["method"], row["ratio"] or 8, row["lr"])
    step, state, batch = compiled_step_on_one_batch(cfg)
    box = [jax.block_until_ready(step(state, batch))[0]]

    def timer(step=step, batch=batch, box=box):
      start = time.perf_counter()
      for _ in range(_BARE_STEPS.value):
        box[0], metrics = step(box[0], batch)
      jax.block_until_ready((box[0], metrics))
      return (time.perf_counter() - start) / _BARE_STEPS.value
    timers[key] = (row, timer)
  samples = {k: [] for k in timers}
  for _ in range(3):
    for k, (_, timer) in timers.items():
      samples[k].append(timer())
  for k, (row, _) in timers.items():
    row["bare_step_s"] = min(samples[k])


def best_rows(rows):
  """{(method, ratio): the row with the lowest final eval loss over the sweep}."""
  best = {}
  for r in rows:
    key = (r["method"], r["ratio"])
    if not math.isfinite(r["eval_loss"]):
      continue
    if key not in best or r["eval_loss"] < best[key]["eval_loss"]:
      best[key] = r
  return best


def gap_reduction(sst: float, others: list[float], full: float) -> float:
  """(best other - SST) / (best other - Full), in whatever unit the numbers are."""
  other = min(others)
  return (other - sst) / (other - full) if other != full else float("nan")


def summarize(rows) -> tuple[str, dict]:
  best = best_rows(rows)
  lines, verdicts = [], {}
  full = best.get(("full", None))
  tokens = rows[0]["tokens"]
  lines.append(f"preset {_PRESET.value}: {tokens:,} training tokens per run; learning rates "
               f"swept: {sorted({r['lr'] for r in rows})}; best per method shown")
  lines.append("")
  lines.append("| method | r | r/d | best lr | val loss (nats/token) | val ppl | val bits/byte | "
               "trainable params | optimizer state (KiB) | median logged s/step | "
               "bare s/step |")
  lines.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  ratios = sorted({r["ratio"] for r in rows if r["ratio"]}, reverse=True)
  ordered = ([full] if full else []) + [best[(m, q)] for q in ratios
                                        for m in ("lora", "relora", "galore", "sst")
                                        if (m, q) in best]
  for r in ordered:
    rd = f"1/{r['ratio']}" if r["ratio"] else "-"
    kib = f"{r['opt_state_bytes'] / 1024:,.0f}" if r["opt_state_bytes"] else "-"
    lines.append(f"| {r['name']} | {r['rank'] or '-'} | {rd} | {r['lr']:g} | "
                 f"{r['eval_loss']:.4f} | {r['eval_ppl']:.3f} | {r['eval_bpb']:.4f} | "
                 f"{r['trainable_params']:,} | {kib} | {r['median_step_s']:.3f} | "
                 f"{r.get('bare_step_s', float('nan')):.3f} |")
  lines.append("")
  lines.append("All runs (final val loss by learning rate):")
  lines.append("")
  lrs = sorted({r["lr"] for r in rows})
  lines.append("| method | r | " + " | ".join(f"lr {x:g}" for x in lrs) + " |")
  lines.append("|---|---:|" + "---:|" * len(lrs))
  keys = sorted({(r["method"], r["ratio"]) for r in rows},
                key=lambda k: (k[1] or 0, list(NAMES).index(k[0])))
  for method, ratio in keys:
    cells = []
    for x in lrs:
      hit = [r for r in rows if r["method"] == method and r["ratio"] == ratio and r["lr"] == x]
      cells.append(f"{hit[0]['eval_loss']:.4f}" if hit else "-")
    rank = next(r["rank"] for r in rows if r["method"] == method and r["ratio"] == ratio)
    lines.append(f"| {NAMES[method]} | {rank or '-'} | " + " | ".join(cells) + " |")
  lines.append("")
  if full:
    for q in ratios:
      need = [("lora", q), ("relora", q), ("sst", q)]
      if not all(k in best for k in need):
        continue
      lo, re_, sst = (best[k] for k in need)
      ppl = {"full": full["eval_ppl"], "lora": lo["eval_ppl"], "relora": re_["eval_ppl"],
             "sst": sst["eval_ppl"]}
      g = gap_reduction(ppl["sst"], [ppl["lora"], ppl["relora"]], ppl["full"])
      text = (f"r/d = 1/{q} (r = {sst['rank']}): gap reduction vs best of LoRA/ReLoRA* "
              f"{100 * g:.1f}% (perplexity; paper: 67.6% on OPT-125M)")
      if ("galore", q) in best:
        g2 = gap_reduction(ppl["sst"], [ppl["lora"], ppl["relora"], best[("galore", q)]
                                        ["eval_ppl"]], ppl["full"])
        text += f"; with GaLore among the others {100 * g2:.1f}%"
        verdicts[f"gap_with_galore_1/{q}"] = g2
      lines.append(text)
      order = ppl["full"] < ppl["sst"] < min(ppl["lora"], ppl["relora"])
      lines.append(f"r/d = 1/{q}: ordering Full < SST < {{LoRA, ReLoRA*}} "
                   f"({ppl['full']:.3f} < {ppl['sst']:.3f} < "
                   f"min({ppl['lora']:.3f}, {ppl['relora']:.3f})): "
                   f"{'holds' if order else 'does NOT hold'}")
      verdicts[f"ordering_1/{q}"] = order
      verdicts[f"gap_1/{q}"] = g
  return "\n".join(lines), verdicts


def plot(rows, path: str) -> str:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "matplotlib is not installed: no plot"
  best = best_rows(rows)
  ratios = sorted({r["ratio"] for r in rows if r["ratio"]}, reverse=True)
  fig, axes = plt.subplots(1, max(1, len(ratios)), figsize=(6 * max(1, len(ratios)), 4.5),
                           squeeze=False)
  colors = {"full": "black", "lora": "tab:blue", "relora": "tab:orange", "galore": "tab:green",
            "sst": "tab:red"}
  for ax, q in zip(axes[0], ratios or [None]):
    for method in NAMES:
      r = best.get((method, None if method == "full" else q))
      if r is None:
        continue
      tr = sorted((int(s), v) for s, v in r["train_curve"].items())
      ev = sorted((int(s), v) for s, v in r["eval_curve"].items())
      label = f"{r['name']} (lr {r['lr']:g})"
      ax.plot([s for s, _ in tr], [v for _, v in tr], color=colors[method], alpha=0.3, lw=0.8)
      ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", color=colors[method], label=label)
    ax.set_title(f"r/d = 1/{q}" if q else "")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token): val (dots), train (faint)")
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return f"plot written to {path}"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  p = PRESETS[_PRESET.value]
  lrs = [float(x) for x in _LRS.value] or list(p["lrs"])
  ratios = [int(x) for x in _RATIOS.value]
  for m in _METHODS.value:
    if m not in NAMES:
      raise app.UsageError(f"unknown method {m!r}; choose from {list(NAMES)}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  rows = []
  # Full first, then one rank ratio at a time (so a cut-short run has complete ratios)
  swept = [int(x) for x in _SWEEP_RATIOS.value] or ratios
  ratios = [q for q in ratios if q in swept] + [q for q in ratios if q not in swept]
  plan = [(m, None) for m in _METHODS.value if m == "full"] + [
      (m, q) for q in ratios for m in _METHODS.value if m != "full"]
  for method, ratio in plan:
    tried = []
    queue = list(lrs)
    if ratio is not None and ratio not in swept:  # the best lr at the first swept ratio
      mine = [r for r in rows if r["method"] == method and r["ratio"] == swept[0]]
      queue = [min(mine, key=lambda r: r["eval_loss"])["lr"]] if mine else queue
    while queue:
      lr = queue.pop(0)
      tried.append(lr)
      print(f"running {method} r/d=1/{ratio} lr={lr:g} ...", flush=True)
      row = run_one(method, ratio or ratios[0], lr)
      row["ratio"] = ratio
      row["rank"] = row["rank"] if ratio else None
      rows.append(row)
      print(json.dumps({k: v for k, v in row.items() if "curve" not in k}), flush=True)
      if _OUT.value:  # keep what is done so far
        with open(_OUT.value, "w", encoding="utf-8") as f:
          json.dump(rows, f, indent=1)
      if not queue and _EXTEND.value and len(tried) > 1 and (ratio is None or ratio in swept):
        # the best learning rate at an edge of the sweep: one more step (x3) past that edge
        mine = [r for r in rows if r["method"] == method and r["ratio"] == ratio]
        best = min(mine, key=lambda r: r["eval_loss"] if math.isfinite(r["eval_loss"])
                   else float("inf"))["lr"]
        for edge, nxt in ((min(tried), best / 3), (max(tried), best * 3)):
          if best == edge and len(tried) <= len(lrs):
            queue.append(nxt)
  if _BARE_STEPS.value:
    bare_step_times(rows)
  table, verdicts = summarize(rows)
  print()
  print(table)
  print(plot(rows, _PLOT.value or os.path.join(_WORKDIR.value, "loss_curves.png")))
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump({"runs": rows, "verdicts": verdicts, "table": table}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
