"""One MoE layer's experts, forward + backward: capacity einsum dispatch vs dropless (sort +
grouped matmul, on each --gmm_impl), over E, k and balanced vs skewed routing.

  python -m experiments.bench_moe --preset=cpu --out=runs/bench_moe_cpu.json   # 2 CPUs
  python -m experiments.bench_moe --preset=gpu                                 # one GPU
  python -m experiments.bench_moe --memory_tokens=2048,8192 --group_size=1024  # memory rows

--gmm_impl: the dropless path's grouped matmul (effjax.moe.gmm.GMM_IMPLS: ragged_dot, pallas;
on a CPU, pallas is the kernel's jnp reference). --group_size routes capacity dispatch within
groups of that many tokens (GShard), so its [T, E, C] tensors grow linearly in T.
--memory_tokens adds rows that only compile (no run) capacity dispatch at those token counts,
whole-batch and grouped, and print XLA's temporary bytes: the quadratic vs linear growth.

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

from effjax.moe.dispatch import dropless_dispatch, grouped_capacity_dispatch
from effjax.moe.gmm import GMM_IMPLS

PRESETS = {"cpu": dict(tokens=512, d_model=64, d_ff=128, reps=3),
           "gpu": dict(tokens=8192, d_model=1024, d_ff=2048, reps=20)}

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Problem sizes.")
_EXPERTS = flags.DEFINE_list("experts", ["8", "64"], "Numbers of experts E.")
_TOPK = flags.DEFINE_list("top_k", ["1", "2", "8"], "Experts per token k.")
_ROUTING = flags.DEFINE_list("routing", ["balanced", "skewed"], "Routing patterns.")
_DISPATCH = flags.DEFINE_list("dispatch", ["capacity", "dropless"], "Dispatch modes.")
_GMM = flags.DEFINE_list("gmm_impl", ["ragged_dot", "pallas"],
                         "Grouped-matmul implementations of the dropless rows.")
_GROUP = flags.DEFINE_integer("group_size", 0, "Capacity dispatch token group (0 = all T).")
_MEMORY_TOKENS = flags.DEFINE_list("memory_tokens", [], "Token counts for compile-only "
                                   "capacity-dispatch memory rows (E=8, k=2).")
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


def _groups(t: int) -> int:
  size = _GROUP.value or t
  if t % size:
    raise ValueError(f"--group_size={size} does not divide the {t} tokens")
  return t // size


def _capacity(tokens: int, e: int, k: int) -> int:
  return max(1, min(tokens, -(-int(_CF.value * tokens * k) // e)))


def bench_case(dispatch: str, kind: str, e: int, k: int, p: dict, impl: str = "") -> dict:
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
  groups = _groups(t)
  capacity = _capacity(t // groups, e, k)
  if dispatch == "capacity":
    fn = functools.partial(grouped_capacity_dispatch, num_groups=groups, capacity=capacity,
                           dense_slots=False, dtype=dtype)
  else:
    fn = functools.partial(dropless_dispatch, impl=impl, dtype=dtype)

  def loss(experts, x, weights):
    y, dropped, _ = fn(x, idx, valid, weights, experts)
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
  return dict(dispatch=dispatch, gmm_impl=impl or None, routing=kind, experts=e, top_k=k,
              tokens=t, d_model=d, d_ff=f, group_size=t // groups if dispatch == "capacity"
              else None, capacity=capacity if dispatch == "capacity" else None,
              ms=1e3 * statistics.median(times), temp_bytes=temp,
              temp_vs_balanced=temp / balanced_bytes,
              load_max_over_mean=float(jnp.max(load) / jnp.mean(load)),
              dropped_fraction=float(dropped) / (t * k))


def memory_row(t: int, group_size: int, p: dict) -> dict:
  """Compile-only: forward + backward temporary bytes of capacity dispatch at T tokens, E=8,
  k=2, whole-batch (group_size 0) or grouped."""
  e, k, d, f = 8, 2, p["d_model"], p["d_ff"]
  groups = t // group_size if group_size else 1
  if group_size and t % group_size:
    raise ValueError(f"--group_size={group_size} does not divide --memory_tokens {t}")
  capacity = _capacity(t // groups, e, k)
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  experts = {"wi_gate": spec((e, d, f)), "wi_up": spec((e, d, f)), "wo": spec((e, f, d))}
  fn = functools.partial(grouped_capacity_dispatch, num_groups=groups, capacity=capacity,
                         dense_slots=False, dtype=jnp.float32)

  def loss(experts, x, weights, idx):
    y, _, _ = fn(x, idx, jnp.ones(idx.shape, bool), weights, experts)
    return jnp.sum(y)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
      experts, spec((t, d)), spec((t, k)), spec((t, k), jnp.int32)).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
  return dict(tokens=t, group_size=group_size or t, capacity=capacity, temp_bytes=temp,
              dispatch_tensor_bytes=4 * t * e * capacity)


def main(argv):
  del argv
  p = PRESETS[_PRESET.value]
  for impl in _GMM.value:
    if impl not in GMM_IMPLS:
      raise ValueError(f"--gmm_impl={impl!r} is not one of {sorted(GMM_IMPLS)}")
  rows = []
  for e in map(int, _EXPERTS.value):
    for k in map(int, _TOPK.value):
      if k > e:
        continue
      for kind in _ROUTING.value:
        for dispatch in _DISPATCH.value:
          for impl in (_GMM.value if dispatch == "dropless" else [""]):
            rows.append(bench_case(dispatch, kind, e, k, p, impl))
            print(json.dumps(rows[-1]), flush=True)
  print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {_DTYPE.value}; T={p['tokens']} "
        f"tokens, D={p['d_model']}, F={p['d_ff']}, capacity factor {_CF.value}, group size "
        f"{_GROUP.value or 'T'}; forward + backward of dispatch, experts and combine; median of "
        f"{p['reps']} calls")
  impls = _GMM.value
  print("| E | k | routing | load max/mean | capacity: ms | "
        + " | ".join(f"dropless {i}: ms" for i in impls)
        + " | capacity: temp MiB (x balanced) | "
        + " | ".join(f"dropless {i}: temp MiB (x balanced)" for i in impls)
        + " | capacity dropped |")
  print("|---:|---:|---|---:|---:|" + "---:|" * (2 * len(impls)) + "---:|---:|")
  by = {(r["experts"], r["top_k"], r["routing"], r["dispatch"], r["gmm_impl"]): r for r in rows}
  fmt = lambda x: "-" if x is None else f"{x['ms']:.1f}"
  mem = lambda x: "-" if x is None else (f"{x['temp_bytes'] / 2**20:.1f} "
                                         f"({x['temp_vs_balanced']:.1f}x)")
  seen = []
  for (e, k, kind, _, _), r in by.items():
    if (e, k, kind) in seen:
      continue
    seen.append((e, k, kind))
    c = by.get((e, k, kind, "capacity", None))
    ds = [by.get((e, k, kind, "dropless", i)) for i in impls]
    print(f"| {e} | {k} | {kind} | {r['load_max_over_mean']:.2f} | {fmt(c)} | "
          + " | ".join(fmt(d) for d in ds) + f" | {mem(c)} | "
          + " | ".join(mem(d) for d in ds)
          + f" | {'-' if c is None else format(c['dropped_fraction'], '.3f')} |")
  memory = []
  for t in map(int, _MEMORY_TOKENS.value):
    for group in sorted({0, _GROUP.value}):
      memory.append(memory_row(t, group, p))
      print(json.dumps(memory[-1]), flush=True)
  if memory:
    print("\nCapacity dispatch memory (compile only; E=8, k=2, forward + backward)")
    print("| tokens T | group size | C per group | one [T, E, C] tensor MiB | XLA temp MiB |")
    print("|---:|---:|---:|---:|---:|")
    for m in memory:
      print(f"| {m['tokens']} | {m['group_size']} | {m['capacity']} | "
            f"{m['dispatch_tensor_bytes'] / 2**20:.1f} | {m['temp_bytes'] / 2**20:.1f} |")
  if _OUT.value:
    from effjax import provenance  # pylint: disable=g-import-not-at-top
    provenance.write_json(_OUT.value, {"rows": rows, "memory": memory})


if __name__ == "__main__":
  app.run(main)
