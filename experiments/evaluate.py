r"""Evaluate a trained run the paper's way; writes ``eval.json`` and image grids.

  python -m experiments.evaluate --workdir runs/default [--checkpoint=best_feasible]

Reads the run's ``config.json`` and its newest checkpoint (or the
``best_feasible`` one), then measures (paper appendix D and section 4):

- ``sigma_star``: one global pixel sigma refitted on (the first
  ``--num_train`` examples of) the training split with everything else
  fixed, sigma*^2 = mean (x - g(z))^2, z ~ q(z|x);
- ``nll``: the sigma-independent NLL on the test split, -log of the 8-bit bin
  of x under N(g(z), sigma*^2) (``geco_jax.metrics.quantized_normal_nll``),
  in nats per example and bits per dimension;
- ``average_kl``: E_x KL(q(z|x) || pi(z)), nats per example (and per latent
  dimension where the latent is a vector);
- ``marginal_kl``: KL(q(z) || pi(z)) of the aggregate posterior of the first
  ``--num_marginal`` test examples, with its Monte Carlo standard error (conv
  VAE, VAE+NVP, and ConvDraw against its learned prior, scoring every pair
  by teacher forcing: N^2 encoder passes, the slowest metric there; not for
  ConditionalConvDraw). Each sample's own posterior stays in the mixture
  (``geco_jax.metrics.marginal_kl``'s default, "keep-all", not leave-one-out):
  unbiased for the N examples' mixture, biased upward, in expectation, as an
  estimate of the population's KL(q(z) || pi(z)) (see its docstring);
- ``rmse`` (the mean over test examples of each one's per-pixel RMSE),
  ``mse`` (the mean squared error over every test pixel, the paper's unit:
  "MSE=0.00029") and ``root_mse`` = sqrt(mse), and each constraint's mean C
  on the test split, in its own units. The RE constraint's mean,
  D (root_mse^2 - kappa^2), is <= 0 exactly when root_mse <= kappa: a test
  set meets an RE target in root_mse, not in rmse (which is smaller, by
  Jensen's inequality, when examples' errors differ). ``train_root_mse``: the
  same over the training images of sigma* (sigma* itself, unclamped), the
  data on which GECO enforces its constraints.

With ``--measure_with=<config file>``, the constraints of that config
(its ``config.constraints``, tolerances included) are also measured on the
test split, as ``measured_constraints`` (mean C per constraint, in the same
units as ``constraints``; <= 0: met): e.g. the pNCC or FRE of a model trained
under RE, for comparing constraints on one scale.

One z per example throughout. Image grids (data, reconstructions, prior
samples) are written as PNGs beside eval.json.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from typing import Any, Optional

import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import cli

# Held-out examples of the aggregate posterior. ConvDraw scores each of the
# N^2 pairs with a T-step encoder pass (``_convdraw_marginal_kl``): for a
# trained mnist_cpu run, N = 500 added about 5.6 minutes to its evaluation on
# the project's quiet 2-core CPU (about 750 pairs/s); the time grows as N^2.
DEFAULT_NUM_MARGINAL = 2000
CONVDRAW_NUM_MARGINAL = 500

CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", ["latest", "best_feasible"],
                                "Which checkpoint of the run to evaluate.")
NUM_TRAIN = flags.DEFINE_integer("num_train", 10000,
                                  "Training examples used to refit sigma* (0: all).",
                                  lower_bound=0)
NUM_TEST = flags.DEFINE_integer("num_test", 0, "Test examples to evaluate (0: all).",
                                lower_bound=0)
MEASURE_WITH = config_flags.DEFINE_config_file(
    "measure_with", None,
    "A config file whose constraints (config.constraints) are measured on the test "
    "split besides the run's own, e.g. configs/convdraw_cifar10_pncc.py; reported "
    "as measured_constraints.", lock_config=True)
NUM_MARGINAL = flags.DEFINE_integer(
    "num_marginal", None,
    "Test examples of the aggregate posterior (marginal KL); 0: no marginal KL. "
    f"Default {DEFAULT_NUM_MARGINAL}, {CONVDRAW_NUM_MARGINAL} for ConvDraw (it scores "
    "N^2 pairs by teacher forcing, about 750 pairs/s for mnist_cpu on the 2-core "
    "CPU).", lower_bound=0)


def load_run_config(workdir: str):
  """The config a run was trained with (``workdir/config.json``).

  A field the run's config.json lacks (it was added to ``configs/base.py``
  after the run, e.g. ``data_on_device``) takes its default there, which is
  what the run did before the field existed.

  Raises:
    FileNotFoundError: ``workdir`` has no config.json.
    setup.ConfigError: its config.json is damaged (not a JSON object).
  """
  import ml_collections
  from etils import epath

  from configs import base

  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} the workdir of a "
                            "run of experiments.main?")

  def merged(defaults: dict, stored: dict) -> dict:
    out = dict(defaults)
    for key, value in stored.items():
      out[key] = (merged(out[key], value) if isinstance(value, dict)
                  and isinstance(out.get(key), dict) else value)
    return out

  from experiments import setup

  try:
    stored = json.loads(path.read_text())
  except ValueError as error:   # truncated or not JSON
    raise setup.ConfigError(f"{path} is not a readable config ({error}); was the "
                            "run's config.json damaged?") from None
  if not isinstance(stored, dict):
    raise setup.ConfigError(f"{path} holds no config (a JSON object); was it damaged?")
  return ml_collections.ConfigDict(merged(base.get_config().to_dict(), stored))


def _batches(arrays: dict, batch_size: int):
  """Fixed-size batches (the last padded by repeating its first row) and sizes."""
  total = len(arrays["image"])
  for start in range(0, total, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
    n = len(batch["image"])
    if n < batch_size:
      batch = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, axis=0)])
               for k, v in batch.items()}
    yield batch, n


def _measured_config(config, measure_constraints: dict):
  """The run's config with ``measure_constraints`` as its constraints, validated."""
  import ml_collections

  from experiments import setup

  measured = ml_collections.ConfigDict(config.to_dict())
  measured.constraints = ml_collections.ConfigDict(measure_constraints)
  # Measured, not trained under: what GECO minimises does not constrain them.
  measured.objective = "elbo"
  setup.require(len(measured.constraints) >= 1,
                "--measure_with: that config has no constraints to measure.")
  setup.validate_config(measured)
  return measured


def evaluate_state(experiment, state, *, num_train: Optional[int] = None,
                   num_test: Optional[int] = None, num_marginal: Optional[int] = None,
                   measure_constraints: Optional[dict] = None,
                   seed: int = 0) -> dict[str, Any]:
  """The paper's metrics of ``state`` (see the module docstring).

  ``measure_constraints``: a ``config.constraints`` section (as a dict) whose
  constraints are measured on the test split too (``measured_constraints``).

  Raises:
    setup.ConfigError: ``measure_constraints`` is not a valid constraints
      section for this run (unknown name, bad tolerance, missing classifier).
  """
  import jax
  import jax.numpy as jnp

  from experiments import setup
  from geco_jax import metrics

  model, config = experiment.model, experiment.config
  measure_fn = None
  if measure_constraints is not None:
    measure_fn = setup.make_constraint_fn(_measured_config(config, measure_constraints))
  params = jax.device_get(state.params)
  batch_size = config.batch_size
  rng = jax.random.PRNGKey(seed)

  # The parameters are arguments, not constants folded into the programs.
  @jax.jit
  def forward(params, batch, rng):
    output = setup.apply_model(model, params["model"], batch, rng)
    return output.reconstruction, output.kl

  @jax.jit
  def test_terms(params, batch, rng, sigma):
    output = setup.apply_model(model, params["model"], batch, rng)
    constraints = experiment.constraint_fn(batch, output)
    return {"nll": metrics.quantized_normal_nll(batch["image"], output.reconstruction,
                                                sigma),
            "kl": output.kl,
            "rmse": metrics.reconstruction_metrics(
                batch["image"], output.reconstruction, sigma)["rmse"],
            "squared_error": jnp.sum(jnp.square(batch["image"] - output.reconstruction)
                                     .reshape(batch["image"].shape[0], -1), axis=1),
            **{f"constraint/{k}": v for k, v in constraints.items()},
            **({f"measured/{k}": v for k, v in measure_fn(batch, output).items()}
               if measure_fn else {})}

  def cut(split, count):
    arrays = experiment.data[split]
    count = len(arrays["image"]) if not count else min(count, len(arrays["image"]))
    return {k: v[:count] for k, v in arrays.items()}

  # sigma* on the training split.
  total_sq, total_values = 0.0, 0
  train = cut("train", num_train)
  for i, (batch, n) in enumerate(_batches(train, batch_size)):
    reconstruction, _ = forward(params, batch, jax.random.fold_in(rng, i))
    sq, count = metrics.squared_error_sum(batch["image"][:n], reconstruction[:n])
    total_sq += float(sq)
    total_values += int(count)
  sigma_star = float(metrics.optimal_sigma(total_sq, total_values))

  # The test split at sigma*.
  test = cut("test", num_test)
  sums: dict[str, float] = {}
  for i, (batch, n) in enumerate(_batches(test, batch_size)):
    terms = jax.device_get(test_terms(params, batch, jax.random.fold_in(rng, 10**6 + i),
                                      sigma_star))
    for key, value in terms.items():
      sums[key] = sums.get(key, 0.0) + float(np.sum(np.asarray(value)[:n]))
  num = len(test["image"])
  means = {key: value / num for key, value in sums.items()}
  num_dims = math.prod(test["image"].shape[1:])
  result: dict[str, Any] = {
      "sigma_star": sigma_star,
      "train_root_mse": math.sqrt(total_sq / total_values),
      "nll": means.pop("nll"),
      "average_kl": means.pop("kl"),
      "rmse": means.pop("rmse"),
      "mse": means.pop("squared_error") / num_dims,
      "constraints": {k[len("constraint/"):]: v for k, v in means.items()
                      if k.startswith("constraint/")},
      "num_train_for_sigma": len(train["image"]),
      "num_test": num,
  }
  if measure_fn:
    result["measured_constraints"] = {k[len("measured/"):]: v for k, v in means.items()
                                      if k.startswith("measured/")}
  result["root_mse"] = math.sqrt(result["mse"])
  result["nll_bits_per_dim"] = result["nll"] / (num_dims * math.log(2.0))
  latent_size = getattr(model, "latent_size", None)
  if isinstance(latent_size, int):
    result["average_kl_per_dim"] = result["average_kl"] / latent_size
  if num_marginal is None:
    from geco_jax.models import ConvDraw
    num_marginal = (CONVDRAW_NUM_MARGINAL if isinstance(model, ConvDraw)
                    else DEFAULT_NUM_MARGINAL)
  result["marginal_kl"] = (
      _marginal_kl(model, params, cut("test", num_marginal),
                   jax.random.fold_in(rng, 2 * 10**6)) if num_marginal else None)
  return result


def _marginal_kl(model, params, arrays, rng) -> Optional[dict[str, float]]:
  import jax.numpy as jnp

  from geco_jax import metrics
  from geco_jax.models import ConvDraw
  from geco_jax.models import ConvVAE
  from geco_jax.models import VAENVP

  images = jnp.asarray(arrays["image"])
  if isinstance(model, ConvVAE):
    mean, log_std = _encoder_fn(model)(params["model"], images)
    estimate = metrics.marginal_kl_gaussian(mean, log_std, rng)
  elif isinstance(model, VAENVP):
    posterior_samples, estimate_fn = _vae_nvp_marginal_kl_fns(model)
    z, own = posterior_samples(params["model"], images, rng)
    estimate = estimate_fn(params["model"], z[:, 0], own[:, 0], images)
  elif isinstance(model, ConvDraw):
    estimate = _convdraw_marginal_kl(model, params["model"], images, rng)
  else:
    return None  # ConditionalConvDraw: the aggregate over (x, context) is not defined here
  kl, error = float(estimate.kl), float(estimate.standard_error)
  result = {"kl": kl, "standard_error": error, "num_examples": int(images.shape[0])}
  if not (math.isfinite(kl) and math.isfinite(error)):
    # Not seen since the self terms come from sampling (marginal_kl's
    # own_log_posterior); if it happens: report it, never a number.
    result.update(kl=None, standard_error=None,
                  note=f"non-finite estimate ({kl}, s.e. {error}): float32 round-off or "
                       "overflow in log q(z|x)")
  return result


@functools.lru_cache(maxsize=8)
def _encoder_fn(model):
  """A conv VAE's compiled ``encode``, the parameters an argument."""
  import jax
  return jax.jit(lambda params, x: model.apply(params, x, method=model.encode))


@functools.lru_cache(maxsize=8)
def _vae_nvp_marginal_kl_fns(model):
  """VAE+NVP's compiled posterior samples and marginal-KL estimate."""
  import jax
  import jax.numpy as jnp

  from geco_jax import metrics

  @jax.jit
  def posterior_samples(params, images, rng):
    return model.apply(params, images, rng, 1, method=model.posterior_samples)

  @jax.jit
  def estimate_fn(params, samples, own, images):
    def log_q(z_block, j_block):
      zz = jnp.broadcast_to(z_block, (j_block.shape[0],) + z_block.shape)
      return model.apply(params, zz, images[j_block], method=model.log_posterior).T
    # Each sample's own term from sampling, not from the inverse flow, which
    # cannot recover posteriors narrower than float32 resolves (marginal_kl).
    owners = jnp.arange(images.shape[0], dtype=jnp.int32)
    return metrics.marginal_kl(samples, log_q, images.shape[0], block_size=256,
                               leave_out=owners, own_log_posterior=own)

  return posterior_samples, estimate_fn


def _convdraw_marginal_kl(model, params, images, rng, batch_size: int = 64,
                          block_size: int = 32):
  """KL(q_N(z_1..T) || p(z_1..T)) of ConvDraw with its learned prior.

  One path z ~ q(z | x_i) per image; log q(z_i | x_j) for all pairs j != i by
  teacher forcing (``ConvDraw.pairwise_log_posterior``: the encoder runs
  once per pair, T steps; the pairs j = i too, but their term comes from the
  drawn noise, ``ConvDrawTrace.log_posterior``), log p(z_i) along each path
  (``log_prior``). Compiled once per model and shapes (``_convdraw_marginal_kl_fns``):
  the parameters are arguments, so the runs of one model share the programs.
  """
  import jax
  import jax.numpy as jnp

  paths, prior, estimate_fn = _convdraw_marginal_kl_fns(model, block_size)
  latents, owns, log_priors = [], [], []
  for start in range(0, images.shape[0], batch_size):
    z, own = paths(params, images[start:start + batch_size],
                   jax.random.fold_in(rng, start))
    latents.append(z)
    owns.append(own)
    log_priors.append(prior(params, z))
  latent, own = jnp.concatenate(latents), jnp.concatenate(owns)
  log_prior = jnp.concatenate(log_priors)
  return estimate_fn(params, latent, own, log_prior, images)


@functools.lru_cache(maxsize=8)
def _convdraw_marginal_kl_fns(model, block_size: int):
  """The compiled parts of ``_convdraw_marginal_kl`` for one ConvDraw (hashable)."""
  import jax
  import jax.numpy as jnp

  from geco_jax import metrics

  scorer = model if model.recurrence == "unrolled" else model.clone(recurrence="unrolled")

  @jax.jit
  def paths(params, x, key):
    trace = scorer.apply(params, x, key, method=scorer.trace)
    return trace.latent, trace.log_posterior

  @jax.jit
  def prior(params, z):
    return scorer.apply(params, z, method=scorer.log_prior)

  @jax.jit
  def estimate_fn(params, latent, own, log_prior, images):
    def log_q(z_block, j_block):
      return scorer.apply(params, z_block, images[j_block],
                          method=scorer.pairwise_log_posterior).T
    # Each path's own term from its drawn noise (marginal_kl's own_log_posterior).
    owners = jnp.arange(images.shape[0], dtype=jnp.int32)
    return metrics.marginal_kl(latent, log_q, images.shape[0],
                               log_prior_fn=lambda z: log_prior, block_size=block_size,
                               leave_out=owners, own_log_posterior=own)

  return paths, prior, estimate_fn


def _first_words(error: Exception, limit: int = 200) -> str:
  """An exception's message on one line, without TensorStore's spec dump."""
  message = " ".join(str(error).split()).split(" See full TensorStore details")[0]
  return message if len(message) <= limit else message[:limit] + "..."


def _settings(checkpoint: str, kwargs) -> dict[str, Any]:
  return {"checkpoint": checkpoint, **kwargs}


def stored_evaluation(workdir: str, step: int, checkpoint: str = "latest",
                      **kwargs) -> Optional[dict[str, Any]]:
  """The run's ``eval.json`` if it evaluated checkpoint ``step`` with these
  settings (``evaluate_run``'s keyword arguments), else None."""
  suffix = "" if checkpoint == "latest" else f"_{checkpoint}"
  path = os.path.join(workdir, f"eval{suffix}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stored = json.load(f)
  if stored.get("step") != step or stored.get("settings") != _settings(checkpoint, kwargs):
    return None
  if "train_root_mse" not in stored:   # written before eval.json had it: evaluate again
    return None
  return stored


def evaluate_run(workdir: str, checkpoint: str = "latest", **kwargs) -> dict[str, Any]:
  """Restore a run's checkpoint and write ``eval.json`` (+ PNG grids) into it."""
  config = load_run_config(workdir)  # first: a wrong workdir fails fast
  if kwargs.get("measure_constraints") is not None:   # and bad constraints, before any work
    _measured_config(config, kwargs["measure_constraints"])
  cli.apply_xla_flags(config)
  import jax
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import orbax.checkpoint as ocp
  from etils import epath

  from experiments import setup
  from experiments import train

  data = setup.make_dataset(config)
  experiment = train.Experiment(config, data, jax.devices()[:1])
  workdir = epath.Path(os.path.abspath(workdir))  # orbax needs absolute paths
  folder = workdir / ("checkpoints" if checkpoint == "latest" else "best_feasible")
  if not folder.is_dir():   # (a CheckpointManager would create it)
    raise FileNotFoundError(f"no checkpoint in {folder}.")
  manager = ocp.CheckpointManager(folder)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {folder}.")
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(experiment.initial_state()))
  except Exception as e:  # pylint: disable=broad-except
    raise train.CheckpointError(
        f"the checkpoint of step {step} in {folder} cannot be restored "
        f"({type(e).__name__}: {_first_words(e)}). Resuming the run "
        "(python -m experiments.main with its workdir) moves a damaged newest "
        "checkpoint aside and goes on from the previous one.") from None
  finally:
    manager.close()
  result = evaluate_state(experiment, state, **kwargs)
  result.update({"workdir": str(workdir), "checkpoint": checkpoint, "step": int(step),
                 "objective": config.objective, "model": config.model.name,
                 "dataset": config.dataset.name,
                 "settings": _settings(checkpoint, kwargs)})
  suffix = "" if checkpoint == "latest" else f"_{checkpoint}"
  for name, grid in experiment.image_grids(state, int(step)).items():
    image = grid[0]
    plt.imsave(workdir / f"eval{suffix}_{name}.png",
               image[..., 0] if image.shape[-1] == 1 else image, cmap="gray",
               vmin=0.0, vmax=1.0)
  # Written whole or not at all: an earlier eval.json is replaced only by a complete one.
  path = workdir / f"eval{suffix}.json"
  temporary = workdir / f".eval{suffix}.json.tmp"
  temporary.write_text(json.dumps(result, indent=1, sort_keys=True))
  os.replace(temporary, path)
  return result


def _measure_constraints() -> Optional[dict]:
  """``--measure_with``'s constraints section, or one line and status 2."""
  config = MEASURE_WITH.value
  if config is None:
    return None
  try:   # config_flags defers a load failure (missing file, broken module) to here
    return config.constraints.to_dict()
  except Exception as e:  # pylint: disable=broad-except
    cli.fail(f"could not load the constraints of --measure_with: {type(e).__name__}: "
             + " ".join(str(e.__cause__ or e).split()))


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  from experiments import setup
  from experiments import train
  cli.quiet_library_logs()
  try:
    kwargs = dict(num_train=NUM_TRAIN.value, num_test=NUM_TEST.value,
                  num_marginal=NUM_MARGINAL.value)
    measure = _measure_constraints()
    if measure is not None:
      kwargs["measure_constraints"] = measure
    result = evaluate_run(cli.WORKDIR.value, CHECKPOINT.value, **kwargs)
  except (FileNotFoundError, setup.ConfigError) as e:
    cli.fail(" ".join(str(e).split()))
  except train.CheckpointError as e:
    cli.fail(" ".join(str(e).split()), abandon_threads=True)
  print("eval: " + json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
  cli.require("workdir")
  cli.run(main)
