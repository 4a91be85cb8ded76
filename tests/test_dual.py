"""Tests of geco_jax.dual: SGD and nuPI, alone and as GECO's dual optimiser."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import geco_jax
from geco_jax import dual


# --------------------------------------------------------------------------- #
# sgd
# --------------------------------------------------------------------------- #


def test_sgd_scalar_learning_rate():
  tx = dual.sgd(0.1)
  grads = {"a": jnp.float32(2.0), "b": jnp.array([-1.0, 0.5], jnp.float32)}
  state = tx.init(grads)
  updates, new_state = jax.jit(tx.update)(grads, state)
  np.testing.assert_allclose(updates["a"], -0.2, rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [0.1, -0.05], rtol=1e-6)
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)


def test_sgd_per_leaf_learning_rate():
  tx = dual.sgd({"a": 0.1, "b": 0.5})
  grads = {"a": jnp.float32(2.0), "b": jnp.array([-1.0, 0.5], jnp.float32)}
  updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
  np.testing.assert_allclose(updates["a"], -0.2, rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [0.5, -0.25], rtol=1e-6)
  # Applied to a parameter: theta - lr * g, per leaf.
  params = optax.apply_updates({"a": jnp.float32(1.0), "b": jnp.zeros(2)}, updates)
  np.testing.assert_allclose(params["a"], 0.8, rtol=1e-6)
  np.testing.assert_allclose(params["b"], [0.5, -0.25], rtol=1e-6)


@pytest.mark.parametrize("learning_rate", [
    0.0, -0.1, float("inf"), float("nan"), None, {}, {"a": 0.1, "b": -0.1},
    {"a": 0.1, "b": float("inf")}, jnp.float32(0.0),
])
def test_sgd_bad_learning_rate(learning_rate):
  with pytest.raises(ValueError, match="learning_rate"):
    dual.sgd(learning_rate)


# --------------------------------------------------------------------------- #
# pi
# --------------------------------------------------------------------------- #


def numpy_nu_pi(errors, theta_0, learning_rate, kp, ki, ema_nu, init):
  """nuPI, line by line in NumPy float64, on one array of parameters.

  xi_t = nu xi_{t-1} + (1 - nu) e_t; theta_{t+1} = theta_t - lr (ki e_t +
  kp (xi_t - xi_{t-1})), with xi_{-1} = e_0 ('sgd') or 0 ('zeros').
  Returns the update and theta_{t+1} of every step.
  """
  theta = np.asarray(theta_0, np.float64)
  xi_prev = None
  steps, thetas = [], []
  for t, e in enumerate(errors):
    e = np.asarray(e, np.float64)
    if t == 0:
      xi_prev = e if init == "sgd" else np.zeros_like(e)
    xi = ema_nu * xi_prev + (1 - ema_nu) * e
    step = -learning_rate * (ki * e + kp * (xi - xi_prev))
    theta = theta + step
    xi_prev = xi
    steps.append(step)
    thetas.append(theta.copy())
  return np.array(steps), np.array(thetas)


@pytest.mark.parametrize("kp,ki,ema_nu,init", [
    (1.0, 1.0, 0.0, "sgd"),
    (2.0, 0.5, 0.9, "zeros"),
    (0.5, 1.0, 0.5, "sgd"),
    (3.0, 0.0, 0.3, "zeros"),
    (0.0, 2.0, 0.0, "zeros"),
])
def test_pi_matches_numpy_over_100_steps(kp, ki, ema_nu, init):
  learning_rate, steps = 0.05, 100
  rng = np.random.default_rng(17)
  errors = {"a": rng.normal(size=(steps,)), "b": rng.normal(size=(steps, 3))}
  theta_0 = {"a": 0.3, "b": np.array([-1.0, 0.0, 2.0])}
  tx = dual.pi(learning_rate, kp=kp, ki=ki, ema_nu=ema_nu, init=init)
  params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), theta_0)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  got_steps, got_params = {"a": [], "b": []}, {"a": [], "b": []}
  for t in range(steps):
    grads = {k: jnp.asarray(v[t], jnp.float32) for k, v in errors.items()}
    params, state, updates = step(params, state, grads)
    for k in ("a", "b"):
      got_steps[k].append(np.asarray(updates[k]))
      got_params[k].append(np.asarray(params[k]))
  for k in ("a", "b"):
    want_steps, want_params = numpy_nu_pi(errors[k], theta_0[k], learning_rate,
                                          kp, ki, ema_nu, init)
    np.testing.assert_allclose(np.array(got_steps[k]), want_steps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(got_params[k]), want_params, rtol=1e-5,
                               atol=1e-5)
  assert int(state.count) == steps


def test_pi_takes_one_learning_rate_per_constraint():
  """A pytree of step sizes: each leaf moves as a scalar controller with its own."""
  rates = {"a": 0.05, "b": 2e-3}
  rng = np.random.default_rng(5)
  errors = {"a": rng.normal(size=(30,)), "b": rng.normal(size=(30, 3))}
  theta_0 = {"a": 0.3, "b": np.array([-1.0, 0.0, 2.0])}
  tx = dual.pi(rates, kp=2.0, ki=1.0, ema_nu=0.5, init="zeros")
  params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), theta_0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  got = {"a": [], "b": []}
  for t in range(30):
    updates, state = update({k: jnp.asarray(v[t], jnp.float32) for k, v in errors.items()},
                            state)
    params = optax.apply_updates(params, updates)
    for k in got:
      got[k].append(np.asarray(params[k]))
  for k, rate in rates.items():
    _, want = numpy_nu_pi(errors[k], theta_0[k], rate, 2.0, 1.0, 0.5, "zeros")
    np.testing.assert_allclose(np.array(got[k]), want, rtol=1e-5, atol=1e-6)
  for bad in ({"a": 0.1, "b": 0.0}, {"a": float("nan"), "b": 0.1}, {}):
    with pytest.raises(ValueError, match="pi: learning_rate"):
      dual.pi(bad)


def test_pi_first_step_by_hand():
  e0 = jnp.float32(2.0)
  # 'sgd': xi_{-1} = e_0, so the first step is SGD with lr * ki.
  tx = dual.pi(0.1, kp=3.0, ki=0.5, init="sgd")
  updates, state = tx.update(e0, tx.init(e0))
  np.testing.assert_allclose(updates, -0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(state.smoothed_error, 2.0)
  # 'zeros': xi_{-1} = 0, so lr (ki + kp (1 - nu)) e_0.
  tx = dual.pi(0.1, kp=3.0, ki=0.5, ema_nu=0.5, init="zeros")
  updates, state = tx.update(e0, tx.init(e0))
  np.testing.assert_allclose(updates, -0.1 * (0.5 + 3.0 * 0.5) * 2.0, rtol=1e-6)
  np.testing.assert_allclose(state.smoothed_error, 1.0)
  # Second step: xi_1 = 0.5 * 1 + 0.5 * (-1) = 0, change -1:
  # -0.1 * (0.5 * (-1) + 3 * (-1)) = 0.35.
  updates, state = tx.update(jnp.float32(-1.0), state)
  np.testing.assert_allclose(updates, 0.35, rtol=1e-6)
  assert int(state.count) == 2


@pytest.mark.parametrize("init", ["sgd", "zeros"])
@pytest.mark.parametrize("ema_nu", [0.0, 0.7])
def test_pi_with_kp_zero_and_ki_one_is_sgd(init, ema_nu):
  pi, sgd = dual.pi(0.03, kp=0.0, ki=1.0, ema_nu=ema_nu, init=init), dual.sgd(0.03)
  rng = np.random.default_rng(3)
  params = {"x": jnp.zeros(4)}
  pi_state, sgd_state = pi.init(params), sgd.init(params)
  pi_update, sgd_update = jax.jit(pi.update), jax.jit(sgd.update)
  for _ in range(20):
    grads = {"x": jnp.asarray(rng.normal(size=4), jnp.float32)}
    u_pi, pi_state = pi_update(grads, pi_state)
    u_sgd, sgd_state = sgd_update(grads, sgd_state)
    np.testing.assert_allclose(u_pi["x"], u_sgd["x"], rtol=1e-7, atol=0)


@pytest.mark.parametrize("kwargs", [
    dict(learning_rate=0.0), dict(learning_rate=-1.0),
    dict(learning_rate=float("inf")), dict(learning_rate=float("nan")),
    dict(kp=-1.0), dict(ki=-0.5), dict(kp=float("nan")), dict(ki=float("inf")),
    dict(kp=0.0, ki=0.0),
    dict(ema_nu=1.0), dict(ema_nu=-0.1), dict(ema_nu=float("nan")),
    dict(init="ones"), dict(init=None),
])
def test_pi_bad_arguments(kwargs):
  kwargs = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError):
    dual.pi(**kwargs)


def test_pi_good_edge_arguments():
  for kwargs in (dict(kp=0.0), dict(ki=0.0), dict(ema_nu=0.0), dict(ema_nu=0.99)):
    dual.pi(0.1, **kwargs)


# --------------------------------------------------------------------------- #
# As GECO's dual optimiser
# --------------------------------------------------------------------------- #


def _log_lambdas(tx, constraints):
  """log lambda after each GECO update with the given batch constraints."""
  state = tx.init({})
  update = jax.jit(lambda s, c: tx.update({}, s, constraint=c)[1])
  out = []
  for c in constraints:
    state = update(state, jax.tree_util.tree_map(jnp.float32, c))
    out.append(jax.tree_util.tree_map(
        lambda v: float(np.log(v)), geco_jax.lagrange_multiplier(state)))
  return out


def test_geco_with_pi_hand_values():
  constraints = [1.0, 0.5, -0.2]
  # alpha = 0.5: C_ma = 1, 0.75, 0.275; the error GECO feeds is e = -C_ma.
  # SGD (Algorithm 1): log lambda += 0.1 C_ma: 0.1, 0.175, 0.2025.
  np.testing.assert_allclose(
      _log_lambdas(geco_jax.geco(lambda_lr=0.1, alpha=0.5), constraints),
      [0.1, 0.175, 0.2025], rtol=1e-5)

  # PI, kp = 2, ki = 1, 'sgd' init, nu = 0 (xi_t = e_t):
  #   t=0: xi_{-1} = e_0, step 0.1 * 1                          -> 0.1
  #   t=1: 0.1 * (0.75 + 2 * (0.75 - 1))     =  0.025            -> 0.125
  #   t=2: 0.1 * (0.275 + 2 * (0.275 - 0.75)) = -0.0675          -> 0.0575
  tx = geco_jax.geco(alpha=0.5, dual_optimizer=dual.pi(0.1, kp=2.0, ki=1.0))
  np.testing.assert_allclose(_log_lambdas(tx, constraints), [0.1, 0.125, 0.0575],
                             rtol=1e-5)

  # PI, kp = 2, ki = 1, nu = 0.5, 'zeros' init, lambda_0 = 2:
  #   t=0: xi_0 = -0.5, step -0.1 * (-1 + 2 * (-0.5))               =  0.2
  #   t=1: xi_1 = -0.625, step -0.1 * (-0.75 + 2 * (-0.125))        =  0.1
  #   t=2: xi_2 = -0.45, step -0.1 * (-0.275 + 2 * 0.175)           = -0.0075
  tx = geco_jax.geco(alpha=0.5, lambda_init=2.0,
                     dual_optimizer=dual.pi(0.1, kp=2.0, ki=1.0, ema_nu=0.5,
                                            init="zeros"))
  np.testing.assert_allclose(np.array(_log_lambdas(tx, constraints)) - np.log(2.0),
                             [0.2, 0.3, 0.2925], rtol=1e-5, atol=1e-6)


def test_geco_with_pi_on_several_constraints():
  tx = geco_jax.geco(alpha=0.5, lambda_init={"re": 1.0, "kl": 1.0},
                     dual_optimizer=dual.pi(0.1, kp=2.0, ki=1.0))
  constraints = [{"re": 1.0, "kl": -1.0}, {"re": 0.5, "kl": -1.0},
                 {"re": -0.2, "kl": -1.0}]
  got = _log_lambdas(tx, constraints)
  # 're' as in the scalar case; 'kl' has a constant C_ma = -1, so no
  # proportional term: -0.1 per step. Each leaf keeps its own PI state.
  np.testing.assert_allclose([g["re"] for g in got], [0.1, 0.125, 0.0575], rtol=1e-5)
  np.testing.assert_allclose([g["kl"] for g in got], [-0.1, -0.2, -0.3], rtol=1e-5)


@pytest.mark.parametrize("make", [dual.sgd, dual.pi])
def test_step_sizes_must_follow_the_multipliers(make):
  # One multiplier with two step sizes would silently turn lambda into a
  # vector on the first update; a pytree missing a constraint would fail with a
  # bare pytree error. Both are one clear error, whichever dual.
  cases = (
      (jnp.array([0.1, 0.2]), 1.0, "shape \\(2,\\) for a multiplier of shape \\(\\)"),
      ({"a": 0.1}, {"a": 1.0, "b": 1.0}, "structure"),
      ({"a": jnp.array([0.1, 0.2]), "b": 0.1}, {"a": jnp.ones(3), "b": 1.0}, "shape"),
  )
  for rate, lambda_init, match in cases:
    tx = geco_jax.geco(dual_optimizer=make(rate), lambda_init=lambda_init)
    with pytest.raises(ValueError, match=match):
      state = tx.init(None)
      tx.update({}, state, constraint=jax.tree_util.tree_map(jnp.ones_like,
                                                             state.lagrange_multiplier))
  # Arrays of each multiplier's shape are one step per entry.
  tx = geco_jax.geco(dual_optimizer=make(jnp.array([0.1, 0.2])), lambda_init=jnp.ones(2))
  _, state = tx.update({}, tx.init(None), constraint=jnp.ones(2))
  np.testing.assert_allclose(state.lagrange_multiplier, np.exp([0.1, 0.2]), rtol=1e-6)


def test_geco_checks_any_dual_optimizers_updates():
  tx = geco_jax.geco(dual_optimizer=optax.scale(-jnp.array([0.1, 0.2])))
  with pytest.raises(ValueError, match="dual optimiser returned updates of shapes"):
    tx.update({}, tx.init(None), constraint=jnp.float32(1.0))


def test_geco_rejects_lambda_lr_with_dual_optimizer():
  with pytest.raises(ValueError, match="not both"):
    geco_jax.geco(lambda_lr=0.1, dual_optimizer=dual.pi(0.1))


# --------------------------------------------------------------------------- #
# Why PI: a closed loop in which the constraint reacts to lambda with a lag
# --------------------------------------------------------------------------- #

_LOG_LAMBDA_STAR = 2.0


@functools.partial(jax.jit, static_argnums=(0, 1))
def _closed_loop(tx, steps=400, gain=1.0, lag=0.1):
  """GECO driving a first-order plant; returns log lambda_t and C_t per step.

  The constraint the "model" reaches at a fixed multiplier is
  ``f(lambda) = gain * (log lambda* - log lambda)``, decreasing in lambda and
  met (zero) at ``lambda*``; the model approaches it with a lag,
  ``C_{t+1} = C_t + lag * (f(lambda_t) - C_t)``, as a network does over many
  steps of its own optimiser. It starts at its equilibrium for ``lambda_0 = 1``.
  """

  def f(state):
    """The constraint the model would settle at under the current multiplier."""
    log_lambda = jnp.log(geco_jax.lagrange_multiplier(state))
    return gain * (_LOG_LAMBDA_STAR - log_lambda)

  def step(carry, _):
    """One GECO update on the current constraint, then one plant step."""
    state, c = carry
    _, state = tx.update({}, state, constraint=c)
    c = c + lag * (f(state) - c)
    return (state, c), (jnp.log(geco_jax.lagrange_multiplier(state)), c)

  state = tx.init({})
  _, (log_lambdas, cs) = jax.lax.scan(step, (state, f(state)), None, length=steps)
  return log_lambdas, cs


def _overshoot_and_variation(log_lambdas):
  """Peak of log lambda above log lambda*, and its total variation once it got there."""
  crossed = int(np.argmax(log_lambdas >= _LOG_LAMBDA_STAR))
  assert log_lambdas[crossed] >= _LOG_LAMBDA_STAR, "never reached lambda*"
  overshoot = float(log_lambdas.max() - _LOG_LAMBDA_STAR)
  variation = float(np.abs(np.diff(log_lambdas[crossed:])).sum())
  return overshoot, variation


def _settling_step(log_lambdas, band=0.05):
  """First step after which log lambda stays within ``band`` of log lambda*."""
  outside = np.nonzero(np.abs(log_lambdas - _LOG_LAMBDA_STAR) > band)[0]
  return int(outside[-1]) + 1 if outside.size else 0


def test_pi_damps_the_oscillation_of_lambda():
  sgd = geco_jax.geco(lambda_lr=0.5, alpha=0.5)
  pi = geco_jax.geco(alpha=0.5, dual_optimizer=dual.pi(0.5, kp=8.0, ki=1.0))
  sgd_log_lambdas, sgd_cs = map(np.asarray, _closed_loop(sgd))
  pi_log_lambdas, pi_cs = map(np.asarray, _closed_loop(pi))

  # Both settle at lambda*, where the constraint is met.
  for log_lambdas, cs in ((sgd_log_lambdas, sgd_cs), (pi_log_lambdas, pi_cs)):
    assert abs(log_lambdas[-1] - _LOG_LAMBDA_STAR) < 1e-2
    assert abs(cs[-1]) < 1e-2

  sgd_overshoot, sgd_variation = _overshoot_and_variation(sgd_log_lambdas)
  pi_overshoot, pi_variation = _overshoot_and_variation(pi_log_lambdas)
  # SGD, a pure integral controller, overshoots lambda* by more than e^2 and
  # then oscillates; the proportional term brakes it well before.
  assert sgd_overshoot > 2.0
  assert pi_overshoot < 0.25 * sgd_overshoot
  assert pi_variation < 0.2 * sgd_variation
  assert _settling_step(pi_log_lambdas) < 0.5 * _settling_step(sgd_log_lambdas)


@pytest.mark.parametrize("init", ["sgd", "zeros"])
@pytest.mark.parametrize("ema_nu", [0.0, 0.6])
def test_pi_proportional_steps_telescope(init, ema_nu):
  """The closed form of the docstring, from first principles: T steps of nuPI
  sum to -lr (ki sum_t e_t + kp (xi_{T-1} - xi_{-1})), xi the EMA of e from
  xi_{-1} = e_0 ('sgd') or 0 ('zeros'), recomputed here in float64."""
  lr, kp, ki = 0.01, 40.0, 0.7
  tx = dual.pi(lr, kp=kp, ki=ki, ema_nu=ema_nu, init=init)
  errors = np.random.default_rng(5).normal(size=(30, 3)) * 20.0
  state = tx.init(jnp.zeros(3))
  theta = np.zeros(3)
  for e in errors:
    update, state = tx.update(jnp.asarray(e, jnp.float32), state)
    theta += np.asarray(update, np.float64)
  xi = errors[0] if init == "sgd" else np.zeros(3)
  xi_first = xi.copy()
  for e in errors:
    xi = ema_nu * xi + (1 - ema_nu) * e
  expected = -lr * (ki * errors.sum(axis=0) + kp * (xi - xi_first))
  np.testing.assert_allclose(theta, expected, rtol=1e-4, atol=1e-5)
