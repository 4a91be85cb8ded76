"""Checks of hyper-parameters that work on floats, arrays and pytrees of them."""

from __future__ import annotations

import jax
import numpy as np


def concrete_values(tree) -> list[float]:
  """Floats of the leaves whose values are known now; tracers are skipped.

  Under ``optax.inject_hyperparams`` hyper-parameters arrive as arrays, and as
  tracers inside a jitted ``update``; those were validated at ``init``. Works
  inside ``jax.jit`` for values closed over (Python floats, NumPy arrays).
  """
  values = []
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.core.Tracer):
      continue
    # NumPy, not jnp: inside a trace even jnp ops on constants give tracers.
    values.extend(float(v) for v in np.ravel(np.asarray(leaf, dtype=np.float64)))
  return values


def check(tree, ok, message: str) -> None:
  """Raise ``ValueError(message)`` naming the first concrete value failing ``ok``."""
  for value in concrete_values(tree):
    if not ok(value):
      raise ValueError(f"{message}; got {value!r}.")
