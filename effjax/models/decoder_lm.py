"""Decoder-only transformer LM: embed -> N x (RMSNorm, GQA+RoPE, RMSNorm, SwiGLU) -> RMSNorm -> head.

Shapes in names: B batch, L length, D d_model, V vocab.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.config import ModelConfig
from effjax.layers.attention import Attention
from effjax.layers.embeddings import Embed
from effjax.layers.monarch import monarch_param_count
from effjax.layers.mlp import SwiGLU
from effjax.layers.norms import RMSNorm
from effjax.moe.accounting import moe_macs_delta
from effjax.moe.layer import MoELayer

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
  config: ModelConfig
  train: bool = False  # training behaviour (router noise, train capacity, state updates)
  layer: int = 0  # index in the stack (which layers are MoE); 0 under scan (all alike)
  decode: str = ""  # "" trains/evaluates; "prefill" / "step": KV-cache decoding (decode.py)

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL, step):
    """`step`: int32 scalar, updates applied so far (for schedules inside layers).

    With MoE++ gating residuals the carry `x_BLD` is (x, previous router logits [B, L, R]).
    """
    cfg = self.config
    prev_logits = None
    if isinstance(x_BLD, tuple):
      x_BLD, prev_logits = x_BLD
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h_BLD = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="attn_norm")(x_BLD)
    h_BLD = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.rope_theta,
                      cfg.attention_impl, cfg.linear, cfg.init_std, dtype, param_dtype,
                      sliding_window=cfg.sliding_window, decode=self.decode, name="attn")(h_BLD, segment_ids_BL, positions_BL)
    x_BLD = nn.with_logical_constraint(x_BLD + h_BLD, ("batch", "length", "embed"))
    h_BLD = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="mlp_norm")(x_BLD)
    if cfg.is_moe_layer(self.layer):
      h_BLD, logits = MoELayer(cfg, self.train, name="mlp")(h_BLD, step, prev_logits,
                                                            segment_ids_BL)
      prev_logits = logits if prev_logits is not None else None
    else:
      h_BLD = SwiGLU(cfg.d_ff, cfg.linear, cfg.init_std, dtype, param_dtype, name="mlp")(h_BLD)
    x_BLD = nn.with_logical_constraint(x_BLD + h_BLD, ("batch", "length", "embed"))
    return (x_BLD if prev_logits is None else (x_BLD, prev_logits)), None


class DecoderLM(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BL, segment_ids_BL=None, positions_BL=None, *, train: bool = False,
               step=None, decode: str = ""):
    """Logits [B, L, V] in float32. Without segment ids, the whole row is one sequence.

    `train` switches on training-only behaviour; `step` (int32 scalar, default 0) is the number
    of updates applied, for schedules inside layers. `decode` ("prefill" or "step") reads and
    writes the KV cache (collection "cache"; see effjax/models/decode.py), with `positions_BL`
    the cache slots of the tokens.
    """
    cfg = self.config
    if cfg.geometry == "hyperbolic":  # the fully hyperbolic LM, params under "hyperbolic"
      from effjax.models.hyperbolic_lm import HyperbolicLM  # pylint: disable=g-import-not-at-top
      return HyperbolicLM(cfg, name="hyperbolic")(tokens_BL, segment_ids_BL, positions_BL,
                                                  train=train, step=step, decode=decode)
    step = jnp.zeros((), jnp.int32) if step is None else jnp.asarray(step, jnp.int32)
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones_like(tokens_BL)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)

    embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, dtype, param_dtype, name="embed")
    x_BLD = nn.with_logical_constraint(embed(tokens_BL), ("batch", "length", "embed"))
    if cfg.ffn == "moe" and cfg.moe.gating_residual:  # carry the router logits (MoE++)
      x_BLD = (x_BLD, jnp.zeros(x_BLD.shape[:2] + (cfg.moe.num_routed,), jnp.float32))

    block = Block
    if cfg.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      # every collection (params, model state, sown metrics) gets a leading layers axis
      stack = nn.scan(block, variable_axes={True: 0}, split_rngs={"params": True, "noise": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BLD, _ = stack(cfg, train, decode=decode, name="layers")(x_BLD, segment_ids_BL,
                                                                 positions_BL, step)
    else:
      for i in range(cfg.num_layers):
        x_BLD, _ = block(cfg, train, i, decode, name=f"layers_{i}")(x_BLD, segment_ids_BL,
                                                                     positions_BL, step)
    if isinstance(x_BLD, tuple):
      x_BLD = x_BLD[0]

    x_BLD = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="final_norm")(x_BLD)
    if cfg.tie_embeddings:
      logits_BLV = embed.attend(x_BLD)
    else:
      init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", "vocab"))
      head_DV = self.param("head", init, (cfg.d_model, cfg.vocab_size), param_dtype)
      logits_BLV = jnp.einsum("bld,dv->blv", x_BLD.astype(jnp.float32),
                              head_DV.astype(jnp.float32))
    return nn.with_logical_constraint(logits_BLV, ("batch", "length", "vocab"))


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def projection_macs_per_token(cfg: ModelConfig) -> int:
  """Multiply-accumulates per token of all attention and MLP projections (= their weights for
  dense and Monarch; LoRA and SST also multiply by their frozen factors)."""
  total = 0
  for group, shapes in cfg.projection_shapes().items():
    for n_in, n_out in shapes:
      if cfg.linear.kind_for(group) == "monarch":
        total += monarch_param_count(n_in, n_out, cfg.linear.nblocks)
      elif cfg.linear.kind_for(group) == "lora":  # x W0 + (x A) B
        total += n_in * n_out + cfg.linear.rank * (n_in + n_out)
      elif cfg.linear.kind_for(group) == "sst":  # ((x U) sigma) V^T over all k = min columns
        total += min(n_in, n_out) * (n_in + n_out)
      else:
        total += n_in * n_out
  return total * cfg.num_layers + moe_macs_delta(cfg)  # MoE layers: active experts only


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """Matmul FLOPs per token: forward, and training (3 x forward: backward costs two forwards).

  Forward = 2 x (projection MACs + output head V x D) + attention 4 x L x N x H per layer
  (scores and values over the full sequence, as in the PaLM formula). Norms, activations and
  the softmax are left out.
  """
  head = cfg.vocab_size * cfg.d_model
  attention = 4 * cfg.num_layers * seq_len * cfg.num_heads * cfg.resolved_head_dim
  forward = 2 * (projection_macs_per_token(cfg) + head) + attention
  return {"forward": float(forward), "train": 3.0 * forward}
