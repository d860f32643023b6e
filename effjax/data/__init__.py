"""Datasets (TFDS builders, no TensorFlow), tokenizers and grain input pipelines."""
