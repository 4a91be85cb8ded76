"""Every dataset of the paper by name: ``load_dataset(name, source=...)``.

=======================  ================  =========================================
name                     sources           what
=======================  ================  =========================================
mnist, fashion_mnist     npz, tfds         the real datasets (``sources``)
cifar10                  npz, tfds         npz: the partial CIFAR-10 of shared/data
celeb_a                  tfds              centre-cropped, resized to 64x64
color_mnist              npz, tfds         3 MNIST digits as R, G, B (``derived``)
mnist_triplets           npz, tfds         x1 x2 x3 side by side, l3 = (l1 + l2) % 10
mnist_sum                npz, tfds         context (x1, x2), target x3, l3 = (l1 + l2) % 10
mnist_sum_hard           npz, tfds         the same with l3 = (l1 * l2) % 10
mnist_rotate             npz, tfds         target: class l2 rotated by 36 * l1 degrees
micro_mnist              npz, tfds         7 fixed MNIST digits (train = test)
sprites                  generated         procedural shapes (``sprites``)
mixture_of_gaussians     generated         2-D points (``mixtures``)
mixture_of_lines         generated         2-D points
mixture_of_circles       generated         2-D points
=======================  ================  =========================================

The source is always explicit; nothing falls back from one to another. The
MNIST-derived datasets draw their train split from MNIST's train split and
their test split from MNIST's test split, so the two never share a digit, with
seeds ``2 * seed`` (train) and ``2 * seed + 1`` (test); generated datasets do
the same with their own seeds.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from geco_jax._validation import check_int
from geco_jax.data import derived
from geco_jax.data import mixtures
from geco_jax.data import sources
from geco_jax.data import sprites

__all__ = ["DATASET_SOURCES", "load_dataset"]

_MNIST_DERIVED = {
    "color_mnist": derived.color_mnist,
    "mnist_triplets": derived.mnist_triplets,
    "mnist_sum": derived.mnist_sum,
    "mnist_sum_hard": derived.mnist_sum_hard,
    "mnist_rotate": derived.mnist_rotate,
}
_MIXTURES = {
    "mixture_of_gaussians": mixtures.mixture_of_gaussians,
    "mixture_of_lines": mixtures.mixture_of_lines,
    "mixture_of_circles": mixtures.mixture_of_circles,
}

#: The sources each dataset can be read from.
DATASET_SOURCES: dict[str, tuple[str, ...]] = {
    "mnist": ("npz", "tfds"),
    "fashion_mnist": ("npz", "tfds"),
    "cifar10": ("npz", "tfds"),
    "celeb_a": ("tfds",),
    **{name: ("npz", "tfds") for name in _MNIST_DERIVED},
    "micro_mnist": ("npz", "tfds"),
    "sprites": ("generated",),
    **{name: ("generated",) for name in _MIXTURES},
}

_DEFAULT_SIZES = {"sprites": (20000, 2000), "mixtures": (10000, 1000)}


def load_dataset(
    name: str,
    *,
    source: str,
    data_dir: Optional[str] = None,
    manual_dir: Optional[str] = None,
    download: bool = False,
    seed: int = 0,
    num_train: Optional[int] = None,
    num_test: Optional[int] = None,
    **options,
) -> dict[str, dict[str, np.ndarray]]:
  """Loads or builds dataset ``name``: ``{'train': {...}, 'test': {...}}`` of arrays.

  Args:
    name: a key of ``DATASET_SOURCES``.
    source: ``'npz'``, ``'tfds'`` or ``'generated'``; must be one the dataset
      supports (``DATASET_SOURCES[name]``).
    data_dir: for ``npz``, the directory of ``<name>.npz`` (default: the
      environment variable ``GECO_DATA_DIR``); for ``tfds``, TFDS's data
      directory (default: ``TFDS_DATA_DIR``).
    manual_dir: for ``tfds``, a directory holding the original archives, to
      build the dataset offline.
    download: for ``tfds``, allow downloading (needs internet).
    seed: seed of derived and generated datasets.
    num_train: examples in the train split of a derived or generated dataset
      (default: as many as MNIST's split for derived ones, 60000 / 10000).
    num_test: examples in the test split, likewise.
    **options: passed on to the builder (e.g. ``image_size`` for sprites,
      ``std`` or ``centres`` for mixtures, ``num_images`` for micro_mnist).

  Raises:
    ValueError: unknown name, a source the dataset does not support, or a bad
      option (each message lists the valid choices).
    DatasetNotFoundError: the source does not have the data (the message says
      where it looked and how to fix it).
  """
  if name not in DATASET_SOURCES:
    raise ValueError(
        f"Unknown dataset {name!r}; known datasets: {sorted(DATASET_SOURCES)}.")
  if source not in DATASET_SOURCES[name]:
    raise ValueError(
        f"Dataset {name!r} cannot be read from source {source!r}; its sources "
        f"are {DATASET_SOURCES[name]}.")
  seed = check_int(seed, "seed", 0)
  if source == "generated":
    return _generated(name, seed, num_train, num_test, options)

  source_kwargs = {"data_dir": data_dir}
  if source == "tfds":
    source_kwargs.update(manual_dir=manual_dir, download=download)
  if name in sources.DATASETS[source] and name not in _MNIST_DERIVED:
    _no_options(name, options)
    return sources.load(name, source, **source_kwargs)

  mnist = sources.load("mnist", source, **source_kwargs)
  if name == "micro_mnist":
    chosen = derived.micro_mnist(mnist["train"]["image"], mnist["train"]["label"],
                                 seed=seed, **options)
    return {"train": chosen, "test": chosen}
  build = _MNIST_DERIVED[name]
  splits = {}
  for offset, (split, count) in enumerate((("train", num_train), ("test", num_test))):
    base = mnist[split]
    count = len(base["image"]) if count is None else count
    splits[split] = build(base["image"], base["label"], count, seed=2 * seed + offset,
                          **options)
  return splits


def _no_options(name: str, options: dict) -> None:
  if options:
    raise ValueError(f"Dataset {name!r} takes no options; got {sorted(options)}.")


def _generated(name, seed, num_train, num_test, options):
  if name == "sprites":
    default_train, default_test = _DEFAULT_SIZES["sprites"]
    return sprites.sprites_dataset(
        default_train if num_train is None else num_train,
        default_test if num_test is None else num_test, seed=seed, **options)
  default_train, default_test = _DEFAULT_SIZES["mixtures"]
  build = _MIXTURES[name]
  return {
      "train": build(default_train if num_train is None else num_train,
                     seed=2 * seed, **options),
      "test": build(default_test if num_test is None else num_test,
                    seed=2 * seed + 1, **options),
  }
