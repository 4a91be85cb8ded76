"""Deterministic, resumable mini-batches over in-memory arrays.

``EpochBatcher`` cuts a dict of equally long arrays into mini-batches. The
batch of global step ``s`` is a pure function of ``(seed, s)``: epoch
``s // steps_per_epoch`` visits the examples in the order of
``np.random.default_rng([seed, epoch]).permutation(num_examples)``, and the
step's position within the epoch picks a slice of that order. A run restored
at step ``s`` therefore continues the exact stream it would have seen, with
no iterator state to checkpoint.
"""

from __future__ import annotations

import math
import operator
from typing import Iterator, Mapping

import numpy as np

__all__ = ["EpochBatcher"]


def _check_int(value, name: str, minimum: int) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer; got {value!r}.") from None
  if value < minimum:
    raise ValueError(f"{name} must be at least {minimum}; got {value}.")
  return value


class EpochBatcher:
  """Shuffled mini-batches of a dict of arrays, indexed by global step.

  Args:
    arrays: a non-empty dict of arrays sharing their first (example) axis.
    batch_size: examples per batch, at least 1.
    seed: a non-negative integer; epoch ``e`` uses the permutation of
      ``np.random.default_rng([seed, e])``.
    shuffle: if False, every epoch visits the examples in order.
    drop_remainder: if True, each epoch has ``num_examples // batch_size``
      full batches and the examples left over (different ones each epoch when
      shuffling) are skipped; if False the last batch of an epoch holds the
      remaining ``num_examples % batch_size`` examples, when there are any.

  Batches from ``batch_at`` and ``iterate`` are fresh arrays (fancy-indexed
  copies); ``iterate_once`` yields views into ``arrays``.

  Raises:
    ValueError: for an empty dict, arrays of different lengths or with no
      example axis, no examples, ``batch_size < 1``, ``batch_size`` larger
      than the number of examples with ``drop_remainder``, or a negative seed.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *,
               seed: int, shuffle: bool = True, drop_remainder: bool = True):
    if not isinstance(arrays, Mapping) or not arrays:
      raise ValueError(
          f"arrays must be a non-empty dict of arrays; got {arrays!r:.80}.")
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    scalars = [key for key, value in arrays.items() if value.ndim == 0]
    if scalars:
      raise ValueError(
          f"arrays must have an example axis; {scalars} are scalars.")
    lengths = {key: value.shape[0] for key, value in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(
          f"arrays must all have the same length (first axis); got {lengths}.")
    num_examples = next(iter(lengths.values()))
    if num_examples < 1:
      raise ValueError("arrays hold no examples (length 0).")
    batch_size = _check_int(batch_size, "batch_size", 1)
    if drop_remainder and batch_size > num_examples:
      raise ValueError(
          f"batch_size {batch_size} is larger than the {num_examples} "
          "examples, so drop_remainder=True would leave no batch; use a "
          "smaller batch_size or drop_remainder=False.")
    self._arrays = arrays
    self._num_examples = num_examples
    self._batch_size = batch_size
    self._seed = _check_int(seed, "seed", 0)
    self._shuffle = bool(shuffle)
    self._drop_remainder = bool(drop_remainder)
    if self._drop_remainder:
      self._steps_per_epoch = num_examples // batch_size
    else:
      self._steps_per_epoch = math.ceil(num_examples / batch_size)
    self._cached_epoch = None
    self._cached_order = None

  @property
  def num_examples(self) -> int:
    """Length of the arrays."""
    return self._num_examples

  @property
  def batch_size(self) -> int:
    """Examples per full batch."""
    return self._batch_size

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch (the last may be smaller without drop_remainder)."""
    return self._steps_per_epoch

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Indices of the examples in the order epoch ``epoch`` visits them."""
    epoch = _check_int(epoch, "epoch", 0)
    if epoch != self._cached_epoch:
      if self._shuffle:
        rng = np.random.default_rng([self._seed, epoch])
        order = rng.permutation(self._num_examples)
      else:
        order = np.arange(self._num_examples)
      self._cached_epoch, self._cached_order = epoch, order
    return self._cached_order

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The batch of global step ``step`` >= 0: a function of seed and step."""
    step = _check_int(step, "step", 0)
    epoch, position = divmod(step, self._steps_per_epoch)
    start = position * self._batch_size
    indices = self.epoch_order(epoch)[start:start + self._batch_size]
    return {key: value[indices] for key, value in self._arrays.items()}

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of steps ``start_step``, ``start_step + 1``, ..."""
    step = _check_int(start_step, "start_step", 0)
    while True:
      yield self.batch_at(step)
      step += 1

  def iterate_once(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over every example in order, for evaluation.

    Ignores ``shuffle`` and ``drop_remainder``: batches of ``batch_size``
    consecutive examples, the last one smaller when ``batch_size`` does not
    divide the number of examples, so each example is visited exactly once.
    """
    for start in range(0, self._num_examples, self._batch_size):
      yield {key: value[start:start + self._batch_size]
             for key, value in self._arrays.items()}
