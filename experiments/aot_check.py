"""Size a pod job on one machine: compile the train step for a bigger mesh, print its memory.

Two ways, nothing runs in either and no accelerator is needed:

  --target=NAME     the target's own compiler, compile-only (pallas_kernels/targets.py):
                    libtpu for a TPU slice (tpu:v5e:2x2, tpu:v5p:4x4x4, tpu:v6e:16x16, ...),
                    XLA's GPU compiler for N GPUs (gpu:h100:8, gpu:h200:8). Needs jax[tpu] /
                    jax[cuda12] (`make test-compile` builds such an environment).
  --num_devices=N   (when no --target; default 8) simulated CPU devices and the CPU compiler.

    python -m experiments.aot_check --config=configs/lm.py:small --target=tpu:v5p:4x4x4 \\
        --config.mesh.data=4 --config.mesh.fsdp=16
    python -m experiments.aot_check --config=configs/lm.py:small --num_devices=64 \\
        --config.mesh.data=8 --config.mesh.fsdp=8

The mesh's axes must multiply to the device count (a -1 axis takes the rest); on a TPU slice
each axis must also be a product of whole torus axes, as `jax.make_mesh` requires on the pod
(4x4x4 takes 4 x 16, not 8 x 8). The state row is exact for any backend (each device's shard
of every params, optimizer and model-state array). The argument / output / alias / temp rows
are the compiler's `memory_analysis()` per device: with --target, the target compiler's own
figures, and the step is checked against the chip's HBM (needed = argument + output - alias +
temp, the trainer's own guard); with --num_devices, the CPU compiler's estimate, a guide to
the accelerator's, not its figure.

With --target it also prints the compiler's `cost_analysis()` per device and step (flops,
bytes accessed: estimates from its cost model) and, on TPU, its roofline step time
`optimal_seconds` with the MFU bound that implies: model flops per step (the trainer's
`flops_per_token`, 3 x forward matmul flops, times the tokens of a global batch; no
rematerialisation) / (optimal_seconds x devices x the chip's dense bf16 peak). The
compiler's estimate, not a measurement. The GPU compiler reports no cost analysis for
compile-only devices; those rows say so. With model.scan_layers the compiled program's cost
analysis counts the scanned layer loop once, so (--step_cost, the default) the step is also
compiled with 1 and 2 unrolled layers on the same mesh and batch and each figure extrapolated
to L layers, c1 + (L - 1)(c2 - c1), labelled so (scanned layers are identical; the extra
compiles are small). Memory is always the full program's.

The train step is the trainer's (its optimizer, low-rank methods, skip_nonfinite) for the
config's `model`; a model a mid-run phase switches to (effjax/train/plugins.py) is not sized
here. The step is traced under the target's mesh, so the layers' kernels (Pallas or cuDNN
attention, the Pallas Monarch and grouped-matmul kernels) are the target's own
(pallas_kernels/tiling.py: compiling_platform), sized by its VMEM or shared memory.

A config that does not fit (batch not divisible, a mesh that is not the device count or the
torus, state or the compiled step larger than the chip's HBM) fails here in one line, in
seconds to a minute, instead of on the pod.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

from effjax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm.py:tiny", "Experiment config.",
                                          lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Simulated CPU devices in the mesh "
                                    "(without --target).")
_TARGET = flags.DEFINE_string("target", None, "Compile with this target's own compiler, e.g. "
                              "tpu:v5p:4x4x4 or gpu:h100:8 (pallas_kernels/targets.py).")
_STEP_COST = flags.DEFINE_bool("step_cost", True, "With --target and scanned layers: compile "
                               "1- and 2-layer unrolled copies too, for the step's flops, "
                               "roofline time and MFU bound (TPU; the scan's cost counts its "
                               "body once).")
_JSON = flags.DEFINE_string("json", None, "With --target: also write the figures (or the "
                            "refusal) to this JSON file.")

MIB, GIB = 2.0 ** 20, 2.0 ** 30
MEMORY_FIELDS = ("argument", "output", "alias", "temp")


class Refused(ValueError):
  """The config cannot run there; the message is one line naming the figure."""


@dataclasses.dataclass(frozen=True)
class Sizing:
  """One compile of the train step; per device unless a name says otherwise."""
  mesh: dict[str, int]
  params: int
  batch_shape: tuple[int, int]  # global batch x (length + 1)
  state_bytes: int  # exact
  memory: dict[str, int]  # the compiler's MEMORY_FIELDS that it reported, bytes
  cost: dict[str, float]  # the compiler's flops / bytes accessed / optimal_seconds, if any
  model_flops: float  # per step, all devices: flops_per_token["train"] x global tokens
  needed_bytes: int  # argument + output - alias + temp: the trainer's own guard
  scanned: bool = False  # layers in a scan: the compiled program's cost counts its body once
  # where `cost` comes from: "compiled" (the program itself), "extrapolated" (scanned layers:
  # 1- and 2-layer unrolled copies, layer_extrapolated_cost) or "" (none reported)
  cost_source: str = "compiled"
  compiled: Any = dataclasses.field(repr=False, default=None)


def _memory(compiled) -> dict[str, int]:
  analysis = compiled.memory_analysis()
  out = {}
  for field in MEMORY_FIELDS:
    value = getattr(analysis, f"{field}_size_in_bytes", None) if analysis else None
    if value is not None:
      out[field] = int(value)
  return out


def _cost(compiled) -> dict[str, float]:
  """The compiler's whole-program figures; {} where it reports none (GPU, compile-only)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if not cost:
    return {}
  return {k: float(cost[k]) for k in ("flops", "bytes accessed", "optimal_seconds")
          if k in cost}


def _with_layers(cfg, num_layers: int):
  model = dataclasses.replace(cfg.model, num_layers=num_layers, scan_layers=False)
  return dataclasses.replace(cfg, model=model)


def layer_extrapolated_cost(cfg, devices) -> dict[str, float]:
  """A scanned model's per-step cost: XLA counts a scan's body once, so the step is compiled
  again with 1 and 2 unrolled layers on the same mesh and batch, and every figure is
  c1 + (L - 1) (c2 - c1) (scanned layers are identical: config.py). Flops come out exact; the
  roofline time also extrapolates per-program fixed costs, which matter only for tiny models
  (the 8B-shaped config: within 0.2% of its unrolled compile, WORKSPACE.md). {} where the
  compiler reports no cost."""
  c1, c2 = (_cost(_compile_step(_with_layers(cfg, n), devices)[2]) for n in (1, 2))
  layers = cfg.model.num_layers
  return {k: c1[k] + (layers - 1) * (c2[k] - c1[k]) for k in c1 if k in c2}


def _compile_step(cfg, devices, hbm_bytes: int | None = None):
  """(mesh, abstract state, compiled train step) of cfg on `devices`; Refused, before
  compiling, when the state alone exceeds `hbm_bytes`."""
  # pylint: disable=g-import-not-at-top
  from effjax.data import pipeline
  from effjax.models.decoder_lm import DecoderLM
  from effjax.optim import lowrank
  from effjax.parallel import build_mesh
  from effjax.train import step as step_lib
  # pylint: enable=g-import-not-at-top
  try:
    mesh = build_mesh(cfg.mesh, devices)
  except NotImplementedError as e:  # jax.make_mesh: degrees that split a TPU torus's axes
    raise ValueError(f"mesh {dataclasses.asdict(cfg.mesh)} cannot be laid out on these "
                     f"devices' physical topology: {_first_line(e)}") from None
  pipeline.per_process_batch_size(cfg.train.global_batch_size, mesh)
  model = DecoderLM(cfg.model)
  tx, lr_fn = lowrank.optimizer_for(cfg)  # the trainer's own optimizer, low-rank methods too
  abstract, shardings = step_lib.abstract_train_state(model, tx, mesh, cfg.train.seed,
                                                      cfg.data.seq_len)
  state_bytes = step_lib.state_bytes_per_device(abstract)
  if hbm_bytes is not None and state_bytes > hbm_bytes:
    raise Refused(f"the train state alone needs {state_bytes / GIB:,.2f} GiB per device on mesh "
                  f"{dict(mesh.shape)}, more than the chip's {hbm_bytes / GIB:,.2f} GiB of HBM")
  batch_shape = (cfg.train.global_batch_size, cfg.data.seq_len + 1)
  # The trainer's step as the loop compiles it (skip_nonfinite included); no eval step.
  train, _ = step_lib.compile_steps(model, tx, lr_fn, mesh, abstract, shardings, batch_shape,
                                    skip_nonfinite=cfg.train.max_skipped_nonfinite > 0,
                                    with_eval=False,
                                    grad_accum_steps=cfg.train.grad_accum_steps)
  return mesh, abstract, train


def size_train_step(cfg, devices, *, hbm_bytes: int | None = None) -> Sizing:
  """Compiles cfg's train step on a mesh over `devices` (any devices: simulated CPU ones or a
  target's compile-only ones) with their compiler. ValueError for a config that does not fit
  the mesh; Refused, before compiling, when the state alone exceeds `hbm_bytes`."""
  # Here, not at the top: the simulated mode sets up JAX's backend before JAX is imported.
  # pylint: disable=g-import-not-at-top
  from effjax.models.decoder_lm import count_params, flops_per_token
  from effjax.train import guards, step as step_lib
  # pylint: enable=g-import-not-at-top
  mesh, abstract, train = _compile_step(cfg, devices, hbm_bytes)
  cost = _cost(train)
  tokens = cfg.train.global_batch_size * cfg.data.seq_len
  return Sizing(mesh=dict(mesh.shape), params=count_params(abstract.params),
                batch_shape=(cfg.train.global_batch_size, cfg.data.seq_len + 1),
                state_bytes=step_lib.state_bytes_per_device(abstract), memory=_memory(train),
                cost=cost,
                model_flops=flops_per_token(cfg.model, cfg.data.seq_len)["train"] * tokens,
                needed_bytes=guards.memory_needed_bytes(train.memory_analysis()),
                scanned=bool(cfg.model.scan_layers), cost_source="compiled" if cost else "",
                compiled=train)


def size_for_target(cfg, target, *, step_cost: bool = True) -> Sizing:
  """cfg's train step compiled by `target`'s compiler (a pallas_kernels.targets.Target).
  Refused, in one line naming the value or figure, when the mesh is not the target's device
  count (or torus), or the state or the compiled step does not fit the chip's HBM. With
  `step_cost`, a scanned model's cost is layer_extrapolated_cost's (where the compiler reports
  a cost: TPU)."""
  from effjax.parallel import resolve_degrees  # pylint: disable=g-import-not-at-top
  try:
    resolve_degrees(cfg.mesh, target.num_devices)  # its message names both counts
  except ValueError as e:
    raise Refused(str(e)) from None
  try:
    sizing = size_train_step(cfg, target.devices, hbm_bytes=target.hbm_bytes)
  except Refused:
    raise
  except ValueError as e:  # a batch the mesh does not divide, ...
    raise Refused(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    # XLA:TPU refuses a program larger than HBM while compiling; its first line names it.
    if "RESOURCE_EXHAUSTED" in str(e):
      raise Refused(f"the {target.platform.upper()} compiler refused the train step on "
                    f"{target.name}: {_first_line(e)}") from None
    # XLA:GPU compiling without a GPU can stop on a runtime call ("invalid device ordinal"
    # from CUB's sort before targets.py turned it off): no verdict on the config, one line.
    if target.platform == "gpu" and "INTERNAL" in str(e):
      raise Refused(f"the GPU compiler stopped compile-only on {target.name}, no verdict on "
                    f"the config: {_first_line(e)}") from None
    raise
  if sizing.needed_bytes > target.hbm_bytes:
    raise Refused(f"the compiled train step needs {sizing.needed_bytes / GIB:,.2f} GiB per "
                  f"device (argument + output - alias + temp, {_compiler(target)}'s figure), more "
                  f"than the {target.hbm_bytes / GIB:,.2f} GiB of HBM of a {target.device_kind}")
  if step_cost and sizing.scanned and sizing.cost:
    sizing = dataclasses.replace(sizing, cost=layer_extrapolated_cost(cfg, target.devices),
                                 cost_source="extrapolated")
  return sizing


def _first_line(e: Exception) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0] if lines else type(e).__name__


def _compiler(target) -> str:
  return f"{target.platform.upper()} compiler"


def _mib(n: float) -> str:
  return f"{n / MIB:,.1f} MiB ({int(n):,} B)"


def table(rows) -> str:
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def mfu_bound(sizing: Sizing, target) -> float | None:
  """Model flops per step / (the compiler's roofline step time x chips x peak); None where the
  compiler gave no step time."""
  seconds = sizing.cost.get("optimal_seconds", -1.0)
  if seconds <= 0 or (sizing.scanned and sizing.cost_source == "compiled"):
    return None
  return sizing.model_flops / (seconds * target.num_devices * target.peak_bf16_tflops * 1e12)


def target_rows(sizing: Sizing, target) -> list[tuple[str, str]]:
  who = _compiler(target)
  rows = [("target", f"{target.name}: {target.num_devices} x {target.device_kind}, compile-only"),
          ("mesh", str(sizing.mesh)),
          ("parameters", f"{sizing.params:,}"),
          ("global batch x length", f"{sizing.batch_shape[0]} x {sizing.batch_shape[1] - 1}"),
          ("state per device (exact)", _mib(sizing.state_bytes))]
  rows += [(f"{field} per device ({who})", _mib(sizing.memory[field]))
           for field in MEMORY_FIELDS if field in sizing.memory]
  needed, hbm = sizing.needed_bytes, target.hbm_bytes
  rows += [("needed per device (argument + output - alias + temp)", _mib(needed)),
           ("HBM per device", f"{hbm / GIB:,.2f} GiB"),
           ("fits", f"yes: {needed / hbm:.1%} of HBM")]  # size_for_target refuses the rest
  cost = sizing.cost
  partial = sizing.scanned and sizing.cost_source == "compiled"  # the scan's body counted once
  scanned = ("not a step's figure: the cost analysis counts the scanned layers once "
             "(--step_cost or --config.model.scan_layers=False gives it)")
  how = f"{who}, estimate" + (", layers extrapolated" if sizing.cost_source == "extrapolated"
                              else "")
  for key, label in (("flops", "flops per device per step"),
                     ("bytes accessed", "bytes accessed per device per step")):
    rows.append((f"{label} ({how})",
                 (scanned if partial else f"{cost[key]:.4g}") if key in cost else
                 f"not reported by the {who} for compile-only devices"))
  rows.append((f"model flops per step (all {target.num_devices} devices; 3 x forward matmuls)",
               f"{sizing.model_flops:.4g}"))
  if target.platform == "tpu" and partial:
    rows.append((f"optimal step time ({how})", scanned))
  elif target.platform == "tpu":
    seconds = cost.get("optimal_seconds", -1.0)
    if seconds > 0:
      rows += [(f"optimal step time ({how})", f"{seconds * 1e3:,.3f} ms"),
               (f"MFU bound: model flops / (time x {target.num_devices} x "
                f"{target.peak_bf16_tflops:g} TF/s)",
                f"{mfu_bound(sizing, target):.1%}")]
    else:  # e.g. a pallas_call without a cost estimate makes the program opaque to it
      rows.append((f"optimal step time ({how})",
                   f"not reported (optimal_seconds={seconds:g})"))
  return rows


def summary(sizing: Sizing | None, target, seconds: float, refused: str = "") -> dict[str, Any]:
  """The figures of one --target sizing as plain JSON (--json; experiments/pod_matrix.py)."""
  out = {"target": target.name, "device_kind": target.device_kind,
         "num_devices": target.num_devices, "hbm_bytes": target.hbm_bytes,
         "compile_seconds": round(seconds, 1)}
  if sizing is None:
    return {**out, "status": "refused", "refused": refused}
  return {**out, "status": "fits", "mesh": sizing.mesh, "params": sizing.params,
          "batch_shape": list(sizing.batch_shape), "state_bytes": sizing.state_bytes,
          **{f"{field}_bytes": value for field, value in sizing.memory.items()},
          "needed_bytes": sizing.needed_bytes, "hbm_fraction": sizing.needed_bytes /
          target.hbm_bytes, "cost_source": sizing.cost_source, "scanned": sizing.scanned,
          **({k.replace(" ", "_"): v for k, v in sizing.cost.items()}
             if not (sizing.scanned and sizing.cost_source == "compiled") else {}),
          "model_flops": sizing.model_flops, "mfu_bound": mfu_bound(sizing, target)}


def _main_target(cfg, name: str, json_path: str | None) -> None:
  from pallas_kernels import targets  # pylint: disable=g-import-not-at-top
  try:
    target = targets.get(name)
  except (targets.TargetError, targets.TargetUnavailable) as e:
    raise SystemExit(f"--target={name}: {e}") from None
  start = time.perf_counter()
  try:
    sizing, refused = size_for_target(cfg, target, step_cost=_STEP_COST.value), ""
  except Refused as e:
    sizing, refused = None, str(e)
  if json_path:
    with open(json_path, "w") as f:
      json.dump(summary(sizing, target, time.perf_counter() - start, refused), f, indent=1)
  if sizing is None:
    raise SystemExit(f"refused for {name}: {refused}")
  print(table(target_rows(sizing, target)))
  if sizing.cost and not (sizing.scanned and sizing.cost_source == "compiled"):
    print(f"(estimate: the {_compiler(target)}'s cost model, not a measurement" +
          ("; the scanned layers' cost is extrapolated from 1- and 2-layer compiles of the "
           "same step)" if sizing.cost_source == "extrapolated" else ")"))


def _main_simulated(cfg, num_devices: int) -> None:
  # Before the backend starts: simulated host devices, CPU only.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={num_devices}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top

  if jax.device_count() != num_devices:
    raise SystemExit(f"asked for {num_devices} simulated devices but JAX sees "
                     f"{jax.device_count()} (was the backend started before this script?)")
  try:
    sizing = size_train_step(cfg, jax.devices())
  except ValueError as e:
    raise SystemExit(f"config error: {e}") from None
  rows = [("mesh", str(sizing.mesh)),
          ("parameters", f"{sizing.params:,}"),
          ("global batch x length", f"{sizing.batch_shape[0]} x {sizing.batch_shape[1] - 1}"),
          ("state per device (exact)", f"{sizing.state_bytes / MIB:,.1f} MiB")]
  rows += [(f"{field} per device (CPU compiler)", f"{sizing.memory[field] / MIB:,.1f} MiB")
           for field in MEMORY_FIELDS if field in sizing.memory]
  print(table(rows))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _TARGET.value is not None and _NUM_DEVICES.present:
    raise SystemExit(f"--target={_TARGET.value} and --num_devices={_NUM_DEVICES.value} "
                     "together: the target fixes the devices; give one of them")
  if _TARGET.value is None and _JSON.value:
    raise SystemExit(f"--json={_JSON.value} needs --target (the simulated mode prints only)")
  if _TARGET.value is None and _NUM_DEVICES.value < 1:
    raise SystemExit(f"--num_devices must be >= 1, got {_NUM_DEVICES.value}")
  try:
    cfg = config_lib.from_config_dict(_CONFIG.value)
  except ValueError as e:
    raise SystemExit(f"config error: {e}") from None
  if _TARGET.value is not None:
    _main_target(cfg, _TARGET.value, _JSON.value)
  else:
    _main_simulated(cfg, _NUM_DEVICES.value)


if __name__ == "__main__":
  app.run(main)
