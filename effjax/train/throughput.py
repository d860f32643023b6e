"""Peak matmul FLOP/s per device, by device kind and matmul dtype: the denominator of MFU.

MFU (model FLOPs utilisation) = the model's training FLOPs per second per device (effjax's
structure-aware count, `flops_per_token(model_cfg, seq_len)["train"]`) / the device's dense
peak for the dtype its matmuls run in (`model.dtype`). The training loop logs it with every
step line (effjax/train/metrics.py, StepLog); experiments/bench_train.py uses the same table.

Kinds are matched exactly (`jax.Device.device_kind`), never by substring: "TPU v5" (v5p) is a
prefix of "TPU v5 lite" (v5e), and an H100 NVL or H200 NVL (lower clocks) must not pass for
the SXM part.
"""
from __future__ import annotations

# Dense (not 2:4-sparse) peak TFLOP/s per device: {matmul dtype: TFLOP/s}.
# float32 matmuls: on NVIDIA GPUs XLA's default precision runs them on the tensor cores as
# TF32, so the TF32 figure is their peak (with --jax_default_matmul_precision=highest they run
# as true FP32, and MFU against the TF32 peak reads low). On TPUs the default precision runs a
# float32 matmul as one bfloat16 pass on the MXU, so the bf16 peak applies.
_H100_SXM = {"bfloat16": 989.4, "float32": 494.7}  # NVIDIA H100 datasheet, SXM5 column
_H100_PCIE = {"bfloat16": 756.0, "float32": 378.0}  # NVIDIA H100 datasheet, PCIe column
_H200_SXM = _H100_SXM  # NVIDIA H200 datasheet, SXM column: the same tensor cores and clocks
_A100 = {"bfloat16": 312.0, "float32": 156.0}  # NVIDIA A100 datasheet (SXM and PCIe alike)


def _tpu(bf16: float) -> dict[str, float]:
  return {"bfloat16": bf16, "float32": bf16}  # default precision: float32 runs as bf16


PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": _H100_PCIE,
    "NVIDIA H200": _H200_SXM,  # the CUDA device name of an H200 SXM
    "NVIDIA H200 141GB HBM3e": _H200_SXM,  # XLA's target-config description of the same part
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    # Google Cloud TPU docs (system architecture pages), bf16 per chip; JAX's device kinds
    # (as in pallas_kernels/tiling.py): v5e is "TPU v5 lite", v5p is "TPU v5p" or "TPU v5",
    # v6e is "TPU v6 lite".
    "TPU v4": _tpu(275.0),
    "TPU v5 lite": _tpu(197.0),
    "TPU v5": _tpu(459.0),
    "TPU v5p": _tpu(459.0),
    "TPU v6 lite": _tpu(918.0),
}


def peak_flops(device_kind: str, dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s per device or None, a phrase saying which peak it is or why there is none)."""
  peaks = PEAK_TFLOPS.get(device_kind)
  if peaks is None:
    return None, (f"no peak FLOP/s is known for device kind {device_kind!r} (known: "
                  f"{', '.join(sorted(PEAK_TFLOPS))}; effjax/train/throughput.py)")
  if dtype not in peaks:
    return None, (f"no peak FLOP/s is known for {dtype} matmuls on {device_kind} (known: "
                  f"{', '.join(peaks)})")
  rate = "TF32" if device_kind.startswith("NVIDIA") and dtype == "float32" else "bf16"
  return peaks[dtype] * 1e12, (f"{device_kind}'s dense {rate} peak, {peaks[dtype]:g} TFLOP/s "
                               f"per device, for {dtype} matmuls")


def device_peak_flops(device, dtype: str) -> tuple[float | None, str]:
  """peak_flops of a jax Device; None on a CPU, whose peak depends on the host."""
  if device.platform == "cpu":
    return None, (f"the devices are CPUs ({device.device_kind}), whose peak FLOP/s effjax "
                  "does not know")
  return peak_flops(device.device_kind, dtype)

