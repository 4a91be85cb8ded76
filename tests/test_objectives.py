"""The ELBO baselines' pieces against first principles."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from geco_jax import objectives


def test_gaussian_nll_is_the_sum_of_per_pixel_normal_log_densities():
  rng = np.random.default_rng(0)
  x, g = rng.random((3, 4, 4, 1)), rng.random((3, 4, 4, 1))
  sigma = 0.3
  expected = -np.sum(np.log(np.exp(-(x - g) ** 2 / (2 * sigma ** 2))
                            / (sigma * math.sqrt(2 * math.pi))), axis=(1, 2, 3))
  np.testing.assert_allclose(objectives.gaussian_nll(jnp.asarray(x, jnp.float32),
                                                     jnp.asarray(g, jnp.float32), sigma),
                             expected, rtol=1e-5)
  kl = jnp.asarray([1.0, 2.0, 3.0])
  np.testing.assert_allclose(objectives.negative_elbo(jnp.asarray(x, jnp.float32),
                                                      jnp.asarray(g, jnp.float32), kl, sigma),
                             expected + np.array([1.0, 2.0, 3.0]), rtol=1e-5)


def test_optimal_sigma_nll_is_the_minimum_over_sigma():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.random((8, 6, 6, 1)), jnp.float32)
  g = jnp.asarray(np.clip(np.asarray(x) + 0.1 * rng.standard_normal(x.shape), 0, 1),
                  jnp.float32)
  best = float(objectives.optimal_sigma_nll(x, g))
  sigma_star = float(jnp.sqrt(jnp.mean(jnp.square(x - g))))
  assert best == pytest.approx(float(jnp.mean(objectives.gaussian_nll(x, g, sigma_star))),
                               rel=1e-5)
  for factor in (0.5, 0.9, 1.1, 2.0):
    assert best < float(jnp.mean(objectives.gaussian_nll(x, g, factor * sigma_star)))


def test_gqn_annealing_is_linear_from_2_to_0_7_then_held():
  sigma = lambda t: float(objectives.annealed_sigma(t, num_steps=200_000))  # noqa: E731
  assert sigma(0) == pytest.approx(2.0)
  assert sigma(100_000) == pytest.approx(1.35)
  assert sigma(200_000) == pytest.approx(0.7)
  assert sigma(1_000_000) == pytest.approx(0.7)


@pytest.mark.parametrize("kwargs", [dict(sigma_start=0.0), dict(num_steps=0)])
def test_bad_schedules_are_errors(kwargs):
  with pytest.raises(ValueError):
    objectives.annealed_sigma(0, **kwargs)


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="differ in shape"):
    objectives.gaussian_nll(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 1.0)
