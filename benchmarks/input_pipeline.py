r"""Input pipeline throughput against the training step it feeds.

  python -m benchmarks.input_pipeline [--batch_size=64] [--seconds=3] [--json=out.json]

Measures, in one process on the same machine:
- batches/s of ``EpochBatcher.batch_at`` (shuffled fancy-indexed copies) on
  MNIST-shaped data (60000 x 28 x 28 x 1 float32; the real MNIST when
  GECO_DATA_DIR holds mnist.npz, random data of that shape otherwise, which
  costs the same to index),
- batches/s through ``Prefetcher`` (what the trainer consumes by default),
- batches/s of ``DeviceEpochBatcher`` (the same batches gathered on the
  device from a copy held there: ``config.data_on_device``), each waited for,
- steps/s of the default experiment's conv VAE GECO step on the same batches,
- steps/s of a ConvDraw GECO step (``mnist_cpu`` preset) on the same batches,
and prints the ratios pipeline / step (the goal is >= 10 against ConvDraw).
Both steps run with this process's XLA flags, not ConvDraw's config's
(``config.xla_flags``), so ConvDraw's step is slower here than in training;
``python -m benchmarks.step_time`` times each model with its own flags and
measures the pipeline beside them.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def define_flags():
  """The command line of ``main``; defined only when this module runs as the
  program, so that other benchmarks can import its helpers."""
  flags.DEFINE_integer("batch_size", 64, "Global batch size.")
  flags.DEFINE_float("seconds", 3.0, "Length of each timed window.")
  flags.DEFINE_string("json", None, "Optional path for the results as JSON.")


def _rate(fn, seconds: float) -> float:
  """Calls of ``fn`` per second: median of 3 windows after a warm-up call."""
  fn()
  rates = []
  for _ in range(3):
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      fn()
      count += 1
    rates.append(count / (time.perf_counter() - start))
  return sorted(rates)[1]


def _step_rate(config, images, seconds: float) -> float:
  """Steps/s of the trainer's compiled step (``experiments.train``) for ``config``."""
  import jax

  from experiments import train

  experiment = train.Experiment(
      config, {"train": {"image": images}, "test": {"image": images[:64]}})
  state = experiment.initial_state()
  batch = experiment.batch_at(0)

  def one_step():
    nonlocal state
    state, metrics = experiment.step_fn(state, batch)
    jax.block_until_ready(metrics)

  return _rate(one_step, seconds)


def mnist_shaped_images():
  """(images [60000, 28, 28, 1] float32 in [0, 1], a description of their source).

  The real MNIST when GECO_DATA_DIR holds mnist.npz, random data of that shape
  otherwise (which costs the same to index and to train on).
  """
  import numpy as np

  path = os.path.join(os.environ.get("GECO_DATA_DIR", ""), "mnist.npz")
  if os.path.exists(path):
    return np.load(path)["x_train"][..., None].astype(np.float32) / 255.0, path
  return (np.random.default_rng(0).random((60000, 28, 28, 1), np.float32),
          "random data of MNIST's shape")


def pipeline_rates(images, batch_size: int, seconds: float, transform=None,
                   sharding=None) -> dict:
  """Batches/s of ``EpochBatcher.batch_at``, of the ``Prefetcher`` over it and
  of ``DeviceEpochBatcher``.

  ``transform`` is applied by the prefetcher's thread, as the trainer applies
  ``Experiment.device_batch`` (host -> device copy) there. The device batcher
  lays its batches out with ``sharding`` (None: the default device) and each
  batch is waited for, so its rate includes a gather's latency, not only its
  throughput (the trainer does not wait).
  """
  import jax

  from geco_jax.data import DeviceEpochBatcher
  from geco_jax.data import EpochBatcher
  from geco_jax.data import Prefetcher

  batcher = EpochBatcher({"image": images}, batch_size, seed=0)
  step_counter = iter(range(10**9))
  batch_rate = _rate(lambda: batcher.batch_at(next(step_counter)), seconds)
  prefetched = Prefetcher(batcher.iterate(), transform=transform)
  try:
    prefetch_rate = _rate(lambda: next(prefetched), seconds)
  finally:
    prefetched.close()
  on_device = DeviceEpochBatcher(batcher, sharding)
  step_counter = iter(range(10**9))
  device_rate = _rate(
      lambda: jax.block_until_ready(on_device.batch_at(next(step_counter))), seconds)
  return {"batcher_batches_per_s": batch_rate, "prefetcher_batches_per_s": prefetch_rate,
          "device_batches_per_s": device_rate}


def main(argv):
  del argv
  import jax

  from configs import convdraw_mnist
  from configs import default

  images, source = mnist_shaped_images()
  rates = pipeline_rates(images, FLAGS.batch_size, FLAGS.seconds)
  batch_rate = rates["batcher_batches_per_s"]
  prefetch_rate = rates["prefetcher_batches_per_s"]
  device_rate = rates["device_batches_per_s"]

  config = default.get_config()
  config.batch_size = FLAGS.batch_size
  step_rate = _step_rate(config, images, FLAGS.seconds)
  config = convdraw_mnist.get_config()     # ConvDraw, mnist_cpu preset, GECO + RE
  config.batch_size = FLAGS.batch_size
  convdraw_rate = _step_rate(config, images, FLAGS.seconds)
  results = {
      "data": source, "batch_size": FLAGS.batch_size, "backend": jax.default_backend(),
      "batcher_batches_per_s": batch_rate, "prefetcher_batches_per_s": prefetch_rate,
      "device_batches_per_s": device_rate,
      "conv_vae_geco_steps_per_s": step_rate,
      "convdraw_mnist_cpu_geco_steps_per_s": convdraw_rate,
      "ratio_pipeline_to_conv_vae_step": prefetch_rate / step_rate,
      "ratio_pipeline_to_convdraw_step": prefetch_rate / convdraw_rate,
      "ratio_device_batches_to_conv_vae_step": device_rate / step_rate,
  }
  for key, value in results.items():
    print(f"{key:36s} {value:.1f}" if isinstance(value, float) else f"{key:36s} {value}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
