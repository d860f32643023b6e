"""The fully hyperbolic decoder LM (HyboNet layers, effjax/layers/lorentz.py), selected by
model.geometry = "hyperbolic" (DecoderLM builds it; configs/hyperbolic.py has the variants).

  tokens -> points of H^{D-1} (ambient D = d_model; a token's embedding is the point whose
  space-like part is its learned row) -> N x [Lorentz layer norm, Lorentz attention, Lorentz
  residual, Lorentz layer norm, Lorentz FFN, Lorentz residual] -> Lorentz layer norm ->
  logits 2K + 2 <x, e_v>_L + b_v (HyboNet's decoder: minus the squared Lorentzian distance to
  each class point e_v, plus a bias; e_v the tied embedding points or a separate set).

Attention: q, k, v are Lorentz linear layers with one point of H^{h-1} per head (h = head dim,
ambient); RoPE rotates pairs of the space-like coordinates of q and k (a rotation of the space
part is a Lorentz transformation, so they stay on H), scores are -d_L^2(q, k) times a learned
scale (init 1 / sqrt(h)), values aggregate by the Lorentzian centroid; the heads' points are
concatenated and the output Lorentz linear layer maps them to H^{D-1}. FFN (HyboNet): a Lorentz
linear layer to d_ff, then one back to D with ReLU on its input.

Every Euclidean weight W is made by effjax/layers/linear.py:make_linear in the usual
projection groups (qkv, attn_out, mlp), so model.linear.kind = dense | lora | sst and GaLore /
ReLoRA apply unchanged. The curvature is one model-wide scalar (fixed, or learned as
log K). Not supported (refused by ModelConfig): MoE, Monarch, scan_layers, bfloat16, the
cudnn/pallas attention kernels, and KV-cache decoding (refused here).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.config import ModelConfig
from effjax.layers import lorentz
from effjax.layers.attention import attention_mask
from effjax.layers.embeddings import apply_rope
from effjax.models.decoder_lm import REMAT_POLICIES

ACTIVATIONS_COLLECTION = "lorentz_points"  # sown only when the caller makes it mutable (tests)


def _sow_points(module: nn.Module, name: str, x) -> None:
  """Sows `x` only on apply with the collection mutable (init would make it model state)."""
  if module.is_mutable_collection(ACTIVATIONS_COLLECTION) and not module.is_initializing():
    module.sow(ACTIVATIONS_COLLECTION, name, x)


def _rope_space(x_BLNH, positions_BL, theta: float):
  """RoPE on the first even number of space-like coordinates (time and any odd one left)."""
  n_rot = (x_BLNH.shape[-1] - 1) // 2 * 2
  rotated = apply_rope(x_BLNH[..., 1:1 + n_rot], positions_BL, theta)
  return jnp.concatenate([x_BLNH[..., :1], rotated, x_BLNH[..., 1 + n_rot:]], axis=-1)


class HyperbolicBlock(nn.Module):
  config: ModelConfig
  train: bool = False

  def _linear(self, features, group, in_axis, out_axis, name, heads=1, activation=None):
    cfg, hyp = self.config, self.config.hyperbolic
    return lorentz.LorentzLinear(
        features, cfg.linear, group, in_axis, out_axis, init_std=cfg.init_std, heads=heads,
        time_scaling=hyp.time_scaling, time_scale=hyp.time_scale,
        learn_time_scale=hyp.learn_time_scale, activation=activation, dropout=hyp.dropout,
        name=name)

  def _sow(self, name, x):
    _sow_points(self, "after_" + name, x)

  @nn.compact
  def __call__(self, x_BLD, k, segment_ids_BL, positions_BL):
    cfg = self.config
    det = not self.train
    b, l, d = x_BLD.shape
    n, kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim

    h_BLD = lorentz.LorentzLayerNorm(cfg.norm_eps, name="attn_norm")(x_BLD, k)
    self._sow("attn_norm", h_BLD)
    q_BLNH = self._linear(n * h, "qkv", "embed", "heads", "query", heads=n)(
        h_BLD, k, deterministic=det).reshape(b, l, n, h)
    k_BLKH = self._linear(kv * h, "qkv", "embed", "heads", "key", heads=kv)(
        h_BLD, k, deterministic=det).reshape(b, l, kv, h)
    v_BLKH = self._linear(kv * h, "qkv", "embed", "heads", "value", heads=kv)(
        h_BLD, k, deterministic=det).reshape(b, l, kv, h)
    q_BLNH = _rope_space(q_BLNH, positions_BL, cfg.rope_theta)
    k_BLKH = _rope_space(k_BLKH, positions_BL, cfg.rope_theta)
    for name, x in (("query", q_BLNH), ("key", k_BLKH), ("value", v_BLKH)):
      self._sow(name, x)
    log_scale = self.param("log_score_scale",
                           lambda _: jnp.asarray(-0.5 * math.log(h), jnp.float32))
    mask = attention_mask(segment_ids_BL, cfg.sliding_window)[:, :, None]
    out_BLNH = lorentz.lorentz_attention(q_BLNH, k_BLKH, v_BLKH, mask, k, jnp.exp(log_scale))
    self._sow("attention", out_BLNH)
    out_BLNH = nn.with_logical_constraint(out_BLNH, ("batch", "length", "heads", "kv"))
    h_BLD = self._linear(d, "attn_out", "heads", "embed", "out")(
        out_BLNH.reshape(b, l, n * h), k, deterministic=det)
    self._sow("attn_out", h_BLD)
    x_BLD = nn.with_logical_constraint(lorentz.lorentz_residual(x_BLD, h_BLD, k),
                                       ("batch", "length", "embed"))
    self._sow("attn_residual", x_BLD)

    h_BLD = lorentz.LorentzLayerNorm(cfg.norm_eps, name="mlp_norm")(x_BLD, k)
    h_BLF = self._linear(cfg.d_ff, "mlp", "embed", "mlp", "wi")(h_BLD, k, deterministic=det)
    h_BLF = nn.with_logical_constraint(h_BLF, ("batch", "length", "mlp"))
    self._sow("mlp_hidden", h_BLF)
    h_BLD = self._linear(d, "mlp", "mlp", "embed", "wo", activation=nn.relu)(
        h_BLF, k, deterministic=det)
    self._sow("mlp_out", h_BLD)
    x_BLD = nn.with_logical_constraint(lorentz.lorentz_residual(x_BLD, h_BLD, k),
                                       ("batch", "length", "embed"))
    self._sow("mlp_residual", x_BLD)
    return x_BLD


class HyperbolicLM(nn.Module):
  """Logits [B, L, V] in float32, same call signature as DecoderLM."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BL, segment_ids_BL=None, positions_BL=None, *, train: bool = False,
               step=None, decode: str = ""):
    del step  # no schedule inside the hyperbolic layers
    cfg, hyp = self.config, self.config.hyperbolic
    if decode:
      raise NotImplementedError(
          f"model.geometry='hyperbolic' has no KV-cache decoding (decode={decode!r}); "
          "evaluate it with full forward passes")
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones_like(tokens_BL)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)

    if hyp.learn_curvature:
      k = jnp.exp(self.param("log_curvature",
                             lambda _: jnp.asarray(math.log(hyp.curvature), jnp.float32)))
    else:
      k = jnp.asarray(hyp.curvature, jnp.float32)

    # space-like parts only (the time coordinate follows); the odd D-1 axis stays unsharded
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", None))
    embed_VS = self.param("embedding", init, (cfg.vocab_size, cfg.d_model - 1), jnp.float32)
    x_BLD = lorentz.from_space(jnp.take(embed_VS, tokens_BL, axis=0), k)
    x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))
    _sow_points(self, "after_embedding", x_BLD)

    block = HyperbolicBlock
    if cfg.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat])
    for i in range(cfg.num_layers):
      x_BLD = block(cfg, train, name=f"layers_{i}")(x_BLD, k, segment_ids_BL, positions_BL)

    x_BLD = lorentz.LorentzLayerNorm(cfg.norm_eps, name="final_norm")(x_BLD, k)
    _sow_points(self, "after_final_norm", x_BLD)
    if cfg.tie_embeddings:
      classes_VS = embed_VS
    else:
      head = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", None))
      classes_VS = self.param("head", head, (cfg.vocab_size, cfg.d_model - 1), jnp.float32)
    classes_VD = lorentz.from_space(classes_VS, k)
    bias_V = self.param("head_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  ("vocab",)),
                        (cfg.vocab_size,), jnp.float32)
    inner_BLV = jnp.einsum("bld,vd->blv", x_BLD, classes_VD.at[:, 0].multiply(-1.0))
    logits_BLV = 2.0 * k + 2.0 * inner_BLV + bias_V
    return nn.with_logical_constraint(logits_BLV, ("batch", "length", "vocab"))


def layer_activations(intermediates) -> dict[str, jax.Array]:
  """{"layers_0/query": points, ...} from the sown ACTIVATIONS_COLLECTION."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    flat["/".join(k for k in keys[:-1] if k != ACTIVATIONS_COLLECTION)] = leaf
  return flat
