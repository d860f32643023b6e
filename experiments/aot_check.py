"""Size a pod job on one machine: compile the train step for a bigger mesh, print its memory.

    python -m experiments.aot_check --config=configs/lm.py:small --num_devices=64 \\
        --config.mesh.data=8 --config.mesh.fsdp=8

The mesh is made of `--num_devices` simulated CPU devices, so nothing runs and no accelerator
is needed. The state column is exact for any backend (it is the per-device shard of every
array); the compiler's temporaries are the CPU compiler's estimate, a guide to the
accelerator's, not its figure. A config that does not fit the mesh (batch not divisible, an
axis that does not divide) fails here, in seconds, instead of on the pod.
"""
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from effjax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm.py:tiny", "Experiment config.",
                                          lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Simulated devices in the mesh.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _NUM_DEVICES.value < 1:
    raise SystemExit(f"--num_devices must be >= 1, got {_NUM_DEVICES.value}")
  try:
    cfg = config_lib.from_config_dict(_CONFIG.value)
  except ValueError as e:
    raise SystemExit(f"config error: {e}") from None
  # Before the backend starts: simulated host devices, CPU only.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_NUM_DEVICES.value}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  from effjax.models.decoder_lm import DecoderLM, count_params  # pylint: disable=g-import-not-at-top
  from effjax.parallel import build_mesh  # pylint: disable=g-import-not-at-top
  from effjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from effjax.optim import lowrank  # pylint: disable=g-import-not-at-top
  from effjax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  if jax.device_count() != _NUM_DEVICES.value:
    raise SystemExit(f"asked for {_NUM_DEVICES.value} simulated devices but JAX sees "
                     f"{jax.device_count()} (was the backend started before this script?)")
  try:
    mesh = build_mesh(cfg.mesh)
    pipeline.per_process_batch_size(cfg.train.global_batch_size, mesh)
  except ValueError as e:
    raise SystemExit(f"config error: {e}") from None
  model = DecoderLM(cfg.model)
  tx, lr_fn = lowrank.optimizer_for(cfg)  # the trainer's own optimizer, low-rank methods too
  abstract, shardings = step_lib.abstract_train_state(model, tx, mesh, cfg.train.seed,
                                                      cfg.data.seq_len)
  batch_shape = (cfg.train.global_batch_size, cfg.data.seq_len + 1)
  train, _ = step_lib.compile_steps(model, tx, lr_fn, mesh, abstract, shardings, batch_shape)
  analysis = train.memory_analysis()
  mib = 2.0 ** 20
  state_mib = step_lib.state_bytes_per_device(abstract) / mib
  rows = [("mesh", str(dict(mesh.shape))),
          ("parameters", f"{count_params(abstract.params):,}"),
          ("global batch x length", f"{batch_shape[0]} x {cfg.data.seq_len}"),
          ("state per device (exact)", f"{state_mib:,.1f} MiB")]
  for field in ("argument", "output", "alias", "temp"):
    value = getattr(analysis, f"{field}_size_in_bytes", None) if analysis else None
    if value is not None:
      rows.append((f"{field} per device (CPU compiler)", f"{value / mib:,.1f} MiB"))
  width = max(len(k) for k, _ in rows)
  print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
  app.run(main)
