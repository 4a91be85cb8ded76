"""What every geco_jax model returns, and the Gaussian KL they share."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class VAEOutput(NamedTuple):
  """One forward pass of a VAE on a batch.

  Attributes:
    reconstruction: g(z), the decoder's mean for z ~ q(z|x), in [0, 1], same
      shape as the input.
    kl: KL(q(z|x) || pi(z)) per example, shape [batch] (nats; analytic or a
      one-sample Monte Carlo estimate, as the model documents).
    latent: the sample z ~ q(z|x), shape [batch, ...].
  """

  reconstruction: jax.Array
  kl: jax.Array
  latent: jax.Array


def gaussian_kl(mean_q, log_std_q, mean_p=0.0, log_std_p=0.0):
  """KL(N(mean_q, std_q^2) || N(mean_p, std_p^2)) of diagonal Gaussians, per example.

  ``0.5 * sum[(std_q^2 + (mean_q - mean_p)^2) / std_p^2 - 1] + sum[log std_p - log std_q]``,
  summed over every axis but the first.
  """
  var_ratio = jnp.exp(2.0 * (log_std_q - log_std_p))
  mean_term = jnp.square(mean_q - mean_p) * jnp.exp(-2.0 * log_std_p)
  kl = 0.5 * (var_ratio + mean_term - 1.0) + log_std_p - log_std_q
  return jnp.sum(kl.reshape(kl.shape[0], -1), axis=1)
