"""The MNIST classifier of the CLA constraint: model, saving and loading, training CLI."""

import json
import os
import pathlib
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
                          jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), shapes)


def _images(n, seed=0):
  return jnp.asarray(np.random.default_rng(seed).random((n, 28, 28, 1)), jnp.float32)


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
