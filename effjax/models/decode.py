"""Autoregressive decoding of the decoder LM with a KV cache: prefill, one-token steps,
sampling (greedy, temperature, top-k, top-p) and a jitted generate loop, from any checkpoint.

The cache (effjax/layers/attention.py) holds, per layer, the K kv heads' keys and values for a
fixed maximum length S; slot s is position s, so RoPE positions continue from the prompt and
every shape is static. Prompts of different lengths share a batch: each row's prompt sits at
slots 0..len-1 (right-padded), prefill runs the padded prompt block once, and each step feeds
every row its last token at its own position. A row that produced EOS keeps running (static
batch) but writes PAD. One `jax.jit` holds prefill and a `lax.while_loop` over the steps; it
runs on the training mesh, the cache sharded by the logical names in the rules table.

Every linear kind decodes as it trains (dense, Monarch, SST, LoRA; `merge_lora` folds LoRA into
dense kernels first). Mixture-of-Experts layers decode with token-choice routers (their choice
for a token depends on that token only); capacity dispatch decodes dropless (capacity is a
training-time batching limit: at a decode step no token is dropped); expert choice, whose
experts pick among all tokens of the batch including later ones, is refused.

Shapes in names: B batch, P prompt block, S maximum length (the cache), V vocab.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effjax.config import ModelConfig
from effjax.data import tokenizer as tokenizer_lib
from effjax.layers.attention import CACHE_COLLECTION
from effjax.layers.lora import LORA_COLLECTION, lora_dense_weight, lora_scale
from effjax.models.decoder_lm import DecoderLM
from effjax.parallel import (LOGICAL_RULES, data_parallel_size, logical_sharding,
                             sharding_context)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy (argmax); else softmax(logits / temperature) restricted to the
  top_k most likely tokens (0 = all) and to the smallest set whose probability reaches top_p
  (1 = all; the most likely token is always kept)."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0
            and math.isfinite(self.temperature)):
      raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                       f"{self.temperature!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1 = no limit), got {self.top_p!r}")


def decode_config(cfg: ModelConfig) -> ModelConfig:
  """The model config decoding runs with: same params and function, no remat, and dropless
  MoE dispatch. Raises ValueError for a model that cannot decode token by token."""
  if cfg.ffn == "moe" and cfg.moe.router == "expert_choice":
    raise ValueError(
        "model.moe.router='expert_choice' cannot decode autoregressively: each expert picks its "
        "top tokens among all tokens of the batch, later positions included, so a token's "
        "output depends on tokens not yet generated. Decode a model with a token-choice router "
        "(softmax_topk, topk_softmax, sigmoid_bias, dense_to_sparse)")
  moe = cfg.moe
  if cfg.ffn == "moe" and moe.dispatch == "capacity":
    moe = dataclasses.replace(moe, dispatch="dropless")
  return dataclasses.replace(cfg, remat="none", moe=moe)


def merge_lora(cfg: ModelConfig, params, model_state):
  """(config, params, model_state) with every LoRA projection folded into one dense kernel
  W0 + (alpha / r) A B: the same function, one matmul per projection when decoding."""
  if not cfg.linear.uses("lora"):
    raise ValueError("merge_lora: the model has no LoRA projection (model.linear uses "
                     f"{sorted({cfg.linear.kind_for(g) for g in ('qkv', 'attn_out', 'mlp')})})")
  scale = lora_scale(cfg.linear.lora_alpha, cfg.linear.rank)
  bases = model_state[LORA_COLLECTION]

  def walk(p, base, path):
    if isinstance(p, dict) and "lora_a" in p:
      if base is None or "w0" not in base:
        raise ValueError(f"merge_lora: no frozen base W0 for the LoRA layer at {path}")
      w = lora_dense_weight(p, base, scale)
      return {"kernel": w.astype(p["lora_a"].dtype)}
    if isinstance(p, dict):
      return {k: walk(v, None if base is None else base.get(k), f"{path}/{k}")
              for k, v in p.items()}
    return p

  merged = walk(params, bases, "")
  groups = ("qkv", "attn_out", "mlp")
  kinds = {g: "dense" if cfg.linear.kind_for(g) == "lora" else cfg.linear.kind_for(g)
           for g in groups}
  linear = dataclasses.replace(cfg.linear, kind="dense", relora_every=0,
                               **{g: "" if k == "dense" else k for g, k in kinds.items()})
  state = {k: v for k, v in model_state.items() if k != LORA_COLLECTION}
  return dataclasses.replace(cfg, linear=linear), merged, state


def _apply(model, params, model_state, cache, tokens_BL, segment_ids_BL, positions_BL, mode):
  logits_BLV, mutated = model.apply(
      {"params": params, **model_state, CACHE_COLLECTION: cache}, tokens_BL, segment_ids_BL,
      positions_BL, decode=mode, mutable=[CACHE_COLLECTION])
  return logits_BLV, mutated[CACHE_COLLECTION]


def abstract_cache(model, batch_size: int, max_length: int):
  """Boxed ShapeDtypeStructs of the cache (with its logical axis names)."""
  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), tokens.shape)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, jnp.ones_like(tokens), positions,
                         decode="prefill"))
  return variables[CACHE_COLLECTION]


def cache_shardings(model, batch_size: int, max_length: int, mesh):
  boxed = abstract_cache(model, batch_size, max_length)
  # the boxes' own unbox would apply sharding constraints to shapes under a mesh
  shapes = jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, boxed,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  if mesh is None:
    return shapes, None
  return shapes, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_RULES)


def init_cache(model, batch_size: int, max_length: int, mesh=None):
  """A zero cache for `batch_size` rows of up to `max_length` tokens (sharded on `mesh`)."""
  shapes, shardings = cache_shardings(model, batch_size, max_length, mesh)
  zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return jax.jit(zeros, out_shardings=shardings)()


def prefill(model, params, model_state, cache, prompt_BP, lengths_B):
  """(logits [B, V] after each row's last prompt token, cache with slots 0..P-1 written).

  Row b's prompt is prompt_BP[b, :lengths_B[b]]; the rest is padding (never attended to by
  the prompt, overwritten by the generated tokens)."""
  b, p = prompt_BP.shape
  positions_BP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  segments_BP = (positions_BP < lengths_B[:, None]).astype(jnp.int32)
  logits_BPV, cache = _apply(model, params, model_state, cache, prompt_BP, segments_BP,
                             positions_BP, "prefill")
  last = jnp.maximum(lengths_B - 1, 0)
  return logits_BPV[jnp.arange(b), last], cache


def decode_step(model, params, model_state, cache, tokens_B, positions_B):
  """(logits [B, V] for the next token, cache): one token per row at its own position."""
  tokens_B1, positions_B1 = tokens_B[:, None], positions_B[:, None]
  logits_B1V, cache = _apply(model, params, model_state, cache, tokens_B1,
                             jnp.ones_like(tokens_B1), positions_B1, "step")
  return logits_B1V[:, 0], cache


def sample_logits(logits_BV, keys_B, sampling: SamplingConfig):
  """[B] int32 next tokens; row b draws with its own key (independent of the batch size)."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  neg = jnp.finfo(jnp.float32).min
  if sampling.top_k and sampling.top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg, logits_BV)
  if sampling.top_p < 1:
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the strictly likelier ones
    keep_BV = before_BV < sampling.top_p  # the token that reaches top_p is kept
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, neg, logits_BV)
  return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)


def _row_keys(rng, step, rows: int):
  step_key = jax.random.fold_in(rng, step)
  return jax.vmap(lambda r: jax.random.fold_in(step_key, r))(jnp.arange(rows))


def generate(model, params, model_state, prompt_BP, lengths_B, rng, max_new_tokens, *,
             max_length: int, sampling: SamplingConfig, eos_id: int | None = tokenizer_lib.EOS,
             pad_id: int = tokenizer_lib.PAD, cache_sharding=None):
  """(tokens [B, S], generated [B]): row b's continuation is
  tokens[b, lengths[b] : lengths[b] + generated[b]] (ending with EOS when one was drawn).

  Traceable (jit it with `max_length`, `sampling`, ids static); the loop stops early once
  every row has produced EOS. Needs lengths + max_new_tokens <= max_length (checked by the
  callers that know the values; `Sampler` does)."""
  b, p = prompt_BP.shape
  shapes, _ = cache_shardings(model, b, max_length, None)
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  if cache_sharding is not None:
    cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
  rows = jnp.arange(b)
  tokens_BS = jnp.full((b, max_length), pad_id, jnp.int32).at[:, :p].set(prompt_BP)
  logits_BV, cache = prefill(model, params, model_state, cache, prompt_BP, lengths_B)
  first_B = sample_logits(logits_BV, _row_keys(rng, 0, b), sampling)
  tokens_BS = tokens_BS.at[rows, lengths_B].set(first_B)
  done_B = (first_B == eos_id) if eos_id is not None else jnp.zeros((b,), jnp.bool_)
  generated_B = jnp.ones((b,), jnp.int32)

  def cond(carry):
    i, _, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, tokens_BS, last_B, done_B, generated_B = carry
    logits_BV, cache = decode_step(model, params, model_state, cache, last_B, lengths_B + i - 1)
    next_B = sample_logits(logits_BV, _row_keys(rng, i, b), sampling)
    next_B = jnp.where(done_B, pad_id, next_B)
    tokens_BS = tokens_BS.at[rows, lengths_B + i].set(next_B)
    generated_B = generated_B + (~done_B).astype(jnp.int32)
    if eos_id is not None:
      done_B = done_B | (next_B == eos_id)
    return i + 1, cache, tokens_BS, next_B, done_B, generated_B

  carry = (jnp.ones((), jnp.int32), cache, tokens_BS, first_B, done_B, generated_B)
  _, _, tokens_BS, _, _, generated_B = jax.lax.while_loop(cond, body, carry)
  return tokens_BS, generated_B


def _bucket(n: int, cap: int) -> int:
  """Prompt block length: the next power of two >= n (at least 8), at most `cap`, so a few
  compilations serve every prompt length."""
  return min(cap, max(8, 1 << (max(n, 1) - 1).bit_length()))


_RUN_EOS = object()  # Sampler.generate's default: the tokenizer's EOS


class Sampler:
  """Compiled generation for one model on one mesh, any prompts up to `max_length` tokens;
  text goes through `tokenizer` (default the byte tokenizer; a run's is
  `tokenizer.load(cfg.data.tokenizer)` of its read_run_config)."""

  def __init__(self, model_cfg: ModelConfig, params, model_state, mesh, *, max_length: int,
               tokenizer: tokenizer_lib.Tokenizer | None = None):
    if not isinstance(max_length, int) or max_length < 2:
      raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    self.tokenizer = tokenizer or tokenizer_lib.ByteTokenizer()
    if self.tokenizer.vocab_size > model_cfg.vocab_size:
      raise ValueError(f"the tokenizer's {self.tokenizer.vocab_size} tokens do not fit the "
                       f"model's vocab_size={model_cfg.vocab_size}")
    self.config = decode_config(model_cfg)
    self.model = DecoderLM(self.config)
    self.params, self.model_state = params, model_state
    self.mesh, self.max_length = mesh, max_length
    self._compiled = {}

  def _pad_rows(self, n: int) -> int:
    shards = 1 if self.mesh is None else data_parallel_size(self.mesh)
    return -(-n // shards) * shards

  def _jitted(self, rows: int, sampling: SamplingConfig, eos_id):
    cache_sharding = None
    if self.mesh is not None:
      _, cache_sharding = cache_shardings(self.model, rows, self.max_length, self.mesh)
    return jax.jit(functools.partial(generate, self.model, max_length=self.max_length,
                                     sampling=sampling, eos_id=eos_id,
                                     pad_id=self.tokenizer.pad_id,
                                     cache_sharding=cache_sharding))

  def check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """ValueError naming the bad value (before anything is compiled)."""
    if not prompts:
      raise ValueError("no prompts given")
    for i, prompt in enumerate(prompts):
      if len(prompt) == 0:
        raise ValueError(f"prompt {i} is empty: give at least one token")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > self.max_length:
      raise ValueError(
          f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} is "
          f"{longest + max_new_tokens}, beyond the cache's max_length={self.max_length}")

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               eos_id=_RUN_EOS) -> tuple[list[np.ndarray], dict[str, float]]:
    """(continuations as int32 arrays, {"tokens", "seconds", "tokens_per_sec",
    "compile_seconds"}); the timing is of the compiled call alone. Generation stops at
    `eos_id` (default the tokenizer's EOS; None: never)."""
    self.check(prompts, max_new_tokens)
    eos_id = self.tokenizer.eos_id if eos_id is _RUN_EOS else eos_id
    rows = self._pad_rows(len(prompts))
    block = _bucket(max(len(p) for p in prompts), self.max_length)
    prompt_BP = np.full((rows, block), self.tokenizer.pad_id, np.int32)
    lengths_B = np.ones((rows,), np.int32)  # padding rows: a one-token prompt, output dropped
    prompt_BP[:, 0] = self.tokenizer.bos_id
    for i, p in enumerate(prompts):
      prompt_BP[i, :len(p)] = np.asarray(p, np.int32)
      lengths_B[i] = len(p)
    args = (self.params, self.model_state, prompt_BP, lengths_B, jax.random.key(seed),
            np.int32(max_new_tokens))
    context = (sharding_context(self.mesh) if self.mesh is not None
               else contextlib.nullcontext())
    with context:
      if self.mesh is not None:
        args = (args[0], args[1],
                jax.device_put(prompt_BP, logical_sharding(self.mesh, ("batch", "length"))),
                jax.device_put(lengths_B, logical_sharding(self.mesh, ("batch",))), *args[4:])
      key = (rows, block, sampling, eos_id)
      compile_seconds = 0.0
      if key not in self._compiled:  # compiled ahead of time, so the timing below is decoding
        t0 = time.perf_counter()
        self._compiled[key] = self._jitted(rows, sampling, eos_id).lower(*args).compile()
        compile_seconds = time.perf_counter() - t0
      t0 = time.perf_counter()
      tokens_BS, generated_B = jax.block_until_ready(self._compiled[key](*args))
      seconds = time.perf_counter() - t0
    tokens_BS, generated_B = np.asarray(tokens_BS), np.asarray(generated_B)
    outs = [tokens_BS[i, lengths_B[i]:lengths_B[i] + generated_B[i]]
            for i in range(len(prompts))]
    total = int(sum(len(o) for o in outs))
    return outs, {"tokens": total, "seconds": seconds,
                  "tokens_per_sec": total / max(seconds, 1e-9),
                  "compile_seconds": compile_seconds}

  def generate_text(self, prompts: Sequence[str], **kwargs) -> tuple[list[str], dict]:
    """Prompts tokenised as [BOS, ids] by the sampler's tokenizer; continuations decoded as
    they continue their prompts, EOS dropped and any invalid UTF-8 replaced rather than
    raised on."""
    for i, text in enumerate(prompts):
      if not text:
        raise ValueError(f"prompt {i} is empty")
    ids = [self.tokenizer.encode(t)[:-1] for t in prompts]
    outs, stats = self.generate(ids, **kwargs)
    return [self.tokenizer.decode_continuation(p, o) for p, o in zip(ids, outs)], stats
