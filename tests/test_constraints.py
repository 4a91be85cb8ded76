"""Tests of geco_jax.constraints against values computed by hand or in plain NumPy.

The NumPy references below are written from the definitions in the paper notes
(section 3) and the module docstring, never by calling the implementation.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geco_jax import constraints as C


def _jit(fn, **static):
  """``fn`` under ``jax.jit``, with ``static`` (tolerance, patch size, ...) closed over.

  Compiling the whole function once is much faster on CPU than running it
  eagerly, op by op; ``test_eager_equals_jit`` checks that both agree.
  """
  return jax.jit(functools.partial(fn, **static))


def _images(seed, shape):
  """Uniform [0, 1) float32 images of the given shape, from a fixed seed."""
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _with_rmse(x, rmses, seed=0):
  """``x`` plus noise scaled so that example i has per-pixel RMSE ``rmses[i]``."""
  noise = np.random.default_rng(seed).normal(size=x.shape)
  flat = noise.reshape(len(noise), -1)
  flat = flat / np.sqrt(np.mean(flat ** 2, axis=1, keepdims=True))
  flat = flat * np.asarray(rmses)[:, None]
  return (x.astype(np.float64) + flat.reshape(x.shape)).astype(np.float32)


def _numpy_pncc(x, g, patch_size, stride, epsilon):
  """Mean normalised cross-correlation of whitened patches, with explicit loops."""
  batch, height, width, _ = x.shape
  out = np.zeros(batch)
  for b in range(batch):
    correlations = []
    for i in range(0, height - patch_size + 1, stride):
      for j in range(0, width - patch_size + 1, stride):
        whitened = []
        for image in (x, g):
          p = image[b, i:i + patch_size, j:j + patch_size, :].astype(np.float64).ravel()
          p = p - p.mean()
          whitened.append(p / np.sqrt(np.sum(p ** 2) + epsilon))
        correlations.append(np.dot(*whitened))
    out[b] = np.mean(correlations)
  return out


# --------------------------------------------------------------------------- #
# RE and per-pixel RMSE
# --------------------------------------------------------------------------- #


def test_reconstruction_error_hand_values():
  x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
  g = np.array([[1.0, 2.0, 5.0], [1.0, 1.0, 1.0]], np.float32)
  # Squared errors 4 and 3; D * tol^2 = 3 * 0.25.
  c = _jit(C.reconstruction_error, tolerance=0.5)(x, g)
  assert c.shape == (2,)
  np.testing.assert_allclose(c, [3.25, 2.25], rtol=1e-6)
  np.testing.assert_allclose(_jit(C.reconstruction_error, tolerance=0.0)(x, g),
                             [4.0, 3.0])


def test_reconstruction_error_on_images_counts_pixels_times_channels():
  x = np.zeros((2, 2, 2, 3), np.float32)
  g = np.zeros((2, 2, 2, 3), np.float32)
  g[0, 0, 0, 0] = 1.0               # squared error 1
  g[1] = 0.5                        # squared error 12 * 0.25 = 3
  # D = 2 * 2 * 3 = 12, so D * 0.1^2 = 0.12.
  np.testing.assert_allclose(_jit(C.reconstruction_error, tolerance=0.1)(x, g),
                             [0.88, 2.88], rtol=1e-5)


def test_reconstruction_error_holds_exactly_when_rmse_within_tolerance():
  x = _images(1, (6, 7, 5, 3))
  rmses = [0.02, 0.05, 0.099, 0.101, 0.15, 0.3]
  g = _with_rmse(x, rmses)
  c = np.asarray(_jit(C.reconstruction_error, tolerance=0.1)(x, g))
  assert c.shape == (6,)
  np.testing.assert_array_equal(c <= 0, np.asarray(rmses) <= 0.1)
  # And the value: sum of squares minus D tol^2, D = 105.
  sse = np.sum((x.astype(np.float64) - g) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(c, sse - 105 * 0.01, rtol=1e-4, atol=1e-4)


def test_per_pixel_rmse_hand_values():
  rmse = jax.jit(C.per_pixel_rmse)
  x = np.zeros((3, 4), np.float32)
  g = np.array([[1, 1, 1, 1], [2, 0, 0, 0], [3, 4, 0, 0]], np.float32)
  # sqrt(4/4), sqrt(4/4), sqrt(25/4).
  np.testing.assert_allclose(rmse(x, g), [1.0, 1.0, 2.5], rtol=1e-6)
  x = _images(2, (4, 3, 3, 2))
  rmses = [0.0, 0.1, 0.25, 1.0]
  np.testing.assert_allclose(rmse(x, _with_rmse(x, rmses)), rmses, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- #
# Local image statistics and FRE
# --------------------------------------------------------------------------- #


def test_local_image_statistics_hand_values():
  # Channel 0: 0..15 row by row; channel 1: the constant 3.
  image = np.stack([np.arange(16.0).reshape(4, 4), np.full((4, 4), 3.0)], -1)
  image = image[None].astype(np.float32)
  # 2x2 windows, stride 2: [0 1 4 5], [2 3 6 7], [8 9 12 13], [10 11 14 15]:
  # means 2.5, 4.5, 10.5, 12.5; each is m -2.5, -1.5, +1.5, +2.5, variance
  # (6.25 + 2.25 + 2.25 + 6.25) / 4 = 4.25. Channel 1: mean 3, variance 0.
  means = [2.5, 3.0, 4.5, 3.0, 10.5, 3.0, 12.5, 3.0]       # (row, col, channel)
  eps = 1e-4
  stds = [math.sqrt(4.25 + eps), math.sqrt(eps)] * 4
  out = _jit(C.local_image_statistics, patch_size=2, stride=2, epsilon=eps)(image)
  assert out.shape == (1, 16)
  np.testing.assert_allclose(out[0, :8], means, rtol=1e-6)
  np.testing.assert_allclose(out[0, 8:], stds, rtol=1e-5)
  out = _jit(C.local_image_statistics, patch_size=2, stride=2, epsilon=0.0)(image)
  np.testing.assert_allclose(out[0, 8:], [math.sqrt(4.25), 0.0] * 4, rtol=1e-6)


def test_local_image_statistics_overlapping_windows_against_numpy():
  images = _images(3, (2, 5, 6, 2))
  out = np.asarray(
      _jit(C.local_image_statistics, patch_size=3, stride=1, epsilon=0.0)(images))
  # Windows: 3 x 4 positions, 2 channels.
  assert out.shape == (2, 2 * 3 * 4 * 2)
  means, stds = [], []
  for i in range(3):
    for j in range(4):
      window = images[:, i:i + 3, j:j + 3, :].astype(np.float64)
      means.append(window.mean(axis=(1, 2)))
      stds.append(window.std(axis=(1, 2)))
  means = np.stack(means, 1).reshape(2, -1)     # [batch, (i, j), channel]
  stds = np.stack(stds, 1).reshape(2, -1)
  np.testing.assert_allclose(out, np.concatenate([means, stds], 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,patch_size,stride,windows", [
    ((3, 8, 8, 3), 4, 2, 9),      # (8 - 4) / 2 + 1 = 3 per side
    ((1, 28, 28, 1), 4, 2, 169),  # 13 per side
    ((2, 6, 9, 1), 3, 3, 6),      # 2 x 3
    ((2, 5, 5, 2), 2, 2, 4),      # the last row and column are left out
])
def test_local_image_statistics_shape(shape, patch_size, stride, windows):
  out = jax.eval_shape(
      functools.partial(C.local_image_statistics, patch_size=patch_size, stride=stride),
      jax.ShapeDtypeStruct(shape, jnp.float32))
  assert out.shape == (shape[0], 2 * windows * shape[3])


def test_local_image_statistics_errors():
  with pytest.raises(ValueError, match="height, width, channels"):
    C.local_image_statistics(np.zeros((2, 8, 8), np.float32))
  with pytest.raises(ValueError, match="exceeds"):
    C.local_image_statistics(np.zeros((2, 3, 8, 1), np.float32), patch_size=4)
  for patch_size, stride in ((0, 1), (2, 0)):
    with pytest.raises(ValueError, match=">= 1"):
      C.local_image_statistics(np.zeros((2, 8, 8, 1), np.float32), patch_size, stride)


def test_feature_reconstruction_error_default_features_hand_values():
  x = _images(4, (2, 8, 8, 1))
  # A brightness shift moves every patch mean by 0.5 and no std: 9 windows of
  # 4x4 (stride 2) on 8x8, so ||df||^2 = 9 * 0.25 over F = 18 features.
  c = _jit(C.feature_reconstruction_error, tolerance=0.1)(x, x + np.float32(0.5))
  assert c.shape == (2,)
  np.testing.assert_allclose(c, [2.25 - 18 * 0.01] * 2, rtol=1e-4)

  # A 0/1 checkerboard against the flat 0.5 image: equal means, stds
  # sqrt(0.25 + eps) and sqrt(eps) in each of the 9 windows.
  checker = (np.indices((8, 8)).sum(0) % 2).astype(np.float32)[None, :, :, None]
  checker = np.concatenate([checker, checker], axis=0)
  flat = np.full_like(checker, 0.5)
  d_std = math.sqrt(0.25 + 1e-4) - math.sqrt(1e-4)
  np.testing.assert_allclose(
      _jit(C.feature_reconstruction_error, tolerance=0.05)(checker, flat),
      [9 * d_std ** 2 - 18 * 0.05 ** 2] * 2, rtol=1e-4)
  # Identical images: only the tolerance term is left.
  np.testing.assert_allclose(
      _jit(C.feature_reconstruction_error, tolerance=0.2)(x, x), [-18 * 0.04] * 2,
      rtol=1e-6)


def _identity_features(v):
  """Every value of an example as a feature: FRE is then RE."""
  return v.reshape(v.shape[0], -1)


def _sum_and_max(v):
  """Two hand-checkable features of each example of a [batch, n] array."""
  return jnp.stack([v.sum(axis=1), v.max(axis=1)], axis=1)


def test_feature_reconstruction_error_custom_features():
  x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
  g = np.array([[1.0, 2.0, 5.0], [1.0, 1.0, 1.0]], np.float32)
  # With identity features FRE is RE: [4 - 0.75, 3 - 0.75].
  np.testing.assert_allclose(
      _jit(C.feature_reconstruction_error, tolerance=0.5,
           features=_identity_features)(x, g),
      [3.25, 2.25], rtol=1e-6)
  # Sum and maximum, F = 2. Example 0: sums 6 vs 8, maxima 3 vs 5: 4 + 4;
  # example 1: sums 0 vs 3, maxima 0 vs 1: 9 + 1.
  np.testing.assert_allclose(
      _jit(C.feature_reconstruction_error, tolerance=1.0, features=_sum_and_max)(x, g),
      [8.0 - 2.0, 10.0 - 2.0], rtol=1e-6)
  # Local statistics with other windows: 4 windows x 2 channels, each mean
  # moved by 1, the stds unchanged.
  images = _images(5, (3, 4, 4, 2))
  small_windows = functools.partial(C.local_image_statistics, patch_size=2, stride=2)
  np.testing.assert_allclose(
      _jit(C.feature_reconstruction_error, tolerance=0.0, features=small_windows)(
          images, images + np.float32(1.0)),
      [4 * 2 * 1.0] * 3, rtol=1e-5)


def test_feature_reconstruction_error_features_must_keep_the_batch_axis():
  x = np.zeros((3, 4), np.float32)
  for bad in (lambda v: v.sum(), lambda v: v.reshape(-1), lambda v: v.T):
    with pytest.raises(ValueError, match="batch axis"):
      C.feature_reconstruction_error(x, x, 0.1, features=bad)


# --------------------------------------------------------------------------- #
# CLA
# --------------------------------------------------------------------------- #

_PROBABILITIES = np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]], np.float32)


def _fixed_classifier(reconstruction):
  """A fake classifier: the same class probabilities whatever the input."""
  del reconstruction
  return jnp.asarray(_PROBABILITIES)


def test_classification_accuracy_hand_values():
  g = np.zeros((2, 4, 4, 1), np.float32)
  cla = lambda tol: _jit(C.classification_accuracy, tolerance=tol,
                         classifier=_fixed_classifier)
  c = cla(0.6)(g, np.array([2, 0]))
  assert c.shape == (2,)
  np.testing.assert_allclose(c, [0.6 - 0.7, 0.6 - 0.5], rtol=1e-6)
  np.testing.assert_allclose(cla(1.0)(g, jnp.array([1, 1], jnp.int32)), [0.8, 0.7],
                             rtol=1e-6)
  np.testing.assert_allclose(cla(0.0)(g, np.array([0, 2], np.uint8)), [-0.1, -0.2],
                             rtol=1e-6)


def test_classification_accuracy_errors():
  g = np.zeros((2, 4, 4, 1), np.float32)
  one_hot = np.eye(3, dtype=np.int32)[[2, 0]]
  with pytest.raises(ValueError, match=r"shape \[batch\]"):
    C.classification_accuracy(g, one_hot, 0.5, _fixed_classifier)
  with pytest.raises(ValueError, match="integer"):
    C.classification_accuracy(g, np.array([2.0, 0.0], np.float32), 0.5, _fixed_classifier)
  with pytest.raises(ValueError, match=r"shape \[batch\]"):
    C.classification_accuracy(g, np.array([2, 0, 1]), 0.5, _fixed_classifier)
  with pytest.raises(ValueError, match="num_classes"):
    C.classification_accuracy(g, np.array([2, 0]), 0.5, lambda r: jnp.ones(2))
  with pytest.raises(ValueError, match="num_classes"):
    C.classification_accuracy(g, np.array([2, 0]), 0.5, lambda r: jnp.ones((3, 3)))
  for tolerance in (-0.1, 1.1, float("nan")):
    with pytest.raises(ValueError, match="probability"):
      C.classification_accuracy(g, np.array([2, 0]), tolerance, _fixed_classifier)


def test_classification_accuracy_labels_out_of_range():
  # _PROBABILITIES has 3 classes: 3 is out of range, and -1 would wrap round
  # to class 2 under NumPy indexing.
  g = np.zeros((2, 4, 4, 1), np.float32)
  for labels in ([3, 0], [0, -1]):
    with pytest.raises(ValueError, match=r"in \[0, 3\).*3 classes"):
      C.classification_accuracy(g, np.array(labels), 0.5, _fixed_classifier)
  # Under jit the labels are not known: the bad example's value is NaN (which
  # GECO's update then skips), the others are unchanged.
  cla = _jit(C.classification_accuracy, tolerance=0.6, classifier=_fixed_classifier)
  for labels in ([3, 0], [-1, 0]):
    c = np.asarray(cla(g, np.array(labels)))
    assert np.isnan(c[0])
    np.testing.assert_allclose(c[1], 0.6 - 0.5, rtol=1e-6)


# --------------------------------------------------------------------------- #
# pNCC
# --------------------------------------------------------------------------- #


def test_pncc_identical_negated_and_affine_images():
  x = _images(7, (3, 9, 9, 3))
  tol = 0.8
  pncc = _jit(C.patch_normalized_cross_correlation, tolerance=tol)
  np.testing.assert_allclose(pncc(x, x), [tol - 1.0] * 3, atol=1e-5)
  # Negated around any value: every whitened patch flips sign.
  np.testing.assert_allclose(pncc(x, 1.0 - x), [tol + 1.0] * 3, atol=1e-5)
  # Brightness and contrast: a x + b with a > 0 keeps every correlation at 1.
  for a, b in ((2.5, -0.3), (0.5, 0.7), (1.0, 10.0)):
    np.testing.assert_allclose(pncc(x, np.float32(a) * x + np.float32(b)),
                               [tol - 1.0] * 3, atol=1e-4)


def test_pncc_one_patch_by_hand():
  x = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)[None, :, :, None]
  g = np.array([[0.0, 0.0], [0.0, 1.0]], np.float32)[None, :, :, None]
  # Centred x: [-1.5, -0.5, 0.5, 1.5], squared norm 5. Centred g: [-.25, -.25,
  # -.25, .75], squared norm .75. Inner product .375 + .125 - .125 + 1.125 = 1.5.
  expected = 1.5 / math.sqrt(5.0 * 0.75)          # sqrt(0.6)
  np.testing.assert_allclose(
      _jit(C.patch_normalized_cross_correlation, tolerance=0.5, patch_size=2,
           epsilon=0.0)(x, g),
      [0.5 - expected], rtol=1e-6)
  with_eps = 1.5 / math.sqrt((5.0 + 1e-6) * (0.75 + 1e-6))
  np.testing.assert_allclose(
      _jit(C.patch_normalized_cross_correlation, tolerance=0.5, patch_size=2)(x, g),
      [0.5 - with_eps], rtol=1e-6)
  # Two patches side by side (stride 2), the second identical: the mean of
  # sqrt(0.6) and 1.
  x2 = np.concatenate([x, x], axis=2)
  g2 = np.concatenate([g, x], axis=2)
  np.testing.assert_allclose(
      _jit(C.patch_normalized_cross_correlation, tolerance=0.0, patch_size=2,
           stride=2, epsilon=0.0)(x2, g2),
      [-(expected + 1.0) / 2], rtol=1e-6)


def test_pncc_patches_span_all_channels():
  # One 2x2 patch of two channels, centred over its 8 values together.
  x = np.arange(8.0, dtype=np.float32).reshape(1, 2, 2, 2)
  g = np.array([0, 0, 0, 0, 0, 0, 0, 1], np.float32).reshape(1, 2, 2, 2)
  cx = np.arange(8.0) - 3.5
  cg = np.array([0, 0, 0, 0, 0, 0, 0, 1.0]) - 0.125
  expected = cx @ cg / np.sqrt((cx @ cx) * (cg @ cg))
  np.testing.assert_allclose(
      _jit(C.patch_normalized_cross_correlation, tolerance=0.0, patch_size=2,
           epsilon=0.0)(x, g),
      [-expected], rtol=1e-6)


def test_pncc_against_numpy_loops():
  x = _images(8, (2, 7, 8, 2))
  g = _images(9, (2, 7, 8, 2)) * 0.5 + x * 0.5
  for patch_size, stride in ((3, 2), (5, 1), (7, 3), (1, 1)):
    np.testing.assert_allclose(
        _jit(C.patch_normalized_cross_correlation, tolerance=0.3,
             patch_size=patch_size, stride=stride)(x, g),
        0.3 - _numpy_pncc(x, g, patch_size, stride, 1e-6), atol=2e-6)


def test_pncc_flat_patches_correlate_to_zero():
  flat = np.full((2, 6, 6, 1), 0.4, np.float32)
  x = _images(10, (2, 6, 6, 1))
  pncc = _jit(C.patch_normalized_cross_correlation, tolerance=0.5, patch_size=3)
  for a, b in ((flat, flat), (x, flat), (flat, x), (flat, flat * 2)):
    c = pncc(a, b)
    assert np.all(np.isfinite(c))
    np.testing.assert_allclose(c, [0.5, 0.5], atol=1e-3)
  # Half flat, half structured: the flat half contributes 0 to the mean.
  half = np.concatenate([flat[:, :, :3], x[:, :, :3]], axis=2)
  np.testing.assert_allclose(
      _jit(C.patch_normalized_cross_correlation, tolerance=0.0, patch_size=3,
           stride=3)(half, half),
      [-0.5, -0.5], atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_pncc_half_precision_inputs_have_finite_gradients(dtype):
  # A digit on a flat background: the gradient on the flat patches is about
  # 1 / sqrt(epsilon) = 1000 times the patch direction, and computed in
  # float16 the backward pass of centred / norm overflowed to NaN.
  x = np.zeros((1, 14, 14, 1), np.float32)
  x[:, 5:9, 5:9] = 1.0
  noise = np.random.default_rng(0).uniform(size=x.shape).astype(np.float32)
  reconstruction = 0.9 * x + 0.05 * noise * (x > 0)
  fn = lambda r, xx: C.patch_normalized_cross_correlation(xx, r, 0.1).sum()
  want_value = fn(reconstruction, x)
  want_grad = jax.grad(fn)(reconstruction, x)
  low_x, low_r = jnp.asarray(x, dtype), jnp.asarray(reconstruction, dtype)
  value = fn(low_r, low_x)
  grad = jax.grad(fn)(low_r, low_x)
  assert value.dtype == jnp.float32
  assert grad.dtype == dtype
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  # The half-precision inputs round the reconstruction, so compare loosely.
  np.testing.assert_allclose(value, want_value, atol=2e-2)
  np.testing.assert_allclose(np.asarray(grad, np.float32), want_grad, rtol=0.1,
                             atol=0.1 * np.abs(want_grad).max())


def _conv_precisions(jaxpr):
  """The ``precision`` of every convolution in a jaxpr, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      yield eqn.params["precision"]
    for value in eqn.params.values():
      if hasattr(value, "eqns"):
        yield from _conv_precisions(value)
      elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield from _conv_precisions(value.jaxpr)


def test_pncc_extracts_patches_at_full_precision():
  # The patches come from a convolution with an identity kernel. At the default
  # precision a TPU rounds them to bfloat16 and a recent NVIDIA GPU to TF32, so
  # pNCC would not see errors below ~1e-3; CPUs are exact either way, so check
  # the requested precision, forward and backward.
  x = _images(18, (1, 6, 6, 1))
  fn = lambda r: C.patch_normalized_cross_correlation(x, r, 0.5, patch_size=3).sum()
  for jaxpr in (jax.make_jaxpr(fn)(x), jax.make_jaxpr(jax.grad(fn))(x)):
    precisions = list(_conv_precisions(jaxpr.jaxpr))
    assert precisions
    for precision in precisions:
      assert jax.lax.Precision.HIGHEST in tuple(np.atleast_1d(precision)), precision


def test_pncc_errors():
  x = np.zeros((2, 6, 6, 1), np.float32)
  for patch_size, stride in ((0, 1), (7, 1), (3, 0)):
    with pytest.raises(ValueError, match="patch_size"):
      C.patch_normalized_cross_correlation(x, x, 0.5, patch_size, stride)
  with pytest.raises(ValueError, match="height, width, channels"):
    C.patch_normalized_cross_correlation(x[..., 0], x[..., 0], 0.5, patch_size=3)
  for tolerance in (-1.5, 1.01, float("nan")):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
      C.patch_normalized_cross_correlation(x, x, tolerance, patch_size=3)
  # The whole range is allowed, negative tolerances included.
  for tolerance in (-1.0, 1.0):
    jax.eval_shape(functools.partial(C.patch_normalized_cross_correlation,
                                     tolerance=tolerance, patch_size=3), x, x)


# --------------------------------------------------------------------------- #
# KL
# --------------------------------------------------------------------------- #


def test_kl_divergence():
  np.testing.assert_allclose(C.kl_divergence(np.array([1.0, 3.0, 2.0], np.float32), 2.0),
                             [-1.0, 1.0, 0.0])
  np.testing.assert_allclose(C.kl_divergence(np.array([0.5], np.float32), 0.0), [0.5])
  with pytest.raises(ValueError, match=r"shape \[batch\]"):
    C.kl_divergence(np.ones((2, 3), np.float32), 1.0)
  with pytest.raises(ValueError, match=r"shape \[batch\]"):
    C.kl_divergence(np.float32(1.0), 1.0)
  for tolerance in (-0.5, float("nan")):
    with pytest.raises(ValueError, match=">= 0"):
      C.kl_divergence(np.ones(2, np.float32), tolerance)


# --------------------------------------------------------------------------- #
# Shape and tolerance checks shared by all
# --------------------------------------------------------------------------- #

_PAIRED = {
    "reconstruction_error": lambda x, g: C.reconstruction_error(x, g, 0.1),
    "per_pixel_rmse": C.per_pixel_rmse,
    "feature_reconstruction_error":
        lambda x, g: C.feature_reconstruction_error(x, g, 0.1),
    "patch_normalized_cross_correlation":
        lambda x, g: C.patch_normalized_cross_correlation(x, g, 0.5, patch_size=3),
}


@pytest.mark.parametrize("name", sorted(_PAIRED))
def test_mismatched_shapes_name_both_shapes(name):
  x = np.zeros((2, 8, 8, 1), np.float32)
  for g in (np.zeros((2, 8, 8, 3), np.float32), np.zeros((3, 8, 8, 1), np.float32),
            np.zeros((2, 64), np.float32)):
    with pytest.raises(ValueError) as info:
      _PAIRED[name](x, g)
    assert str(x.shape) in str(info.value) and str(g.shape) in str(info.value)
    assert name in str(info.value)


@pytest.mark.parametrize("name", sorted(_PAIRED))
def test_a_single_example_without_batch_axis_is_an_error(name):
  with pytest.raises(ValueError, match="batch"):
    _PAIRED[name](np.zeros(8, np.float32), np.zeros(8, np.float32))


@pytest.mark.parametrize("fn", [C.reconstruction_error, C.feature_reconstruction_error])
def test_negative_tolerance_is_an_error(fn):
  x = np.zeros((2, 8, 8, 1), np.float32)
  for tolerance in (-0.1, -1e-6, float("nan"), jnp.float32(-0.1), np.float64(-2.0)):
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
      fn(x, x, tolerance)
  jax.eval_shape(functools.partial(fn, tolerance=0.0), x, x)   # zero is allowed


# --------------------------------------------------------------------------- #
# jit, eager and gradients
# --------------------------------------------------------------------------- #


def _linear_classifier(reconstruction):
  """A softmax classifier with fixed weights, so that CLA has a gradient."""
  flat = reconstruction.reshape(reconstruction.shape[0], -1)
  weights = jnp.cos(jnp.arange(flat.shape[1] * 4, dtype=jnp.float32)).reshape(-1, 4)
  return jax.nn.softmax(flat @ weights, axis=-1)


_LABELS = np.array([3, 0, 1], np.int32)

# Each maps (x, g) to per-example constraints, with a Python float tolerance
# closed over.
_ALL = {
    "re": lambda x, g: C.reconstruction_error(x, g, 0.1),
    "fre": lambda x, g: C.feature_reconstruction_error(x, g, 0.05),
    "fre_identity": lambda x, g: C.feature_reconstruction_error(
        x, g, 0.05, features=_identity_features),
    "cla": lambda x, g: C.classification_accuracy(g, _LABELS, 0.9, _linear_classifier),
    "pncc": lambda x, g: C.patch_normalized_cross_correlation(x, g, 0.7),
    "pncc_small": lambda x, g: C.patch_normalized_cross_correlation(x, g, -0.2, 3, 3),
    "kl": lambda x, g: C.kl_divergence(jnp.sum(g ** 2, axis=(1, 2, 3)), 2.0),
    "rmse": C.per_pixel_rmse,
}


@pytest.mark.parametrize("name", sorted(set(_ALL) - {"pncc_small", "fre_identity"}))
def test_eager_equals_jit(name):
  x = _images(11, (3, 6, 6, 2))
  g = _images(12, (3, 6, 6, 2))
  fn = _ALL[name]
  jitted = jax.jit(fn)(x, g)
  assert jitted.shape == (3,)
  np.testing.assert_allclose(jitted, fn(x, g), rtol=1e-5, atol=1e-6)


def test_traced_tolerance_under_jit():
  x = _images(13, (2, 4, 4, 1))
  g = _images(14, (2, 4, 4, 1))
  fn = jax.jit(C.reconstruction_error)
  sse = np.sum((x.astype(np.float64) - g) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(fn(x, g, 0.1), sse - 16 * 0.01, rtol=1e-5)
  np.testing.assert_allclose(fn(x, g, 0.2), sse - 16 * 0.04, rtol=1e-5)


_INPUTS = ("random", "flat_pair", "flat_vs_random", "identical")


@pytest.mark.parametrize("name", sorted(_ALL))
def test_gradients_are_finite(name):
  gradient = jax.jit(jax.grad(lambda r, x: jnp.sum(_ALL[name](x, r))))
  for inputs in _INPUTS:
    x = _images(15, (3, 8, 8, 2))
    g = _images(16, (3, 8, 8, 2))
    if inputs == "flat_pair":
      x, g = np.full_like(x, 0.3), np.full_like(g, 0.6)
    elif inputs == "flat_vs_random":
      g = np.full_like(g, 0.5)
    elif inputs == "identical":
      if name == "rmse":
        continue   # a metric, with no gradient at zero error (like sqrt at 0)
      g = x
    grad = gradient(g, x)
    assert grad.shape == g.shape
    assert np.all(np.isfinite(grad)), inputs


def test_gradients_against_hand_values():
  x = np.array([[1.0, 2.0, 3.0]], np.float32)
  g = np.array([[1.0, 2.5, 2.0]], np.float32)
  # d/dg ||x - g||^2 = 2 (g - x).
  np.testing.assert_allclose(
      jax.jit(jax.grad(lambda r: C.reconstruction_error(x, r, 0.1).sum()))(g),
      [[0.0, 1.0, -2.0]], rtol=1e-6)
  # g = x maximises the correlation: the gradient of pNCC vanishes there.
  images = _images(17, (1, 5, 5, 1))
  grad = jax.jit(jax.grad(
      lambda r: C.patch_normalized_cross_correlation(images, r, 0.5).sum()))(images)
  np.testing.assert_allclose(grad, 0.0, atol=1e-4)
