"""Dense vs top-2 MoE vs MoE++ vs the dense-to-sparse gate at equal active parameters.

  python -m experiments.repro_moe --workdir=runs/repro_moe --out=runs/repro_moe.json \
      --seeds=0,1                                                              # ~1 h
  python -m experiments.repro_moe --workdir=runs/rmoe_quick --preset=quick --allow_dirty

Every variant runs once per --seeds seed; the final bits/byte is reported as mean and range,
and a variant is called better or worse than dense only when the gap exceeds the seed ranges.
Refuses a dirty tree or a non-empty --workdir (--allow_dirty, --allow_resume); the results
file records provenance and every run's config.

Variants (configs/lm.py:BASE and configs/moe.py:VARIANT,BASE; same seed, data order, tokens):

  dense     the SwiGLU FFN of width d_ff
  top2      8 experts of width d_ff/2, softmax then top-2, dropless: the same active FFN
            parameters per token as dense (2 x d_ff/2), 4x the FFN parameters in total
  moepp     MoE++: top2's 8 FFN experts plus 1 zero, 1 copy, 2 constant experts and gating
            residuals (the vanilla MoE of the same size is top2); active FFN work <= top2
  evomoe    top2's experts behind EvoMoE's dense-to-sparse Gumbel gate (temperature 2.0 ->
            0.3 over the run, threshold 0.05): dense early, about top-1 late

Presets: `full` trains the configs/lm.py:tiny model (4 x 128) on --seq_len (128) x --batch (8)
token batches for --steps (200) steps, evaluating on 16 spread validation batches during
training and the whole validation split at the end (32 minutes plus the final evaluations for
the four variants on 2 busy CPU cores, EvoMoE's dense start half of it); `quick` trains the
`test` base for 40 steps (about 2 minutes).

Reported per variant: parameters (total / active per token), validation bits per byte by step,
training tokens/s (median logged interval), and the expert layer's forward throughput: the
trained first MoE layer applied (eval mode, jitted) to the hidden states that reach it on
validation batches, median of --reps timed calls, with the routed FFN rows per token it did
(MoE++ claims 1.1-2.1x expert forward throughput over a vanilla MoE of the same size).
"""
from __future__ import annotations

import os
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import jax

from configs import lm
from configs import moe as moe_configs
from effjax import config as config_lib
from effjax.data import pipeline
from effjax.models.decoder_lm import DecoderLM
from effjax.moe.layer import MoELayer
from effjax.train.checkpoint import load_checkpoint
from experiments import runs

_WORKDIR = flags.DEFINE_string("workdir", None, "A new directory; one subdirectory per variant.",
                               required=True)
_PRESET = flags.DEFINE_enum("preset", "full", ["full", "quick"], "full: tiny; quick: test.")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps (preset full).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Sequence length (preset full).")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size (preset full).")
_VARIANTS = flags.DEFINE_list("variants", ["dense", "top2", "moepp", "evomoe"], "Variants.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed calls of the expert layer per variant.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir (default: the TFDS default).")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for the results.")


def variant_config(name: str, seed: int = 0):
  base = "tiny" if _PRESET.value == "full" else "test"
  c = lm.get_config(base) if name == "dense" else moe_configs.get_config(f"{name},{base}")
  c.data.data_dir = _DATA_DIR.value
  c.train.update(async_checkpointing=False, seed=seed)
  steps = _STEPS.value if _PRESET.value == "full" else 40
  if _PRESET.value == "full":  # the tiny model on shorter, fewer rows: CPU-feasible x 4
    c.data.update(seq_len=_SEQ_LEN.value, eval_batches=16)
    c.train.global_batch_size = _BATCH.value
  c.train.update(num_steps=steps, eval_every=max(steps // 4, 1), checkpoint_every=steps,
                 log_every=max(steps // 20, 1))
  c.optim.warmup_steps = min(c.optim.warmup_steps, steps // 5)
  if name == "evomoe":
    c.model.moe.anneal_steps = steps
  return config_lib.from_config_dict(c)


def _restore_params(cfg, workdir):
  _, state, mesh = load_checkpoint(cfg, workdir)
  return mesh, DecoderLM(cfg.model), state


def expert_layer_throughput(cfg, workdir) -> dict:
  """Forward of the trained layers_0 MoE on the hidden states that reach it (eval batches)."""
  mesh, model, state = _restore_params(cfg, workdir)
  batch = next(iter(pipeline.eval_batches(cfg.data, mesh,
                                          global_batch_size=cfg.train.global_batch_size)))
  tokens = batch["tokens"][:, :-1]
  is_norm = lambda mdl, method: mdl.name == "mlp_norm" and method == "__call__"
  variables = {"params": state.params, **state.model_state}
  _, inter = jax.jit(lambda v, t: model.apply(v, t, capture_intermediates=is_norm,
                                              mutable=["intermediates"]))(variables, tokens)
  hidden = inter["intermediates"]["layers_0"]["mlp_norm"]["__call__"][0]
  layer = MoELayer(cfg.model, train=False)
  layer_vars = {"params": state.params["layers_0"]["mlp"]}
  for collection, values in state.model_state.items():  # selection bias, temperature
    layer_vars[collection] = values["layers_0"]["mlp"]
  fwd = jax.jit(lambda v, x: layer.apply(v, x, mutable=["metrics"]))
  (_, _), sown = jax.block_until_ready(fwd(layer_vars, hidden))
  times = []
  for _ in range(_REPS.value):
    start = time.perf_counter()
    jax.block_until_ready(fwd(layer_vars, hidden))
    times.append(time.perf_counter() - start)
  metrics = {k: jax.device_get(v[0]) for k, v in sown["metrics"].items()}
  n_tokens = hidden.shape[0] * hidden.shape[1]
  ffn_rows = float(metrics["experts_per_token"] * metrics["ffn_fraction"])
  return {"layer_ms": 1e3 * statistics.median(times),
          "layer_tokens_per_s": n_tokens / statistics.median(times),
          "ffn_rows_per_token": ffn_rows,
          "experts_per_token": float(metrics["experts_per_token"])}


def run_variant(name: str, seed: int) -> dict:
  cfg = variant_config(name, seed)
  workdir = os.path.join(_WORKDIR.value, f"{name}_s{seed}")
  metrics, wall = runs.train_timed(cfg, workdir)
  evals = runs.curve(metrics, "eval_bpb")
  row = dict(variant=name, seed=seed, config=config_lib.to_dict(cfg), params=metrics[0]["params"],
             active_params=metrics[0].get("active_params", metrics[0]["params"]),
             train_flops_per_token=metrics[0]["flops_per_token"], eval_bpb=evals,
             final_bpb=evals[max(evals)], wall_s=wall,
             median_tokens_per_s=runs.median(metrics, "tokens_per_sec"),
             steps=cfg.train.num_steps,
             tokens=cfg.train.num_steps * cfg.train.global_batch_size * cfg.data.seq_len)
  last = max(s for s, m in metrics.items() if "train_loss" in m)
  for key in ("dropped_fraction", "load_max_over_mean", "experts_per_token", "ffn_fraction",
              "temperature"):
    k = f"layers_0/mlp/{key}"
    if k in metrics[last]:
      row[f"final_{key}"] = metrics[last][k]
  if cfg.model.ffn == "moe":
    row.update(expert_layer_throughput(cfg, workdir))
  return row


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  seeds = runs.seeds()
  runs.guard(_WORKDIR.value)
  rows = runs.run_each(_VARIANTS.value, seeds, run_variant)
  _print_table(rows)
  runs.report_versus_baseline(rows, _OUT.value)


def _print_table(rows):
  r0 = rows[0]
  print(f"\npreset {_PRESET.value}: {r0['steps']} steps, {r0['tokens']:,} training tokens per "
        f"variant; {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| variant | params (total / active) | train FLOPs/token | eval bits/byte by step | "
        "final bits/byte | train tokens/s | wall (s) |")
  print("|---|---|---:|---|---:|---:|---:|")
  for r in rows:
    by_step = ", ".join(f"{s}: {b:.4f}" for s, b in r["eval_bpb"].items())
    print(f"| {r['variant']} s{r['seed']} | {r['params']:,} / {r['active_params']:,} | "
          f"{r['train_flops_per_token']:,.0f} | {by_step} | {r['final_bpb']:.4f} | "
          f"{r['median_tokens_per_s']:,.0f} | {r['wall_s']:.0f} |")
  moe_rows = [r for r in rows if "layer_ms" in r]
  if moe_rows:
    ref = next((r for r in moe_rows if r["variant"] == "top2"), moe_rows[0])
    print("\nexpert layer (layers_0 MoE, trained, eval mode) forward on validation hidden states")
    print("| variant | ms / call | tokens/s | vs top2 | FFN rows / token | experts / token | "
          "final load max/mean | final dropped |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in moe_rows:
      print(f"| {r['variant']} s{r['seed']} | {r['layer_ms']:.2f} | "
            f"{r['layer_tokens_per_s']:,.0f} | "
            f"{r['layer_tokens_per_s'] / ref['layer_tokens_per_s']:.2f} | "
            f"{r['ffn_rows_per_token']:.3f} | {r['experts_per_token']:.3f} | "
            f"{r.get('final_load_max_over_mean', float('nan')):.2f} | "
            f"{r.get('final_dropped_fraction', float('nan')):.3f} |")


if __name__ == "__main__":
  app.run(main)
