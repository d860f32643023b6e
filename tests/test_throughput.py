"""Live MFU: the peak table (effjax/train/throughput.py), StepLog's throughput fields, and what
a CPU run logs."""
import dataclasses
import logging
import os
import types

import jax
import jax.numpy as jnp
import pytest

from configs import lm
from effjax import config as config_lib
from effjax.models.decoder_lm import flops_per_token
from effjax.train import metrics as metrics_lib
from effjax.train import throughput
from effjax.train.loop import train_and_evaluate

# The vendors' dense figures in TFLOP/s, (bfloat16, float32 matmuls): NVIDIA runs float32 at
# its TF32 rate, a TPU at its bf16 rate (default precision).
DATASHEETS = {
    "NVIDIA H100 80GB HBM3": (989.4, 494.7),
    "NVIDIA H100 PCIe": (756.0, 378.0),
    "NVIDIA H200": (989.4, 494.7),
    "NVIDIA A100-SXM4-80GB": (312.0, 156.0),
    "NVIDIA A100-SXM4-40GB": (312.0, 156.0),
    "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0),
    "TPU v5": (459.0, 459.0),
    "TPU v5p": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0),
}


@pytest.mark.parametrize("kind", sorted(DATASHEETS))
def test_peak_of_each_listed_kind_and_dtype(kind):
  for dtype, expected in zip(("bfloat16", "float32"), DATASHEETS[kind]):
    peak, about = throughput.peak_flops(kind, dtype)
    assert peak == pytest.approx(expected * 1e12)
    assert kind in about and dtype in about
  rate = "TF32" if kind.startswith("NVIDIA") else "bf16"
  assert rate in throughput.peak_flops(kind, "float32")[1]


def test_float32_rule_tf32_on_nvidia_bf16_on_tpu():
  for kind in throughput.PEAK_TFLOPS:
    bf16, _ = throughput.peak_flops(kind, "bfloat16")
    f32, _ = throughput.peak_flops(kind, "float32")
    assert f32 == pytest.approx(bf16 / 2 if kind.startswith("NVIDIA") else bf16), kind


def test_tpu_v5_is_not_read_as_a_prefix_of_v5_lite():
  v5p, _ = throughput.peak_flops("TPU v5", "bfloat16")
  v5e, _ = throughput.peak_flops("TPU v5 lite", "bfloat16")
  assert v5p == throughput.peak_flops("TPU v5p", "bfloat16")[0]
  assert v5e < v5p


@pytest.mark.parametrize("kind", ["NVIDIA H100 NVL", "NVIDIA H200 NVL", "TPU v5e", "Tesla V100",
                                  "TPU v4 lite", ""])
def test_unknown_kind_has_no_peak_and_says_why(kind):
  peak, why = throughput.peak_flops(kind, "bfloat16")
  assert peak is None
  assert repr(kind) in why and "TPU v6 lite" in why  # names it, lists the known ones


def test_unknown_dtype_and_cpu_have_no_peak():
  peak, why = throughput.peak_flops("TPU v4", "float8_e4m3fn")
  assert peak is None and "float8_e4m3fn" in why
  cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
  peak, why = throughput.device_peak_flops(cpu, "float32")
  assert peak is None and "CPU" in why
  tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v6 lite")
  assert throughput.device_peak_flops(tpu, "bfloat16")[0] == pytest.approx(918e12)


class _Writer:
  def __init__(self):
    self.records = []

  def write(self, step, metrics):
    self.records.append((step, dict(metrics)))


class _NoGuard:
  def check(self, step, metrics):
    del step, metrics


def _step_metrics(loss):
  return {"train_loss": jnp.float32(loss), "nonfinite": jnp.int32(0)}


def test_step_log_fields_are_consistent_and_follow_the_model(caplog):
  seq_len, devices, fake_peak = 32, 4, 3e9
  tcfg = config_lib.TrainConfig(global_batch_size=8, num_steps=10, log_every=2)
  dense = config_lib.ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)
  monarch = dataclasses.replace(dense, linear=config_lib.LinearConfig(kind="monarch"))
  f_dense, f_monarch = (flops_per_token(m, seq_len)["train"] for m in (dense, monarch))
  assert f_dense != f_monarch
  writer = _Writer()
  log = metrics_lib.StepLog(tcfg, writer, seq_len, _NoGuard(), num_devices=devices,
                            peak_flops=fake_peak)
  log.set_model(monarch)
  log.append(1, _step_metrics(3.0))
  log.append(2, _step_metrics(2.5))
  with caplog.at_level(logging.INFO):
    first = log.flush(2)
  assert first["tokens_per_sec_per_device"] == pytest.approx(first["tokens_per_sec"] / devices)
  assert first["model_tflops_per_device"] == pytest.approx(
      first["tokens_per_sec_per_device"] * f_monarch / 1e12)
  assert first["mfu"] == pytest.approx(first["model_tflops_per_device"] * 1e12 / fake_peak)
  assert f"MFU {first['mfu']:.1%}" in caplog.text
  assert writer.records[-1] == (2, first)
  # an interval across a phase change: one step of each model, so their mean FLOPs per token
  log.restart_clock()
  log.append(3, _step_metrics(2.4))
  log.set_model(dense)
  log.append(4, _step_metrics(2.3))
  second = log.flush(4)
  assert second["model_tflops_per_device"] == pytest.approx(
      second["tokens_per_sec_per_device"] * (f_monarch + f_dense) / 2 / 1e12)
  without_peak = metrics_lib.StepLog(tcfg, _Writer(), seq_len, _NoGuard(), num_devices=devices)
  without_peak.set_model(dense)
  without_peak.append(1, _step_metrics(3.0))
  assert "mfu" not in without_peak.flush(1)


def test_cpu_run_logs_throughput_without_mfu_and_counts_the_phase_model(tfds_dir, tmp_path,
                                                                        caplog):
  """Monarch until step 2, dense after (train.dense_from_step): each step's model FLOPs are
  the model that made it; on CPUs no MFU, and the run says why once."""
  c = lm.get_config("test")
  c.data.data_dir = tfds_dir
  c.model.linear.kind = "monarch"
  c.train.update(num_steps=4, dense_from_step=2, log_every=1, eval_every=0, checkpoint_every=0)
  cfg = config_lib.from_config_dict(c)
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.INFO):
    train_and_evaluate(cfg, workdir)
  assert caplog.text.count("MFU is left out") == 1
  assert "CPU" in caplog.text.split("MFU is left out")[1].splitlines()[0]
  m = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  # the start-of-run and after-the-switch counts log_model wrote, which the MFU uses
  monarch, dense = m[0]["flops_per_token"], m[2]["flops_per_token"]
  assert monarch == flops_per_token(cfg.model, cfg.data.seq_len)["train"] and monarch < dense
  for step in range(1, 5):
    record = m[step]
    assert "mfu" not in record
    assert record["tokens_per_sec_per_device"] == pytest.approx(
        record["tokens_per_sec"] / jax.device_count())
    expected = monarch if step <= 2 else dense
    assert record["model_tflops_per_device"] == pytest.approx(
        record["tokens_per_sec_per_device"] * expected / 1e12)
