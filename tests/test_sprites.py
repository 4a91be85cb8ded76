"""Tests of geco_jax.data.sprites: shapes, determinism, and factors that match the images."""

import hashlib

import numpy as np
import pytest

from geco_jax.data import SHAPES
from geco_jax.data import make_sprites
from geco_jax.data import sprites_dataset
from geco_jax.data import sprites

FACTORS = ("shape", "scale", "rotation", "x", "y")


@pytest.fixture(scope="module")
def sample():
  return make_sprites(2000, seed=3)


def _centroids(images):
  """Intensity-weighted centroid (x along columns, y along rows), in pixels."""
  images = images[..., 0].astype(np.float64)
  size = images.shape[1]
  centres = np.arange(size) + 0.5
  ink = images.sum(axis=(1, 2))
  x = (images * centres[None, None, :]).sum(axis=(1, 2)) / ink
  y = (images * centres[None, :, None]).sum(axis=(1, 2)) / ink
  return x, y


def test_shapes_dtypes_and_range(sample):
  images, factors = sample
  assert images.shape == (2000, 28, 28, 1)
  assert images.dtype == np.float32
  assert images.min() == 0.0 and images.max() == 1.0
  assert set(factors) == set(FACTORS)
  for name in FACTORS:
    assert factors[name].shape == (2000,)
  assert factors["shape"].dtype == np.int32
  for name in ("scale", "rotation", "x", "y"):
    assert factors[name].dtype == np.float32
  assert factors["scale"].min() >= sprites.MIN_SCALE
  assert factors["scale"].max() <= sprites.MAX_SCALE
  assert factors["rotation"].min() >= 0.0
  assert factors["rotation"].max() <= np.float32(2 * np.pi)
  radius = factors["scale"] * 28
  for name in ("x", "y"):
    assert np.all(factors[name] >= radius - 1e-4)
    assert np.all(factors[name] <= 28 - radius + 1e-4)


def test_other_image_size():
  images, factors = make_sprites(10, image_size=8, seed=1)
  assert images.shape == (10, 8, 8, 1)
  images, _ = make_sprites(3, image_size=64, seed=1)
  assert images.shape == (3, 64, 64, 1)
  assert np.all(images.sum(axis=(1, 2, 3)) > 0)


def test_anti_aliased(sample):
  images, _ = sample
  grey = (images > 0) & (images < 1)
  # Every image has edge pixels strictly between black and white, and the
  # values are the 4 x 4 sub-pixel fractions k / 16.
  assert np.all(grey.any(axis=(1, 2, 3)))
  np.testing.assert_array_equal(images * 16, np.round(images * 16))
  assert len(np.unique(images)) == 17


def test_every_shape_appears(sample):
  _, factors = sample
  counts = np.bincount(factors["shape"], minlength=len(SHAPES))
  assert len(counts) == len(SHAPES)
  assert np.all(counts > 400)   # uniform: 500 each expected


def test_shape_subset_and_order():
  _, factors = make_sprites(200, seed=0, shapes=("heart", "square"))
  assert set(np.unique(factors["shape"])) == {0, 1}
  images, factors = make_sprites(50, seed=0, shapes=("ellipse",))
  np.testing.assert_array_equal(factors["shape"], 0)
  ink = images.sum(axis=(1, 2, 3))
  expected = sprites.UNIT_AREAS["ellipse"] * (factors["scale"] * 28.0) ** 2
  np.testing.assert_allclose(ink, expected, rtol=0.03)


def test_deterministic():
  a_images, a_factors = make_sprites(300, seed=7)
  b_images, b_factors = make_sprites(300, seed=7)
  assert a_images.tobytes() == b_images.tobytes()
  for name in FACTORS:
    assert a_factors[name].tobytes() == b_factors[name].tobytes()


def test_prefix_stable():
  small_images, small_factors = make_sprites(50, seed=7)
  big_images, big_factors = make_sprites(120, seed=7)
  np.testing.assert_array_equal(small_images, big_images[:50])
  for name in FACTORS:
    np.testing.assert_array_equal(small_factors[name], big_factors[name][:50])


def test_known_bytes():
  """Pins the stream: a change here breaks reproducibility across versions."""
  images, factors = make_sprites(64, seed=0)
  digest = hashlib.sha256(images.tobytes())
  for name in FACTORS:
    digest.update(factors[name].tobytes())
  assert digest.hexdigest() == (
      "0b574d88776d60193bdcebcc94d5caf6db80a34b612814ce0b811c543d2936ae")


def test_different_seeds_differ():
  a_images, a_factors = make_sprites(100, seed=0)
  b_images, b_factors = make_sprites(100, seed=1)
  assert not np.array_equal(a_images, b_images)
  for name in ("scale", "rotation", "x", "y"):
    assert not np.any(a_factors[name] == b_factors[name])


def test_sin_cos_matches_numpy():
  theta = np.linspace(0.0, 2.0 * np.pi, 10001)
  sin, cos = sprites._sin_cos(theta)
  np.testing.assert_allclose(sin, np.sin(theta), rtol=0, atol=1e-14)
  np.testing.assert_allclose(cos, np.cos(theta), rtol=0, atol=1e-14)


def test_centroid_matches_position(sample):
  images, factors = sample
  x, y = _centroids(images)
  np.testing.assert_allclose(x, factors["x"], atol=0.15)
  np.testing.assert_allclose(y, factors["y"], atol=0.15)
  assert np.mean(np.abs(x - factors["x"])) < 0.03
  assert np.mean(np.abs(y - factors["y"])) < 0.03


def test_ink_grows_with_scale(sample):
  """Ink is the shape's area, (scale * size)^2 times its unit area: no clipping."""
  images, factors = sample
  ink = images.sum(axis=(1, 2, 3))
  for index, name in enumerate(SHAPES):
    members = factors["shape"] == index
    scale = factors["scale"][members]
    expected = sprites.UNIT_AREAS[name] * (scale * 28.0) ** 2
    np.testing.assert_allclose(ink[members], expected, rtol=0.03)
    order = np.argsort(scale)
    small, large = order[:50], order[-50:]
    assert ink[members][large].min() > ink[members][small].max()


def test_rotation_matches_ellipse_axis():
  """The ellipse's long axis is at `rotation` (mod pi), counter-clockwise as displayed."""
  images, factors = make_sprites(200, seed=4, image_size=48,
                                 shapes=("ellipse",))
  images = images[..., 0].astype(np.float64)
  centres = np.arange(48) + 0.5
  dx = centres[None, None, :] - factors["x"][:, None, None]
  dy = factors["y"][:, None, None] - centres[None, :, None]    # y up
  ink = images.sum(axis=(1, 2))
  cxx = (images * dx * dx).sum(axis=(1, 2)) / ink
  cyy = (images * dy * dy).sum(axis=(1, 2)) / ink
  cxy = (images * dx * dy).sum(axis=(1, 2)) / ink
  angle = 0.5 * np.arctan2(2 * cxy, cxx - cyy)
  error = np.angle(np.exp(2j * (angle - factors["rotation"]))) / 2
  assert np.max(np.abs(error)) < 0.05


def test_shape_lies_in_enclosing_disc(sample):
  images, factors = sample
  centres = np.arange(28) + 0.5
  dx = centres[None, None, :] - factors["x"][:, None, None]
  dy = centres[None, :, None] - factors["y"][:, None, None]
  distance = np.sqrt(dx * dx + dy * dy)
  radius = np.broadcast_to(factors["scale"][:, None, None] * 28,
                           distance.shape)
  # A pixel with ink has a sub-pixel centre in the disc, and its own centre
  # is within 0.375 * sqrt(2) pixels of that.
  inked = images[..., 0] > 0
  assert np.all(distance[inked] < radius[inked] + 0.375 * np.sqrt(2) + 1e-4)


def test_dataset_splits():
  data = sprites_dataset(300, 100, seed=5)
  assert set(data) == {"train", "test"}
  assert set(data["train"]) == {"image", *FACTORS}
  assert data["train"]["image"].shape == (300, 28, 28, 1)
  assert data["test"]["image"].shape == (100, 28, 28, 1)
  for name in FACTORS:
    assert data["test"][name].shape == (100,)
  # Disjoint seeds: even for train, odd for test.
  train_images, _ = make_sprites(300, seed=10)
  test_images, _ = make_sprites(100, seed=11)
  np.testing.assert_array_equal(data["train"]["image"], train_images)
  np.testing.assert_array_equal(data["test"]["image"], test_images)
  assert not np.array_equal(data["train"]["image"][:100], data["test"]["image"])
  assert not np.any(data["train"]["x"][:100] == data["test"]["x"])
  # No base seed's test split is another base seed's train split.
  other = sprites_dataset(100, 100, seed=6)
  assert not np.array_equal(other["train"]["image"], data["test"]["image"])
  small = sprites_dataset(10, 10, image_size=16, seed=5)
  assert small["train"]["image"].shape == (10, 16, 16, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_examples=0), "num_examples must be at least 1"),
    (dict(num_examples=-3), "num_examples must be at least 1"),
    (dict(num_examples=2.5), "num_examples must be an integer"),
    (dict(num_examples=4, image_size=7), "image_size must be at least 8"),
    (dict(num_examples=4, shapes=("square", "star")), "Unknown shape.*star"),
    (dict(num_examples=4, shapes=()), "at least one"),
    (dict(num_examples=4, shapes="square"), "not the string"),
    (dict(num_examples=4, shapes=("heart", "heart")), "repeat"),
    (dict(num_examples=4, seed=-1), "seed must be at least 0"),
])
def test_argument_errors(kwargs, match):
  num_examples = kwargs.pop("num_examples")
  with pytest.raises(ValueError, match=match):
    make_sprites(num_examples, **kwargs)


def test_dataset_argument_errors():
  with pytest.raises(ValueError, match="num_test must be at least 1"):
    sprites_dataset(10, 0)
  with pytest.raises(ValueError, match="num_train must be at least 1"):
    sprites_dataset(0, 10)
  with pytest.raises(ValueError, match="image_size"):
    sprites_dataset(10, 10, image_size=4)
