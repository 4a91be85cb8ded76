"""geco_jax.ops.conv.valid_convolution: XLA's stride-1 VALID convolution, whose
kernel gradient XLA:CPU computes as matrix products.

Values and first derivatives are checked against a direct sum over the taps
in float64 (first principles), forward mode and second order against
``lax.conv_general_dilated``; the compiled programs are checked for what the
op is for: on the CPU the kernel gradient is dots, not a convolution.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from geco_jax.ops import conv
from geco_jax.ops.conv import valid_convolution

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _xla(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DIMENSIONS)


def _direct(x, kernel, g):
  """y, dL/dx and dL/dk of L = <g, y> by sums over the taps, in float64."""
  x, kernel, g = (np.asarray(a, np.float64) for a in (x, kernel, g))
  kh, kw = kernel.shape[:2]
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  y = np.zeros(g.shape)
  dx = np.zeros(x.shape)
  dk = np.zeros(kernel.shape)
  for i in range(kh):
    for j in range(kw):
      window = x[:, i:i + ho, j:j + wo, :]
      y += np.einsum("nhwc,co->nhwo", window, kernel[i, j])
      dx[:, i:i + ho, j:j + wo, :] += np.einsum("nhwo,co->nhwc", g, kernel[i, j])
      dk[i, j] = np.einsum("nhwc,nhwo->co", window, g)
  return y, dx, dk


def _arrays(x_shape, kernel_shape, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
  kh, kw, _, out = kernel_shape
  g = jnp.asarray(rng.normal(size=(x_shape[0], x_shape[1] - kh + 1, x_shape[2] - kw + 1, out)),
                  jnp.float32)
  return x, kernel, g


# (x, kernel): the first two are the conv VAE's decoder convolutions (the
# slices form and the shifts form), then other kernel sizes, a kernel as
# large as the image and a 1 x 1 kernel.
SHAPES = [((3, 9, 9, 32), (2, 2, 32, 64)), ((3, 16, 16, 16), (2, 2, 16, 4)),
          ((2, 7, 6, 5), (3, 2, 5, 3)), ((2, 5, 5, 3), (5, 5, 3, 2)),
          ((2, 4, 3, 2), (1, 1, 2, 3))]


@pytest.mark.parametrize("x_shape,kernel_shape", SHAPES)
def test_values_and_gradients_are_the_direct_sums(x_shape, kernel_shape):
  x, kernel, g = _arrays(x_shape, kernel_shape)
  y, vjp = jax.vjp(valid_convolution, x, kernel)
  dx, dk = vjp(g)
  y_expected, dx_expected, dk_expected = _direct(x, kernel, g)
  scale = lambda a: np.abs(a).max()  # noqa: E731
  np.testing.assert_allclose(y, y_expected, atol=1e-5 * scale(y_expected))
  np.testing.assert_allclose(dx, dx_expected, atol=1e-5 * scale(dx_expected))
  np.testing.assert_allclose(dk, dk_expected, atol=1e-5 * scale(dk_expected))
  # Only the kernel, only x, and under jit: the same numbers.
  np.testing.assert_allclose(jax.grad(lambda k: jnp.vdot(g, valid_convolution(x, k)))(kernel),
                             dk_expected, atol=1e-5 * scale(dk_expected))
  np.testing.assert_allclose(jax.jit(jax.grad(lambda x: jnp.vdot(g, valid_convolution(x, kernel))))(x),
                             dx_expected, atol=1e-5 * scale(dx_expected))


def test_both_forms_are_used_and_agree():
  # Slices where copying x's windows is the smaller copy, shifts (few output
  # channels) otherwise; both are the kernel tangent of the same linear map.
  for x_shape, kernel_shape in SHAPES[:2]:
    x, kernel, _ = _arrays(x_shape, kernel_shape, seed=1)
    expected = _xla(x, kernel)
    for form in (conv._kernel_tangent_by_slices, conv._kernel_tangent_by_shifts):
      np.testing.assert_allclose(form(x, kernel), expected, rtol=1e-5, atol=1e-4)
  (x1, k1), (x2, k2) = [(jnp.zeros(a), jnp.zeros(b)) for a, b in SHAPES[:2]]
  slices = jax.make_jaxpr(conv._kernel_tangent_by_dots)(x1, k1)
  shifts = jax.make_jaxpr(conv._kernel_tangent_by_dots)(x2, k2)
  assert sum(e.primitive.name == "dot_general" for e in slices.eqns) == 4
  assert sum(e.primitive.name == "dot_general" for e in shifts.eqns) == 1


def test_forward_mode_and_second_order_are_xlas():
  x, kernel, _ = _arrays((2, 6, 5, 3), (2, 3, 3, 4))
  dx, dk = 0.3 * x[::-1], 0.7 * kernel[::-1]
  _, tangent = jax.jvp(valid_convolution, (x, kernel), (dx, dk))
  _, expected = jax.jvp(_xla, (x, kernel), (dx, dk))
  np.testing.assert_allclose(tangent, expected, rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
  for argnum in (0, 1):
    hessian = jax.hessian(loss(valid_convolution), argnum)(x, kernel)
    np.testing.assert_allclose(hessian, jax.hessian(loss(_xla), argnum)(x, kernel),
                               rtol=1e-4, atol=1e-5)


def test_vmap_and_dtypes():
  x, kernel, g = _arrays((4, 6, 6, 3), (2, 2, 3, 5))
  per_example = jax.vmap(jax.grad(lambda x, k: jnp.sum(jnp.sin(valid_convolution(x[None], k))),
                                  argnums=1), in_axes=(0, None))(x, kernel)
  expected = jax.vmap(jax.grad(lambda x, k: jnp.sum(jnp.sin(_xla(x[None], k))), argnums=1),
                      in_axes=(0, None))(x, kernel)
  np.testing.assert_allclose(per_example, expected, rtol=1e-5, atol=1e-5)
  half = jax.grad(lambda k: jnp.sum(valid_convolution(x.astype(jnp.bfloat16), k)
                                    .astype(jnp.float32)))(kernel.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32),
                             _direct(x, kernel, jnp.ones_like(g))[2], rtol=3e-2, atol=0.1)


def _count(text: str, op: str) -> int:
  return text.count(f" {op}(")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the dots are XLA:CPU's only")
def test_the_kernel_gradient_is_dots_on_the_cpu():
  # If a future JAX or XLA turned the dots back into a convolution, the op
  # would silently lose its speed: this fails instead.
  x, kernel, g = _arrays((3, 9, 9, 32), (2, 2, 32, 64))
  for form in (valid_convolution, _xla):
    # x and g are arguments: closed over, XLA would fold the whole gradient.
    kernel_grad = jax.jit(jax.grad(lambda k, x, g, f=form: jnp.vdot(g, f(x, k))))
    text = kernel_grad.lower(kernel, x, g).compile().as_text()
    if form is valid_convolution:
      assert _count(text, "convolution") == 0 and _count(text, "dot") >= 1, text
    else:
      assert _count(text, "convolution") == 1, text
  # The input gradient stays one convolution; no kernel-gradient work.
  input_grad = jax.jit(jax.grad(lambda x, k, g: jnp.vdot(g, valid_convolution(x, k))))
  text = input_grad.lower(x, kernel, g).compile().as_text()
  assert _count(text, "convolution") == 1 and _count(text, "dot") == 0, text


def test_other_platforms_keep_xlas_kernel_gradient():
  x, kernel, g = _arrays((3, 9, 9, 32), (2, 2, 32, 64))
  kernel_grad = jax.jit(jax.grad(lambda k, x, g: jnp.sum(g * valid_convolution(x, k))))
  text = kernel_grad.trace(kernel, x, g).lower(lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.convolution" in text and "dot_general" not in text, text


def test_sharded_batch_explicit_and_auto():
  # The dots contract over the batch; a batch-sharded x must not need a
  # reshape that explicit sharding refuses, for either form.
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec

  if len(jax.devices()) < 2:
    pytest.skip("needs two devices (tests/conftest.py forces 8 host devices)")
  for kernel_shape in ((2, 2, 8, 16), (2, 2, 8, 2)):
    x, kernel, _ = _arrays((4, 9, 9, 8), kernel_shape, seed=2)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
    expected = jax.grad(loss(_xla), (0, 1))(x, kernel)
    for axis_type in (AxisType.Explicit, AxisType.Auto):
      mesh = jax.make_mesh((2,), ("batch",), axis_types=(axis_type,), devices=jax.devices()[:2])
      sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
      # Replicated, as the trainer's parameters are (an uncommitted kernel is
      # refused under explicit sharding by XLA's own convolution too).
      replicated = jax.device_put(kernel, NamedSharding(mesh, PartitionSpec()))
      with jax.set_mesh(mesh):
        dx, dk = jax.jit(jax.grad(loss(valid_convolution), (0, 1)))(sharded, replicated)
      np.testing.assert_allclose(dx, expected[0], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(dk, expected[1], rtol=1e-5, atol=1e-4)
      assert dx.sharding.spec[0] == "batch"


@pytest.mark.parametrize("x_shape,kernel_shape,message", [
    ((2, 5, 5), (2, 2, 3, 4), "x \\[batch, height, width, channels\\]"),
    ((2, 5, 5, 3), (2, 2, 2, 4), "input channels \\(2\\) differ from x's channels \\(3\\)"),
    ((2, 3, 5, 3), (4, 2, 3, 4), "a 4 x 2 kernel does not fit in a 3 x 5 image"),
])
def test_bad_shapes_are_one_clear_error(x_shape, kernel_shape, message):
  with pytest.raises(ValueError, match=message):
    valid_convolution(jnp.zeros(x_shape), jnp.zeros(kernel_shape))
  assert conv.__all__ == ["valid_convolution"]
