"""What the repro_*.py scripts share: the provenance guard, seeds, one run's summary from its
metrics, evaluation on the held-out selection slice, seed statistics and verdicts.

Verdicts: with several seeds, "A < B" is claimed only when the gap between the means exceeds
both methods' seed ranges (max - min); with one seed nothing is claimed.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics

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
  times = sorted(v["step_time_sec"] for v in m.values() if "step_time_sec" in v)
  tps = sorted(v["tokens_per_sec"] for v in m.values() if "tokens_per_sec" in v)
  return dict(
      seed=cfg.train.seed, steps=steps,
      tokens=steps * cfg.train.global_batch_size * cfg.data.seq_len,
      eval_loss=final["eval_loss"], eval_ppl=final["eval_perplexity"],
      eval_bpb=final["eval_bpb"],
      eval_curve={s: v["eval_loss"] for s, v in sorted(m.items()) if "eval_loss" in v},
      eval_bpb_curve={s: v["eval_bpb"] for s, v in sorted(m.items()) if "eval_bpb" in v},
      train_curve={s: v["train_loss"] for s, v in sorted(m.items()) if "train_loss" in v},
      median_step_s=times[len(times) // 2] if times else math.nan,
      median_tokens_per_s=tps[len(tps) // 2] if tps else math.nan,
      first=m.get(0, {}), config=dataclasses.asdict(cfg))


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
  from effjax.train import evaluation, loop  # pylint: disable=g-import-not-at-top
  from effjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  _, state, mesh = loop.load_checkpoint(cfg, workdir)
  model_cfg = cfg.model
  if cfg.train.dense_from_step:
    model_cfg = dataclasses.replace(model_cfg, linear=model_cfg.linear.all_dense())
  eval_step = jax.jit(step_lib.make_eval_step(DecoderLM(model_cfg)))
  with step_lib.sharding_context(mesh):
    result = evaluation.evaluate(eval_step, state.params, state.model_state, cfg, mesh,
                                 split=pipeline.selection_split(cfg.data),
                                 max_batches=max_batches)
  return result["eval_loss"]


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
