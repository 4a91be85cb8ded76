r"""The paper's baselines: the Gaussian ELBO with a fixed, learned or annealed sigma.

GECO's loss is ``geco_jax.lagrangian``. The baselines it is compared with
(paper section 4, paper notes section 4) maximise the evidence lower bound

  ELBO(x) = E_q[log N(x; g(z), sigma^2 I)] - KL(q(z|x) || pi(z))

with one global pixel standard deviation sigma, which is

- fixed (``beta``-VAE-like: sigma sets the trade-off; sigma = 1 on [0, 1] data
  is a very weak likelihood),
- learned with the model (a free parameter, log sigma, trained by the same
  optimiser), or
- annealed by hand as in GQN (Eslami et al. 2018): linearly from 2.0 to 0.7
  over the first 200k steps, then held (``annealed_sigma``).

The negative log-likelihood of a D-pixel image is

  NLL(x) = sum_d [ (x_d - g_d)^2 / (2 sigma^2) + log sigma + log(2 pi) / 2 ]

and ``negative_elbo = NLL + KL``, both in nats per example.

``optimal_sigma_nll`` is the NLL at the batch's own best sigma,
sigma*^2 = mean (x - g)^2, i.e. ``D / 2 * (log(2 pi sigma*^2) + 1)``: a
sigma-free measure of reconstruction quality that can be logged for every
objective. (The sigma-independent NLL of the paper's appendix D refits
sigma* on the whole training set and uses a quantized likelihood;
``geco_jax.metrics`` computes that one.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["annealed_sigma", "gaussian_nll", "negative_elbo", "optimal_sigma_nll"]

_LOG_TWO_PI = math.log(2.0 * math.pi)


def _per_example_sum(values):
  return jnp.sum(values.reshape(values.shape[0], -1), axis=1)


def gaussian_nll(images, means, sigma) -> jax.Array:
  """-log N(x; g, sigma^2 I) per example, nats, summed over pixels: [batch].

  Args:
    images: x, [batch, ...].
    means: g(z), the same shape.
    sigma: a positive scalar (traced or not), the global pixel std.
  """
  if images.shape != means.shape:
    raise ValueError(f"images {images.shape} and means {means.shape} differ in shape.")
  sigma = jnp.asarray(sigma, jnp.float32)
  num_pixels = math.prod(images.shape[1:])
  squared = _per_example_sum(jnp.square(images - means))
  return squared / (2.0 * sigma ** 2) + num_pixels * (jnp.log(sigma) + 0.5 * _LOG_TWO_PI)


def negative_elbo(images, means, kl, sigma) -> jax.Array:
  """``gaussian_nll(images, means, sigma) + kl`` per example: [batch]."""
  return gaussian_nll(images, means, sigma) + kl


def optimal_sigma_nll(images, means) -> jax.Array:
  """Batch-mean Gaussian NLL per example at sigma*^2 = mean (x - g)^2 (nats).

  ``D / 2 * (log(2 pi sigma*^2) + 1)`` with D pixels per example, the minimum
  over sigma of the batch mean of ``gaussian_nll``. A scalar.
  """
  if images.shape != means.shape:
    raise ValueError(f"images {images.shape} and means {means.shape} differ in shape.")
  num_pixels = math.prod(images.shape[1:])
  variance = jnp.maximum(jnp.mean(jnp.square(images - means)), 1e-12)
  return 0.5 * num_pixels * (_LOG_TWO_PI + jnp.log(variance) + 1.0)


def annealed_sigma(step, *, sigma_start: float = 2.0, sigma_end: float = 0.7,
                   num_steps: int = 200_000) -> jax.Array:
  """GQN's pixel-sigma schedule: linear from ``sigma_start`` to ``sigma_end``.

  sigma(t) = sigma_end + (sigma_start - sigma_end) * max(0, 1 - t / num_steps);
  ``num_steps`` = 200k in GQN, scaled to the run here.
  """
  if not (sigma_start > 0 and sigma_end > 0):
    raise ValueError(f"sigmas must be positive; got {sigma_start}, {sigma_end}.")
  if not num_steps >= 1:
    raise ValueError(f"num_steps must be >= 1; got {num_steps}.")
  fraction = jnp.clip(jnp.asarray(step, jnp.float32) / num_steps, 0.0, 1.0)
  return sigma_end + (sigma_start - sigma_end) * (1.0 - fraction)
