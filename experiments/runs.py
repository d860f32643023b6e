"""What the repro_*.py scripts share: the provenance guard, seeds, one run's summary from its
metrics, evaluation on the held-out selection slice, seed statistics and verdicts.

Verdicts: with several seeds, "A < B" is claimed only when the gap between the means exceeds
both methods' seed ranges (max - min); with one seed nothing is claimed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time

from absl import flags

from effjax import provenance

ALLOW_DIRTY = flags.DEFINE_bool(
    "allow_dirty", False, "Run from a tree with uncommitted changes (the results file records "
    "dirty=true). Without it such a run is refused: a headline number needs a commit.")
ALLOW_RESUME = flags.DEFINE_bool(
    "allow_resume", False, "Reuse a non-empty --workdir (finished runs are read back). Without "
    "it a headline run refuses a workdir that already holds files.")
SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds (train.seed: init and data order); "
                          "every run is repeated per seed and reported as mean and range.")


def guard(workdir: str) -> None:
  """Refuses (one line, exit status 1) a dirty tree or a used workdir unless allowed."""
  try:
    provenance.require_clean_tree(ALLOW_DIRTY.value)
    provenance.require_fresh_workdir(workdir, ALLOW_RESUME.value)
  except provenance.ProvenanceError as e:
    raise SystemExit(f"refused: {e}") from None


def seeds() -> list[int]:
  try:
    values = [int(s) for s in SEEDS.value]
  except ValueError:
    raise SystemExit(f"--seeds={','.join(SEEDS.value)}: seeds must be integers") from None
  if not values or len(set(values)) != len(values):
    raise SystemExit(f"--seeds={','.join(SEEDS.value)}: give distinct seeds")
  return values


def run_summary(cfg, workdir: str) -> dict:
  """The numbers every script reports about one finished run, from its metrics.jsonl."""
  from effjax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  m = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  steps = cfg.train.num_steps
  final = m[steps]
  return dict(
      seed=cfg.train.seed, steps=steps,
      tokens=steps * cfg.train.global_batch_size * cfg.data.seq_len,
      eval_loss=final["eval_loss"], eval_ppl=final["eval_perplexity"],
      eval_bpb=final["eval_bpb"],
      eval_curve=curve(m, "eval_loss"), eval_bpb_curve=curve(m, "eval_bpb"),
      train_curve=curve(m, "train_loss"), median_step_s=median(m, "step_time_sec"),
      median_tokens_per_s=median(m, "tokens_per_sec"),
      first=m.get(0, {}), config=dataclasses.asdict(cfg))


def train_timed(cfg, workdir: str, *, resume: bool = False):
  """Trains `cfg` in `workdir`: (metrics by step, wall seconds, None when nothing was left to
  train). A workdir holding checkpoints is refused unless `resume` (then a finished run is
  read back and an unfinished one continued)."""
  from effjax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from effjax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  wall = None
  if not (resume and is_finished(cfg, workdir)):
    if not resume and os.path.exists(os.path.join(workdir, "checkpoints")):
      raise SystemExit(f"{workdir} already holds a run; pass a new --workdir")
    start = time.perf_counter()
    train_and_evaluate(cfg, workdir)
    wall = time.perf_counter() - start
  return read_metrics(os.path.join(workdir, "metrics.jsonl")), wall


def curve(metrics: dict, key: str) -> dict[int, float]:
  """{step: value} of one logged metric."""
  return {s: m[key] for s, m in sorted(metrics.items()) if key in m}


def median(metrics: dict, key: str) -> float:
  values = sorted(m[key] for m in metrics.values() if key in m)
  return values[len(values) // 2] if values else math.nan


def run_each(names, seeds, run) -> list[dict]:
  """[run(name, seed) for every name and seed], each row printed as it finishes."""
  rows = []
  for name in names:
    for seed in seeds:
      print(f"running {name} seed {seed} ...", flush=True)
      rows.append(run(name, seed))
      print(json.dumps({k: v for k, v in rows[-1].items() if k != "config"}), flush=True)
  return rows


def report_versus_baseline(rows: list[dict], out: str, **extra) -> None:
  """Prints each variant's final bits/byte against the baseline's and writes the results
  file: rows, final_bpb over seeds per variant, verdicts, and `extra`."""
  summary, verdicts = versus_baseline(rows)
  print(summary)
  final = {k[0]: v for k, v in group_by(rows, ("variant",), "final_bpb").items()}
  write(out, {"rows": rows, "final_bpb": final, "verdicts": verdicts, **extra})


def is_finished(cfg, workdir: str) -> bool:
  from effjax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return False
  final = read_metrics(path).get(cfg.train.num_steps, {})
  return "eval_loss" in final


def selection_loss(cfg, workdir: str, max_batches: int = 0) -> float:
  """Eval loss of the run's final checkpoint on the held-out selection slice (all of it, or
  `max_batches` spread batches): what learning rates are chosen on, never the reported
  validation numbers."""
  import jax  # pylint: disable=g-import-not-at-top
  from effjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from effjax.models.decoder_lm import DecoderLM  # pylint: disable=g-import-not-at-top
  from effjax.train import evaluation, plugins  # pylint: disable=g-import-not-at-top
  from effjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from effjax.train.checkpoint import load_checkpoint  # pylint: disable=g-import-not-at-top
  step, state, mesh = load_checkpoint(cfg, workdir)
  model_cfg = plugins.enabled(cfg).model_config_at(step)
  eval_step = jax.jit(step_lib.make_eval_step(DecoderLM(model_cfg)))
  with step_lib.sharding_context(mesh):
    result = evaluation.evaluate(eval_step, state.params, state.model_state, cfg, mesh,
                                 split=pipeline.selection_split(cfg.data),
                                 max_batches=max_batches, step=step)
  return result["eval_loss"]


def compiled_step_on_one_batch(cfg):
  """(compiled train step, fresh state, one real training batch) for timing the bare step."""
  from effjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from effjax.models.decoder_lm import DecoderLM  # pylint: disable=g-import-not-at-top
  from effjax.optim import lowrank  # pylint: disable=g-import-not-at-top
  from effjax.parallel import build_mesh  # pylint: disable=g-import-not-at-top
  from effjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  mesh = build_mesh(cfg.mesh)
  model = DecoderLM(cfg.model)
  tx, lr_fn = lowrank.optimizer_for(cfg)  # AdamW unless a low-rank method is configured
  state, shardings = step_lib.create_train_state(model, tx, mesh, cfg.train.seed,
                                                 cfg.data.seq_len)
  train_step, _ = step_lib.compile_steps(model, tx, lr_fn, mesh, state, shardings,
                                         (cfg.train.global_batch_size, cfg.data.seq_len + 1))
  batch = next(pipeline.train_batches(cfg.data, mesh, seed=cfg.train.seed,
                                      global_batch_size=cfg.train.global_batch_size))
  return train_step, state, batch  # a real text batch, not zeros


def low_rank_run_config(c, preset: dict, method: str, *, steps: int, lr: float, seed: int,
                        rank: int, data_dir: str):
  """A configs/sst.py-style ConfigDict `c` set up for one run of a low-rank comparison: the
  preset's model, data and schedule, then the method's rank and periods redone for `steps`
  (the config variant derived them from its base's step count). Re-warm-ups last 10% of a
  period, for ReLoRA* and SST alike."""
  c.model.update(**preset["model"])
  c.data.update(seq_len=preset["seq_len"], eval_batches=preset["eval_batches"],
                data_dir=data_dir, select_percent=preset["select_percent"],
                final_eval_batches=preset["final_eval_batches"])
  c.train.update(global_batch_size=preset["batch"], num_steps=steps,
                 eval_every=preset["eval_every"], checkpoint_every=steps,
                 log_every=max(1, steps // 60), async_checkpointing=False, seed=seed)
  c.optim.update(learning_rate=lr, warmup_steps=preset["warmup"])
  if method in ("lora", "relora", "sst"):
    c.model.linear.rank = rank
  if method == "relora":
    c.model.linear.relora_every = max(1, steps // 6)
    c.optim.rewarm_steps = max(1, c.model.linear.relora_every // 10)
  elif method == "galore":
    c.optim.update(galore_rank=rank, galore_every=max(1, steps // 6))
  elif method == "sst":
    c.model.linear.sst_every = preset["sst_every"]
    c.optim.rewarm_steps = max(1, c.model.linear.sst_every // 10)
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.from_config_dict(c)


def stats(values: list[float]) -> dict:
  """mean, min, max, range (max - min) and n of one metric over seeds."""
  values = [float(v) for v in values]
  return dict(mean=statistics.fmean(values), min=min(values), max=max(values),
              range=max(values) - min(values), n=len(values))


def group_by(rows: list[dict], key_fields: tuple[str, ...], metric: str) -> dict[tuple, dict]:
  """{key: stats of `metric` over the rows (seeds) sharing key_fields}."""
  groups: dict[tuple, list[float]] = {}
  for r in rows:
    groups.setdefault(tuple(r[k] for k in key_fields), []).append(r[metric])
  return {k: stats(v) for k, v in groups.items()}


def ordered(a: dict, b: dict) -> bool | None:
  """True if a < b is claimed, False if b < a, None if the seeds do not resolve it (one seed,
  or a gap between the means no larger than either seed range). a, b: stats dicts."""
  if min(a["n"], b["n"]) < 2:
    return None
  gap = b["mean"] - a["mean"]
  if abs(gap) <= max(a["range"], b["range"]):
    return None
  return gap > 0


def describe(name: str, s: dict, digits: int = 4) -> str:
  """"name mean [min, max] (n seeds)"."""
  return (f"{name} {s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}] "
          f"({s['n']} seed{'s' if s['n'] != 1 else ''})")


def cell(s: dict, digits: int = 4) -> str:
  """A table cell: the mean, and the range over seeds when there are several."""
  if s["n"] == 1:
    return f"{s['mean']:.{digits}f}"
  return f"{s['mean']:.{digits}f} ± {s['range'] / 2:.{digits}f}"


def versus_baseline(rows: list[dict], baseline: str = "dense", key: str = "variant",
                    metric: str = "final_bpb") -> tuple[str, dict]:
  """A markdown table of `metric` per `key` over seeds, and each against `baseline` (lower is
  better): {name: verdict}, claimed only when the seeds resolve it (see `ordered`)."""
  by = {k[0]: v for k, v in group_by(rows, (key,), metric).items()}
  lines = ["", f"| {key} | {metric}, mean [min, max] | seeds | vs {baseline} |",
           "|---|---|---:|---|"]
  verdicts = {}
  for name, s in by.items():
    if name == baseline or baseline not in by:
      text = "-"
    else:
      claim = ordered(s, by[baseline])
      text = ("not resolved by the seeds" if claim is None else
              "better (lower)" if claim else "worse (higher)")
      verdicts[name] = text
    lines.append(f"| {name} | {s['mean']:.4f} [{s['min']:.4f}, {s['max']:.4f}] | {s['n']} | "
                 f"{text} |")
  return "\n".join(lines), verdicts


def write(path: str, body) -> None:
  if path:
    provenance.write_json(path, body)
