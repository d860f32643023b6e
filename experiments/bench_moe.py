"""One MoE layer's experts, forward + backward: capacity einsum dispatch vs dropless (sort +
grouped matmul), over E, k and balanced vs skewed routing.

  python -m experiments.bench_moe --preset=cpu --out=runs/bench_moe_cpu.json   # 2 CPUs, ~5 min
  python -m experiments.bench_moe --preset=gpu                                 # one GPU

For each case it times the jitted value and gradient of sum(y * g) with respect to the expert
weights, the tokens and the combine weights (dispatch, the SwiGLU experts and the combine: the
router is the same for both and left out) over T tokens of width D, experts of width F. The
routing is fixed and given: `balanced` sends token t's slot j to expert (t k + j) mod E (every
expert gets T k / E pairs); `skewed` samples k distinct experts per token with Zipf
probabilities p_e ~ 1 / (e + 1) (Gumbel top-k), so the first experts get several times the
mean load (the max/mean load is printed). Capacity dispatch uses capacity factor
--capacity_factor, so under skew it drops pairs (the dropped fraction is printed); dropless
drops nothing.

Memory: XLA's compiled temporary bytes (`memory_analysis().temp_size_in_bytes`) of the step,
reported against the balanced activation size T x k x D x 4 bytes (the routed rows, float32).
Prints a markdown table; --out writes the rows as JSON. Wall times on a shared 2-core CPU are
for relative comparison only; note that on CPU jax.lax.ragged_dot computes every group over
all rows (G times the FLOPs), which is what the dropless numbers measure there.
"""
from __future__ import annotations

import functools
import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from effjax.moe.dispatch import capacity_dispatch, dropless_dispatch

PRESETS = {"cpu": dict(tokens=512, d_model=64, d_ff=128, reps=3),
           "gpu": dict(tokens=8192, d_model=1024, d_ff=2048, reps=20)}

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Problem sizes.")
_EXPERTS = flags.DEFINE_list("experts", ["8", "64"], "Numbers of experts E.")
_TOPK = flags.DEFINE_list("top_k", ["1", "2", "8"], "Experts per token k.")
_ROUTING = flags.DEFINE_list("routing", ["balanced", "skewed"], "Routing patterns.")
_DISPATCH = flags.DEFINE_list("dispatch", ["capacity", "dropless"], "Dispatch modes.")
_CF = flags.DEFINE_float("capacity_factor", 1.25, "Capacity factor of capacity dispatch.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for the results.")


def routing(kind: str, t: int, e: int, k: int, key):
  """(expert_idx [T, k] int32, weights [T, k]) of the given pattern."""
  if kind == "balanced":
    idx = (jnp.arange(t)[:, None] * k + jnp.arange(k)[None, :]) % e
  else:
    logits = -jnp.log(jnp.arange(1, e + 1, dtype=jnp.float32))  # Zipf
    idx = jax.lax.top_k(logits + jax.random.gumbel(key, (t, e)), k)[1]
  weights = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 1), (t, k)), axis=-1)
  return idx.astype(jnp.int32), weights


def bench_case(dispatch: str, kind: str, e: int, k: int, p: dict) -> dict:
  t, d, f = p["tokens"], p["d_model"], p["d_ff"]
  dtype = jnp.dtype(_DTYPE.value)
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (t, d), jnp.float32)
  g = jax.random.normal(keys[1], (t, d), jnp.float32)
  experts = {"wi_gate": 0.05 * jax.random.normal(keys[2], (e, d, f)),
             "wi_up": 0.05 * jax.random.normal(keys[3], (e, d, f)),
             "wo": 0.05 * jax.random.normal(keys[4], (e, f, d))}
  idx, weights = routing(kind, t, e, k, keys[5])
  valid = jnp.ones(idx.shape, bool)
  capacity = max(1, min(t, -(-int(_CF.value * t * k) // e)))
  if dispatch == "capacity":
    fn = functools.partial(capacity_dispatch, capacity=capacity, dense_slots=False, dtype=dtype)
  else:
    fn = functools.partial(dropless_dispatch, impl="ragged_dot", dtype=dtype)

  def loss(experts, x, weights):
    y, dropped = fn(x, idx, valid, weights, experts)
    return jnp.sum(y * g), dropped

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  compiled = step.lower(experts, x, weights).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
  (_, dropped), _ = jax.block_until_ready(compiled(experts, x, weights))  # warm-up
  times = []
  for _ in range(p["reps"]):
    start = time.perf_counter()
    jax.block_until_ready(compiled(experts, x, weights))
    times.append(time.perf_counter() - start)
  load = jnp.bincount(idx.reshape(-1), length=e)
  balanced_bytes = t * k * d * 4
  return dict(dispatch=dispatch, routing=kind, experts=e, top_k=k, tokens=t, d_model=d, d_ff=f,
              capacity=capacity if dispatch == "capacity" else None,
              ms=1e3 * statistics.median(times), temp_bytes=temp,
              temp_vs_balanced=temp / balanced_bytes,
              load_max_over_mean=float(jnp.max(load) / jnp.mean(load)),
              dropped_fraction=float(dropped) / (t * k))


def main(argv):
  del argv
  p = PRESETS[_PRESET.value]
  rows = []
  for e in map(int, _EXPERTS.value):
    for k in map(int, _TOPK.value):
      if k > e:
        continue
      for kind in _ROUTING.value:
        for dispatch in _DISPATCH.value:
          rows.append(bench_case(dispatch, kind, e, k, p))
          print(json.dumps(rows[-1]), flush=True)
  print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {_DTYPE.value}; T={p['tokens']} "
        f"tokens, D={p['d_model']}, F={p['d_ff']}, capacity factor {_CF.value}; forward + "
        "backward of dispatch, experts and combine; median of "
        f"{p['reps']} calls")
  print("| E | k | routing | load max/mean | capacity: ms | dropless: ms | dropless / capacity "
        "| capacity: temp MiB (x balanced) | dropless: temp MiB (x balanced) | capacity dropped |")
  print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
  by = {(r["experts"], r["top_k"], r["routing"], r["dispatch"]): r for r in rows}
  for (e, k, kind, dispatch), r in by.items():
    if dispatch != _DISPATCH.value[0]:
      continue
    c, d = by.get((e, k, kind, "capacity")), by.get((e, k, kind, "dropless"))
    fmt = lambda x: "-" if x is None else f"{x['ms']:.1f}"
    mem = lambda x: "-" if x is None else (f"{x['temp_bytes'] / 2**20:.1f} "
                                           f"({x['temp_vs_balanced']:.1f}x)")
    ratio = f"{d['ms'] / c['ms']:.2f}" if c and d else "-"
    print(f"| {e} | {k} | {kind} | {r['load_max_over_mean']:.2f} | {fmt(c)} | {fmt(d)} | "
          f"{ratio} | {mem(c)} | {mem(d)} | "
          f"{'-' if c is None else format(c['dropped_fraction'], '.3f')} |")
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as fh:
      json.dump(rows, fh, indent=2)


if __name__ == "__main__":
  app.run(main)
