"""Tests of the VAE + NVP model: the flow's maths from first principles, then the VAE interface.

The flow tests use parameters drawn with numpy (``random_params``) rather than ``model.init``:
Flax's initialisers (threefry) compile slowly on the project's shared 2-core CPU (20-30 s per
model measured), and the zero-initialised coupling outputs would make every flow the identity,
so the log-determinant, inverse and density checks would pass trivially. Random coupling
outputs give a clearly non-Gaussian q(z|x) (kurtosis 3.5 to over 20 per axis in 2-D, against 3
for a Gaussian), which those checks need.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geco_jax.models.common import gaussian_kl
from geco_jax.models.vae_nvp import ACCELERATOR_PRESET
from geco_jax.models.vae_nvp import AffineCoupling
from geco_jax.models.vae_nvp import CPU_PRESET
from geco_jax.models.vae_nvp import MICRO_MNIST_PRESET
from geco_jax.models.vae_nvp import VAENVP
from geco_jax.models.vae_nvp import coupling_masks
from geco_jax.models.vae_nvp import standard_normal_log_prob

# These programs are tiny: on the CPU backend most of their compile time goes to LLVM's
# optimisation passes, which buy them nothing (measured: the Adam step compiles in 3.4 s
# instead of 8.4 s, and runs as fast). Per-function options, so nothing global changes.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# Smallest legal sides, and two channels: the model takes any channel count.
IMAGE_SHAPE = (8, 8, 2)


def tiny_model(latent_size, num_couplings=4, image_shape=IMAGE_SHAPE):
  return VAENVP(image_shape=image_shape, latent_size=latent_size, num_couplings=num_couplings,
                channels=(4, 8), hidden_size=16, coupling_hidden_size=16)


def images(batch, seed=0, image_shape=IMAGE_SHAPE):
  # numpy, not jax.random: every new shape would cost a compilation.
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(batch, *image_shape)), jnp.float32)


def random_params(model, x, seed=0, coupling_scale=2.0):
  """LeCun-normal kernels, small random biases; coupling outputs scaled up to bend the flow."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [getattr(key, "key", None) for key in path]
    if names[-1] == "bias":
      value = 0.1 * rng.standard_normal(leaf.shape)
    else:
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    if "output" in names:
      value = coupling_scale * value
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def density_on_grid_2d():
  """log q(z|x) of a 2-D model on a regular grid over [-20, 20]^2, for two images.

  Shared by the normalisation and KL tests (one compilation). Returns the model, its
  parameters, the images, the grid points [n, 2], the cell area and log q [2, n] in float64.
  """
  model = tiny_model(2)
  x = images(2)
  # Seed 1: heavier tails than a Gaussian (kurtosis 3.5-4) that still fit in the box.
  params = random_params(model, x, seed=1)
  axis = np.linspace(-20.0, 20.0, 601)
  points = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
  points = jnp.asarray(points, jnp.float32)
  log_q = fast_jit(lambda p, z, x: model.apply(p, z, x, method=model.log_posterior))(
      params, jnp.broadcast_to(points, (2, *points.shape)), x)
  return model, params, x, points, (axis[1] - axis[0])**2, np.asarray(log_q, np.float64)


# Structure ------------------------------------------------------------------------------------ #


@pytest.mark.parametrize("latent_size", [2, 3, 5, 16])
def test_masks_alternate_and_cover(latent_size):
  masks = np.array(coupling_masks(latent_size, 5))  # [layer, coordinate], 1 = conditioning
  assert masks.shape == (5, latent_size)
  assert np.all(masks.sum(axis=1) >= 1) and np.all(masks.sum(axis=1) <= latent_size - 1)
  np.testing.assert_array_equal(masks[1:], 1 - masks[:-1])  # consecutive layers swap roles
  assert np.all((1 - masks[:2]).sum(axis=0) == 1)  # two layers transform every coordinate once


@pytest.mark.parametrize("kwargs", [
    dict(latent_size=1),
    dict(latent_size=0),
    dict(num_couplings=-1),
    dict(image_shape=(10, 8, 1)),
    dict(max_log_scale=0.0),
])
def test_rejects_invalid_configurations(kwargs):
  model = VAENVP(**{**dict(image_shape=IMAGE_SHAPE, channels=(4, 8), hidden_size=16), **kwargs})
  x = jnp.zeros((1, *model.image_shape))
  with pytest.raises(ValueError):
    jax.eval_shape(model.init, jax.random.key(0), x, jax.random.key(0))


def test_coupling_starts_as_the_identity():
  coupling = AffineCoupling((1, 0, 1, 0, 1), hidden_size=8)
  z = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)
  h = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4)), jnp.float32)
  params = fast_jit(functools.partial(coupling.init, method=coupling.forward))(
      jax.random.key(2), z, h)
  z_out, log_det = coupling.apply(params, z, h, method=coupling.forward)
  np.testing.assert_array_equal(z_out, z)
  np.testing.assert_array_equal(log_det, 0.0)


def test_presets_build_models():
  for preset in (CPU_PRESET, ACCELERATOR_PRESET, MICRO_MNIST_PRESET):
    model = VAENVP(image_shape=(28, 28, 1), **preset)
    x = jnp.zeros((2, 28, 28, 1))
    out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0), x,
                                                     jax.random.key(0)), x, jax.random.key(0))
    assert out.latent.shape == (2, preset["latent_size"])
  assert MICRO_MNIST_PRESET["latent_size"] == 2  # paper Fig. 8 plots the latent plane


# The flow's maths ----------------------------------------------------------------------------- #


@pytest.mark.parametrize("latent_size", [2, 3, 5])
def test_log_det_equals_log_abs_det_of_the_full_jacobian(latent_size):
  model = tiny_model(latent_size)
  params = random_params(model, images(1))
  rng = np.random.default_rng(latent_size)
  # The flow's input: base samples z0 and encoder features h, both just arrays here.
  z0 = jnp.asarray(1.5 * rng.standard_normal((4, latent_size)), jnp.float32)
  h = jnp.asarray(rng.uniform(size=(4, model.hidden_size)), jnp.float32)

  @fast_jit
  def check(params, z0, h):
    _, log_det = model.apply(params, z0, h, method=model.flow_forward)

    def flow_one(z0_i, h_i):
      return model.apply(params, z0_i[None], h_i[None], method=model.flow_forward)[0][0]

    jacobians = jax.vmap(jax.jacfwd(flow_one))(z0, h)  # [batch, L, L]
    return log_det, jnp.linalg.slogdet(jacobians)[1]

  log_det, brute_force = check(params, z0, h)
  assert np.abs(log_det).max() > 0.05  # the flow is not the identity
  np.testing.assert_allclose(log_det, brute_force, atol=1e-4, rtol=1e-4)


def test_density_integrates_to_one_in_2d():
  """sum over a grid of q(z|x) * cell area = 1, for each x: log q is a normalised density."""
  _, _, _, points, cell, log_q = density_on_grid_2d()
  mass = np.exp(log_q).sum(axis=1) * cell
  # The box is wide enough: the band 15 < |z|_inf < 20 already holds under 1e-4 of the mass,
  # and the tails decay, so what lies beyond the box is far below the tolerance.
  band = np.abs(np.asarray(points)).max(axis=1) > 15.0
  assert np.all(np.exp(log_q[:, band]).sum(axis=1) * cell < 1e-4)
  np.testing.assert_allclose(mass, 1.0, atol=1e-3)


def test_inverse_is_exact():
  latent_size = 5  # odd: the halves differ in size
  model = tiny_model(latent_size)
  x = images(4)
  params = random_params(model, x)

  @fast_jit
  def run(params, x, rng):
    z, log_q = model.apply(params, x, rng, 8, method=model.posterior_samples)
    h, mean, log_std = model.apply(params, x, method=model.encode_base)
    z0, inverse_log_det = model.apply(params, z, h, method=model.flow_inverse)
    z_again, forward_log_det = model.apply(params, z0, h, method=model.flow_forward)
    return dict(
        z=z, log_q=log_q, z_again=z_again,
        inverse_log_det=inverse_log_det, forward_log_det=forward_log_det,
        log_posterior=model.apply(params, z, x, method=model.log_posterior),
        base_log_prob=jnp.sum(jax.scipy.stats.norm.logpdf(
            z0, mean[:, None], jnp.exp(log_std)[:, None]), axis=-1))

  out = run(params, x, jax.random.key(1))
  assert np.abs(out["forward_log_det"]).max() > 0.05  # the flow is not the identity
  np.testing.assert_allclose(out["z_again"], out["z"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out["inverse_log_det"], out["forward_log_det"], atol=1e-5)
  np.testing.assert_allclose(out["log_posterior"], out["log_q"], atol=1e-4, rtol=1e-5)
  # log q = log q0(f^{-1}(z)) - log det, with q0 scored by an independent implementation.
  np.testing.assert_allclose(out["log_q"], out["base_log_prob"] - out["inverse_log_det"],
                             atol=1e-4, rtol=1e-5)


# The Monte Carlo KL ----------------------------------------------------------------------------- #


def test_kl_without_couplings_averages_to_the_gaussian_kl():
  model = tiny_model(3, num_couplings=0)
  x = images(1)
  params = random_params(model, x)
  num_samples = 20000

  @fast_jit
  def run(params, x, rng):
    out = model.apply(params, jnp.repeat(x, num_samples, axis=0), rng)
    _, mean, log_std = model.apply(params, x, method=model.encode_base)
    # Per sample, the estimate must be exactly log N(z; mu, sigma) - log N(z; 0, I).
    by_hand = (jnp.sum(jax.scipy.stats.norm.logpdf(out.latent, mean, jnp.exp(log_std)), -1)
               - jnp.sum(jax.scipy.stats.norm.logpdf(out.latent), -1))
    return out.kl, by_hand, gaussian_kl(mean, log_std)[0]

  kl, by_hand, analytic = run(params, x, jax.random.key(1))
  np.testing.assert_allclose(kl, by_hand, atol=1e-4, rtol=1e-5)
  standard_error = float(np.std(kl)) / np.sqrt(num_samples)
  assert abs(float(np.mean(kl)) - float(analytic)) < 4 * standard_error
  assert standard_error < 0.05 * float(analytic)  # the check has teeth


def test_monte_carlo_kl_is_unbiased_against_quadrature():
  """E[log q(z|x) - log pi(z)] from __call__ equals the KL integrated on a 2-D grid."""
  model, params, x, points, cell, log_q = density_on_grid_2d()
  log_q = log_q[0]
  log_prior = np.asarray(standard_normal_log_prob(points), np.float64)
  quadrature_kl = np.sum(np.exp(log_q) * (log_q - log_prior)) * cell

  num_samples = 20000
  out = fast_jit(model.apply)(params, jnp.repeat(x[:1], num_samples, axis=0), jax.random.key(2))
  standard_error = float(np.std(out.kl)) / np.sqrt(num_samples)
  assert abs(float(np.mean(out.kl)) - quadrature_kl) < 4 * standard_error + 1e-3
  assert standard_error < 0.05 * quadrature_kl  # the check has teeth
  assert np.any(out.kl < 0)  # one-sample estimates can be negative; only the mean is a KL


# The VAE interface ----------------------------------------------------------------------------- #


@pytest.mark.parametrize("latent_size", [2, 3, 16])
def test_shapes(latent_size):
  image_shape = (12, 16, 3)  # not square, three channels
  model = tiny_model(latent_size, image_shape=image_shape)
  x = jnp.zeros((5, *image_shape))
  rng = jax.random.key(0)
  params = jax.eval_shape(model.init, rng, x, rng)
  out = jax.eval_shape(model.apply, params, x, rng)
  assert out.reconstruction.shape == x.shape
  assert out.kl.shape == (5,)
  assert out.latent.shape == (5, latent_size)
  z, log_q = jax.eval_shape(functools.partial(
      model.apply, method=model.posterior_samples, num_samples=7), params, x, rng)
  assert z.shape == (5, 7, latent_size) and log_q.shape == (5, 7)
  # Marginal-KL style scoring: many z per x on the middle axes.
  cross = jax.eval_shape(functools.partial(model.apply, method=model.log_posterior),
                         params, z, x)
  assert cross.shape == (5, 7)
  samples = jax.eval_shape(functools.partial(model.apply, method=model.sample, num_samples=6),
                           params, rng)
  assert samples.shape == (6, *image_shape)


def test_reconstructions_and_samples_in_unit_interval():
  image_shape = (12, 16, 3)
  model = tiny_model(2, image_shape=image_shape)
  x = images(5, image_shape=image_shape)
  params = random_params(model, x)

  @fast_jit
  def run(params, x, rng):
    return model.apply(params, x, rng), model.apply(params, rng, 6, method=model.sample)

  out, samples = run(params, x, jax.random.key(1))
  for array in (out.reconstruction, samples):
    assert np.all(np.asarray(array) >= 0.0) and np.all(np.asarray(array) <= 1.0)
  assert np.all(np.isfinite(out.kl))


def test_finite_gradients_and_adam_reduces_negative_elbo():
  model = tiny_model(16)
  x = images(4, seed=5)
  params = random_params(model, x, coupling_scale=0.5)
  pixel_std = 0.3  # fixed likelihood sigma; -ELBO up to a constant

  def negative_elbo(params, rng):
    out = model.apply(params, x, rng)
    squared_error = jnp.sum(jnp.square(x - out.reconstruction), axis=(1, 2, 3))
    return jnp.mean(squared_error / (2 * pixel_std**2) + out.kl)

  tx = optax.adam(3e-3)

  @fast_jit
  def step(params, opt_state, rng):
    loss, grads = jax.value_and_grad(negative_elbo)(params, rng)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  opt_state = fast_jit(tx.init)(params)

  def evaluate(params):
    # step's loss is that of the params it is given: -ELBO on fixed noise, no extra compile.
    return np.mean([step(params, opt_state, jax.random.key(1000 + i))[2] for i in range(8)])

  before = evaluate(params)
  for i in range(30):
    params, opt_state, loss, grads = step(params, opt_state, jax.random.key(i))
    if i == 0:
      leaves = jax.tree_util.tree_leaves_with_path(grads)
      assert all(np.all(np.isfinite(g)) for _, g in leaves)
      coupling_grads = [g for path, g in leaves if "coupling" in jax.tree_util.keystr(path)]
      assert coupling_grads and any(np.abs(g).max() > 0 for g in coupling_grads)
  after = evaluate(params)
  # Uniform-noise images cannot be reconstructed below their variance (about 59 nats here, from
  # 68 at the start), so ask for a clear but modest drop.
  assert np.isfinite(after) and after < 0.95 * before
