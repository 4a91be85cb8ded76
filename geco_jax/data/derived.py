"""Datasets derived from MNIST digits, as in the paper's experiments.

Each function takes base arrays, ``images`` float ``[N, H, W, 1]`` in [0, 1]
and ``labels`` int ``[N]`` in 0..9 (MNIST: ``x / 255`` and ``y`` of one split
of ``mnist.npz``), and returns a dict of NumPy arrays:

* ``color_mnist``: three digits stacked as the R, G, B channels of one image
  (Color-MNIST of Metz et al. 2017, 1000 modes).
* ``mnist_triplets``: three digits side by side with ``l3 = (l1 + l2) mod 10``
  (unconditional).
* ``mnist_sum``: context ``(x1, x2)``, target ``x3`` with
  ``l3 = (l1 + l2) mod 10``.
* ``mnist_sum_hard``: the same layout with ``l3 = (l1 * l2) mod 10``.
* ``mnist_rotate``: context ``(x1, x2)``, target another instance of class
  ``l2`` rotated by ``36 * l1`` degrees counter-clockwise.
* ``micro_mnist``: a handful of fixed random digits (paper Fig. 8).

``rotate_images`` is the bilinear rotation ``mnist_rotate`` uses.

The paper's exact relations were lost; these follow the reading in section 7
of the project's paper notes (``shared/docs/paper-notes.md``), and each
docstring states the relation built.

Sampling. For an example the labels are drawn first, each label uniform on
0..9 and independent of the others unless a relation fixes it, so every label
(and, for Color-MNIST, every one of the 1000 triplets) is equally likely
whatever the class frequencies of the base set. Then each digit is a uniform
random instance of its class in the base set, and the three base images of
an example are always pairwise different (two digits of the same class are
two different instances). ``'index' [n, 3]`` gives the rows of the base
arrays used, so ``labels[index]`` and ``images[index]`` recover everything.
Every base class therefore needs at least 3 instances.

Determinism. All randomness comes from ``np.random.default_rng(seed)``;
example ``i`` uses row ``i`` of one ``[num_examples, k]`` draw of
``random()``, so a call with ``num_examples=n`` is a prefix of the same call
with more examples, and the same arguments give the same arrays on any
machine (the rotation uses only correctly rounded IEEE-754 operations and a
fixed Taylor polynomial for sine and cosine, no library ``sin``/``cos``).
"""

from __future__ import annotations

import numpy as np

from geco_jax._validation import check_int
from geco_jax.data._portable_math import taylor_sin_cos

__all__ = [
    "NUM_CLASSES",
    "ROTATE_DEGREES_PER_CLASS",
    "color_mnist",
    "micro_mnist",
    "mnist_rotate",
    "mnist_sum",
    "mnist_sum_hard",
    "mnist_triplets",
    "rotate_images",
]

NUM_CLASSES = 10
"""Digit classes 0..9; every relation is taken modulo this."""

ROTATE_DEGREES_PER_CLASS = 36.0
"""``mnist_rotate`` turns the target by this many degrees per unit of ``l1``."""

_MIN_PER_CLASS = 3     # three pairwise different instances of one class
_ROTATE_CHUNK = 256    # images per chunk in rotate_images: fastest measured


# ------------------------------------------------------------------ checks ---

def _check_images(images) -> np.ndarray:
  """Float32 ``[N, H, W, 1]`` in [0, 1], or a ValueError saying what is off."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(
        "images must have shape [N, height, width, 1]; got shape "
        f"{images.shape}.")
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(
        f"images must be floating point in [0, 1]; got dtype {images.dtype} "
        "(divide uint8 MNIST by 255).")
  if images.shape[0] == 0:
    raise ValueError("images must hold at least one image; got none.")
  images = images.astype(np.float32, copy=False)
  low, high = images.min(), images.max()
  if not (low >= 0.0 and high <= 1.0):   # also catches NaN
    raise ValueError(
        f"images must lie in [0, 1]; got values in [{low}, {high}].")
  return images


def _check_labels(labels, num_images: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (num_images,):
    raise ValueError(
        f"labels must have shape [N] = ({num_images},) to match images; got "
        f"shape {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
  labels = labels.astype(np.int64)
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise ValueError(
        f"labels must lie in 0..{NUM_CLASSES - 1}; got values in "
        f"[{labels.min()}, {labels.max()}].")
  return labels


def _check_base(images, labels) -> tuple[np.ndarray, np.ndarray]:
  """Checked ``(images, labels)``; each class needs 3 or more images."""
  images = _check_images(images)
  labels = _check_labels(labels, images.shape[0])
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  short = np.flatnonzero(counts < _MIN_PER_CLASS)
  if short.size:
    raise ValueError(
        f"every class 0..{NUM_CLASSES - 1} needs at least {_MIN_PER_CLASS} "
        f"images; classes {short.tolist()} have {counts[short].tolist()}.")
  return images, labels


# ---------------------------------------------------------------- sampling ---

def _uniform_int(u: np.ndarray, high) -> np.ndarray:
  """``floor(u * high)`` for ``u`` in [0, 1): an int64 uniform on 0..high-1."""
  high = np.asarray(high, np.int64)
  return np.minimum(np.floor(u * high).astype(np.int64), high - 1)


def _draw_instances(labels: np.ndarray, classes: np.ndarray,
                    u: np.ndarray) -> np.ndarray:
  """Base indices ``[n, k]`` of uniform random instances of ``classes [n, k]``.

  ``u [n, k]`` holds uniforms in [0, 1), one per draw. Within an example the
  indices are pairwise different: draw ``j`` is uniform over the instances of
  its class that earlier draws of the same class did not take (a uniform
  integer over the remaining count, stepped past the taken positions in
  increasing order).
  """
  order = np.argsort(labels, kind="stable")   # base indices grouped by class
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  n, k = classes.shape
  positions = np.empty((n, k), np.int64)     # position within the class
  for j in range(k):                         # k <= 3 columns, not examples
    same = [classes[:, i] == classes[:, j] for i in range(j)]
    taken = np.sort(
        np.stack([np.where(s, positions[:, i], -1)
                  for i, s in enumerate(same)] + [np.full(n, -1)], axis=1),
        axis=1)
    num_taken = sum(s.astype(np.int64) for s in same)   # 0 when j == 0
    position = _uniform_int(u[:, j], counts[classes[:, j]] - num_taken)
    for i in range(taken.shape[1]):          # increasing, -1 = nothing taken
      position += (taken[:, i] >= 0) & (position >= taken[:, i])
    positions[:, j] = position
  return order[starts[classes] + positions]


def _uniform_labels(u: np.ndarray) -> np.ndarray:
  return _uniform_int(u, NUM_CLASSES)


def _related_triplets(images, labels, num_examples, seed, relation):
  """Checked base arrays and index/labels ``[n, 3]`` with ``l3 = relation``.

  Row ``i`` of one ``[num_examples, 5]`` uniform draw gives, in order,
  ``l1``, ``l2`` and the instances of ``x1``, ``x2`` and ``x3``.
  """
  images, labels = _check_base(images, labels)
  num_examples = check_int(num_examples, "num_examples", 1)
  seed = check_int(seed, "seed", 0)
  draws = np.random.default_rng(seed).random((num_examples, 5))
  l1 = _uniform_labels(draws[:, 0])
  l2 = _uniform_labels(draws[:, 1])
  triplet = np.stack([l1, l2, relation(l1, l2)], axis=1)
  index = _draw_instances(labels, triplet, draws[:, 2:])
  return images, triplet.astype(np.int32), index


def _sum_relation(l1, l2):
  return (l1 + l2) % NUM_CLASSES


def _product_relation(l1, l2):
  return (l1 * l2) % NUM_CLASSES


def _same_class_relation(l1, l2):
  del l1  # names the angle, not the class
  return l2


def _conditional(images, index, triplet):
  return {
      "context": images[index[:, :2]],
      "target": images[index[:, 2]],
      "labels": triplet,
      "index": index,
  }


# ---------------------------------------------------------------- datasets ---

def color_mnist(images, labels, num_examples: int,
                seed: int = 0) -> dict[str, np.ndarray]:
  """Color-MNIST: three random digits stacked as the R, G, B channels.

  Relation: none; ``l1``, ``l2``, ``l3`` are independent and uniform on 0..9,
  so each of the 1000 label triplets (the modes of Metz et al. 2017) has
  probability 1/1000. Channel ``c`` of example ``i`` is
  ``images[index[i, c], :, :, 0]``.

  Args:
    images: float ``[N, H, W, 1]`` in [0, 1] (MNIST ``x / 255``).
    labels: int ``[N]`` in 0..9; each class needs at least 3 images.
    num_examples: how many examples, at least 1.
    seed: a non-negative integer for ``np.random.default_rng``.

  Returns:
    ``'image'`` float32 ``[n, H, W, 3]``, ``'labels'`` int32 ``[n, 3]``
    (R, G, B digit classes) and ``'index'`` int64 ``[n, 3]`` (base rows, R,
    G, B).

  Raises:
    ValueError: for malformed images or labels, a class with fewer than 3
      images, ``num_examples < 1`` or a negative seed.
  """
  images, labels = _check_base(images, labels)
  num_examples = check_int(num_examples, "num_examples", 1)
  seed = check_int(seed, "seed", 0)
  draws = np.random.default_rng(seed).random((num_examples, 6))
  triplet = _uniform_labels(draws[:, :3])
  index = _draw_instances(labels, triplet, draws[:, 3:])
  _, height, width, _ = images.shape
  image = np.empty((num_examples, height, width, 3), np.float32)
  for channel in range(3):   # cheaper than gathering [n, 3, H, W] and moving
    image[..., channel] = images[index[:, channel], :, :, 0]
  return {
      "image": image,
      "labels": triplet.astype(np.int32),
      "index": index,
  }


def mnist_triplets(images, labels, num_examples: int,
                   seed: int = 0) -> dict[str, np.ndarray]:
  """MNIST-triplets (unconditional): ``x1 | x2 | x3``, ``l3 = (l1 + l2) % 10``.

  Relation: ``l1`` and ``l2`` independent and uniform on 0..9,
  ``l3 = (l1 + l2) % 10`` (so ``l3`` is uniform too); ``x1``, ``x2``, ``x3``
  are random instances of their classes. A model learns the joint of the
  three digits.

  Layout: the digits side by side in one image of three times the width,
  ``x1`` in columns ``[0, W)``, ``x2`` in ``[W, 2W)`` and ``x3`` in
  ``[2W, 3W)`` (28 x 84 for MNIST). The triplets are those of
  ``mnist_sum(images, labels, num_examples, seed)``, example for example.

  Args:
    images: float ``[N, H, W, 1]`` in [0, 1] (MNIST ``x / 255``).
    labels: int ``[N]`` in 0..9; each class needs at least 3 images.
    num_examples: how many examples, at least 1.
    seed: a non-negative integer for ``np.random.default_rng``.

  Returns:
    ``'image'`` float32 ``[n, H, 3 W, 1]``, ``'labels'`` int32 ``[n, 3]``
    (``l1, l2, l3``) and ``'index'`` int64 ``[n, 3]``.

  Raises:
    ValueError: as ``color_mnist``.
  """
  images, triplet, index = _related_triplets(images, labels, num_examples,
                                             seed, _sum_relation)
  n = index.shape[0]
  _, height, width, _ = images.shape
  # Fill [n, H, 3, W, 1], whose memory is that of [n, H, 3 W, 1].
  image = np.empty((n, height, 3, width, 1), np.float32)
  for position in range(3):
    image[:, :, position] = images[index[:, position]]
  image = image.reshape(n, height, 3 * width, 1)
  return {"image": image, "labels": triplet, "index": index}


def mnist_sum(images, labels, num_examples: int,
              seed: int = 0) -> dict[str, np.ndarray]:
  """MNIST-sum (conditional): ``(x1, x2) -> x3`` with ``l3 = (l1 + l2) % 10``.

  Relation: ``l1`` and ``l2`` independent and uniform on 0..9,
  ``l3 = (l1 + l2) % 10``; ``x3`` is a random instance of class ``l3``. A
  model learns ``p(x3 | x1, x2)``. The same triplets as ``mnist_triplets``
  with the same arguments.

  Args:
    images: float ``[N, H, W, 1]`` in [0, 1] (MNIST ``x / 255``).
    labels: int ``[N]`` in 0..9; each class needs at least 3 images.
    num_examples: how many examples, at least 1.
    seed: a non-negative integer for ``np.random.default_rng``.

  Returns:
    ``'context'`` float32 ``[n, 2, H, W, 1]`` (``x1``, ``x2``), ``'target'``
    float32 ``[n, H, W, 1]`` (``x3``), ``'labels'`` int32 ``[n, 3]`` and
    ``'index'`` int64 ``[n, 3]``.

  Raises:
    ValueError: as ``color_mnist``.
  """
  images, triplet, index = _related_triplets(images, labels, num_examples,
                                             seed, _sum_relation)
  return _conditional(images, index, triplet)


def mnist_sum_hard(images, labels, num_examples: int,
                   seed: int = 0) -> dict[str, np.ndarray]:
  """MNIST-sum-hard (conditional): ``mnist_sum`` with ``l3 = (l1 * l2) % 10``.

  Relation: ``l1`` and ``l2`` independent and uniform on 0..9,
  ``l3 = (l1 * l2) % 10``; ``x3`` is a random instance of class ``l3``.

  Why harder: for the sum, fixing either digit makes ``l3`` a relabelling of
  the other (each row of the table is a permutation), so a model can treat
  the two inputs almost separably. The product table has no such structure:
  its rows are permutations only for ``l1`` in {1, 3, 7, 9}; row 0 is all
  0, row 5 alternates 0 and 5, even rows hit only even classes, so the model
  must recognise both digits exactly and combine them non-linearly. The
  target classes are not uniform; with uniform ``l1``, ``l2`` their
  probabilities (in 1/100) for ``l3`` = 0..9 are
  27, 4, 12, 4, 12, 9, 12, 4, 12, 4 (always answering 0 is right 27% of the
  time, the chance level for an evaluation by a digit classifier).

  Args and returns: as ``mnist_sum`` (``'context'``, ``'target'``,
  ``'labels'``, ``'index'``); for the same arguments ``l1``, ``l2``, ``x1``
  and ``x2`` are those of ``mnist_sum``.

  Raises:
    ValueError: as ``color_mnist``.
  """
  images, triplet, index = _related_triplets(images, labels, num_examples,
                                             seed, _product_relation)
  return _conditional(images, index, triplet)


def mnist_rotate(images, labels, num_examples: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """MNIST-rotate (conditional): ``x2``'s class, turned by ``36 * l1`` degrees.

  Relation: ``l1`` and ``l2`` independent and uniform on 0..9, ``l3 = l2``;
  ``x3`` is a random instance of class ``l2`` other than ``x2``, and the
  target is ``x3`` rotated about the image centre by
  ``angle = 36 * l1`` degrees, counter-clockwise as displayed (row 0 at the
  top), with ``rotate_images``. So digit 0 means no rotation and the ten
  angles 0, 36, ..., 324 are equally likely. A model learns
  ``p(target | x1, x2)``: it must read the angle from ``x1`` and the class,
  but not the style, from ``x2``.

  Args:
    images: float ``[N, H, W, 1]`` in [0, 1] (MNIST ``x / 255``).
    labels: int ``[N]`` in 0..9; each class needs at least 3 images.
    num_examples: how many examples, at least 1.
    seed: a non-negative integer for ``np.random.default_rng``.

  Returns:
    ``'context'`` float32 ``[n, 2, H, W, 1]`` (``x1``, ``x2``), ``'target'``
    float32 ``[n, H, W, 1]`` (rotated ``x3``), ``'labels'`` int32 ``[n, 3]``
    (``l1, l2, l2``), ``'index'`` int64 ``[n, 3]`` (rows of ``x1``, ``x2``
    and the unrotated ``x3``) and ``'angle'`` float32 ``[n]`` in degrees.

  Raises:
    ValueError: as ``color_mnist``.
  """
  images, triplet, index = _related_triplets(images, labels, num_examples,
                                             seed, _same_class_relation)
  angle = (ROTATE_DEGREES_PER_CLASS * triplet[:, 0]).astype(np.float32)
  example = _conditional(images, index, triplet)
  # Rounding can push a convex combination of values in [0, 1] just past 1.
  example["target"] = np.clip(rotate_images(example["target"], angle), 0.0,
                              1.0)
  example["angle"] = angle
  return example


def micro_mnist(images, labels, seed: int = 0,
                num_images: int = 7) -> dict[str, np.ndarray]:
  """Micro-MNIST: ``num_images`` fixed random digits (paper Fig. 8).

  The rows are ``np.random.default_rng(seed).choice(N, num_images,
  replace=False)``, in that order: distinct images, any classes.

  Args:
    images: float ``[N, H, W, 1]`` in [0, 1] (MNIST ``x / 255``).
    labels: int ``[N]`` in 0..9.
    seed: a non-negative integer for ``np.random.default_rng``.
    num_images: how many images, 1 to N.

  Returns:
    ``'image'`` float32 ``[num_images, H, W, 1]``, ``'labels'`` int32
    ``[num_images]`` and ``'index'`` int64 ``[num_images]``.

  Raises:
    ValueError: for malformed images or labels, ``num_images`` outside
      1..N or a negative seed.
  """
  images = _check_images(images)
  labels = _check_labels(labels, images.shape[0])
  num_images = check_int(num_images, "num_images", 1)
  seed = check_int(seed, "seed", 0)
  if num_images > images.shape[0]:
    raise ValueError(
        f"num_images must be at most the {images.shape[0]} base images; got "
        f"{num_images}.")
  index = np.random.default_rng(seed).choice(
      images.shape[0], num_images, replace=False).astype(np.int64)
  return {
      "image": images[index],
      "labels": labels[index].astype(np.int32),
      "index": index,
  }


# ---------------------------------------------------------------- rotation ---

def _sin_cos_degrees(degrees: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sine and cosine of angles in degrees, from +, -, *, / and floor only.

  The angle is reduced to a quadrant ``q`` and a remainder ``r`` in [0, 90);
  ``r`` goes through a Taylor polynomial of degree 25/26 (error below 1e-17
  on [0, pi/2]) and the quadrant through exact sign swaps, so multiples of 90
  degrees give exact 0 and +-1 and the result does not depend on the
  platform's ``sin``/``cos``.
  """
  degrees = np.mod(np.asarray(degrees, np.float64), 360.0)
  quadrant = np.minimum(np.floor(degrees / 90.0), 3.0)
  sin, cos = taylor_sin_cos((degrees - 90.0 * quadrant) * (np.pi / 180.0), terms=13)
  # Turning by q quarter turns maps (cos, sin) -> (-sin, cos) q times.
  quadrant = quadrant.astype(np.int64)
  out_cos = np.choose(quadrant, [cos, -sin, -cos, sin])
  out_sin = np.choose(quadrant, [sin, cos, -sin, -cos])
  return out_sin, out_cos


def _bilinear_taps(degrees: np.ndarray, height: int, width: int):
  """Bilinear taps and weights of the rotation by each of ``degrees [U]``.

  Returns four ``(tap, weight)`` pairs as two lists: ``tap`` int64 ``[U, H W]``
  indexes the image padded by one zero pixel on every side, flattened
  (a tap further out is clipped onto the zero border), and ``weight``
  float32 ``[U, H W]``; see ``rotate_images`` for the geometry.
  """
  sin, cos = _sin_cos_degrees(degrees)
  cy = (height - 1) / 2.0
  cx = (width - 1) / 2.0
  x = (np.arange(width) - cx)[None, None, :]    # right
  y = (cy - np.arange(height))[None, :, None]   # up
  xs = cos[:, None, None] * x + sin[:, None, None] * y
  ys = cos[:, None, None] * y - sin[:, None, None] * x
  rows = (cy - ys).reshape(len(degrees), -1)    # source position per pixel
  cols = (cx + xs).reshape(len(degrees), -1)
  row0 = np.floor(rows)
  col0 = np.floor(cols)
  frac_row = rows - row0
  frac_col = cols - col0
  taps = []
  for dr in (0, 1):
    for dc in (0, 1):
      r = np.clip(row0 + 1 + dr, 0, height + 1).astype(np.int64)
      c = np.clip(col0 + 1 + dc, 0, width + 1).astype(np.int64)
      taps.append(r * (width + 2) + c)
  weights = [(1.0 - frac_row) * (1.0 - frac_col), (1.0 - frac_row) * frac_col,
             frac_row * (1.0 - frac_col), frac_row * frac_col]
  return taps, [w.astype(np.float32) for w in weights]


def rotate_images(images, angles) -> np.ndarray:
  """Rotate each image about its centre, counter-clockwise as displayed.

  Conventions: pixel ``[i, j]`` has its centre at row ``i``, column ``j``;
  the centre of rotation is ``((H - 1) / 2, (W - 1) / 2)`` (between the four
  middle pixels of a 28 x 28 image). Counter-clockwise as displayed (row 0
  at the top, so the y axis points down the rows) means that a positive
  angle carries the top-right corner towards the top-left: rotating a square
  image by 90 degrees equals ``np.rot90(image, 1)`` on the (row, column)
  axes, exactly. Output pixel ``[i, j]`` takes the bilinear interpolation of
  the input at row ``cy - ys``, column ``cx + xs`` with ``x = j - cx``,
  ``y = cy - i`` and ``(xs, ys) = R(-angle) (x, y)``; the input is zero
  outside the image. Multiples of 90 degrees land on the pixel grid and are
  exact permutations (or zero padding, for non-square images); other angles
  blur slightly and keep the ink of a digit to within a few percent.

  Args:
    images: float ``[n, H, W, C]``.
    angles: degrees, a scalar or ``[n]``.

  Returns:
    float32 ``[n, H, W, C]``.

  Raises:
    ValueError: for images that are not 4-D or angles of the wrong shape or
      not finite.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(
        f"images must have shape [n, height, width, channels]; got shape "
        f"{images.shape}.")
  n, height, width, channels = images.shape
  angles = np.asarray(angles, np.float64)
  if angles.ndim == 0:
    angles = np.full(n, angles)
  if angles.shape != (n,):
    raise ValueError(
        f"angles must be a scalar or have shape [n] = ({n},); got shape "
        f"{angles.shape}.")
  if not np.all(np.isfinite(angles)):
    raise ValueError("angles must be finite.")
  images = images.astype(np.float32, copy=False)
  out = np.empty(images.shape, np.float32)
  if n == 0:
    return out

  for start in range(0, n, _ROTATE_CHUNK):
    stop = min(start + _ROTATE_CHUNK, n)
    # One sampling grid per distinct angle in the chunk (at most 10 in
    # mnist_rotate), picked per image.
    distinct, which = np.unique(angles[start:stop], return_inverse=True)
    taps, weights = _bilinear_taps(distinct, height, width)
    padded = np.zeros((stop - start, height + 2, width + 2, channels),
                      np.float32)
    padded[:, 1:-1, 1:-1] = images[start:stop]
    flat = padded.reshape(-1, channels)
    first = (np.arange(stop - start) * (height + 2) * (width + 2))[:, None]
    total = None
    for tap, weight in zip(taps, weights):
      term = weight[which][:, :, None] * flat[first + tap[which]]
      total = term if total is None else total + term
    out[start:stop] = total.reshape(stop - start, height, width, channels)
  return out
