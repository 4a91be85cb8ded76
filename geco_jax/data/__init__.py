"""Data: every dataset of the paper, from files, from TFDS or generated, and the pipeline.

``load_dataset(name, source=...)`` returns ``{'train': {...}, 'test': {...}}``
of NumPy arrays (images float32 in [0, 1], NHWC) for every dataset of the
paper (see ``registry``). ``EpochBatcher`` cuts a split into deterministic,
resumable, shardable mini-batches; ``DeviceEpochBatcher`` serves them from a
copy on the device(s); ``Prefetcher`` prepares them in a
background thread; ``split_for_devices`` reshapes a batch for ``pmap``.
"""

from geco_jax.data.derived import color_mnist
from geco_jax.data.derived import micro_mnist
from geco_jax.data.derived import mnist_rotate
from geco_jax.data.derived import mnist_sum
from geco_jax.data.derived import mnist_sum_hard
from geco_jax.data.derived import mnist_triplets
from geco_jax.data.derived import rotate_images
from geco_jax.data.mixtures import mixture_of_circles
from geco_jax.data.mixtures import mixture_of_gaussians
from geco_jax.data.mixtures import mixture_of_lines
from geco_jax.data.pipeline import DeviceEpochBatcher
from geco_jax.data.pipeline import EpochBatcher
from geco_jax.data.pipeline import Prefetcher
from geco_jax.data.pipeline import split_for_devices
from geco_jax.data.registry import DATASET_SOURCES
from geco_jax.data.registry import load_dataset
from geco_jax.data.sources import DatasetNotFoundError
from geco_jax.data.sources import load_npz
from geco_jax.data.sources import load_tfds
from geco_jax.data.sprites import SHAPES
from geco_jax.data.sprites import make_sprites
from geco_jax.data.sprites import sprites_dataset

__all__ = [
    "DATASET_SOURCES",
    "DatasetNotFoundError",
    "DeviceEpochBatcher",
    "EpochBatcher",
    "Prefetcher",
    "SHAPES",
    "color_mnist",
    "load_dataset",
    "load_npz",
    "load_tfds",
    "make_sprites",
    "micro_mnist",
    "mixture_of_circles",
    "mixture_of_gaussians",
    "mixture_of_lines",
    "mnist_rotate",
    "mnist_sum",
    "mnist_sum_hard",
    "mnist_triplets",
    "rotate_images",
    "split_for_devices",
    "sprites_dataset",
]
