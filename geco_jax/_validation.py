"""Checks of hyper-parameters that work on floats, arrays and pytrees of them."""

from __future__ import annotations

import operator

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


def check_int(value, name: str, minimum: int) -> int:
  """``value`` as an int, or ``ValueError`` if it is not an integer >= ``minimum``."""
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer; got {value!r}.") from None
  if value < minimum:
    raise ValueError(f"{name} must be at least {minimum}; got {value}.")
  return value


def is_container(value) -> bool:
  """True for a container pytree (dict, list, ...), False for a scalar or an array."""
  return not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(value))
