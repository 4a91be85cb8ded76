r"""Lipschitz constraints on the tiled decoder (Appendix B, Fig. 7) as a projection.

A decoder that is constant, ``M_k``, on tile ``k`` has no notion that
neighbouring latent points should decode to nearby outputs. Appendix B adds a
quadratic penalty that ties the reconstructions of tiles together::

    R(M) = sum_{k < l} Omega_kl ||M_k - M_l||^2 = tr(M^T L M),
    L    = diag(Omega 1) - Omega                     (graph Laplacian of Omega)

with symmetric weights ``Omega_kl >= 0`` built from the latent tile centres
``c_k`` (see ``tile_centres``):

* ``kind='local'``: ``Omega_kl = 1`` when ``0 < ||c_k - c_l|| <= radius``,
  else 0 (default ``radius = 1.5 h`` with ``h`` the tile side: the 8 tiles
  around a tile), a locally Lipschitz decoder;
* ``kind='global'``: every pair, ``Omega_kl = (h / ||c_k - c_l||)^2``, the
  squared Lipschitz quotient ``||g(z) - g(z')||^2 / ||z - z'||^2`` of the
  pair measured in tile sides (adjacent tiles weigh 1, far tiles less).

Derivation (the paper's Eqs. 24-25 were lost in extraction). For fixed
posteriors ``w_ik`` (``reconstruction_fixed_points``), the decoder step
minimises the expected reconstruction error plus the penalty with strength
``gamma``::

    J(M) = sum_i sum_k w_ik ||x_i - M_k||^2 + gamma tr(M^T L M).

``J`` is a convex quadratic in ``M``; with ``s_k = sum_i w_ik``,
``D_w = diag(s)`` and ``X`` the ``[N, D]`` data, ``grad J = 0`` reads::

    (D_w + gamma L) M = W^T X = D_w F(M),      F(M)_k = sum_i w_ik x_i / s_k,

where ``F`` is the unconstrained fixed-point map. This exact step needs a
``[K, K]`` solve that depends on ``w`` at every iteration. At an equiprobable
partition (Props. 3.1 and 3.3) every point's posterior is the prior
restricted to its support, so ``s_k = N pi_k``; for the uniform prior of the
paper that is ``D_w = (N / K) I``, and the step becomes the fixed linear
projection of Appendix B::

    M = P F(M),     P = (I + gamma' L)^-1,     gamma' = gamma K / N.

**What is implemented** is this ``P`` with ``strength = gamma'`` (the
penalty's multiplier per unit tile load; it is a free Lagrange multiplier in
the paper, so the factor ``K / N`` is absorbed in it), applied after each
step of the unconstrained map: ``M <- (1 - eps) M + eps P F(M)``. For a
non-uniform prior it is the same ``P``, i.e. ``D_w`` replaced by its mean
``(N / K) I``. ``P F`` is the minimiser of
``||M - F||_F^2 + gamma' tr(M^T L M)``: Laplacian smoothing of ``F``.

Properties of ``P`` (``L`` is symmetric positive semi-definite with
``L 1 = 0``, and ``I + gamma' L`` is a non-singular M-matrix):

* ``P`` is symmetric, its eigenvalues ``1 / (1 + gamma' lambda_j)`` lie in
  ``(0, 1]``, its rows sum to 1 and its entries are ``>= 0``: each row of
  ``P M`` is a convex combination of rows of ``M``, so reconstructions stay
  in the convex hull of the data;
* with ``L = sum_j lambda_j u_j u_j^T``,
  ``R(P M) = sum_j lambda_j / (1 + gamma' lambda_j)^2 ||u_j^T M||^2``, which
  never increases as ``gamma'`` grows: a stronger constraint never increases
  the neighbour distances ``R`` of what it projects;
* ``gamma' = 0`` gives ``P = I``, the unconstrained map.
"""

from __future__ import annotations

import math

import numpy as np

from geco_jax._validation import check_int
from geco_jax.theory.tiles import check_latent_range
from geco_jax.theory.tiles import tile_centres

__all__ = [
    "KINDS",
    "graph_laplacian",
    "lipschitz_projection",
    "lipschitz_weights",
    "neighbour_energy",
]

KINDS = ("local", "global")


def lipschitz_weights(grid_size: int, latent_range=(-1.0, 1.0), *,
                      kind: str = "local", radius=None) -> np.ndarray:
  """The pair weights ``Omega``, float64 ``[G^2, G^2]``, symmetric, zero diagonal.

  Args:
    grid_size: tiles per side ``G``, at least 1.
    latent_range: ``(lo, hi)``, the latent square.
    kind: ``'local'`` (weight 1 for tiles whose centres lie within
      ``radius``) or ``'global'`` (every pair, weight ``(h / distance)^2``
      with ``h`` the tile side).
    radius: for ``'local'``, in latent units, > 0; default ``1.5 h`` (the 8
      surrounding tiles). Must be None for ``'global'``.

  Returns:
    ``Omega`` in the tile order of ``tile_centres``.

  Raises:
    ValueError: for an unknown kind, a radius that is not a positive number
      (or one given for ``'global'``), or a bad grid.
  """
  grid_size = check_int(grid_size, "grid_size", 1)
  lo, hi = check_latent_range(latent_range)
  side = (hi - lo) / grid_size
  centres = tile_centres(grid_size, (lo, hi))
  distance = np.sqrt(
      np.sum((centres[:, None, :] - centres[None, :, :]) ** 2, axis=-1))
  off_diagonal = ~np.eye(len(centres), dtype=bool)
  if kind == "local":
    if radius is None:
      radius = 1.5 * side
    try:
      radius = float(radius)
    except (TypeError, ValueError):
      raise ValueError(f"radius must be a number; got {radius!r}.") from None
    if not (math.isfinite(radius) and radius > 0):
      raise ValueError(f"radius must be finite and > 0; got {radius!r}.")
    # A relative slack so that radius = h catches the 4 edge neighbours.
    return ((distance <= radius * (1 + 1e-9)) & off_diagonal).astype(
        np.float64)
  if kind == "global":
    if radius is not None:
      raise ValueError(
          "radius applies to kind='local' only; global weights are "
          "(h / distance)^2 over all pairs.")
    safe = np.where(off_diagonal, distance, 1.0)
    return np.where(off_diagonal, (side / safe) ** 2, 0.0)
  raise ValueError(f"kind must be one of {KINDS}; got {kind!r}.")


def graph_laplacian(omega) -> np.ndarray:
  """``L = diag(Omega 1) - Omega`` of symmetric non-negative weights, float64."""
  omega = _check_square(omega, "omega")
  if not np.allclose(omega, omega.T) or np.any(omega < 0):
    raise ValueError("omega must be symmetric and non-negative.")
  return np.diag(omega.sum(axis=1)) - omega


def lipschitz_projection(grid_size: int, latent_range=(-1.0, 1.0), *,
                         kind: str = "local", radius=None,
                         strength: float = 1.0) -> np.ndarray:
  """The projection ``P = (I + strength L)^-1``, float64 ``[G^2, G^2]``.

  Pass it as ``reconstruction_fixed_points(..., lipschitz=P)``, whose step
  becomes ``M <- (1 - eps) M + eps P F(M)`` (see the module docstring for the
  derivation and the properties: symmetric, rows summing to 1, entries
  ``>= 0``, ``P = I`` at ``strength = 0``).

  Args:
    grid_size: tiles per side ``G``, at least 1.
    latent_range: ``(lo, hi)``, the latent square.
    kind: ``'local'`` or ``'global'`` (see ``lipschitz_weights``).
    radius: the local radius in latent units; default 1.5 tile sides.
    strength: ``gamma' >= 0``, the penalty's multiplier per unit tile load.

  Returns:
    ``P``, symmetrised to round-off.

  Raises:
    ValueError: for a negative or non-finite strength, or bad weights
      arguments.
  """
  omega = lipschitz_weights(grid_size, latent_range, kind=kind, radius=radius)
  try:
    strength = float(strength)
  except (TypeError, ValueError):
    raise ValueError(f"strength must be a number; got {strength!r}.") from None
  if not (math.isfinite(strength) and strength >= 0):
    raise ValueError(f"strength must be finite and >= 0; got {strength!r}.")
  system = np.eye(len(omega)) + strength * graph_laplacian(omega)
  projection = np.linalg.solve(system, np.eye(len(omega)))
  return 0.5 * (projection + projection.T)


def neighbour_energy(reconstructions, omega) -> float:
  """The penalty ``sum_{k<l} Omega_kl ||M_k - M_l||^2 = tr(M^T L M)``.

  Args:
    reconstructions: ``M``, ``[K, D]``.
    omega: ``[K, K]`` symmetric pair weights (``lipschitz_weights``).

  Returns:
    The weighted sum of squared distances between tiles' reconstructions.
  """
  omega = _check_square(omega, "omega")
  means = np.asarray(reconstructions, np.float64)
  if means.ndim != 2 or means.shape[0] != omega.shape[0]:
    raise ValueError(
        f"reconstructions must have shape [{omega.shape[0]}, D]; got "
        f"{means.shape}.")
  squared = np.sum((means[:, None, :] - means[None, :, :]) ** 2, axis=-1)
  return float(0.5 * np.sum(omega * squared))


def _check_square(matrix, name: str) -> np.ndarray:
  matrix = np.asarray(matrix, np.float64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"{name} must be a square matrix; got shape "
                     f"{matrix.shape}.")
  if not np.all(np.isfinite(matrix)):
    raise ValueError(f"{name} must be finite.")
  return matrix
