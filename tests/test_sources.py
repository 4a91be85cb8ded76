"""Tests of geco_jax.data.sources: the npz and tfds dataset sources.

The real-data tests read the shared data directory through GECO_DATA_DIR and
skip where it is unset. The tfds tests use ``tfds.testing.mock_data`` (no
download) or the original MNIST archives in ``$GECO_DATA_DIR/tfds_manual``
(the offline build is marked slow).
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from geco_jax.data import sources
from geco_jax.data.sources import DatasetNotFoundError
from geco_jax.data.sources import load
from geco_jax.data.sources import load_npz
from geco_jax.data.sources import load_tfds

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                      5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR10_TRAIN_COUNTS = [396, 366, 420, 384, 422, 393, 414, 385, 407, 413]
CIFAR10_TEST_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


@pytest.fixture(scope="module")
def geco_data_dir():
  path = os.environ.get("GECO_DATA_DIR")
  if not path:
    pytest.skip("GECO_DATA_DIR is unset; set it to the shared data directory "
                "(e.g. GECO_DATA_DIR=/work/shared/data) to test the real "
                "datasets.")
  return path


@pytest.fixture(scope="module")
def mnist_npz(geco_data_dir):
  del geco_data_dir  # load_npz reads GECO_DATA_DIR itself.
  return load_npz("mnist")


@pytest.fixture(scope="module")
def tfds():
  # Import TensorFlow up front, so the timed tests do not time its import.
  pytest.importorskip("tensorflow")
  return pytest.importorskip("tensorflow_datasets")


def _write_npz(directory, name="fake", **arrays):
  path = directory / f"{name}.npz"
  np.savez(path, **arrays)
  return path


def _fake_arrays(n_train=6, n_test=4, image_shape=(5, 7)):
  rng = np.random.default_rng(0)
  return {
      "x_train": rng.integers(0, 256, (n_train, *image_shape), np.uint8),
      "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
      "x_test": rng.integers(0, 256, (n_test, *image_shape), np.uint8),
      "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
  }


def _check_splits(data, image_shape, num_train, num_test):
  assert set(data) == {"train", "test"}
  for split, count in (("train", num_train), ("test", num_test)):
    assert set(data[split]) == {"image", "label"}
    images, labels = data[split]["image"], data[split]["label"]
    assert images.shape == (count, *image_shape)
    assert images.dtype == np.float32
    assert labels.shape == (count,)
    assert labels.dtype == np.int32
    assert images.min() >= 0.0 and images.max() <= 1.0


# ---------------------------------------------------------------------------
# npz source on the real shared data.


def test_npz_mnist_real(mnist_npz):
  _check_splits(mnist_npz, (28, 28, 1), 60000, 10000)
  train, test = mnist_npz["train"], mnist_npz["test"]
  assert train["image"].min() == 0.0 and train["image"].max() == 1.0
  np.testing.assert_array_equal(np.bincount(train["label"]),
                                MNIST_TRAIN_COUNTS)
  np.testing.assert_array_equal(np.bincount(test["label"]), MNIST_TEST_COUNTS)
  mean = train["image"].mean(dtype=np.float64)
  std = train["image"].std(dtype=np.float64)
  assert mean == pytest.approx(0.1306604762738429, abs=1e-6)
  assert std == pytest.approx(0.30810780385646264, abs=1e-6)
  # Pixels are exactly uint8 / 255: scaling back gives integers.
  first = train["image"][:100] * 255
  np.testing.assert_array_equal(first, np.round(first))


def test_npz_cifar10_real_partial(geco_data_dir):
  data = load_npz("cifar10", data_dir=geco_data_dir)
  _check_splits(data, (32, 32, 3), 4000, 1000)
  np.testing.assert_array_equal(np.bincount(data["train"]["label"]),
                                CIFAR10_TRAIN_COUNTS)
  np.testing.assert_array_equal(np.bincount(data["test"]["label"]),
                                CIFAR10_TEST_COUNTS)
  np.testing.assert_array_equal(data["test"]["label"][:10],
                                [3, 8, 8, 0, 6, 6, 1, 6, 3, 1])
  channel_mean = data["train"]["image"].mean(axis=(0, 1, 2), dtype=np.float64)
  np.testing.assert_allclose(channel_mean, [0.4916, 0.4818, 0.4447],
                             atol=1e-4)


def test_npz_fashion_mnist_real(geco_data_dir):
  data = load("fashion_mnist", "npz", data_dir=geco_data_dir)
  _check_splits(data, (28, 28, 1), 60000, 10000)
  np.testing.assert_array_equal(np.bincount(data["train"]["label"]),
                                [6000] * 10)


# ---------------------------------------------------------------------------
# npz source on small fake files.


def test_npz_fake_values_and_channel_axis(tmp_path):
  arrays = _fake_arrays()
  _write_npz(tmp_path, **arrays)
  data = load_npz("fake", data_dir=str(tmp_path))
  _check_splits(data, (5, 7, 1), 6, 4)
  for split in ("train", "test"):
    expected = arrays[f"x_{split}"][..., None].astype(np.float32) / 255
    np.testing.assert_array_equal(data[split]["image"], expected)
    np.testing.assert_array_equal(data[split]["label"], arrays[f"y_{split}"])


def test_npz_rgb_and_column_labels(tmp_path):
  arrays = _fake_arrays(image_shape=(4, 4, 3))
  arrays["y_train"] = arrays["y_train"][:, None].astype(np.int64)   # (N, 1)
  arrays["y_test"] = arrays["y_test"].astype(np.int16)
  _write_npz(tmp_path, **arrays)
  data = load_npz("fake", data_dir=tmp_path)
  _check_splits(data, (4, 4, 3), 6, 4)
  np.testing.assert_array_equal(data["train"]["label"],
                                arrays["y_train"][:, 0])


def test_npz_reads_geco_data_dir(tmp_path, monkeypatch):
  _write_npz(tmp_path, **_fake_arrays())
  monkeypatch.setenv("GECO_DATA_DIR", str(tmp_path))
  data = load_npz("fake")
  assert data["train"]["image"].shape == (6, 5, 7, 1)


def test_npz_missing_file(tmp_path, monkeypatch):
  monkeypatch.setenv("GECO_DATA_DIR", str(tmp_path))
  with pytest.raises(DatasetNotFoundError) as info:
    load_npz("mnist")
  message = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  assert str(tmp_path / "mnist.npz") in message
  assert "GECO_DATA_DIR" in message
  assert "npz source" in message
  assert "source='tfds'" in message
  # An explicit data_dir that does not exist.
  missing_dir = tmp_path / "nowhere"
  with pytest.raises(DatasetNotFoundError, match="does not exist") as info:
    load_npz("mnist", data_dir=str(missing_dir))
  assert str(missing_dir / "mnist.npz") in str(info.value)


def test_npz_geco_data_dir_unset(monkeypatch):
  monkeypatch.delenv("GECO_DATA_DIR", raising=False)
  with pytest.raises(DatasetNotFoundError, match="GECO_DATA_DIR is unset"):
    load_npz("mnist")


def test_npz_missing_key(tmp_path):
  arrays = _fake_arrays()
  del arrays["y_test"]
  path = _write_npz(tmp_path, **arrays)
  with pytest.raises(ValueError, match=r"missing key\(s\) \['y_test'\]") as e:
    load_npz("fake", data_dir=tmp_path)
  assert str(path) in str(e.value)


@pytest.mark.parametrize("key, value, pattern", [
    ("x_train", np.zeros((6, 5, 7), np.float32), "x_train must be uint8"),
    ("y_train", np.zeros(6, np.float32), "y_train must be integer"),
    ("y_train", np.zeros(6, bool), "y_train must be integer"),
    ("x_test", np.zeros((4, 5), np.uint8), r"x_test must have shape"),
    ("x_test", np.zeros((4, 3, 5, 7), np.uint8), "channels-last"),
    ("y_test", np.zeros((4, 2), np.uint8), r"y_test must have shape \[N\]"),
    ("y_train", np.zeros(5, np.uint8), "6 images and 5 labels"),
    ("x_test", np.zeros((0, 5, 7), np.uint8), "holds no images"),
    ("y_test", np.full(4, 2**40, np.int64), "fit in int32"),
    ("x_test", np.zeros((4, 5, 6), np.uint8), "same"),
])
def test_npz_bad_arrays(tmp_path, key, value, pattern):
  arrays = _fake_arrays()
  arrays[key] = value
  path = _write_npz(tmp_path, **arrays)
  with pytest.raises(ValueError, match=pattern) as info:
    load_npz("fake", data_dir=tmp_path)
  assert str(path) in str(info.value)


def test_npz_not_an_archive(tmp_path):
  path = tmp_path / "fake.npz"
  path.write_bytes(b"not a zip file at all")
  with pytest.raises(ValueError, match="could not be read") as info:
    load_npz("fake", data_dir=tmp_path)
  assert str(path) in str(info.value)
  np.save(tmp_path / "single.npy", np.zeros(3, np.uint8))
  os.rename(tmp_path / "single.npy", tmp_path / "single.npz")
  with pytest.raises(ValueError, match="not an .npz archive"):
    load_npz("single", data_dir=tmp_path)


def test_npz_object_arrays_rejected(tmp_path):
  arrays = _fake_arrays()
  arrays["y_test"] = np.array([1, "a", None, 2], dtype=object)
  path = _write_npz(tmp_path, **arrays)
  with pytest.raises(ValueError) as info:
    load_npz("fake", data_dir=tmp_path)
  assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["", "mnist.npz", "sub/mnist", None])
def test_npz_bad_name(tmp_path, name):
  with pytest.raises(ValueError, match="name"):
    load_npz(name, data_dir=tmp_path)


# ---------------------------------------------------------------------------
# Dispatch.


def test_load_unknown_source():
  with pytest.raises(ValueError, match="valid sources") as info:
    load("mnist", "keras")
  assert "'npz'" in str(info.value) and "'tfds'" in str(info.value)


@pytest.mark.parametrize("source", ["npz", "tfds"])
def test_load_unknown_name(source):
  with pytest.raises(ValueError, match="valid names") as info:
    load("imagenet", source)
  for name in sources.DATASETS[source]:
    assert repr(name) in str(info.value)


def test_load_npz_has_no_fallback(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="npz source"):
    load("mnist", "npz", data_dir=tmp_path)


def test_load_dispatches_to_npz(tmp_path):
  _write_npz(tmp_path, "mnist", **_fake_arrays())
  data = load("mnist", "npz", data_dir=tmp_path)
  assert data["train"]["image"].shape == (6, 5, 7, 1)


def test_import_does_not_import_tensorflow():
  code = ("import sys, geco_jax.data, geco_jax.data.sources; "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets') "
          "if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------
# tfds source.


def test_tfds_missing_package_message(monkeypatch):
  # None in sys.modules makes the import fail (and fast: TF is not loaded).
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="pip install tensorflow-cpu "
                     "tensorflow-datasets"):
    load_tfds("mnist")


def test_tfds_unknown_name():
  with pytest.raises(ValueError, match="celeb_a"):
    load_tfds("svhn_cropped")


def test_tfds_not_prepared_fails_fast(tfds, tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("download_and_prepare must not be called")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      no_network)
  start = time.monotonic()
  with pytest.raises(DatasetNotFoundError) as info:
    load_tfds("mnist", data_dir=str(tmp_path), download=False)
  message = str(info.value)
  assert time.monotonic() - start < 10
  assert "tfds source" in message
  assert str(tmp_path / "mnist") in message
  assert "download=True" in message
  assert "manual_dir" in message
  assert "tfds_manual/mnist" in message
  assert "train-images-idx3-ubyte.gz" in message
  assert "source='npz'" in message
  # Nothing was written for a dataset that could not be built.
  assert not (tmp_path / "mnist").exists()


def test_tfds_manual_dir_missing_archives_fails_fast(tfds, tmp_path,
                                                     monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("download_and_prepare must not be called")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      no_network)
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "train-images-idx3-ubyte.gz").write_bytes(b"")
  with pytest.raises(DatasetNotFoundError, match="lacks") as info:
    load_tfds("mnist", data_dir=str(tmp_path / "data"), manual_dir=manual)
  assert ("lacks ['t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', "
          "'train-labels-idx1-ubyte.gz']") in str(info.value)


def test_tfds_honours_tfds_data_dir(tfds, tmp_path, monkeypatch):
  del tfds
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(DatasetNotFoundError, match="TFDS_DATA_DIR") as info:
    load_tfds("fashion_mnist")
  assert str(tmp_path / "fashion_mnist") in str(info.value)
  assert "tfds_manual/fashion_mnist" in str(info.value)


def test_tfds_manual_dir_bad_archives_fail_fast(tfds, tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    (manual / name).write_bytes(b"not the real archive")
  start = time.monotonic()
  # TFDS checks the archives' sha256 and fails; nothing is downloaded.
  from tensorflow_datasets.core.download import download_manager
  with pytest.raises(download_manager.NonMatchingChecksumError):
    load_tfds("mnist", data_dir=str(tmp_path / "data"), manual_dir=manual)
  assert time.monotonic() - start < 30


def test_load_tfds_has_no_fallback(tfds, tmp_path, monkeypatch):
  del tfds
  _write_npz(tmp_path, "mnist", **_fake_arrays())
  monkeypatch.setenv("GECO_DATA_DIR", str(tmp_path))
  with pytest.raises(DatasetNotFoundError, match="tfds source"):
    load("mnist", "tfds", data_dir=str(tmp_path))


@pytest.mark.parametrize("name, image_shape, num_classes", [
    ("mnist", (28, 28, 1), 10),
    ("fashion_mnist", (28, 28, 1), 10),
    ("cifar10", (32, 32, 3), 10),
    ("celeb_a", (64, 64, 3), 1),
])
def test_tfds_mock_data(tfds, tmp_path, name, image_shape, num_classes):
  with tfds.testing.mock_data(num_examples=12):
    # Under mock_data nothing is prepared and download_and_prepare is a
    # no-op, so download=True exercises the build-then-read path.
    data = load_tfds(name, data_dir=str(tmp_path), download=True)
  _check_splits(data, image_shape, 12, 12)
  for split in ("train", "test"):
    labels = data[split]["label"]
    assert labels.min() >= 0 and labels.max() < num_classes
    scaled = data[split]["image"] * 255
    np.testing.assert_array_equal(scaled, np.round(scaled))
    assert data[split]["image"].std() > 0.05    # random pixels, not blank


def test_tfds_mock_prepared_reads_without_download(tfds, tmp_path,
                                                   monkeypatch):
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared",
                      lambda self: True)
  with tfds.testing.mock_data(num_examples=5):
    data = load("cifar10", "tfds", data_dir=str(tmp_path))
  _check_splits(data, (32, 32, 3), 5, 5)


def test_celeb_a_centre_crop_and_resize(tfds):
  del tfds
  tf = pytest.importorskip("tensorflow")
  image = np.full((218, 178, 3), 255, np.uint8)
  top, left = (218 - 140) // 2, (178 - 140) // 2
  image[top:top + 140, left:left + 140] = [10, 100, 200]
  out = sources._celeb_a_image(tf, tf.constant(image)).numpy()
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  # Exactly the crop: none of the 255 border leaks into the result.
  np.testing.assert_array_equal(out, np.broadcast_to([10, 100, 200], out.shape))
  # Top half of the crop dark, bottom half bright: orientation is kept.
  image[top:top + 70, left:left + 140] = 0
  out = sources._celeb_a_image(tf, tf.constant(image)).numpy()
  np.testing.assert_array_equal(out[:30], 0)
  np.testing.assert_array_equal(out[34:], np.broadcast_to([10, 100, 200],
                                                          out[34:].shape))


def _sorted_records(split):
  """The (label, image) pairs of a split as sorted bytes, order-free."""
  n = split["label"].shape[0]
  records = np.concatenate(
      [split["label"].astype(np.float32)[:, None],
       split["image"].reshape(n, -1)], axis=1)
  records = np.ascontiguousarray(records).view(
      np.dtype((np.void, records.shape[1] * 4)))[:, 0]
  return np.sort(records)


@pytest.mark.slow
def test_tfds_offline_build_matches_npz(tfds, mnist_npz, geco_data_dir,
                                        tmp_path):
  manual_dir = os.path.join(geco_data_dir, "tfds_manual", "mnist")
  if not os.path.isdir(manual_dir):
    pytest.skip(f"{manual_dir} does not exist.")
  data_dir = str(tmp_path / "tfds")
  built = load_tfds("mnist", data_dir=data_dir, manual_dir=manual_dir)
  _check_splits(built, (28, 28, 1), 60000, 10000)
  # TFDS shuffles examples (with a fixed order) when it writes the dataset,
  # so compare the multisets of (label, image) pairs, exactly.
  for split in ("train", "test"):
    np.testing.assert_array_equal(_sorted_records(built[split]),
                                  _sorted_records(mnist_npz[split]))
  # Prepared now: read again without manual_dir, in the same order.
  again = load_tfds("mnist", data_dir=data_dir)
  for split in ("train", "test"):
    np.testing.assert_array_equal(again[split]["image"],
                                  built[split]["image"])
    np.testing.assert_array_equal(again[split]["label"],
                                  built[split]["label"])
