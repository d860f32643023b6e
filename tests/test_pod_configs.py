"""configs/pod.py: every variant validates, is the size its name says (jax.eval_shape of the
model's init: shapes only, nothing allocated or compiled) and has a default mesh that lays out
on the target its docstring names. Compiling them is experiments/aot_check.py's job."""
import math

import jax
import jax.numpy as jnp
import pytest

from configs import pod
from effjax import config as config_lib
from effjax.models.decoder_lm import DecoderLM, count_params
from effjax.parallel import resolve_degrees

METHODS = {"1b_sst": "1b", "llama3_8b_sst": "llama3_8b", "1b_monarch": "1b",
           "llama3_8b_monarch": "llama3_8b"}


def _cfg(variant):
  return config_lib.from_config_dict(pod.get_config(variant))


def _variables(cfg):
  return jax.eval_shape(DecoderLM(cfg.model).init, jax.random.key(0),
                        jnp.zeros((1, 8), jnp.int32))


def _shapes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@pytest.mark.parametrize("variant", pod.VARIANTS)
def test_variant_validates_with_pod_settings(variant):
  cfg = _cfg(variant)
  m = cfg.model
  assert m.dtype == "bfloat16" and m.param_dtype == "float32"
  assert m.remat != "none" and m.scan_layers
  assert cfg.mesh.data == -1  # fills whatever the fixed axes leave


def _sized(variant, target):
  """The variant with pod.sized_for's overrides for `target` (none for its default target)."""
  c = pod.get_config(variant)
  for dotted, value in pod.sized_for(variant, target).items():
    *sections, field = dotted.split(".")
    node = c
    for section in sections:
      node = node[section]
    node[field] = value
  return config_lib.from_config_dict(c)


@pytest.mark.parametrize("target", pod.SIZED_FOR_TARGETS)
@pytest.mark.parametrize("variant", pod.VARIANTS)
def test_mesh_lays_out_on_each_target_it_is_sized_for(variant, target):
  if target == pod.TARGETS[variant]:
    assert pod.sized_for(variant, target) == {}  # the defaults are that target's
  cfg = _sized(variant, target)
  platform, _, topology = target.split(":")
  dims = [int(d) for d in topology.split("x")]
  degrees = resolve_degrees(cfg.mesh, math.prod(dims))
  if platform == "tpu":  # each degree a product of whole torus axes (4x4x4: 1, 4, 16, 64)
    whole = {math.prod(dims[i] for i in range(len(dims)) if mask >> i & 1)
             for mask in range(2 ** len(dims))}
    assert set(degrees.values()) <= whole, degrees
  batch_ways = degrees["data"] * degrees["fsdp"] * degrees["expert"]
  assert cfg.train.global_batch_size % batch_ways == 0
  if cfg.model.ffn == "moe":
    assert cfg.model.moe.num_experts % degrees["expert"] == 0


def test_sized_for_names_what_it_does_not_know():
  with pytest.raises(ValueError, match=r"no sizing of 'llama3_8b' for 'tpu:v5e:2x2'"):
    pod.sized_for("llama3_8b", "tpu:v5e:2x2")


@pytest.mark.parametrize("variant,low,high", [
    ("1b", 0.9e9, 1.3e9),
    ("llama3_8b", 8.03e9 * 0.98, 8.03e9 * 1.02),
    ("mixtral_8x7b", 46.7e9 * 0.98, 46.7e9 * 1.02),
])
def test_parameter_count_is_what_the_name_says(variant, low, high):
  assert low < count_params(_variables(_cfg(variant))["params"]) < high


def test_llama3_8b_and_mixtral_shapes():
  llama, mixtral = _cfg("llama3_8b").model, _cfg("mixtral_8x7b").model
  for m in (llama, mixtral):
    assert (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads) == (4096, 32, 32, 8)
    assert not m.tie_embeddings
  assert (llama.d_ff, llama.vocab_size, llama.ffn) == (14336, 128256, "dense")
  assert (mixtral.vocab_size, mixtral.ffn, mixtral.moe_d_ff) == (32000, "moe", 14336)
  assert (mixtral.moe.num_experts, mixtral.moe.top_k, mixtral.moe.router) == (
      8, 2, "topk_softmax")


def test_mixtral_pallas_gmm_runs_expert_parallel():
  # the Pallas grouped matmul compiles for TPU only inside expert parallelism (shard_map)
  cfg = _cfg("mixtral_8x7b")
  assert cfg.model.moe.gmm_impl == "pallas" and cfg.mesh.expert > 1


@pytest.mark.parametrize("variant,base", sorted(METHODS.items()))
def test_method_variant_is_its_base_but_the_method(variant, base):
  method, plain = pod.get_config(variant).to_dict(), pod.get_config(base).to_dict()
  linear = method["model"].pop("linear")
  plain["model"].pop("linear")
  if variant.endswith("_sst"):
    assert linear["kind"] == "sst" and linear["rank"] == plain["model"]["d_model"] // 8
    assert method["optim"].pop("rewarm_steps") > 0
    plain["optim"].pop("rewarm_steps")
  else:
    assert linear["mlp"] == "monarch" and linear["kind"] == "dense"
  assert method == plain
  # embeddings, head and norms keep the base's shapes; the projections change
  ours, theirs = _variables(_cfg(variant))["params"], _variables(_cfg(base))["params"]
  for name in ("embed", "head", "final_norm"):
    assert _shapes(ours[name]) == _shapes(theirs[name])
  assert _shapes(ours["layers"]) != _shapes(theirs["layers"])
  assert count_params(ours) < count_params(theirs)  # SST: the frozen bases are model state


def test_unknown_variant_names_the_known_ones():
  with pytest.raises(ValueError, match="unknown variant '70b'") as e:
    pod.get_config("70b")
  for variant in pod.VARIANTS:
    assert variant in str(e.value)


def test_the_pod_matrix_sizes_every_variant_on_every_target_with_its_overrides():
  from experiments import pod_matrix  # pylint: disable=g-import-not-at-top
  rows = pod_matrix.rows()
  names = [r["name"] for r in rows]
  assert len(names) == len(set(names))
  assert rows == pod_matrix.rows("main") + pod_matrix.rows("changes")
  assert len(pod_matrix.rows("changes")) == len(pod_matrix.CHANGES)
  main = {(r["variant"], r["target"]): r for r in rows[:len(pod.VARIANTS) *
                                                       len(pod.SIZED_FOR_TARGETS)]}
  assert set(main) == {(v, t) for v in pod.VARIANTS for t in pod.SIZED_FOR_TARGETS}
  row = main[("llama3_8b", "gpu:h100:8")]
  cmd = pod_matrix.command(row, "out.json")
  assert cmd[1:3] == ["-m", "experiments.aot_check"]
  assert "--config=configs/pod.py:llama3_8b" in cmd and "--target=gpu:h100:8" in cmd
  assert "--config.mesh.fsdp=8" in cmd and "--json=out.json" in cmd
  # each change row differs from its main row by exactly what its name says
  assert set(pod_matrix.MEMORY_ONLY) <= set(names)
  for name, variant, target, extra in pod_matrix.CHANGES:
    changed = next(r for r in rows if r["name"] == name)
    assert ("--step_cost=false" in pod_matrix.command(changed, "o.json")) == (
        name in pod_matrix.MEMORY_ONLY)
    if target in pod.SIZED_FOR_TARGETS:
      assert changed["overrides"] == {**main[(variant, target)]["overrides"], **extra}
