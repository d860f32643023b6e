"""Small helpers for walking param and state trees by name."""
from __future__ import annotations

from typing import Mapping

import jax


def last_key(path) -> str:
  """The last dict key (or attribute name) of a tree path: the leaf's own name."""
  for k in reversed(path):
    if isinstance(k, jax.tree_util.DictKey):
      return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
      return k.name
  return ""


def is_layer(node, names) -> bool:
  """True for a dict holding every one of `names` (one layer's params, e.g. SST's)."""
  return isinstance(node, Mapping) and all(n in node for n in names)
