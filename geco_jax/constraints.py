"""The constraints of "Taming VAEs" (paper Table 1), one value per example.

Each function returns ``C(x, g(z))`` for every example of a batch, shape
``[batch]``; GECO needs the batch mean (``.mean()``), and the constraint holds
when that mean is <= 0. ``tolerance`` is kappa of the paper, always in the
data's own units:

==================================  ===========================================  =================
constraint                          C per example                                tolerance
==================================  ===========================================  =================
``reconstruction_error`` (RE)       ||x - g||^2 - D kappa^2                      per-pixel RMSE
``feature_reconstruction_error``    ||f(x) - f(g)||^2 - F kappa^2                per-feature RMSE
``classification_accuracy`` (CLA)   kappa - p(y | g)                             probability
``patch_normalized_cross_correlation``  kappa - mean_i <P_i(x), P_i(g)>          correlation
``kl_divergence`` (KL)              KL(q(z|x) || pi(z)) - kappa                  nats
==================================  ===========================================  =================

D is the number of values of an example (pixels x channels), F the number of
features. RE and FRE are the paper's ``||.||^2 - kappa^2`` with the tolerance
stated per value: ``C <= 0`` exactly when the root-mean-square error is at
most kappa, so ``tolerance=0.1`` means the same quality for a 28x28 digit and
a 64x64 face. The constraint itself stays a sum over values, as in the paper,
so that the multiplier keeps its meaning ``lambda = 1 / (2 sigma^2 beta)``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from geco_jax._validation import check

__all__ = [
    "reconstruction_error",
    "feature_reconstruction_error",
    "local_image_statistics",
    "classification_accuracy",
    "patch_normalized_cross_correlation",
    "kl_divergence",
    "per_pixel_rmse",
]


def _check_pair(x, reconstruction, name: str) -> None:
  if jnp.ndim(x) < 2:
    raise ValueError(
        f"{name}: expected a batch of examples, shape [batch, ...]; "
        f"got shape {jnp.shape(x)}.")
  if jnp.shape(x) != jnp.shape(reconstruction):
    raise ValueError(
        f"{name}: data and reconstruction must have the same shape; got "
        f"{jnp.shape(x)} and {jnp.shape(reconstruction)}.")


def _check_images(x, name: str) -> None:
  if jnp.ndim(x) != 4:
    raise ValueError(
        f"{name}: expected images of shape [batch, height, width, channels]; "
        f"got shape {jnp.shape(x)}.")


def _sum_per_example(values):
  return jnp.sum(values.reshape(values.shape[0], -1), axis=1)


def per_pixel_rmse(x, reconstruction):
  """Root-mean-square error per example, the unit of the RE tolerance."""
  _check_pair(x, reconstruction, "per_pixel_rmse")
  size = jnp.size(x) // jnp.shape(x)[0]
  return jnp.sqrt(_sum_per_example(jnp.square(x - reconstruction)) / size)


def reconstruction_error(x, reconstruction, tolerance):
  """RE: ``||x - g(z)||^2 - D * tolerance^2`` per example.

  Args:
    x: data, shape [batch, ...] (images in [0, 1]).
    reconstruction: g(z), the decoder's mean, same shape.
    tolerance: the largest acceptable per-pixel RMSE (>= 0); e.g. 0.1 for
      reconstructions within an RMSE of 0.1 on [0, 1] pixels.

  Returns:
    Shape [batch]; <= 0 where the example's RMSE is within the tolerance.
  """
  _check_pair(x, reconstruction, "reconstruction_error")
  check(tolerance, lambda v: v >= 0,
                   "reconstruction_error: tolerance must be >= 0")
  size = jnp.size(x) // jnp.shape(x)[0]
  squared_error = _sum_per_example(jnp.square(x - reconstruction))
  return squared_error - size * jnp.square(tolerance)


def local_image_statistics(images, patch_size: int = 4, stride: int = 2,
                           epsilon: float = 1e-4):
  """Local patch mean and standard deviation, per channel: the built-in FRE features.

  Over every ``patch_size x patch_size`` window (stride ``stride``, no padding)
  and channel: ``mean = avg(x)`` and ``std = sqrt(avg(x^2) - mean^2 + epsilon)``
  (epsilon keeps the gradient finite on flat patches).

  Args:
    images: [batch, height, width, channels].
    patch_size: window side, at most the image side.
    stride: step between windows.
    epsilon: added to the variance.

  Returns:
    Features of shape [batch, 2 * windows * channels].
  """
  _check_images(images, "local_image_statistics")
  if patch_size < 1 or stride < 1:
    raise ValueError(
        f"local_image_statistics: patch_size and stride must be >= 1; got "
        f"{patch_size} and {stride}.")
  if patch_size > min(images.shape[1:3]):
    raise ValueError(
        f"local_image_statistics: patch_size {patch_size} exceeds the image "
        f"size {images.shape[1:3]}.")
  window = (1, patch_size, patch_size, 1)
  strides = (1, stride, stride, 1)

  def average(v):
    total = jax.lax.reduce_window(v, 0.0, jax.lax.add, window, strides, "VALID")
    return total / (patch_size * patch_size)

  mean = average(images)
  variance = jnp.maximum(average(jnp.square(images)) - jnp.square(mean), 0.0)
  std = jnp.sqrt(variance + epsilon)
  batch = images.shape[0]
  return jnp.concatenate([mean.reshape(batch, -1), std.reshape(batch, -1)], axis=1)


def feature_reconstruction_error(
    x, reconstruction, tolerance,
    features: Callable[[jax.Array], jax.Array] = local_image_statistics):
  """FRE: ``||f(x) - f(g(z))||^2 - F * tolerance^2`` per example.

  Args:
    x: data, shape [batch, ...].
    reconstruction: g(z), same shape.
    tolerance: the largest acceptable RMSE per feature (>= 0).
    features: maps a batch to features [batch, ...]; e.g. the activations of a
      classifier (the paper used a CIFAR-10 ResNet) or, by default, the local
      patch means and standard deviations of ``local_image_statistics``.

  Returns:
    Shape [batch].
  """
  _check_pair(x, reconstruction, "feature_reconstruction_error")
  check(tolerance, lambda v: v >= 0,
                   "feature_reconstruction_error: tolerance must be >= 0")
  fx, fg = features(x), features(reconstruction)
  if (jnp.ndim(fx) < 1 or jnp.shape(fx)[0] != jnp.shape(x)[0]
      or jnp.shape(fg) != jnp.shape(fx)):
    raise ValueError(
        "feature_reconstruction_error: features must keep the batch axis and "
        "give the same shape for data and reconstruction; got shapes "
        f"{jnp.shape(fx)} and {jnp.shape(fg)} for a batch of "
        f"{jnp.shape(x)[0]}.")
  size = jnp.size(fx) // jnp.shape(fx)[0]
  return _sum_per_example(jnp.square(fx - fg)) - size * jnp.square(tolerance)


def classification_accuracy(
    reconstruction, labels, tolerance,
    classifier: Callable[[jax.Array], jax.Array]):
  """CLA: ``tolerance - y^T c(g(z))`` per example.

  ``c`` returns class probabilities and ``y`` is the one-hot label of x, so
  ``y^T c(g)`` is the probability that the classifier gives the true class of
  x to its reconstruction. The constraint holds on average when the expected
  probability of the right class is at least ``tolerance``.

  Args:
    reconstruction: g(z), shape [batch, ...].
    labels: integer class labels of x, shape [batch].
    tolerance: required probability of the true class, in [0, 1].
    classifier: maps a batch of reconstructions to class probabilities
      [batch, num_classes] (rows summing to 1, e.g. a softmax output).

  Returns:
    Shape [batch].
  """
  check(tolerance, lambda v: 0 <= v <= 1,
                   "classification_accuracy: tolerance must be a probability "
                   "in [0, 1]")
  if jnp.ndim(labels) != 1 or jnp.shape(labels)[0] != jnp.shape(reconstruction)[0]:
    raise ValueError(
        "classification_accuracy: labels must be integers of shape [batch] = "
        f"[{jnp.shape(reconstruction)[0]}]; got shape {jnp.shape(labels)}.")
  if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
    raise ValueError(
        "classification_accuracy: labels must be integer class indices, not "
        f"{jnp.asarray(labels).dtype} (one-hot labels: pass labels.argmax(-1)).")
  probabilities = classifier(reconstruction)
  if (jnp.ndim(probabilities) != 2
      or jnp.shape(probabilities)[0] != jnp.shape(reconstruction)[0]):
    raise ValueError(
        "classification_accuracy: the classifier must return probabilities of "
        f"shape [batch, num_classes]; got shape {jnp.shape(probabilities)}.")
  num_classes = jnp.shape(probabilities)[1]
  if not isinstance(labels, jax.core.Tracer):
    bad = np.asarray(labels)[(np.asarray(labels) < 0) | (np.asarray(labels) >= num_classes)]
    if bad.size:
      raise ValueError(
          f"classification_accuracy: labels must be class indices in [0, "
          f"{num_classes}) for a classifier of {num_classes} classes; got "
          f"{bad[0]}.")
  labels = jnp.asarray(labels).astype(jnp.int32)
  true_class = jnp.take_along_axis(probabilities, labels[:, None], axis=1)[:, 0]
  # Under jit the labels cannot be checked: an index out of range (a negative
  # one would wrap round to another class) gives NaN, not another class.
  valid = (labels >= 0) & (labels < num_classes)
  return tolerance - jnp.where(valid, true_class, jnp.nan)


def _whitened_patches(images, patch_size: int, stride: int, epsilon: float):
  patches = jax.lax.conv_general_dilated_patches(
      images, filter_shape=(patch_size, patch_size),
      window_strides=(stride, stride), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      # The patches come from a convolution with an identity kernel; at the
      # backend's default precision it would round every pixel to bfloat16
      # (TPU) or TF32 (recent NVIDIA GPUs), so ask for exact float32.
      precision=jax.lax.Precision.HIGHEST)
  patches = patches.reshape(images.shape[0], -1, patches.shape[-1])
  centred = patches - jnp.mean(patches, axis=-1, keepdims=True)
  norm = jnp.sqrt(jnp.sum(jnp.square(centred), axis=-1, keepdims=True) + epsilon)
  return centred / norm


def patch_normalized_cross_correlation(
    x, reconstruction, tolerance, patch_size: int = 5, stride: int = 2,
    epsilon: float = 1e-6):
  """pNCC: ``tolerance - mean_i <P_i(x), P_i(g(z))>`` per example.

  ``P_i`` is the i-th ``patch_size x patch_size`` patch (all channels, stride
  ``stride``, no padding) made zero-mean and unit-norm, so each inner product
  is a normalised cross-correlation in [-1, 1] and the constraint asks for a
  mean patch correlation of at least ``tolerance``.

  A flat patch (zero variance, e.g. MNIST background) has no direction to
  correlate with: ``epsilon`` keeps it finite and its correlation is then ~0,
  not 1, even for a perfect reconstruction. On data with many flat regions,
  set the tolerance below the fraction of patches that carry structure.

  Args:
    x: images [batch, height, width, channels].
    reconstruction: g(z), same shape.
    tolerance: required mean correlation, in [-1, 1].
    patch_size: patch side.
    stride: step between patches.
    epsilon: added to the squared patch norm.

  Returns:
    Shape [batch].
  """
  _check_pair(x, reconstruction, "patch_normalized_cross_correlation")
  _check_images(x, "patch_normalized_cross_correlation")
  check(tolerance, lambda v: -1 <= v <= 1,
                   "patch_normalized_cross_correlation: tolerance must be in "
                   "[-1, 1]")
  if patch_size < 1 or stride < 1 or patch_size > min(x.shape[1:3]):
    raise ValueError(
        "patch_normalized_cross_correlation: need 1 <= patch_size <= image "
        f"side and stride >= 1; got patch_size={patch_size}, stride={stride} "
        f"for images of size {x.shape[1:3]}.")
  # In float32 at least: a flat patch's norm is sqrt(epsilon), and the
  # gradient of centred / norm there (~1 / sqrt(epsilon)) overflows float16.
  dtype = jnp.promote_types(jnp.result_type(x, reconstruction), jnp.float32)
  px = _whitened_patches(jnp.asarray(x, dtype), patch_size, stride, epsilon)
  pg = _whitened_patches(jnp.asarray(reconstruction, dtype), patch_size, stride, epsilon)
  correlation = jnp.mean(jnp.sum(px * pg, axis=-1), axis=-1)
  return tolerance - correlation


def kl_divergence(kl, tolerance):
  """KL constraint: ``KL(q(z|x) || pi(z)) - tolerance`` per example (nats).

  Bounding the rate gives the information-bottleneck form of the beta-VAE.

  Args:
    kl: per-example KL, shape [batch].
    tolerance: the largest acceptable KL in nats (>= 0).
  """
  check(tolerance, lambda v: v >= 0,
                   "kl_divergence: tolerance must be >= 0")
  if jnp.ndim(kl) != 1:
    raise ValueError(
        f"kl_divergence: expected a per-example KL of shape [batch]; got "
        f"shape {jnp.shape(kl)}.")
  return kl - tolerance
