"""The tiled latent space of Prop. 3.2 / Appendix A: a square grid and its prior.

The latent space is the square ``[lo, hi]^2`` (``latent_range = (lo, hi)``),
cut into ``G x G`` equal square tiles of side ``h = (hi - lo) / G``. Tile
``k = row * G + col`` has centre::

    c_k = (lo + (col + 1/2) h,  lo + (row + 1/2) h)

so the first coordinate runs fastest (``c.reshape(G, G, 2)`` is indexed
``[row, col]``, row = second latent coordinate). The decoder is constant,
``M_k``, on tile ``k`` and the prior gives tile ``k`` the mass ``pi_k``:

* ``'uniform'``: ``pi_k = 1 / G^2`` (the paper's choice, Appendix A);
* ``'gaussian'``: the standard normal mass of the tile,
  ``(Phi(b_x) - Phi(a_x)) (Phi(b_y) - Phi(a_y))`` for the tile
  ``[a_x, b_x] x [a_y, b_y]``, normalised over the grid (the prior restricted
  to the square);
* an array of ``G^2`` non-negative masses (normalised here); a tile of mass 0
  takes no part (see ``reconstruction_fixed_points``).
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np

from geco_jax._validation import check_int

__all__ = ["PRIORS", "tile_centres", "tile_prior"]

PRIORS = ("uniform", "gaussian")

Prior = Union[str, np.ndarray]


def check_latent_range(latent_range) -> tuple[float, float]:
  """``(lo, hi)`` as floats with ``lo < hi``, both finite, or a ValueError."""
  try:
    lo, hi = (float(v) for v in latent_range)
  except (TypeError, ValueError):
    raise ValueError(
        f"latent_range must be a pair (lo, hi) of numbers; got "
        f"{latent_range!r}.") from None
  if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
    raise ValueError(
        f"latent_range must be finite with lo < hi; got {latent_range!r}.")
  return lo, hi


def tile_centres(grid_size: int, latent_range=(-1.0, 1.0)) -> np.ndarray:
  """Latent centres ``c_k`` of the ``grid_size^2`` tiles, float64 ``[G^2, 2]``.

  Args:
    grid_size: tiles per side ``G``, at least 1.
    latent_range: ``(lo, hi)``, the latent square ``[lo, hi]^2``.

  Returns:
    ``c[k] = (lo + (col + 0.5) h, lo + (row + 0.5) h)`` for
    ``k = row * G + col`` and ``h = (hi - lo) / G``.

  Raises:
    ValueError: for ``grid_size < 1`` or a bad ``latent_range``.
  """
  grid_size = check_int(grid_size, "grid_size", 1)
  lo, hi = check_latent_range(latent_range)
  side = lo + (np.arange(grid_size) + 0.5) * (hi - lo) / grid_size
  xs, ys = np.meshgrid(side, side)    # [row, col]
  return np.stack([xs.ravel(), ys.ravel()], axis=1)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
  return np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])


def tile_prior(grid_size: int, latent_range=(-1.0, 1.0),
               prior: Prior = "uniform") -> np.ndarray:
  """Prior mass ``pi_k`` of every tile, float64 ``[G^2]`` summing to 1.

  Args:
    grid_size: tiles per side ``G``, at least 1.
    latent_range: ``(lo, hi)``, the latent square ``[lo, hi]^2``.
    prior: ``'uniform'``, ``'gaussian'`` (standard normal mass of each tile,
      normalised over the square) or ``G^2`` non-negative masses, not all 0.

  Returns:
    The masses ``pi_k``, in the tile order of ``tile_centres``.

  Raises:
    ValueError: for an unknown prior name, masses of another shape, negative,
      non-finite or all zero, or a bad grid.
  """
  grid_size = check_int(grid_size, "grid_size", 1)
  lo, hi = check_latent_range(latent_range)
  num_tiles = grid_size * grid_size
  if isinstance(prior, str):
    if prior == "uniform":
      return np.full(num_tiles, 1.0 / num_tiles)
    if prior == "gaussian":
      edges = np.linspace(lo, hi, grid_size + 1)
      side = np.diff(_normal_cdf(edges))          # mass of each 1-D interval
      if not np.any(side > 0):
        raise ValueError(
            f"the Gaussian prior has no mass in the latent square "
            f"{(lo, hi)} at float64 precision.")
      mass = np.outer(side, side).ravel()        # [row, col] -> k
      return mass / mass.sum()
    raise ValueError(
        f"prior must be one of {PRIORS} or an array of {num_tiles} masses; "
        f"got {prior!r}.")
  try:
    mass = np.asarray(prior, np.float64)
  except (TypeError, ValueError):
    raise ValueError(
        f"prior must be one of {PRIORS} or an array of {num_tiles} masses; "
        f"got {prior!r}.") from None
  if mass.shape != (num_tiles,):
    raise ValueError(
        f"prior masses must have shape ({num_tiles},), one per tile of the "
        f"{grid_size}x{grid_size} grid; got shape {mass.shape}.")
  if not np.all(np.isfinite(mass)) or np.any(mass < 0) or mass.sum() <= 0:
    raise ValueError(
        "prior masses must be finite, non-negative and not all zero.")
  return mass / mass.sum()
