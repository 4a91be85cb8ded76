"""Checks of hyper-parameters that work on floats, arrays and pytrees of them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def concrete_values(tree) -> list[float]:
  """Floats of the leaves whose values are known now; tracers are skipped.

  Under ``optax.inject_hyperparams`` hyper-parameters arrive as arrays, and as
  tracers inside a jitted ``update``; those were validated at ``init``.
  """
  values = []
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.core.Tracer):
      continue
    values.extend(float(v) for v in jnp.ravel(jnp.asarray(leaf)))
  return values


def check(tree, ok, message: str) -> None:
  """Raise ``ValueError(message)`` naming the first concrete value failing ``ok``."""
  for value in concrete_values(tree):
    if not ok(value):
      raise ValueError(f"{message}; got {value!r}.")
