r"""The paper's evaluation metrics ("Taming VAEs", Sec. 4 and Appendix D).

Pure functions of arrays (and, where a model is needed, of callables); none
reads a config. All work under ``jax.jit``, with their integer arguments
(``num_values``, ``num_bins``, ``num_posteriors``, ``block_size``) static;
the checks of array values (images in [0, 1], sigma > 0) run only on concrete
values and are skipped for tracers.

* sigma-independent NLL (Appendix D). A model trained under a constraint has
  no meaningful likelihood scale, so after training one global sigma* is
  refitted on the *training* set with everything else fixed,

      sigma*^2 = mean over examples, samples z ~ q(z|x) and values of (x - g(z))^2,

  the maximum-likelihood variance of N(x; g(z), sigma^2 I)
  (``squared_error_sum`` per batch, ``optimal_sigma`` at the end), and the
  reconstruction NLL is reported under a "quantized normal": the probability
  of the 8-bit bin of x under N(g(z), sigma*^2) (``quantized_normal_nll``,
  ``bits_per_dim``).
* Average KL: E_x KL(q(z|x) || pi(z)) (``average_kl``).
* Marginal KL: KL(q(z) || pi(z)) of the aggregate posterior
  q(z) = (1/N) sum_j q(z|x_j) over a held-out set (``marginal_kl``,
  ``marginal_kl_gaussian``), sensitive to "holes" in the latent space.
* Reconstruction error in the RE constraint's units (``reconstruction_metrics``
  on top of ``geco_jax.constraints``).

Typical evaluation::

  total, count = 0.0, 0
  for x in train_batches:                       # sigma* on the training set
    g = model.apply(params, x, rng).reconstruction
    s, n = squared_error_sum(x, g)
    total, count = total + float(s), count + n
  sigma = optimal_sigma(total, count)
  for x in test_batches:                        # then NLL on held-out data
    out = model.apply(params, x, rng)
    m = reconstruction_metrics(x, out.reconstruction, sigma, tolerance=0.1)
    ...                                         # average m["bits_per_dim"] etc.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special

from geco_jax import constraints
from geco_jax._validation import check
from geco_jax._validation import check_int

__all__ = [
    "MarginalKL",
    "average_kl",
    "bits_per_dim",
    "log_aggregate_posterior",
    "marginal_kl",
    "marginal_kl_gaussian",
    "optimal_sigma",
    "quantized_normal_log_prob",
    "quantized_normal_nll",
    "reconstruction_metrics",
    "squared_error_sum",
]

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
# Bins narrower than this (in standard deviations, times 1 + |centre|) use the
# midpoint expansion of the normal integral; see ``_log_normal_bin``.
_NARROW = 0.1


# --------------------------------------------------------------------------- #
# Checks
# --------------------------------------------------------------------------- #


def _check_same_shape(x, y, name: str, what: str = "reconstructions") -> None:
  if jnp.ndim(x) < 1 or jnp.shape(x)[0] < 1:
    raise ValueError(
        f"{name}: expected a non-empty batch of examples, shape [batch, ...]; "
        f"got shape {jnp.shape(x)}.")
  if jnp.shape(x) != jnp.shape(y):
    raise ValueError(
        f"{name}: images and {what} must have the same shape; got "
        f"{jnp.shape(x)} and {jnp.shape(y)} (for several z per x, repeat the "
        "images along the batch axis).")


def _check_unit_interval(x, name: str) -> None:
  """``ValueError`` unless every known value of x is in [0, 1]; tracers pass."""
  if isinstance(x, jax.core.Tracer):
    return
  values = np.asarray(x)
  if values.size and not (values.min() >= 0.0 and values.max() <= 1.0):
    raise ValueError(
        f"{name}: images must lie in [0, 1] (8-bit values k / 255); got values "
        f"in [{values.min()}, {values.max()}].")


def _check_sigma(sigma, name: str) -> None:
  check(sigma, lambda v: v > 0, f"{name}: sigma must be > 0")


# --------------------------------------------------------------------------- #
# sigma* (Appendix D)
# --------------------------------------------------------------------------- #


def squared_error_sum(images, reconstructions) -> tuple[jax.Array, int]:
  r"""One batch's contribution to sigma*: sum (x - g(z))^2 and the number of values.

  Stream the training set through it and add the parts up (in Python floats,
  i.e. float64, so that many batches lose no precision), then call
  ``optimal_sigma``. With M samples z ~ q(z|x) per example, pass the images
  repeated M times along the batch axis.

  Args:
    images: x, [batch, ...].
    reconstructions: g(z), the decoder's mean, same shape.

  Returns:
    (sum over every value of (x - g)^2, a scalar array; the number of values,
    a Python int, ``images.size``).
  """
  _check_same_shape(images, reconstructions, "squared_error_sum")
  error = jnp.asarray(images) - jnp.asarray(reconstructions)
  return jnp.sum(jnp.square(error)), int(np.prod(jnp.shape(images)))


def optimal_sigma(squared_error_sum, num_values):
  r"""sigma* = sqrt(sum (x - g(z))^2 / n), the global sigma of Appendix D.

  The maximiser over sigma of sum_i log N(x_i; g_i, sigma^2): the derivative of
  -n log sigma - S / (2 sigma^2) vanishes at sigma^2 = S / n. Computed on the
  training set with the model fixed, it removes the arbitrary likelihood
  scale of a constrained model before its NLL is compared with others.

  It is the MLE of the *continuous* Gaussian, not exactly that of the
  quantized normal used to report the NLL: for bins of width w = 1/255 much
  narrower than sigma*, the quantized likelihood is maximised near
  sqrt(sigma*^2 - w^2 / 12) (Sheppard's correction: the squared error of 8-bit
  data includes the rounding variance w^2 / 12), a relative shift of
  w^2 / (24 sigma*^2), 1% at sigma* = 2/255; the NLL at sigma* is then above
  the minimum by about (w / sigma*)^4 / 576 nats per value, negligible. Bins
  at the edges of [0, 1] (saturated pixels) move the quantized optimum further.

  Args:
    squared_error_sum: sum of (x - g(z))^2 over the training set (>= 0).
    num_values: how many values it sums (examples x samples x pixels x
      channels), >= 1.

  Returns:
    sigma*, a scalar array (0 only for exact reconstructions).
  """
  check(squared_error_sum, lambda v: v >= 0,
        "optimal_sigma: the sum of squared errors must be >= 0")
  num_values = check_int(num_values, "optimal_sigma: num_values", 1)
  return jnp.sqrt(jnp.asarray(squared_error_sum) / num_values)


# --------------------------------------------------------------------------- #
# Quantized normal
# --------------------------------------------------------------------------- #


def _log1mexp(d):
  """log(1 - exp(d)) for d <= 0, stable at both ends (Maechler 2012)."""
  return jnp.where(d > -math.log(2.0), jnp.log(-jnp.expm1(d)), jnp.log1p(-jnp.exp(d)))


def _scaled_log_ndtr(t):
  """L(t) = log Phi(t) + t^2 / 2 for t <= 0, without cancelling large terms.

  Slowly varying (about -log(-t) - log(2 pi) / 2 in the tail), so differences
  L(a) - L(b) keep their digits where log Phi(a) - log Phi(b) would lose them.
  For t <= -T the asymptotic series of Mills' ratio,
  Phi(t) = phi(t) / |t| * sum_k (-1)^k (2k - 1)!! / t^(2k), with 11 terms
  (T = 10 in float32, 20 in float64: the omitted terms are below the
  precision); above, log(ndtr(t)) + t^2 / 2, whose error is eps * T^2.
  """
  threshold = 20.0 if t.dtype == jnp.float64 else 10.0
  far = t <= -threshold
  tf = jnp.where(far, t, -threshold)
  u = 1.0 / jnp.square(tf)
  series, coefficient = jnp.ones_like(tf), 1.0
  term = jnp.ones_like(tf)
  for k in range(1, 11):
    coefficient = -coefficient * (2 * k - 1)
    term = term * u
    series = series + coefficient * term
  asymptotic = -jnp.log(-tf) - _HALF_LOG_TWO_PI + jnp.log(series)
  # Phi(t) >= Phi(-20) ~ 3e-89 is a normal number there, and ndtr is accurate
  # to a relative eps in the lower tail (it uses erfc).
  tn = jnp.where(far, -threshold, t)
  return jnp.where(far, asymptotic, jnp.log(special.ndtr(tn)) + 0.5 * jnp.square(tn))


def _log_normal_bin(m, h):
  """log[Phi(m + h) - Phi(m - h)] for m <= 0, h > 0: a bin in the lower half.

  Three forms, each used where it is accurate, each fed harmless inputs where
  it is not used so that gradients stay finite:

  * narrow bins, w (1 + |m|) < 0.1 with w = 2h: the midpoint expansion
    int phi = w phi(m) [1 + w^2 He2(m) / 24 + w^4 He4(m) / 1920
    + w^6 He6(m) / 322560] (He the Hermite polynomials, He_n phi = phi^(n)),
    whose next term is below 1e-16 there; a difference of two close CDFs
    would lose most digits.
  * lower tail, m + h <= 0: log Phi(m + h) + log(1 - exp(d)) with
    log Phi(m + h) = L(m + h) - (m + h)^2 / 2 and
    d = log Phi(m - h) - log Phi(m + h) = 2 h m + L(m - h) - L(m + h),
    L = ``_scaled_log_ndtr``: the large t^2 / 2 terms cancel analytically.
  * straddling 0: log1p(-Phi(m - h) - Phi(-(m + h))), the bin as 1 minus two
    tails of at most 1/2 each.
  """
  width = 2.0 * h
  narrow = width * (1.0 + jnp.abs(m)) < _NARROW
  tail = ~narrow & (m + h <= 0.0)
  straddle = ~narrow & ~tail

  wn, mn = jnp.where(narrow, width, 1e-3), jnp.where(narrow, m, 0.0)
  m2, w2 = jnp.square(mn), jnp.square(wn)
  series = w2 * ((m2 - 1.0) / 24.0
                 + w2 * ((m2 * (m2 - 6.0) + 3.0) / 1920.0
                         + w2 * ((m2 * (m2 * (m2 - 15.0) + 45.0) - 15.0) / 322560.0)))
  narrow_value = jnp.log(wn) - 0.5 * m2 - _HALF_LOG_TWO_PI + jnp.log1p(series)

  ht, mt = jnp.where(tail, h, 1.0), jnp.where(tail, m, -2.0)
  scaled_lo, scaled_hi = _scaled_log_ndtr(jnp.stack([mt - ht, mt + ht]))
  log_ratio = 2.0 * ht * mt + scaled_lo - scaled_hi
  log_phi_hi = scaled_hi - 0.5 * jnp.square(mt + ht)
  tail_value = log_phi_hi + _log1mexp(jnp.minimum(log_ratio, 0.0))

  hs, ms = jnp.where(straddle, h, 1.0), jnp.where(straddle, m, 0.0)
  straddle_value = jnp.log1p(-(special.ndtr(ms - hs) + special.ndtr(-(ms + hs))))

  return jnp.where(narrow, narrow_value, jnp.where(tail, tail_value, straddle_value))


def quantized_normal_log_prob(x, mean, sigma, *, num_bins: int = 256):
  r"""log P(bin of x) under N(mean, sigma^2), elementwise: the quantized normal.

  [0, 1] is cut into ``num_bins`` = K bins of width w = 1 / (K - 1) centred on
  the values k / (K - 1), k = 0..K-1 (the 8-bit values k / 255 for K = 256).
  x is assigned to its nearest centre c = k / (K - 1) and

      P(k) = Phi((c + w/2 - mean) / sigma) - Phi((c - w/2 - mean) / sigma),

  i.e. Phi((x + 1/510 - mu)/sigma) - Phi((x - 1/510 - mu)/sigma) for 8-bit x,
  with the edge bins open: P(0) = Phi((w/2 - mean) / sigma) and
  P(K-1) = 1 - Phi((1 - w/2 - mean) / sigma). The K probabilities therefore
  sum to exactly 1 for any mean (inside [0, 1] or not) and any sigma > 0:
  for data on the bin centres (8-bit images divided by 255) this is an exact
  discrete likelihood, directly comparable with other models' bits/dim.
  (Data between centres is rounded to its bin, so it is scored as the 8-bit
  value it would be stored as.)

  Computed in log space, accurately for bins far in either tail (by symmetry
  a bin above the mean is scored as its mirror image below it, and the two
  edges of a tail bin are differenced as log Phi(t) + t^2 / 2, so the large
  t^2 / 2 terms never cancel numerically), for bins much narrower than sigma
  (midpoint expansion) and for bins much wider; finite and differentiable in
  ``mean`` and ``sigma`` everywhere (not in x, which is rounded). Measured in
  float32 against 60-digit arithmetic, the bins around 455 means (every bin
  edge from 100 / 255 up, and random ones), sigma from 1e-4 to 1e-1: error
  within 1.5e-6 of max(1, |log P|) (before the offset k - 255 mean was
  computed exactly, the float32 rounding of 255 mean, up to 3e-4 standard
  deviations at sigma = 1e-4, gave errors up to 2.4e-4 there, 3e-6 at
  sigma = 1e-2). Far in a tail log P ~ -t^2 / 2
  reaches -1e9 and stays finite.

  Args:
    x: data in [0, 1], any shape.
    mean: the decoder's mean mu = g(z), broadcastable with x (any real value).
    sigma: the standard deviation (> 0), broadcastable, usually sigma*.
    num_bins: K, the number of intensity levels (>= 2).

  Returns:
    log P, in nats, the broadcast shape of x, mean and sigma.
  """
  num_bins = check_int(num_bins, "quantized_normal_log_prob: num_bins", 2)
  _check_unit_interval(x, "quantized_normal_log_prob")
  _check_sigma(sigma, "quantized_normal_log_prob")
  x, mean, sigma = jnp.asarray(x), jnp.asarray(mean), jnp.asarray(sigma)
  dtype = jnp.result_type(x, mean, sigma, jnp.float32)
  x, mean, sigma = x.astype(dtype), mean.astype(dtype), sigma.astype(dtype)
  levels = num_bins - 1
  k = jnp.clip(jnp.round(x * levels), 0, levels)
  # The bin centre and half-width in standard deviations. k - levels * mean,
  # computed exactly but for one rounding of the result (_exact_offset);
  # k / levels - mean would round twice, and levels * mean alone rounds by up
  # to half an ulp of 255 (7.6e-6 bins in float32), which is 3e-4 standard
  # deviations at sigma = 1e-4.
  scale = levels * sigma
  z = _exact_offset(k, levels, mean) / scale
  h = 0.5 / scale
  # A bin above the mean has the probability of its mirror image below it.
  interior = _log_normal_bin(-jnp.abs(z), h)
  # The open edge bins: (-inf, w/2] and, mirrored, [1 - w/2, inf).
  edge = special.log_ndtr(jnp.where(k == 0, z + h, h - z))
  return jnp.where((k == 0) | (k == levels), edge, interior)


def _exact_offset(k, levels: int, mean):
  """``k - levels * mean`` with one rounding (k an integer-valued float).

  ``mean = hi + lo``, hi being mean with its low mantissa bits cleared so
  that ``levels * hi`` is exact; ``k - levels * hi`` is then exact where it
  matters (the two are within a factor of 2, Sterbenz), and
  ``levels * lo`` is a small correction. The split is a stop_gradient, so
  the derivative is ``-levels`` as for the plain expression.
  """
  bits = max(int(levels).bit_length(), 1)
  uint = jnp.uint32 if mean.dtype == jnp.float32 else jnp.uint64
  mask = ~((1 << bits) - 1) & int(jnp.iinfo(uint).max)
  hi = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(jax.lax.stop_gradient(mean), uint) & uint(mask),
      mean.dtype)
  finite = jnp.isfinite(mean)
  hi = jnp.where(finite, hi, mean)
  lo = jnp.where(finite, mean - hi, 0.0)
  return (k - levels * hi) - levels * lo


def quantized_normal_nll(images, means, sigma, *, num_bins: int = 256):
  r"""Negative log-likelihood of each example under the quantized normal, in nats.

  -sum over the example's values of ``quantized_normal_log_prob``; divide by
  the number of values D for nats per value, or use ``bits_per_dim``. With
  sigma = sigma* (``optimal_sigma``) this is the paper's sigma-independent
  reconstruction NLL (Appendix D), for one z ~ q(z|x) per example (average
  several calls for more).

  Args:
    images: x in [0, 1], [batch, ...].
    means: g(z), same shape.
    sigma: > 0, a scalar or broadcastable to the images.
    num_bins: intensity levels (256 for 8-bit data).

  Returns:
    Shape [batch].
  """
  _check_same_shape(images, means, "quantized_normal_nll", "means")
  log_prob = quantized_normal_log_prob(images, means, sigma, num_bins=num_bins)
  return -jnp.sum(log_prob.reshape(log_prob.shape[0], -1), axis=1)


def bits_per_dim(nll, num_dims):
  """nats -> bits per dimension: ``nll / (num_dims * log 2)``.

  Args:
    nll: negative log-likelihood(s) in nats, e.g. ``quantized_normal_nll``.
    num_dims: the values it sums over, e.g. height x width x channels (>= 1).
  """
  num_dims = check_int(num_dims, "bits_per_dim: num_dims", 1)
  return jnp.asarray(nll) / (num_dims * math.log(2.0))


def reconstruction_metrics(images, reconstructions, sigma, *,
                           tolerance=None, num_bins: int = 256) -> dict[str, jax.Array]:
  """Per-example reconstruction metrics of one batch; average them over a test set.

  Args:
    images: x in [0, 1], [batch, ...].
    reconstructions: g(z), same shape.
    sigma: the global standard deviation, normally sigma* from
      ``optimal_sigma`` on the training set.
    tolerance: optionally, the RE constraint's tolerance (a per-value RMSE, as
      in ``geco_jax.constraints.reconstruction_error``).
    num_bins: intensity levels of the data.

  Returns:
    A dict of [batch] arrays: ``rmse`` (per-value RMSE, the RE tolerance's
    unit), ``nll`` (quantized-normal NLL, nats per example), ``nll_per_dim``
    (nats per value), ``bits_per_dim``; with a tolerance also
    ``reconstruction_error`` (the RE constraint, <= 0 when met) and
    ``satisfied`` (1.0 where rmse <= tolerance, else 0.0).
  """
  _check_same_shape(images, reconstructions, "reconstruction_metrics")
  num_dims = int(np.prod(jnp.shape(images)[1:]))
  nll = quantized_normal_nll(images, reconstructions, sigma, num_bins=num_bins)
  rmse = constraints.per_pixel_rmse(images, reconstructions)
  metrics = {"rmse": rmse, "nll": nll, "nll_per_dim": nll / num_dims,
             "bits_per_dim": bits_per_dim(nll, num_dims)}
  if tolerance is not None:
    metrics["reconstruction_error"] = constraints.reconstruction_error(
        images, reconstructions, tolerance)
    metrics["satisfied"] = (rmse <= tolerance).astype(rmse.dtype)
  return metrics


# --------------------------------------------------------------------------- #
# KL
# --------------------------------------------------------------------------- #


def average_kl(kl, latent_size: int | None = None):
  """The average KL E_x KL(q(z|x) || pi(z)) of per-example KLs, in nats.

  Args:
    kl: per-example KL, [batch] (a model's ``VAEOutput.kl``; for VAENVP a
      one-sample estimate, unbiased, for ConvDraw the sum over steps).
    latent_size: if given, the number of latent dimensions; the result is
      then in nats per latent dimension.
  """
  if jnp.ndim(kl) != 1:
    raise ValueError(
        f"average_kl: expected a per-example KL of shape [batch]; got shape "
        f"{jnp.shape(kl)}.")
  mean = jnp.mean(jnp.asarray(kl))
  if latent_size is None:
    return mean
  return mean / check_int(latent_size, "average_kl: latent_size", 1)


class MarginalKL(NamedTuple):
  """A Monte Carlo estimate of the marginal KL and its standard error (nats).

  Attributes:
    kl: mean over samples of log q_N(z_s) - log pi(z_s).
    standard_error: sample standard deviation of those terms / sqrt(S): the
      Monte Carlo error given the held-out set (NaN for one sample). It does
      not include the bias (see ``marginal_kl``).
  """

  kl: jax.Array
  standard_error: jax.Array


def _standard_normal_log_prob(z):
  """log N(z; 0, I), summed over every axis but the first."""
  log_prob = -0.5 * jnp.square(z) - _HALF_LOG_TWO_PI
  return jnp.sum(log_prob.reshape(log_prob.shape[0], -1), axis=1)


def log_aggregate_posterior(
    samples, log_posterior_fn: Callable[[jax.Array, jax.Array], jax.Array],
    num_posteriors: int, *, block_size: int = 256, leave_out=None):
  r"""log q_N(z_s) = logsumexp_j log q(z_s | x_j) - log N, blocked, for every sample.

  The S x N matrix of log q(z_s | x_j) is never formed: ``jax.lax.map`` runs
  over blocks of samples and, inside, ``jax.lax.scan`` over blocks of
  posteriors keeps a running logsumexp, so memory is one block_size x
  block_size block (plus whatever ``log_posterior_fn`` needs for it) whatever
  S and N are. A last, partial block is padded with valid indices whose
  terms are masked out, so any S and N work.

  Args:
    samples: z, [S, ...] (e.g. [S, latent_size]).
    log_posterior_fn: ``(z_block, j_block) -> [B, J]``, log q(z_b | x_j) for
      every pair: z_block is [B, ...], rows of ``samples``; j_block is [J]
      int32 indices into the held-out set, 0 <= j < N. It is traced once per
      block shape and must be jit-compatible (index arrays captured in a
      closure with ``jnp.take`` or ``array[j_block]``).
    num_posteriors: N, the size of the held-out set.
    block_size: B = J, at most; memory grows as block_size^2.
    leave_out: optional [S] ints, the index j of the posterior each sample was
      drawn from: that term is left out and the mixture is over the other
      N - 1 (the leave-one-out estimate); None keeps every term.

  Returns:
    [S], log q_N(z_s) in nats.
  """
  samples = jnp.asarray(samples)
  if samples.ndim < 1 or samples.shape[0] < 1:
    raise ValueError(
        "log_aggregate_posterior: expected samples of shape [S, ...], S >= 1; "
        f"got shape {samples.shape}.")
  num_posteriors = check_int(num_posteriors, "log_aggregate_posterior: num_posteriors",
                             1 if leave_out is None else 2)
  block_size = check_int(block_size, "log_aggregate_posterior: block_size", 1)
  num_samples = samples.shape[0]
  if leave_out is not None:
    leave_out = jnp.asarray(leave_out)
    if leave_out.shape != (num_samples,) or not jnp.issubdtype(leave_out.dtype, jnp.integer):
      raise ValueError(
          "log_aggregate_posterior: leave_out must be integer indices of shape "
          f"[S] = [{num_samples}]; got {leave_out.dtype} of shape {leave_out.shape}.")
    leave_out = leave_out.astype(jnp.int32)

  sample_block = min(block_size, num_samples)
  posterior_block = min(block_size, num_posteriors)
  num_sample_blocks = -(-num_samples // sample_block)
  num_posterior_blocks = -(-num_posteriors // posterior_block)
  sample_index = jnp.arange(num_sample_blocks * sample_block, dtype=jnp.int32)
  posterior_index = jnp.arange(num_posterior_blocks * posterior_block, dtype=jnp.int32)
  posterior_index = posterior_index.reshape(num_posterior_blocks, posterior_block)
  owners = (jnp.full(sample_index.shape, -1, jnp.int32) if leave_out is None
            else jnp.take(leave_out, jnp.minimum(sample_index, num_samples - 1)))
  sample_index = sample_index.reshape(num_sample_blocks, sample_block)
  owners = owners.reshape(num_sample_blocks, sample_block)

  def one_sample_block(inputs):
    s_block, owner = inputs
    z = jnp.take(samples, jnp.minimum(s_block, num_samples - 1), axis=0)

    def add_posterior_block(running, j_block):
      log_q = log_posterior_fn(z, jnp.minimum(j_block, num_posteriors - 1))
      if jnp.shape(log_q) != (sample_block, posterior_block):
        raise ValueError(
            "log_aggregate_posterior: log_posterior_fn(z_block, j_block) must "
            f"return [B, J] = [{sample_block}, {posterior_block}] for z_block of "
            f"shape {z.shape} and j_block of shape {j_block.shape}; got "
            f"{jnp.shape(log_q)}.")
      keep = (j_block < num_posteriors)[None, :] & (owner[:, None] != j_block[None, :])
      log_q = jnp.where(keep, log_q, -jnp.inf)
      block_total = jax.nn.logsumexp(log_q, axis=1).astype(running.dtype)
      return jnp.logaddexp(running, block_total), None

    init = jnp.full((sample_block,), -jnp.inf, samples.dtype)
    total, _ = jax.lax.scan(add_posterior_block, init, posterior_index)
    return total

  log_sums = jax.lax.map(one_sample_block, (sample_index, owners))
  mixture_size = num_posteriors if leave_out is None else num_posteriors - 1
  return log_sums.reshape(-1)[:num_samples] - math.log(mixture_size)


def marginal_kl(
    samples, log_posterior_fn: Callable[[jax.Array, jax.Array], jax.Array],
    num_posteriors: int, log_prior_fn: Callable[[jax.Array], jax.Array] | None = None,
    *, block_size: int = 256, leave_out=None, own_log_posterior=None) -> MarginalKL:
  r"""Marginal KL, KL(q_N(z) || pi(z)), of the aggregate posterior of a held-out set.

  With q_N(z) = (1/N) sum_j q(z|x_j) over N held-out examples (the paper's
  aggregate posterior; Table 2) and samples z_s ~ q(z | x_{j(s)}), M per
  example (S = N M),

      KL_hat = (1/S) sum_s [log q_N(z_s) - log pi(z_s)],
      log q_N(z) = logsumexp_j log q(z | x_j) - log N,

  computed in blocks (``log_aggregate_posterior``), so N = 10,000 needs one
  block of memory, not an N x N matrix; the time is still N^2 evaluations of
  log q(z|x), the "significant computational cost" the paper mentions. Call
  it inside ``jax.jit``, with the held-out data as arguments of the jitted
  function rather than closed-over constants: eagerly, the blocked loops are
  traced again on every call.

  Bias. Let q(z) = E_x q(z|x) be the population aggregate posterior.

  * Keeping every term (default): log q_N(z) is exact, and one or more
    samples from every component is a stratified sample of q_N, so KL_hat is
    unbiased for KL(q_N || pi) of the finite set. As an estimate of
    KL(q || pi) it is biased *upward*: E[q_N] = q and KL is convex in its
    first argument, so E_set KL(q_N || pi) >= KL(q || pi). To first order in
    1/N the bias is (E_x E_{q(z|x)}[q(z|x) / q(z)] - 1) / (2N), small when
    posteriors overlap and huge when they do not: always
    avg_j KL(q(z|x_j) || pi) - log N <= KL(q_N || pi) <= avg_j KL(q(z|x_j) || pi),
    so for well separated posteriors the estimate is about the average KL
    minus log N (9.2 nats for N = 10^4), while the truth is the average KL
    minus I(x; z), and the mutual information can be far above log N. The
    self term j = j(s) is what inflates log q_N(z_s) at small N.
  * Leaving the self term out (``leave_out``; the mixture is then over the
    other N - 1): those x_j are independent of z_s, so the mixture value is
    an unbiased estimate of q(z_s) and, by Jensen, its log is biased
    *downward*; to first order by the same amount, -(...) / (2(N - 1)). Where
    only its own posterior covers z_s (a "hole" elsewhere) the term is very
    negative, so this estimate has a heavy lower tail.
  * In expectation, leave-one-out <= KL(q || pi) <= keep-all; both are
    consistent as N grows, and their gap shows how much N matters.

  Variance. Given the set, the samples are independent, so the returned
  standard error (sample std of the S terms / sqrt S) is the Monte Carlo
  error of KL_hat around KL(q_N || pi) (conservative: stratification only
  lowers it). Each term's variance is Var[log q_N(z) - log pi(z)], e.g.
  d (tau^2 - 1)^2 / 2 for q = N(0, tau^2 I) in d dimensions, so it grows with
  the latent size and with the mismatch; draw several z per example
  (M > 1) to reduce it. The variability from the choice of held-out set is
  not included.

  Models. Diagonal Gaussian posteriors (ConvVAE): ``marginal_kl_gaussian``.
  VAENVP, whose exact log q(z|x) is ``log_posterior``, scoring row i of z
  under x[i]::

    z, own = model.apply(params, images, rng, M, method=model.posterior_samples)
    samples = z.reshape(-1, z.shape[-1])                  # [N M, d]
    def log_q(z_block, j_block):                          # [B, d], [J]
      zz = jnp.broadcast_to(z_block, (j_block.shape[0],) + z_block.shape)
      return model.apply(params, zz, images[j_block],
                         method=model.log_posterior).T    # [B, J]
    owners = jnp.repeat(jnp.arange(N), M)
    marginal_kl(samples, log_q, N, leave_out=owners,      # keep every term (evaluate's)
                own_log_posterior=own.reshape(-1))
    marginal_kl(samples, log_q, N, leave_out=owners)      # leave-one-out

  ConvDraw: z is the sequence z_1..T, the posterior q(z|x) =
  prod_t q(z_t | x, z_<t) and the prior p(z) = prod_t p(z_t | z_<t) is
  learned. Both are scored by teacher forcing along a given path:
  ``ConvDraw.log_prior`` runs the decoder along z, and
  ``ConvDraw.pairwise_log_posterior`` runs x_j's encoder on that decoder's
  states, once per pair (T steps each, the cost that dominates)::

    trace = model.apply(params, images, rng, method=model.trace)
    z = trace.latent                                                  # [N, T, h, w, c]
    log_p = model.apply(params, z, method=model.log_prior)            # [N]
    def log_q(z_block, j_block):                                      # [B, J]
      return model.apply(params, z_block, images[j_block],
                         method=model.pairwise_log_posterior).T
    marginal_kl(z, log_q, len(images), log_prior_fn=lambda _: log_p, block_size=32,
                leave_out=jnp.arange(len(images)), own_log_posterior=trace.log_posterior)

  (``experiments.evaluate``). Its posteriors are sharp over a
  [T, H/2, W/2, C] latent, so the estimate sits near its lower bound,
  average KL - log N, unless the posteriors of different images overlap.

  Args:
    samples: z_s, [S, ...], each drawn from one held-out example's posterior,
      every example equally often.
    log_posterior_fn: ``(z_block [B, ...], j_block [J]) -> [B, J]``, log q(z_b
      | x_j) for all pairs (see ``log_aggregate_posterior``).
    num_posteriors: N.
    log_prior_fn: ``z [S, ...] -> [S]``, log pi(z); default the standard normal
      N(0, I) of every geco_jax model but ConvDraw (whose prior is learned).
    block_size: samples and posteriors per block (memory ~ block_size^2).
    leave_out: optional [S] ints, the example each sample was drawn from, for
      the leave-one-out estimate (needs N >= 2).
    own_log_posterior: optional [S], log q(z_s | x_{j(s)}) of each sample
      under the posterior it was drawn from, as computed when it was drawn
      (with ``leave_out`` = the owners j(s)). The estimate then keeps every
      term, as by default, but takes the self term from these values instead
      of from ``log_posterior_fn``. For posteriors narrower than float32
      resolves (s ~ 1e-11 around means of order 1, seen with GECO's
      multiplier at lambda_max), rescoring z_s recovers neither z_s - mean
      (a diagonal Gaussian's self term then comes out about d / 2 nats too
      high) nor a flow's inverse (a VAE+NVP's came out too low by 5e14
      nats, the median over 200 images of one such run), and the self term
      is the one that matters for such posteriors; the values from sampling
      use the drawn noise itself and stay exact.

  Returns:
    ``MarginalKL(kl, standard_error)``, scalars, nats.
  """
  samples = jnp.asarray(samples)
  if own_log_posterior is not None:
    num_posteriors = check_int(num_posteriors, "marginal_kl: num_posteriors", 1)
    if leave_out is None:
      raise ValueError("marginal_kl: own_log_posterior needs leave_out, the index of the "
                       "posterior each sample was drawn from.")
    own_log_posterior = jnp.asarray(own_log_posterior)
    if own_log_posterior.shape != (samples.shape[0],):
      raise ValueError(
          "marginal_kl: own_log_posterior must hold one value per sample, shape "
          f"[{samples.shape[0]}]; got {own_log_posterior.shape}.")
  if own_log_posterior is not None and num_posteriors == 1:
    log_q = own_log_posterior        # the mixture is the self term alone
  else:
    log_q = log_aggregate_posterior(samples, log_posterior_fn, num_posteriors,
                                    block_size=block_size, leave_out=leave_out)
  if own_log_posterior is not None and num_posteriors > 1:
    # The other N - 1 terms (their mean) and the given self term, over all N.
    log_q = (jnp.logaddexp(log_q + math.log(num_posteriors - 1),
                           own_log_posterior.astype(log_q.dtype))
             - math.log(num_posteriors))
  log_prior = (_standard_normal_log_prob(samples) if log_prior_fn is None
               else log_prior_fn(samples))
  if jnp.shape(log_prior) != (samples.shape[0],):
    raise ValueError(
        f"marginal_kl: log_prior_fn must return one value per sample, shape "
        f"[{samples.shape[0]}]; got {jnp.shape(log_prior)}.")
  terms = log_q - log_prior
  standard_error = jnp.std(terms, ddof=1) / math.sqrt(samples.shape[0])
  return MarginalKL(kl=jnp.mean(terms), standard_error=standard_error)


def marginal_kl_gaussian(mean, log_std, rng, *, num_samples: int = 1,
                         block_size: int = 256, leave_one_out: bool = False) -> MarginalKL:
  r"""``marginal_kl`` for diagonal Gaussian posteriors N(mean_j, diag exp(log_std_j)^2).

  Draws ``num_samples`` z ~ q(z|x_j) per example and scores every pair as

      log q(z | x_j) = sum_k [-(z_k - mean_jk)^2 / (2 s_jk^2) - log s_jk - log(2 pi) / 2],

  elementwise (not expanded into matrix products, which cancel badly in
  float32 for narrow posteriors), so a block holds block_size^2 x d values;
  each sample's own term is taken from its drawn noise (``marginal_kl``'s
  ``own_log_posterior``), exact however narrow the posterior.
  The prior is N(0, I). See ``marginal_kl`` for the bias and variance.
  Compiled once per shape and setting (``jax.jit``); works inside a jit too.

  Args:
    mean: [N, d], posterior means of the held-out set (e.g. ConvVAE.encode).
    log_std: [N, d], posterior log standard deviations.
    rng: a PRNG key for the samples.
    num_samples: M, samples per example.
    block_size: samples and posteriors per block.
    leave_one_out: leave each sample's own posterior out of the mixture
      (needs N >= 2).

  Returns:
    ``MarginalKL(kl, standard_error)``.
  """
  mean, log_std = jnp.asarray(mean), jnp.asarray(log_std)
  if mean.ndim != 2 or mean.shape != log_std.shape or mean.shape[0] < 1:
    raise ValueError(
        "marginal_kl_gaussian: mean and log_std must both be [N, latent_size], "
        f"N >= 1; got {mean.shape} and {log_std.shape}.")
  num_samples = check_int(num_samples, "marginal_kl_gaussian: num_samples", 1)
  block_size = check_int(block_size, "marginal_kl_gaussian: block_size", 1)
  if leave_one_out and mean.shape[0] < 2:
    raise ValueError("marginal_kl_gaussian: leave_one_out needs N >= 2 posteriors; "
                     f"got N = {mean.shape[0]}.")
  return _marginal_kl_gaussian(mean, log_std, rng, num_samples, block_size,
                               bool(leave_one_out))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _marginal_kl_gaussian(mean, log_std, rng, num_samples, block_size, leave_one_out):
  num_posteriors, size = mean.shape
  eps = jax.random.normal(rng, (num_posteriors, num_samples, size), mean.dtype)
  samples = (mean[:, None] + jnp.exp(log_std)[:, None] * eps).reshape(-1, size)
  inverse_std = jnp.exp(-log_std)
  normaliser = -jnp.sum(log_std, axis=1) - size * _HALF_LOG_TWO_PI   # [N]

  def log_q(z, j):
    standardised = (z[:, None, :] - mean[j][None]) * inverse_std[j][None]   # [B, J, d]
    return normaliser[j][None] - 0.5 * jnp.sum(jnp.square(standardised), axis=-1)

  owners = jnp.repeat(jnp.arange(num_posteriors, dtype=jnp.int32), num_samples)
  if leave_one_out:
    return marginal_kl(samples, log_q, num_posteriors, block_size=block_size,
                       leave_out=owners)
  # The self term from the drawn noise itself: (z - mean) / s is eps exactly,
  # even where s is below float32's resolution of the mean (marginal_kl).
  own = (jnp.repeat(normaliser, num_samples)
         - 0.5 * jnp.sum(jnp.square(eps), axis=-1).reshape(-1))
  return marginal_kl(samples, log_q, num_posteriors, block_size=block_size,
                     leave_out=owners, own_log_posterior=own)
