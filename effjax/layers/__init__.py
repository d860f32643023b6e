"""Flax Linen layers: the linear family, attention, MLP, norms and embeddings."""
