"""KV-cache decoding (effjax/models/decode.py): cached logits equal the full forward for every
linear kind and MoE router that decodes, greedy equals argmax, sampling is reproducible, and
bad inputs are refused with messages that name them."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import LinearConfig, MeshConfig, MoEConfig, ModelConfig
from effjax.data import tokenizer
from effjax.layers.attention import Attention
from effjax.models import decode
from effjax.models.decoder_lm import DecoderLM
from effjax.parallel import build_mesh
from effjax.train import step as step_lib

BASE = ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)
MOE = dict(ffn="moe", moe=MoEConfig(num_experts=4, top_k=2))
CASES = {
    "dense": BASE,
    "monarch_one_kv_head": dataclasses.replace(
        BASE, num_kv_heads=1, linear=LinearConfig(kind="monarch", nblocks=2)),
    "dense_sliding_window": dataclasses.replace(BASE, sliding_window=4),
    "sst": dataclasses.replace(BASE, linear=LinearConfig(kind="sst", rank=4)),
    "lora": dataclasses.replace(BASE, linear=LinearConfig(kind="lora", rank=4)),
    "moe_top2": dataclasses.replace(BASE, **MOE),
    "moepp": dataclasses.replace(BASE, ffn="moe", moe=MoEConfig(
        num_experts=4, top_k=2, num_zero_experts=1, num_copy_experts=1, num_constant_experts=1,
        gating_residual=True)),
    "moe_scanned_sigmoid_bias_shared": dataclasses.replace(
        BASE, scan_layers=True, ffn="moe",
        moe=MoEConfig(num_experts=4, top_k=2, router="sigmoid_bias", num_shared_experts=1)),
    "moe_dense_to_sparse": dataclasses.replace(BASE, ffn="moe", moe=MoEConfig(
        num_experts=4, router="dense_to_sparse", anneal_steps=10)),
}


def _perturb(tree, seed):
  """Non-zero LoRA B, selection biases etc.: fresh LoRA would equal its dense base."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x
                            for x, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def _init(cfg, seed=0):
  """(params, model state), perturbed; one compiled program (eager dispatch is slow)."""
  def init(key):
    variables = nn.meta.unbox(DecoderLM(cfg).init(key, jnp.zeros((1, 16), jnp.int32)))
    params, state = step_lib.split_variables(variables)
    return _perturb(params, seed + 5), _perturb(state, seed + 6)
  return jax.jit(init)(jax.random.key(seed))


def _full_forward(cfg, params, state, tokens, *rest):
  return np.asarray(jax.jit(DecoderLM(cfg).apply)({"params": params, **state},
                                                  jnp.asarray(tokens), *rest))


def _tokens(shape, seed=1):
  return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, 256), np.int32)


def _teacher_forced(cfg, params, state, tokens_BL, lengths_B, max_length=24):
  """Logits [B, L - 1, V]: row b's positions >= lengths[b] - 1 from the cache path (prefill
  of its first lengths[b] tokens, then one decode step per true token), earlier ones NaN.
  One compiled program: prefill and a scan of steps."""
  model = DecoderLM(decode.decode_config(cfg))
  b, l = tokens_BL.shape
  p = int(lengths_B.max())
  prompt = np.where(np.arange(p)[None] < lengths_B[:, None], tokens_BL[:, :p], tokenizer.PAD)
  steps = l - 1 - int(lengths_B.min())
  shapes, _ = decode.cache_shardings(model, b, max_length, None)
  rows = np.arange(b)

  def run(params, state, prompt, lengths, tokens):
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    first, cache = decode.prefill(model, params, state, cache, prompt, lengths)

    def step(cache, offset):
      pos = lengths + offset
      token = tokens[rows, jnp.minimum(pos, l - 1)]
      logits, cache = decode.decode_step(model, params, state, cache, token, pos)
      return cache, logits
    _, later = jax.lax.scan(step, cache, jnp.arange(steps))
    return first, later

  first, later = jax.jit(run)(params, state, prompt, lengths_B, tokens_BL)
  out = np.full((b, l - 1, cfg.vocab_size), np.nan, np.float32)
  out[rows, lengths_B - 1] = np.asarray(first)
  later = np.asarray(later)
  for offset in range(steps):
    pos = lengths_B + offset
    live = pos < l - 1
    out[rows[live], pos[live]] = later[offset][live]
  return out


# dense, top-2 and GQA here; the other kinds and the extras are long drills (make test-drills)
EXTRA_CASES = ("moe_scanned_sigmoid_bias_shared", "moe_dense_to_sparse", "sst",
               "monarch_one_kv_head", "lora", "moepp")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.drill) if n in EXTRA_CASES
                                  else n for n in CASES])
def test_cached_decoding_equals_full_forward_at_every_position(name):
  cfg = CASES[name]
  params, state = _init(cfg)
  tokens = _tokens((3, 13))
  lengths = np.array([1, 6, 3], np.int32)  # row 0: every position comes from a decode step
  full = _full_forward(cfg, params, state, tokens)
  cached = _teacher_forced(cfg, params, state, tokens, lengths)
  for row, n in enumerate(lengths):
    got, want = cached[row, n - 1:], full[row, n - 1:12]
    assert not np.isnan(got).any()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-5, (name, row, rel)


def test_merged_lora_decodes_like_the_unmerged_model():
  cfg = CASES["lora"]
  params, state = _init(cfg)
  merged_cfg, merged_params, merged_state = decode.merge_lora(cfg, params, state)
  assert merged_cfg.linear.kind_for("qkv") == "dense" and "lora" not in merged_state
  assert "kernel" in merged_params["layers_0"]["attn"]["query"]
  tokens = _tokens((3, 13))
  lengths = np.array([1, 6, 3], np.int32)
  full = _full_forward(cfg, params, state, tokens)
  cached = _teacher_forced(merged_cfg, merged_params, merged_state, tokens, lengths)
  rel = np.linalg.norm(cached[0] - full[0, :12]) / np.linalg.norm(full[0, :12])
  assert rel < 1e-5


def test_packed_document_decodes_like_it_does_inside_the_pack():
  params, state = _init(BASE)
  tokens = _tokens((1, 16))
  segments = np.array([[1] * 6 + [2] * 10])
  positions = np.array([list(range(6)) + list(range(10))])
  packed = _full_forward(BASE, params, state, tokens, jnp.asarray(segments),
                         jnp.asarray(positions))
  second = tokens[:, 6:]
  cached = _teacher_forced(BASE, params, state, second, np.array([2], np.int32))
  want = packed[0, 7:15]
  rel = np.linalg.norm(cached[0, 1:] - want) / np.linalg.norm(want)
  assert rel < 1e-5


def test_sliding_window_is_respected_by_the_cache():
  window, length = 3, 10
  attn = Attention(num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=window)
  x = jax.random.normal(jax.random.key(0), (2, length, 32))
  seg = jnp.ones((2, length), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(length), (2, length))
  params = attn.init(jax.random.key(1), x, seg, pos)["params"]
  full = attn.apply({"params": params}, x, seg, pos)
  unwindowed = Attention(num_heads=4, num_kv_heads=2, head_dim=8).apply({"params": params},
                                                                       x, seg, pos)
  assert float(jnp.abs(full - unwindowed)[:, window:].max()) > 1e-3  # the window bites
  np.testing.assert_allclose(full[:, :window], unwindowed[:, :window], rtol=1e-6, atol=1e-6)
  prefill = attn.clone(decode="prefill")
  step = attn.clone(decode="step")
  cache = nn.meta.unbox(jax.eval_shape(lambda: prefill.init(jax.random.key(1), x, seg, pos)))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache["cache"])
  out, mutated = prefill.apply({"params": params, "cache": cache}, x[:, :2], seg[:, :2],
                               pos[:, :2], mutable=["cache"])
  outs = [out]
  cache = mutated["cache"]
  for i in range(2, length):
    out, mutated = step.apply({"params": params, "cache": cache}, x[:, i:i + 1],
                              seg[:, i:i + 1], pos[:, i:i + 1], mutable=["cache"])
    cache = mutated["cache"]
    outs.append(out)
  cached = jnp.concatenate(outs, axis=1)
  assert float(jnp.linalg.norm(cached - full) / jnp.linalg.norm(full)) < 1e-5


def test_model_sliding_window_changes_only_positions_beyond_the_window():
  params, state = _init(BASE)  # the window adds no parameters
  tokens = _tokens((2, 12))
  full = _full_forward(BASE, params, state, tokens)
  windowed = _full_forward(CASES["dense_sliding_window"], params, state, tokens)
  # first 4 keys: all in window; equal up to float32 rounding (two compiled programs, whose
  # reduction order XLA may choose differently on another CPU), as the layer test above
  np.testing.assert_allclose(windowed[:, :4], full[:, :4], rtol=1e-6, atol=1e-6)
  assert np.abs(windowed[:, 4:] - full[:, 4:]).max(axis=-1).min() > 1e-4


def test_the_cache_holds_only_the_kv_heads():
  model = DecoderLM(dataclasses.replace(BASE, num_kv_heads=1))
  cache = decode.abstract_cache(model, batch_size=3, max_length=20)
  shapes = {s.value.shape for s in jax.tree.leaves(cache, is_leaf=lambda x: hasattr(x, "names"))}
  assert shapes == {(3, 20, 1, 8)}  # [B, S, K=1, H] not N=4 query heads


def _sampler(cfg=BASE, mesh=None, max_length=40, seed=0):
  params, state = _init(cfg, seed)
  return decode.Sampler(cfg, params, state, mesh, max_length=max_length)


PROMPTS = [[tokenizer.BOS, 100, 101, 102], [tokenizer.BOS], [tokenizer.BOS, 50, 51, 52, 53, 54]]


def test_greedy_is_deterministic_and_equals_argmax_of_the_full_forward():
  sampler = _sampler()
  greedy = decode.SamplingConfig(temperature=0.0)
  outs, stats = sampler.generate(PROMPTS, max_new_tokens=12, sampling=greedy, eos_id=None)
  again, _ = sampler.generate(PROMPTS, max_new_tokens=12, sampling=greedy, eos_id=None)
  assert stats["tokens"] == 36 and stats["tokens_per_sec"] > 0
  for prompt, out, out2 in zip(PROMPTS, outs, again):
    np.testing.assert_array_equal(out, out2)
    assert len(out) == 12
    sequence = np.concatenate([prompt, out])[None]
    logits = _full_forward(BASE, sampler.params, sampler.model_state, sequence)
    argmax = np.argmax(logits[0], axis=-1)
    np.testing.assert_array_equal(argmax[len(prompt) - 1:-1], out)


def test_generation_stops_at_eos_and_pads_after_it():
  sampler = _sampler()
  greedy = decode.SamplingConfig(temperature=0.0)
  outs, _ = sampler.generate(PROMPTS, max_new_tokens=12, sampling=greedy, eos_id=None)
  eos = int(outs[0][3])  # pretend the 4th greedy token of row 0 is the end of sequence
  stopped, _ = sampler.generate(PROMPTS, max_new_tokens=12, sampling=greedy, eos_id=eos)
  first = list(outs[0]).index(eos)
  np.testing.assert_array_equal(stopped[0], outs[0][:first + 1])
  for out, full in zip(stopped[1:], outs[1:]):  # other rows run on to their own eos or the end
    hits = [i for i, t in enumerate(full) if t == eos]
    np.testing.assert_array_equal(out, full[:hits[0] + 1] if hits else full)


def test_temperature_sampling_is_reproducible_with_a_seed():
  sampler = _sampler()
  warm = decode.SamplingConfig(temperature=1.0)
  a, _ = sampler.generate(PROMPTS, max_new_tokens=16, sampling=warm, seed=3, eos_id=None)
  b, _ = sampler.generate(PROMPTS, max_new_tokens=16, sampling=warm, seed=3, eos_id=None)
  c, _ = sampler.generate(PROMPTS, max_new_tokens=16, sampling=warm, seed=4, eos_id=None)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(a, c))
  # a row's draws do not depend on the other rows of the batch
  alone, _ = sampler.generate(PROMPTS[:1], max_new_tokens=16, sampling=warm, seed=3,
                              eos_id=None)
  np.testing.assert_array_equal(alone[0], a[0])


def test_top_k_and_top_p_restrict_the_candidates():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]] * 4000))
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = lambda **kw: np.asarray(decode.sample_logits(logits, keys, decode.SamplingConfig(**kw)))
  assert set(draw(temperature=1.0)) == {0, 1, 2, 3, 4}
  assert set(draw(temperature=1.0, top_k=2)) == {0, 1}
  assert set(draw(temperature=1.0, top_p=0.85)) == {0, 1, 2}  # 0.5 + 0.3 < 0.85 <= 0.9
  assert set(draw(temperature=1.0, top_p=0.5)) == {0}
  assert set(draw(temperature=0.0)) == {0}
  # temperature sharpens: at 0.3 token 0 is drawn far more often than at 1
  assert (draw(temperature=0.3) == 0).mean() > (draw(temperature=1.0) == 0).mean() + 0.2


@pytest.mark.slow
def test_sharded_generation_equals_one_device():
  cfg = dataclasses.replace(BASE, **MOE)
  greedy = decode.SamplingConfig(temperature=0.0)
  one, _ = _sampler(cfg).generate(PROMPTS, max_new_tokens=8, sampling=greedy, eos_id=None)
  mesh = build_mesh(MeshConfig(data=4, tensor=2))
  sharded_sampler = _sampler(cfg, mesh=mesh)
  many, _ = sharded_sampler.generate(PROMPTS, max_new_tokens=8, sampling=greedy, eos_id=None)
  for x, y in zip(one, many):
    np.testing.assert_array_equal(x, y)


def test_expert_choice_is_refused():
  cfg = dataclasses.replace(BASE, ffn="moe", moe=MoEConfig(router="expert_choice",
                                                           allow_noncausal=True))
  with pytest.raises(ValueError, match="expert_choice.*cannot decode"):
    decode.decode_config(cfg)
  with pytest.raises(ValueError, match="expert_choice"):
    decode.Sampler(cfg, {}, {}, None, max_length=8)


def test_capacity_dispatch_decodes_dropless():
  cfg = dataclasses.replace(BASE, ffn="moe", moe=MoEConfig(dispatch="capacity"))
  assert decode.decode_config(cfg).moe.dispatch == "dropless"


@pytest.mark.parametrize("prompts, new, match", [
    ([[]], 4, "prompt 0 is empty"),
    ([], 4, "no prompts"),
    ([[tokenizer.BOS] * 30], 11, "41, beyond the cache's max_length=40"),
    ([[tokenizer.BOS]], 0, "max_new_tokens must be an integer >= 1, got 0"),
])
def test_bad_generate_arguments_are_named(prompts, new, match):
  with pytest.raises(ValueError, match=match):
    _sampler().check(prompts, new)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_sampling_settings_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    decode.SamplingConfig(**kwargs)


# --- the command-line tools on a real (few-step) run --------------------------------------

@pytest.fixture(scope="module")
def trained_run(tfds_dir, tmp_path_factory):
  """A 4-step run of configs/lm.py:test with checkpoints at steps 2 and 4."""
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import lm  # pylint: disable=g-import-not-at-top
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from effjax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  c = lm.get_config("test")
  c.data.data_dir = tfds_dir
  c.train.update(num_steps=4, checkpoint_every=2, eval_every=4, log_every=2)
  workdir = str(tmp_path_factory.mktemp("run"))
  train_and_evaluate(config_lib.from_config_dict(c), workdir)
  return workdir


def _one_line_exit(fn, match):
  with pytest.raises(SystemExit) as info:
    fn()
  message = str(info.value.code)
  assert "\n" not in message
  assert match in message, message


@pytest.mark.slow
def test_sample_cli_prints_continuations_and_names_bad_arguments(trained_run, tmp_path):
  from experiments import sample  # pylint: disable=g-import-not-at-top
  printed = []
  texts, stats = sample.sample(trained_run, ["ab", "x = 1\n"], max_new_tokens=6,
                               temperature=0.0, echo=printed.append)
  assert len(texts) == 2 and stats["tokens"] > 0
  assert any(line.startswith("x = 1\n") for line in printed)
  assert any("tokens/s" in line for line in printed)
  older, _ = sample.sample(trained_run, ["ab"], max_new_tokens=6, temperature=0.0, step=2,
                           echo=printed.append)
  assert any("step 2;" in line for line in printed)
  del older
  _one_line_exit(lambda: sample.sample(trained_run, [""], echo=printed.append),
                 "prompt 0 is empty")
  _one_line_exit(lambda: sample.sample(trained_run, [], echo=printed.append), "--prompt")
  _one_line_exit(lambda: sample.sample(trained_run, ["abc"], max_new_tokens=40,
                                       echo=printed.append),
                 "beyond the cache's max_length=32")
  _one_line_exit(lambda: sample.sample(trained_run, ["abc"], max_new_tokens=4, step=3,
                                       echo=printed.append),
                 "no checkpoint at step 3")
  _one_line_exit(lambda: sample.sample(str(tmp_path), ["abc"], echo=printed.append),
                 "holds no training run")
  _one_line_exit(lambda: sample.sample(trained_run, ["abc"], top_p=2.0, echo=printed.append),
                 "top_p")


@pytest.mark.drill  # minutes of training; `make test-drills` (CI) runs it
def test_evaluate_cli_covers_the_whole_split(trained_run, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from effjax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  from experiments import evaluate  # pylint: disable=g-import-not-at-top
  printed = []
  # the same two spread batches the training loop evaluated at its last step
  sample = evaluate.evaluate_run(trained_run, max_batches=2, out=str(tmp_path / "two.json"),
                                 echo=printed.append)
  logged = read_metrics(os.path.join(trained_run, "metrics.jsonl"))[4]
  assert sample["step"] == 4 and sample["eval_batches"] == 2
  np.testing.assert_allclose(sample["eval_loss"], logged["eval_loss"], rtol=1e-5)
  whole = evaluate.evaluate_run(trained_run, echo=printed.append)
  assert whole["eval_batches"] > 2 and whole["eval_tokens"] > sample["eval_tokens"]
  path = os.path.join(trained_run, "eval_validation_step4.json")
  with open(path, encoding="utf-8") as f:
    written = json.load(f)
  assert written["eval_bpb"] == whole["eval_bpb"] and "provenance" in written
  assert any("the whole split" in line and "bits/byte" in line for line in printed)
  _one_line_exit(lambda: evaluate.evaluate_run(trained_run, split="nosuch", echo=printed.append),
                 "nosuch")
  _one_line_exit(lambda: evaluate.evaluate_run(trained_run, step=7, echo=printed.append),
                 "no checkpoint at step 7")
