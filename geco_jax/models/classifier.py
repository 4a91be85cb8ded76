"""The small convolutional MNIST classifier that the CLA constraint needs.

CLA (paper Table 1) asks that a classifier ``c`` gives the true class of x a
probability of at least kappa on the reconstruction g(z). The classifier is
trained by this project, never downloaded:

  GECO_DATA_DIR=/path/to/data python -m experiments.train_classifier \
      --config configs/mnist_classifier.py --workdir runs/mnist_classifier

which saves ``runs/mnist_classifier/classifier``. To use it:

  params, metadata = load_classifier("runs/mnist_classifier/classifier")
  classifier = make_probability_fn(params, model_from_metadata(metadata))
  c = classification_accuracy(reconstruction, labels, 0.9, classifier=classifier)

or, in one call, ``classifier = load_probability_fn(path)``.

A saved classifier is a directory holding ``params/`` (an orbax checkpoint)
and ``metadata.json`` (its test accuracy, its architecture, the command that
trained it, ...). ``save_classifier`` writes a complete copy to a temporary
directory first, so a failed save never leaves a broken classifier behind nor
destroys the one already there.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

__all__ = [
    "MNISTClassifier",
    "TRAIN_COMMAND",
    "architecture_of",
    "load_classifier",
    "load_probability_fn",
    "make_probability_fn",
    "model_from_metadata",
    "save_classifier",
]

TRAIN_COMMAND = ("GECO_DATA_DIR=/path/to/data python -m experiments.train_classifier "
                 "--config configs/mnist_classifier.py --workdir <dir>")

_PARAMS = "params"
_METADATA = "metadata.json"
_INPUT_SHAPE = (28, 28, 1)


def _max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 (odd trailing rows and columns dropped).

  The same values as ``nn.max_pool(x, (2, 2), (2, 2))``, written as a reshape
  and a max: XLA's CPU gradient of ``reduce_window`` (select-and-scatter) made
  the classifier's training step and the CLA gradient about twice as slow.
  """
  batch, height, width, channels = x.shape
  height, width = height // 2 * 2, width // 2 * 2
  x = x[:, :height, :width]
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class MNISTClassifier(nn.Module):
  """Conv-ReLU-pool blocks, a hidden dense layer and class logits.

  With the defaults: 3x3 conv (16) -> pool -> 3x3 conv (32) -> pool ->
  dense 128 -> dense 10, about 0.2 M parameters. Small on purpose: GECO's CLA
  constraint differentiates through it at every training step.

  Attributes:
    features: output channels of each 3x3 convolution; each is followed by a
      ReLU and 2x2 max pooling.
    hidden_size: units of the hidden dense layer.
    num_classes: number of logits.
  """

  features: Sequence[int] = (16, 32)
  hidden_size: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Logits ``[batch, num_classes]`` of images ``[batch, 28, 28, 1]`` in [0, 1]."""
    if images.ndim != 4:
      raise ValueError(
          "MNISTClassifier: expected images of shape [batch, height, width, "
          f"channels]; got shape {images.shape}.")
    x = images
    for features in self.features:
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = _max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden_size)(x))
    return nn.Dense(self.num_classes)(x)


def architecture_of(model: MNISTClassifier) -> dict[str, Any]:
  """The JSON-able description of ``model`` stored in a classifier's metadata."""
  return {"name": type(model).__name__, "features": [int(f) for f in model.features],
          "hidden_size": int(model.hidden_size), "num_classes": int(model.num_classes),
          "input_shape": list(_INPUT_SHAPE)}


def model_from_metadata(metadata: Mapping[str, Any]) -> MNISTClassifier:
  """The ``MNISTClassifier`` described by ``metadata['architecture']``."""
  architecture = metadata.get("architecture")
  if not isinstance(architecture, Mapping) or architecture.get("name") != "MNISTClassifier":
    raise ValueError(
        "the classifier metadata has no MNISTClassifier architecture; got "
        f"{architecture!r:.200}.")
  return MNISTClassifier(features=tuple(architecture["features"]),
                         hidden_size=architecture["hidden_size"],
                         num_classes=architecture["num_classes"])


def make_probability_fn(
    params, model: MNISTClassifier | None = None) -> Callable[[jax.Array], jax.Array]:
  """``classifier(images) -> probabilities [batch, classes]`` for CLA.

  Suitable for ``geco_jax.constraints.classification_accuracy(..., classifier=)``.
  The parameters are closed over, so inside a jitted GECO step they are
  constants: gradients flow to the images (the VAE) only, never to the
  classifier.

  Args:
    params: the classifier's variables, e.g. from ``load_classifier``.
    model: the module they belong to; default ``MNISTClassifier()``. For a
      loaded classifier pass ``model_from_metadata(metadata)``.
  """
  model = MNISTClassifier() if model is None else model

  def probabilities(images: jax.Array) -> jax.Array:
    return jax.nn.softmax(model.apply(params, images), axis=-1)

  return probabilities


# --------------------------------------------------------------------------- #
# Saving and loading.


def _abstract_params(model: MNISTClassifier):
  """Arrays shaped like ``model``'s variables, for orbax to restore into."""
  # Concrete zeros rather than ShapeDtypeStructs: they carry a (default,
  # single-device) sharding, so the restore needs no sharding metadata from
  # the machine that saved them.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, *_INPUT_SHAPE), jnp.float32))
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _is_saved_classifier(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, _METADATA))


def _replace_directory(new: str, path: str) -> None:
  """Move the complete directory ``new`` to ``path``, replacing a classifier there.

  Each step is an atomic ``os.rename`` within one directory: the old
  classifier is first moved aside, then ``new`` takes its place, then the old
  one is deleted. If the second rename fails, the old one is moved back.
  """
  if not os.path.lexists(path):
    os.rename(new, path)
    return
  parent, name = os.path.split(path)
  previous = os.path.join(parent, f".{name}.previous-{uuid.uuid4().hex[:8]}")
  os.rename(path, previous)
  try:
    os.rename(new, path)
  except BaseException:
    os.rename(previous, path)
    raise
  shutil.rmtree(previous, ignore_errors=True)


def save_classifier(path: str | os.PathLike, params,
                    metadata: Mapping[str, Any]) -> str:
  """Save ``params`` and ``metadata`` as the classifier directory ``path``.

  Everything is written to a temporary directory next to ``path`` and only a
  complete classifier is renamed into place; if anything fails, ``path`` is
  left as it was.

  Args:
    path: the classifier directory; an existing saved classifier there is
      replaced.
    params: the classifier's variables (``model.init(...)`` structure).
    metadata: JSON-serialisable facts about it; should hold ``architecture``
      (``architecture_of(model)``), for ``load_classifier`` to rebuild the
      model, and e.g. ``test_accuracy`` and ``command``.

  Returns:
    The absolute path of the saved classifier.

  Raises:
    FileExistsError: ``path`` exists and is not a saved classifier (it is
      never replaced).
    TypeError: ``metadata`` is not JSON-serialisable.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path) and not _is_saved_classifier(path):
    raise FileExistsError(
        f"{path} exists and is not a saved classifier (no {_METADATA}); "
        "refusing to replace it.")
  # Checked before anything is written, so a bad value fails fast.
  metadata_json = json.dumps(dict(metadata), indent=2, sort_keys=True)
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  # In the same directory as path, so that the final rename stays on one
  # filesystem and is atomic. os.mkdir, not tempfile.mkdtemp, so that the
  # classifier gets the usual permissions (umask), not mkdtemp's 0700.
  staging = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
  os.mkdir(staging)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(staging, _PARAMS), params)
      checkpointer.wait_until_finished()
    with open(os.path.join(staging, _METADATA), "w", encoding="utf-8") as f:
      f.write(metadata_json + "\n")
    _replace_directory(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return path


def load_classifier(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
  """``(params, metadata)`` of the classifier saved at ``path``.

  Raises:
    FileNotFoundError: no saved classifier at ``path``; the message says
      which command trains one.
    ValueError: the metadata describes no ``MNISTClassifier``.
  """
  path = os.path.abspath(os.fspath(path))
  if not _is_saved_classifier(path):
    why = "it does not exist" if not os.path.lexists(path) else f"it holds no {_METADATA}"
    raise FileNotFoundError(
        f"no trained MNIST classifier at {path} ({why}). Train one with: "
        f"{TRAIN_COMMAND} (it saves <dir>/classifier).")
  with open(os.path.join(path, _METADATA), encoding="utf-8") as f:
    metadata = json.load(f)
  target = _abstract_params(model_from_metadata(metadata))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(path, _PARAMS), target)
  return params, metadata


def load_probability_fn(path: str | os.PathLike) -> Callable[[jax.Array], jax.Array]:
  """``make_probability_fn`` of the classifier saved at ``path``, with its own architecture."""
  params, metadata = load_classifier(path)
  return make_probability_fn(params, model_from_metadata(metadata))
