"""Pallas kernels for effjax's hot paths (attention, grouped matmul); each with a jnp reference."""
