import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.config import ModelConfig
from effjax.layers import attention
from effjax.models.decoder_lm import DecoderLM

CFG = ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)


def _init(cfg, length=16):
  model = DecoderLM(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))["params"])
  return model, params


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, 256)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_causal_future_tokens_do_not_change_past_logits():
  model, params = _init(CFG)
  tokens = _tokens((2, 16))
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % 256)
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, changed)
  np.testing.assert_array_equal(a[:, :10], b[:, :10])
  assert float(jnp.abs(a[:, 10:] - b[:, 10:]).max()) > 1e-3  # the change is visible later on


def test_packed_documents_do_not_see_each_other():
  model, params = _init(CFG)
  tokens = _tokens((1, 16))
  segments = jnp.array([[1] * 6 + [2] * 10])
  positions = jnp.array([list(range(6)) + list(range(10))])
  changed = tokens.at[:, :6].set((tokens[:, :6] + 3) % 256)  # edit the first document only
  a = model.apply({"params": params}, tokens, segments, positions)
  b = model.apply({"params": params}, changed, segments, positions)
  np.testing.assert_allclose(a[:, 6:], b[:, 6:], rtol=1e-6, atol=1e-6)
  # and the second document alone gives the same logits as inside the pack
  alone = model.apply({"params": params}, tokens[:, 6:])
  np.testing.assert_allclose(a[:, 6:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_equals_attention_with_repeated_kv(kv_heads):
  b, l, n, h = 2, 12, 4, 8
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, l, n, h))
  k = jax.random.normal(keys[1], (b, l, kv_heads, h))
  v = jax.random.normal(keys[2], (b, l, kv_heads, h))
  seg = jnp.ones((b, l), jnp.int32)
  grouped = attention.attention_xla(q, k, v, seg, h ** -0.5)
  repeat = n // kv_heads
  full = attention.attention_xla(q, jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2),
                                 seg, h ** -0.5)
  assert _rel(grouped, full) < 1e-6


def test_xla_attention_matches_jax_dot_product_attention():
  b, l, n, kv, h = 2, 16, 4, 2, 8
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (b, l, n, h))
  k = jax.random.normal(keys[1], (b, l, kv, h))
  v = jax.random.normal(keys[2], (b, l, kv, h))
  seg = jnp.array([[1] * 5 + [2] * 11, [1] * 16])
  ours = attention.attention_xla(q, k, v, seg, 0.3)
  ref = jax.nn.dot_product_attention(q, k, v, mask=attention.attention_mask(seg), scale=0.3,
                                     is_causal=True, implementation="xla")
  assert _rel(ours, ref) < 1e-5


def test_cudnn_outside_gpu_is_a_clear_error():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  q = jnp.ones((1, 8, 2, 8), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="needs a CUDA GPU"):
    attention.attention_cudnn(q, q, q, jnp.ones((1, 8), jnp.int32), 0.1)


@pytest.mark.gpu
def test_cudnn_matches_xla_on_gpu():
  cfg_xla = ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  cfg_cudnn = ModelConfig(**{**cfg_xla.__dict__, "attention_impl": "cudnn"})
  model, params = _init(cfg_xla, 128)
  tokens = _tokens((2, 128))
  a = model.apply({"params": params}, tokens)
  b = DecoderLM(cfg_cudnn).apply({"params": params}, tokens)
  assert _rel(b, a) < 1e-2


def test_scan_over_layers_equals_python_loop():
  model, params = _init(CFG)
  scanned_cfg = ModelConfig(**{**CFG.__dict__, "scan_layers": True, "remat": "full"})
  stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
  stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[params[f"layers_{i}"] for i in range(CFG.num_layers)])
  tokens = _tokens((2, 16))
  a = model.apply({"params": params}, tokens)
  b = DecoderLM(scanned_cfg).apply({"params": stacked}, tokens)
  assert _rel(b, a) < 1e-6


def test_untied_head_and_bfloat16_run_and_differ_sensibly():
  cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": False, "dtype": "bfloat16"})
  model, params = _init(cfg)
  assert "head" in params and params["head"].shape == (32, 300)
  logits = model.apply({"params": params}, _tokens((2, 16)))
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_every_weight_has_logical_names():
  model = DecoderLM(CFG)
  boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)
