"""`experiments/aot_check.py --target=NAME`: effjax's train step compiled by a TPU slice's and an
H100's own compilers, compile-only (pallas_kernels/targets.py), its memory checked against the
chip's HBM.

Marked `compile`: `make test-compile` runs them (Python 3.12, jax[tpu,cuda12] pinned); elsewhere
they skip, saying which package is missing.
"""
from pallas_kernels import targets  # first: sets libtpu's and the CUDA plugin's variables

import importlib.util  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from effjax import config as config_lib  # noqa: E402
from experiments import aot_check  # noqa: E402

pytestmark = pytest.mark.compile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU, GPU = "tpu:v5p:2x2x1", "gpu:h100:4"  # 4 devices each: a data x fsdp mesh of 2 x 2


def _target(name: str):
  package = "libtpu" if name.startswith("tpu") else "jax_plugins.xla_cuda12"
  try:
    found = importlib.util.find_spec(package) is not None
  except ModuleNotFoundError:
    found = False
  if not found:
    pytest.skip(f"{package} is not installed (make test-compile installs it)")
  return targets.get(name)


def _config(**overrides):
  """configs/lm.py:test with dotted overrides ("mesh.fsdp": 2), as the trainer's dataclass."""
  sys.path.insert(0, REPO)
  from configs import lm  # pylint: disable=g-import-not-at-top
  c = lm.get_config("test")
  for dotted, value in overrides.items():
    *sections, field = dotted.split(".")
    node = c
    for section in sections:
      node = node[section]
    node[field] = value
  return config_lib.from_config_dict(c)


def _pod_1b(num_devices: int):
  """configs/pod.py:1b (the ~1.1B dense config) sharded fsdp over a small target, a 2048-token
  row per device."""
  sys.path.insert(0, REPO)
  from configs import pod  # pylint: disable=g-import-not-at-top
  c = pod.get_config("1b")
  c.mesh.update(data=1, fsdp=num_devices)
  c.train.global_batch_size = num_devices
  return config_lib.from_config_dict(c)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.aot_check",
                         "--config=configs/lm.py:test", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600)


def _independent_compile(cfg, target):
  """The trainer's train step on the target's devices, built here with the library alone."""
  from effjax.models.decoder_lm import DecoderLM  # pylint: disable=g-import-not-at-top
  from effjax.optim import lowrank  # pylint: disable=g-import-not-at-top
  from effjax.parallel import build_mesh  # pylint: disable=g-import-not-at-top
  from effjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  mesh = build_mesh(cfg.mesh, target.devices)
  model = DecoderLM(cfg.model)
  tx, lr_fn = lowrank.optimizer_for(cfg)
  abstract, shardings = step_lib.abstract_train_state(model, tx, mesh, cfg.train.seed,
                                                      cfg.data.seq_len)
  train, _ = step_lib.compile_steps(model, tx, lr_fn, mesh, abstract, shardings,
                                    (cfg.train.global_batch_size, cfg.data.seq_len + 1),
                                    with_eval=False)
  return abstract, train


# --- the step compiles, and what is reported is the compiled program's -----------------------


@pytest.mark.parametrize("name", [TPU, GPU])
def test_the_1b_configs_train_step_compiles_for_the_target_and_reports_its_compilers_memory(
    name):
  from effjax.train import guards, step as step_lib  # pylint: disable=g-import-not-at-top
  target = _target(name)
  cfg = _pod_1b(target.num_devices)
  sizing = aot_check.size_for_target(cfg, target, step_cost=False)
  assert sizing.mesh == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
  assert 1.0e9 < sizing.params < 1.2e9
  # compiled for the target's chips, not for this host's CPU
  shardings = jax.tree.leaves(sizing.compiled.input_shardings)
  assert shardings and all(s.device_set == set(target.devices) for s in shardings)
  analysis = sizing.compiled.memory_analysis()
  for field in aot_check.MEMORY_FIELDS:
    assert sizing.memory[field] == getattr(analysis, f"{field}_size_in_bytes"), field
  assert sizing.memory["argument"] > 0 and sizing.memory["temp"] > 0
  assert sizing.needed_bytes == guards.memory_needed_bytes(analysis) < target.hbm_bytes
  # the same figures as the trainer's own step compiled here independently
  abstract, train = _independent_compile(cfg, target)
  again = train.memory_analysis()
  assert sizing.memory == {f: getattr(again, f"{f}_size_in_bytes")
                           for f in aot_check.MEMORY_FIELDS}
  # state per device is exact and sharded: fsdp 4 quarters the weights and Adam moments (the
  # norm scales, replicated, are a few hundred KiB)
  whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  assert sizing.state_bytes == step_lib.state_bytes_per_device(abstract)
  assert whole / 4 <= sizing.state_bytes < whole / 4 + (1 << 20)


def test_an_moe_step_with_a_large_routing_sort_compiles_for_an_h100():
  """XLA:GPU hands a large sort to CUB, whose scratch size it asks the CUDA runtime for while
  compiling; compile-only that stopped every pod-sized MoE step ("cudaErrorInvalidDevice").
  targets.py keeps XLA's own sort there, so 32k routed tokens compile."""
  target = _target("gpu:h100:1")
  cfg = _config(**{"model.ffn": "moe", "model.moe.dispatch": "dropless",
                   "train.global_batch_size": 1024, "mesh.data": 1})
  assert "--xla_gpu_enable_cub_radix_sort=false" in os.environ["XLA_FLAGS"]
  sizing = aot_check.size_for_target(cfg, target)
  assert " sort(" in sizing.compiled.as_text() and sizing.needed_bytes < target.hbm_bytes


def test_the_command_prints_the_tpu_compilers_figures_and_the_mfu_bound_they_imply():
  target = _target(TPU)
  cfg = _config(**{"mesh.data": 2, "mesh.fsdp": 2})
  sizing = aot_check.size_for_target(cfg, target)
  ran = _cli(f"--target={TPU}", "--config.mesh.data=2", "--config.mesh.fsdp=2")
  assert ran.returncode == 0, ran.stderr[-3000:]
  out = ran.stdout
  assert "{'data': 2, 'fsdp': 2, 'tensor': 1, 'expert': 1}" in out
  for field in aot_check.MEMORY_FIELDS:  # exact bytes, as the in-process compile has them
    printed = re.search(rf"{field} per device \(TPU compiler\)\s+[\d.,]+ MiB \(([\d,]+) B\)", out)
    assert printed and int(printed.group(1).replace(",", "")) == sizing.memory[field], field
  hbm = re.search(r"HBM per device\s+([\d.,]+) GiB", out)
  assert hbm and float(hbm.group(1)) == pytest.approx(target.hbm_bytes / 2**30, abs=0.01)
  assert re.search(r"^fits\s+yes", out, re.MULTILINE)
  # cost analysis: the compiler's per-device program (about a quarter of the model's flops on
  # four devices, plus what the model formula leaves out) and its roofline time
  flops = float(re.search(r"flops per device per step \(TPU compiler, estimate\)\s+(\S+)",
                          out).group(1))
  assert flops == pytest.approx(sizing.cost["flops"], rel=1e-3)
  assert sizing.model_flops / 4 < flops < sizing.model_flops
  seconds = sizing.cost["optimal_seconds"]
  assert seconds > 0 and "not a measurement" in out
  mfu = float(re.search(r"MFU bound: .*\s([\d.]+)%$", out, re.MULTILINE).group(1)) / 100
  peak = target.peak_bf16_tflops * 1e12
  assert mfu == pytest.approx(sizing.model_flops / (seconds * 4 * peak), abs=1e-3)
  assert 0 < mfu <= 1


# --- what is refused, in one line ------------------------------------------------------------


def _one_line_refusal(ran) -> str:
  assert ran.returncode != 0, ran.stdout[-2000:]
  last = ran.stderr.strip().splitlines()[-1]
  assert "Traceback" not in ran.stderr, ran.stderr[-3000:]
  return last


def test_target_and_num_devices_together_are_refused():
  last = _one_line_refusal(_cli("--target=tpu:v5e:2x2", "--num_devices=4"))
  assert "--target=tpu:v5e:2x2" in last and "--num_devices=4" in last


@pytest.mark.parametrize("mesh, named", [({"mesh.data": 3}, "multiply to 3"),
                                         ({"mesh.fsdp": 3}, "use 3 devices")])
def test_a_mesh_that_is_not_the_targets_device_count_is_refused(mesh, named):
  target = _target(TPU)
  with pytest.raises(aot_check.Refused) as raised:
    aot_check.size_for_target(_config(**mesh), target)
  message = str(raised.value)
  assert "\n" not in message and named in message
  assert re.search(r"\b4 (available )?devices", message), message
  last = _one_line_refusal(_cli(f"--target={TPU}", *(f"--config.{k}={v}" for k, v in
                                                     mesh.items())))
  assert named in last and TPU in last


def test_a_state_larger_than_hbm_is_refused_before_compiling_naming_both_figures():
  """About 2.1e9 parameters in float32 with two Adam moments, replicated on 4 v5e chips."""
  target = _target("tpu:v5e:2x2")
  cfg = _config(**{"model.d_model": 8192, "model.d_ff": 32768, "model.num_heads": 64,
                   "model.num_kv_heads": 8, "train.global_batch_size": 4})
  with pytest.raises(aot_check.Refused) as raised:
    aot_check.size_for_target(cfg, target)
  message = str(raised.value)
  state = float(re.search(r"needs ([\d.,]+) GiB", message).group(1))
  hbm = target.hbm_bytes / 2**30
  assert "\n" not in message and "train state" in message and f"{hbm:,.2f} GiB of HBM" in message
  assert state > hbm


@pytest.mark.parametrize("name", ["tpu:v5e:2x2", "gpu:h100:2"])
def test_a_step_whose_activations_do_not_fit_is_refused_naming_the_figure(name):
  """The state fits; a 2048-token batch of 4096 rows does not. XLA:TPU refuses it while
  compiling (its message names the bytes); the GPU compiler compiles it and the check against
  the H100's HBM refuses it."""
  target = _target(name)
  cfg = _config(**{"train.global_batch_size": 4096, "data.seq_len": 2048})
  with pytest.raises(aot_check.Refused) as raised:
    aot_check.size_for_target(cfg, target)
  message = str(raised.value)
  assert "\n" not in message
  if target.platform == "tpu":
    assert "HBM" in message and re.search(r"\d+(\.\d+)?[GT]\b", message), message
  else:
    needed = float(re.search(r"needs ([\d.,]+) GiB", message).group(1).replace(",", ""))
    assert needed > target.hbm_bytes / 2**30 and f"{target.hbm_bytes / 2**30:,.2f} GiB" in message


@pytest.mark.parametrize("name, overrides, kernel, call", [
    ("tpu:v5e:2x2", {"model.attention_impl": "pallas"}, "effjax_flash", "tpu_custom_call"),
    ("gpu:h100:4", {"model.attention_impl": "pallas", "model.dtype": "bfloat16"},
     None, "mosaic_gpu"),  # the kernel's name is inside Mosaic GPU's serialized module
    # expert parallelism: the dropless experts run inside shard_map (Mosaic kernels are not
    # partitioned by XLA; data-parallel alone they are not compiled for a TPU: WORKSPACE)
    ("tpu:v5e:2x2", {"mesh.data": 1, "mesh.expert": 4, "model.ffn": "moe",
                     "model.moe.dispatch": "dropless", "model.moe.gmm_impl": "pallas"},
     "effjax_gmm", "tpu_custom_call")])
def test_the_layers_kernels_are_the_targets_not_this_hosts(name, overrides, kernel, call):
  """The step is traced under the target's mesh, so a layer's Pallas kernel is the one its
  platform runs (Mosaic TPU; Mosaic GPU for bf16 on an H100), not this CPU host's
  interpreter: the compiled program calls it."""
  target = _target(name)
  cfg = _config(**{"mesh.data": target.num_devices, **overrides})
  text = aot_check.size_for_target(cfg, target).compiled.as_text()
  # (Pallas's interpreters lower to plain XLA ops: the custom call is the compiled kernel)
  assert call in text and (kernel is None or kernel in text), (name, overrides)


def test_a_scanned_models_step_cost_is_extrapolated_from_one_and_two_layer_compiles():
  """XLA:TPU's cost analysis counts a scanned layer loop once, so the step's figures come from
  1- and 2-layer unrolled compiles extrapolated to L layers: for a 4-layer model the flops are
  the unrolled 4-layer program's own, and without the extrapolation no figure or MFU bound is
  printed as a step's."""
  target = _target("tpu:v5e:2x2")
  base = {"mesh.data": 4, "model.num_layers": 4}
  unrolled = aot_check.size_for_target(_config(**base, **{"model.scan_layers": False}), target)
  scanned = aot_check.size_for_target(_config(**base, **{"model.scan_layers": True}), target)
  assert (unrolled.cost_source, scanned.cost_source) == ("compiled", "extrapolated")
  # flops are exact; the roofline time carries per-program fixed costs that a tiny model's
  # 1- and 2-layer compiles do not share with the whole (the 8B-shaped config: WORKSPACE)
  assert scanned.cost["flops"] == pytest.approx(unrolled.cost["flops"], rel=1e-4)
  assert scanned.cost["optimal_seconds"] > 0
  # the program's own figure counts the loop body once: a quarter of the layers' work missing
  partial = aot_check.size_for_target(_config(**base, **{"model.scan_layers": True}), target,
                                      step_cost=False)
  assert partial.cost_source == "compiled" and partial.cost["flops"] < 0.8 * scanned.cost["flops"]
  assert partial.memory == scanned.memory  # memory is the full scanned program's either way
  rows = dict(aot_check.target_rows(partial, target))
  assert not [k for k in rows if k.startswith("MFU bound")] and "not a step's figure" in str(rows)
  rows = dict(aot_check.target_rows(scanned, target))
  mfu = [v for k, v in rows.items() if k.startswith("MFU bound")]
  assert mfu == [f"{aot_check.mfu_bound(scanned, target):.1%}"]


def test_gradient_accumulation_lowers_the_tpu_compilers_temporaries():
  """train.grad_accum_steps=k keeps one microbatch's activations live (a scan): XLA:TPU's
  temporaries fall with k while the state (arguments) stays the same. (A model wide enough
  that activations, not the gradients, fill the temporaries: 67 MB at k=1, 13 MB at k=4.)"""
  target = _target("tpu:v5e:2x2")
  temp, argument = {}, {}
  for k in (1, 4):
    sizing = aot_check.size_for_target(
        _config(**{"mesh.data": 4, "train.global_batch_size": 64, "data.seq_len": 256,
                   "model.d_model": 256, "model.d_ff": 1024, "train.grad_accum_steps": k}),
        target, step_cost=False)
    temp[k], argument[k] = sizing.memory["temp"], sizing.memory["argument"]
  assert argument[4] == argument[1]
  assert temp[4] < 0.5 * temp[1], temp
