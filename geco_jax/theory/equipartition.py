r"""Equipartition of the latent space (Props. 3.1 and 3.3), measured on tiles.

Prop. 3.1: the posterior of a high-capacity VAE for data point ``x_i`` is the
prior restricted to a support ``A_i``, ``q(z | x_i) = pi(z) 1[z in A_i] /
pi(A_i)``; any partition ``{A_i}`` gives a fixed point of the ELBO's
equations, and the best partition is equiprobable, ``pi(A_i) = 1 / N``.
Prop. 3.3 extends this to beta-VAEs whose fixed points are shared by several
points: the support of a fixed point gets the prior mass of the points it
holds.

On the tiled latent space (``fixed_points``) this is measured from the final
posteriors ``w_ik = q(tile k | x_i)`` by ``posterior_prior_mass``:

* hard (default): tile ``k`` belongs to the data point whose posterior puts
  the most weight on it, ``owner(k) = argmax_i w_ik`` (ties to the lowest
  ``i``), and ``mass_i = sum_{k : owner(k) = i} pi_k``;
* soft: tile ``k`` is shared in proportion to ``w_ik``,
  ``mass_i = sum_k pi_k w_ik / sum_i' w_i'k``.

Either way ``sum_i mass_i = 1``.

What the fixed-point iteration does and does not do. The unconstrained map
never looks at the tiles' latent positions and moves tiles that share a
reconstruction identically, so it cannot move prior mass from one fixed
point to another: at small beta it keeps the partition it starts from (from
the default grid start, the Voronoi cells of the data in the latent square),
and each posterior becomes the prior restricted to its cells, as Prop. 3.1
says. Which partition is best is a statement about the ELBO, checked with
``tiled_elbo``: with ``equiprobable_reconstructions`` as the start (tiles
dealt out to the points in runs of equal prior mass) the iteration stays
put, every mass is within ``max_k pi_k`` of ``1 / N`` (so it tends to
``1 / N`` as the grid is refined: a high-capacity model), and the ELBO is
higher than from the grid start; at small beta the KL term is
``-(1/N) sum_i log pi(A_i) >= log N``, with equality exactly at
equipartition.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from geco_jax._validation import check_int
from geco_jax.theory.tiles import tile_prior

__all__ = [
    "ElboTerms",
    "equiprobable_reconstructions",
    "posterior_prior_mass",
    "tiled_elbo",
]


class ElboTerms(NamedTuple):
  """The beta-VAE objective of a tiled model, averaged over the data.

  Attributes:
    elbo: ``reconstruction - beta * kl``.
    reconstruction: ``-(1/N) sum_i sum_k w_ik ||x_i - M_k||^2 / (2 sigma^2)``
      (the Gaussian log-likelihood without its constant
      ``-D/2 log(2 pi sigma^2)``).
    kl: ``(1/N) sum_i KL(w_i || pi)``.
  """
  elbo: float
  reconstruction: float
  kl: float


def _weights_and_prior(result) -> tuple[np.ndarray, np.ndarray]:
  try:
    weights = np.asarray(result.weights, np.float64)
    prior = np.asarray(result.prior, np.float64)
  except AttributeError:
    raise ValueError(
        "result must be a FixedPoints (with .weights and .prior); got "
        f"{type(result).__name__}.") from None
  if weights.ndim != 2 or prior.shape != (weights.shape[1],):
    raise ValueError(
        f"weights must be [N, K] and prior [K]; got {weights.shape} and "
        f"{prior.shape}.")
  return weights, prior


def posterior_prior_mass(result, *, soft: bool = False) -> np.ndarray:
  """The prior mass of each data point's posterior support, float64 ``[N]``.

  Args:
    result: a ``FixedPoints`` (uses its ``weights`` ``[N, K]`` and ``prior``
      ``[K]``).
    soft: share each tile among the points in proportion to ``w_ik``
      instead of giving it to the point with the largest ``w_ik``.

  Returns:
    ``mass_i``, summing to 1 (see the module docstring); ``1 / N`` each at
    equipartition.

  Raises:
    ValueError: if ``result`` has no ``[N, K]`` weights matching a ``[K]``
      prior.
  """
  weights, prior = _weights_and_prior(result)
  if soft:
    column = weights.sum(axis=0)
    share = np.divide(weights, column[None, :],
                      out=np.full_like(weights, 1.0 / weights.shape[0]),
                      where=column[None, :] > 0)
    return share @ prior
  owner = np.argmax(weights, axis=0)
  return np.bincount(owner, weights=prior, minlength=weights.shape[0])


def tiled_elbo(data, result) -> ElboTerms:
  """The objective whose stationary points the fixed-point map finds.

  For posteriors ``w`` and reconstructions ``M`` (``result``) at the
  result's beta and ``sigma^2 = T / (2 beta)``::

      ELBO = (1/N) sum_i [ -sum_k w_ik ||x_i - M_k||^2 / (2 sigma^2)
                           - beta KL(w_i || pi) ]

  Maximising it in ``w_i`` gives ``w_ik ~ pi_k exp(-||x_i - M_k||^2 / T)``
  and in ``M`` the weighted means: the two halves of the map.

  Args:
    data: the ``[N, D]`` points the result was computed on.
    result: a ``FixedPoints``.

  Returns:
    ``ElboTerms``, averages over the data.

  Raises:
    ValueError: for data that does not match the result.
  """
  weights, prior = _weights_and_prior(result)
  data = np.asarray(data, np.float64)
  means = np.asarray(result.reconstructions, np.float64)
  if data.ndim != 2 or data.shape[0] != weights.shape[0] or (
      data.shape[1] != means.shape[1]):
    raise ValueError(
        f"data must be the [N, D] = [{weights.shape[0]}, {means.shape[1]}] "
        f"points of the result; got shape {data.shape}.")
  squared = np.sum((data[:, None, :] - means[None, :, :]) ** 2, axis=-1)
  sigma2 = result.temperature / (2.0 * result.beta)
  reconstruction = -np.sum(weights * squared) / len(data) / (2.0 * sigma2)
  positive = weights > 0
  with np.errstate(divide="ignore"):
    log_ratio = np.where(positive, np.log(np.where(positive, weights, 1.0))
                         - np.log(prior)[None, :], 0.0)
  kl = np.sum(weights * log_ratio) / len(data)
  return ElboTerms(float(reconstruction - result.beta * kl),
                   float(reconstruction), float(kl))


def equiprobable_reconstructions(data, *, grid_size: int = 32,
                                 latent_range=(-1.0, 1.0),
                                 prior="uniform"
                                 ) -> tuple[np.ndarray, np.ndarray]:
  """A start that deals the tiles out to the points in runs of equal prior mass.

  Tiles are taken in serpentine order (row by row, every other row
  reversed, so each run is a contiguous band of the grid) and tile ``k``
  goes to point ``floor(N (C_k + pi_k / 2))`` (clipped to ``N - 1``), where
  ``C_k`` is the prior mass of the tiles before it: each point gets prior
  mass within ``max_k pi_k`` of ``1 / N`` (exactly ``1 / N`` for a uniform
  prior when ``N`` divides ``K``); with fewer tiles than points some points
  get none. Pass the reconstructions as ``init=`` to
  ``reconstruction_fixed_points``.

  Args:
    data: ``[N, D]`` points.
    grid_size, latent_range, prior: the tiling (``tile_prior``).

  Returns:
    ``(reconstructions [K, D] float64, owner [K] int)``: ``M_k = x_owner(k)``.
  """
  data = np.asarray(data, np.float64)
  if data.ndim != 2 or data.shape[0] < 1:
    raise ValueError(f"data must be [N, D] with N >= 1; got {data.shape}.")
  grid_size = check_int(grid_size, "grid_size", 1)
  masses = tile_prior(grid_size, latent_range, prior)
  order = np.arange(grid_size * grid_size).reshape(grid_size, grid_size)
  order[1::2] = order[1::2, ::-1]
  order = order.ravel()
  before = np.cumsum(masses[order]) - masses[order]
  owner_in_order = np.minimum(
      np.floor(len(data) * (before + 0.5 * masses[order])).astype(int),
      len(data) - 1)
  owner = np.empty_like(owner_in_order)
  owner[order] = owner_in_order
  return data[owner].copy(), owner
