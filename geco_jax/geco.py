"""GECO, Algorithm 1 of "Taming VAEs" (Rezende & Viola, 2018), as an optax transform.

GECO minimises the KL of a VAE under expectation inequality constraints
``E[C(x, g(z))] <= 0`` through the Lagrangian (paper Eq. 2)::

    L_lambda = E_x[KL(q(z|x) || pi(z))] + lambda^T E_x E_q[C(x, g(z))],

minimised over the model parameters and maximised over ``lambda >= 0``. Per
training step t, with C_t the batch mean of the constraint (Algorithm 1)::

    C_ma_t  = C_t                                   if t == 0
            = alpha * C_ma_{t-1} + (1 - alpha) * C_t  otherwise
    C_hat_t = C_t + stop_gradient(C_ma_t - C_t)      # value of the average,
                                                     # gradient of the batch
    loss    = KL_t + lambda_{t-1} . C_hat_t          # -> params (any optax optimiser)
    lambda_t = lambda_{t-1} * exp(lambda_lr * C_ma_t)

The last line is gradient ascent on ``log lambda`` with the averaged constraint
as its gradient; it keeps lambda positive. ``log lambda`` is also kept within
``[-LOG_MULTIPLIER_LIMIT, LOG_MULTIPLIER_LIMIT]`` (+-80: lambda within about
[1.8e-35, 5.5e34]), so that lambda, stored as a float32, can neither round to
0 nor overflow to inf, from which ``log lambda`` could never come back.

A batch whose constraint is not finite (NaN or inf, e.g. a diverged step)
leaves the Lagrange state as it was: one bad batch would otherwise make C_ma
and lambda NaN for good. Only the Lagrange state is guarded; to skip the
parameters' update too, wrap the chain in ``optax.apply_if_finite``.

Gradient accumulation: ``optax.MultiSteps`` calls its inner transformation
once per k micro-batches, with the extra arguments of the last one only, so a
GECO inside it would see only the last micro-batch's constraint (and a GECO
outside it would move lambda at every micro-batch). Accumulate inside the step
instead: sum the gradients over the micro-batches (``jax.lax.scan``) and call
``update`` once with the mean of their constraints.

Here the dual update is pluggable:
``dual_optimizer`` is any optax transformation applied to ``log lambda`` with
``-C_ma_t`` as its gradient (optax minimises), the default being SGD with
learning rate ``lambda_lr``, which is the line above exactly.

The transform owns only the Lagrange state; the gradient updates pass through
unchanged, so it can sit anywhere in an ``optax.chain``::

    tx = optax.chain(geco_jax.geco(lambda_lr=1e-2, alpha=0.99, lambda_init=1.0),
                     optax.adam(1e-4))
    opt_state = tx.init(params)

    def loss_fn(params, opt_state, batch, rng):
      kl, constraint = model_terms(params, batch, rng)   # batch means
      return geco_jax.lagrangian(kl, constraint, opt_state), constraint

    (loss, constraint), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, opt_state, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params, constraint=constraint)
    params = optax.apply_updates(params, updates)
    lam = geco_jax.lagrange_multiplier(opt_state)

Several constraints: the constraint is a pytree (e.g. ``{'re': c1, 'cla': c2}``)
and the multiplier, the moving average and, optionally, ``lambda_lr`` follow its
structure. The structure is fixed when the transform is built, by giving
``lambda_init`` (or ``lambda_lr``) as a pytree of that structure, e.g.
``geco(lambda_init={'re': 1.0, 'cla': 1.0})``; a constraint whose structure or
shapes differ from it is an error, never a silent broadcast.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from flax import serialization

from geco_jax import dual
from geco_jax._validation import check, concrete_values, is_container

PyTree = Any
Scalars = Union[float, jax.Array, PyTree]

# |log lambda| is kept at or below this after every update. Beyond about
# +-87 a float32 lambda = exp(log lambda) is 0 or inf, and log(0) = -inf or
# log(inf) = inf is a fixed point of every later update: the multiplier would be
# dead for good (a long stretch of a satisfied constraint with an unbounded
# lambda reaches it). 80 leaves room for lambda * C to stay finite.
LOG_MULTIPLIER_LIMIT = 80.0

__all__ = [
    "LOG_MULTIPLIER_LIMIT",
    "GecoState",
    "geco",
    "lagrangian",
    "lagrange_multiplier",
    "constraint_moving_average",
    "find_geco_state",
]


@dataclasses.dataclass(frozen=True)
class _GecoStatic:
  """Static (hashable, leafless) settings that ``lagrangian`` needs from the state.

  Registered as a pytree node without children, so it lives in the treedef of
  the optimiser state: it survives ``jit``, adds no leaf to checkpoints, and is
  rebuilt from code (not from a checkpoint) on restore.
  """

  axis_name: Optional[Any] = None


jax.tree_util.register_static(_GecoStatic)
serialization.register_serialization_state(
    _GecoStatic,
    lambda static: {},
    lambda static, state_dict: static,
)


class GecoState(NamedTuple):
  """The Lagrange state of GECO; it lives in the optimiser state.

  Attributes:
    count: number of ``update`` calls so far (int32); 0 means the next constraint
      initialises the moving average.
    lagrange_multiplier: lambda_{t}, same structure as the constraint, > 0.
    constraint_ma: C_ma_t, the moving average of the constraint, same structure.
    moving_average_decay: alpha, as an array so that ``lagrangian`` (which only
      sees the state) computes the same average as ``update``; refreshed by
      every ``update``, so a schedule through ``optax.inject_hyperparams`` works.
      (With a scheduled alpha, ``lagrangian``'s value at step t uses the alpha
      of step t - 1, the one the state holds; ``update`` uses step t's. Only
      the loss's value differs, by (alpha_t - alpha_{t-1}) (C_ma_{t-1} - C_t)
      per constraint, times lambda; its gradients, C_ma and lambda do not.)
    dual_state: state of the dual optimiser acting on ``log lambda``.
    static: settings that are not arrays (the data-parallel axis name).
  """

  count: jax.Array
  lagrange_multiplier: PyTree
  constraint_ma: PyTree
  moving_average_decay: jax.Array
  dual_state: optax.OptState
  static: _GecoStatic = _GecoStatic()


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #


def _structure_of(lambda_init, lambda_lr):
  """The constraint structure the transform is built for."""
  trees = [t for t in (lambda_init, lambda_lr) if is_container(t)]
  if len(trees) == 2:
    a, b = (jax.tree_util.tree_structure(t) for t in trees)
    if a != b:
      raise ValueError(
          "lambda_init and lambda_lr are pytrees of different structures: "
          f"{a} and {b}; both must have the structure of the constraint.")
  return trees[0] if trees else None


def _broadcast_to(template, value):
  """``value`` as a pytree of ``template``'s structure (a scalar is repeated)."""
  if is_container(value):
    return value
  return jax.tree_util.tree_map(lambda _: value, template)


def _check_step_shapes(lambda_init, lambda_lr, structure) -> None:
  """A step size per multiplier may be a scalar or have the multiplier's shape;
  any other shape would silently broadcast the multiplier to a new shape."""
  template = structure if structure is not None else 0.0
  inits = jax.tree_util.tree_leaves(_broadcast_to(template, lambda_init))
  steps = jax.tree_util.tree_leaves(_broadcast_to(template, lambda_lr))
  for init, step in zip(inits, steps):
    init_shape, step_shape = jnp.shape(init), jnp.shape(step)
    if step_shape and step_shape != init_shape:
      raise ValueError(
          f"geco: a lambda_lr entry has shape {step_shape} but its multiplier "
          f"(lambda_init) has shape {init_shape}; give one step size per "
          "multiplier as a scalar, or as an array of the multiplier's shape "
          "(e.g. lambda_init=jnp.ones(2) with lambda_lr=jnp.array([0.1, 0.2])).")


def _check_dual_updates(dual_updates, log_lambda) -> None:
  """The dual optimiser must move each multiplier, not reshape it."""
  structure = jax.tree_util.tree_structure(log_lambda)
  ok = jax.tree_util.tree_structure(dual_updates) == structure and all(
      jnp.shape(u) == jnp.shape(l) for u, l in zip(
          jax.tree_util.tree_leaves(dual_updates), jax.tree_util.tree_leaves(log_lambda)))
  if not ok:
    shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)
    raise ValueError(
        "geco: the dual optimiser returned updates of shapes "
        f"{shapes(dual_updates)} for multipliers of shapes {shapes(log_lambda)}; "
        "its step sizes (or other per-parameter settings) must follow the "
        "constraints' structure, with scalars or arrays of each multiplier's shape.")


def _check_constraint(constraint, state: GecoState, where: str) -> None:
  """A clear error, instead of a silent broadcast, for a mismatched constraint."""
  expected = jax.tree_util.tree_structure(state.lagrange_multiplier)
  got = jax.tree_util.tree_structure(constraint)
  if got != expected:
    raise ValueError(
        f"{where}: the constraint has structure {got}, but GECO was built for "
        f"{expected}. Give geco(lambda_init=...) a pytree with the structure of "
        "the constraint, e.g. lambda_init={'re': 1.0, 'cla': 1.0}, and pass the "
        "same structure at every step.")
  for lam, c in zip(jax.tree_util.tree_leaves(state.lagrange_multiplier),
                    jax.tree_util.tree_leaves(constraint)):
    if jnp.shape(c) != jnp.shape(lam):
      raise ValueError(
          f"{where}: a constraint entry has shape {jnp.shape(c)} but its "
          f"multiplier has shape {jnp.shape(lam)}. GECO expects batch means "
          "(reduce per-example constraints with .mean() first).")


# --------------------------------------------------------------------------- #
# The moving average
# --------------------------------------------------------------------------- #


def _moving_average(state: GecoState, batch_constraint):
  """C_ma_t of Algorithm 1, from the state before the step and the batch value C_t."""
  alpha = state.moving_average_decay
  first = state.count == 0
  return jax.tree_util.tree_map(
      lambda ma, c: jnp.where(first, c, alpha * ma + (1.0 - alpha) * c),
      state.constraint_ma, batch_constraint)


def _global_mean(constraint, axis_name):
  if axis_name is None:
    return constraint
  return jax.lax.pmean(constraint, axis_name)


# --------------------------------------------------------------------------- #
# The transform
# --------------------------------------------------------------------------- #


def geco(
    lambda_lr: Optional[Scalars] = None,
    alpha: float = 0.99,
    lambda_init: Scalars = 1.0,
    *,
    lambda_min: Optional[float] = None,
    lambda_max: Optional[float] = None,
    dual_optimizer: Optional[optax.GradientTransformation] = None,
    axis_name: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """GECO's Lagrange-multiplier update (Algorithm 1) as an optax transformation.

  The returned transform passes gradient updates through unchanged; its
  ``update`` takes the batch constraint as the keyword argument ``constraint``
  and advances the moving average and the multiplier.

  Args:
    lambda_lr: step size nu of the multiplicative update
      ``lambda_t = lambda_{t-1} exp(nu C_ma_t)``; a float or a pytree with the
      constraint's structure (one step size per constraint). Defaults to 1e-2.
      Not allowed together with ``dual_optimizer``. Its scale goes with the
      constraint's units: ``log lambda`` moves by ``lambda_lr * C_ma`` per
      step, and an RE constraint is a sum over pixels (hundreds at the start
      of training on 28x28 images), where 1e-4 to 1e-3 is a sensible range
      (the default experiment uses 1e-4). Too large a step makes lambda
      overshoot by orders of magnitude while the moving average lags.
    alpha: decay of the constraint's moving average, in [0, 1) (paper: 0.99);
      0 means no averaging.
    lambda_init: lambda_0 > 0 (paper: 1). A pytree fixes the constraint's
      structure; a float gives one scalar constraint, unless ``lambda_lr`` is a
      pytree, in which case it is used for every constraint.
    lambda_min: optional lower bound on lambda (> 0), applied after each update.
    lambda_max: optional upper bound on lambda. The public GECO implementations
      clamp to about [1e-10, 1e10] against blow-ups. Without bounds, and
      within them, ``log lambda`` is kept within +-``LOG_MULTIPLIER_LIMIT``
      (80), so that lambda stays a positive, finite float32 that can recover.
    dual_optimizer: any optax transformation, applied to ``log lambda`` with
      ``-C_ma_t`` as its gradient. ``None`` is plain SGD with ``lambda_lr``,
      i.e. Algorithm 1; ``geco_jax.dual.pi(...)`` is a PI controller that damps
      the oscillation of lambda.
    axis_name: name of a mapped axis (``pmap``/``shard_map``) over which the
      batch is split. The constraint is then averaged over it inside ``update``,
      and inside ``lagrangian`` for the moving average only (under
      ``stop_gradient``), so every device holds the same multiplier while each
      device's gradient stays its own.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is a ``GecoState``.

  Raises:
    ValueError: alpha outside [0, 1), lambda_lr <= 0, lambda_init <= 0 or
      outside exp(+-LOG_MULTIPLIER_LIMIT), bounds not positive or out of
      order, lambda_init outside the bounds, a ``lambda_lr`` entry whose shape
      is not its multiplier's (it would change the multiplier's shape), or
      both ``lambda_lr`` and ``dual_optimizer`` given.
  """
  if dual_optimizer is not None and lambda_lr is not None:
    raise ValueError(
        "geco: give either lambda_lr (the SGD step of Algorithm 1) or "
        "dual_optimizer, not both.")
  if lambda_lr is None and dual_optimizer is None:
    lambda_lr = 1e-2
  check(alpha, lambda a: 0.0 <= a < 1.0,
         "geco: alpha, the moving-average decay, must be in [0, 1)")
  if lambda_lr is not None:
    check(lambda_lr, lambda v: v > 0 and math.isfinite(v),
           "geco: lambda_lr must be positive and finite")
  check(lambda_init, lambda v: v > 0 and math.isfinite(v),
         "geco: lambda_init must be positive and finite")
  check(lambda_init, lambda v: abs(math.log(v)) <= LOG_MULTIPLIER_LIMIT,
         f"geco: lambda_init must lie within exp(+-{LOG_MULTIPLIER_LIMIT:g}), about "
         f"[{math.exp(-LOG_MULTIPLIER_LIMIT):.1e}, {math.exp(LOG_MULTIPLIER_LIMIT):.1e}]")
  if lambda_min is not None:
    check(lambda_min, lambda v: v > 0, "geco: lambda_min must be positive")
  if lambda_max is not None:
    check(lambda_max, lambda v: v > 0, "geco: lambda_max must be positive")
  if lambda_min is not None and lambda_max is not None:
    lo, hi = concrete_values(lambda_min), concrete_values(lambda_max)
    if lo and hi and lo[0] > hi[0]:
      raise ValueError(
          f"geco: lambda_min ({lo[0]}) must not exceed lambda_max ({hi[0]}).")
  for bound, ok, name in ((lambda_min, lambda v, b: v >= b, "lambda_min"),
                          (lambda_max, lambda v, b: v <= b, "lambda_max")):
    if bound is None:
      continue
    bound_values = concrete_values(bound)
    for v in concrete_values(lambda_init):
      if bound_values and not ok(v, bound_values[0]):
        raise ValueError(
            f"geco: lambda_init ({v}) lies outside the bound {name}="
            f"{bound_values[0]}.")

  structure = _structure_of(lambda_init, lambda_lr)
  if lambda_lr is not None:
    _check_step_shapes(lambda_init, lambda_lr, structure)
  if dual_optimizer is None:
    dual_optimizer = dual.sgd(lambda_lr)
  static = _GecoStatic(axis_name=axis_name)

  def init_fn(params):
    del params
    template = structure if structure is not None else 0.0
    lam = jax.tree_util.tree_map(
        lambda v: jnp.asarray(v, jnp.float32), _broadcast_to(template, lambda_init))
    return GecoState(
        count=jnp.zeros([], jnp.int32),
        lagrange_multiplier=lam,
        constraint_ma=jax.tree_util.tree_map(jnp.zeros_like, lam),
        moving_average_decay=jnp.asarray(alpha, jnp.float32),
        dual_state=dual_optimizer.init(jax.tree_util.tree_map(jnp.log, lam)),
        static=static,
    )

  def update_fn(updates, state, params=None, *, constraint=None, **extra_args):
    del params, extra_args
    if constraint is None:
      raise TypeError(
          "geco's update needs the batch constraint: call "
          "tx.update(grads, opt_state, params, constraint=constraint).")
    _check_constraint(constraint, state, "geco update")
    batch_constraint = jax.tree_util.tree_map(
        lambda c: jnp.asarray(c, jnp.float32),
        _global_mean(jax.lax.stop_gradient(constraint), axis_name))
    # Refresh alpha first so a scheduled alpha is the one used at this step.
    state = state._replace(
        moving_average_decay=jnp.asarray(alpha, jnp.float32))
    constraint_ma = _moving_average(state, batch_constraint)

    # Dual step: gradient ascent on log lambda, i.e. descent with gradient -C_ma.
    log_lambda = jax.tree_util.tree_map(jnp.log, state.lagrange_multiplier)
    dual_grads = jax.tree_util.tree_map(jnp.negative, constraint_ma)
    dual_updates, dual_state = dual_optimizer.update(
        dual_grads, state.dual_state, log_lambda)
    _check_dual_updates(dual_updates, log_lambda)
    log_lambda = optax.apply_updates(log_lambda, dual_updates)
    lo, hi = -LOG_MULTIPLIER_LIMIT, LOG_MULTIPLIER_LIMIT
    if lambda_min is not None:
      lo = jnp.maximum(lo, jnp.log(lambda_min))
    if lambda_max is not None:
      hi = jnp.minimum(hi, jnp.log(lambda_max))
    log_lambda = jax.tree_util.tree_map(lambda v: jnp.clip(v, lo, hi), log_lambda)

    new_state = GecoState(
        count=optax.safe_increment(state.count),
        lagrange_multiplier=jax.tree_util.tree_map(jnp.exp, log_lambda),
        constraint_ma=constraint_ma,
        moving_average_decay=state.moving_average_decay,
        dual_state=dual_state,
        static=state.static,
    )
    # A non-finite constraint (a diverged batch) would make C_ma and lambda NaN
    # in every later step: keep the Lagrange state of the last finite one.
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(c)) for c in
                                  jax.tree_util.tree_leaves(batch_constraint)]))
    new_state = jax.tree_util.tree_map(
        lambda new, old: jnp.where(finite, new, old), new_state,
        state._replace(moving_average_decay=new_state.moving_average_decay))
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- #
# Reading and using the state
# --------------------------------------------------------------------------- #


def find_geco_state(opt_state) -> GecoState:
  """The single ``GecoState`` inside an optimiser state, wherever it sits.

  Works through ``optax.chain``, ``named_chain``, ``multi_transform``,
  ``inject_hyperparams`` and any other nesting of pytrees.

  Raises:
    ValueError: there is no GECO state, or more than one.
  """
  found = [
      leaf for leaf in jax.tree_util.tree_leaves(
          opt_state, is_leaf=lambda x: isinstance(x, GecoState))
      if isinstance(leaf, GecoState)
  ]
  if not found:
    raise ValueError(
        "No GECO state in this optimiser state: build the optimiser with "
        "geco_jax.geco(...) in its chain, e.g. "
        "optax.chain(geco_jax.geco(), optax.adam(1e-4)), and pass its state.")
  if len(found) > 1:
    raise ValueError(
        f"Found {len(found)} GECO states in this optimiser state; there must be "
        "exactly one (put several constraints in one geco transform as a pytree).")
  return found[0]


def lagrange_multiplier(opt_state) -> PyTree:
  """lambda_t, with the structure of the constraint."""
  return find_geco_state(opt_state).lagrange_multiplier


def constraint_moving_average(opt_state) -> PyTree:
  """C_ma_t, the constraint's moving average after the last update."""
  return find_geco_state(opt_state).constraint_ma


def lagrangian(kl, constraint, opt_state) -> jax.Array:
  """The GECO loss ``KL + sum(lambda_{t-1} * C_hat_t)`` (Algorithm 1).

  ``C_hat_t = C_t + stop_gradient(C_ma_t - C_t)``: its value is the new moving
  average C_ma_t, its gradient that of the batch constraint C_t. So the value
  of the loss uses the averaged constraint while its gradient with respect to
  the constraint is lambda_{t-1} (the multiplier before this step's update),
  which is held constant (no gradient flows to lambda).

  Args:
    kl: the batch mean of what GECO minimises, a scalar: KL(q(z|x) || pi(z))
      in the paper. In the rate-constrained form, where the constraint is
      ``constraints.kl_divergence``, a distortion such as the squared error
      ``||x - g(z)||^2``; lambda is then 2 sigma^2 beta of the beta-VAE.
    constraint: the batch mean of each constraint, a scalar or a pytree with
      the structure GECO was built for.
    opt_state: an optimiser state that contains a ``GecoState``.

  Returns:
    The scalar Lagrangian to minimise with respect to the model parameters.
  """
  state = find_geco_state(opt_state)
  _check_constraint(constraint, state, "lagrangian")
  batch_mean = _global_mean(jax.lax.stop_gradient(constraint),
                            state.static.axis_name)
  constraint_ma = _moving_average(state, batch_mean)
  penalty = jax.tree_util.tree_map(
      lambda lam, c, ma: jnp.sum(
          jax.lax.stop_gradient(lam) * (c + jax.lax.stop_gradient(ma - c))),
      state.lagrange_multiplier, constraint, constraint_ma)
  return kl + sum(jax.tree_util.tree_leaves(penalty))
