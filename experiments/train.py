"""The training loop: data-parallel compiled steps, clu logging, orbax checkpoints.

One ``train_step`` is compiled once with ``jax.jit`` over a 1-D device mesh
(axis ``'data'``): the global batch is split over every device of every
process, parameters and optimiser state (GECO's Lagrange state included) are
replicated, and batch means (the KL, each constraint) are global means, so the
multiplier is the same on every device by construction. The state's buffers
are donated to the step. Metrics stay on the devices and are fetched every
``log_every`` steps.

Survival:
- checkpoints every ``checkpoint_every`` steps and at the end (the newest
  ``max_checkpoints_to_keep`` kept); a run started again in the same workdir
  resumes from the newest one (parameters, optimiser and Lagrange state, RNG;
  the data stream is a pure function of the step);
- a newest checkpoint that cannot be restored is reported, moved to
  ``workdir/corrupt_checkpoints/`` (nothing is deleted) and the previous one
  is used;
- SIGTERM or Ctrl-C: the step in flight finishes, a checkpoint is written,
  logs are flushed and the run returns normally (exit status 0);
- a non-finite loss or gradient skips the update (parameters and optimiser
  state unchanged; counted and logged as ``nonfinite_steps``); after
  ``max_consecutive_nonfinite`` in a row (checked when metrics are fetched)
  the run stops with ``FloatingPointError`` naming the step and the last
  finite values. Skipped updates never change the state, and a state is
  checked finite before it is written, so no NaN reaches a checkpoint;
- ``best_feasible``: at each evaluation, if every constraint holds on the
  evaluation set (mean C <= 0) and the KL (or, with
  ``geco.minimise='squared_error'``, the squared error) is the lowest seen so
  far, that state is kept in ``workdir/best_feasible`` with ``best_feasible.json``.
  The evaluation set is ``config.eval_split``: the test split by default, or
  the training examples held out by ``config.dataset.num_validation``
  ("validation"), so that the state is not chosen on the test set that
  ``experiments.evaluate`` then reports it on;
- ``workdir/seconds.json`` adds up the wall seconds of every call in the
  workdir (the summary's ``total_seconds``; ``seconds`` is this call's).

Multi-host: with ``config.distributed`` the entry point calls
``jax.distributed.initialize()``; each process reads its part of every global
batch, and only process 0 writes logs and the best_feasible record (orbax
coordinates the checkpoint itself).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

import geco_jax
from experiments import cli
from experiments import setup
from geco_jax.constraints import per_pixel_rmse
from geco_jax.data import DeviceEpochBatcher
from geco_jax.data import EpochBatcher
from geco_jax.data import Prefetcher


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the GECO state is in ``opt_state``.

  ``params`` is ``{'model': the model's variables, 'likelihood': the
  objective's own parameters (log sigma of an ELBO that learns it, else {})}``.
  """

  step: jax.Array
  params: Any
  opt_state: optax.OptState
  rng: jax.Array
  nonfinite_steps: jax.Array    # updates skipped so far
  nonfinite_streak: jax.Array   # ... of them in a row, up to this step


# ---------------------------------------------------------------- helpers ---

def _image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
  """[N, H, W, C] -> one [1, rows*H, columns*W, C] image with a 1-pixel border."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.float32)
  for i in range(n):
    r, k = divmod(i, columns)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = images[i]
  return grid[None]


def _flatten(config, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, bool)) else str(value)
  return flat


def to_host(tree):
  """Replicated (or single-device) arrays to NumPy, also when not fully addressable."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array)
      else np.asarray(x), tree)


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh, axis ``'data'``, over ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), ("data",))


def _device_batch(batch: dict, sharding: NamedSharding, global_batch: bool) -> dict:
  """NumPy batch -> global jax.Arrays split over the mesh's 'data' axis.

  ``batch`` is this process's part of the global batch, or the whole global
  batch (``global_batch=True``), of which this process takes its slice.
  """
  count, index = jax.process_count(), jax.process_index()

  def put(x):
    if global_batch and count > 1:
      part = x.shape[0] // count
      x = x[index * part:(index + 1) * part]
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return {key: put(value) for key, value in batch.items()}


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


# ------------------------------------------------------------------- step ---

def create_train_state(config, model, tx, example_batch: dict) -> TrainState:
  """The initial state (seeded by ``config.seed``) from one example batch."""
  rng = jax.random.PRNGKey(config.seed)
  rng, init_rng = jax.random.split(rng)
  params = {"model": setup.init_model(model, init_rng, example_batch),
            "likelihood": setup.init_likelihood_params(config)}
  return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                    opt_state=tx.init(params), rng=rng,
                    nonfinite_steps=jnp.zeros([], jnp.int32),
                    nonfinite_streak=jnp.zeros([], jnp.int32))


def train_step(state: TrainState, batch: dict, *, model, tx, loss_fn: Callable,
               uses_geco: bool):
  """One step of the objective (GECO: Algorithm 1); the new state and metrics.

  A non-finite loss or gradient leaves parameters and optimiser state as they
  were and counts the step in ``nonfinite_steps`` / ``nonfinite_streak``.
  """
  rng, step_rng = jax.random.split(state.rng)

  def objective(params):
    output = setup.apply_model(model, params["model"], batch, step_rng)
    loss, (constraint, metrics) = loss_fn(params["likelihood"], batch, output,
                                          state.opt_state, state.step)
    return loss, (constraint, metrics, output)

  (loss, (constraint, metrics, output)), grads = jax.value_and_grad(
      objective, has_aux=True)(state.params)
  extra = {"constraint": constraint} if uses_geco else {}
  finite = jnp.isfinite(loss) & _all_finite(grads)

  def update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    return optax.apply_updates(state.params, updates), opt_state, updates

  def skip(_):
    return (state.params, state.opt_state,
            jax.tree_util.tree_map(jnp.zeros_like, state.params))

  # A conditional, not ``jnp.where(finite, new, old)`` over every leaf: the
  # select made XLA copy the donated parameters and Adam moments each step
  # (measured: 16% of the conv VAE's step; docs/performance.md).
  params, opt_state, updates = jax.lax.cond(finite, update, skip, None)
  streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
  nonfinite_steps = state.nonfinite_steps + jnp.where(finite, 0, 1)

  metrics = dict(metrics)
  metrics.update({
      "loss": loss,
      "rmse": jnp.mean(per_pixel_rmse(batch["image"], output.reconstruction)),
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "update_norm": optax.tree.norm(updates),
      "finite": finite.astype(jnp.float32),
      "nonfinite_steps": nonfinite_steps,
      "nonfinite_streak": streak,
  })
  for name in constraint:
    metrics[f"constraint/{name}"] = constraint[name]
  if uses_geco:
    multiplier = geco_jax.lagrange_multiplier(opt_state)
    average = geco_jax.constraint_moving_average(opt_state)
    for name in constraint:
      metrics[f"constraint_ma/{name}"] = average[name]
      metrics[f"lambda/{name}"] = multiplier[name]
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         rng=rng, nonfinite_steps=nonfinite_steps,
                         nonfinite_streak=streak)
  return new_state, metrics


class Experiment:
  """A config made concrete: data, model, objective and the compiled step.

  Args:
    config: a validated experiment config.
    data: ``setup.make_dataset(config)``.
    devices: the devices of the mesh (default: all devices of all processes).
  """

  def __init__(self, config: ml_collections.ConfigDict, data: dict, devices=None):
    self.config = config
    self.data = data
    self.mesh = make_mesh(devices)
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.num_devices = self.mesh.devices.size
    if config.batch_size % self.num_devices:
      raise setup.ConfigError(
          f"config.batch_size ({config.batch_size}) must be divisible by the number "
          f"of devices ({self.num_devices}).")
    image_shape = data["train"]["image"].shape[1:]
    self.model = setup.make_model(config, image_shape, self.num_devices)
    self.tx = setup.make_optimizer(config)
    self.uses_geco = config.objective == "geco"
    self.constraint_fn = setup.make_constraint_fn(config)
    loss_fn = setup.make_loss_fn(config, self.constraint_fn)
    self.train_batches = EpochBatcher(
        data["train"], config.batch_size, seed=config.seed,
        shard_index=jax.process_index(), num_shards=jax.process_count())
    self.data_on_device = config.data_on_device
    self.step_fn = jax.jit(
        functools.partial(train_step, model=self.model, tx=self.tx, loss_fn=loss_fn,
                          uses_geco=self.uses_geco),
        in_shardings=(self.replicated, self.batch_sharding),
        out_shardings=(self.replicated, self.replicated),
        donate_argnums=0)

  def initial_state(self) -> TrainState:
    example = {k: v[:1] for k, v in self.data["train"].items()}
    state = jax.jit(
        lambda: create_train_state(self.config, self.model, self.tx, example),
        out_shardings=self.replicated)()
    return state

  def device_batch(self, batch: dict) -> dict:
    """This process's part of a global batch, as arrays split over the mesh."""
    return _device_batch(batch, self.batch_sharding, global_batch=False)

  @functools.cached_property
  def device_batches(self) -> DeviceEpochBatcher:
    """The training set on the devices (``config.data_on_device``), copied at first use."""
    return DeviceEpochBatcher(self.train_batches, self.batch_sharding)

  def batch_at(self, step: int) -> dict:
    """The training batch of global step ``step`` (0-based), on the devices."""
    if self.data_on_device:
      return self.device_batches.batch_at(step)
    return self.device_batch(self.train_batches.batch_at(step))

  def train_batch_stream(self, start_step: int):
    """The batches of steps ``start_step``, ``start_step + 1``, ... for the loop.

    Gathered on the devices (``config.data_on_device``) or prepared on the
    host by a ``Prefetcher`` thread, which copies them over; ``close()`` it.
    """
    if self.data_on_device:
      return self.device_batches.iterate(start_step)
    return Prefetcher(self.train_batches.iterate(start_step=start_step),
                      buffer_size=2, transform=self.device_batch)

  # Evaluation ------------------------------------------------------------ #

  @functools.cached_property
  def _eval_fn(self):
    model, constraint_fn = self.model, self.constraint_fn

    def sums(params, batch, mask, rng):
      output = setup.apply_model(model, params["model"], batch, rng)
      per_example = {
          "kl": output.kl,
          "rmse": per_pixel_rmse(batch["image"], output.reconstruction),
          "squared_error": jnp.sum(jnp.square(
              batch["image"] - output.reconstruction).reshape(mask.shape[0], -1), axis=1),
          **{f"constraint/{k}": v for k, v in constraint_fn(batch, output).items()}}
      return {k: jnp.sum(v * mask) for k, v in per_example.items()}

    return jax.jit(sums, in_shardings=(self.replicated, self.batch_sharding,
                                       self.batch_sharding, self.replicated),
                   out_shardings=self.replicated)

  def evaluate(self, state: TrainState, split: str = "test",
               num_examples: Optional[int] = None, seed: int = 1) -> dict[str, float]:
    """Means over (the first ``num_examples`` of) a split, one z per example.

    Batches have the training batch size; the last one is padded and masked,
    so every batch has one shape (one compilation) and splits over devices.
    ``gaussian_nll`` is the per-example Gaussian NLL at the split's own optimal global
    sigma (continuous, not quantized; see ``geco_jax.objectives``).
    """
    arrays = self.data[split]
    total = len(arrays["image"])
    if num_examples is not None:
      total = min(total, num_examples)
    arrays = {k: v[:total] for k, v in arrays.items()}
    size = self.config.batch_size
    rng = jax.random.PRNGKey(seed)
    sums: dict[str, float] = {}
    for i, start in enumerate(range(0, total, size)):
      batch = {k: v[start:start + size] for k, v in arrays.items()}
      n = len(batch["image"])
      mask = np.zeros([size], np.float32)
      mask[:n] = 1.0
      if n < size:
        batch = {k: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)])
                 for k, v in batch.items()}
      out = to_host(self._eval_fn(
          state.params, _device_batch(batch, self.batch_sharding, True),
          _device_batch({"m": mask}, self.batch_sharding, True)["m"],
          jax.random.fold_in(rng, i)))
      for key, value in out.items():
        sums[key] = sums.get(key, 0.0) + float(value)
    means = {key: value / total for key, value in sums.items()}
    num_values = math.prod(arrays["image"].shape[1:])
    # squared_error: the mean of ||x - g(z)||^2 per example.
    variance = max(means["squared_error"] / num_values, 1e-12)
    means["gaussian_nll"] = 0.5 * num_values * (math.log(2 * math.pi * variance) + 1.0)
    return means

  # Images ---------------------------------------------------------------- #

  @functools.cached_property
  def _images_fn(self):
    model, num = self.model, self.config.num_image_samples

    def images(params, batch, rng):
      output = setup.apply_model(model, params["model"], batch, rng)
      samples = setup.sample_model(model, params["model"], rng, num, batch)
      return output.reconstruction, samples

    return jax.jit(images, out_shardings=self.replicated)

  def image_grids(self, state: TrainState, step: int) -> dict[str, np.ndarray]:
    preview = {k: v[:self.config.num_image_samples] for k, v in self.data["test"].items()}
    rng = jax.random.fold_in(jax.random.PRNGKey(0), step)
    reconstructions, samples = to_host(self._images_fn(
        state.params, jax.tree_util.tree_map(jnp.asarray, preview), rng))
    grids = {"data": _image_grid(preview["image"]),
             "reconstructions": _image_grid(reconstructions),
             "prior_samples": _image_grid(samples)}
    if "context" in preview:
      grids["context"] = _image_grid(preview["context"][:, 0])
    return grids


# ------------------------------------------------------------ checkpoints ---

class CheckpointError(RuntimeError):
  """No checkpoint of a run restores into its config; nothing was changed."""


def _restore_newest(manager: ocp.CheckpointManager, target: TrainState,
                    workdir: epath.Path) -> Optional[TrainState]:
  """The newest checkpoint that restores and is finite; broken newer ones moved aside.

  Checkpoints are moved (to ``corrupt_checkpoints/``) only once an older one
  has restored: when none does, the cause is more likely the config than the
  files (a state of another shape), so nothing is moved and ``CheckpointError``
  says so. None when there is no checkpoint.
  """
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(target))
      if not bool(to_host(_all_finite(state.params))):
        raise ValueError("it holds non-finite parameters")
    except Exception as e:  # pylint: disable=broad-except
      message = " ".join(str(e).split())[:300]
      logging.error("Checkpoint of step %d cannot be restored (%s: %s); trying the "
                    "previous one.", step, type(e).__name__, message)
      failures.append((step, f"{type(e).__name__}: {message}"))
      continue
    for broken, message in failures:
      aside = workdir / "corrupt_checkpoints" / f"{broken}-{int(time.time())}"
      print(f"warning: checkpoint of step {broken} cannot be restored ({message}); "
            f"moved to {aside}; resuming from step {step}.", file=sys.stderr)
      if jax.process_index() == 0:
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(manager.directory / str(broken)), os.fspath(aside))
    if failures:
      manager.reload()
    return state
  if failures:
    steps = ", ".join(str(step) for step, _ in failures)
    raise CheckpointError(
        f"none of the checkpoints in {manager.directory} (steps {steps}) restores into "
        f"this config; the newest: {failures[0][1]}. Nothing was changed. If the config "
        "differs from the run's in what shapes its state, use the run's config "
        "(its config.json) or another --workdir; if the checkpoints are damaged, move "
        "them away to start over.")
  return None


def _feasibility_criteria(config: ml_collections.ConfigDict,
                          eval_images: Optional[np.ndarray] = None) -> dict:
  """What decides whether a state is feasible: the constraints (but their
  multiplier step sizes) and the evaluation set (the split, named when it is
  not the test split, how much of it, and a digest of its images, which
  changes with anything that changes them: a generated test set's size, the
  examples held out, the source)."""
  criteria = {"constraints": {name: {k: v for k, v in spec.items() if k != "lambda_lr"}
                              for name, spec in config.constraints.to_dict().items()},
              "eval_num_examples": config.eval_num_examples}
  if _minimised(config) != "kl":   # (records of KL-minimising runs do not name it)
    criteria["minimised"] = _minimised(config)
  if _eval_split(config) == "validation":
    criteria.update(eval_split="validation",
                    num_validation=config.dataset.num_validation)
  if eval_images is not None:
    images = np.ascontiguousarray(eval_images[:config.eval_num_examples])
    criteria["eval_images_sha1"] = hashlib.sha1(memoryview(images)).hexdigest()  # no copy
  return criteria


def _eval_split(config: ml_collections.ConfigDict) -> str:
  return config.get("eval_split", "test")


def _minimised(config: ml_collections.ConfigDict) -> str:
  """The evaluation metric that best_feasible minimises: GECO's objective."""
  if config.objective == "geco":
    return config.geco.get("minimise", "kl")
  return "kl"


class _BestFeasible:
  """The lowest-KL state whose constraints all hold on the evaluation set
  (the lowest squared error for ``geco.minimise='squared_error'``).

  The record names the criteria it was judged by (``_feasibility_criteria``).
  A run resumed with other tolerances or another evaluation set starts a new
  record: the old one's state may break the new constraints. (Its checkpoint
  stays until a state feasible under the new criteria replaces it.)
  """

  def __init__(self, workdir: epath.Path, criteria: dict):
    self.record_path = workdir / "best_feasible.json"
    self.criteria = criteria
    self.minimised = criteria.get("minimised", "kl")
    self.manager = ocp.CheckpointManager(
        workdir / "best_feasible", options=ocp.CheckpointManagerOptions(max_to_keep=1))
    self.record = (json.loads(self.record_path.read_text())
                   if self.record_path.exists() else None)
    # (Records written before they named their criteria, or the digest of
    # their evaluation images, are judged by what they name.)
    judged_by = criteria if self.record is None else self.record.get("criteria", criteria)
    now = criteria if "eval_images_sha1" in judged_by else {
        k: v for k, v in criteria.items() if k != "eval_images_sha1"}
    if judged_by != now:
      message = (f"best_feasible.json (step {self.record.get('step')}) was judged by other "
                 f"constraints or another evaluation set ({self.record['criteria']}, now "
                 f"{criteria}); a new best feasible state is looked for.")
      logging.warning(message)
      print(f"warning: {message}", file=sys.stderr)
      self.record = None

  def update(self, state: TrainState, step: int, eval_metrics: dict) -> bool:
    constraints = {k[len("constraint/"):]: v for k, v in eval_metrics.items()
                   if k.startswith("constraint/")}
    if not constraints or not all(v <= 0 for v in constraints.values()):
      return False
    key = self.minimised
    if self.record is not None and eval_metrics[key] >= self.record[key]:
      return False
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()
    self.record = {"step": step, "kl": eval_metrics["kl"], key: eval_metrics[key],
                   "constraints": constraints, "eval": eval_metrics,
                   "criteria": self.criteria}
    if jax.process_index() == 0:  # written after the checkpoint is complete
      tmp = self.record_path.parent / (self.record_path.name + ".tmp")
      tmp.write_text(json.dumps(self.record, indent=1, sort_keys=True))
      os.replace(tmp, self.record_path)
    return True

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ------------------------------------------------------------------- loop ---

_FETCH_CHUNK = 64


def fetch_metrics(pending: list[dict]) -> dict[str, np.ndarray]:
  """The pending steps' metrics on the host: each metric's values, one per step.

  The steps' scalars are stacked on the devices first, 64 steps per compiled
  call (a shorter chunk is padded, so that it compiles once), and each metric
  then crosses to the host as one array per chunk: fetched one by one (13 per
  step) they took longer than the conv VAE's step itself on a GPU
  (docs/performance.md, lever 23).
  """
  chunks = []
  for start in range(0, len(pending), _FETCH_CHUNK):
    chunk = pending[start:start + _FETCH_CHUNK]
    count = len(chunk)
    chunks.append((_stack_steps(chunk + chunk[-1:] * (_FETCH_CHUNK - count)), count))
  host = [(to_host(stacked), count) for stacked, count in chunks]  # all dispatched first
  return {key: np.concatenate([values[key][:count] for values, count in host])
          for key in host[0][0]}


@jax.jit
def _stack_steps(pending: list[dict]) -> dict:
  """[{name: scalar}] * n -> {name: [n]}, in one dispatch."""
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *pending)


def _host_metrics(fetched: dict[str, np.ndarray]) -> dict[str, float]:
  """Means over the fetched steps whose update was applied; state-like values last."""
  finite = fetched["finite"] > 0
  out = {}
  if finite.any():
    out = {k: float(np.mean(v[finite])) for k, v in fetched.items()}
    last = np.flatnonzero(finite)[-1]
    for k, v in fetched.items():
      if k.startswith(("lambda/", "constraint_ma/")):
        out[k] = float(v[last])
  for key in ("nonfinite_steps", "nonfinite_streak"):
    out[key] = float(fetched[key][-1])
  out.pop("finite", None)
  return out


def _warn_at_lambda_max(metrics: dict[str, float], lambda_max, step: int,
                        warned: set) -> None:
  """Logs, once per constraint, that its multiplier sits at ``geco.lambda_max``."""
  if lambda_max is None:
    return
  for key, value in metrics.items():
    name = key[len("lambda/"):]
    if key.startswith("lambda/") and name not in warned and value >= lambda_max * (1 - 1e-5):
      warned.add(name)
      logging.warning(
          "Step %d: the multiplier of constraint %r reached geco.lambda_max = %g and is "
          "clamped there (its moving average C_ma = %.4g; > 0 means violated). A large "
          "multiplier learning rate does this within a few hundred steps when the "
          "constraint starts far from its target; try a smaller lambda_lr (geco.lambda_lr "
          "or constraints.%s.lambda_lr) if it should not.", step, name, lambda_max,
          metrics.get(f"constraint_ma/{name}", float("nan")), name)


def _add_seconds(workdir, seconds: float) -> float:
  """Adds this call's wall seconds to ``workdir/seconds.json``; returns the total.

  A run trained over several calls (resumed, or collected again by
  ``experiments.information_plane``) thus reports the time of all of them.
  Written to a temporary file and renamed, so an interrupted write loses
  nothing; an unreadable file is started again from this call.
  """
  path = workdir / "seconds.json"
  total, calls = 0.0, 0
  try:
    record = json.loads(path.read_text())
    total, calls = float(record["total_seconds"]), int(record["calls"])
  except (FileNotFoundError, ValueError, KeyError, TypeError):
    pass
  total += seconds
  temporary = workdir / "seconds.json.tmp"
  temporary.write_text(json.dumps({"total_seconds": total, "calls": calls + 1}))
  temporary.replace(path)
  return total


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices=None, data: Optional[dict] = None,
                       stop: Optional[cli.StopRequest] = None) -> dict[str, Any]:
  """Train, log and checkpoint into ``workdir``; return the final summary.

  A run started again in the same workdir resumes from its newest checkpoint.
  ``data`` is ``setup.make_dataset(config)`` (loaded here when not given);
  ``devices`` those of the mesh (default: all).

  SIGTERM / SIGINT during training: the step in flight is finished and saved,
  and the summary says ``"interrupted": True``. ``stop``: a ``cli.StopRequest``
  the caller has entered (a program's, from its start: see ``cli.run``); by
  default one is entered around the training loop only. With a caller's, a
  signal that came before training began raises ``cli.Interrupted`` instead,
  before the workdir is written or, if it came later, before the first step.

  Raises:
    setup.ConfigError: a config or dataset problem, a workdir that cannot be
      written or that holds another model's run (before anything compiles),
      or model arguments that the model itself rejects.
    CheckpointError: the workdir has checkpoints and none restores.
    FloatingPointError: ``max_consecutive_nonfinite`` skipped updates in a row.
    cli.Interrupted: (with ``stop``) a signal came before training began.
  """
  own_stop = stop is None
  stop = cli.StopRequest() if own_stop else stop
  setup.validate_config(config)
  started = time.time()
  workdir = epath.Path(os.path.abspath(workdir))  # orbax needs absolute paths
  setup.check_workdir_matches(config, workdir)
  if data is None:
    data = setup.make_dataset(config)
  experiment = Experiment(config, data, devices)
  try:
    state = experiment.initial_state()
  except (TypeError, ValueError) as e:   # the model's own checks of its arguments
    raise setup.ConfigError(
        f"config.model: the {config.model.name} model cannot be built: "
        f"{type(e).__name__}: {' '.join(str(e).split())}") from None
  stop.raise_if_requested(f"before training began; nothing was written to {workdir}.")
  setup.prepare_workdir(workdir)   # nothing is written for a config that fails above
  checkpoints = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep))
  restored = _restore_newest(checkpoints, state, workdir)
  if restored is not None:
    state = restored
    logging.info("Resumed from the checkpoint of step %d.", int(to_host(state.step)))
  first_step = int(to_host(state.step))
  best_feasible = _BestFeasible(workdir, _feasibility_criteria(
      config, experiment.data[_eval_split(config)]["image"]))

  is_writer = jax.process_index() == 0
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_writer)
  if is_writer:  # what experiments.evaluate rebuilds the run from
    temporary = workdir / ".config.json.tmp"   # replaced whole, never left half-written
    temporary.write_text(config.to_json_best_effort(indent=1))
    os.replace(temporary, workdir / "config.json")
  if first_step == 0:
    writer.write_hparams(_flatten(config))
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.num_steps, writer=writer, every_steps=config.log_every)

  pending: list = []
  at_lambda_max: set = set()
  last_metrics: dict[str, float] = {}
  last_finite: dict[str, float] = {}
  eval_metrics: dict[str, float] = {}
  step = first_step
  batches = experiment.train_batch_stream(first_step)

  def save_checkpoint(step: int, state: TrainState) -> None:
    if not bool(to_host(_all_finite(state.params))):
      raise FloatingPointError(f"non-finite parameters at step {step}; the newest "
                               f"checkpoint (step {checkpoints.latest_step()}) is kept.")
    checkpoints.save(step, args=ocp.args.StandardSave(state), force=True)

  with (stop if own_stop else contextlib.nullcontext()):
    try:
      if not own_stop:   # (a signal before the loop: only a caller's can have it)
        stop.raise_if_requested(
            "before training began; no checkpoint was written"
            + (f" (the newest, of step {first_step}, is kept)." if first_step else "."))
      for step in range(first_step + 1, config.num_steps + 1):
        state, metrics = experiment.step_fn(state, next(batches))
        pending.append(metrics)
        report_progress(step, time.time())
        last = step == config.num_steps or stop.signal is not None
        checkpoint_now = step % config.checkpoint_every == 0 or last
        if step % config.log_every == 0 or checkpoint_now:
          # One host transfer per k steps; also before every checkpoint.
          fetched = fetch_metrics(pending)
          pending = []
          last_metrics = _host_metrics(fetched)
          if fetched["finite"][-1] > 0:
            last_finite = {"step": step, **last_metrics}
          streak = int(last_metrics["nonfinite_streak"])
          if streak >= config.max_consecutive_nonfinite:
            raise FloatingPointError(
                f"training stopped at step {step}: {streak} updates in a row (from step "
                f"{step - streak + 1}) had a non-finite loss or gradient and were "
                "skipped. Last finite values"
                + (f" (step {last_finite['step']}): " + ", ".join(
                    f"{k}={v:.4g}" for k, v in sorted(last_finite.items())
                    if k in ("loss", "kl", "rmse", "grad_norm") or k.startswith("lambda/"))
                   if last_finite else ": none in this run")
                + f". The newest checkpoint (step {checkpoints.latest_step()}) is kept. "
                "Try a smaller optimizer.learning_rate or geco.lambda_lr, or set "
                "geco.lambda_max.")
          writer.write_scalars(step, last_metrics)
          if experiment.uses_geco:
            _warn_at_lambda_max(last_metrics, config.geco.lambda_max, step, at_lambda_max)
        if step % config.image_every == 0 or last:
          writer.write_images(step, experiment.image_grids(state, step))
        if checkpoint_now:
          save_checkpoint(step, state)
        if (step % config.eval_every == 0 or step == config.num_steps) and not stop.signal:
          eval_metrics = experiment.evaluate(state, _eval_split(config),
                                             config.eval_num_examples, seed=config.seed + 1)
          writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
          if best_feasible.update(state, step, eval_metrics):
            logging.info("Step %d: best feasible so far (eval KL %.4g).", step,
                         eval_metrics["kl"])
        if stop.signal is not None:
          if not checkpoint_now:   # it came during the images or the evaluation
            save_checkpoint(step, state)
          break
    finally:
      batches.close()
      writer.flush()
      checkpoints.wait_until_finished()
      checkpoints.close()
      best_feasible.close()

  if not eval_metrics and stop.signal is None:  # e.g. resumed from the final step
    eval_metrics = experiment.evaluate(state, _eval_split(config), config.eval_num_examples,
                                       seed=config.seed + 1)
  summary: dict[str, Any] = {
      "step": int(to_host(state.step)),
      "interrupted": stop.signal is not None,
      "train_kl": last_metrics.get("kl"),
      "train_rmse": last_metrics.get("rmse"),
      "nonfinite_steps": int(to_host(state.nonfinite_steps)),
      "eval": eval_metrics,
      "eval_split": _eval_split(config),
      "best_feasible": best_feasible.record,
      "seconds": time.time() - started,
  }
  summary["total_seconds"] = (_add_seconds(workdir, summary["seconds"]) if is_writer
                              else summary["seconds"])
  if experiment.uses_geco:
    final_ma = to_host(geco_jax.constraint_moving_average(state.opt_state))
    final_lambda = to_host(geco_jax.lagrange_multiplier(state.opt_state))
    summary.update({
        "constraint_ma": {k: float(v) for k, v in final_ma.items()},
        "lambda": {k: float(v) for k, v in final_lambda.items()},
        "satisfied": bool(all(float(v) <= 0 for v in final_ma.values())),
    })
  if "sigma" in last_metrics:
    summary["sigma"] = last_metrics["sigma"]
  return summary
