"""Pod-sized decoder LM configs: --config=configs/pod.py:VARIANT.

  1b                 ~1.1B dense decoder (TinyLlama-like: 22 x 2048, 16 heads of 128, 4 kv
                     heads, SwiGLU d_ff 5632, vocab 32000, untied), seq 2048, batch 256
                     (0.5M tokens)
  llama3_8b          Llama-3-8B-shaped dense (32 x 4096, 32 heads, 8 kv heads, d_ff 14336,
                     vocab 128256, untied, rope theta 5e5; 8.03B), seq 8192, batch 64
                     (0.5M tokens)
  mixtral_8x7b       Mixtral-8x7B-shaped MoE (32 x 4096, 32 heads, 8 kv heads, 8 experts of
                     d_ff 14336, top-2 on the logits then softmax, dropless, vocab 32000,
                     untied, rope theta 1e6; 46.7B, 12.9B active), seq 4096, batch 128
                     (0.5M tokens), expert parallel
  1b_sst, llama3_8b_sst          the same models with Sparse Spectral Training on every
                     attention and MLP projection (configs/sst.py:sst's settings: rank
                     d_model / 8, mixed sampling, a new active set every 1/24 of the steps)
  1b_monarch, llama3_8b_monarch  the same models with Monarch SwiGLU weights (nblocks 4),
                     attention dense (configs/monarch.py:mlp)

Every variant computes in bfloat16 with float32 master weights and Adam moments
(model.param_dtype), scans over its layers (model.scan_layers: one layer is compiled instead of
22-32, which more than halves compile time; 1b on tpu:v5p:4x4x4 compiles in 60 s scanned,
136 s unrolled) with each layer rematerialised (model.remat="dots_no_batch": matmul outputs
kept, the rest recomputed) and runs effjax's Pallas flash attention
(model.attention_impl="pallas": Mosaic TPU on a TPU, Mosaic GPU on an H100; never the [L, L]
scores of the xla path at these lengths).

Default mesh and the target it is sized for (experiments/aot_check.py --target=..., the
target's compiler, compile-only; the figures are in WORKSPACE.md):

  1b, 1b_sst, 1b_monarch                       tpu:v5p:4x4x4 (64 chips x 95 GiB HBM):
                                               data 4 x fsdp 16, batch 4 x 2048 per chip
  llama3_8b, llama3_8b_sst, llama3_8b_monarch  tpu:v5p:4x4x4: data 4 x fsdp 16,
                                               batch 1 x 8192 per chip
  mixtral_8x7b                                 tpu:v5p:4x4x4: fsdp 16 x expert 4 (2 experts
                                               per chip; 8 x 8 is not a product of whole torus
                                               axes of a 4x4x4 slice), batch 2 x 4096 per chip

`data` is -1 everywhere (it takes the devices the other axes leave), so a config runs on any
device count its fixed axes divide. Every degree, the batch and the kernels are overridable
(--config.mesh.fsdp=..., --config.mesh.expert=..., --config.train.global_batch_size=...).
`sized_for(variant, target)` gives the overrides for a v6e 8x8 slice (64 chips x 32 GiB) and
one 8-GPU H100 node (8 x 80 GB), e.g.

  python -m experiments.aot_check --config=configs/pod.py:llama3_8b --target=gpu:h100:8 \\
      --config.mesh.fsdp=8 --config.train.global_batch_size=8

(--config.model.attention_impl=cudnn works there too); `python -m experiments.pod_matrix
--list` prints every such command. mixtral_8x7b does not fit one 8 x H100 node: its float32
state alone is 80.94 GiB per GPU with mesh.expert=8.

On a TPU slice each degree must be a product of whole torus axes (4x4x4 takes 4 x 16, not
8 x 8). model.moe.gmm_impl="pallas" compiles for TPU only with mesh.expert > 1 (the kernel
runs inside the expert-parallel shard_map); on a data-parallel mesh use "ragged_dot". The data
set is the bundled offline corpus unless --config.data.dataset names another (a TFDS builder in
array_record with a tokenizer of this vocabulary).
"""
from configs import lm

VARIANTS = ("1b", "llama3_8b", "mixtral_8x7b", "1b_sst", "llama3_8b_sst", "1b_monarch",
            "llama3_8b_monarch")

# the target each variant's default mesh is sized for (experiments/aot_check.py --target)
TARGETS = {"1b": "tpu:v5p:4x4x4", "llama3_8b": "tpu:v5p:4x4x4",
           "mixtral_8x7b": "tpu:v5p:4x4x4"}
TARGETS.update({f"{base}_{method}": TARGETS[base] for base in ("1b", "llama3_8b")
                for method in ("sst", "monarch")})

# The overrides that size each model for the other targets experiments/pod_matrix.py compiles
# for (its defaults are the v5p 4x4x4 slice's); the SST / Monarch variants take their model's.
SIZED_FOR_TARGETS = ("tpu:v5p:4x4x4", "tpu:v6e:8x8", "gpu:h100:8")
_SIZED_FOR = {
    "1b": {"tpu:v6e:8x8": {"mesh.fsdp": 8},
           "gpu:h100:8": {"mesh.fsdp": 8, "train.global_batch_size": 32}},
    "llama3_8b": {"tpu:v6e:8x8": {"mesh.fsdp": 64, "model.remat": "full"},
                  "gpu:h100:8": {"mesh.fsdp": 8, "train.global_batch_size": 8}},
    # batch 128 needs 35.66 GiB per chip there even with full remat: half the batch
    "mixtral_8x7b": {"tpu:v6e:8x8": {"mesh.fsdp": 8, "mesh.expert": 8, "model.remat": "full",
                                     "train.global_batch_size": 64},
                     "gpu:h100:8": {"mesh.fsdp": 1, "mesh.expert": 8,
                                    "train.global_batch_size": 8}},
}


def sized_for(variant: str, target: str) -> dict[str, object]:
  """--config.KEY=VALUE overrides that size `variant` for `target` (one of SIZED_FOR_TARGETS)."""
  if variant not in VARIANTS or target not in SIZED_FOR_TARGETS:
    raise ValueError(f"no sizing of {variant!r} for {target!r}: variants {', '.join(VARIANTS)}; "
                     f"targets {', '.join(SIZED_FOR_TARGETS)}")
  return dict(_SIZED_FOR[_base_of(variant)].get(target, {}))


def short(target: str) -> str:
  """tpu:v5p:4x4x4 -> v5p, gpu:h100:8 -> h100."""
  return target.split(":")[1]


def _base_of(variant: str) -> str:
  return next(b for b in ("1b", "llama3_8b", "mixtral_8x7b") if variant.startswith(b))


NUM_STEPS = 100_000


def _common(c) -> None:
  """bf16 compute, float32 master weights, scanned and rematerialised layers, flash attention,
  and a pod-scale optimizer / run schedule."""
  c.model.update(dtype="bfloat16", param_dtype="float32", scan_layers=True,
                 remat="dots_no_batch", attention_impl="pallas", tie_embeddings=False,
                 norm_eps=1e-5, init_std=0.02)
  c.optim.update(learning_rate=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1)
  c.train.update(num_steps=NUM_STEPS, log_every=10, eval_every=1000, checkpoint_every=1000)
  c.data.update(eval_batches=16)


def _base(name: str):
  c = lm.get_config("tiny")
  _common(c)
  if name == "1b":
    c.model.update(d_model=2048, num_layers=22, num_heads=16, num_kv_heads=4, d_ff=5632,
                   vocab_size=32000, rope_theta=10_000.0)
    c.data.seq_len = 2048
    c.train.global_batch_size = 256
    c.mesh.update(data=-1, fsdp=16, tensor=1, expert=1)
  elif name == "llama3_8b":
    c.model.update(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336,
                   vocab_size=128256, rope_theta=500_000.0)
    c.data.seq_len = 8192
    c.train.global_batch_size = 64
    c.mesh.update(data=-1, fsdp=16, tensor=1, expert=1)
  elif name == "mixtral_8x7b":
    c.model.update(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336,
                   vocab_size=32000, rope_theta=1_000_000.0, ffn="moe")
    c.model.moe.update(num_experts=8, top_k=2, d_ff=14336, every_n=1, router="topk_softmax",
                       dispatch="dropless", gmm_impl="pallas")
    c.data.seq_len = 4096
    c.train.global_batch_size = 128
    c.mesh.update(data=-1, fsdp=16, tensor=1, expert=4)
  else:
    raise AssertionError(name)
  return c


def _sst(c) -> None:
  """configs/sst.py:sst on this model."""
  steps = c.train.num_steps
  c.model.linear.update(kind="sst", rank=max(1, c.model.d_model // 8),
                        sst_every=max(1, steps // 24), sst_sampling="mixed")
  c.optim.rewarm_steps = min(max(1, steps // 60), max(1, steps // 24))


def _monarch(c) -> None:
  """configs/monarch.py:mlp on this model."""
  c.model.linear.update(mlp="monarch", nblocks=4)


def get_config(variant: str = "1b"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/pod.py; choose one of "
                     f"{', '.join(VARIANTS)}")
  base = _base_of(variant)
  method = variant[len(base) + 1:]  # "", "sst" or "monarch"
  c = _base(base)
  if method == "sst":
    _sst(c)
  elif method == "monarch":
    _monarch(c)
  return c
