"""Dual optimisers for GECO's Lagrange multipliers.

GECO applies its dual optimiser to ``log lambda`` with the gradient
``-C_ma_t`` (the negated moving average of the constraint), so any optax
transformation is a valid dual optimiser. Algorithm 1 of the paper is plain
SGD (``sgd``, the default of ``geco_jax.geco``). ``pi`` is the nuPI controller
of Sohrabi et al., "On PI controllers for updating Lagrange multipliers in
constrained optimization" (ICML 2024).

When to prefer ``pi``: with SGD (a pure integral controller) lambda keeps
growing for as long as the averaged constraint is violated, and because the
model reacts with a lag, lambda overshoots once the constraint is met and then
oscillates around its equilibrium (reconstructions alternating between too
sharp and too blurry, the KL jumping). The proportional term of a PI
controller reacts to the *change* of the constraint, braking lambda as soon as
the violation starts to shrink; it damps that oscillation and settles faster.
With ``kp = 0`` it is SGD again.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import math

import jax
import jax.numpy as jnp
import optax

from geco_jax._validation import check, is_container

__all__ = ["sgd", "pi", "PIState"]


def _check_learning_rate(learning_rate, name: str) -> bool:
  """Raises unless a positive finite float or a pytree of them; True for a pytree."""
  if not jax.tree_util.tree_leaves(learning_rate):
    raise ValueError(
        f"{name}: learning_rate must be a positive float or a pytree of them; "
        f"got {learning_rate!r}.")
  check(learning_rate, lambda v: v > 0 and math.isfinite(v),
        f"{name}: learning_rate must be positive and finite")
  return is_container(learning_rate)


def _rates_for(learning_rate, per_leaf: bool, updates, name: str):
  """``learning_rate`` as a pytree of ``updates``' structure, or a clear error.

  A step size that does not follow the multipliers' structure, or whose shape
  is neither ``()`` nor its multiplier's, would fail with a bare pytree error
  or silently broadcast the multiplier to a new shape.
  """
  structure = jax.tree_util.tree_structure(updates)
  if per_leaf:
    if jax.tree_util.tree_structure(learning_rate) != structure:
      raise ValueError(
          f"{name}: the learning_rate pytree has structure "
          f"{jax.tree_util.tree_structure(learning_rate)}, but the multipliers have "
          f"{structure}; give one step size per constraint, with the "
          "constraints' structure.")
    rates = learning_rate
  else:
    rates = structure.unflatten([learning_rate] * structure.num_leaves)
  for rate, leaf in zip(jax.tree_util.tree_leaves(rates),
                        jax.tree_util.tree_leaves(updates)):
    if jnp.shape(rate) not in ((), jnp.shape(leaf)):
      raise ValueError(
          f"{name}: a learning rate of shape {jnp.shape(rate)} for a multiplier of "
          f"shape {jnp.shape(leaf)}; give a scalar, or an array of the "
          "multiplier's shape (one step per entry).")
  return rates


def sgd(learning_rate) -> optax.GradientTransformation:
  """Algorithm 1's dual step: ``log lambda <- log lambda + learning_rate * C_ma``.

  Plain gradient descent, ``theta <- theta - learning_rate * g``, with a
  learning rate that may be a float or a pytree of the parameters' structure
  (one step size per constraint). GECO feeds it ``g = -C_ma`` on ``log lambda``.
  """
  per_leaf = _check_learning_rate(learning_rate, "sgd")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    rates = _rates_for(learning_rate, per_leaf, updates, "sgd")
    return jax.tree_util.tree_map(lambda g, lr: -lr * g, updates, rates), state

  return optax.GradientTransformation(init_fn, update_fn)


class PIState(NamedTuple):
  """State of the nuPI controller.

  Attributes:
    count: number of updates so far.
    smoothed_error: xi_{t-1}, the EMA of the error signal (same tree as params).
  """

  count: jax.Array
  smoothed_error: Any


def pi(
    learning_rate,
    kp: float = 1.0,
    ki: float = 1.0,
    ema_nu: float = 0.0,
    init: str = "sgd",
) -> optax.GradientTransformation:
  r"""The nuPI controller (Sohrabi et al., ICML 2024) as an optax transformation.

  With error signal ``e_t`` (the gradient it receives; for GECO ``-C_ma_t``)::

      xi_t         = ema_nu * xi_{t-1} + (1 - ema_nu) * e_t
      theta_{t+1}  = theta_t - learning_rate * (ki * e_t + kp * (xi_t - xi_{t-1}))

  ``ki`` is the integral gain (``kp = 0, ki = 1`` is SGD), ``kp`` the
  proportional gain, acting on the change of the smoothed error. For GECO,
  theta is ``log lambda``, so the multiplier moves by
  ``learning_rate * (ki * C_ma_t + kp * Delta xi_t)`` in log space.

  The proportional steps telescope. After T steps (one learning rate)::

      theta_T = theta_0 - learning_rate * (ki * sum_{t<T} e_t + kp * (xi_{T-1} - xi_{-1}))

  i.e. for GECO ``log lambda_T = log lambda_0 + eta ki sum_t C_ma_t + eta kp
  (Cbar_{T-1} - Cbar_{-1})``, with ``Cbar`` the smoothed constraint and
  ``Cbar_{-1}`` the first batch's (``init='sgd'``) or 0 (``'zeros'``): the
  proportional term only shifts ``log lambda`` by ``eta kp`` times the
  change of the constraint since the start, and brakes SGD's growth by at
  most ``exp(-eta kp Cbar_{-1})`` once the constraint is met. It matters
  only when ``eta kp |Delta C|`` is of order 1: with GECO's summed
  constraints (an RE constraint of an image starts in the hundreds) and
  ``eta`` = 1e-4, ``kp = 1`` moves lambda by a few percent and nuPI is
  Algorithm 1; ``kp`` of order ``1 / (eta C_start)`` or more brakes it.

  Args:
    learning_rate: step size eta (> 0, finite): a float, or a pytree of the
      parameters' structure (one step size per constraint), as for ``sgd``.
    kp: proportional gain (>= 0, finite).
    ki: integral gain (>= 0, finite).
    ema_nu: smoothing of the error for the proportional term, in [0, 1).
      GECO's constraint is already a moving average, so 0 is a good default.
    init: ``'sgd'`` sets ``xi_{-1} = e_0`` so the first step equals SGD with
      ``learning_rate * ki``; ``'zeros'`` sets ``xi_{-1} = 0`` so the first
      step is ``learning_rate * (ki + kp (1 - ema_nu)) e_0``.

  Returns:
    An ``optax.GradientTransformation`` with state ``PIState``.
  """
  # Written so that NaN fails every test (a NaN gain would poison lambda).
  per_leaf = _check_learning_rate(learning_rate, "pi")
  if not (kp >= 0 and ki >= 0 and math.isfinite(kp) and math.isfinite(ki)):
    raise ValueError(
        f"pi: gains must be non-negative and finite; got kp={kp!r}, ki={ki!r}.")
  if kp == 0 and ki == 0:
    raise ValueError("pi: kp and ki are both zero, so lambda would never move.")
  if not 0.0 <= ema_nu < 1.0:
    raise ValueError(f"pi: ema_nu must be in [0, 1); got {ema_nu!r}.")
  if init not in ("sgd", "zeros"):
    raise ValueError(f"pi: init must be 'sgd' or 'zeros'; got {init!r}.")

  def init_fn(params):
    _rates_for(learning_rate, per_leaf, params, "pi")
    return PIState(count=jnp.zeros([], jnp.int32),
                   smoothed_error=jax.tree_util.tree_map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    first = state.count == 0

    def one(error, xi_prev, lr):
      if init == "sgd":
        xi_prev = jnp.where(first, error, xi_prev)
      xi = ema_nu * xi_prev + (1.0 - ema_nu) * error
      step = -lr * (ki * error + kp * (xi - xi_prev))
      return step, xi

    rates = _rates_for(learning_rate, per_leaf, updates, "pi")
    pairs = jax.tree_util.tree_map(one, updates, state.smoothed_error, rates)
    treedef = jax.tree_util.tree_structure(updates)
    steps, xis = zip(*treedef.flatten_up_to(pairs)) if treedef.num_leaves else ((), ())
    return (treedef.unflatten(steps),
            PIState(count=optax.safe_increment(state.count),
                    smoothed_error=treedef.unflatten(xis)))

  return optax.GradientTransformation(init_fn, update_fn)
