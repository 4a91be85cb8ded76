r"""Train a classifier of the CLA or FRE constraint from an ml_collections config.

  GECO_DATA_DIR=/path/to/data python -m experiments.train_classifier \
      --config configs/mnist_classifier.py --workdir runs/mnist_classifier
  GECO_DATA_DIR=/path/to/data python -m experiments.train_classifier \
      --config configs/cifar10_classifier.py --workdir runs/cifar10_classifier

``config.dataset.name`` picks the classifier: ``'mnist'`` (the default when
the config has no name) trains ``geco_jax.models.classifier.MNISTClassifier``
for CLA, ``'cifar10'`` trains ``CIFAR10Classifier``, whose penultimate
features are FRE's. Trains with Adam (AdamW if ``config.weight_decay`` > 0),
optionally with random flips and crops of the training images
(``config.augment``), evaluates on the whole test split after every epoch,
prints one ``final: {json}`` line and saves the classifier to
``<workdir>/classifier`` only if its test accuracy is at least
``config.min_accuracy``; otherwise it exits with status 1 and leaves any
classifier already there untouched. The run is a function of the config
(``config.seed`` fixes the initialisation, the order of the batches and the
augmentation).

As in ``experiments.main``: a config that does not exist, an override of a
key that does not exist, a value of the wrong type or one that makes no sense,
or data that cannot be found, ends with one line on stderr and exit status 2,
before anything is compiled.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
import sys
import time
from typing import Any

from absl import logging
import ml_collections

# The --config and --workdir flags and the one-line errors shared by experiments.
from experiments import cli

SOURCES = ("npz", "tfds")
SCHEDULES = ("cosine", "constant")
# The classifier class (geco_jax.models.classifier) of each dataset.
CLASSIFIER_OF = {"mnist": "MNISTClassifier", "cifar10": "CIFAR10Classifier"}
DATASETS = tuple(CLASSIFIER_OF)
# Images halve at every conv block: 28 -> 14, 7, 3, 1; 32 -> 16, 8, 4, 2, 1.
MAX_CONV_BLOCKS = {"mnist": 4, "cifar10": 5}
CLASSIFIER_DIR = "classifier"


class AccuracyTooLowError(RuntimeError):
  """The trained classifier missed config.min_accuracy; nothing was saved."""


# --------------------------------------------------------------------------- #
# Config.


def dataset_name(config: ml_collections.ConfigDict) -> str:
  """``config.dataset.name``; ``'mnist'`` for a config without one."""
  return config.dataset.get("name", "mnist")


# Every field a classifier config may set (configs/mnist_classifier.py and
# configs/cifar10_classifier.py), with a section's own fields.
CONFIG_FIELDS = {
    "seed": (), "batch_size": (), "eval_batch_size": (), "num_epochs": (),
    "learning_rate": (), "learning_rate_schedule": (), "weight_decay": (),
    "min_accuracy": (),
    "dataset": ("name", "source", "data_dir", "num_train", "num_test"),
    "model": ("features", "hidden_size", "convs_per_block"),
    "augment": ("flip", "crop_padding"),
}


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raise ``experiments.setup.ConfigError`` for the first field that makes no sense."""
  # Imported here, as in experiments.main, so that --help and flag errors do
  # not pay for importing JAX.
  from experiments import setup
  from geco_jax.models import classifier as classifier_lib
  # setup's checks, so that both experiments word their errors alike.
  require, positive = setup.require, setup.positive

  def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

  # A misspelt field would otherwise be ignored and its default used.
  for key in config.keys():
    require(key in CONFIG_FIELDS,
            f"config.{key}: unknown field; known: {sorted(CONFIG_FIELDS)}.")
    section = config[key]
    if CONFIG_FIELDS[key] and isinstance(section, ml_collections.ConfigDict):
      for sub in section.keys():
        require(sub in CONFIG_FIELDS[key],
                f"config.{key}.{sub}: unknown field; known: {sorted(CONFIG_FIELDS[key])}.")

  def positive_int(value, name: str) -> None:
    require(is_int(value) and value >= 1,
            f"config.{name} must be a positive integer; got {value!r}.")

  require(is_int(config.seed) and config.seed >= 0,
          f"config.seed must be a non-negative integer; got {config.seed!r}.")
  for name in ("batch_size", "num_epochs", "eval_batch_size"):
    positive_int(config[name], name)
  positive(config.learning_rate, "learning_rate")
  require(
      config.learning_rate_schedule in SCHEDULES,
      f"config.learning_rate_schedule must be one of {SCHEDULES}; got "
      f"{config.learning_rate_schedule!r}.")
  weight_decay = config.get("weight_decay", 0.0)
  require(
      isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool)
      and math.isfinite(weight_decay) and weight_decay >= 0,
      f"config.weight_decay must be a number >= 0; got {weight_decay!r}.")
  require(
      isinstance(config.min_accuracy, (int, float))
      and not isinstance(config.min_accuracy, bool)
      and 0 <= config.min_accuracy <= 1,
      f"config.min_accuracy must be in [0, 1]; got {config.min_accuracy!r}.")

  augment = config.get("augment")
  if augment is not None:
    require(isinstance(augment.flip, bool),
            f"config.augment.flip must be True or False; got {augment.flip!r}.")
    require(is_int(augment.crop_padding) and augment.crop_padding >= 0,
            "config.augment.crop_padding must be an integer >= 0; got "
            f"{augment.crop_padding!r}.")

  data = config.dataset
  name = dataset_name(config)
  require(name in DATASETS,
          f"config.dataset.name must be one of {DATASETS}; got {name!r}.")
  require(
      data.source in SOURCES,
      f"config.dataset.source must be one of {SOURCES}; got {data.source!r}.")
  for size in ("num_train", "num_test"):
    if data[size] is not None:  # None: the whole split.
      positive_int(data[size], f"dataset.{size}")
  if data.num_train is not None:
    require(
        config.batch_size <= data.num_train,
        f"config.batch_size ({config.batch_size}) exceeds config.dataset.num_train "
        f"({data.num_train}).")

  model = config.model
  cls = classifier_lib.CLASSIFIERS[CLASSIFIER_OF[name]]
  fields = set(classifier_lib.architecture_of(cls())) - {"name", "input_shape"}
  unknown = sorted(set(model.keys()) - fields)
  require(not unknown,
          f"config.model has keys that are not fields of {cls.__name__}: {unknown}.")
  features = tuple(model.features)
  max_blocks = MAX_CONV_BLOCKS[name]
  side = min(cls.input_shape[:2])
  require(
      1 <= len(features) <= max_blocks and all(is_int(f) and f >= 1 for f in features),
      f"config.model.features must be 1 to {max_blocks} positive integers "
      f"({side}x{side} images halve at every block); got {model.features!r}.")
  positive_int(model.hidden_size, "model.hidden_size")
  if "convs_per_block" in model:
    positive_int(model.convs_per_block, "model.convs_per_block")
  for key in ("input_mean", "input_std"):
    if key in model:
      values = tuple(model[key])
      require(
          len(values) == cls.input_shape[-1] and all(
              isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v) for v in values)
          and (key == "input_mean" or all(v > 0 for v in values)),
          f"config.model.{key} must be {cls.input_shape[-1]} finite numbers"
          f"{'' if key == 'input_mean' else ' > 0'}; got {model[key]!r}.")


def make_model(config: ml_collections.ConfigDict):
  """The classifier of ``config.dataset.name`` with the fields of ``config.model``."""
  from geco_jax.models import classifier as classifier_lib
  cls = classifier_lib.CLASSIFIERS[CLASSIFIER_OF[dataset_name(config)]]
  kwargs = {key: tuple(value) if isinstance(value, (list, tuple)) else value
            for key, value in config.model.to_dict().items()}
  return cls(**kwargs)


def load_data(config: ml_collections.ConfigDict) -> dict:
  """``{'train': {'image', 'label'}, 'test': {...}}``, cut to the configured sizes.

  Raises:
    geco_jax.data.DatasetNotFoundError: the source does not have the dataset.
    experiments.setup.ConfigError: num_train or num_test exceeds the split.
  """
  from experiments import setup
  from geco_jax.data import load_dataset
  require = setup.require

  name = dataset_name(config)
  data = load_dataset(name, source=config.dataset.source,
                      data_dir=config.dataset.data_dir)
  for split, size in (("train", config.dataset.num_train),
                      ("test", config.dataset.num_test)):
    available = len(data[split]["label"])
    if size is not None:
      require(
          size <= available,
          f"config.dataset.num_{split} ({size}) exceeds the {available} examples "
          f"of {name}'s {split} split.")
      # The first examples, in the file's order: the same subset every run.
      data[split] = {key: value[:size] for key, value in data[split].items()}
  require(
      config.batch_size <= len(data["train"]["label"]),
      f"config.batch_size ({config.batch_size}) exceeds the "
      f"{len(data['train']['label'])} training examples.")
  return data


def augment_batch(images, rng, *, flip: bool, crop_padding: int):
  """Random horizontal flips and random crops of a batch of images ``[B, H, W, C]``.

  Each image is flipped left-right with probability 1/2, then (for
  ``crop_padding`` p > 0) padded by p pixels on every side by reflection and
  cropped back to H x W at a uniformly random offset, i.e. shifted by up to p
  pixels each way. Done in NumPy on the host: the next batch is prepared
  while the previous training step runs, and nothing is compiled.

  Args:
    images: float NumPy array ``[B, H, W, C]``.
    rng: a ``numpy.random.Generator``.
    flip: whether to flip.
    crop_padding: p, at most H - 1 and W - 1 (reflection padding).

  Returns:
    A new array of the same shape and dtype.
  """
  import numpy as np

  batch, height, width, _ = images.shape
  if flip:
    flipped = rng.random(batch) < 0.5
    images = np.where(flipped[:, None, None, None], images[:, :, ::-1], images)
  if crop_padding:
    p = crop_padding
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    rows = rng.integers(0, 2 * p + 1, batch)
    cols = rng.integers(0, 2 * p + 1, batch)
    images = np.stack([padded[i, r:r + height, c:c + width]
                       for i, (r, c) in enumerate(zip(rows, cols))])
  return np.ascontiguousarray(images)


# --------------------------------------------------------------------------- #
# Training.


@functools.lru_cache(maxsize=8)
def _evaluation_fn(model):
  """Jitted ``(params, images, labels) -> (correct, loss sum, squared feature sum)``.

  One per model (modules are hashable), so that evaluating after every epoch
  compiles once.
  """
  import jax
  import jax.numpy as jnp
  import optax

  @jax.jit
  def sums(params, images, labels):
    logits = model.apply(params, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    features = model.apply(params, images, return_features=True)
    return jnp.sum(correct), jnp.sum(loss), jnp.sum(jnp.square(features))

  return sums


def evaluate(params, test: dict, batch_size: int, *, model) -> dict[str, float]:
  """Accuracy and mean cross-entropy over the whole split, each example once.

  Also ``feature_rms``: the root mean square of the penultimate features
  (``return_features=True``) over the split, the scale against which to
  choose FRE's tolerance (a per-feature RMSE).
  """
  import jax

  from geco_jax.data import EpochBatcher

  sums = _evaluation_fn(model)
  batches = EpochBatcher(test, batch_size, seed=0, shuffle=False,
                         drop_remainder=False)
  # Summed on the device; one transfer at the end.
  totals = [sums(params, b["image"], b["label"]) for b in batches.iterate_once()]
  correct, loss, squares = (sum(float(v) for v in values)
                            for values in zip(*jax.device_get(totals)))
  count = batches.num_examples
  return {"accuracy": correct / count, "loss": loss / count, "examples": count,
          "feature_rms": math.sqrt(squares / (count * model.hidden_size))}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       command: str = "", data: dict | None = None) -> dict[str, Any]:
  """Train, evaluate every epoch, save ``<workdir>/classifier`` if accurate enough.

  Args:
    config: a config of ``configs/mnist_classifier.py`` or
      ``configs/cifar10_classifier.py``.
    workdir: where the classifier is saved.
    command: the command line that ran this, recorded in the metadata.
    data: ``load_data(config)``, if already loaded.

  Returns:
    The final summary: test accuracy and loss, the RMS of the features on the
    test split, epochs, steps, seconds, the per-epoch ``history`` and the path
    of the saved classifier.

  Raises:
    experiments.setup.ConfigError: a bad config.
    geco_jax.data.DatasetNotFoundError: no data where the source looked.
    FloatingPointError: the training loss became non-finite.
    AccuracyTooLowError: the test accuracy is below ``config.min_accuracy``;
      its ``summary`` attribute holds the final summary, nothing was saved.
  """
  import flax
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from geco_jax.data import EpochBatcher
  from geco_jax.models import classifier as classifier_lib

  validate_config(config)
  started = time.time()
  data = load_data(config) if data is None else data
  train_batches = EpochBatcher(data["train"], config.batch_size, seed=config.seed)
  num_steps = config.num_epochs * train_batches.steps_per_epoch

  model = make_model(config)
  init_args = (jax.random.PRNGKey(config.seed),
               jnp.zeros((1, *data["train"]["image"].shape[1:]), jnp.float32))
  # Runs once, so compiled without XLA's backend optimisations: on a CPU they
  # take ~6 s on the threefry of the initialisers and save nothing here. (The
  # values may differ from an optimised build in the last bit, no more.)
  params = jax.jit(model.init).lower(*init_args).compile(
      compiler_options={"xla_backend_optimization_level": 0})(*init_args)
  if config.learning_rate_schedule == "cosine":
    learning_rate = optax.cosine_decay_schedule(config.learning_rate, num_steps)
  else:
    learning_rate = config.learning_rate
  weight_decay = float(config.get("weight_decay", 0.0))
  if weight_decay > 0:
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)
  else:
    tx = optax.adam(learning_rate)
  opt_state = tx.init(params)
  augment = config.get("augment")
  flip = bool(augment is not None and augment.flip)
  crop_padding = int(augment.crop_padding) if augment is not None else 0

  @jax.jit
  def train_step(params, opt_state, images, labels):
    def loss_fn(params):
      logits = model.apply(params, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def batch_at(step: int) -> dict:
    batch = train_batches.batch_at(step)
    if flip or crop_padding:
      # Its own stream per step: the same augmentation whatever the epochs.
      rng = np.random.default_rng([config.seed, step, 1])
      batch["image"] = augment_batch(batch["image"], rng, flip=flip,
                                     crop_padding=crop_padding)
    return batch

  architecture = classifier_lib.architecture_of(model)
  logging.info(
      "Training %s(%s), %d parameters, on %d %s examples (augmentation: flip=%s, "
      "crop_padding=%d): %d epochs of %d steps.", architecture["name"],
      ", ".join(f"{k}={v}" for k, v in architecture.items()
                if k not in ("name", "input_shape")),
      sum(x.size for x in jax.tree_util.tree_leaves(params)),
      train_batches.num_examples, dataset_name(config), flip, crop_padding,
      config.num_epochs, train_batches.steps_per_epoch)
  step = 0
  history = []
  for epoch in range(1, config.num_epochs + 1):
    losses = []
    for _ in range(train_batches.steps_per_epoch):
      # JAX dispatches the step asynchronously, so the next batch is cut
      # while the previous step runs.
      batch = batch_at(step)
      params, opt_state, loss = train_step(params, opt_state, batch["image"],
                                           batch["label"])
      losses.append(loss)
      step += 1
    train_loss = float(np.mean(jax.device_get(losses)))
    if not math.isfinite(train_loss):
      raise FloatingPointError(
          f"training diverged: non-finite loss in epoch {epoch}; nothing saved. "
          "Try a smaller config.learning_rate.")
    test = evaluate(params, data["test"], config.eval_batch_size, model=model)
    history.append({"epoch": epoch, "train_loss": train_loss,
                    "test_loss": test["loss"], "test_accuracy": test["accuracy"]})
    logging.info("epoch %d/%d (step %d): train loss %.4f, test loss %.4f, test "
                 "accuracy %.4f, %.0f s", epoch, config.num_epochs, step,
                 train_loss, test["loss"], test["accuracy"], time.time() - started)

  # The last epoch's evaluation is the final one: the parameters have not changed.
  summary = {
      "test_accuracy": test["accuracy"],
      "test_loss": test["loss"],
      "test_examples": test["examples"],
      "feature_rms": test["feature_rms"],
      "train_loss": train_loss,
      "train_examples": train_batches.num_examples,
      "epochs": config.num_epochs,
      "steps": step,
      "min_accuracy": config.min_accuracy,
      "seconds": round(time.time() - started, 1),
      "history": history,
      "saved": None,
  }
  if test["accuracy"] < config.min_accuracy:
    error = AccuracyTooLowError(
        f"test accuracy {test['accuracy']:.4f} is below config.min_accuracy="
        f"{config.min_accuracy}; the classifier was not saved (nothing in "
        f"{os.path.join(workdir, CLASSIFIER_DIR)} was changed).")
    error.summary = summary
    raise error

  metadata = {
      **{key: summary[key] for key in ("test_accuracy", "test_loss", "test_examples",
                                       "feature_rms", "train_examples", "epochs",
                                       "steps", "seconds")},
      "architecture": architecture,
      "dataset": {"name": dataset_name(config), "source": config.dataset.source},
      "command": command,
      "config": config.to_dict(),
      "versions": {"jax": jax.__version__, "flax": flax.__version__,
                   "optax": optax.__version__},
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  summary["saved"] = classifier_lib.save_classifier(
      os.path.join(workdir, CLASSIFIER_DIR), jax.device_get(params), metadata)
  return summary


# --------------------------------------------------------------------------- #
# Command line.


def _command_line(config: ml_collections.ConfigDict) -> str:
  """This run's command, to record in the classifier's metadata."""
  command = "python -m experiments.train_classifier " + shlex.join(sys.argv[1:])
  data_dir = os.environ.get("GECO_DATA_DIR")
  if (data_dir and config.dataset.source == "npz"
      and config.dataset.data_dir is None):
    command = f"GECO_DATA_DIR={shlex.quote(data_dir)} {command}"
  return command


def main(argv):
  fail = cli.fail
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config_or_fail()
  from experiments import setup
  from geco_jax.data import DatasetNotFoundError
  from geco_jax.models import classifier as classifier_lib

  try:
    validate_config(config)
    data = load_data(config)
    # Before training: a workdir that cannot hold the classifier fails now.
    classifier_lib.check_save_path(os.path.join(cli.WORKDIR.value, CLASSIFIER_DIR))
    setup.prepare_workdir(cli.WORKDIR.value)
  except (setup.ConfigError, DatasetNotFoundError, FileExistsError) as e:
    fail(" ".join(str(e).split()))
  cli.quiet_library_logs()
  logging.info("Config:\n%s", config)
  try:
    summary = train_and_evaluate(config, cli.WORKDIR.value,
                                 command=_command_line(config), data=data)
  except AccuracyTooLowError as e:
    print("final: " + json.dumps(e.summary, sort_keys=True), flush=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except (FloatingPointError, OSError) as e:  # Diverged, or the save failed.
    print(f"error: {type(e).__name__}: {e}" if isinstance(e, OSError) else f"error: {e}",
          file=sys.stderr)
    sys.exit(1)
  print("final: " + json.dumps(summary, sort_keys=True), flush=True)


if __name__ == "__main__":
  cli.require("config", "workdir")
  cli.run(main)
