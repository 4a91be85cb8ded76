"""2-D mixtures for the theory experiments (paper section 3, Figs. 2 and 7).

The fixed-point iteration of a tiled latent space (``docs/paper-notes.md``
section 8, Appendix A of the paper) is run on small 2-D data sets; these
draw them:

* ``mixture_of_gaussians``: isotropic Gaussian blobs, by default 8 on a ring.
* ``mixture_of_lines``: noisy parallel line segments, by default 3.
* ``mixture_of_circles``: noisy circles, by default 2 concentric ones.

Each returns ``{'points': float32 [n, 2], 'component': int32 [n]}``, where
``component`` is the index of the mixture component that drew the point.
With the defaults the points lie within [-1, 1]^2 except for rare Gaussian
tails (more than 4 to 5 standard deviations out).

Sampling. A point's component is drawn with probability ``weights[k]``
(uniform by default) and then the point from that component. Randomness comes
from ``np.random.SeedSequence(seed).spawn(2)``: one ``default_rng`` stream
draws the components and the positions along the curve, the other the
Gaussian noise; each stream is read point by point, so the first ``n``
points of a call with ``num_points = m > n`` are the points of the call with
``num_points = n``.
"""

from __future__ import annotations


import numpy as np

from geco_jax._validation import check_int

__all__ = [
    "default_gaussian_centres",
    "mixture_of_circles",
    "mixture_of_gaussians",
    "mixture_of_lines",
]


# ------------------------------------------------------------------ checks ---

def _check_non_negative(value, name: str, shape=()) -> np.ndarray:
  """A finite float64 array >= 0 broadcast to ``shape``, or a ValueError."""
  try:
    array = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number; got {value!r}.") from None
  if array.ndim > len(shape) or (array.ndim and array.shape != shape):
    raise ValueError(
        f"{name} must be a scalar or have shape {shape}; got shape "
        f"{array.shape}.")
  if not np.all(np.isfinite(array)) or np.any(array < 0):
    raise ValueError(f"{name} must be finite and non-negative; got {value!r}.")
  return np.broadcast_to(array, shape)


def _check_centres(centres, name: str = "centres") -> np.ndarray:
  try:
    centres = np.asarray(centres, np.float64)
  except (TypeError, ValueError):
    raise ValueError(
        f"{name} must be an array of shape [K, 2]; got {centres!r}.") from None
  if centres.ndim != 2 or centres.shape[1] != 2 or centres.shape[0] < 1:
    raise ValueError(
        f"{name} must have shape [K, 2] with K >= 1; got shape "
        f"{centres.shape}.")
  if not np.all(np.isfinite(centres)):
    raise ValueError(f"{name} must be finite.")
  return centres


def _check_weights(weights, num_components: int) -> np.ndarray:
  """Mixture weights: ``[K]``, non-negative, summing to 1 (within 1e-6)."""
  if weights is None:
    return np.full(num_components, 1.0 / num_components)
  weights = np.asarray(weights, np.float64)
  if weights.shape != (num_components,):
    raise ValueError(
        f"weights must have shape ({num_components},), one per component; "
        f"got shape {weights.shape}.")
  if not np.all(np.isfinite(weights)) or np.any(weights < 0):
    raise ValueError(f"weights must be finite and non-negative; got {weights}.")
  if abs(weights.sum() - 1.0) > 1e-6:
    raise ValueError(f"weights must sum to 1; they sum to {weights.sum()}.")
  return weights


# ---------------------------------------------------------------- sampling ---

def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
  """Independent generators for components/positions and for noise."""
  seed = check_int(seed, "seed", 0)
  first, second = np.random.SeedSequence(seed).spawn(2)
  return np.random.default_rng(first), np.random.default_rng(second)


def _components(uniforms: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Inverse-CDF draw of components; a component of weight 0 never appears."""
  cumulative = np.cumsum(weights)
  cumulative = cumulative / cumulative[-1]
  cumulative[-1] = 1.0
  return np.searchsorted(cumulative, uniforms, side="right").astype(np.int32)


def _result(points: np.ndarray, component: np.ndarray) -> dict[str, np.ndarray]:
  return {"points": points.astype(np.float32), "component": component}


# ---------------------------------------------------------------- mixtures ---

def default_gaussian_centres(num_centres: int = 8,
                             radius: float = 0.75) -> np.ndarray:
  """``num_centres`` points evenly on a circle about the origin.

  Point ``k`` is ``radius * (cos a_k, sin a_k)`` with ``a_k = 2 pi k / K``:
  the first on the positive x axis, then counter-clockwise.
  """
  num_centres = check_int(num_centres, "num_centres", 1)
  angle = 2.0 * np.pi * np.arange(num_centres) / num_centres
  return radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)


def mixture_of_gaussians(
    num_points: int,
    *,
    centres=None,
    std=0.05,
    weights=None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
  """Points from a mixture of isotropic 2-D Gaussians.

  Point ``i`` is ``centres[c_i] + std[c_i] * e_i`` with ``e_i ~ N(0, I_2)``
  and ``c_i`` drawn with probabilities ``weights``.

  Args:
    num_points: how many points, at least 1.
    centres: ``[K, 2]`` means; default ``default_gaussian_centres()``, 8
      centres evenly on the circle of radius 0.75 about the origin, the
      first at ``(0.75, 0)``, counter-clockwise.
    std: standard deviation of each coordinate, >= 0: a scalar or one per
      component ``[K]``.
    weights: ``[K]`` component probabilities, non-negative, summing to 1;
      default uniform.
    seed: a non-negative integer (see the module docstring).

  Returns:
    ``'points'`` float32 ``[num_points, 2]``, ``'component'`` int32
    ``[num_points]``.

  Raises:
    ValueError: for ``num_points < 1``, centres not ``[K, 2]`` or not finite,
      a negative or non-finite std, std or weights of the wrong shape, weights
      that are negative or do not sum to 1, or a negative seed.
  """
  num_points = check_int(num_points, "num_points", 1)
  centres = _check_centres(default_gaussian_centres() if centres is None
                           else centres)
  num_components = centres.shape[0]
  std = _check_non_negative(std, "std", (num_components,))
  weights = _check_weights(weights, num_components)
  draw, noise = _streams(seed)
  component = _components(draw.random(num_points), weights)
  points = (centres[component]
            + std[component, None] * noise.standard_normal((num_points, 2)))
  return _result(points, component)


def mixture_of_lines(
    num_points: int,
    *,
    num_lines: int = 3,
    length: float = 1.6,
    spacing: float = 0.6,
    angle: float = 0.0,
    noise: float = 0.02,
    weights=None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
  """Points near parallel line segments.

  Line ``k`` (``k = 0 .. K-1``) is the segment of the given ``length`` with
  direction ``d = (cos a, sin a)``, ``a = angle`` in degrees
  counter-clockwise from the x axis, whose midpoint is
  ``m_k = (k - (K - 1) / 2) * spacing * (-sin a, cos a)``: the segments are
  parallel, evenly spaced and centred on the origin. Point ``i`` is
  ``m_c + t * d + noise * e`` with ``t`` uniform on
  ``[-length / 2, length / 2]`` and ``e ~ N(0, I_2)``, so its distance from
  the line is Gaussian with standard deviation ``noise``. By default: three
  horizontal segments at y = -0.6, 0 and 0.6, x in [-0.8, 0.8].

  Args:
    num_points: how many points, at least 1.
    num_lines: how many segments, at least 1.
    length: segment length, >= 0.
    spacing: distance between neighbouring segments, >= 0.
    angle: direction of the segments in degrees, finite.
    noise: standard deviation of the isotropic Gaussian noise, >= 0.
    weights: ``[num_lines]`` component probabilities; default uniform.
    seed: a non-negative integer (see the module docstring).

  Returns:
    ``'points'`` float32 ``[num_points, 2]``, ``'component'`` int32
    ``[num_points]`` (the segment ``k``).

  Raises:
    ValueError: for counts below 1, a negative or non-finite length, spacing
      or noise, a non-finite angle, bad weights or a negative seed.
  """
  num_points = check_int(num_points, "num_points", 1)
  num_lines = check_int(num_lines, "num_lines", 1)
  length = float(_check_non_negative(length, "length"))
  spacing = float(_check_non_negative(spacing, "spacing"))
  noise = float(_check_non_negative(noise, "noise"))
  angle = np.asarray(angle, np.float64)
  if angle.shape != () or not np.isfinite(angle):
    raise ValueError(f"angle must be a finite number of degrees; got {angle}.")
  weights = _check_weights(weights, num_lines)
  radians = np.deg2rad(float(angle))
  direction = np.array([np.cos(radians), np.sin(radians)])
  normal = np.array([-np.sin(radians), np.cos(radians)])
  offsets = (np.arange(num_lines) - (num_lines - 1) / 2.0) * spacing
  midpoints = offsets[:, None] * normal[None, :]
  draw, noise_stream = _streams(seed)
  uniforms = draw.random((num_points, 2))
  component = _components(uniforms[:, 0], weights)
  along = (uniforms[:, 1] - 0.5) * length
  points = (midpoints[component] + along[:, None] * direction[None, :]
            + noise * noise_stream.standard_normal((num_points, 2)))
  return _result(points, component)


def mixture_of_circles(
    num_points: int,
    *,
    centres=None,
    radii=(0.35, 0.8),
    noise: float = 0.02,
    weights=None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
  """Points near circles.

  Point ``i`` is ``centres[c] + radii[c] * (cos t, sin t) + noise * e`` with
  ``t`` uniform on [0, 2 pi) and ``e ~ N(0, I_2)``: uniform along the circle
  (each circle gets ``weights[c]`` of the points whatever its length), its
  distance from the centre off ``radii[c]`` by about ``noise`` (exactly
  Gaussian along the radius for ``noise`` much smaller than the radius). By
  default two concentric circles about the origin, radii 0.35 and 0.8.

  Args:
    num_points: how many points, at least 1.
    centres: ``[K, 2]`` circle centres; default all at the origin. ``K`` is
      taken from ``centres`` when given, else from ``radii``.
    radii: ``[K]`` radii >= 0, or a scalar for every circle (then
      ``centres`` must be given to fix ``K``, unless ``K = 1``); with
      ``centres`` of another ``K`` than 2, give ``radii`` too.
    noise: standard deviation of the isotropic Gaussian noise, >= 0.
    weights: ``[K]`` component probabilities; default uniform.
    seed: a non-negative integer (see the module docstring).

  Returns:
    ``'points'`` float32 ``[num_points, 2]``, ``'component'`` int32
    ``[num_points]`` (the circle ``k``).

  Raises:
    ValueError: for ``num_points < 1``, centres not ``[K, 2]``, radii of
      another length or negative, a negative noise, bad weights or a
      negative seed.
  """
  num_points = check_int(num_points, "num_points", 1)
  if centres is None:
    radii_array = np.atleast_1d(np.asarray(radii, np.float64))
    if radii_array.ndim != 1 or radii_array.size < 1:
      raise ValueError(
          f"radii must be a scalar or have shape [K] with K >= 1; got "
          f"{radii!r}.")
    centres = np.zeros((radii_array.size, 2))
  centres = _check_centres(centres)
  num_components = centres.shape[0]
  radii = _check_non_negative(radii, "radii", (num_components,))
  noise = float(_check_non_negative(noise, "noise"))
  weights = _check_weights(weights, num_components)
  draw, noise_stream = _streams(seed)
  uniforms = draw.random((num_points, 2))
  component = _components(uniforms[:, 0], weights)
  theta = 2.0 * np.pi * uniforms[:, 1]
  on_circle = radii[component, None] * np.stack(
      [np.cos(theta), np.sin(theta)], axis=1)
  points = (centres[component] + on_circle
            + noise * noise_stream.standard_normal((num_points, 2)))
  return _result(points, component)
