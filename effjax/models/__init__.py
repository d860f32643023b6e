"""Models assembled from effjax.layers by config."""
