"""The classifiers of the CLA (MNIST) and FRE (CIFAR-10) constraints: models, saving
and loading, feature functions, training CLI."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geco_jax import constraints
from geco_jax.models import classifier as classifier_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA_DIR = os.environ.get("GECO_DATA_DIR", "")
needs_mnist = pytest.mark.skipif(
    not DATA_DIR or not os.path.isfile(os.path.join(DATA_DIR, "mnist.npz")),
    reason="needs real MNIST: set GECO_DATA_DIR to a directory holding mnist.npz "
    "(e.g. GECO_DATA_DIR=/work/shared/data)")
needs_cifar10 = pytest.mark.skipif(
    not DATA_DIR or not os.path.isfile(os.path.join(DATA_DIR, "cifar10.npz")),
    reason="needs real CIFAR-10: set GECO_DATA_DIR to a directory holding cifar10.npz "
    "(e.g. GECO_DATA_DIR=/work/shared/data)")

# A few hundred real images, one epoch: seconds on a CPU, end to end.
TINY = ["--config.dataset.num_train=256", "--config.dataset.num_test=200",
        "--config.batch_size=64", "--config.eval_batch_size=200",
        "--config.num_epochs=1"]


def _init(model, seed=0):
  """Random parameters shaped like ``model.init``'s.

  Drawn with NumPy: compiling Flax's initialisers (threefry) takes seconds
  on a CPU, and these tests do not need Flax's initial distribution.
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), shapes)


def _images(n, seed=0, shape=(28, 28, 1)):
  return jnp.asarray(np.random.default_rng(seed).random((n, *shape)), jnp.float32)


def _metadata(model, **extra):
  return {"architecture": classifier_lib.architecture_of(model), **extra}


def _equal_trees(a, b) -> bool:
  return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                           jax.tree_util.tree_leaves(b)))


# --------------------------------------------------------------------------- #
# Model.


@pytest.mark.parametrize("kwargs, classes", [
    ({}, 10), ({"features": (8,), "hidden_size": 16, "num_classes": 3}, 3)])
def test_model_returns_logits_per_class(kwargs, classes):
  model = classifier_lib.MNISTClassifier(**kwargs)
  logits = jax.jit(model.apply)(_init(model), _images(5))
  assert logits.shape == (5, classes) and logits.dtype == jnp.float32
  with pytest.raises(ValueError, match="batch, height, width, channels"):
    jax.jit(model.apply)(_init(model), jnp.zeros((5, 28, 28)))


@pytest.mark.parametrize("shape", [(3, 28, 28, 4), (2, 7, 9, 3)])
def test_max_pool_and_its_gradient_match_flax(shape):
  x = jnp.asarray(np.random.default_rng(1).random(shape), jnp.float32)
  ours = classifier_lib._max_pool_2x2  # pylint: disable=protected-access
  flax_pool = lambda v: nn.max_pool(v, (2, 2), (2, 2))
  np.testing.assert_array_equal(ours(x), flax_pool(x))
  # No ties in random data, so both send each gradient to the same maximum.
  weights = jnp.asarray(np.random.default_rng(2).random(ours(x).shape), jnp.float32)
  np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(ours(v) * weights))(x),
                             jax.grad(lambda v: jnp.sum(flax_pool(v) * weights))(x))


def test_probability_fn_gives_distributions_for_cla():
  model = classifier_lib.MNISTClassifier()
  classifier = classifier_lib.make_probability_fn(_init(model))
  probabilities = jax.jit(classifier)(_images(4))
  assert probabilities.shape == (4, 10)
  assert np.all(np.asarray(probabilities) >= 0)
  np.testing.assert_allclose(np.sum(probabilities, axis=1), 1.0, rtol=1e-5)

  labels = jnp.array([0, 1, 2, 3])

  @jax.jit
  def mean_cla(reconstruction):
    return jnp.mean(constraints.classification_accuracy(
        reconstruction, labels, 0.9, classifier=classifier))

  value, grad = jax.value_and_grad(mean_cla)(_images(4))
  expected = 0.9 - np.mean(np.asarray(probabilities)[np.arange(4), labels])
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert grad.shape == (4, 28, 28, 1) and np.all(np.isfinite(grad))


# --------------------------------------------------------------------------- #
# The CIFAR-10 classifier and FRE's feature function.

CIFAR_SHAPE = (32, 32, 3)


def _tiny_cifar(**kwargs):
  return classifier_lib.CIFAR10Classifier(
      **{"features": (4, 8), "convs_per_block": 1, "hidden_size": 16, **kwargs})


def test_cifar_classifier_default_shapes():
  # Shapes only (nothing compiled): the configured architecture of the FRE features.
  model = classifier_lib.CIFAR10Classifier()
  images = jax.ShapeDtypeStruct((7, *CIFAR_SHAPE), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  logits = jax.eval_shape(model.apply, params, images)
  features = jax.eval_shape(lambda p, x: model.apply(p, x, return_features=True),
                            params, images)
  assert logits.shape == (7, 10) and features.shape == (7, 256)
  assert model.input_shape == CIFAR_SHAPE
  assert classifier_lib.MNISTClassifier.input_shape == (28, 28, 1)
  assert 0.5e6 < sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)) < 2e6


def test_cifar_classifier_logits_and_features():
  model = _tiny_cifar(num_classes=5)
  params = _init(model)
  images = _images(3, shape=CIFAR_SHAPE)
  logits = jax.jit(model.apply)(params, images)
  features = jax.jit(classifier_lib.make_feature_fn(model, params))(images)
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  assert features.shape == (3, 16) and features.dtype == jnp.float32
  # The penultimate layer, after its ReLU: the logits are affine in it.
  assert np.all(np.asarray(features) >= 0)
  head = params["params"]["Dense_1"]
  np.testing.assert_allclose(logits, features @ head["kernel"] + head["bias"],
                             rtol=1e-5, atol=1e-6)
  for bad in (jnp.zeros((3, 32, 32)), jnp.zeros((3, 28, 28, 1)), jnp.zeros((3, 32, 32, 1))):
    with pytest.raises(ValueError, match=r"\[batch, 32, 32, 3\]"):
      model.apply(params, bad)
  mnist = classifier_lib.MNISTClassifier(features=(8,), hidden_size=16)
  mnist_features = classifier_lib.make_feature_fn(mnist, _init(mnist))(_images(2))
  assert mnist_features.shape == (2, 16)
  with pytest.raises(ValueError, match=r"\[batch, 28, 28, 1\]"):
    mnist.apply(_init(mnist), images)


def test_features_are_differentiable_for_fre():
  model = _tiny_cifar()
  features = classifier_lib.make_feature_fn(model, _init(model))
  x = _images(4, seed=1, shape=CIFAR_SHAPE)

  @jax.jit
  def mean_fre(reconstruction):
    return jnp.mean(constraints.feature_reconstruction_error(x, reconstruction, 0.01,
                                                             features))

  reconstruction = _images(4, seed=2, shape=CIFAR_SHAPE)
  value, grad = jax.value_and_grad(mean_fre)(reconstruction)
  assert np.isfinite(value) and value > 0
  assert grad.shape == x.shape and np.all(np.isfinite(grad))
  assert np.any(np.asarray(grad) != 0), "the gradient reaches the images"
  # Moving against the gradient lowers FRE: the gradient is the real one.
  assert mean_fre(reconstruction - 0.1 * grad / jnp.max(jnp.abs(grad))) < value
  # At the data itself FRE is -F kappa^2 and its gradient zero (up to rounding:
  # XLA may compute f(x) and f(g) with different fusions).
  value_at_x, grad_at_x = jax.value_and_grad(mean_fre)(x)
  np.testing.assert_allclose(value_at_x, -16 * 0.01**2, rtol=1e-4)
  np.testing.assert_allclose(grad_at_x, 0, atol=1e-4 * float(jnp.max(jnp.abs(grad))))


# --------------------------------------------------------------------------- #
# Saving and loading.


def test_save_load_round_trip(tmp_path):
  model = classifier_lib.MNISTClassifier(features=(8,), hidden_size=16)
  params = _init(model)
  metadata = _metadata(model, test_accuracy=0.5, command="python -m x")
  path = classifier_lib.save_classifier(tmp_path / "classifier", params, metadata)
  assert path == str(tmp_path / "classifier")
  assert sorted(os.listdir(tmp_path)) == ["classifier"], "no temporary left behind"

  loaded, loaded_metadata = classifier_lib.load_classifier(path)
  assert loaded_metadata == json.loads(json.dumps(metadata))
  assert _equal_trees(jax.device_get(loaded), jax.device_get(params))
  assert classifier_lib.model_from_metadata(loaded_metadata) == model
  # The non-default architecture comes from the metadata.
  loaded_fn = jax.jit(classifier_lib.load_probability_fn(path))
  original_fn = jax.jit(classifier_lib.make_probability_fn(params, model))
  np.testing.assert_allclose(loaded_fn(_images(3)), original_fn(_images(3)), rtol=1e-6)


@pytest.mark.parametrize("model", [
    classifier_lib.MNISTClassifier(features=(8,), hidden_size=16, num_classes=4),
    classifier_lib.CIFAR10Classifier(features=(4, 8), convs_per_block=1, hidden_size=16,
                                     input_mean=(0.5, 0.4, 0.3)),
], ids=["mnist", "cifar10"])
def test_save_load_round_trip_of_both_classifiers(tmp_path, model):
  params = _init(model, seed=3)
  metadata = _metadata(model, test_accuracy=0.5)
  assert metadata["architecture"]["name"] == type(model).__name__
  path = classifier_lib.save_classifier(tmp_path / "classifier", params, metadata)
  loaded, loaded_metadata = classifier_lib.load_classifier(path)
  assert _equal_trees(jax.device_get(loaded), jax.device_get(params))
  # The class and its non-default fields come from the metadata.
  rebuilt = classifier_lib.model_from_metadata(loaded_metadata)
  assert type(rebuilt) is type(model) and rebuilt == model

  images = _images(3, shape=model.input_shape)
  np.testing.assert_array_equal(jax.jit(rebuilt.apply)(loaded, images),
                                jax.jit(model.apply)(params, images))
  np.testing.assert_array_equal(
      jax.jit(classifier_lib.load_feature_fn(path))(images),
      jax.jit(classifier_lib.make_feature_fn(model, params))(images))
  np.testing.assert_array_equal(
      jax.jit(classifier_lib.load_probability_fn(path))(images),
      jax.jit(classifier_lib.make_probability_fn(params, model))(images))


def test_old_mnist_metadata_without_a_class_name_still_loads(tmp_path):
  model = classifier_lib.MNISTClassifier(features=(8,), hidden_size=16)
  params = _init(model)
  # As saved before the CIFAR-10 classifier: no "name" in the architecture.
  old_architecture = {"features": [8], "hidden_size": 16, "num_classes": 10,
                      "input_shape": [28, 28, 1]}
  path = classifier_lib.save_classifier(
      tmp_path / "classifier", params,
      {"architecture": old_architecture, "test_accuracy": 0.99})
  loaded, metadata = classifier_lib.load_classifier(path)
  assert classifier_lib.model_from_metadata(metadata) == model
  np.testing.assert_array_equal(
      jax.jit(classifier_lib.load_probability_fn(path))(_images(2)),
      jax.jit(classifier_lib.make_probability_fn(params, model))(_images(2)))
  assert _equal_trees(jax.device_get(loaded), jax.device_get(params))


@pytest.mark.parametrize("architecture, message", [
    (None, "no architecture"),
    ({"name": "ResNet50"}, "unknown architecture 'ResNet50'"),
    ({"name": "MNISTClassifier", "convs_per_block": 2}, "convs_per_block"),
])
def test_model_from_bad_metadata_says_why(architecture, message):
  with pytest.raises(ValueError, match=message):
    classifier_lib.model_from_metadata({"architecture": architecture})


def test_load_feature_fn_of_a_missing_or_corrupt_classifier_says_how_to_train_one(
    tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    classifier_lib.load_feature_fn(tmp_path / "nothing")
  assert str(tmp_path / "nothing") in str(info.value)
  assert classifier_lib.CIFAR10_TRAIN_COMMAND in str(info.value)
  assert "configs/cifar10_classifier.py" in str(info.value)

  model = _tiny_cifar()
  params = _init(model)

  def saved(name, architecture=None):
    return classifier_lib.save_classifier(
        tmp_path / name, params,
        {"architecture": architecture or classifier_lib.architecture_of(model)})

  corrupt = {}
  # metadata.json that is not JSON (e.g. a truncated write by hand).
  corrupt["json"] = saved("bad_json")
  with open(os.path.join(corrupt["json"], "metadata.json"), "w") as f:
    f.write('{"architecture": {"name": "CIFAR10Cl')
  # Parameters deleted.
  corrupt["no params"] = saved("no_params")
  shutil.rmtree(os.path.join(corrupt["no params"], "params"))
  # Parameters that do not fit the architecture the metadata gives.
  corrupt["mismatch"] = saved(
      "mismatch", {**classifier_lib.architecture_of(model), "hidden_size": 32})
  # An architecture this version does not know.
  corrupt["unknown"] = saved("unknown", {"name": "ResNet18"})
  expected = {"json": "not valid JSON", "no params": "no params/ checkpoint",
              "mismatch": "does not restore as the CIFAR10Classifier",
              "unknown": "unknown architecture 'ResNet18'"}
  for kind, path in corrupt.items():
    with pytest.raises(ValueError) as info:
      classifier_lib.load_feature_fn(path)
    message = str(info.value)
    assert path in message and expected[kind] in message, (kind, message)
    assert classifier_lib.CIFAR10_TRAIN_COMMAND in message, (kind, message)


def test_loading_a_missing_classifier_says_how_to_train_one(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    classifier_lib.load_classifier(tmp_path / "nothing")
  message = str(info.value)
  assert str(tmp_path / "nothing") in message
  assert "python -m experiments.train_classifier" in message
  assert "configs/mnist_classifier.py" in message


def test_a_failed_save_keeps_the_existing_classifier(tmp_path, monkeypatch):
  model = classifier_lib.MNISTClassifier(features=(8,), hidden_size=16)
  old_params = _init(model)
  path = classifier_lib.save_classifier(tmp_path / "classifier", old_params,
                                        _metadata(model, version=1))
  new_params = jax.tree_util.tree_map(lambda x: x + 1, old_params)

  def check_old_classifier_intact():
    params, metadata = classifier_lib.load_classifier(path)
    assert metadata["version"] == 1
    assert _equal_trees(jax.device_get(params), jax.device_get(old_params))
    assert sorted(os.listdir(tmp_path)) == ["classifier"], "no temporary left behind"

  # 1. Writing the parameters fails (e.g. a full disk).
  class FailingCheckpointer:

    def __init__(self, *args, **kwargs):
      pass

    def __enter__(self):
      return self

    def __exit__(self, *exc_info):
      return False

    def save(self, *args, **kwargs):
      raise OSError("simulated: no space left on device")

  with monkeypatch.context() as patch:
    patch.setattr(classifier_lib.ocp, "StandardCheckpointer", FailingCheckpointer)
    with pytest.raises(OSError, match="simulated"):
      classifier_lib.save_classifier(path, new_params, _metadata(model, version=2))
  check_old_classifier_intact()

  # 2. Moving the complete new classifier into place fails.
  rename = os.rename

  def failing_rename(src, dst):
    if os.path.basename(src).startswith(".classifier.tmp-"):
      raise OSError("simulated: rename failed")
    return rename(src, dst)

  with monkeypatch.context() as patch:
    patch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
      classifier_lib.save_classifier(path, new_params, _metadata(model, version=2))
  check_old_classifier_intact()

  # 3. Metadata that is not JSON: refused before anything is written.
  with pytest.raises(TypeError):
    classifier_lib.save_classifier(path, new_params,
                                   _metadata(model, version=2, bad=object()))
  check_old_classifier_intact()

  # A save that succeeds replaces it.
  classifier_lib.save_classifier(path, new_params, _metadata(model, version=2))
  params, metadata = classifier_lib.load_classifier(path)
  assert metadata["version"] == 2
  assert _equal_trees(jax.device_get(params), jax.device_get(new_params))
  assert sorted(os.listdir(tmp_path)) == ["classifier"]


def test_save_never_replaces_something_that_is_not_a_classifier(tmp_path):
  model = classifier_lib.MNISTClassifier(features=(8,), hidden_size=16)
  precious = tmp_path / "precious"
  precious.mkdir()
  (precious / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a saved classifier"):
    classifier_lib.save_classifier(precious, _init(model), _metadata(model))
  assert (precious / "notes.txt").read_text() == "keep me"
  assert sorted(os.listdir(tmp_path)) == ["precious"]


# --------------------------------------------------------------------------- #
# Training from the command line.


def _run(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
  env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
      [sys.executable, "-m", "experiments.train_classifier",
       "--config", "configs/mnist_classifier.py", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _summary(result) -> dict:
  lines = [l for l in result.stdout.splitlines() if l.startswith("final: ")]
  assert len(lines) == 1, result.stdout + result.stderr[-3000:]
  return json.loads(lines[0][len("final: "):])


def _assert_one_line_error(result, message):
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  assert message in lines[0]


@needs_mnist
def test_a_workdir_that_cannot_hold_the_classifier_fails_before_training(tmp_path):
  (tmp_path / "run" / "classifier").mkdir(parents=True)
  (tmp_path / "run" / "classifier" / "notes.txt").write_text("mine")
  result = _run("--workdir", str(tmp_path / "run"))
  _assert_one_line_error(result, "exists and is not a saved classifier")
  assert "step" not in result.stdout, "it did not train"
  assert (tmp_path / "run" / "classifier" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    (["--config.no_such_key=1"], "no_such_key"),
    (["--config.min_accuracy=1.5", "--config.model.features=(16,0)"], "min_accuracy"),
])
def test_bad_config_is_one_line_and_exit_status_2(tmp_path, args, message):
  result = _run("--workdir", str(tmp_path / "run"), *args)
  _assert_one_line_error(result, message)
  assert not (tmp_path / "run").exists(), "nothing is written for a bad config"


def test_missing_data_is_one_line_and_exit_status_2(tmp_path):
  env = dict(os.environ, GECO_DATA_DIR=str(tmp_path / "no_data"))
  result = _run("--workdir", str(tmp_path / "run"), env=env)
  _assert_one_line_error(result, "mnist.npz")
  assert not (tmp_path / "run").exists()


@needs_mnist
def test_tiny_training_run_saves_a_classifier_and_a_failed_one_keeps_it(tmp_path):
  workdir = tmp_path / "run"
  result = _run("--workdir", str(workdir), *TINY, "--config.min_accuracy=0.2")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = _summary(result)
  assert summary["train_examples"] == 256 and summary["test_examples"] == 200
  assert summary["steps"] == 4 and summary["epochs"] == 1
  assert summary["test_accuracy"] >= 0.2
  assert summary["saved"] == str(workdir / "classifier")
  assert "epoch 1/1" in result.stderr and "test accuracy" in result.stderr
  params, metadata = classifier_lib.load_classifier(workdir / "classifier")
  assert metadata["test_accuracy"] == summary["test_accuracy"]
  assert "python -m experiments.train_classifier" in metadata["command"]
  assert "--config.min_accuracy=0.2" in metadata["command"]
  assert metadata["architecture"] == classifier_lib.architecture_of(
      classifier_lib.MNISTClassifier())
  assert metadata["config"]["dataset"]["num_train"] == 256

  # The same training asking for an accuracy it cannot reach: nothing saved,
  # the classifier above untouched. In-process, to save a second start of
  # Python and JAX; the command line's exit status 1 is the handler of
  # AccuracyTooLowError in experiments.train_classifier.main.
  from configs import mnist_classifier
  from experiments import train_classifier
  config = mnist_classifier.get_config()
  config.update_from_flattened_dict({
      "dataset.num_train": 256, "dataset.num_test": 200, "batch_size": 64,
      "eval_batch_size": 200, "num_epochs": 1, "min_accuracy": 1.0})
  with pytest.raises(train_classifier.AccuracyTooLowError,
                     match=r"test accuracy .* below config.min_accuracy=1.0.*not saved"):
    try:
      train_classifier.train_and_evaluate(config, str(workdir))
    except train_classifier.AccuracyTooLowError as e:
      failed_summary = e.summary
      raise
  assert failed_summary["saved"] is None
  # Same config and seed: the same training, to the last bit.
  for key in ("test_accuracy", "test_loss", "train_loss", "steps"):
    assert failed_summary[key] == summary[key], key
  kept_params, kept_metadata = classifier_lib.load_classifier(workdir / "classifier")
  assert kept_metadata == metadata
  assert _equal_trees(jax.device_get(kept_params), jax.device_get(params))
  assert sorted(os.listdir(workdir)) == ["classifier"]


@needs_mnist
@pytest.mark.slow
def test_real_config_reaches_its_minimum_accuracy(tmp_path):
  workdir = tmp_path / "run"
  result = _run("--workdir", str(workdir), timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = _summary(result)
  assert summary["test_examples"] == 10000
  assert summary["test_accuracy"] >= 0.985, summary

  # The saved classifier is the one that was evaluated.
  from geco_jax.data import load_dataset
  test = load_dataset("mnist", source="npz")["test"]
  classifier = jax.jit(classifier_lib.load_probability_fn(workdir / "classifier"))
  predictions = np.concatenate([
      np.argmax(classifier(test["image"][i:i + 1000]), axis=1)
      for i in range(0, len(test["label"]), 1000)])
  np.testing.assert_allclose(np.mean(predictions == test["label"]),
                             summary["test_accuracy"], atol=1e-4)


# --------------------------------------------------------------------------- #
# Training the CIFAR-10 classifier.


def _cifar_config(**overrides):
  from configs import cifar10_classifier
  config = cifar10_classifier.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def test_augmentation_flips_and_shifts():
  from experiments import train_classifier
  images = np.random.default_rng(0).random((64, 8, 8, 3)).astype(np.float32)

  def augment(seed, **kwargs):
    return train_classifier.augment_batch(images, np.random.default_rng(seed), **kwargs)

  np.testing.assert_array_equal(augment(0, flip=False, crop_padding=0), images)
  flipped = augment(0, flip=True, crop_padding=0)
  is_flipped = [np.array_equal(f, x[:, ::-1]) for f, x in zip(flipped, images)]
  assert all(f or np.array_equal(a, x) for f, a, x in zip(is_flipped, flipped, images))
  assert 16 < sum(is_flipped) < 48
  shifted = augment(0, flip=False, crop_padding=2)
  assert shifted.shape == images.shape and shifted.dtype == images.dtype
  # Every crop is the image shifted by at most 2 pixels (compare the overlap).
  for a, x in zip(shifted, images):
    assert any(np.array_equal(a[max(0, -dr):8 - max(0, dr), max(0, -dc):8 - max(0, dc)],
                              x[max(0, dr):8 + min(0, dr), max(0, dc):8 + min(0, dc)])
               for dr in range(-2, 3) for dc in range(-2, 3))
  assert not np.array_equal(shifted, images)
  # A function of the generator's seed.
  np.testing.assert_array_equal(augment(5, flip=True, crop_padding=4),
                                augment(5, flip=True, crop_padding=4))


@pytest.mark.parametrize("overrides, message", [
    ({"dataset.name": "svhn"}, "config.dataset.name must be one of"),
    ({"model.features": (8, 8, 8, 8, 8, 8)}, "1 to 5 positive integers (32x32"),
    ({"model.convs_per_block": 0}, "model.convs_per_block"),
    ({"model.hidden_size": 0}, "model.hidden_size"),
    ({"augment.crop_padding": -1}, "augment.crop_padding"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_bad_cifar_config_is_refused(overrides, message):
  from experiments import setup
  from experiments import train_classifier
  with pytest.raises(setup.ConfigError, match=re.escape(message)):
    train_classifier.validate_config(_cifar_config(**overrides))


def test_a_misspelt_field_in_a_classifier_config_file_is_refused():
  """A config file can add any key (the command line cannot): a typo such as
  num_epoch would otherwise train with the default num_epochs."""
  from experiments import setup
  from experiments import train_classifier
  for section, key in ((None, "num_epoch"), ("dataset", "num_trian"), ("augment", "flips")):
    config = _cifar_config()
    with config.unlocked():
      (config if section is None else config[section])[key] = 5
    name = key if section is None else f"{section}.{key}"
    with pytest.raises(setup.ConfigError, match=rf"config.{name}: unknown field; known:"):
      train_classifier.validate_config(config)
  # Both shipped configs hold only known fields.
  from configs import mnist_classifier
  train_classifier.validate_config(mnist_classifier.get_config())
  train_classifier.validate_config(_cifar_config())


def test_config_picks_the_classifier_of_its_dataset():
  from configs import mnist_classifier
  from experiments import train_classifier
  mnist = mnist_classifier.get_config()  # No dataset.name: MNIST.
  train_classifier.validate_config(mnist)
  assert train_classifier.make_model(mnist) == classifier_lib.MNISTClassifier()
  cifar = _cifar_config()
  train_classifier.validate_config(cifar)
  assert train_classifier.make_model(cifar) == classifier_lib.CIFAR10Classifier()
  from experiments import setup
  mnist.model.convs_per_block = 2  # A CIFAR10Classifier field.
  with pytest.raises(setup.ConfigError,
                     match=r"not fields of MNISTClassifier: \['convs_per_block'\]"):
    train_classifier.validate_config(mnist)


@needs_cifar10
def test_a_few_cifar_training_steps_lower_the_loss(tmp_path):
  from experiments import train_classifier
  # A tiny net on 256 real images: 3 epochs of 8 steps, a couple of seconds.
  config = _cifar_config(**{
      "dataset.num_train": 256, "dataset.num_test": 100, "batch_size": 32,
      "eval_batch_size": 100, "num_epochs": 3, "learning_rate": 3e-3,
      "model.features": (8, 16), "model.convs_per_block": 1, "model.hidden_size": 32,
      "min_accuracy": 0.0})
  summary = train_classifier.train_and_evaluate(config, str(tmp_path), command="test")
  losses = [epoch["train_loss"] for epoch in summary["history"]]
  assert summary["steps"] == 24 and len(losses) == 3
  assert losses[-1] < losses[0] < 2.4, losses  # ln(10) = 2.30 at chance.
  assert summary["test_examples"] == 100
  assert summary["feature_rms"] > 0 and np.isfinite(summary["feature_rms"])

  # What it saved is that classifier, and FRE's feature function loads from it.
  params, metadata = classifier_lib.load_classifier(summary["saved"])
  assert metadata["architecture"]["name"] == "CIFAR10Classifier"
  assert metadata["dataset"] == {"name": "cifar10", "source": "npz"}
  assert metadata["test_accuracy"] == summary["test_accuracy"]
  features = jax.jit(classifier_lib.load_feature_fn(summary["saved"]))(
      _images(2, shape=CIFAR_SHAPE))
  assert features.shape == (2, 32) and np.all(np.isfinite(features))

  # Deterministic: the same config trains the same classifier, augmentation included.
  again = train_classifier.train_and_evaluate(config, str(tmp_path / "again"))
  assert [e["train_loss"] for e in again["history"]] == losses
  again_params, _ = classifier_lib.load_classifier(again["saved"])
  assert _equal_trees(jax.device_get(again_params), jax.device_get(params))
