"""From a config to library objects: validation, data, model, objective, optimiser.

The library (``geco_jax``) never reads configs; this module is where config
fields become arguments. Every problem with a config is a ``ConfigError``
raised here, before anything is compiled, so ``experiments.main`` can report
it in one line and exit with status 2. Every field and its default is in
``configs/base.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import geco_jax
from configs import base as base_config
from geco_jax import constraints as constraints_lib
from geco_jax import objectives
from geco_jax.data import DATASET_SOURCES
from geco_jax.data import DatasetNotFoundError
from geco_jax.data import load_dataset
from geco_jax.models import classifier as classifier_lib
from geco_jax.models import ConditionalConvDraw
from geco_jax.models import ConvDraw
from geco_jax.models import ConvVAE
from geco_jax.models import VAENVP
from geco_jax.models import VAEOutput
from geco_jax.models import conv_vae as conv_vae_lib
from geco_jax.models import convdraw as convdraw_lib
from geco_jax.models import vae_nvp as vae_nvp_lib
from geco_jax.ops import onednn

# Image datasets (the 2-D mixtures are for geco_jax.theory, not for VAEs).
SOURCES = {name: sources for name, sources in DATASET_SOURCES.items()
           if not name.startswith("mixture_of_")}
DATASETS = tuple(SOURCES)
# Their examples are (context images, target image): conditional models only.
CONDITIONAL_DATASETS = ("mnist_sum", "mnist_sum_hard", "mnist_rotate")
# Datasets with one class label per image ('label'), as CLA needs.
LABELLED_DATASETS = ("mnist", "fashion_mnist", "cifar10", "micro_mnist")
# Read from files as they are; the others are derived from them or generated,
# drawn from the dataset's seed.
STORED_DATASETS = ("mnist", "fashion_mnist", "cifar10", "celeb_a")

MODEL_CLASSES = {"conv_vae": ConvVAE, "convdraw": ConvDraw,
                 "conditional_convdraw": ConditionalConvDraw, "vae_nvp": VAENVP}
MODELS = tuple(MODEL_CLASSES)
# config.model.convolutions: the model's library values, or 'auto', which
# make_model resolves on the machine it runs on (the model's
# choose_convolutions: oneDNN's on one CPU device where it is available, else
# 'xla'). ConvDraw's: 'onednn_winograd'; the conv VAE's and VAE+NVP's: 'onednn'.
MODEL_CONVOLUTIONS = {
    "convdraw": ("auto", *convdraw_lib.CONVOLUTIONS),
    "conditional_convdraw": ("auto", *convdraw_lib.CONVOLUTIONS),
    "conv_vae": ("auto", *conv_vae_lib.CONVOLUTIONS),
    "vae_nvp": ("auto", *conv_vae_lib.CONVOLUTIONS)}
_CHOOSE_CONVOLUTIONS = {
    "convdraw": convdraw_lib.choose_convolutions,
    "conditional_convdraw": convdraw_lib.choose_convolutions,
    "conv_vae": conv_vae_lib.choose_convolutions,
    "vae_nvp": conv_vae_lib.choose_convolutions}
VAE_NVP_PRESETS = {"cpu": vae_nvp_lib.CPU_PRESET,
                   "accelerator": vae_nvp_lib.ACCELERATOR_PRESET,
                   "micro_mnist": vae_nvp_lib.MICRO_MNIST_PRESET}
OBJECTIVES = ("geco", "elbo", "elbo_annealed")
DUALS = ("sgd", "pi")
# What GECO minimises (config.geco.minimise): the paper's KL, or the squared
# error under a KL constraint (the rate-constrained form).
GECO_OBJECTIVES = ("kl", "squared_error")
MAX_TOLERANCE = 1e6
# Where the periodic evaluation and best_feasible look (config.eval_split).
EVAL_SPLITS = ("test", "validation")
CONSTRAINTS = ("re", "fre", "pncc", "kl", "cla")
# The fields each constraint's section may hold (make_constraint_fn reads them).
CONSTRAINT_FIELDS = {
    "re": ("tolerance", "lambda_lr"),
    "fre": ("tolerance", "lambda_lr", "features", "classifier", "patch_size", "stride"),
    "pncc": ("tolerance", "lambda_lr", "patch_size", "stride"),
    "kl": ("tolerance", "lambda_lr"),
    "cla": ("tolerance", "lambda_lr", "classifier"),
}
# FRE's feature maps: patch means and stds, or a trained classifier's penultimate layer.
FRE_FEATURES = ("local_statistics", "classifier")
# Sections whose keys depend on the chosen model / dataset / constraints.
_OPEN_SECTIONS = ("model", "dataset", "constraints")


class ConfigError(ValueError):
  """A config that cannot be run; the message says which field and why."""


def require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(config, name: str, prefix: str = "") -> None:
  value = config[name]
  require(_is_int(value) and value >= 1,
          f"config.{prefix}{name} must be a positive integer; got {value!r}.")


def positive(value, name: str) -> None:
  require(isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0,
          f"config.{name} must be a positive number; got {value!r}.")


def _unknown_keys(config, reference, prefix: str = "") -> None:
  for key in config.keys():
    path = f"{prefix}{key}"
    require(key in reference,
            f"config.{path}: unknown field; known fields here: "
            f"{sorted(reference.keys())} (configs/base.py lists every field).")
    if isinstance(reference[key], ml_collections.ConfigDict) and key not in _OPEN_SECTIONS:
      require(isinstance(config[key], ml_collections.ConfigDict),
              f"config.{path} must be a section (ConfigDict); got {config[key]!r}.")
      _unknown_keys(config[key], reference[key], path + ".")


def model_kwargs(config: ml_collections.ConfigDict, image_shape) -> dict[str, Any]:
  """The model's constructor arguments: its preset, then the config's overrides."""
  model = config.model
  cls = MODEL_CLASSES[model.name]
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  preset = model.get("preset")
  if model.name in ("convdraw", "conditional_convdraw"):
    require(preset in convdraw_lib.PRESETS,
            f"config.model.preset must be one of {sorted(convdraw_lib.PRESETS)} for "
            f"{model.name}; got {preset!r}.")
    kwargs = convdraw_lib.convdraw_preset(
        preset, conditional=model.name == "conditional_convdraw")
  elif model.name == "vae_nvp":
    require(preset in VAE_NVP_PRESETS,
            f"config.model.preset must be one of {sorted(VAE_NVP_PRESETS)} for vae_nvp;"
            f" got {preset!r}.")
    kwargs = dict(VAE_NVP_PRESETS[preset])
  else:
    require(preset is None, f"config.model.preset: conv_vae has no presets; got {preset!r}.")
    kwargs = {}
  for key, value in model.items():
    if key in ("name", "preset"):
      continue
    require(key in fields and key != "image_shape",
            f"config.model.{key}: {cls.__name__} has no such argument; its arguments "
            f"are {sorted(fields - {'image_shape'})}.")
    kwargs[key] = tuple(value) if isinstance(value, (list, tuple)) else value
  kwargs["image_shape"] = tuple(int(s) for s in image_shape)
  return kwargs


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raise ``ConfigError`` for the first field that makes no sense.

  Checks what can be checked without data: known keys, types and ranges, and
  that the model can serve the dataset and the constraints (CLA needs
  labels; context-target datasets need a conditional model and vice versa).
  ``check_data`` checks the rest once the data is loaded.
  """
  _unknown_keys(config, base_config.get_config())
  require(_is_int(config.seed) and config.seed >= 0,
          f"config.seed must be an integer >= 0; got {config.seed!r}.")
  for name in ("batch_size", "num_steps", "log_every", "image_every", "eval_every",
               "checkpoint_every", "max_checkpoints_to_keep", "num_image_samples",
               "max_consecutive_nonfinite"):
    _positive_int(config, name)
  if config.eval_num_examples is not None:
    _positive_int(config, "eval_num_examples")
  require(config.eval_split in EVAL_SPLITS,
          f"config.eval_split must be one of {EVAL_SPLITS}; got {config.eval_split!r}.")
  require(isinstance(config.distributed, bool),
          f"config.distributed must be True or False; got {config.distributed!r}.")
  require(isinstance(config.data_on_device, bool),
          f"config.data_on_device must be True or False; got {config.data_on_device!r}.")
  require(not (config.data_on_device and config.distributed),
          "config.data_on_device serves one process; with config.distributed each "
          "process reads its part of the batch on the host: set one of them to False.")
  require(isinstance(config.xla_flags, str)
          and all(f.startswith("--xla_") for f in config.xla_flags.split()),
          "config.xla_flags must be a string of --xla_... flags separated by spaces; "
          f"got {config.xla_flags!r}.")

  data = config.dataset
  require(data.name in DATASETS,
          f"config.dataset.name must be one of {DATASETS}; got {data.name!r}.")
  require(data.source in SOURCES[data.name],
          f"config.dataset.source must be one of {SOURCES[data.name]} for "
          f"{data.name}; got {data.source!r}.")
  for name in ("num_train", "num_test"):
    if data.get(name) is not None:
      _positive_int(data, name, "dataset.")
  if data.get("seed") is not None:
    require(_is_int(data.seed) and data.seed >= 0,
            f"config.dataset.seed must be an integer >= 0 or None; got {data.seed!r}.")
  num_validation = data.get("num_validation", 0)
  require(_is_int(num_validation) and num_validation >= 0,
          f"config.dataset.num_validation must be an integer >= 0; got {num_validation!r}.")
  require(not (num_validation and data.name == "micro_mnist"),
          "config.dataset.num_validation: micro_mnist's test split is its training split "
          "(its few images), so nothing can be held out of it.")
  require(config.eval_split != "validation" or num_validation > 0,
          "config.eval_split='validation' needs config.dataset.num_validation > 0 "
          "(the training examples held out for it).")
  if data.name == "sprites":
    size = data.get("image_size", 28)
    require(_is_int(size) and size >= 8 and size % 4 == 0,
            f"config.dataset.image_size must be a multiple of 4, at least 8; got {size!r}.")

  model = config.model
  require(model.name in MODELS,
          f"config.model.name must be one of {MODELS}; got {model.name!r}.")
  model_kwargs(config, (28, 28, 1))  # names and presets; shapes in check_data
  if "convolutions" in model:
    allowed = MODEL_CONVOLUTIONS[model.name]
    require(model.convolutions in allowed,
            f"config.model.convolutions must be one of {allowed} for {model.name}; "
            f"got {model.convolutions!r}.")
    if model.convolutions not in ("xla", "auto"):   # 'onednn', 'onednn_winograd'
      try:
        onednn.check_installed()   # JAX's backend is checked in check_data
      except onednn.OneDNNUnavailable as e:
        raise ConfigError(f"config.model.convolutions={model.convolutions!r}: {e}") from e
  if model.name == "conv_vae":
    for name in ("latent_size", "hidden_size"):
      if name in model:
        _positive_int(model, name, "model.")
    if "channels" in model:
      require(len(model.channels) == 2 and all(
          _is_int(c) and c >= 1 for c in model.channels),
              f"config.model.channels must be two positive integers; got {model.channels!r}.")
  conditional_data = data.name in CONDITIONAL_DATASETS
  conditional_model = model.name == "conditional_convdraw"
  require(conditional_data == conditional_model,
          f"config.model.name={model.name!r} cannot model config.dataset.name="
          f"{data.name!r}: " + (
              "its examples are (context, target) pairs; use "
              "model.name='conditional_convdraw'." if conditional_data else
              "conditional_convdraw needs a (context, target) dataset, one of "
              f"{CONDITIONAL_DATASETS}."))

  positive(config.optimizer.learning_rate, "optimizer.learning_rate")
  require(config.objective in OBJECTIVES,
          f"config.objective must be one of {OBJECTIVES}; got {config.objective!r}.")
  elbo = config.elbo
  for name in ("sigma", "sigma_start", "sigma_end"):
    positive(elbo[name], f"elbo.{name}")
  require(isinstance(elbo.learn_sigma, bool),
          f"config.elbo.learn_sigma must be True or False; got {elbo.learn_sigma!r}.")
  _positive_int(elbo, "anneal_steps", "elbo.")

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
  require(isinstance(geco.pi_kp, (int, float)) and not isinstance(geco.pi_kp, bool)
          and math.isfinite(geco.pi_kp) and geco.pi_kp >= 0,
          f"config.geco.pi_kp must be finite and >= 0; got {geco.pi_kp!r}.")

  require(config.objective != "geco" or len(config.constraints) >= 1,
          "config.constraints is empty: GECO needs at least one constraint.")
  require(geco.minimise in GECO_OBJECTIVES,
          f"config.geco.minimise must be one of {GECO_OBJECTIVES}; got {geco.minimise!r}.")
  if config.objective == "geco" and geco.minimise == "kl":
    require(set(config.constraints.keys()) != {"kl"},
            "config.constraints has only a KL constraint, and GECO minimises the KL: "
            "nothing would train the decoder. For the rate-constrained form (minimise "
            "the reconstruction error subject to KL <= tolerance) set "
            "config.geco.minimise='squared_error'; or add a reconstruction constraint.")
  if config.objective == "geco" and geco.minimise == "squared_error":
    require("kl" in config.constraints,
            "config.geco.minimise='squared_error' minimises the reconstruction error "
            "subject to a bound on the KL: add config.constraints.kl with its "
            "tolerance in nats (without it nothing keeps the KL from growing).")
    require("re" not in config.constraints,
            "config.geco.minimise='squared_error' already minimises the squared error: "
            "an RE constraint on it as well would be redundant; remove "
            "config.constraints.re.")
  for name, spec in config.constraints.items():
    require(name in CONSTRAINTS,
            f"config.constraints.{name}: unknown constraint; known: {CONSTRAINTS}.")
    require(isinstance(spec, ml_collections.ConfigDict),
            f"config.constraints.{name} must be a section with a tolerance; got {spec!r}.")
    unknown = sorted(set(spec.keys()) - set(CONSTRAINT_FIELDS[name]))
    require(not unknown,
            f"config.constraints.{name}: unknown field(s) {unknown}; known: "
            f"{list(CONSTRAINT_FIELDS[name])}.")
    for field in ("patch_size", "stride"):
      if field in spec:
        value = spec[field]
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"config.constraints.{name}.{field} must be an integer >= 1; got {value!r}.")
    if "lambda_lr" in spec:
      positive(spec.lambda_lr, f"constraints.{name}.lambda_lr")
    tolerance = spec.get("tolerance")
    require(isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool),
            f"config.constraints.{name}.tolerance must be a number; got {tolerance!r}.")
    # Beyond this, D * tolerance^2 (RE, FRE) overflows float32 on large images;
    # no meaningful tolerance (an RMSE, nats, a correlation) comes near it.
    require(math.isfinite(tolerance) and abs(tolerance) <= MAX_TOLERANCE,
            f"config.constraints.{name}.tolerance must be finite and at most "
            f"{MAX_TOLERANCE:g} in size; got {tolerance!r}.")
    # A tolerance that only a perfect reconstruction meets (an error of 0, a
    # correlation or a probability of 1) is never met: the multiplier would
    # only grow, to geco.lambda_max, and GECO would be a plain auto-encoder.
    never_met = ("; a tolerance that only a perfect reconstruction meets is never met, "
                 "and the multiplier would only grow (to geco.lambda_max)")
    if name in ("re", "fre"):
      require(tolerance > 0,
              f"config.constraints.{name}.tolerance must be > 0 (an RMSE); got "
              f"{tolerance!r}{never_met if tolerance == 0 else ''}.")
    elif name == "kl":
      require(tolerance >= 0,
              f"config.constraints.kl.tolerance must be >= 0 (nats); got {tolerance!r}.")
    elif name == "pncc":
      require(-1 <= tolerance < 1,
              f"config.constraints.pncc.tolerance must be in [-1, 1) (a mean "
              f"correlation); got {tolerance!r}{never_met if tolerance == 1 else ''}.")
    if name == "fre":
      features = spec.get("features", "local_statistics")
      require(features in FRE_FEATURES,
              f"config.constraints.fre.features must be one of {FRE_FEATURES}; got "
              f"{features!r}.")
      if features == "classifier":
        path = spec.get("classifier")
        require(isinstance(path, str) and os.path.isdir(path),
                f"config.constraints.fre.classifier: no trained classifier at {path!r}; "
                f"train one with: {classifier_lib.CIFAR10_TRAIN_COMMAND}")
    elif name == "cla":
      require(0 <= tolerance < 1,
              f"config.constraints.cla.tolerance must be in [0, 1) (a probability); got "
              f"{tolerance!r}{never_met if tolerance == 1 else ''}.")
      require(data.name in ("mnist", "micro_mnist"),
              "config.constraints.cla needs labelled MNIST (config.dataset.name "
              "'mnist' or 'micro_mnist'), as its classifier is an "
              f"MNIST classifier; got {data.name!r}.")
      path = spec.get("classifier")
      require(isinstance(path, str) and os.path.isdir(path),
              f"config.constraints.cla.classifier: no trained classifier at {path!r}; "
              f"train one with: {classifier_lib.TRAIN_COMMAND}")


def _example_keys(split: dict) -> dict[str, np.ndarray]:
  """The parts of an example a model reads, named alike for every dataset."""
  if "target" in split:  # (context, target) datasets
    return {"image": split["target"], "context": split["context"]}
  out = {"image": split["image"]}
  if "label" in split:
    out["label"] = split["label"]
  elif "labels" in split and np.ndim(split["labels"]) == 1:  # micro_mnist
    out["label"] = split["labels"]
  return out


def make_dataset(config: ml_collections.ConfigDict) -> dict:
  """{'train': {'image', ...}, 'test': {...}} as NumPy arrays, checked.

  With ``config.dataset.num_validation`` = n > 0, the last n training examples
  (after ``num_train``) are a third split, 'validation', and not trained on.

  Every split has 'image' (the image to model: the target of a context-target
  dataset), and 'context' or 'label' where the dataset has them.

  Raises:
    ConfigError: the dataset is missing from its source (says where it
      looked), or it does not fit the config (``check_data``).
  """
  data = config.dataset
  options = {key: value for key, value in data.items()
             if key not in ("name", "source", "data_dir", "num_train", "num_test",
                            "num_validation", "seed")}
  seed = config.seed if data.get("seed") is None else data.seed
  kwargs = dict(source=data.source, seed=seed, num_train=data.get("num_train"),
                num_test=data.get("num_test"), **options)
  if data.source != "generated":
    kwargs["data_dir"] = data.get("data_dir")
  if data.name in STORED_DATASETS:
    kwargs.pop("num_train"), kwargs.pop("num_test"), kwargs.pop("seed")
  try:
    splits = load_dataset(data.name, **kwargs)
  except DatasetNotFoundError as e:
    raise ConfigError(" ".join(str(e).split())) from e
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.dataset: {e}") from e
  if data.name in STORED_DATASETS:
    for split, key in (("train", "num_train"), ("test", "num_test")):
      if data.get(key) is not None:  # the first examples, for quick runs
        splits[split] = {k: v[:data[key]] for k, v in splits[split].items()}
  num_validation = data.get("num_validation", 0)
  if num_validation:
    num_train = len(splits["train"]["image"])
    require(num_validation < num_train,
            f"config.dataset.num_validation ({num_validation}) must leave training "
            f"examples: {data.name}'s training split has {num_train}.")
    # The last examples: the training set keeps its order and its first examples.
    train = splits["train"]
    splits["validation"] = {k: v[num_train - num_validation:] for k, v in train.items()}
    splits["train"] = {k: v[:num_train - num_validation] for k, v in train.items()}
  splits = {split: _example_keys(arrays) for split, arrays in splits.items()}
  check_data(config, splits)
  return splits


def check_data(config: ml_collections.ConfigDict, data: dict) -> None:
  """The checks that need the data's shapes; ``ConfigError`` if one fails."""
  train = data["train"]
  num_train = len(train["image"])
  held_out = config.dataset.get("num_validation") or 0
  require(config.batch_size <= num_train,
          f"config.batch_size ({config.batch_size}) exceeds the {num_train} training "
          f"examples of {config.dataset.name}"
          + (f" left after holding out config.dataset.num_validation={held_out}."
             if held_out else "."))
  devices = jax.device_count()
  require(config.batch_size % devices == 0,
          f"config.batch_size ({config.batch_size}) must be divisible by the number of "
          f"devices ({devices}): the global batch is split evenly over them.")
  convolutions = config.model.get("convolutions", "xla")
  if convolutions not in ("xla", "auto"):   # 'onednn', 'onednn_winograd'
    try:
      onednn.require()   # the CPU backend, and the handlers built
    except onednn.OneDNNUnavailable as e:
      raise ConfigError(f"config.model.convolutions={convolutions!r}: {e}") from e
    require(devices == 1,
            f"config.model.convolutions={convolutions!r} runs on one CPU device; here are {devices}, "
            "over which XLA would not split its calls (every device would convolve the "
            "whole batch): use convolutions='xla'.")
  height, width = train["image"].shape[1:3]
  multiple = 2 if config.model.name in ("convdraw", "conditional_convdraw") else 4
  require(height % multiple == 0 and width % multiple == 0,
          f"config.model.name={config.model.name!r} needs image sides divisible by "
          f"{multiple}; {config.dataset.name} has {height}x{width}.")
  if "cla" in config.constraints:
    require("label" in train,
            f"config.constraints.cla needs class labels; {config.dataset.name} has none.")
  for name in ("cla", "fre"):
    spec = config.constraints.get(name)
    if spec is None or (name == "fre" and spec.get("features") != "classifier"):
      continue
    try:
      _, metadata = classifier_lib.load_classifier(spec.classifier)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"config.constraints.{name}.classifier: "
                        + " ".join(str(e).split())) from e
    expected = tuple(classifier_lib.model_from_metadata(metadata).input_shape)
    require(tuple(train["image"].shape[1:]) == expected,
            f"config.constraints.{name}.classifier takes {expected} images; "
            f"{config.dataset.name} has {tuple(train['image'].shape[1:])}.")


# Workdir ------------------------------------------------------------------- #

def _run_identity(config: dict) -> dict[str, Any]:
  """What a run's checkpoints are tied to: the fields that shape its state.

  Not ``model.convolutions``: XLA's and oneDNN's convolutions share the parameters.
  """
  model = config.get("model")
  if isinstance(model, dict):
    model = {k: v for k, v in model.items() if k != "convolutions"}
  identity = {"model": model,
              "dataset.name": (config.get("dataset") or {}).get("name"),
              "dataset.image_size": (config.get("dataset") or {}).get("image_size"),
              "objective": config.get("objective"),
              "elbo.learn_sigma": (config.get("elbo") or {}).get("learn_sigma"),
              "constraints": sorted(config.get("constraints") or {})}
  if "seed" in config:
    # The initialisation and the order of the batches come from it: a run
    # resumed with another seed would not be the run its first steps began.
    identity["seed"] = config["seed"]
  data = config.get("dataset") or {}
  dataset_seed = config.get("seed") if data.get("seed") is None else data["seed"]
  if data.get("name") not in STORED_DATASETS:
    # A derived or generated dataset is drawn from its seed: another would be
    # other training examples.
    identity["dataset seed"] = dataset_seed
  if config.get("objective") == "geco":
    # The dual optimiser's state is part of GECO's (runs from before the
    # field existed used Algorithm 1's SGD).
    identity["geco.dual"] = (config.get("geco") or {}).get("dual", "sgd")
    # The loss's first term (runs from before the field existed minimised the KL).
    identity["geco.minimise"] = (config.get("geco") or {}).get("minimise", "kl")
  num_validation = data.get("num_validation") or 0
  if num_validation:
    # Which examples are held out (the last num_validation of the first
    # num_train, drawn from the dataset's seed): resuming with others would
    # evaluate on examples the run has trained on. (Runs from before the field
    # existed held none out, and have no such entry.)
    identity["held-out validation examples"] = {
        "dataset.num_validation": num_validation, "dataset.num_train": data.get("num_train"),
        "dataset seed": dataset_seed}
  return identity


def prepare_workdir(workdir) -> None:
  """Creates ``workdir`` (and its parents) and checks that it can be written.

  Raises:
    ConfigError: it is a file, lies under one, or cannot be created or written.
  """
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_probe.{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    reason = e.strerror or type(e).__name__
    raise ConfigError(f"--workdir {workdir} cannot be used: {reason} "
                      f"({e.filename or workdir}).") from None


def check_workdir_usable(workdir) -> None:
  """What ``prepare_workdir`` would refuse, found without writing anything.

  For a command line to fail in its first second rather than after loading
  data and building the model; ``prepare_workdir`` still checks by writing.

  Raises:
    ConfigError: ``workdir`` is a file or lies under one, or the directory it
      would be made in cannot be written.
  """
  path = pathlib.Path(os.path.abspath(workdir))
  for part in [path, *path.parents]:
    if part.exists():
      if not part.is_dir():
        where = "is a file" if part == path else f"lies under a file, {part}"
        raise ConfigError(f"--workdir {workdir} cannot be used: it {where}.")
      if not os.access(part, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir} cannot be used: Permission denied "
                          f"({part}).")
      return


def check_workdir_matches(config: ml_collections.ConfigDict, workdir) -> None:
  """Refuses a workdir whose checkpoints belong to a run of another model.

  A resumed run may change anything else (its length, logging, learning rates,
  tolerances); a different model, dataset, objective, set of constraints or
  GECO dual optimiser would not restore its checkpoints (refused here, before
  anything is read or written, rather than found out when restoring). Nor may
  it change ``config.seed`` (its initialisation and the order of its batches)
  or, for a derived or generated dataset, ``dataset.seed`` (its examples): the
  checkpoints would restore, but the rest of the run would not continue the
  one they come from. A run
  with a validation split (``dataset.num_validation``) may not change which
  examples it holds out, nor start or stop holding some out: it would then
  evaluate on examples it has trained on.

  Raises:
    ConfigError: naming each differing field.
  """
  workdir = pathlib.Path(workdir)
  stored_path = workdir / "config.json"
  checkpoints = workdir / "checkpoints"
  if not stored_path.exists() or not checkpoints.exists() or not any(
      p.name.isdigit() for p in checkpoints.iterdir()):
    return
  try:
    stored = _run_identity(json.loads(stored_path.read_text()))
  except ValueError as e:
    raise ConfigError(
        f"{stored_path} is not valid JSON ({e}); it records the run whose checkpoints "
        f"are in {checkpoints}. Restore it, or use another --workdir.") from None
  wanted = _run_identity(json.loads(config.to_json_best_effort()))
  differ = [f"{key}: {stored.get(key, 'none')} there, {wanted.get(key, 'none')} here"
            for key in dict.fromkeys([*stored, *wanted])
            if stored.get(key) != wanted.get(key)]
  if differ:
    raise ConfigError(
        f"{workdir} holds checkpoints of another run ({'; '.join(differ)}); they would not "
        "restore into this config, or (held-out examples) it would evaluate on examples "
        "it trained on, or (seeds) it would go on from them with other batches or other "
        "examples. Use another --workdir, or move that run away.")


# Model --------------------------------------------------------------------- #

def make_model(config: ml_collections.ConfigDict, image_shape, num_devices=None):
  """The configured model (a Flax module) for images of ``image_shape``.

  ``convolutions='auto'`` becomes the model's ``choose_convolutions(num_devices)``
  here (``convdraw``'s or ``conv_vae``'s; ``num_devices``: those the step runs on,
  default all), and the choice is logged.
  """
  kwargs = model_kwargs(config, image_shape)
  if kwargs.get("convolutions") == "auto":
    kwargs["convolutions"], why = _CHOOSE_CONVOLUTIONS[config.model.name](num_devices)
    logging.info("config.model.convolutions='auto': %r (%s).", kwargs["convolutions"], why)
  return MODEL_CLASSES[config.model.name](**kwargs)


def is_conditional(model) -> bool:
  return isinstance(model, ConditionalConvDraw)


def init_model(model, rng, batch: dict):
  """The model's variables, from one example of ``batch`` (no training data seen)."""
  init_rng, sample_rng = jax.random.split(rng)
  inputs = {key: jnp.asarray(value[:1]) for key, value in batch.items()}
  return model.init(init_rng, *_model_args(model, inputs, sample_rng))


def _model_args(model, batch: dict, rng):
  if is_conditional(model):
    return batch["image"], rng, batch["context"]
  return batch["image"], rng


def apply_model(model, variables, batch: dict, rng) -> VAEOutput:
  """``VAEOutput`` of any model on a batch ({'image'} or {'image', 'context'})."""
  return model.apply(variables, *_model_args(model, batch, rng))


def sample_model(model, variables, rng, num_samples: int, batch: dict):
  """Prior samples: ``num_samples`` of them, or one per context row of ``batch``."""
  if is_conditional(model):
    return model.apply(variables, rng, jnp.asarray(batch["context"][:num_samples]),
                       method=model.sample)
  return model.apply(variables, rng, num_samples, method=model.sample)


# Objective and constraints -------------------------------------------------- #

def make_constraint_fn(
    config: ml_collections.ConfigDict) -> Callable[[dict, VAEOutput], dict]:
  """``fn(batch, output) -> {name: C per example, [batch]}`` for the constraints.

  ``batch`` holds ``'image'`` and, for CLA, ``'label'``. GECO takes the batch
  mean of each; evaluation averages them over a whole split. No constraints
  give an empty dict.
  """
  per_example = {}
  for name, spec in config.constraints.items():
    tolerance = float(spec.tolerance)
    if name == "re":
      per_example[name] = lambda b, out, t=tolerance: constraints_lib.reconstruction_error(
          b["image"], out.reconstruction, t)
    elif name == "fre":
      if spec.get("features", "local_statistics") == "classifier":
        features = classifier_lib.load_feature_fn(spec.classifier)
      else:
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
    return {name: fn(batch, output) for name, fn in per_example.items()}

  return constraint_fn


def init_likelihood_params(config: ml_collections.ConfigDict) -> dict:
  """Trainable parameters of the objective: log sigma for an ELBO that learns it."""
  if config.objective == "elbo" and config.elbo.learn_sigma:
    return {"log_sigma": jnp.asarray(math.log(config.elbo.sigma), jnp.float32)}
  return {}


def make_loss_fn(config: ml_collections.ConfigDict, constraint_fn):
  """``fn(likelihood_params, batch, output, opt_state, step) -> (loss, metrics)``.

  GECO: ``geco_jax.lagrangian`` of the batch-mean KL (or, with
  ``geco.minimise='squared_error'``, of the batch-mean squared error) and the
  constraints. ELBO:
  the batch mean of ``objectives.negative_elbo`` with a fixed, learned or
  GQN-annealed sigma. Every objective also reports its constraints (for ELBO
  runs: how far from GECO's targets they end).
  """
  objective, elbo = config.objective, config.elbo

  def loss_fn(likelihood, batch, output: VAEOutput, opt_state, step):
    images = batch["image"]
    kl = jnp.mean(output.kl)
    constraint = {k: jnp.mean(v) for k, v in constraint_fn(batch, output).items()}
    metrics = {"kl": kl,
               "gaussian_nll": objectives.optimal_sigma_nll(images, output.reconstruction)}
    if objective == "geco":
      if config.geco.minimise == "squared_error":
        # Rate-constrained: min E||x - g(z)||^2 subject to KL <= tolerance
        # (||x - g||^2 per example is RE's constraint at tolerance 0).
        minimised = jnp.mean(constraints_lib.reconstruction_error(
            images, output.reconstruction, 0.0))
      else:
        minimised = kl  # the paper's GECO: min KL subject to the constraints
      loss = geco_jax.lagrangian(minimised, constraint, opt_state)
    else:
      if objective == "elbo_annealed":
        sigma = objectives.annealed_sigma(step, sigma_start=elbo.sigma_start,
                                          sigma_end=elbo.sigma_end,
                                          num_steps=elbo.anneal_steps)
      elif elbo.learn_sigma:
        sigma = jnp.exp(likelihood["log_sigma"])
      else:
        sigma = jnp.asarray(elbo.sigma, jnp.float32)
      loss = jnp.mean(objectives.negative_elbo(images, output.reconstruction,
                                               output.kl, sigma))
      metrics["sigma"] = sigma
    return loss, (constraint, metrics)

  return loss_fn


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam on the parameters, chained after GECO's Lagrange state for ``geco``."""
  adam = optax.adam(config.optimizer.learning_rate)
  if config.objective != "geco":
    return adam
  geco = config.geco
  names = list(config.constraints.keys())
  kwargs = dict(alpha=geco.alpha,
                lambda_init={name: float(geco.lambda_init) for name in names},
                lambda_min=geco.lambda_min, lambda_max=geco.lambda_max)
  # One step size per constraint, for either dual: each constraint's own units
  # set its scale (RE sums squared pixel errors, CLA is a probability).
  steps = lambda_steps(config)
  logging.info("GECO's multiplier steps (lambda_lr, dual %r): %s.", geco.dual, steps)
  if geco.dual == "pi":
    kwargs["dual_optimizer"] = geco_jax.dual.pi(steps, kp=geco.pi_kp)
  else:
    kwargs["lambda_lr"] = steps
  return optax.chain(geco_jax.geco(**kwargs), adam)


def lambda_steps(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Each constraint's multiplier step size: its own ``lambda_lr``, else ``geco.lambda_lr``."""
  return {name: float(spec.get("lambda_lr", config.geco.lambda_lr))
          for name, spec in config.constraints.items()}
