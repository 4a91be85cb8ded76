"""Procedurally generated sprites: one white shape on black, dSprites-like.

``make_sprites`` draws ``num_examples`` images of ``image_size`` x
``image_size`` pixels, each holding a single shape (square, ellipse, triangle
or heart) at a random position, scale and rotation, anti-aliased by
supersampling; it needs no download and the default experiment trains on it.
``sprites_dataset`` builds a train and a test split from disjoint seeds.

Geometry. Each shape is defined in its own unit coordinates, where it lies
inside the unit disc and its area centroid is the origin, and then scaled by
``scale * image_size`` pixels, rotated by ``rotation`` and moved to ``(x, y)``:

* ``scale``: the radius of the disc that encloses the shape, as a fraction of
  the image side, uniform in [0.15, 0.35].
* ``rotation``: radians, uniform in [0, 2 pi] (the upper end only through
  float32 rounding), counter-clockwise as the image is displayed (row 0 at
  the top). At rotation 0 the square is axis aligned, the ellipse's long axis
  (twice its short one) is horizontal, the equilateral triangle has a vertex
  at the top and the heart its tip at the bottom.
* ``x``, ``y``: the shape's area centroid in pixel units, ``x`` along columns
  and ``y`` along rows (down), with 0 at the left / top edge of the image, so
  pixel ``[i, j]`` spans ``[j, j + 1) x [i, i + 1)`` and its centre is at
  ``(j + 0.5, i + 0.5)``. Each is uniform over the positions that keep the
  enclosing disc inside the image, ``[r, image_size - r]`` with
  ``r = scale * image_size``, so no shape is ever clipped and the
  intensity-weighted centroid of an image is ``(x, y)`` up to the
  sampling error (about 0.1 pixel at most at 28 x 28).

A pixel's value is the fraction of its 4 x 4 sub-pixel centres that fall in
the shape, a multiple of 1/16 in [0, 1].

Determinism. All randomness comes from ``np.random.default_rng(seed)``, whose
PCG64 stream and ``random()`` are specified bit for bit; example ``i`` uses
row ``i`` of one ``[num_examples, 5]`` draw, so ``make_sprites(n, seed=s)`` is
a prefix of ``make_sprites(m, seed=s)`` for ``m > n``. The rendering uses
only IEEE-754 operations that are correctly rounded (+, -, *, /, abs, max,
floor, comparisons, casts), with no reductions over floats (sub-pixels are
counted in integers) and no library ``sin``/``cos``
(whose last bit varies between libm and NumPy's SIMD builds): cosine and sine
of the rotation come from a fixed Taylor polynomial. The same arguments
therefore give byte-identical arrays on any machine.

Speed. Each example is rendered only in the window of pixels around its
enclosing disc, in chunks of about 64k sub-pixels so that the temporaries
stay in cache. 20,000 images of 28 x 28 take 0.5 to 0.8 s (up to 1.2 s while
other jobs loaded the machine) on the 2-core development machine, single
threaded, NumPy 2.4, measured with::

  python -m timeit -n 1 -r 5 -s "from geco_jax.data import make_sprites" \
      "make_sprites(20000)"
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from geco_jax._validation import check_int
from geco_jax.data._portable_math import taylor_sin_cos

__all__ = ["SHAPES", "make_sprites", "sprites_dataset"]

SHAPES = ("square", "ellipse", "triangle", "heart")
"""The shape names ``make_sprites`` knows, in its default order."""

MIN_SCALE = 0.15
MAX_SCALE = 0.35
MIN_IMAGE_SIZE = 8

_SUPERSAMPLE = 4          # sub-pixels per pixel side
_CHUNK_SUBPIXELS = 1 << 16  # sub-pixels per chunk: 256 KiB temporaries

# Ellipse semi-axes in unit coordinates (long axis along u at rotation 0).
_ELLIPSE_A = 1.0
_ELLIPSE_B = 0.5
# The heart is the region (X^2 + Y^2 - 1)^3 - X^2 Y^3 <= 0. Its area centroid
# is (0, 0.29348253) and its farthest point from there is the tip (0, -1), at
# 1.29348253; _HEART_RADIUS rounds that up so the heart lies in the unit disc
# (measured on a 12000^2 grid, area 3.6619766, and by bisection along
# 200,001 rays).
_HEART_CENTROID_Y = 0.29348253
_HEART_RADIUS = 1.2935

# Areas in unit coordinates (radius 1): ink of an image = area * (scale*size)^2.
UNIT_AREAS = {
    "square": 2.0,                               # side sqrt(2)
    "ellipse": np.pi * _ELLIPSE_A * _ELLIPSE_B,
    "triangle": 3.0 * np.sqrt(3.0) / 4.0,        # equilateral, circumradius 1
    "heart": 3.6619766 / _HEART_RADIUS**2,
}
"""Area of each shape when ``scale * image_size`` is 1 pixel."""


def _sin_cos(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sine and cosine of angles in [0, 2 pi], from +, - and * only.

  A Taylor polynomial of degree 27/28 about pi (error below 1e-14), so that
  the result does not depend on the platform's ``sin``/``cos``.
  """
  sin, cos = taylor_sin_cos(np.asarray(theta, np.float64) - np.pi, terms=14)
  # sin(t + pi) = -sin(t), cos(t + pi) = -cos(t).
  return -sin, -cos


def _inside(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether the points ``(u, v)`` (unit coordinates, v up) lie in the shape."""
  if kind == "square":
    half = np.float32(np.sqrt(0.5))
    return np.maximum(np.abs(u), np.abs(v)) <= half
  if kind == "ellipse":
    a = u * np.float32(1.0 / _ELLIPSE_A)
    b = v * np.float32(1.0 / _ELLIPSE_B)
    return a * a + b * b <= np.float32(1.0)
  if kind == "triangle":
    # Equilateral, vertex up, circumradius 1: edges at distance 1/2.
    return (v >= np.float32(-0.5)) & (
        np.float32(np.sqrt(3.0)) * np.abs(u) + v <= np.float32(1.0))
  if kind == "heart":
    x = u * np.float32(_HEART_RADIUS)
    y = v * np.float32(_HEART_RADIUS) + np.float32(_HEART_CENTROID_Y)
    x2 = x * x
    y2 = y * y
    w = x2 + y2 - np.float32(1.0)
    return w * w * w <= x2 * (y2 * y)
  raise AssertionError(kind)


def _render(kind: str, window: int, left, top, scale, cos, sin, x, y,
            image_size: int) -> np.ndarray:
  """Windows [n, window, window] float32 of one shape kind.

  Window ``m`` covers pixels ``[top[m], top[m] + window)`` x ``[left[m],
  left[m] + window)`` of image ``m``; ``left``, ``top`` are int [n] arrays
  and the factors float32 [n] arrays. A sub-pixel's coordinates do not depend
  on the window, so a pixel's value is the same in any window containing it.
  """
  n = scale.shape[0]
  s = _SUPERSAMPLE
  # Sub-pixel centres of each window along one axis, in pixel units (exact:
  # small integers plus 0.5, times 1/4).
  steps = np.arange(window * s, dtype=np.float32)
  grid_x = ((left.astype(np.float32) * np.float32(s))[:, None] + steps
            + np.float32(0.5)) * np.float32(1.0 / s)
  grid_y = ((top.astype(np.float32) * np.float32(s))[:, None] + steps
            + np.float32(0.5)) * np.float32(1.0 / s)
  inv_r = (np.float32(1.0) / (scale * np.float32(image_size)))[:, None]
  # Offsets from the centre in units of the radius, y pointing up.
  dx = (grid_x - x[:, None]) * inv_r          # [n, window*s]
  dy = (y[:, None] - grid_y) * inv_r          # [n, window*s]
  c = cos[:, None]
  sn = sin[:, None]
  # Rotate the points by -rotation: (u, v) = R(-theta) (dx, dy). Each term is
  # separable, so the full [n, window*s, window*s] grids cost one addition.
  u = (c * dx)[:, None, :] + (sn * dy)[:, :, None]
  v = (c * dy)[:, :, None] - (sn * dx)[:, None, :]
  inside = _inside(kind, u, v)
  # Count the sub-pixels in each pixel. Strided additions of uint8 views are
  # several times faster than ``sum(axis=(2, 4))`` over the middle axes.
  bits = inside.view(np.uint8).reshape(n, window, s, window, s)
  rows = bits[..., 0].copy()
  for k in range(1, s):
    rows += bits[..., k]
  counts = rows[:, :, 0]
  for k in range(1, s):
    counts += rows[:, :, k]
  return counts.astype(np.float32) * np.float32(1.0 / (s * s))


def _check_shapes(shapes) -> tuple[str, ...]:
  if isinstance(shapes, str):
    raise ValueError(
        f"shapes must be a sequence of shape names such as ({shapes!r},), not "
        f"the string {shapes!r}.")
  shapes = tuple(shapes)
  if not shapes:
    raise ValueError(f"shapes must name at least one of {SHAPES}; got ().")
  unknown = [name for name in shapes if name not in SHAPES]
  if unknown:
    raise ValueError(
        f"Unknown shape name(s) {unknown}; known shapes are {SHAPES}.")
  if len(set(shapes)) != len(shapes):
    raise ValueError(f"shapes must not repeat a name; got {shapes}.")
  return shapes


def make_sprites(
    num_examples: int,
    *,
    image_size: int = 28,
    seed: int = 0,
    shapes: Sequence[str] = SHAPES,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Draw ``num_examples`` sprite images and the factors that generated them.

  Args:
    num_examples: how many images, at least 1.
    image_size: side of the square images in pixels, at least 8.
    seed: a non-negative integer for ``np.random.default_rng``.
    shapes: names of the shapes to draw from, uniformly; a subset of
      ``SHAPES`` in any order. The ``'shape'`` factor indexes this tuple.

  Returns:
    ``(images, factors)``: images float32 ``[num_examples, image_size,
    image_size, 1]`` in [0, 1], white shape on black; factors a dict of
    ``[num_examples]`` arrays: ``'shape'`` int32 index into ``shapes``,
    ``'scale'`` (radius of the disc enclosing the shape / image side),
    ``'rotation'`` (radians, counter-clockwise as displayed), ``'x'`` and
    ``'y'`` (the shape's centroid in pixels, column and row, from the
    top-left corner of the image), all float32. See the module docstring for
    the conventions and the guarantees of determinism.

  Raises:
    ValueError: for ``num_examples < 1``, ``image_size < 8``, an unknown,
      repeated or missing shape name, or a negative seed.
  """
  num_examples = check_int(num_examples, "num_examples", 1)
  image_size = check_int(image_size, "image_size", MIN_IMAGE_SIZE)
  seed = check_int(seed, "seed", 0)
  shapes = _check_shapes(shapes)

  # One row of uniforms per example: shape, scale, rotation, x, y.
  draws = np.random.default_rng(seed).random((num_examples, 5))
  shape = np.minimum(np.floor(draws[:, 0] * len(shapes)),
                     len(shapes) - 1).astype(np.int32)
  scale = (MIN_SCALE + (MAX_SCALE - MIN_SCALE) * draws[:, 1]).astype(np.float32)
  rotation = (2.0 * np.pi * draws[:, 2]).astype(np.float32)
  # Keep the enclosing disc, radius r = scale * image_size, inside the image.
  radius = scale.astype(np.float64) * image_size
  span = image_size - 2.0 * radius
  x = (radius + span * draws[:, 3]).astype(np.float32)
  y = (radius + span * draws[:, 4]).astype(np.float32)
  sin, cos = _sin_cos(rotation)
  sin = sin.astype(np.float32)
  cos = cos.astype(np.float32)

  # Render each example only in a window around its enclosing disc: the
  # pixels meeting [x - r, x + r] x [y - r, y + r], widened by 1/1000 pixel
  # against rounding, clipped to the image. Examples are grouped by shape and
  # window side; every other pixel is 0.
  padded = radius + 1e-3
  window = np.minimum(np.ceil(2.0 * padded).astype(np.int64) + 1, image_size)
  left = np.clip(np.floor(x - padded).astype(np.int64), 0, image_size - window)
  top = np.clip(np.floor(y - padded).astype(np.int64), 0, image_size - window)
  images = np.zeros((num_examples, image_size, image_size), np.float32)
  for index, kind in enumerate(shapes):
    of_kind = shape == index
    for side in np.unique(window[of_kind]):
      members = np.flatnonzero(of_kind & (window == side))
      side = int(side)
      chunk = max(1, _CHUNK_SUBPIXELS // (side * _SUPERSAMPLE) ** 2)
      offsets = np.arange(side)
      for start in range(0, members.size, chunk):
        idx = members[start:start + chunk]
        patch = _render(kind, side, left[idx], top[idx], scale[idx], cos[idx],
                        sin[idx], x[idx], y[idx], image_size)
        rows = top[idx][:, None, None] + offsets[None, :, None]
        cols = left[idx][:, None, None] + offsets[None, None, :]
        images[idx[:, None, None], rows, cols] = patch

  factors = {"shape": shape, "scale": scale, "rotation": rotation, "x": x,
             "y": y}
  return images[..., None], factors


def sprites_dataset(
    num_train: int,
    num_test: int,
    *,
    image_size: int = 28,
    seed: int = 0,
    shapes: Sequence[str] = SHAPES,
) -> dict[str, dict[str, np.ndarray]]:
  """A train and a test split of sprites, from disjoint seeds.

  The train split is ``make_sprites(num_train, seed=2 * seed)`` and the test
  split ``make_sprites(num_test, seed=2 * seed + 1)``: train seeds are even
  and test seeds odd, so no base seed's test split shares a stream with any
  base seed's train split, and each split can be regenerated on its own.

  Returns:
    ``{'train': {...}, 'test': {...}}``, each with ``'image'`` (float32
    ``[n, image_size, image_size, 1]``) and the factors of ``make_sprites``
    (``'shape'``, ``'scale'``, ``'rotation'``, ``'x'``, ``'y'``).

  Raises:
    ValueError: as ``make_sprites``, naming ``num_train`` or ``num_test``
      when a count is below 1.
  """
  seed = check_int(seed, "seed", 0)
  splits = {}
  for name, count, split_seed in (("train", num_train, 2 * seed),
                                  ("test", num_test, 2 * seed + 1)):
    try:
      images, factors = make_sprites(count, image_size=image_size,
                                     seed=split_seed, shapes=shapes)
    except ValueError as error:
      if "num_examples" in str(error):
        raise ValueError(
            str(error).replace("num_examples", f"num_{name}")) from None
      raise
    splits[name] = {"image": images, **factors}
  return splits
