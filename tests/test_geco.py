"""Tests of geco_jax.geco: Algorithm 1 against a NumPy transcription, and the API around it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import geco_jax
from geco_jax.geco import LOG_MULTIPLIER_LIMIT
from geco_jax.geco import GecoState


def numpy_algorithm_1(constraints, kls, lambda_lr, alpha, lambda_init):
  """Algorithm 1 of the paper, line by line, in NumPy float64.

  Returns per step: the Lagrangian value, d loss / d C (= lambda_{t-1}),
  C_ma_t and lambda_t.
  """
  lam = np.asarray(lambda_init, np.float64)
  ma = None
  out = []
  for t, (c, kl) in enumerate(zip(constraints, kls)):
    ma = c if t == 0 else alpha * ma + (1 - alpha) * c
    c_hat = c + (ma - c)                  # the value of C_hat is the average
    loss = kl + np.sum(lam * c_hat)
    grad_c = lam.copy()                   # its gradient wrt C is lambda_{t-1}
    lam = lam * np.exp(lambda_lr * ma)
    out.append((loss, grad_c, ma.copy(), lam.copy()))
  return out


def _jitted_step(tx):

  @jax.jit
  def step(opt_state, constraint, kl):
    loss, grad_c = jax.value_and_grad(
        lambda c: geco_jax.lagrangian(kl, c, opt_state))(constraint)
    _, opt_state = tx.update({}, opt_state, {}, constraint=constraint)
    return opt_state, loss, grad_c

  return step


@pytest.mark.parametrize("num_constraints", [1, 2])
def test_matches_numpy_algorithm_1_over_200_steps(num_constraints):
  rng = np.random.default_rng(num_constraints)
  steps, lambda_lr, alpha = 200, 0.05, 0.9
  values = rng.normal(0.3, 1.0, size=(steps, num_constraints))
  kls = rng.uniform(0, 10, size=steps)
  if num_constraints == 1:
    tx = geco_jax.geco(lambda_lr=lambda_lr, alpha=alpha, lambda_init=1.0)
    as_tree = lambda v: jnp.float32(v[0])
    from_tree = lambda t: np.array([t])
    lambda_init = np.ones(1)
  else:
    tx = geco_jax.geco(lambda_lr=lambda_lr, alpha=alpha,
                       lambda_init={"re": 1.0, "cla": 2.0})
    as_tree = lambda v: {"re": jnp.float32(v[0]), "cla": jnp.float32(v[1])}
    from_tree = lambda t: np.array([t["re"], t["cla"]])
    lambda_init = np.array([1.0, 2.0])
  expected = numpy_algorithm_1(values, kls, lambda_lr, alpha, lambda_init)

  step = _jitted_step(tx)
  opt_state = tx.init({})
  for t in range(steps):
    opt_state, loss, grad_c = step(opt_state, as_tree(values[t]), jnp.float32(kls[t]))
    e_loss, e_grad, e_ma, e_lam = expected[t]
    np.testing.assert_allclose(loss, e_loss, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(from_tree(grad_c), e_grad, rtol=1e-4)
    np.testing.assert_allclose(
        from_tree(geco_jax.constraint_moving_average(opt_state)), e_ma,
        rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        from_tree(geco_jax.lagrange_multiplier(opt_state)), e_lam, rtol=1e-4)
  assert int(geco_jax.find_geco_state(opt_state).count) == steps


def test_first_step_initialises_the_average_with_the_batch_value():
  tx = geco_jax.geco(lambda_lr=0.1, alpha=0.99)
  state = tx.init({})
  _, state = tx.update({}, state, constraint=jnp.float32(5.0))
  assert float(geco_jax.constraint_moving_average(state)) == 5.0
  np.testing.assert_allclose(geco_jax.lagrange_multiplier(state), np.exp(0.5), rtol=1e-6)
  _, state = tx.update({}, state, constraint=jnp.float32(-5.0))
  np.testing.assert_allclose(geco_jax.constraint_moving_average(state), 4.9, rtol=1e-6)


def test_gradients_pass_through_unchanged():
  grads = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([-1.0, 2.0])}
  tx = geco_jax.geco(lambda_lr=0.1)
  updates, _ = tx.update(grads, tx.init(grads), grads, constraint=jnp.float32(3.0))
  jax.tree_util.tree_map(np.testing.assert_array_equal, updates, grads)

  # In a chain, the result equals the chain without GECO.
  adam = optax.adam(1e-2)
  chained = optax.chain(geco_jax.geco(lambda_lr=0.1), optax.adam(1e-2))
  u1, _ = chained.update(grads, chained.init(grads), grads, constraint=jnp.float32(1.0))
  u2, _ = adam.update(grads, adam.init(grads), grads)
  jax.tree_util.tree_map(np.testing.assert_array_equal, u1, u2)


def test_lagrangian_value_and_gradients():
  tx = geco_jax.geco(lambda_lr=0.1, alpha=0.5, lambda_init=3.0)
  state = tx.init({})
  _, state = tx.update({}, state, constraint=jnp.float32(2.0))   # C_ma = 2
  lam = float(geco_jax.lagrange_multiplier(state))                 # 3 e^0.2

  def loss(kl, c):
    return geco_jax.lagrangian(kl, c, state)

  value = loss(jnp.float32(7.0), jnp.float32(4.0))
  # New average 0.5 * 2 + 0.5 * 4 = 3: value = KL + lambda * 3.
  np.testing.assert_allclose(value, 7.0 + lam * 3.0, rtol=1e-6)
  d_kl, d_c = jax.grad(loss, argnums=(0, 1))(jnp.float32(7.0), jnp.float32(4.0))
  np.testing.assert_allclose(d_kl, 1.0)
  np.testing.assert_allclose(d_c, lam, rtol=1e-6)

  # No gradient flows into the multiplier held in the state.
  def loss_of_lambda(lam):
    return geco_jax.lagrangian(1.0, jnp.float32(4.0),
                               state._replace(lagrange_multiplier=lam))
  assert float(jax.grad(loss_of_lambda)(state.lagrange_multiplier)) == 0.0


def test_gradient_through_a_model_is_lambda_times_constraint_gradient():
  tx = geco_jax.geco(lambda_lr=0.1, lambda_init=2.5)
  state = tx.init({})
  w = jnp.array([0.3, -0.2])

  def loss(w):
    kl = jnp.sum(w ** 2)
    constraint = jnp.sum(jnp.sin(w)) - 0.1
    return geco_jax.lagrangian(kl, constraint, state)

  np.testing.assert_allclose(jax.grad(loss)(w), 2 * w + 2.5 * jnp.cos(w), rtol=1e-6)


def test_lambda_stays_positive_and_within_bounds():
  tx = geco_jax.geco(lambda_lr=1.0, lambda_min=1e-3, lambda_max=1e3)
  state = tx.init({})
  update = jax.jit(lambda s, c: tx.update({}, s, constraint=c)[1])
  lams = []
  for _ in range(50):
    state = update(state, jnp.float32(10.0))
    lams.append(float(geco_jax.lagrange_multiplier(state)))
  assert max(lams) <= 1e3 * (1 + 1e-6) and lams[-1] == pytest.approx(1e3, rel=1e-5)
  for _ in range(3000):
    state = update(state, jnp.float32(-10.0))
    lams.append(float(geco_jax.lagrange_multiplier(state)))
  assert min(lams) > 0
  assert lams[-1] == pytest.approx(1e-3, rel=1e-5)


def test_unbounded_lambda_is_positive_for_large_negative_constraints():
  tx = geco_jax.geco(lambda_lr=1.0, alpha=0.0)
  state = tx.init({})
  for _ in range(5):
    _, state = tx.update({}, state, constraint=jnp.float32(-10.0))
  assert float(geco_jax.lagrange_multiplier(state)) > 0


def test_unbounded_lambda_never_dies_and_comes_back():
  # log lambda moves by lambda_lr * C = -+10 per step (alpha = 0). Without a
  # floor, 9 steps would take a float32 lambda to exp(-90) -> 0 (or exp(+90)
  # -> inf), and log(0) never moves again. With the floor at -80 it sits at
  # exp(-80) and climbs back at +10 per step once the constraint is violated.
  tx = geco_jax.geco(lambda_lr=1.0, alpha=0.0)
  update = jax.jit(lambda s, c: tx.update({}, s, constraint=c)[1])
  state = tx.init({})
  limit = LOG_MULTIPLIER_LIMIT
  assert limit == 80.0
  for _ in range(200):
    state = update(state, jnp.float32(-10.0))
  assert float(geco_jax.lagrange_multiplier(state)) == pytest.approx(np.exp(-limit), rel=1e-5)
  for _ in range(10):
    state = update(state, jnp.float32(10.0))
  assert float(geco_jax.lagrange_multiplier(state)) == pytest.approx(np.exp(20.0), rel=1e-4)
  for _ in range(200):
    state = update(state, jnp.float32(10.0))
  lam = float(geco_jax.lagrange_multiplier(state))
  assert lam == pytest.approx(np.exp(limit), rel=1e-5)
  loss, grad = jax.value_and_grad(
      lambda c: geco_jax.lagrangian(jnp.float32(1.0), c, state))(jnp.float32(10.0))
  assert np.isfinite(loss) and float(grad) == pytest.approx(lam, rel=1e-6)
  for _ in range(3):   # and down again at once
    state = update(state, jnp.float32(-10.0))
  assert float(geco_jax.lagrange_multiplier(state)) == pytest.approx(np.exp(50.0), rel=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_constraint_leaves_the_lagrange_state_as_it_was(bad):
  tx = geco_jax.geco(lambda_lr=0.1, alpha=0.5, lambda_init={"re": 1.0, "cla": 2.0})
  update = jax.jit(lambda state, c: tx.update({}, state, constraint=c)[1])
  state = update(tx.init(None), {"re": 1.0, "cla": -1.0})
  after_bad = update(state, {"re": bad, "cla": -1.0})
  for a, b in zip(jax.tree_util.tree_leaves(after_bad), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(a, b)
  # The next finite batch carries on from the last finite state, by hand:
  # C_ma = 0.5 * 1 + 0.5 * 3 = 2, lambda = exp(0.1) * exp(0.1 * 2).
  state = update(after_bad, {"re": 3.0, "cla": -1.0})
  assert int(state.count) == 2
  np.testing.assert_allclose(state.constraint_ma["re"], 2.0, rtol=1e-6)
  np.testing.assert_allclose(state.lagrange_multiplier["re"], np.exp(0.3), rtol=1e-6)
  np.testing.assert_allclose(state.lagrange_multiplier["cla"], 2 * np.exp(-0.2), rtol=1e-6)


def test_scheduled_alpha_is_used_at_its_step():
  # alpha is 0 at steps 0-1 and 0.9 from step 2 on: the state's average at
  # step 2 is 0.9 * C_ma_1 + 0.1 * C_2 with step 2's alpha; the Lagrangian's
  # value at step 2 is computed before that update, from the state, and uses
  # step 1's alpha (documented in GecoState).
  schedule = lambda count: jnp.where(count >= 2, 0.9, 0.0)
  tx = optax.inject_hyperparams(geco_jax.geco)(lambda_lr=0.1, alpha=schedule)
  state = tx.init({})
  for c in (1.0, 3.0):
    _, state = tx.update({}, state, constraint=jnp.float32(c))
  value = geco_jax.lagrangian(jnp.float32(0.0), jnp.float32(-6.0), state)
  lam = float(geco_jax.lagrange_multiplier(state))
  np.testing.assert_allclose(value, lam * -6.0, rtol=1e-6)     # alpha_1 = 0
  _, state = tx.update({}, state, constraint=jnp.float32(-6.0))
  np.testing.assert_allclose(geco_jax.constraint_moving_average(state),
                             0.9 * 3.0 + 0.1 * -6.0, rtol=1e-6)
  np.testing.assert_allclose(geco_jax.lagrange_multiplier(state),
                             np.exp(0.1 * (1.0 + 3.0 + 2.1)), rtol=1e-5)


def test_lambda_lr_per_constraint():
  tx = geco_jax.geco(lambda_lr={"a": 0.1, "b": 0.2}, alpha=0.0)
  state = tx.init({})
  assert set(geco_jax.lagrange_multiplier(state)) == {"a", "b"}
  _, state = tx.update({}, state, constraint={"a": jnp.float32(1.0), "b": jnp.float32(1.0)})
  lam = geco_jax.lagrange_multiplier(state)
  np.testing.assert_allclose([lam["a"], lam["b"]], np.exp([0.1, 0.2]), rtol=1e-6)


def _run(tx, constraints, params):
  state = tx.init(params)
  update = jax.jit(lambda s, c: tx.update(params, s, params, constraint=c))
  lams = []
  for c in constraints:
    _, state = update(state, c)
    lams.append(geco_jax.lagrange_multiplier(state))
  return state, np.array(lams)


@pytest.mark.parametrize("wrap", ["chain_last", "named_chain", "multi_transform",
                                  "inject_hyperparams"])
def test_works_anywhere_in_optax_combinators(wrap):
  params = {"enc": jnp.ones(2), "dec": jnp.ones(3)}
  constraints = [jnp.float32(v) for v in np.linspace(2, -2, 30)]
  reference = _run(geco_jax.geco(lambda_lr=0.05, alpha=0.9), constraints, params)[1]
  if wrap == "chain_last":
    tx = optax.chain(optax.adam(1e-3), geco_jax.geco(lambda_lr=0.05, alpha=0.9))
  elif wrap == "named_chain":
    tx = optax.named_chain(("geco", geco_jax.geco(lambda_lr=0.05, alpha=0.9)),
                           ("adam", optax.adam(1e-3)))
  elif wrap == "multi_transform":
    tx = optax.multi_transform(
        {"a": optax.chain(geco_jax.geco(lambda_lr=0.05, alpha=0.9), optax.adam(1e-3)),
         "b": optax.sgd(1e-3)},
        {"enc": "a", "dec": "b"})
  else:
    tx = optax.chain(
        optax.inject_hyperparams(geco_jax.geco)(lambda_lr=0.05, alpha=0.9),
        optax.adam(1e-3))
  _, lams = _run(tx, constraints, params)
  np.testing.assert_allclose(lams, reference, rtol=1e-5)


def test_inject_hyperparams_schedule_changes_lambda_lr():
  tx = optax.inject_hyperparams(geco_jax.geco)(lambda_lr=0.1, alpha=0.0)
  state = tx.init({})
  _, state = tx.update({}, state, constraint=jnp.float32(1.0))
  state.hyperparams["lambda_lr"] = jnp.asarray(0.5)
  _, state = jax.jit(lambda s: tx.update({}, s, constraint=jnp.float32(1.0)))(state)
  np.testing.assert_allclose(geco_jax.lagrange_multiplier(state), np.exp(0.6), rtol=1e-6)


def test_serialisation_round_trip():
  tx = optax.chain(geco_jax.geco(lambda_lr=0.1, lambda_init={"re": 1.0, "kl": 2.0}),
                   optax.adam(1e-3))
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for v in (1.0, 2.0, -0.5):
    _, state = tx.update(params, state, params,
                         constraint={"re": jnp.float32(v), "kl": jnp.float32(-v)})
  data = serialization.to_bytes(state)
  restored = serialization.from_bytes(tx.init(params), data)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, state)
  assert isinstance(restored[0], GecoState)


def test_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = optax.chain(geco_jax.geco(lambda_lr=0.1, axis_name=None), optax.adam(1e-3))
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  _, state = tx.update(params, state, params, constraint=jnp.float32(2.0))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"opt_state": state})
  checkpointer.wait_until_finished()
  target = {"opt_state": tx.init(params)}
  restored = checkpointer.restore(tmp_path / "ckpt", target)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored["opt_state"], state)


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.0), "alpha"),
    (dict(alpha=-0.1), "alpha"),
    (dict(lambda_lr=0.0), "lambda_lr"),
    (dict(lambda_lr=-1e-2), "lambda_lr"),
    (dict(lambda_lr={"a": 0.1, "b": -0.1}), "lambda_lr"),
    (dict(lambda_init=0.0), "lambda_init"),
    (dict(lambda_init={"a": 1.0, "b": -2.0}), "lambda_init"),
    (dict(lambda_min=10.0, lambda_max=1.0), "lambda_min"),
    (dict(lambda_min=-1.0), "lambda_min"),
    (dict(lambda_min=2.0), "lambda_init"),
    (dict(lambda_lr=0.1, dual_optimizer=optax.sgd(0.1)), "not both"),
    (dict(lambda_init={"a": 1.0}, lambda_lr={"b": 0.1}), "structure"),
    (dict(lambda_init=1e-40), "lambda_init must lie within"),
    (dict(lambda_init=1e36), "lambda_init must lie within"),
    (dict(lambda_lr=np.array([0.1, 0.2])), "shape"),
    (dict(lambda_init=np.ones(3), lambda_lr=np.array([0.1, 0.2])), "shape"),
])
def test_bad_hyperparameters_raise_when_built(kwargs, match):
  with pytest.raises(ValueError, match=match):
    geco_jax.geco(**kwargs)


def test_update_without_constraint_names_the_argument():
  tx = optax.chain(geco_jax.geco(), optax.adam(1e-3))
  params = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match="constraint="):
    tx.update(params, tx.init(params), params)


def test_constraint_structure_change_is_an_error():
  tx = geco_jax.geco(lambda_init={"re": 1.0, "cla": 1.0})
  state = tx.init({})
  with pytest.raises(ValueError, match="structure"):
    tx.update({}, state, constraint={"re": jnp.float32(1.0)})
  with pytest.raises(ValueError, match="structure"):
    geco_jax.lagrangian(0.0, jnp.float32(1.0), state)
  scalar = geco_jax.geco().init({})
  with pytest.raises(ValueError, match="lambda_init="):
    geco_jax.geco().update({}, scalar, constraint={"a": 1.0, "b": 2.0})


def test_per_example_constraint_is_an_error_not_a_broadcast():
  tx = geco_jax.geco()
  with pytest.raises(ValueError, match="batch means"):
    tx.update({}, tx.init({}), constraint=jnp.ones(16))
  with pytest.raises(ValueError, match="batch means"):
    geco_jax.lagrangian(0.0, jnp.ones(16), tx.init({}))


def test_missing_or_duplicate_state_is_reported():
  with pytest.raises(ValueError, match="No GECO state"):
    geco_jax.lagrange_multiplier(optax.adam(1e-3).init({"w": jnp.ones(2)}))
  tx = optax.chain(geco_jax.geco(), geco_jax.geco())
  with pytest.raises(ValueError, match="exactly one"):
    geco_jax.lagrangian(0.0, 1.0, tx.init({}))


# --------------------------------------------------------------------------- #
# Data parallel
# --------------------------------------------------------------------------- #


def _toy_problem(seed=0, batch=64, dim=5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, dim)).astype(np.float32)
  y = (x @ rng.normal(size=dim) + 0.1 * rng.normal(size=batch)).astype(np.float32)
  params = {"w": jnp.zeros(dim), "b": jnp.zeros(())}
  return params, x, y


def _terms(params, x, y):
  prediction = x @ params["w"] + params["b"]
  kl = jnp.mean(jnp.sum(jnp.square(params["w"])) + 0.0 * prediction)
  constraint = {"re": jnp.mean(jnp.square(prediction - y)) - 0.05,
                "mag": jnp.mean(jnp.abs(prediction)) - 2.0}
  return kl, constraint


def test_data_parallel_equals_single_device():
  devices = jax.devices()
  assert len(devices) == 8, "conftest asks for 8 host devices"
  params, x, y = _toy_problem()
  make_tx = lambda axis: optax.chain(
      geco_jax.geco(lambda_lr=0.05, alpha=0.9, lambda_init={"re": 1.0, "mag": 1.0},
                    axis_name=axis),
      optax.adam(1e-2))

  def loss_fn(params, opt_state, x, y):
    kl, constraint = _terms(params, x, y)
    return geco_jax.lagrangian(kl, constraint, opt_state), constraint

  # One device, global batch.
  tx1 = make_tx(None)

  @jax.jit
  def step1(params, opt_state, x, y):
    (_, constraint), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, opt_state, x, y)
    updates, opt_state = tx1.update(grads, opt_state, params, constraint=constraint)
    return optax.apply_updates(params, updates), opt_state

  # Eight devices, each a slice of the batch.
  tx8 = make_tx("batch")

  @functools.partial(jax.pmap, axis_name="batch")
  def step8(params, opt_state, x, y):
    (_, constraint), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, opt_state, x, y)
    grads = jax.lax.pmean(grads, "batch")
    updates, opt_state = tx8.update(grads, opt_state, params, constraint=constraint)
    return optax.apply_updates(params, updates), opt_state

  p1, s1 = params, tx1.init(params)
  replicate = lambda t: jax.tree_util.tree_map(lambda v: jnp.stack([v] * 8), t)
  p8, s8 = replicate(params), replicate(tx8.init(params))
  xs, ys = x.reshape(8, -1, x.shape[-1]), y.reshape(8, -1)
  for _ in range(20):
    p1, s1 = step1(p1, s1, x, y)
    p8, s8 = step8(p8, s8, xs, ys)
    lam1 = geco_jax.lagrange_multiplier(s1)
    lam8 = geco_jax.lagrange_multiplier(s8)
    for key in lam1:
      # Every device holds the same multiplier, equal to the single-device one.
      np.testing.assert_array_equal(lam8[key], np.full(8, lam8[key][0]))
      np.testing.assert_allclose(lam8[key][0], lam1[key], rtol=1e-5)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6), p8, p1)
