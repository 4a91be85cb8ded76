"""Data for the experiments: procedurally generated sprites and a batcher.

``make_sprites`` and ``sprites_dataset`` draw dSprites-like images with no
download; ``EpochBatcher`` cuts a dict of arrays into deterministic, resumable
shuffled mini-batches.
"""

from geco_jax.data.pipeline import EpochBatcher
from geco_jax.data.pipeline import Prefetcher
from geco_jax.data.pipeline import split_for_devices
from geco_jax.data.sprites import SHAPES
from geco_jax.data.sprites import make_sprites
from geco_jax.data.sprites import sprites_dataset

__all__ = [
    "EpochBatcher",
    "Prefetcher",
    "SHAPES",
    "make_sprites",
    "split_for_devices",
    "sprites_dataset",
]
