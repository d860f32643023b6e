"""One linear layer, forward + backward: Monarch vs dense, time ratio beside FLOP ratio.

  python -m experiments.bench_monarch                                   # the full grid (a GPU)
  python -m experiments.bench_monarch --widths=512,1024,2048 --max_gflop=300 --reps=3   # 2 CPUs

For each dtype, shape (`square`: d -> d; `up4`: d -> 4d, the MLP's input; `down4`: 4d -> d)
and width d it times the jitted value and gradient of sum(y * g) with respect to the weights
and the input (the forward and both backward matmuls, the work of a training step), over a batch
of `--tokens` tokens, for the dense layer and for MonarchLinear with each `--nblocks`. Weights
and activations are both in the dtype. The analytic FLOP ratio (Monarch / dense =
params / (in x out)) is printed beside the time ratio; `XLA flops` is the compiled program's
own count (cost analysis), a check that nothing hidden (padding, transposes materialised as
matmuls) changes the work. Prints a markdown table; --out writes the rows as JSON.
"""
from __future__ import annotations

import json
import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.layers.monarch import MonarchLinear, monarch_param_count

_WIDTHS = flags.DEFINE_list("widths", ["512", "1024", "2048", "4096"], "Model widths d.")
_SHAPES = flags.DEFINE_list("shapes", ["square", "up4"], "square (d->d), up4 (d->4d), "
                            "down4 (4d->d).")
_NBLOCKS = flags.DEFINE_list("nblocks", ["2", "4", "8"], "Monarch block counts.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens per batch (rows of x).")
_REPS = flags.DEFINE_integer("reps", 10, "Timed calls per case (after two warm-up calls).")
_MAX_GFLOP = flags.DEFINE_float("max_gflop", 0.0, "Skip cases whose dense forward+backward "
                                "exceeds this many GFLOP (0: no limit); for slow devices.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for the results.")

SHAPES = {"square": (1, 1), "up4": (1, 4), "down4": (4, 1)}


def _dense_layer(features):
  class Dense(nn.Module):
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
      w = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], features), self.dtype)
      return x @ w
  return Dense


def time_layer(layer, n_in: int, n_out: int, dtype) -> tuple[float, float | None]:
  """(median seconds per forward+backward, XLA's flop count or None)."""
  kx, kg, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (_TOKENS.value, n_in), dtype)
  g = jax.random.normal(kg, (_TOKENS.value, n_out), dtype)
  params = layer.init(kp, x)["params"]

  def loss(params, x):
    return jnp.sum((layer.apply({"params": params}, x) * g).astype(jnp.float32))

  # value_and_grad: with grad alone the loss (linear in y) is dead code and XLA drops the
  # forward's last matmul, timing 2 of dense's 3 matmuls and 5 of Monarch's 6.
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
  except Exception:  # not every backend reports it
    xla_flops = None
  for _ in range(2):
    jax.block_until_ready(compiled(params, x))
  times = []
  for _ in range(_REPS.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x))
    times.append(time.perf_counter() - start)
  return statistics.median(times), xla_flops


def main(argv):
  del argv
  device = jax.devices()[0]
  rows = []
  for dtype_name in _DTYPES.value:
    dtype = jnp.dtype(dtype_name)
    for shape in _SHAPES.value:
      if shape not in SHAPES:
        raise app.UsageError(f"--shapes: unknown shape {shape!r}; choose from {list(SHAPES)}")
      a, b = SHAPES[shape]
      for width in map(int, _WIDTHS.value):
        n_in, n_out = a * width, b * width
        dense_flops = 6.0 * _TOKENS.value * n_in * n_out
        if _MAX_GFLOP.value and dense_flops > _MAX_GFLOP.value * 1e9:
          print(f"skip {dtype_name} {shape} d={width}: {dense_flops / 1e9:.0f} GFLOP > "
                f"--max_gflop", flush=True)
          continue
        dense_s, dense_xla = time_layer(_dense_layer(n_out)(dtype), n_in, n_out, dtype)
        for k in map(int, _NBLOCKS.value):
          layer = MonarchLinear(n_out, nblocks=k, dtype=dtype, param_dtype=dtype)
          monarch_s, monarch_xla = time_layer(layer, n_in, n_out, dtype)
          flops = 6.0 * _TOKENS.value * monarch_param_count(n_in, n_out, k)
          row = dict(dtype=dtype_name, shape=shape, width=width, n_in=n_in, n_out=n_out,
                     nblocks=k, dense_ms=dense_s * 1e3, monarch_ms=monarch_s * 1e3,
                     flop_ratio=flops / dense_flops, time_ratio=monarch_s / dense_s,
                     dense_tflops_per_s=dense_flops / dense_s / 1e12,
                     monarch_tflops_per_s=flops / monarch_s / 1e12,
                     xla_flop_ratio=(monarch_xla / dense_xla
                                     if monarch_xla and dense_xla else None))
          rows.append(row)
          print(json.dumps(row), flush=True)

  print(f"\ndevice: {device.device_kind} ({device.platform}), jax {jax.__version__}; "
        f"{_TOKENS.value} tokens, forward+backward (dx and dW), median of {_REPS.value}")
  print("| dtype | shape | d | in x out | nblocks | dense ms | Monarch ms | FLOP ratio | "
        "XLA flops ratio | time ratio | speed-up | dense TFLOP/s | Monarch TFLOP/s |")
  print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    xla = f"{r['xla_flop_ratio']:.3f}" if r["xla_flop_ratio"] else "-"
    print(f"| {r['dtype']} | {r['shape']} | {r['width']} | {r['n_in']} x {r['n_out']} | "
          f"{r['nblocks']} | {r['dense_ms']:.2f} | {r['monarch_ms']:.2f} | "
          f"{r['flop_ratio']:.3f} | {xla} | {r['time_ratio']:.3f} | "
          f"{1 / r['time_ratio']:.2f}x | {r['dense_tflops_per_s']:.3f} | "
          f"{r['monarch_tflops_per_s']:.3f} |")
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                     tokens=_TOKENS.value, rows=rows), f, indent=2)


if __name__ == "__main__":
  app.run(main)
