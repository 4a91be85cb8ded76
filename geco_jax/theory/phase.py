r"""Critical temperatures: kinks of the order parameter ``E(beta)`` (Fig. 2).

As beta grows, reconstruction fixed points merge (``fixed_points``); at each
merge the slope of the expected reconstruction error ``E(beta)`` changes
abruptly, so the critical temperatures are where ``|d^2 E / d beta^2|`` has
its highest local maxima. The paper keeps the top 3 by height.

A swept ``E`` is noisy (finite iterations, critical slowing down near the
transitions) and a second difference amplifies noise, so the curve is
smoothed first, by a Gaussian-weighted local-linear fit::

    E_s(x_j) = a_j,   (a_j, b_j) = argmin sum_i K_ij (E_i - a - b (x_i - x_j))^2,
    K_ij = exp(-(x_i - x_j)^2 / (2 h^2)),   h = smooth * median(diff(x)),

(no first-order bias at the ends of the grid, unlike a moving average), with
``x = beta``. Then ``np.gradient`` twice, which handles a non-uniform grid,
gives ``d^2 E_s / d beta^2``; its absolute value is the curvature. Local
maxima are interior points strictly above the left neighbour and not below
the right one; the ends of the grid are never picked (their one-sided
differences are the least reliable).

A kink whose slope dE/dbeta changes by Delta becomes, after smoothing with a
kernel of width w, a peak of d^2 E_s / d beta^2 of height about
Delta / (w sqrt(2 pi)): on a uniform grid w is the same everywhere and the
heights rank the kinks by Delta. On a grid that spans decades (geometric),
``log_beta=True`` smooths in ``u = log beta`` instead (a kernel of the same
width in u, i.e. w proportional to beta) and still returns the second
derivative in beta, by the chain rule::

    d^2 E / d beta^2 = (d^2 E / du^2 - dE / du) / beta^2

(``d^2 E / du^2`` alone is not zero where E is linear in beta, so its peaks
would be bends of the log-scale plot, not kinks). There the curvature ranked
is ``beta |d^2 E_s / d beta^2|``, proportional to Delta again, so that kinks
a decade apart are compared by their slope change rather than by where they
lie. (With ``log_beta=False`` on a strongly non-uniform grid, w is a fixed
multiple of the median spacing; where the grid is coarser than w a peak's
height follows the local spacing, and heights are not comparable.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from geco_jax._validation import check_int

__all__ = ["CriticalTemperatures", "critical_temperatures", "smooth_curve"]


class CriticalTemperatures(NamedTuple):
  """The detected critical temperatures and the curves they came from.

  Attributes:
    betas: float64 ``[<= top_k]``, the betas of the highest local maxima of
      the curvature, highest first.
    heights: float64, the curvature at those betas.
    indices: int, their indices into the sorted betas.
    sorted_betas: float64 ``[B]``, the input betas in increasing order.
    smoothed: float64 ``[B]``, the smoothed ``E`` on ``sorted_betas``.
    second_derivative: float64 ``[B]``, ``d^2 E_s / d beta^2`` (signed; in
      beta also when ``log_beta``).
    curvature: float64 ``[B]``, what the maxima are taken of:
      ``|second_derivative|``, times ``sorted_betas`` when ``log_beta``.
  """
  betas: np.ndarray
  heights: np.ndarray
  indices: np.ndarray
  sorted_betas: np.ndarray
  smoothed: np.ndarray
  second_derivative: np.ndarray
  curvature: np.ndarray


def smooth_curve(x, y, smooth: float = 1.0) -> np.ndarray:
  """Gaussian-weighted local-linear smoothing of ``y(x)`` (see the module docstring).

  Args:
    x: ``[B]`` increasing abscissae.
    y: ``[B]`` values.
    smooth: kernel width in median grid spacings, >= 0; 0 returns ``y``.

  Returns:
    float64 ``[B]``.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if smooth == 0 or len(x) < 3:
    return y.copy()
  width = smooth * np.median(np.diff(x))
  offset = x[None, :] - x[:, None]                 # [j, i] = x_i - x_j
  kernel = np.exp(-0.5 * (offset / width) ** 2)
  s0 = kernel.sum(axis=1)
  s1 = (kernel * offset).sum(axis=1)
  s2 = (kernel * offset ** 2).sum(axis=1)
  t0 = kernel @ y
  t1 = (kernel * offset) @ y
  return (s2 * t0 - s1 * t1) / (s0 * s2 - s1 * s1)


def critical_temperatures(betas, errors, top_k: int = 3, *,
                          smooth: float = 1.0,
                          log_beta: bool = False) -> CriticalTemperatures:
  """Betas where ``|d^2 E / d beta^2|`` has its highest local maxima.

  Args:
    betas: ``[B]`` distinct positive betas, any order, any spacing (B >= 3).
    errors: ``[B]`` the order parameter ``E(beta)`` at those betas.
    top_k: how many maxima to keep, >= 1 (fewer if there are fewer).
    smooth: width of the smoothing kernel in median grid spacings, >= 0
      (0: no smoothing).
    log_beta: smooth over ``log beta`` instead of beta, and rank the peaks
      by ``beta |d^2 E / d beta^2|`` (for grids spanning decades; see the
      module docstring). The paper's grid is uniform in beta.

  Returns:
    A ``CriticalTemperatures``; ``.betas`` are the critical betas, highest
    peak first.

  Raises:
    ValueError: for arrays that are not 1-D of the same length >= 3, values
      that are not finite, betas <= 0 or repeated, ``top_k < 1`` or a
      negative ``smooth``.
  """
  try:
    betas = np.asarray(betas, np.float64)
    errors = np.asarray(errors, np.float64)
  except (TypeError, ValueError):
    raise ValueError("betas and errors must be 1-D arrays of numbers."
                     ) from None
  if betas.ndim != 1 or errors.shape != betas.shape or len(betas) < 3:
    raise ValueError(
        f"betas and errors must be 1-D of the same length >= 3; got shapes "
        f"{betas.shape} and {errors.shape}.")
  if not (np.all(np.isfinite(betas)) and np.all(np.isfinite(errors))):
    raise ValueError("betas and errors must be finite.")
  if np.any(betas <= 0):
    raise ValueError("betas must be > 0.")
  top_k = check_int(top_k, "top_k", 1)
  smooth = float(smooth)
  if not (math.isfinite(smooth) and smooth >= 0):
    raise ValueError(f"smooth must be finite and >= 0; got {smooth!r}.")
  order = np.argsort(betas, kind="stable")
  betas, errors = betas[order], errors[order]
  if np.any(np.diff(betas) <= 0):
    raise ValueError("betas must be distinct.")
  if log_beta:
    u = np.log(betas)
    smoothed = smooth_curve(u, errors, smooth)
    first_u = np.gradient(smoothed, u)
    second = (np.gradient(first_u, u) - first_u) / betas ** 2
    curvature = np.abs(second) * betas
  else:
    smoothed = smooth_curve(betas, errors, smooth)
    second = np.gradient(np.gradient(smoothed, betas), betas)
    curvature = np.abs(second)
  inner = np.arange(1, len(betas) - 1)
  peaks = inner[(curvature[inner] > curvature[inner - 1])
                & (curvature[inner] >= curvature[inner + 1])]
  peaks = peaks[np.argsort(-curvature[peaks], kind="stable")][:top_k]
  return CriticalTemperatures(
      betas=betas[peaks], heights=curvature[peaks], indices=peaks,
      sorted_betas=betas, smoothed=smoothed, second_derivative=second,
      curvature=curvature)
