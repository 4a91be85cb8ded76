"""geco_jax.ops.fusion.cotangent_barrier: the identity, whose cotangent XLA:CPU keeps.

Values and derivatives (reverse, forward, second order, under vmap) are
checked against the identity's from first principles; the compiled programs
are checked for what the barrier is for: one conditional in the backward pass
and none in the forward pass, and, in ConvDraw's gradient, no fusion that
recomputes the LSTM cell's chain through time (as XLA:CPU did without it).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geco_jax.ops import fusion
from geco_jax.ops.fusion import cotangent_barrier

X = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
W = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)


def _f(x):
  return jnp.sum(W * jnp.tanh(2.0 * cotangent_barrier(x)))


def test_value_is_the_identity():
  np.testing.assert_array_equal(cotangent_barrier(X), X)
  np.testing.assert_array_equal(jax.jit(cotangent_barrier)(X), X)


def test_derivatives_are_the_identitys():
  # d/dx sum(w tanh(2x)) = 2 w (1 - tanh(2x)^2); the Hessian is diagonal.
  tanh = np.tanh(2.0 * np.asarray(X, np.float64))
  expected = 2.0 * np.asarray(W) * (1.0 - tanh**2)
  np.testing.assert_allclose(jax.grad(_f)(X), expected, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(jax.grad(_f))(X), expected, rtol=1e-5)
  _, tangent = jax.jvp(_f, (X,), (W,))
  np.testing.assert_allclose(tangent, np.sum(expected * np.asarray(W)), rtol=1e-5)
  hessian = jax.hessian(_f)(X).reshape(12, 12)
  diagonal = -8.0 * np.asarray(W) * tanh * (1.0 - tanh**2)
  np.testing.assert_allclose(hessian, np.diag(diagonal.reshape(-1)), rtol=1e-4, atol=1e-6)


def test_vmap_dtypes_and_empty_arrays():
  per_row = jax.vmap(jax.grad(lambda x: jnp.sum(jnp.square(cotangent_barrier(x)))))(X)
  np.testing.assert_allclose(per_row, 2.0 * X, rtol=1e-6)
  half = jnp.asarray([1.5, -2.0], jnp.bfloat16)
  grad = jax.grad(lambda x: jnp.sum(3.0 * cotangent_barrier(x).astype(jnp.float32)))(half)
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(grad, np.float32), [3.0, 3.0])
  empty = jnp.zeros((0, 3))
  assert jax.grad(lambda x: jnp.sum(cotangent_barrier(x)))(empty).shape == (0, 3)


def test_sharded_inputs_explicit_and_auto():
  # The predicate must not slice a sharded dimension (an error under explicit
  # sharding); the gradient keeps the input's sharding.
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec

  if len(jax.devices()) < 2:
    pytest.skip("needs two devices (tests/conftest.py forces 8 host devices)")
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 6)), jnp.float32)
  expected = jax.grad(lambda x: jnp.sum(jnp.tanh(2.0 * x)))(x)
  for axis_type in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((2,), ("batch",), axis_types=(axis_type,), devices=jax.devices()[:2])
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
    with jax.set_mesh(mesh):
      grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.tanh(2.0 * cotangent_barrier(x)))))(sharded)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    assert grad.sharding.spec[0] == "batch"


def _conditionals(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().as_text().count(" conditional(")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the barrier acts on XLA:CPU only")
def test_one_conditional_in_the_backward_pass_and_none_forward():
  # A conditional XLA cannot remove is the barrier; if a future XLA folded its
  # predicate, the barrier would silently stop working: this fails instead.
  assert _conditionals(_f, X) == 0
  assert _conditionals(jax.grad(_f), X) == 1


def _largest_fusion_and_gradient(barrier: bool, monkeypatch):
  """The compiled gradient of a T = 8 ConvDraw: its largest fusion's operand count, and it."""
  from geco_jax.models import ConvDraw

  if not barrier:
    monkeypatch.setattr(fusion, "cotangent_barrier", lambda x: x)
  jax.clear_caches()     # ConvDraw's trace must see the (un)patched barrier
  model = ConvDraw(image_shape=(8, 8, 1), num_steps=8, hidden_channels=8, latent_channels=4,
                   read_channels=4, kernel_size=3)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1))
  rng = jax.random.key(1, impl="rbg")
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, rng)

  def loss(params):
    out = model.apply(params, x, rng)
    return jnp.mean(jnp.sum(jnp.square(x - out.reconstruction), axis=(1, 2, 3)) + out.kl)

  grad = jax.jit(jax.grad(loss)).lower(params).compile()
  text = grad.as_text()
  operands = [len(m.split(",")) for m in re.findall(r"\n  %\S+ = \S+ fusion\(([^)]*)\)", text)]
  monkeypatch.undo()
  return max(operands), grad(params)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the barrier acts on XLA:CPU only")
def test_convdraw_gradient_no_longer_fuses_the_cell_chain_through_time(monkeypatch):
  # Without the barrier on the LSTM cell, one fusion per step recomputes the
  # cell's gradient from the last step down (54 operands at T = 8 when this
  # was written, 14 with it); the gradients are the same.
  plain, plain_grads = _largest_fusion_and_gradient(False, monkeypatch)
  barred, grads = _largest_fusion_and_gradient(True, monkeypatch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads, plain_grads)
  assert barred < plain / 2, (barred, plain)


def test_other_platforms_lower_to_the_plain_identity():
  # On an accelerator the backward pass is the identity: no conditional.
  text = jax.jit(jax.grad(_f)).trace(X).lower(lowering_platforms=("cuda",)).as_text()
  assert "bitcast_convert" not in text and "negate" not in text   # the CPU branch's
  assert fusion.__all__ == ["cotangent_barrier"]
