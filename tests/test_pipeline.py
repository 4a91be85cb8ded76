"""Tests of geco_jax.data.pipeline: EpochBatcher (determinism, resumption,
coverage), DeviceEpochBatcher, Prefetcher."""

import itertools

import jax
import numpy as np
import pytest

from geco_jax.data import DeviceEpochBatcher
from geco_jax.data import EpochBatcher
from geco_jax.data import Prefetcher
from geco_jax.data import split_for_devices


def _arrays(n=100):
  return {
      "index": np.arange(n),
      "image": np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3),
  }


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_batch_contents_and_shapes():
  batcher = EpochBatcher(_arrays(), 32, seed=0)
  assert batcher.num_examples == 100
  assert batcher.batch_size == 32
  assert batcher.steps_per_epoch == 3
  batch = batcher.batch_at(0)
  assert set(batch) == {"index", "image"}
  assert batch["index"].shape == (32,)
  assert batch["image"].shape == (32, 2, 3)
  assert batch["image"].dtype == np.float32
  # The arrays stay aligned: row i of every array belongs to the same example.
  np.testing.assert_array_equal(batch["image"][:, 0, 0], batch["index"] * 6)


def test_steps_per_epoch():
  assert EpochBatcher(_arrays(100), 25, seed=0).steps_per_epoch == 4
  assert EpochBatcher(_arrays(100), 30, seed=0).steps_per_epoch == 3
  assert EpochBatcher(_arrays(100), 30, seed=0,
                      drop_remainder=False).steps_per_epoch == 4
  assert EpochBatcher(_arrays(10), 50, seed=0,
                      drop_remainder=False).steps_per_epoch == 1


def test_deterministic():
  a = EpochBatcher(_arrays(), 16, seed=3)
  b = EpochBatcher(_arrays(), 16, seed=3)
  for step in (0, 1, 5, 6, 17, 100):
    _assert_batches_equal(a.batch_at(step), b.batch_at(step))
  # Random access in any order gives the same batches.
  for step in (100, 6, 0, 17):
    _assert_batches_equal(a.batch_at(step), b.batch_at(step))


def test_follows_documented_permutation():
  batcher = EpochBatcher(_arrays(), 16, seed=3)
  steps = batcher.steps_per_epoch
  for step in (0, 4, steps, 2 * steps + 1):
    epoch, position = divmod(step, steps)
    order = np.random.default_rng([3, epoch]).permutation(100)
    np.testing.assert_array_equal(batcher.batch_at(step)["index"],
                                  order[position * 16:(position + 1) * 16])


def test_seeds_and_epochs_differ():
  a = EpochBatcher(_arrays(), 16, seed=0)
  b = EpochBatcher(_arrays(), 16, seed=1)
  assert not np.array_equal(a.batch_at(0)["index"], b.batch_at(0)["index"])
  assert not np.array_equal(a.batch_at(0)["index"],
                            a.batch_at(a.steps_per_epoch)["index"])


def test_iterate_resumes_exact_stream():
  batcher = EpochBatcher(_arrays(), 16, seed=2)
  full = list(itertools.islice(batcher.iterate(), 20))
  for step, batch in enumerate(full):
    _assert_batches_equal(batch, batcher.batch_at(step))
  for start in (1, 6, 13):
    # A fresh batcher, as after a restart, continues the same stream.
    resumed = EpochBatcher(_arrays(), 16, seed=2).iterate(start_step=start)
    for expected in full[start:]:
      _assert_batches_equal(next(resumed), expected)


def test_iterate_accepts_numpy_step():
  batcher = EpochBatcher(_arrays(), 16, seed=2)
  _assert_batches_equal(next(batcher.iterate(np.int64(7))), batcher.batch_at(7))


@pytest.mark.parametrize("n, batch_size", [(100, 20), (96, 32), (7, 1)])
def test_every_example_once_per_epoch(n, batch_size):
  batcher = EpochBatcher(_arrays(n), batch_size, seed=4)
  steps = batcher.steps_per_epoch
  for epoch in range(3):
    seen = np.concatenate([batcher.batch_at(epoch * steps + i)["index"]
                           for i in range(steps)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))


def test_drop_remainder_sees_each_example_at_most_once():
  batcher = EpochBatcher(_arrays(100), 30, seed=4)
  epochs = []
  for epoch in range(4):
    seen = np.concatenate([batcher.batch_at(epoch * 3 + i)["index"]
                           for i in range(3)])
    assert len(seen) == 90 and len(np.unique(seen)) == 90
    epochs.append(set(seen.tolist()))
  # Shuffling drops different examples in different epochs.
  assert set.union(*epochs) == set(range(100))


def test_keep_remainder_last_batch_smaller():
  batcher = EpochBatcher(_arrays(100), 30, seed=4, drop_remainder=False)
  sizes = [len(batcher.batch_at(step)["index"]) for step in range(8)]
  assert sizes == [30, 30, 30, 10, 30, 30, 30, 10]
  seen = np.concatenate([batcher.batch_at(4 + i)["index"] for i in range(4)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(100))


def test_no_shuffle_is_in_order():
  batcher = EpochBatcher(_arrays(100), 25, seed=4, shuffle=False)
  np.testing.assert_array_equal(batcher.batch_at(1)["index"], np.arange(25, 50))
  np.testing.assert_array_equal(batcher.batch_at(5)["index"], np.arange(25, 50))


@pytest.mark.parametrize("shuffle, drop_remainder", [
    (True, True), (False, False), (True, False)])
def test_iterate_once_covers_each_example_once(shuffle, drop_remainder):
  batcher = EpochBatcher(_arrays(100), 30, seed=4, shuffle=shuffle,
                         drop_remainder=drop_remainder)
  batches = list(batcher.iterate_once())
  assert [len(b["index"]) for b in batches] == [30, 30, 30, 10]
  np.testing.assert_array_equal(
      np.concatenate([b["index"] for b in batches]), np.arange(100))
  np.testing.assert_array_equal(
      np.concatenate([b["image"] for b in batches]), _arrays(100)["image"])
  # A second pass is the same pass.
  again = list(batcher.iterate_once())
  for a, b in zip(batches, again):
    _assert_batches_equal(a, b)


def test_iterate_once_batch_larger_than_data():
  batcher = EpochBatcher(_arrays(10), 64, seed=0, drop_remainder=False)
  batches = list(batcher.iterate_once())
  assert len(batches) == 1
  np.testing.assert_array_equal(batches[0]["index"], np.arange(10))


def test_batches_are_copies():
  arrays = _arrays()
  batcher = EpochBatcher(arrays, 10, seed=0)
  batch = batcher.batch_at(0)
  batch["index"][:] = -1
  np.testing.assert_array_equal(arrays["index"], np.arange(100))


@pytest.mark.parametrize("arrays, batch_size, kwargs, match", [
    ({"a": np.zeros(10), "b": np.zeros(9)}, 2, {}, "same length"),
    ({}, 2, {}, "non-empty"),
    ({"a": np.zeros(0)}, 2, {"drop_remainder": False}, "no examples"),
    ({"a": np.float32(1)}, 2, {}, "example axis"),
    ({"a": np.zeros(10)}, 0, {}, "batch_size must be at least 1"),
    ({"a": np.zeros(10)}, -4, {}, "batch_size must be at least 1"),
    ({"a": np.zeros(10)}, 2.0, {}, "batch_size must be an integer"),
    ({"a": np.zeros(10)}, 11, {}, "larger than the 10 examples"),
    ({"a": np.zeros(10)}, 2, {"seed": -1}, "seed must be at least 0"),
])
def test_constructor_errors(arrays, batch_size, kwargs, match):
  kwargs = {"seed": 0, **kwargs}
  with pytest.raises(ValueError, match=match):
    EpochBatcher(arrays, batch_size, **kwargs)


def test_step_errors():
  batcher = EpochBatcher(_arrays(), 10, seed=0)
  with pytest.raises(ValueError, match="step must be at least 0"):
    batcher.batch_at(-1)
  with pytest.raises(ValueError, match="start_step must be at least 0"):
    next(batcher.iterate(start_step=-5))


# --------------------------------------------------------------------------- #
# Sharding over processes, splitting over devices, prefetching
# --------------------------------------------------------------------------- #


def test_shards_are_disjoint_and_make_the_global_batch():
  arrays = {"id": np.arange(100)}
  whole = EpochBatcher(arrays, 12, seed=3)
  shards = [EpochBatcher(arrays, 12, seed=3, shard_index=k, num_shards=4) for k in range(4)]
  for step in (0, 5, 8, 9, 30):
    parts = [s.batch_at(step)["id"] for s in shards]
    assert all(len(p) == 3 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole.batch_at(step)["id"])
    assert len(set(np.concatenate(parts))) == 12


def test_sharded_evaluation_visits_each_example_once():
  arrays = {"id": np.arange(103)}
  seen = []
  for k in range(4):
    batcher = EpochBatcher(arrays, 8, seed=0, shard_index=k, num_shards=4,
                           drop_remainder=False)
    seen.extend(int(i) for b in batcher.iterate_once() for i in b["id"])
  assert sorted(seen) == list(range(103))


@pytest.mark.parametrize("kwargs, match", [
    (dict(shard_index=2, num_shards=2), "shard_index"),
    (dict(shard_index=0, num_shards=5), "divisible"),
    (dict(shard_index=-1, num_shards=2), "shard_index"),
    (dict(shard_index=0, num_shards=0), "num_shards"),
])
def test_bad_shards_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    EpochBatcher({"id": np.arange(100)}, 12, seed=0, **kwargs)


def test_split_for_devices():
  batch = {"image": np.arange(48).reshape(8, 6), "label": np.arange(8)}
  split = split_for_devices(batch, 4)
  assert split["image"].shape == (4, 2, 6) and split["label"].shape == (4, 2)
  np.testing.assert_array_equal(split["image"][1, 0], batch["image"][2])
  with pytest.raises(ValueError, match="3 devices"):
    split_for_devices(batch, 3)


def test_prefetcher_yields_the_same_stream_in_order():
  batcher = EpochBatcher({"id": np.arange(50)}, 5, seed=1)
  expected = [batcher.batch_at(s)["id"] for s in range(7, 27)]
  with Prefetcher(batcher.iterate(7), buffer_size=3) as prefetched:
    got = [next(prefetched)["id"] for _ in range(20)]
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a, b)


def test_prefetcher_applies_transform_ends_and_reraises():
  assert list(Prefetcher(iter(range(5)), transform=lambda v: v * 10)) == [0, 10, 20, 30, 40]

  def broken():
    yield 1
    raise RuntimeError("bad file")

  prefetched = Prefetcher(broken())
  assert next(prefetched) == 1
  with pytest.raises(RuntimeError, match="bad file"):
    next(prefetched)


def test_prefetcher_close_stops_an_endless_iterator():
  prefetched = Prefetcher(EpochBatcher({"id": np.arange(10)}, 2, seed=0).iterate())
  next(prefetched)
  prefetched.close()
  assert not prefetched._thread.is_alive()
  with pytest.raises(StopIteration):
    next(prefetched)


# DeviceEpochBatcher: the same stream, gathered on the devices. ------------- #

@pytest.mark.parametrize("drop_remainder", [True, False])
def test_device_batcher_serves_the_host_stream(drop_remainder):
  batcher = EpochBatcher(_arrays(), 32, seed=3, drop_remainder=drop_remainder)
  on_device = DeviceEpochBatcher(batcher)
  # Three epochs (a new order each), the partial last batch when kept, and a
  # step visited again after a later epoch (the order is re-copied).
  steps = list(range(3 * batcher.steps_per_epoch)) + [1]
  for step in steps:
    batch = on_device.batch_at(step)
    assert isinstance(batch["image"], jax.Array)
    _assert_batches_equal({k: np.asarray(v) for k, v in batch.items()},
                          batcher.batch_at(step))
  if not drop_remainder:
    assert on_device.batch_at(3)["index"].shape == (100 % 32,)
  first = list(itertools.islice(on_device.iterate(start_step=2), 3))
  for step, batch in zip(range(2, 5), first):
    np.testing.assert_array_equal(np.asarray(batch["index"]),
                                  batcher.batch_at(step)["index"])


def test_device_batcher_splits_batches_over_a_mesh():
  devices = jax.devices()[:4]
  assert len(devices) == 4, "conftest forces 8 host devices"
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batcher = EpochBatcher(_arrays(), 32, seed=0)
  batch = DeviceEpochBatcher(batcher, sharding).batch_at(5)
  assert batch["image"].sharding.is_equivalent_to(sharding, batch["image"].ndim)
  assert {shard.data.shape for shard in batch["image"].addressable_shards} == {(8, 2, 3)}
  np.testing.assert_array_equal(np.asarray(batch["image"]), batcher.batch_at(5)["image"])


def test_device_batcher_errors():
  with pytest.raises(TypeError, match="needs an EpochBatcher"):
    DeviceEpochBatcher(_arrays())
  with pytest.raises(ValueError, match="single process.*shard 1 of 2"):
    DeviceEpochBatcher(EpochBatcher(_arrays(), 32, seed=0, shard_index=1, num_shards=2))
  with pytest.raises(TypeError, match="NamedSharding"):
    DeviceEpochBatcher(EpochBatcher(_arrays(), 32, seed=0), jax.devices()[0])
  with pytest.raises(ValueError, match="step"):
    DeviceEpochBatcher(EpochBatcher(_arrays(), 32, seed=0)).batch_at(-1)
