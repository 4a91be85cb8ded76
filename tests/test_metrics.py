"""Tests of geco_jax.metrics against float64 references and known answers.

References are written from the definitions (paper notes, section 6) with the
Python ``math`` module in float64, never by calling the implementation. The
marginal-KL known answers use Gaussian posteriors whose aggregate is an
analytic Gaussian; their tolerances come from the estimator's Monte Carlo
standard error and its first-order bias, derived in each test.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geco_jax import metrics as M
from geco_jax.models.common import gaussian_kl

_LEVELS = np.arange(256) / 255.0          # every 8-bit value, one per bin


# --------------------------------------------------------------------------- #
# float64 reference of the quantized normal
# --------------------------------------------------------------------------- #


def _log_phi(t):
  """log Phi(t) in float64: erfc where it does not underflow, else Mills' series."""
  if t > 5.0:
    return math.log1p(-0.5 * math.erfc(t / math.sqrt(2.0)))
  if t > -30.0:
    return math.log(0.5 * math.erfc(-t / math.sqrt(2.0)))
  u = 1.0 / (t * t)          # at |t| >= 30 the omitted terms are below 1e-18
  series = 1 - u + 3 * u**2 - 15 * u**3 + 105 * u**4 - 945 * u**5 + 10395 * u**6
  return -0.5 * t * t - math.log(-t) - 0.5 * math.log(2 * math.pi) + math.log(series)


def _reference_log_prob(x, mu, sigma, num_bins=256):
  """log P(8-bit bin of x) under N(mu, sigma^2), edge bins open, in float64."""
  k = round(x * (num_bins - 1))
  half = 0.5 / (num_bins - 1)
  centre = k / (num_bins - 1)
  lo = -math.inf if k == 0 else (centre - half - mu) / sigma
  hi = math.inf if k == num_bins - 1 else (centre + half - mu) / sigma
  if lo + hi > 0:                 # mirror a bin above the mean into the lower half
    lo, hi = -hi, -lo
  if lo == -math.inf:
    return _log_phi(hi)
  if hi <= 0:                     # both edges in the lower tail
    log_hi, log_lo = _log_phi(hi), _log_phi(lo)
    return log_hi + math.log1p(-math.exp(log_lo - log_hi))
  # The bin straddles the mean: a difference of two moderate erf values.
  return math.log(0.5 * (math.erf(hi / math.sqrt(2)) - math.erf(lo / math.sqrt(2))))


_log_prob = jax.jit(M.quantized_normal_log_prob, static_argnames="num_bins")


def _all_bins(mu, sigma, num_bins=256):
  x = (np.arange(num_bins) / (num_bins - 1)).astype(np.float32)
  return np.asarray(_log_prob(x, np.float32(mu), np.float32(sigma), num_bins=num_bins),
                    np.float64)


# --------------------------------------------------------------------------- #
# Quantized normal
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("mu", [-0.5, 0.0, 0.3, 0.5, 1.0, 1.5, 5.0])
@pytest.mark.parametrize("sigma", [1e-5, 1e-3, 0.05, 1.0, 1e3, 1e6])
def test_quantized_normal_sums_to_one_over_the_256_bins(mu, sigma):
  log_p = _all_bins(mu, sigma)
  assert np.all(np.isfinite(log_p)) and np.all(log_p <= 1e-6)
  # Each bin is accurate to ~1e-6 relative (test below); so is the sum.
  assert abs(np.sum(np.exp(log_p)) - 1.0) < 3e-6


@pytest.mark.parametrize("num_bins", [2, 3, 16])
def test_quantized_normal_sums_to_one_for_other_bit_depths(num_bins):
  for mu, sigma in [(0.4, 0.1), (-1.0, 0.5), (0.9, 1e-3)]:
    log_p = _all_bins(mu, sigma, num_bins)
    assert abs(np.sum(np.exp(log_p)) - 1.0) < 3e-6


@pytest.mark.parametrize("mu", [0.0, 0.3, 0.5, 0.77, 1.0, -0.2, 1.2])
@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.1, 0.3, 1.0])
def test_quantized_normal_matches_float64_reference(mu, sigma):
  log_p = _all_bins(mu, sigma)
  reference = np.array([_reference_log_prob(x, mu, sigma) for x in _LEVELS])
  # float32 keeps ~7 digits of values up to |log P| ~ 1e3 here.
  np.testing.assert_allclose(log_p, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mu, sigma", [(5.0, 1e-3), (5.0, 1e-2), (-3.0, 1e-3),
                                       (1.7, 1e-3), (0.5, 1e-3), (0.25, 3e-3)])
def test_quantized_normal_far_tails_are_finite_and_accurate(mu, sigma):
  log_p = _all_bins(mu, sigma)
  assert np.all(np.isfinite(log_p))
  reference = np.array([_reference_log_prob(x, mu, sigma) for x in _LEVELS])
  # log P reaches -1e7 here; float32 holds it to ~6e-8 relative.
  error = np.abs(log_p - reference) / np.maximum(1.0, np.abs(reference))
  assert error.max() < 2e-5, (error.max(), _LEVELS[error.argmax()])
  assert reference.min() < -1e3        # the case does reach far into a tail


def test_quantized_normal_is_accurate_for_means_on_bin_edges_at_tiny_sigma():
  # A mean on a bin edge puts |d log P / dt| at its largest near log P ~ -1.
  # Computed plainly, 255 * mean rounds by up to 7.6e-6 bins in float32 (half
  # an ulp in [128, 256)), 3e-4 standard deviations at sigma = 1e-4: errors
  # of 2.4e-4 in log P. The exact offset keeps them at float32 rounding.
  sigma = np.float32(1e-4)
  rng = np.random.default_rng(0)
  means = np.concatenate([(np.arange(100, 256) - 0.5) / 255,
                          rng.uniform(0.0, 1.0, 100)]).astype(np.float32)
  worst = 0.0
  for mu in means:
    bins = np.clip(np.round(mu * 255) + np.arange(-2, 3), 0, 255)
    x = (bins / 255).astype(np.float32)
    got = np.asarray(_log_prob(x, mu, sigma), np.float64)
    reference = np.array([_reference_log_prob(float(v), float(mu), float(sigma))
                          for v in x])
    error = np.abs(got - reference) / np.maximum(1.0, np.abs(reference))
    worst = max(worst, error.max())
  assert worst < 1e-5, worst


def test_quantized_normal_huge_and_tiny_sigma():
  # sigma >> 1: every interior bin has probability ~ w phi(0) / sigma.
  log_p = _all_bins(0.5, 1e4)
  expected = math.log(1 / 255 / 1e4 / math.sqrt(2 * math.pi))
  np.testing.assert_allclose(log_p[1:-1], expected, atol=1e-5)
  np.testing.assert_allclose(log_p[[0, -1]], math.log(0.5), atol=1e-4)
  # sigma << 1/255: the bin holding the mean gets everything.
  log_p = _all_bins(100 / 255 + 1e-4, 1e-6)
  assert abs(log_p[100]) < 1e-6 and log_p[99] < -1e3 and log_p[101] < -1e3


def test_quantized_normal_gradients_are_finite():
  x = jnp.asarray(_LEVELS, jnp.float32)
  grad = jax.jit(jax.grad(lambda mu, s: jnp.sum(M.quantized_normal_log_prob(x, mu, s)),
                          argnums=(0, 1)))
  for mu in [-0.3, 0.0, 0.5, 0.5 + 0.5 / 255, 1.0, 5.0]:
    for sigma in [1e-4, 1e-3, 0.05, 1.0, 1e3]:
      g_mu, g_sigma = grad(jnp.float32(mu), jnp.float32(sigma))
      assert np.isfinite(g_mu) and np.isfinite(g_sigma), (mu, sigma)
  # And they are the right gradients: central differences of the float64
  # reference at a moderate point (bins 50..89, mu = 0.27, sigma = 0.08).
  g_mu, g_sigma = jax.jit(jax.grad(
      lambda mu, s: jnp.sum(M.quantized_normal_log_prob(x[50:90], mu, s)),
      argnums=(0, 1)))(0.27, 0.08)
  def reference(mu, sigma):
    return sum(_reference_log_prob(v, mu, sigma) for v in _LEVELS[50:90])
  step = 1e-6
  np.testing.assert_allclose(
      g_mu, (reference(0.27 + step, 0.08) - reference(0.27 - step, 0.08)) / (2 * step),
      rtol=1e-3)
  np.testing.assert_allclose(
      g_sigma, (reference(0.27, 0.08 + step) - reference(0.27, 0.08 - step)) / (2 * step),
      rtol=1e-3)


def test_quantized_normal_nll_is_per_example_sum_and_bits_per_dim():
  rng = np.random.default_rng(0)
  x = (rng.integers(0, 256, size=(3, 4, 4, 2)) / 255).astype(np.float32)
  g = rng.uniform(size=x.shape).astype(np.float32)
  nll_fn = jax.jit(M.quantized_normal_nll)
  nll = np.asarray(nll_fn(x, g, 0.2))
  reference = [-sum(_reference_log_prob(float(a), float(b), 0.2)
                    for a, b in zip(x[i].ravel(), g[i].ravel())) for i in range(3)]
  np.testing.assert_allclose(nll, reference, rtol=1e-5)
  np.testing.assert_allclose(M.bits_per_dim(nll, 32), nll / (32 * math.log(2)), rtol=1e-6)
  np.testing.assert_allclose(M.bits_per_dim(32 * math.log(2) * 3.0, 32), 3.0, rtol=1e-6)
  # Off-centre data is scored as the 8-bit value it rounds to.
  nudged = np.clip(x + 0.3 / 255, 0, 1).astype(np.float32)
  np.testing.assert_allclose(nll_fn(nudged, g, 0.2), nll, rtol=1e-6)


def test_reconstruction_metrics():
  rng = np.random.default_rng(1)
  x = (rng.integers(0, 256, size=(4, 6, 6, 1)) / 255).astype(np.float32)
  g = np.clip(x + rng.normal(size=x.shape) * np.array([0.01, 0.05, 0.1, 0.2])[:, None,
                                                                            None, None],
              0, 1).astype(np.float32)
  m = jax.jit(functools.partial(M.reconstruction_metrics, tolerance=0.08))(x, g, 0.1)
  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  np.testing.assert_allclose(m["rmse"], np.sqrt(np.mean((x64 - g64) ** 2, axis=(1, 2, 3))),
                             rtol=1e-5)
  reference = [-sum(_reference_log_prob(float(a), float(b), 0.1)
                    for a, b in zip(x[i].ravel(), g[i].ravel())) for i in range(4)]
  np.testing.assert_allclose(m["nll"], reference, rtol=1e-5)
  np.testing.assert_allclose(m["nll_per_dim"], m["nll"] / 36, rtol=1e-6)
  np.testing.assert_allclose(m["bits_per_dim"], m["nll"] / 36 / math.log(2), rtol=1e-6)
  np.testing.assert_allclose(m["reconstruction_error"],
                             np.sum((x64 - g64) ** 2, axis=(1, 2, 3)) - 36 * 0.08 ** 2,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(m["satisfied"], np.asarray(m["rmse"]) <= 0.08)
  assert 0 < np.sum(m["satisfied"]) < 4
  assert set(jax.eval_shape(M.reconstruction_metrics, x, g, 0.1)) == {
      "rmse", "nll", "nll_per_dim", "bits_per_dim"}


# --------------------------------------------------------------------------- #
# sigma*
# --------------------------------------------------------------------------- #


def test_optimal_sigma_is_the_global_rmse_and_streams():
  rng = np.random.default_rng(2)
  x = rng.uniform(size=(10, 5, 5, 3)).astype(np.float32)
  g = (x + rng.normal(size=x.shape) * 0.07).astype(np.float32)
  rmse = math.sqrt(np.mean((x.astype(np.float64) - g) ** 2))
  np.testing.assert_allclose(M.optimal_sigma(*M.squared_error_sum(x, g)), rmse, rtol=1e-6)
  total, count = 0.0, 0
  for part in (slice(0, 3), slice(3, 4), slice(4, 10)):
    s, n = M.squared_error_sum(x[part], g[part])
    total, count = total + float(s), count + n
  assert count == x.size
  np.testing.assert_allclose(M.optimal_sigma(total, count), rmse, rtol=1e-6)
  # It maximises the continuous Gaussian likelihood sum log N(x; g, sigma^2).
  def gaussian_nll(sigma):
    return x.size * math.log(sigma) + total / (2 * sigma ** 2)
  for factor in (0.9, 0.99, 1.01, 1.1):
    assert gaussian_nll(rmse) < gaussian_nll(rmse * factor)


def _quantized_data(noise, seed, size=(200, 500)):
  """8-bit data x = round(255 (mu + noise)) / 255 around continuous means mu in [0.2, 0.8]."""
  rng = np.random.default_rng(seed)
  mu = rng.uniform(0.2, 0.8, size=size)
  x = np.round((mu + rng.normal(size=size) * noise) * 255) / 255
  return x.astype(np.float32), mu.astype(np.float32)


def test_quantized_nll_at_sigma_star_beats_other_sigmas():
  # Away from the edge bins and with bins much narrower than sigma, the
  # quantized NLL is the Gaussian NLL up to O((w / sigma)^2) terms, so sigma*
  # should beat any sigma a few percent away (a 3% change costs ~1e-3 nats per
  # value; the quantized optimum is only w^2 / (24 sigma*^2) ~ 3e-4 below it).
  x, mu = _quantized_data(0.05, 3)
  sigma_star = float(M.optimal_sigma(*M.squared_error_sum(x, mu)))
  mean_nll = jax.jit(lambda x, mu, s: jnp.mean(M.quantized_normal_nll(x, mu, s)))
  at_star = float(mean_nll(x, mu, sigma_star))
  for factor in (0.5, 0.8, 0.9, 0.97, 1.03, 1.1, 1.25, 2.0):
    assert at_star < float(mean_nll(x, mu, sigma_star * factor)), factor


def test_quantized_optimum_is_sigma_star_with_sheppards_correction():
  # What is *not* true: sigma* is the continuous MLE, and 8-bit data carries
  # the rounding variance w^2 / 12 in its squared error, so the quantized
  # likelihood peaks at sqrt(sigma*^2 - w^2 / 12) (Sheppard), visibly below
  # sigma* when sigma* is a few bins wide (here 1.8% below).
  w = 1 / 255
  x, mu = _quantized_data(1.5 * w, 4)
  sigma_star = float(M.optimal_sigma(*M.squared_error_sum(x, mu)))
  sheppard = math.sqrt(sigma_star ** 2 - w ** 2 / 12)
  grad = jax.jit(jax.grad(lambda s, x, mu: jnp.mean(M.quantized_normal_nll(x, mu, s))))
  slope = lambda s: grad(s, x, mu)        # noqa: E731
  assert float(slope(sigma_star)) > 0           # sigma* is past the optimum
  lo, hi = 0.9 * sigma_star, sigma_star         # bisect d NLL / d sigma = 0
  assert float(slope(lo)) < 0
  for _ in range(30):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if float(slope(mid)) < 0 else (lo, mid)
  optimum = 0.5 * (lo + hi)
  # The quantized MLE and the corrected moment estimate agree far better than
  # the 1.8% gap to sigma* (both estimate the same sigma from the same 1e5
  # values; the correction is exact to O((w / sigma)^4)).
  assert abs(optimum / sheppard - 1) < 3e-3, (optimum, sheppard, sigma_star)
  assert sigma_star / optimum - 1 > 0.01


# --------------------------------------------------------------------------- #
# Average KL
# --------------------------------------------------------------------------- #


def test_average_kl():
  kl = jnp.array([1.0, 2.0, 6.0])
  np.testing.assert_allclose(M.average_kl(kl), 3.0)
  np.testing.assert_allclose(M.average_kl(kl, latent_size=4), 0.75)


# --------------------------------------------------------------------------- #
# Marginal KL
# --------------------------------------------------------------------------- #


def _gaussian_set(n, d, s, tau, seed):
  """Posteriors N(m_j, s^2 I) with m_j ~ N(0, (tau^2 - s^2) I): aggregate N(0, tau^2 I)."""
  rng = np.random.default_rng(seed)
  mean = rng.normal(size=(n, d)) * math.sqrt(tau ** 2 - s ** 2)
  return mean.astype(np.float32), np.full((n, d), math.log(s), np.float32)


def _chi2_bias(n, d, s, tau):
  """First-order bias (E_x E_q(z|x)[q(z|x) / q(z)] - 1) / (2N) of the estimators.

  For q(z|x) = N(m, s^2 I) with m ~ N(0, (tau^2 - s^2) I) the expectation is
  (tau / s)^(2d) (a Gaussian integral, per dimension tau^2 / s^2).
  """
  return ((tau / s) ** (2 * d) - 1) / (2 * n)


# Compiled once per shape and setting inside the library.
_gaussian_mkl = M.marginal_kl_gaussian


def test_marginal_kl_is_zero_when_the_aggregate_is_the_prior():
  n, d, s = 2000, 2, 0.7
  mean, log_std = _gaussian_set(n, d, s, 1.0, 5)
  keep = _gaussian_mkl(mean, log_std, jax.random.key(0))
  loo = _gaussian_mkl(mean, log_std, jax.random.key(0), leave_one_out=True)
  bias = _chi2_bias(n, d, s, 1.0)               # 8e-4
  # Expected: +bias with the self term, -bias without; tolerance 4 standard
  # errors (~3e-3), itself far below the average KL of -d log s = 0.71 nats.
  assert abs(float(keep.kl) - bias) < 4 * float(keep.standard_error)
  assert abs(float(loo.kl) + bias) < 4 * float(loo.standard_error)
  assert float(loo.kl) < float(keep.kl)
  average = float(M.average_kl(gaussian_kl(mean, log_std)))
  np.testing.assert_allclose(average, -d * math.log(s), rtol=0.05)
  assert average > 100 * abs(float(keep.kl))


def test_marginal_kl_matches_the_analytic_kl_of_a_wider_aggregate():
  # Aggregate N(0, tau^2 I) vs prior N(0, I): KL = d/2 (tau^2 - 1 - log tau^2).
  n, d, s, tau = 4000, 2, 0.75, 1.5
  mean, log_std = _gaussian_set(n, d, s, tau, 6)
  truth = d / 2 * (tau ** 2 - 1 - math.log(tau ** 2))          # 0.439 nats
  result = _gaussian_mkl(mean, log_std, jax.random.key(1), num_samples=4)
  # Each term has variance d (tau^2 - 1)^2 / 2 = 1.6, so with 16000 samples
  # the standard error is ~0.01; the bias is (2^4 - 1) / 8000 = 0.002.
  assert 0.005 < float(result.standard_error) < 0.02
  error = float(result.kl) - truth - _chi2_bias(n, d, s, tau)
  assert abs(error) < 4 * float(result.standard_error), (float(result.kl), truth)


def test_marginal_kl_of_separated_posteriors_is_average_kl_minus_log_n():
  # Narrow posteriors that never overlap: KL(q_N || pi) sits at its lower
  # bound, average KL - log N, although the population aggregate is exactly
  # the prior (true marginal KL 0): the finite-N upward bias, 30 nats here.
  n, d, s = 1000, 8, 0.01
  mean, log_std = _gaussian_set(n, d, s, 1.0, 7)
  average = float(M.average_kl(gaussian_kl(mean, log_std)))
  keep = _gaussian_mkl(mean, log_std, jax.random.key(2))
  gap = float(keep.kl) - (average - math.log(n))
  assert -4 * float(keep.standard_error) < gap < 4 * float(keep.standard_error) + 0.01
  # Leaving the self term out, nothing covers the samples: hugely negative.
  loo = _gaussian_mkl(mean, log_std, jax.random.key(2), leave_one_out=True)
  assert float(loo.kl) < -100


def test_marginal_kl_of_posteriors_narrower_than_float32_resolves():
  # s = e^-25 ~ 1e-11 around means of order 1 (GECO at lambda_max): z = mean
  # + s eps rounds to the mean in float32, so rescoring z_s under its own
  # posterior sees eps = 0 and overstates the self term by |eps|^2 / 2, d / 2
  # on average. The self term from the drawn noise keeps the estimate at the
  # separated-posterior value, average KL - log N, to Monte Carlo error.
  n, d = 200, 16
  mean = np.random.default_rng(5).uniform(-1, 1, (n, d)).astype(np.float32)
  log_std = np.full((n, d), -25.0, np.float32)
  average = float(M.average_kl(gaussian_kl(mean, log_std)))
  result = _gaussian_mkl(mean, log_std, jax.random.key(4))
  gap = float(result.kl) - (average - math.log(n))
  assert abs(gap) < 4 * float(result.standard_error) + 0.01, (gap, result)
  assert float(result.standard_error) < 0.5          # the rescored one is off by d / 2 = 8


def test_marginal_kl_own_log_posterior_replaces_the_self_term():
  n, d, m = 6, 3, 2
  mean, log_std = _gaussian_set(n, d, 0.3, 1.0, 9)
  eps = np.random.default_rng(10).normal(size=(n, m, d)).astype(np.float32)
  samples = (mean[:, None] + np.exp(log_std)[:, None] * eps).reshape(-1, d)
  owners = np.repeat(np.arange(n), m).astype(np.int32)
  mean_j, log_std_j = jnp.asarray(mean), jnp.asarray(log_std)

  def log_q(z, j):
    std = jnp.exp(log_std_j[j])
    return jnp.sum(-0.5 * jnp.square((z[:, None] - mean_j[j][None]) / std[None])
                   - log_std_j[j][None] - 0.5 * math.log(2 * math.pi), axis=-1)

  everything = np.asarray(log_q(jnp.asarray(samples), jnp.arange(n)), np.float64)   # [S, N]
  own = everything[np.arange(n * m), owners]
  keep = M.marginal_kl(samples, log_q, n, block_size=4)
  same = M.marginal_kl(samples, log_q, n, block_size=4, leave_out=owners,
                       own_log_posterior=own.astype(np.float32))
  np.testing.assert_allclose(float(same.kl), float(keep.kl), rtol=1e-5, atol=1e-5)
  # A different self term: the estimate is built from it and the other N - 1 terms.
  shifted = everything.copy()
  shifted[np.arange(n * m), owners] += 1.5
  log_prior = np.sum(-0.5 * samples.astype(np.float64) ** 2 - 0.5 * math.log(2 * math.pi),
                     axis=1)
  peak = shifted.max(axis=1, keepdims=True)
  expected = np.mean(peak[:, 0] + np.log(np.exp(shifted - peak).sum(1)) - math.log(n)
                     - log_prior)
  moved = M.marginal_kl(samples, log_q, n, block_size=4, leave_out=owners,
                        own_log_posterior=(own + 1.5).astype(np.float32))
  np.testing.assert_allclose(float(moved.kl), expected, rtol=1e-5, atol=1e-5)
  # One posterior: the mixture is the self term alone.
  single = M.marginal_kl(samples[:m], log_q, 1, leave_out=np.zeros(m, np.int32),
                         own_log_posterior=own[:m].astype(np.float32))
  np.testing.assert_allclose(float(single.kl), np.mean(own[:m] - log_prior[:m]),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="own_log_posterior needs leave_out"):
    M.marginal_kl(samples, log_q, n, own_log_posterior=own)
  with pytest.raises(ValueError, match="one value per sample"):
    M.marginal_kl(samples, log_q, n, leave_out=owners, own_log_posterior=own[:3])


def _unblocked_log_aggregate(samples, mean, log_std, owners=None):
  """log q_N(z_s) from the whole [S, N] matrix, in float64 NumPy."""
  z, m, ls = (np.asarray(a, np.float64) for a in (samples, mean, log_std))
  std = np.exp(ls)
  log_q = np.sum(-0.5 * ((z[:, None] - m[None]) / std[None]) ** 2 - ls[None]
                 - 0.5 * math.log(2 * math.pi), axis=-1)                  # [S, N]
  n = m.shape[0]
  if owners is not None:
    log_q[np.arange(len(z)), owners] = -np.inf
    n -= 1
  peak = log_q.max(axis=1, keepdims=True)
  return (peak[:, 0] + np.log(np.sum(np.exp(log_q - peak), axis=1))) - math.log(n)


@functools.partial(jax.jit, static_argnames=("block_size", "leave_one_out"))
def _blocked_log_aggregate(samples, mean, log_std, block_size, leave_one_out):
  def log_q(z, j):
    t = (z[:, None, :] - mean[j][None]) * jnp.exp(-log_std[j])[None]
    return jnp.sum(-0.5 * t ** 2 - log_std[j][None], -1) - mean.shape[1] * 0.5 * math.log(
        2 * math.pi)
  owners = jnp.arange(samples.shape[0]) // 2 if leave_one_out else None
  return M.log_aggregate_posterior(samples, log_q, mean.shape[0], block_size=block_size,
                                   leave_out=owners)


@pytest.mark.parametrize("block_size, leave_one_out",
                         [(1, False), (7, False), (1000, False), (7, True)])
def test_blocked_equals_unblocked(block_size, leave_one_out):
  rng = np.random.default_rng(8)
  n, d = 60, 3                     # 60 posteriors, 2 samples each: S = 120
  mean = rng.normal(size=(n, d)).astype(np.float32)
  log_std = rng.uniform(-1.5, 0.5, size=(n, d)).astype(np.float32)
  owners = np.repeat(np.arange(n), 2)
  samples = (mean[owners] + np.exp(log_std[owners]) * rng.normal(size=(2 * n, d))
             ).astype(np.float32)
  got = _blocked_log_aggregate(samples, mean, log_std, block_size, leave_one_out)
  want = _unblocked_log_aggregate(samples, mean, log_std, owners if leave_one_out else None)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_marginal_kl_runs_in_bounded_memory():
  # N = 5000: the [N, N] matrix of log q alone would take 100 MB, its [N, N, d]
  # broadcast 800 MB; blocks of 256 need a few MB.
  mean, log_std = _gaussian_set(5000, 8, 0.7, 1.0, 10)
  fn = jax.jit(functools.partial(M.marginal_kl_gaussian, block_size=256))
  compiled = fn.lower(mean, log_std, jax.random.key(4)).compile()
  stats = compiled.memory_analysis()
  if stats is not None:
    assert stats.temp_size_in_bytes < 32 * 2 ** 20, stats
  result = compiled(mean, log_std, jax.random.key(4))
  assert np.isfinite(result.kl) and np.isfinite(result.standard_error)
  # Aggregate = prior, 8 dimensions: small, upward biased (first order 0.03).
  assert 0 < float(result.kl) < 0.1


def test_marginal_kl_with_vae_nvp_exact_log_posterior():
  from geco_jax.models.vae_nvp import VAENVP

  model = VAENVP(image_shape=(8, 8, 1), latent_size=3, num_couplings=2, channels=(4, 4),
                 hidden_size=16, coupling_hidden_size=8)
  images = np.random.default_rng(11).uniform(size=(12, 8, 8, 1)).astype(np.float32)
  # Random parameters of the right shapes, from NumPy (Flax's init, or eager
  # jax.random per leaf, takes seconds on a 2-core CPU); unlike the init, they
  # make every coupling a non-trivial map, so q(z|x) is not Gaussian.
  shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1], jax.random.key(1))
  rng = np.random.default_rng(12)
  params = jax.tree_util.tree_map(
      lambda leaf: (0.3 * rng.normal(size=leaf.shape)).astype(np.float32), shapes)
  n, num_samples = images.shape[0], 3

  @jax.jit
  def evaluate(params, images, rng):
    z, log_q_own = model.apply(params, images, rng, num_samples,
                               method=model.posterior_samples)
    samples = z.reshape(-1, z.shape[-1])                        # [N M, d]

    def log_q(z_block, j_block):                                # [B, d], [J] -> [B, J]
      zz = jnp.broadcast_to(z_block, (j_block.shape[0],) + z_block.shape)
      return model.apply(params, zz, images[j_block], method=model.log_posterior).T

    result = M.marginal_kl(samples, log_q, n, block_size=5)
    # Unblocked: every pair at once.
    everything = log_q(samples, jnp.arange(n))                  # [S, N]
    return result, everything, log_q_own.reshape(-1), samples

  result, everything, log_q_own, samples = evaluate(params, images, jax.random.key(3))
  everything = np.asarray(everything, np.float64)
  owners = np.repeat(np.arange(n), num_samples)
  # The interface's pairs agree with the model's own log q(z|x) on the diagonal.
  np.testing.assert_allclose(everything[np.arange(n * num_samples), owners], log_q_own,
                             rtol=1e-4, atol=1e-4)
  log_prior = np.sum(-0.5 * np.asarray(samples, np.float64) ** 2
                     - 0.5 * math.log(2 * math.pi), axis=1)
  peak = everything.max(axis=1, keepdims=True)
  log_aggregate = peak[:, 0] + np.log(np.exp(everything - peak).sum(1)) - math.log(n)
  np.testing.assert_allclose(result.kl, np.mean(log_aggregate - log_prior),
                             rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# Bad inputs
# --------------------------------------------------------------------------- #


def test_bad_inputs_raise_clear_errors():
  x = np.full((2, 3), 0.5, np.float32)
  for bad in (1.5, -0.1, np.nan):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
      M.quantized_normal_log_prob(np.array([0.2, bad], np.float32), 0.5, 0.1)
  for sigma in (0.0, -1.0, np.nan):
    with pytest.raises(ValueError, match="sigma must be > 0"):
      M.quantized_normal_nll(x, x, sigma)
  with pytest.raises(ValueError, match="num_bins"):
    M.quantized_normal_log_prob(x, x, 0.1, num_bins=1)
  with pytest.raises(ValueError, match="same shape"):
    M.quantized_normal_nll(x, x[:1], 0.1)
  with pytest.raises(ValueError, match="same shape"):
    M.squared_error_sum(x, x.T)
  with pytest.raises(ValueError, match="same shape"):
    M.reconstruction_metrics(x, x[:, :2], 0.1)
  with pytest.raises(ValueError, match=">= 0"):
    M.optimal_sigma(-1.0, 10)
  with pytest.raises(ValueError, match="num_values"):
    M.optimal_sigma(1.0, 0)
  with pytest.raises(ValueError, match="num_dims"):
    M.bits_per_dim(1.0, 0)
  with pytest.raises(ValueError, match=r"shape \[batch\]"):
    M.average_kl(np.ones((2, 2)))

  samples = np.zeros((10, 2), np.float32)
  log_q = lambda z, j: jnp.zeros((z.shape[0], j.shape[0]))        # noqa: E731
  with pytest.raises(ValueError, match=r"shape \[S, \.\.\.\]"):
    M.marginal_kl(np.float32(0.0), log_q, 5)
  with pytest.raises(ValueError, match="block_size"):
    M.marginal_kl(samples, log_q, 5, block_size=0)
  with pytest.raises(ValueError, match="num_posteriors"):
    M.marginal_kl(samples, log_q, 0)
  with pytest.raises(ValueError, match="num_posteriors"):
    M.marginal_kl(samples, log_q, 1, leave_out=np.zeros(10, np.int32))
  with pytest.raises(ValueError, match="leave_out"):
    M.marginal_kl(samples, log_q, 5, leave_out=np.zeros(9, np.int32))
  with pytest.raises(ValueError, match="leave_out"):
    M.marginal_kl(samples, log_q, 5, leave_out=np.zeros(10, np.float32))
  with pytest.raises(ValueError, match=r"must return \[B, J\]"):
    M.marginal_kl(samples, lambda z, j: jnp.zeros((j.shape[0], z.shape[0] + 1)), 5)
  with pytest.raises(ValueError, match="log_prior_fn"):
    M.marginal_kl(samples, log_q, 5, lambda z: jnp.zeros((z.shape[0], 2)))
  with pytest.raises(ValueError, match="latent_size"):
    M.marginal_kl_gaussian(np.zeros((4, 2)), np.zeros((4, 3)), jax.random.key(0))
  with pytest.raises(ValueError, match="leave_one_out"):
    M.marginal_kl_gaussian(np.zeros((1, 2)), np.zeros((1, 2)), jax.random.key(0),
                           leave_one_out=True)
