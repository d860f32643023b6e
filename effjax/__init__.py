"""effjax: efficient deep learning research in JAX/Flax.

Importing effjax needs only jax, flax, optax and numpy; data and checkpoint dependencies
(tensorflow-datasets, grain, orbax, ml_collections) are imported where they are used.
"""
__version__ = "0.1.0"
