"""Training loop: a VAE trained with GECO, logged through clu, checkpointed with orbax."""

from __future__ import annotations

import functools
import time
from typing import Any

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

import geco_jax
from experiments import setup
from geco_jax.constraints import per_pixel_rmse
from geco_jax.data import EpochBatcher
from geco_jax.data import Prefetcher


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the GECO state is in ``opt_state``."""

  step: jax.Array
  params: Any
  opt_state: optax.OptState
  rng: jax.Array


def _image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
  """[N, H, W, C] -> one [1, rows*H, columns*W, C] image with a 1-pixel border."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.float32)
  for i in range(n):
    r, k = divmod(i, columns)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = images[i]
  return grid[None]


def _model_inputs(batch: dict) -> dict:
  """The parts of a batch the step reads (not, e.g., the sprites' factors)."""
  return {key: batch[key] for key in ("image", "label") if key in batch}


def create_train_state(config, model, tx, image_shape) -> TrainState:
  rng = jax.random.PRNGKey(config.seed)
  rng, init_rng, sample_rng = jax.random.split(rng, 3)
  params = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), sample_rng)
  return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                    opt_state=tx.init(params), rng=rng)


def train_step(state: TrainState, batch, *, model, tx, constraint_fn):
  """One GECO step (Algorithm 1); returns the new state and this step's metrics."""
  rng, step_rng = jax.random.split(state.rng)

  images = batch["image"]

  def loss_fn(params):
    output = model.apply(params, images, step_rng)
    kl = jnp.mean(output.kl)
    constraint = constraint_fn(batch, output)
    loss = geco_jax.lagrangian(kl, constraint, state.opt_state)
    return loss, (kl, constraint, output)

  (loss, (kl, constraint, output)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                 constraint=constraint)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "kl": kl,
             "rmse": jnp.mean(per_pixel_rmse(images, output.reconstruction)),
             "grad_norm": optax.global_norm(grads)}
  multiplier = geco_jax.lagrange_multiplier(opt_state)
  average = geco_jax.constraint_moving_average(opt_state)
  for name in constraint:
    metrics[f"constraint/{name}"] = constraint[name]
    metrics[f"constraint_ma/{name}"] = average[name]
    metrics[f"lambda/{name}"] = multiplier[name]
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         rng=rng)
  return new_state, metrics


def evaluate(state: TrainState, test: dict, batch_size: int, *, model, constraint_fn,
             seed: int) -> dict[str, float]:
  """Means over the test split, iterated exactly once (one z per example)."""

  @jax.jit
  def eval_batch(params, batch, rng):
    images = batch["image"]
    output = model.apply(params, images, rng)
    constraint = constraint_fn(batch, output)
    return {"kl": jnp.mean(output.kl),
            "rmse": jnp.mean(per_pixel_rmse(images, output.reconstruction)),
            **{f"constraint/{k}": v for k, v in constraint.items()}}

  totals, count = {}, 0
  rng = jax.random.PRNGKey(seed)
  batcher = EpochBatcher(test, batch_size, seed=seed, shuffle=False, drop_remainder=False)
  for i, batch in enumerate(batcher.iterate_once()):
    n = len(batch["image"])
    values = jax.device_get(eval_batch(state.params, _model_inputs(batch),
                                       jax.random.fold_in(rng, i)))
    for key, value in values.items():
      totals[key] = totals.get(key, 0.0) + float(value) * n
    count += n
  return {key: total / count for key, total in totals.items()}


def _write_images(writer, step: int, state: TrainState, images: np.ndarray, *,
                  model, num_samples: int) -> None:
  rng = jax.random.fold_in(jax.random.PRNGKey(0), step)
  output = model.apply(state.params, jnp.asarray(images), rng)
  samples = model.apply(state.params, rng, num_samples, method=model.sample)
  writer.write_images(step, {
      "data": _image_grid(images),
      "reconstructions": _image_grid(np.asarray(output.reconstruction)),
      "prior_samples": _image_grid(np.asarray(samples)),
  })


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train, log and checkpoint into ``workdir``; return the final summary.

  A run started again in the same workdir resumes from its newest checkpoint.
  """
  setup.validate_config(config)
  started = time.time()

  # Input ------------------------------------------------------------------ #
  data = setup.make_dataset(config)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  image_shape = data["train"]["image"].shape[1:]
  train_batches = EpochBatcher(data["train"], config.batch_size, seed=config.seed)

  # Model and optimiser ---------------------------------------------------- #
  model = setup.make_model(config, image_shape)
  tx = setup.make_optimizer(config)
  constraint_fn = setup.make_constraint_fn(config)
  state = create_train_state(config, model, tx, image_shape)

  checkpoints = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.max_checkpoints_to_keep))
  if checkpoints.latest_step() is not None:
    state = checkpoints.restore(checkpoints.latest_step(),
                                args=ocp.args.StandardRestore(state))
    logging.info("Resumed from the checkpoint of step %d.", int(state.step))
  first_step = int(state.step)

  # Update step ------------------------------------------------------------ #
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, constraint_fn=constraint_fn),
      donate_argnums=0)

  writer = metric_writers.create_default_writer(
      str(workdir), just_logging=jax.process_index() > 0)
  if first_step == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()
                          if not isinstance(v, dict)})
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.num_steps, writer=writer, every_steps=config.log_every)
  preview = data["test"]["image"][:config.num_image_samples]

  pending = []
  last_metrics: dict[str, float] = {}
  # Batches are cut in a background thread while the device runs the step.
  batches = Prefetcher(train_batches.iterate(start_step=first_step), buffer_size=2)
  try:
    for step in range(first_step + 1, config.num_steps + 1):
      batch = next(batches)
      state, metrics = step_fn(state, _model_inputs(batch))
      pending.append(metrics)
      report_progress(step, time.time())
      checkpoint_now = step % config.checkpoint_every == 0 or step == config.num_steps
      if step % config.log_every == 0 or checkpoint_now:
        # Also before every checkpoint, so that a diverged state is never saved.
        # Metrics stay on the device between logs: one host transfer per k steps.
        fetched = jax.device_get(pending)
        pending = []
        last_metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        last_metrics.update({k: float(v) for k, v in fetched[-1].items()
                             if k.startswith(("lambda/", "constraint_ma/"))})
        diverged = sorted(k for k, v in last_metrics.items() if not np.isfinite(v))
        if diverged:
          raise FloatingPointError(
              f"training diverged: non-finite {', '.join(diverged)} by step {step}; "
              + (f"the newest checkpoint (step {checkpoints.latest_step()}) is kept. "
                 if checkpoints.latest_step() is not None else "no checkpoint written. ")
              + "Try a smaller optimizer.learning_rate or geco.lambda_lr, or set "
              "geco.lambda_max.")
        writer.write_scalars(step, last_metrics)
      if step % config.image_every == 0 or step == config.num_steps:
        _write_images(writer, step, state, preview, model=model,
                      num_samples=config.num_image_samples)
      if checkpoint_now:
        checkpoints.save(step, args=ocp.args.StandardSave(state), force=True)
  finally:
    batches.close()

  # Evaluation ------------------------------------------------------------- #
  eval_metrics = evaluate(state, data["test"], config.batch_size, model=model,
                          constraint_fn=constraint_fn, seed=config.seed + 1)
  writer.write_scalars(int(state.step), {f"eval/{k}": v for k, v in eval_metrics.items()})
  writer.flush()
  checkpoints.wait_until_finished()
  checkpoints.close()

  final_ma = jax.device_get(geco_jax.constraint_moving_average(state.opt_state))
  final_lambda = jax.device_get(geco_jax.lagrange_multiplier(state.opt_state))
  return {
      "step": int(state.step),
      "train_kl": last_metrics.get("kl"),
      "train_rmse": last_metrics.get("rmse"),
      "constraint_ma": {k: float(v) for k, v in final_ma.items()},
      "lambda": {k: float(v) for k, v in final_lambda.items()},
      "satisfied": bool(all(float(v) <= 0 for v in final_ma.values())),
      "eval": eval_metrics,
      "seconds": time.time() - started,
  }
