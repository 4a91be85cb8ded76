"""The small classifiers of the CLA and FRE constraints, trained by this project.

Two conv nets, each trained here, never downloaded:

* ``MNISTClassifier``, for CLA (paper Table 1): a classifier ``c`` must give the
  true class of x a probability of at least kappa on the reconstruction g(z).

    GECO_DATA_DIR=/path/to/data python -m experiments.train_classifier \
        --config configs/mnist_classifier.py --workdir runs/mnist_classifier

  saves ``runs/mnist_classifier/classifier``. To use it:

    params, metadata = load_classifier("runs/mnist_classifier/classifier")
    classifier = make_probability_fn(params, model_from_metadata(metadata))
    c = classification_accuracy(reconstruction, labels, 0.9, classifier=classifier)

  or, in one call, ``classifier = load_probability_fn(path)``.

* ``CIFAR10Classifier``, for FRE: the paper compares x and g(z) in the
  feature space of a pretrained CIFAR-10 ResNet; none can be downloaded here,
  so FRE uses the penultimate features of this one instead.

    GECO_DATA_DIR=/path/to/data python -m experiments.train_classifier \
        --config configs/cifar10_classifier.py --workdir runs/cifar10_classifier

  saves ``runs/cifar10_classifier/classifier``. To use it:

    features = load_feature_fn("runs/cifar10_classifier/classifier")
    c = feature_reconstruction_error(x, reconstruction, 0.3, features)

  The tolerance is a per-feature RMSE; configs/cifar10_classifier.py gives
  its scale (0.3 is about what a 2x2 blur of the image costs).

Both classifiers take images ``[batch, height, width, channels]`` in [0, 1]
and return logits, or with ``return_features=True`` the activations of their
hidden dense layer (after its ReLU), of which the logits are an affine function.

A saved classifier is a directory holding ``params/`` (an orbax checkpoint)
and ``metadata.json`` (its test accuracy, its architecture, the command that
trained it, ...). ``metadata['architecture']`` names the class and gives its
fields (``architecture_of``), so ``load_classifier`` rebuilds either
classifier; an architecture without a ``name`` (an early MNIST save) is an
``MNISTClassifier``. ``save_classifier`` writes a complete copy to a temporary
directory first, so a failed save never leaves a broken classifier behind nor
destroys the one already there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from typing import Any, Callable, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

__all__ = [
    "CIFAR10Classifier",
    "CIFAR10_TRAIN_COMMAND",
    "CLASSIFIERS",
    "MNISTClassifier",
    "TRAIN_COMMAND",
    "architecture_of",
    "check_save_path",
    "load_classifier",
    "load_feature_fn",
    "load_probability_fn",
    "make_feature_fn",
    "make_probability_fn",
    "model_from_metadata",
    "save_classifier",
]

TRAIN_COMMAND = ("GECO_DATA_DIR=/path/to/data python -m experiments.train_classifier "
                 "--config configs/mnist_classifier.py --workdir <dir>")
"""The command that trains the MNIST classifier of CLA into ``<dir>/classifier``."""

CIFAR10_TRAIN_COMMAND = ("GECO_DATA_DIR=/path/to/data python -m experiments.train_classifier "
                         "--config configs/cifar10_classifier.py --workdir <dir>")
"""The command that trains the CIFAR-10 feature extractor of FRE into ``<dir>/classifier``."""

_PARAMS = "params"
_METADATA = "metadata.json"

# Per-channel mean and standard deviation of the CIFAR-10 training pixels in
# [0, 1] (all 50,000 images; the 4,000 of shared/data give means 0.492,
# 0.482, 0.445 and stds 0.247, 0.244, 0.263). Fields of the model, so that a
# saved classifier keeps the normalisation it was trained with.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


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
    hidden_size: units of the hidden dense layer (the features).
    num_classes: number of logits.
  """

  features: Sequence[int] = (16, 32)
  hidden_size: int = 128
  num_classes: int = 10

  input_shape: ClassVar[tuple[int, int, int]] = (28, 28, 1)
  """The [height, width, channels] of the images it is built and trained for."""

  @nn.compact
  def __call__(self, images: jax.Array, return_features: bool = False) -> jax.Array:
    """Logits ``[batch, num_classes]`` of images ``[batch, 28, 28, 1]`` in [0, 1].

    With ``return_features=True``: the hidden layer's ``[batch, hidden_size]``
    activations instead.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
      raise ValueError(
          "MNISTClassifier: expected images of shape [batch, height, width, "
          f"channels] = [batch, 28, 28, 1] (values in [0, 1]); got shape {images.shape}.")
    x = images
    for features in self.features:
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = _max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden_size)(x))
    if return_features:
      return x
    return nn.Dense(self.num_classes)(x)


class CIFAR10Classifier(nn.Module):
  """Blocks of 3x3 conv-ReLU layers and 2x2 max pooling, a hidden dense layer, logits.

  With the defaults: (conv 32, conv 32, pool), (conv 64, conv 64, pool),
  (conv 128, conv 128, pool) on 32x32x3 images, then dense 256 (the
  features) and dense 10: about 0.8 M parameters. No batch normalisation, so
  the model has no state and FRE's feature function is a pure function of the
  images. The images are standardised per channel inside the model
  (``input_mean``, ``input_std``), so it takes the [0, 1] images the VAEs
  produce. Augmentation belongs to the trainer.

  Attributes:
    features: output channels of each block's convolutions; every block ends
      with 2x2 max pooling, so 32x32 images allow at most 5 blocks.
    convs_per_block: 3x3 conv-ReLU layers per block.
    hidden_size: units of the hidden dense layer (the features).
    num_classes: number of logits.
    input_mean: per-channel mean subtracted from the images.
    input_std: per-channel standard deviation the images are divided by.
  """

  features: Sequence[int] = (32, 64, 128)
  convs_per_block: int = 2
  hidden_size: int = 256
  num_classes: int = 10
  input_mean: Sequence[float] = CIFAR10_MEAN
  input_std: Sequence[float] = CIFAR10_STD

  input_shape: ClassVar[tuple[int, int, int]] = (32, 32, 3)
  """The [height, width, channels] of the images it is built and trained for."""

  @nn.compact
  def __call__(self, images: jax.Array, return_features: bool = False) -> jax.Array:
    """Logits ``[batch, num_classes]`` of images ``[batch, 32, 32, 3]`` in [0, 1].

    With ``return_features=True``: the hidden layer's ``[batch, hidden_size]``
    activations instead (after the ReLU), the FRE features.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
      raise ValueError(
          "CIFAR10Classifier: expected images of shape [batch, 32, 32, 3] "
          f"(height, width, channels; values in [0, 1]); got shape {images.shape}.")
    mean = jnp.asarray(self.input_mean, images.dtype)
    std = jnp.asarray(self.input_std, images.dtype)
    x = (images - mean) / std
    for features in self.features:
      for _ in range(self.convs_per_block):
        x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = _max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden_size)(x))
    if return_features:
      return x
    return nn.Dense(self.num_classes)(x)


Classifier = MNISTClassifier | CIFAR10Classifier

CLASSIFIERS: dict[str, type[nn.Module]] = {
    "MNISTClassifier": MNISTClassifier,
    "CIFAR10Classifier": CIFAR10Classifier,
}
"""The classifier classes by the name ``metadata['architecture']['name']`` gives."""

# What load_* errors suggest, per class.
_TRAIN_COMMANDS = {"MNISTClassifier": TRAIN_COMMAND,
                   "CIFAR10Classifier": CIFAR10_TRAIN_COMMAND}
# Keys of an architecture that are not constructor fields.
_NOT_FIELDS = ("name", "input_shape")


def _fields(cls: type[nn.Module]) -> tuple[str, ...]:
  """The architecture fields of a classifier class (not Flax's parent and name)."""
  return tuple(f.name for f in dataclasses.fields(cls)
               if f.init and f.name not in ("parent", "name"))


def _to_json(value):
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  if isinstance(value, bool) or value is None or isinstance(value, str):
    return value
  if isinstance(value, int):
    return int(value)
  return float(value)


def architecture_of(model: Classifier) -> dict[str, Any]:
  """The JSON-able description of ``model`` stored in a classifier's metadata.

  ``{'name': <class name>, <every field>: <its value, tuples as lists>,
  'input_shape': [height, width, channels]}``; ``model_from_metadata``
  rebuilds the model from it.

  Raises:
    TypeError: ``model`` is not one of ``CLASSIFIERS``.
  """
  name = type(model).__name__
  if CLASSIFIERS.get(name) is not type(model):
    raise TypeError(
        f"architecture_of: expected one of {sorted(CLASSIFIERS)}; got {name}.")
  architecture = {field: _to_json(getattr(model, field)) for field in _fields(type(model))}
  return {"name": name, **architecture, "input_shape": list(model.input_shape)}


def model_from_metadata(metadata: Mapping[str, Any]) -> Classifier:
  """The classifier described by ``metadata['architecture']``.

  An architecture without a ``name`` is an ``MNISTClassifier`` (saves from
  before the CIFAR-10 classifier existed); fields it omits keep their
  defaults.

  Raises:
    ValueError: no architecture, an unknown class name or an unknown field.
  """
  architecture = metadata.get("architecture") if isinstance(metadata, Mapping) else None
  if not isinstance(architecture, Mapping):
    raise ValueError(
        "the classifier metadata has no architecture (a dict naming one of "
        f"{sorted(CLASSIFIERS)}); got {architecture!r:.200}.")
  name = architecture.get("name", "MNISTClassifier")
  if name not in CLASSIFIERS:
    raise ValueError(
        f"the classifier metadata names an unknown architecture {name!r}; known: "
        f"{sorted(CLASSIFIERS)}.")
  cls = CLASSIFIERS[name]
  fields = _fields(cls)
  unknown = sorted(set(architecture) - set(fields) - set(_NOT_FIELDS))
  if unknown:
    raise ValueError(
        f"the classifier metadata gives {name} fields it does not have: {unknown}; "
        f"its fields are {list(fields)}.")
  kwargs = {field: tuple(value) if isinstance(value, list) else value
            for field, value in architecture.items() if field in fields}
  return cls(**kwargs)


def make_probability_fn(
    params, model: Classifier | None = None) -> Callable[[jax.Array], jax.Array]:
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


def make_feature_fn(model: Classifier, params) -> Callable[[jax.Array], jax.Array]:
  """``features(images [B, H, W, C] in [0, 1]) -> [B, F]`` for FRE.

  The classifier's hidden dense layer after its ReLU (``F = hidden_size``),
  the penultimate layer, as FRE's ``f``: suitable for
  ``geco_jax.constraints.feature_reconstruction_error(x, g, tolerance, f)``.
  A pure function of the images; the parameters are closed over, so inside a
  jitted GECO step they are constants and gradients flow to the images (the
  VAE) only, never to the classifier.

  Args:
    model: the classifier, e.g. ``model_from_metadata(metadata)``; normally a
      ``CIFAR10Classifier`` (its images must be [B, 32, 32, 3]).
    params: its variables, e.g. from ``load_classifier``.
  """

  def features(images: jax.Array) -> jax.Array:
    return model.apply(params, images, return_features=True)

  return features


# --------------------------------------------------------------------------- #
# Saving and loading.


def _abstract_params(model: Classifier):
  """Arrays shaped like ``model``'s variables, for orbax to restore into."""
  # Concrete zeros rather than ShapeDtypeStructs: they carry a (default,
  # single-device) sharding, so the restore needs no sharding metadata from
  # the machine that saved them.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, *model.input_shape), jnp.float32))
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """``{key path: shape}`` of the arrays (or array metadata) of ``tree``."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


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


def check_save_path(path: str | os.PathLike) -> str:
  """``path`` as an absolute path if ``save_classifier`` may write there.

  Call it before training, so that a run is not spent on a classifier that
  could not be saved.

  Raises:
    FileExistsError: ``path`` exists and is not a saved classifier.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path) and not _is_saved_classifier(path):
    raise FileExistsError(
        f"{path} exists and is not a saved classifier (no {_METADATA}); "
        "refusing to replace it.")
  return path


def save_classifier(path: str | os.PathLike, params,
                    metadata: Mapping[str, Any]) -> str:
  """Save ``params`` and ``metadata`` as the classifier directory ``path``.

  Everything is written to a temporary directory next to ``path`` and only a
  complete classifier is renamed into place; if anything fails, ``path`` is
  left as it was. The same for every classifier class.

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
  path = check_save_path(path)
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


def _train_hint(hint: str | None) -> str:
  """The command that trains a classifier, for the errors of a loader.

  Args:
    hint: the class the caller wants (a key of ``CLASSIFIERS``), or None for
      both commands.
  """
  if hint is not None:
    return f"Train one with: {_TRAIN_COMMANDS[hint]} (it saves <dir>/classifier)."
  return (f"Train one with: {TRAIN_COMMAND} (MNIST, for CLA) or "
          f"{CIFAR10_TRAIN_COMMAND} (CIFAR-10, for FRE); each saves <dir>/classifier.")


def _load(path: str | os.PathLike, hint: str | None) -> tuple[Any, dict[str, Any]]:
  """``load_classifier``, its errors naming the train command of class ``hint``."""
  path = os.path.abspath(os.fspath(path))
  what = {"MNISTClassifier": "MNIST classifier",
          "CIFAR10Classifier": "CIFAR-10 classifier"}.get(hint, "classifier")
  if not _is_saved_classifier(path):
    why = "it does not exist" if not os.path.lexists(path) else f"it holds no {_METADATA}"
    raise FileNotFoundError(f"no trained {what} at {path} ({why}). {_train_hint(hint)}")

  def unreadable(why: str) -> ValueError:
    return ValueError(
        f"the classifier at {path} cannot be loaded: {why}. Retrain it (that "
        f"replaces it). {_train_hint(hint)}")

  try:
    with open(os.path.join(path, _METADATA), encoding="utf-8") as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError too.
    raise unreadable(f"{_METADATA} is not valid JSON ({e})") from e
  try:
    model = model_from_metadata(metadata)
  except ValueError as e:
    raise unreadable(str(e).rstrip(".")) from e
  try:
    target = _abstract_params(model)
  except Exception as e:  # pylint: disable=broad-except
    # E.g. a field of the wrong type, from a metadata.json edited by hand.
    raise unreadable(f"its architecture {metadata['architecture']!r:.200} does not "
                     f"build a {type(model).__name__} ({type(e).__name__}: {e})") from e
  params_path = os.path.join(path, _PARAMS)
  if not os.path.isdir(params_path):
    raise unreadable(f"it has no {_PARAMS}/ checkpoint")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      # Shapes checked first where orbax can say them: a restore that fails
      # on a shape leaves orbax's reads dangling (unraisable warnings).
      try:
        saved = _shapes(checkpointer.metadata(params_path).item_metadata.tree)
      except Exception:  # pylint: disable=broad-except
        saved = None  # Let the restore itself decide.
      expected = _shapes(target)
      if saved is not None and saved != expected:
        differ = sorted(k for k in saved.keys() | expected.keys()
                        if saved.get(k) != expected.get(k))
        raise ValueError(
            "parameters " + ", ".join(f"{k}: saved {saved.get(k)}, expected "
                                      f"{expected.get(k)}" for k in differ[:3])
            + (f" and {len(differ) - 3} more" if len(differ) > 3 else ""))
      params = checkpointer.restore(params_path, target)
  except Exception as e:  # pylint: disable=broad-except
    # Orbax raises many types for a damaged or mismatched checkpoint.
    reason = " ".join(str(e).split())[:300]
    raise unreadable(
        f"its {_PARAMS}/ checkpoint does not restore as the {type(model).__name__} "
        f"of its metadata ({type(e).__name__}: {reason})") from e
  return params, metadata


def load_classifier(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
  """``(params, metadata)`` of the classifier saved at ``path``, of either class.

  Rebuild its model with ``model_from_metadata(metadata)``.

  Raises:
    FileNotFoundError: no saved classifier at ``path``; the message says
      which commands train one.
    ValueError: the classifier cannot be loaded: its metadata is not JSON or
      describes no known architecture, or its parameters are missing or do
      not match that architecture; the message says how to retrain it.
  """
  return _load(path, None)


def load_probability_fn(path: str | os.PathLike) -> Callable[[jax.Array], jax.Array]:
  """CLA's ``make_probability_fn`` of the classifier saved at ``path``, with its own architecture.

  Raises:
    FileNotFoundError, ValueError: as ``load_classifier``; the messages give
      ``TRAIN_COMMAND`` (the MNIST classifier).
  """
  params, metadata = _load(path, "MNISTClassifier")
  return make_probability_fn(params, model_from_metadata(metadata))


def load_feature_fn(path: str | os.PathLike) -> Callable[[jax.Array], jax.Array]:
  """FRE's ``features(images [B, H, W, C] in [0, 1]) -> [B, F]`` of a saved classifier.

  ``make_feature_fn`` of the classifier saved at ``path`` with its own
  architecture; normally the ``CIFAR10Classifier`` of
  ``runs/cifar10_classifier/classifier`` (images [B, 32, 32, 3]). Jit-friendly
  and differentiable with respect to the images.

  Raises:
    FileNotFoundError: no saved classifier at ``path``; the message gives
      ``CIFAR10_TRAIN_COMMAND``.
    ValueError: it cannot be loaded (corrupt metadata or parameters); the
      message gives ``CIFAR10_TRAIN_COMMAND``.
  """
  params, metadata = _load(path, "CIFAR10Classifier")
  return make_feature_fn(model_from_metadata(metadata), params)
