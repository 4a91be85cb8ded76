"""From a config to library objects: validation, data, model, constraints, optimiser.

The library (``geco_jax``) never reads configs; this module is where config
fields become arguments. Every problem with a config is a ``ConfigError``
raised here, before anything is compiled, so ``experiments.main`` can report
it in one line and exit with status 2.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable

import jax.numpy as jnp
import ml_collections
import optax

import geco_jax
from geco_jax import constraints as constraints_lib
from geco_jax.data import DatasetNotFoundError
from geco_jax.data import load_dataset
from geco_jax.models import classifier as classifier_lib
from geco_jax.models import ConvVAE
from geco_jax.models import VAEOutput

SOURCES = {"sprites": ("generated",), "mnist": ("npz", "tfds"),
           "fashion_mnist": ("npz", "tfds")}
DATASETS = tuple(SOURCES)
MODELS = ("conv_vae",)
DUALS = ("sgd", "pi")
CONSTRAINTS = ("re", "fre", "pncc", "kl", "cla")


class ConfigError(ValueError):
  """A config that cannot be run; the message says which field and why."""


def require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _positive_int(config, name: str, prefix: str = "") -> None:
  value = config[name]
  require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
           f"config.{prefix}{name} must be a positive integer; got {value!r}.")


def positive(value, name: str) -> None:
  require(isinstance(value, (int, float)) and not isinstance(value, bool)
           and math.isfinite(value) and value > 0,
           f"config.{name} must be a positive number; got {value!r}.")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raise ``ConfigError`` for the first field that makes no sense."""
  for name in ("seed",):
    require(isinstance(config[name], int), f"config.{name} must be an integer.")
  for name in ("batch_size", "num_steps", "log_every", "image_every",
               "checkpoint_every", "max_checkpoints_to_keep", "num_image_samples"):
    _positive_int(config, name)

  data = config.dataset
  require(data.name in DATASETS,
           f"config.dataset.name must be one of {DATASETS}; got {data.name!r}.")
  require(data.source in SOURCES[data.name],
          f"config.dataset.source must be one of {SOURCES[data.name]} for "
          f"{data.name}; got {data.source!r}.")
  if data.name == "sprites":
    require(isinstance(data.image_size, int) and data.image_size >= 8
            and data.image_size % 4 == 0,
            "config.dataset.image_size must be a multiple of 4, at least 8; got "
            f"{data.image_size!r}.")
    for name in ("num_train", "num_test"):
      _positive_int(data, name, "dataset.")
    require(config.batch_size <= data.num_train,
            f"config.batch_size ({config.batch_size}) exceeds "
            f"config.dataset.num_train ({data.num_train}).")

  model = config.model
  require(model.name in MODELS,
           f"config.model.name must be one of {MODELS}; got {model.name!r}.")
  _positive_int(model, "latent_size", "model.")
  _positive_int(model, "hidden_size", "model.")
  require(len(model.channels) == 2 and all(
      isinstance(c, int) and c >= 1 for c in model.channels),
           f"config.model.channels must be two positive integers; got {model.channels!r}.")

  positive(config.optimizer.learning_rate, "optimizer.learning_rate")

  geco = config.geco
  positive(geco.lambda_lr, "geco.lambda_lr")
  positive(geco.lambda_init, "geco.lambda_init")
  require(isinstance(geco.alpha, (int, float)) and 0 <= geco.alpha < 1,
           f"config.geco.alpha must be in [0, 1); got {geco.alpha!r}.")
  for name in ("lambda_min", "lambda_max"):
    if geco[name] is not None:
      positive(geco[name], f"geco.{name}")
  if geco.lambda_min is not None and geco.lambda_max is not None:
    require(geco.lambda_min <= geco.lambda_init <= geco.lambda_max,
             "config.geco needs lambda_min <= lambda_init <= lambda_max; got "
             f"{geco.lambda_min}, {geco.lambda_init}, {geco.lambda_max}.")
  require(geco.dual in DUALS,
           f"config.geco.dual must be one of {DUALS}; got {geco.dual!r}.")
  require(geco.pi_kp >= 0, f"config.geco.pi_kp must be >= 0; got {geco.pi_kp!r}.")

  require(len(config.constraints) >= 1,
           "config.constraints is empty: GECO needs at least one constraint.")
  for name, spec in config.constraints.items():
    require(name in CONSTRAINTS,
             f"config.constraints.{name}: unknown constraint; known: {CONSTRAINTS}.")
    if "lambda_lr" in spec:
      positive(spec.lambda_lr, f"constraints.{name}.lambda_lr")
    tolerance = spec.get("tolerance")
    require(isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool),
             f"config.constraints.{name}.tolerance must be a number; got {tolerance!r}.")
    if name in ("re", "fre", "kl"):
      require(tolerance >= 0,
               f"config.constraints.{name}.tolerance must be >= 0; got {tolerance!r}.")
    elif name == "pncc":
      require(-1 <= tolerance <= 1,
               f"config.constraints.pncc.tolerance must be in [-1, 1]; got {tolerance!r}.")
    elif name == "cla":
      require(0 <= tolerance <= 1,
              f"config.constraints.cla.tolerance must be in [0, 1]; got {tolerance!r}.")
      require(data.name == "mnist",
              "config.constraints.cla needs labelled MNIST (config.dataset.name="
              f"'mnist'), as its classifier is an MNIST classifier; got {data.name!r}.")
      path = spec.get("classifier")
      require(isinstance(path, str) and os.path.isdir(path),
              f"config.constraints.cla.classifier: no trained classifier at {path!r}; "
              f"train one with: {classifier_lib.TRAIN_COMMAND}")


def make_dataset(config: ml_collections.ConfigDict) -> dict:
  """{'train': {'image': ...}, 'test': {'image': ...}} as NumPy arrays.

  Raises:
    ConfigError: the dataset is missing from its source (says where it looked).
  """
  data = config.dataset
  if data.name == "sprites":
    return load_dataset(data.name, source=data.source, num_train=data.num_train,
                        num_test=data.num_test, image_size=data.image_size,
                        seed=config.seed)
  try:
    return load_dataset(data.name, source=data.source, data_dir=data.get("data_dir"))
  except DatasetNotFoundError as e:
    raise ConfigError(" ".join(str(e).split())) from e


def make_model(config: ml_collections.ConfigDict, image_shape):
  return ConvVAE(image_shape=tuple(image_shape), latent_size=config.model.latent_size,
                 channels=tuple(config.model.channels),
                 hidden_size=config.model.hidden_size)


def make_constraint_fn(
    config: ml_collections.ConfigDict) -> Callable[[jnp.ndarray, VAEOutput], dict]:
  """``fn(batch, output) -> {name: batch mean of C}`` for the configured constraints.

  ``batch`` holds ``'image'`` and, for CLA, ``'label'``.
  """
  per_example = {}
  for name, spec in config.constraints.items():
    tolerance = float(spec.tolerance)
    if name == "re":
      per_example[name] = lambda b, out, t=tolerance: constraints_lib.reconstruction_error(
          b["image"], out.reconstruction, t)
    elif name == "fre":
      features = functools.partial(constraints_lib.local_image_statistics,
                                   patch_size=spec.get("patch_size", 4),
                                   stride=spec.get("stride", 2))
      per_example[name] = lambda b, out, t=tolerance, f=features: (
          constraints_lib.feature_reconstruction_error(b["image"], out.reconstruction,
                                                       t, f))
    elif name == "pncc":
      per_example[name] = lambda b, out, t=tolerance, s=spec: (
          constraints_lib.patch_normalized_cross_correlation(
              b["image"], out.reconstruction, t, patch_size=s.get("patch_size", 5),
              stride=s.get("stride", 2)))
    elif name == "kl":
      per_example[name] = lambda b, out, t=tolerance: constraints_lib.kl_divergence(
          out.kl, t)
    elif name == "cla":
      classifier = classifier_lib.load_probability_fn(spec.classifier)
      per_example[name] = lambda b, out, t=tolerance, c=classifier: (
          constraints_lib.classification_accuracy(out.reconstruction, b["label"], t, c))

  def constraint_fn(batch, output: VAEOutput) -> dict:
    return {name: jnp.mean(fn(batch, output)) for name, fn in per_example.items()}

  return constraint_fn


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """GECO's Lagrange state chained with Adam on the model parameters."""
  geco = config.geco
  names = list(config.constraints.keys())
  kwargs = dict(alpha=geco.alpha,
                lambda_init={name: float(geco.lambda_init) for name in names},
                lambda_min=geco.lambda_min, lambda_max=geco.lambda_max)
  if geco.dual == "pi":
    kwargs["dual_optimizer"] = geco_jax.dual.pi(geco.lambda_lr, kp=geco.pi_kp)
  else:
    # One step size per constraint: each constraint's own units set its scale
    # (RE sums squared pixel errors, CLA is a probability).
    kwargs["lambda_lr"] = {
        name: float(config.constraints[name].get("lambda_lr", geco.lambda_lr))
        for name in names}
  return optax.chain(geco_jax.geco(**kwargs),
                     optax.adam(config.optimizer.learning_rate))
