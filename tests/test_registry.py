"""load_dataset: every dataset by name, explicit sources, train/test kept apart."""

import os

import numpy as np
import pytest

from geco_jax.data import DATASET_SOURCES
from geco_jax.data import DatasetNotFoundError
from geco_jax.data import load_dataset

DATA_DIR = os.environ.get("GECO_DATA_DIR")
needs_data = pytest.mark.skipif(
    not DATA_DIR or not os.path.exists(os.path.join(DATA_DIR or "", "mnist.npz")),
    reason="GECO_DATA_DIR is unset or has no mnist.npz; set it to the shared data "
           "directory (e.g. GECO_DATA_DIR=../shared/data) to run this test.")


def test_unknown_name_and_wrong_source_list_the_choices():
  with pytest.raises(ValueError, match="known datasets"):
    load_dataset("imagenet", source="npz")
  with pytest.raises(ValueError, match="its sources are"):
    load_dataset("sprites", source="npz")
  with pytest.raises(ValueError, match="its sources are"):
    load_dataset("celeb_a", source="npz")


def test_missing_npz_says_where_it_looked(tmp_path):
  with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
    load_dataset("mnist", source="npz", data_dir=str(tmp_path))
  # A derived dataset reports the base dataset it needs; no fallback to tfds.
  with pytest.raises(DatasetNotFoundError, match="mnist.npz"):
    load_dataset("color_mnist", source="npz", data_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["mixture_of_gaussians", "mixture_of_lines",
                                  "mixture_of_circles"])
def test_mixtures_have_disjoint_seeded_splits(name):
  data = load_dataset(name, source="generated", seed=3, num_train=500, num_test=100)
  assert data["train"]["points"].shape == (500, 2)
  assert data["test"]["points"].shape == (100, 2)
  assert not np.array_equal(data["train"]["points"][:100], data["test"]["points"])
  again = load_dataset(name, source="generated", seed=3, num_train=500, num_test=100)
  np.testing.assert_array_equal(again["train"]["points"], data["train"]["points"])


def test_sprites_by_name():
  data = load_dataset("sprites", source="generated", num_train=64, num_test=16,
                      image_size=32)
  assert data["train"]["image"].shape == (64, 32, 32, 1)
  assert data["test"]["image"].shape == (16, 32, 32, 1)


@needs_data
def test_mnist_derived_splits_come_from_mnist_splits():
  mnist = load_dataset("mnist", source="npz")
  data = load_dataset("mnist_sum", source="npz", num_train=300, num_test=200, seed=1)
  for split in ("train", "test"):
    part = data[split]
    base_labels = mnist[split]["label"]
    # The carried indices point into the matching MNIST split and carry its labels.
    np.testing.assert_array_equal(base_labels[part["index"]], part["labels"])
    np.testing.assert_array_equal(mnist[split]["image"][part["index"][:, 2]],
                                  part["target"])
    assert np.all(part["labels"][:, 2] == (part["labels"][:, 0] + part["labels"][:, 1]) % 10)


@needs_data
@pytest.mark.parametrize("name", ["color_mnist", "mnist_triplets", "mnist_sum_hard",
                                  "mnist_rotate"])
def test_every_mnist_derived_dataset_loads(name):
  data = load_dataset(name, source="npz", num_train=50, num_test=20)
  assert len(data["train"]["labels"]) == 50 and len(data["test"]["labels"]) == 20


@needs_data
def test_micro_mnist_is_seven_fixed_digits():
  data = load_dataset("micro_mnist", source="npz")
  assert data["train"]["image"].shape == (7, 28, 28, 1)
  np.testing.assert_array_equal(data["train"]["image"], data["test"]["image"])


def test_every_dataset_has_a_source():
  for name, dataset_sources in DATASET_SOURCES.items():
    assert dataset_sources and set(dataset_sources) <= {"npz", "tfds", "generated"}, name
