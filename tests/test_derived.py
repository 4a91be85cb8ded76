"""Tests of geco_jax.data.derived: layouts, label relations, rotation."""

import hashlib
import os

import numpy as np
import pytest

from geco_jax.data import derived
from geco_jax.data.derived import color_mnist
from geco_jax.data.derived import micro_mnist
from geco_jax.data.derived import mnist_rotate
from geco_jax.data.derived import mnist_sum
from geco_jax.data.derived import mnist_sum_hard
from geco_jax.data.derived import mnist_triplets
from geco_jax.data.derived import rotate_images

TRIPLET_DATASETS = (color_mnist, mnist_triplets, mnist_sum, mnist_sum_hard,
                    mnist_rotate)
CONDITIONAL = (mnist_sum, mnist_sum_hard, mnist_rotate)

# l3 as a function of (l1, l2), per dataset; None: l3 is free.
RELATIONS = {
    color_mnist: None,
    mnist_triplets: lambda l1, l2: (l1 + l2) % 10,
    mnist_sum: lambda l1, l2: (l1 + l2) % 10,
    mnist_sum_hard: lambda l1, l2: (l1 * l2) % 10,
    mnist_rotate: lambda l1, l2: l2,
}


def _fake_mnist(seed=0):
  """A small stand-in for MNIST: unique random images, unbalanced classes.

  Class ``c`` has ``3 + 4 c`` images (3 to 39), so uniform labels in the
  derived sets cannot come from sampling base rows uniformly.
  """
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(10), 3 + 4 * np.arange(10))
  labels = labels[rng.permutation(labels.size)].astype(np.uint8)
  images = rng.random((labels.size, 28, 28, 1)).astype(np.float32)
  return images, labels


@pytest.fixture(scope="module")
def base():
  return _fake_mnist()


def _assert_base_images_match(dataset, out, images):
  """The digits in the output are exactly the base images at 'index'."""
  index = out["index"]
  if dataset is color_mnist:
    for c in range(3):
      np.testing.assert_array_equal(out["image"][..., c],
                                    images[index[:, c], :, :, 0])
  elif dataset is mnist_triplets:
    for k in range(3):
      np.testing.assert_array_equal(out["image"][:, :, 28 * k:28 * (k + 1)],
                                    images[index[:, k]])
  else:
    np.testing.assert_array_equal(out["context"][:, 0], images[index[:, 0]])
    np.testing.assert_array_equal(out["context"][:, 1], images[index[:, 1]])
    if dataset is mnist_rotate:
      expected = np.clip(rotate_images(images[index[:, 2]], out["angle"]), 0,
                         1)
      np.testing.assert_array_equal(out["target"], expected)
    else:
      np.testing.assert_array_equal(out["target"], images[index[:, 2]])


def _assert_relation(dataset, out, base_labels):
  """The relation holds on every example; the digits are of those classes."""
  labels, index = out["labels"], out["index"]
  np.testing.assert_array_equal(base_labels[index], labels)
  relation = RELATIONS[dataset]
  if relation is not None:
    l1, l2 = labels[:, 0].astype(np.int64), labels[:, 1].astype(np.int64)
    np.testing.assert_array_equal(labels[:, 2], relation(l1, l2))
  # Three different base images in every example.
  assert np.all(index[:, 0] != index[:, 1])
  assert np.all(index[:, 0] != index[:, 2])
  assert np.all(index[:, 1] != index[:, 2])


# --------------------------------------------------------------- layouts ---

EXPECTED_SHAPES = {
    color_mnist: {"image": (50, 28, 28, 3)},
    mnist_triplets: {"image": (50, 28, 84, 1)},
    mnist_sum: {"context": (50, 2, 28, 28, 1), "target": (50, 28, 28, 1)},
    mnist_sum_hard: {"context": (50, 2, 28, 28, 1),
                     "target": (50, 28, 28, 1)},
    mnist_rotate: {"context": (50, 2, 28, 28, 1), "target": (50, 28, 28, 1),
                   "angle": (50,)},
}


@pytest.mark.parametrize("dataset", TRIPLET_DATASETS,
                         ids=lambda f: f.__name__)
def test_shapes_dtypes_and_range(base, dataset):
  images, labels = base
  out = dataset(images, labels, 50, seed=1)
  expected = dict(EXPECTED_SHAPES[dataset], labels=(50, 3), index=(50, 3))
  assert {k: v.shape for k, v in out.items()} == expected
  assert out["labels"].dtype == np.int32
  assert out["index"].dtype == np.int64
  for name in ("image", "context", "target", "angle"):
    if name in out:
      assert out[name].dtype == np.float32
  for name in ("image", "context", "target"):
    if name in out:
      assert out[name].min() >= 0.0 and out[name].max() <= 1.0
  assert out["labels"].min() >= 0 and out["labels"].max() <= 9


@pytest.mark.parametrize("dataset", TRIPLET_DATASETS,
                         ids=lambda f: f.__name__)
def test_relation_holds_on_every_example(base, dataset):
  images, labels = base
  out = dataset(images, labels, 3000, seed=2)
  _assert_relation(dataset, out, labels)
  _assert_base_images_match(dataset, out, images)


def test_triplets_and_sum_share_triplets(base):
  images, labels = base
  triplets = mnist_triplets(images, labels, 200, seed=4)
  summed = mnist_sum(images, labels, 200, seed=4)
  np.testing.assert_array_equal(triplets["index"], summed["index"])
  np.testing.assert_array_equal(triplets["image"][:, :, 56:], summed["target"])
  hard = mnist_sum_hard(images, labels, 200, seed=4)
  np.testing.assert_array_equal(hard["index"][:, :2], summed["index"][:, :2])


def test_rotate_angle_and_target(base):
  images, labels = base
  out = mnist_rotate(images, labels, 500, seed=5)
  np.testing.assert_array_equal(out["angle"], 36.0 * out["labels"][:, 0])
  assert set(np.unique(out["angle"])) == set(36.0 * np.arange(10))
  # Digit 0 means no rotation: the target is x3 itself.
  zero = out["labels"][:, 0] == 0
  assert zero.any()
  np.testing.assert_array_equal(out["target"][zero],
                                images[out["index"][zero, 2]])


# ------------------------------------------------------------ determinism ---

@pytest.mark.parametrize("dataset", TRIPLET_DATASETS,
                         ids=lambda f: f.__name__)
def test_deterministic_prefix_and_seed(base, dataset):
  images, labels = base
  first = dataset(images, labels, 100, seed=7)
  again = dataset(images, labels, 100, seed=7)
  longer = dataset(images, labels, 150, seed=7)
  other = dataset(images, labels, 100, seed=8)
  for name in first:
    np.testing.assert_array_equal(first[name], again[name])
    np.testing.assert_array_equal(first[name], longer[name][:100])
  assert not np.array_equal(first["index"], other["index"])


def test_known_bytes(base):
  """Pins the sampling and the rotation bit for bit (any platform)."""
  images, labels = base
  out = mnist_rotate(images, labels, 40, seed=3)
  digest = hashlib.sha256(out["index"].tobytes()
                          + out["target"].tobytes()).hexdigest()
  assert digest == KNOWN_ROTATE_DIGEST


KNOWN_ROTATE_DIGEST = (
    "589e7cd74e18cb60a31deb5c06bc0eb744618ea41096ac9a4bc73a9500b55d71")


# ---------------------------------------------------------- class balance ---

def _assert_uniform(values, num_classes=10):
  n = values.size
  counts = np.bincount(values, minlength=num_classes)
  p = 1.0 / num_classes
  sigma = np.sqrt(n * p * (1 - p))
  assert np.all(np.abs(counts - n * p) < 5 * sigma), counts


@pytest.mark.parametrize("dataset", TRIPLET_DATASETS,
                         ids=lambda f: f.__name__)
def test_labels_uniform_despite_unbalanced_base(base, dataset):
  images, labels = base
  out = dataset(images, labels, 20000, seed=9)
  _assert_uniform(out["labels"][:, 0])
  _assert_uniform(out["labels"][:, 1])
  if dataset in (color_mnist, mnist_triplets, mnist_sum, mnist_rotate):
    _assert_uniform(out["labels"][:, 2])
  if dataset is color_mnist:
    modes = out["labels"].astype(np.int64) @ np.array([100, 10, 1])
    _assert_uniform(modes, 1000)
    assert np.unique(modes).size == 1000
  # Instances are uniform within a class: class 9 has 39 of them.
  nines = out["index"][:, 1][out["labels"][:, 1] == 9]
  assert np.unique(nines).size == 39
  _assert_uniform(np.unique(nines, return_inverse=True)[1], 39)


def test_distinct_instances_are_uniform():
  """With 3 images per class, equal-class digits take a uniform permutation."""
  rng = np.random.default_rng(1)
  labels = np.tile(np.arange(10), 3)
  images = rng.random((30, 28, 28, 1)).astype(np.float32)
  out = color_mnist(images, labels, 30000, seed=11)
  same = np.all(out["labels"] == out["labels"][:, :1], axis=1)
  index = out["index"][same]
  # Rows of one class are c, c + 10, c + 20: rank them 0, 1, 2.
  ranks = index // 10
  assert np.all(np.sort(ranks, axis=1) == [0, 1, 2])
  permutation = ranks @ np.array([9, 3, 1])
  counts = np.bincount(permutation)[np.bincount(permutation) > 0]
  assert counts.size == 6
  _assert_uniform(np.unique(permutation, return_inverse=True)[1], 6)
  # x2 and x3 of mnist_rotate: ordered pairs of different instances.
  out = mnist_rotate(images, labels, 6000, seed=12)
  pairs = (out["index"][:, 1] // 10) * 3 + out["index"][:, 2] // 10
  assert set(np.unique(pairs)) == {1, 2, 3, 5, 6, 7}
  _assert_uniform(np.unique(pairs, return_inverse=True)[1], 6)


def test_sum_hard_target_distribution(base):
  images, labels = base
  out = mnist_sum_hard(images, labels, 20000, seed=10)
  table = np.outer(np.arange(10), np.arange(10)) % 10
  expected = np.bincount(table.ravel(), minlength=10) / 100.0
  np.testing.assert_array_equal(expected * 100,
                                [27, 4, 12, 4, 12, 9, 12, 4, 12, 4])
  observed = np.bincount(out["labels"][:, 2], minlength=10) / 20000
  np.testing.assert_allclose(observed, expected, atol=0.015)


# --------------------------------------------------------------- rotation ---

@pytest.mark.parametrize("angle,quarter_turns",
                         [(0, 0), (90, 1), (180, 2), (270, 3), (-90, -1),
                          (360, 0), (450, 1), (-720, 0)])
def test_rotation_by_quarter_turns_is_rot90(angle, quarter_turns):
  images = np.random.default_rng(0).random((4, 28, 28, 2)).astype(np.float32)
  rotated = rotate_images(images, angle)
  # np.rot90 with k = 1 turns the (row, column) axes counter-clockwise as
  # displayed: the top-right corner moves to the top-left.
  np.testing.assert_array_equal(rotated,
                                np.rot90(images, quarter_turns, axes=(1, 2)))
  if quarter_turns == 1:
    np.testing.assert_array_equal(rotated[:, 0, 0], images[:, 0, -1])


def test_rotation_by_360_in_steps_is_identity_up_to_interpolation():
  blob = _blob(row=8.0, col=18.0)
  once = rotate_images(blob, 360.0)
  np.testing.assert_array_equal(once, blob)
  # Ten turns by 36 degrees: each interpolation blurs (the peak drops by
  # about 40% in all), but the ink and its position come back.
  turned = blob
  for _ in range(10):
    turned = rotate_images(turned, 36.0)
  np.testing.assert_allclose(turned.sum(), blob.sum(), rtol=2e-3)
  peak = np.unravel_index(turned[0, :, :, 0].argmax(), (28, 28))
  assert peak == (8, 18)
  mass = turned[0, :, :, 0].sum()
  row = (turned[0, :, :, 0] * np.arange(28)[:, None]).sum() / mass
  col = (turned[0, :, :, 0] * np.arange(28)[None, :]).sum() / mass
  assert abs(row - 8.0) < 0.01 and abs(col - 18.0) < 0.01


def _blob(row, col, sigma=1.5):
  i = np.arange(28.0)[:, None]
  j = np.arange(28.0)[None, :]
  blob = np.exp(-((i - row)**2 + (j - col)**2) / (2 * sigma**2))
  return blob.astype(np.float32)[None, :, :, None]


@pytest.mark.parametrize("angle", [36.0, 72.0, 123.4, -50.0, 324.0])
def test_rotation_moves_a_blob_counter_clockwise(angle):
  # A blob up and to the right of the centre, well inside the inscribed disc.
  row, col, centre = 8.0, 18.0, 13.5
  blob = _blob(row, col)
  rotated = rotate_images(blob, angle)[0, :, :, 0]
  mass = rotated.sum()
  np.testing.assert_allclose(mass, blob.sum(), rtol=2e-3)
  got_row = (rotated * np.arange(28)[:, None]).sum() / mass
  got_col = (rotated * np.arange(28)[None, :]).sum() / mass
  x, y = col - centre, centre - row       # y up
  t = np.deg2rad(angle)
  x_new = np.cos(t) * x - np.sin(t) * y
  y_new = np.sin(t) * x + np.cos(t) * y
  assert abs(got_row - (centre - y_new)) < 0.01
  assert abs(got_col - (centre + x_new)) < 0.01


def test_rotation_per_example_angles_and_zero_outside():
  images = np.ones((3, 28, 28, 1), np.float32)
  rotated = rotate_images(images, np.array([0.0, 45.0, 90.0]))
  np.testing.assert_array_equal(rotated[0], images[0])
  np.testing.assert_array_equal(rotated[2], images[2])
  # At 45 degrees the corners sample outside the image, which is zero there;
  # the centre stays fully inside.
  assert rotated[1, 0, 0, 0] == 0.0
  np.testing.assert_allclose(rotated[1, 10:18, 10:18], 1.0, atol=1e-6)
  assert rotate_images(images[:0], 30.0).shape == (0, 28, 28, 1)


def test_rotation_does_not_depend_on_batching():
  rng = np.random.default_rng(4)
  images = rng.random((600, 12, 10, 1)).astype(np.float32)
  angles = rng.uniform(-400.0, 400.0, 600)
  angles[::7] = 36.0
  batch = rotate_images(images, angles)
  for i in (0, 7, 255, 256, 300, 599):
    np.testing.assert_array_equal(batch[i:i + 1],
                                  rotate_images(images[i:i + 1], angles[i]))


def test_sin_cos_degrees_matches_numpy():
  degrees = np.linspace(-800.0, 800.0, 4001)
  sin, cos = derived._sin_cos_degrees(degrees)
  np.testing.assert_allclose(sin, np.sin(np.deg2rad(degrees)), atol=1e-15)
  np.testing.assert_allclose(cos, np.cos(np.deg2rad(degrees)), atol=1e-15)
  sin, cos = derived._sin_cos_degrees(90.0 * np.arange(-4, 5))
  np.testing.assert_array_equal(sin, [0, 1, 0, -1, 0, 1, 0, -1, 0])
  np.testing.assert_array_equal(cos, [1, 0, -1, 0, 1, 0, -1, 0, 1])


@pytest.mark.parametrize("images,angles,match", [
    (np.zeros((2, 28, 28)), 0.0, "shape"),
    (np.zeros((2, 28, 28, 1)), np.zeros(3), "angles must be a scalar"),
    (np.zeros((2, 28, 28, 1)), [0.0, np.nan], "finite"),
])
def test_rotation_argument_errors(images, angles, match):
  with pytest.raises(ValueError, match=match):
    rotate_images(images, angles)


# ----------------------------------------------------------- micro-MNIST ---

def test_micro_mnist(base):
  images, labels = base
  out = micro_mnist(images, labels)
  assert out["image"].shape == (7, 28, 28, 1)
  assert out["image"].dtype == np.float32
  assert out["labels"].shape == (7,) and out["labels"].dtype == np.int32
  assert out["index"].shape == (7,) and out["index"].dtype == np.int64
  assert np.unique(out["index"]).size == 7
  np.testing.assert_array_equal(out["image"], images[out["index"]])
  np.testing.assert_array_equal(out["labels"], labels[out["index"]])
  again = micro_mnist(images, labels, seed=0)
  np.testing.assert_array_equal(out["index"], again["index"])
  other = micro_mnist(images, labels, seed=1)
  assert not np.array_equal(out["index"], other["index"])
  everything = micro_mnist(images, labels, num_images=labels.size)
  np.testing.assert_array_equal(np.sort(everything["index"]),
                                np.arange(labels.size))


# ---------------------------------------------------------------- errors ---

def _bad_base(kind):
  images, labels = _fake_mnist()
  if kind == "ndim":
    return images[..., 0], labels
  if kind == "channels":
    return np.repeat(images, 3, axis=-1), labels
  if kind == "uint8":
    return (images * 255).astype(np.uint8), labels
  if kind == "range":
    return images * 2.0, labels
  if kind == "nan":
    images = images.copy()
    images[0, 0, 0, 0] = np.nan
    return images, labels
  if kind == "length":
    return images, labels[:-1]
  if kind == "float_labels":
    return images, labels.astype(np.float32)
  if kind == "label_range":
    labels = labels.astype(np.int64)
    labels[0] = 10
    return images, labels
  if kind == "short_class":
    keep = np.ones(labels.size, bool)
    keep[np.flatnonzero(labels == 0)[0]] = False   # class 0 has 3 images
    return images[keep], labels[keep]
  raise AssertionError(kind)


@pytest.mark.parametrize("dataset", TRIPLET_DATASETS + (micro_mnist,),
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind,match", [
    ("ndim", r"shape \[N, height, width, 1\]"),
    ("channels", r"shape \[N, height, width, 1\]"),
    ("uint8", "divide uint8"),
    ("range", r"in \[0, 1\]"),
    ("nan", r"in \[0, 1\]"),
    ("length", "labels must have shape"),
    ("float_labels", "labels must be integers"),
    ("label_range", r"labels must lie in 0\.\.9"),
    ("short_class", "at least 3 images"),
])
def test_bad_base_arrays(dataset, kind, match):
  if dataset is micro_mnist and kind == "short_class":
    return  # micro-MNIST has no per-class requirement
  images, labels = _bad_base(kind)
  with pytest.raises(ValueError, match=match):
    if dataset is micro_mnist:
      dataset(images, labels)
    else:
      dataset(images, labels, 5)


@pytest.mark.parametrize("dataset", TRIPLET_DATASETS,
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("num_examples,seed,match", [
    (0, 0, "num_examples must be at least 1"),
    (2.5, 0, "num_examples must be an integer"),
    (5, -1, "seed must be at least 0"),
    (5, None, "seed must be an integer"),
])
def test_bad_counts_and_seeds(base, dataset, num_examples, seed, match):
  images, labels = base
  with pytest.raises(ValueError, match=match):
    dataset(images, labels, num_examples, seed)


def test_micro_mnist_errors(base):
  images, labels = base
  with pytest.raises(ValueError, match="num_images must be at most"):
    micro_mnist(images, labels, num_images=labels.size + 1)
  with pytest.raises(ValueError, match="num_images must be at least 1"):
    micro_mnist(images, labels, num_images=0)
  with pytest.raises(ValueError, match="seed must be at least 0"):
    micro_mnist(images, labels, seed=-3)


# ------------------------------------------------------------ real MNIST ---

@pytest.fixture(scope="module")
def mnist_test_split():
  data_dir = os.environ.get("GECO_DATA_DIR")
  if not data_dir:
    pytest.skip("GECO_DATA_DIR is unset: no real MNIST (mnist.npz) to test on.")
  path = os.path.join(data_dir, "mnist.npz")
  if not os.path.exists(path):
    pytest.skip(f"{path} does not exist.")
  with np.load(path) as data:
    images = (data["x_test"] / np.float32(255.0)).astype(np.float32)
    return images[..., None], data["y_test"]


@pytest.mark.parametrize("dataset", TRIPLET_DATASETS,
                         ids=lambda f: f.__name__)
def test_real_mnist_relations(mnist_test_split, dataset):
  images, labels = mnist_test_split
  out = dataset(images, labels, 2000, seed=0)
  _assert_relation(dataset, out, labels)
  _assert_base_images_match(dataset, out, images)


def test_real_mnist_rotation_keeps_ink(mnist_test_split):
  images, labels = mnist_test_split
  out = mnist_rotate(images, labels, 2000, seed=1)
  before = images[out["index"][:, 2]].sum(axis=(1, 2, 3))
  after = out["target"].sum(axis=(1, 2, 3))
  ratio = after / before
  assert ratio.min() > 0.95 and ratio.max() < 1.05
  assert abs(ratio.mean() - 1.0) < 0.005
  # The intensity-weighted centroid of a digit turns with it.
  grid = np.arange(28.0)
  for source, target, angle in zip(images[out["index"][:50, 2], :, :, 0],
                                   out["target"][:50, :, :, 0],
                                   out["angle"][:50]):
    def centroid(image):
      mass = image.sum()
      return ((image * grid[None, :]).sum() / mass - 13.5,
              13.5 - (image * grid[:, None]).sum() / mass)
    x, y = centroid(source)
    t = np.deg2rad(angle)
    expected = (np.cos(t) * x - np.sin(t) * y, np.sin(t) * x + np.cos(t) * y)
    np.testing.assert_allclose(centroid(target), expected, atol=0.3)


def test_real_micro_mnist(mnist_test_split):
  images, labels = mnist_test_split
  out = micro_mnist(images, labels, seed=0)
  np.testing.assert_array_equal(out["labels"], labels[out["index"]])
  assert out["image"].shape == (7, 28, 28, 1)
