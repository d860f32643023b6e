"""Decode throughput: the KV-cache path against recomputing the whole prefix every step.

  python -m experiments.bench_decode                          # tiny dense and MoE, 64-512
  python -m experiments.bench_decode --lengths=128,256 --models=moe --batch=4 --out=b.json

Both sides are one jitted `lax.while_loop` of greedy steps over static shapes, from the same
`--prompt_len`-token prompts to `length` tokens:
  cached     prefill once, then one token per step against the KV cache (effjax/models/decode.py);
  recompute  each step runs the training-path forward over the whole fixed-length buffer
             (positions past the current one are masked out by causality, so the result is
             the same) and takes the next token's logits: a static-shape decoder without a cache.
Generated tokens per second of the compiled call (compilation excluded; median of --reps),
side by side, with their ratio; both must produce the same greedy tokens (checked). Models:
configs/lm.py:tiny's model (`dense`) and the same with every FFN a top-2 MoE of 8 experts
(`moe`), randomly initialised (decode cost does not depend on training).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effjax.config import MeshConfig, ModelConfig, MoEConfig
from effjax.data import tokenizer
from effjax.models import decode
from effjax.models.decoder_lm import DecoderLM
from effjax.parallel import build_mesh
from effjax.train import step as step_lib

_LENGTHS = flags.DEFINE_list("lengths", ["64", "128", "256", "512"],
                             "Total sequence lengths (prompt + generated).")
_MODELS = flags.DEFINE_list("models", ["dense", "moe"], "dense and/or moe.")
_BATCH = flags.DEFINE_integer("batch", 8, "Prompts decoded together.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 8, "Prompt tokens ([BOS] + random bytes).")
_REPS = flags.DEFINE_integer("reps", 3, "Timed calls per side; the median is reported.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for the results.")

MODELS = {
    "dense": ModelConfig(),
    "moe": ModelConfig(ffn="moe", moe=MoEConfig(num_experts=8, top_k=2)),
}


def recompute_generate(model, params, model_state, tokens_BS, lengths_B, max_new_tokens):
  """Greedy decoding without a cache: a full forward over the [B, S] buffer every step."""
  rows = jnp.arange(tokens_BS.shape[0])

  def body(i, tokens_BS):
    logits_BSV = model.apply({"params": params, **model_state}, tokens_BS)
    next_B = jnp.argmax(logits_BSV[rows, lengths_B + i - 1], axis=-1).astype(jnp.int32)
    return tokens_BS.at[rows, lengths_B + i].set(next_B)

  return jax.lax.fori_loop(0, max_new_tokens, body, tokens_BS)


def _median_time(fn, reps: int):
  times = []
  out = None
  for _ in range(reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def bench_one(name: str, model_cfg: ModelConfig, length: int, batch: int, prompt_len: int,
              reps: int, mesh) -> dict:
  model = DecoderLM(model_cfg)
  with step_lib.sharding_context(mesh):
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
  params, model_state = step_lib.split_variables(nn.meta.unbox(variables))
  rng = np.random.default_rng(0)
  prompts = [[tokenizer.BOS] + rng.integers(32, 127, prompt_len - 1).tolist()
             for _ in range(batch)]
  new = length - prompt_len
  greedy = decode.SamplingConfig(temperature=0.0)

  sampler = decode.Sampler(model_cfg, params, model_state, mesh, max_length=length)
  sampler.generate(prompts, max_new_tokens=new, sampling=greedy, eos_id=None)  # compiles
  runs = [sampler.generate(prompts, max_new_tokens=new, sampling=greedy, eos_id=None)
          for _ in range(reps)]
  cached_s = statistics.median(stats["seconds"] for _, stats in runs)  # the compiled call
  cached_out = runs[-1][0]

  tokens_BS = np.full((batch, length), tokenizer.PAD, np.int32)
  tokens_BS[:, :prompt_len] = np.asarray(prompts, np.int32)
  lengths_B = np.full((batch,), prompt_len, np.int32)
  with step_lib.sharding_context(mesh):
    fn = jax.jit(functools.partial(recompute_generate, model, max_new_tokens=new))
    compiled = fn.lower(params, model_state, tokens_BS, lengths_B).compile()
    recompute_s, full = _median_time(lambda: compiled(params, model_state, tokens_BS,
                                                      lengths_B), reps)
  full = np.asarray(full)
  same = all(np.array_equal(full[i, prompt_len:], cached_out[i]) for i in range(batch))
  generated = batch * new
  row = {"model": name, "length": length, "batch": batch, "prompt_len": prompt_len,
         "new_tokens": new, "cached_tokens_per_sec": generated / cached_s,
         "recompute_tokens_per_sec": generated / recompute_s,
         "speedup": recompute_s / cached_s, "same_tokens": same}
  print(f"{name:6s} {length:6d} {row['cached_tokens_per_sec']:12.1f} "
        f"{row['recompute_tokens_per_sec']:14.1f} {row['speedup']:8.2f}x  {same}", flush=True)
  return row


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = sorted(set(_MODELS.value) - set(MODELS))
  if unknown:
    raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
  try:
    lengths = [int(x) for x in _LENGTHS.value]
  except ValueError:
    raise SystemExit(f"--lengths must be integers, got {_LENGTHS.value}") from None
  bad = [n for n in lengths if n <= _PROMPT_LEN.value]
  if bad or _PROMPT_LEN.value < 1 or _BATCH.value < 1 or _REPS.value < 1:
    raise SystemExit(f"need lengths > --prompt_len={_PROMPT_LEN.value} >= 1 (got {bad or lengths})"
                     f", --batch >= 1, --reps >= 1")
  mesh = build_mesh(MeshConfig())
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}; batch "
        f"{_BATCH.value}, prompt {_PROMPT_LEN.value} tokens, greedy; generated tokens/s")
  print(f"{'model':6s} {'length':>6s} {'cached':>12s} {'recompute':>14s} {'ratio':>9s}  same")
  rows = [bench_one(name, MODELS[name], n, _BATCH.value, _PROMPT_LEN.value, _REPS.value, mesh)
          for name in _MODELS.value for n in lengths]
  if _OUT.value:
    try:
      from effjax import provenance  # pylint: disable=g-import-not-at-top
      prov = provenance.collect()
    except ImportError:
      prov = {"jax": jax.__version__, "device": jax.devices()[0].device_kind}
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump({"results": rows, "provenance": prov,
                 "models": {k: dataclasses.asdict(MODELS[k]) for k in _MODELS.value}}, f,
                indent=2, default=str)
  if not all(r["same_tokens"] for r in rows):
    raise SystemExit("the cached and recomputed greedy tokens differ (see the table)")


if __name__ == "__main__":
  app.run(main)
