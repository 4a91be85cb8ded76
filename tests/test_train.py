"""The trainer's promises: resumption, preemption, broken checkpoints, NaNs,
best_feasible, baselines, data parallelism, and every model trains."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default as default_config
from experiments import cli
from experiments import setup
from experiments import train

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny_config(**overrides):
  config = default_config.get_config()
  config.batch_size = 16
  config.num_steps = 8
  config.dataset.num_train = 256
  config.dataset.num_test = 40
  config.dataset.image_size = 16
  config.model.channels = (4, 8)
  config.model.hidden_size = 16
  config.model.latent_size = 4
  config.log_every = 2
  config.image_every = 1000
  config.eval_every = 1000
  config.checkpoint_every = 4
  config.num_image_samples = 4
  config.geco.lambda_lr = 1e-3
  return override(config, **overrides)


def override(config, **overrides):
  """``config`` with each dotted field (``"geco.lambda_lr"``) set to its value."""
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def restore_state(workdir, step=None):
  manager = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints")
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return restored


def test_resuming_gives_the_same_run_as_training_straight(tmp_path, monkeypatch):
  # 48 examples in batches of 16: 8 steps are almost three epochs. The resumed
  # half gathers its batches on the device (config.data_on_device), the rest
  # use the host pipeline: the same stream either way.
  monkeypatch.chdir(tmp_path)  # relative workdirs, as on the command line
  short = {"dataset.num_train": 48}
  straight = train.train_and_evaluate(tiny_config(num_steps=8, **short), "a")
  train.train_and_evaluate(tiny_config(num_steps=4, **short), "b")
  resumed = train.train_and_evaluate(
      tiny_config(num_steps=8, data_on_device=True, **short), "b")
  assert straight["step"] == resumed["step"] == 8
  # seconds: this call's; total_seconds: every call's in the workdir.
  assert straight["total_seconds"] == pytest.approx(straight["seconds"])
  assert resumed["total_seconds"] > resumed["seconds"] > 0
  assert json.loads((tmp_path / "b" / "seconds.json").read_text())["calls"] == 2
  a, b = restore_state(tmp_path / "a"), restore_state(tmp_path / "b")
  np.testing.assert_allclose(straight["lambda"]["re"], resumed["lambda"]["re"], rtol=1e-6)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_batches_gathered_on_the_device_are_the_host_batches():
  # 256 examples in batches of 16: step 15 is the last of the first epoch.
  data = setup.make_dataset(tiny_config())
  experiments = [train.Experiment(tiny_config(data_on_device=flag), data)
                 for flag in (False, True)]
  np.testing.assert_array_equal(np.asarray(experiments[0].batch_at(3)["image"]),
                                np.asarray(experiments[1].batch_at(3)["image"]))
  streams = [experiment.train_batch_stream(15) for experiment in experiments]
  try:
    for _ in range(2):
      x, y = (next(stream) for stream in streams)
      np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
      assert y["image"].sharding == experiments[1].batch_sharding
  finally:
    for stream in streams:
      stream.close()


def test_data_on_device_is_validated():
  config = tiny_config()
  with config.ignore_type():
    config.data_on_device = "yes"
  with pytest.raises(setup.ConfigError, match="data_on_device must be True or False"):
    setup.validate_config(config)
  with pytest.raises(setup.ConfigError, match="serves one process"):
    setup.validate_config(tiny_config(data_on_device=True, distributed=True))


def test_a_workdir_of_another_model_is_refused_and_left_as_it_was(tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(num_steps=4), str(workdir))
  stored = (workdir / "config.json").read_text()
  steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  other = tiny_config(num_steps=8, **{"model.latent_size": 8})
  with pytest.raises(setup.ConfigError, match=r"holds checkpoints of another run \(model: "
                     r".*'latent_size': 4.* there, .*'latent_size': 8.* here\)"):
    train.train_and_evaluate(other, str(workdir))
  # Another dual optimiser: its state has another shape (it would not restore).
  with pytest.raises(setup.ConfigError, match=r"geco.dual: sgd there, pi here"):
    train.train_and_evaluate(tiny_config(num_steps=8, **{"geco.dual": "pi"}), str(workdir))
  assert (workdir / "config.json").read_text() == stored
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps
  assert not (workdir / "corrupt_checkpoints").exists()
  # Another seed: the checkpoints would restore, but the batches would not go on.
  with pytest.raises(setup.ConfigError, match=r"seed: 0 there, 1 here"):
    train.train_and_evaluate(tiny_config(num_steps=8, seed=1), str(workdir))
  assert (workdir / "config.json").read_text() == stored
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps
  assert not (workdir / "corrupt_checkpoints").exists()
  # Anything else may change when a run is resumed: here its length and lambda_lr.
  resumed = train.train_and_evaluate(
      tiny_config(num_steps=6, **{"geco.lambda_lr": 1e-2}), str(workdir))
  assert resumed["step"] == 6


def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_previous_one_used(
    tmp_path, capfd):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(num_steps=8), str(workdir))
  newest = workdir / "checkpoints" / "8"
  broken = [p for p in newest.rglob("*") if p.is_file() and p.stat().st_size > 0]
  for path in broken:
    path.write_bytes(path.read_bytes()[:5])   # truncated files
  summary = train.train_and_evaluate(tiny_config(num_steps=12), str(workdir))
  err = capfd.readouterr().err
  assert "checkpoint of step 8 cannot be restored" in err
  aside = list((workdir / "corrupt_checkpoints").iterdir())
  assert len(aside) == 1 and aside[0].name.startswith("8-"), "kept, not deleted"
  assert summary["step"] == 12
  # Resumed from step 4, so the run equals a straight 12-step run.
  straight = train.train_and_evaluate(tiny_config(num_steps=12), str(tmp_path / "s"))
  np.testing.assert_allclose(summary["lambda"]["re"], straight["lambda"]["re"], rtol=1e-6)

  # When no checkpoint restores, none is moved and the run does not start over.
  steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  for path in (workdir / "checkpoints").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(path.read_bytes()[:5])
  with pytest.raises(train.CheckpointError, match=r"none of the checkpoints .* restores"):
    train.train_and_evaluate(tiny_config(num_steps=16), str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps
  assert len(list((workdir / "corrupt_checkpoints").iterdir())) == 1


def test_best_feasible_keeps_the_lowest_kl_state_that_meets_every_constraint(tmp_path):
  config = tiny_config(num_steps=12, eval_every=4, **{"constraints.re.tolerance": 0.9})
  summary = train.train_and_evaluate(config, str(tmp_path / "easy"))
  record = json.loads((tmp_path / "easy" / "best_feasible.json").read_text())
  assert record == summary["best_feasible"]
  assert record["step"] in (4, 8, 12) and all(v <= 0 for v in record["constraints"].values())
  manager = ocp.CheckpointManager(tmp_path / "easy" / "best_feasible")
  assert manager.all_steps() == [record["step"]]
  manager.close()

  impossible = tiny_config(num_steps=4, eval_every=4, **{"constraints.re.tolerance": 1e-3})
  summary = train.train_and_evaluate(impossible, str(tmp_path / "hard"))
  assert summary["best_feasible"] is None
  assert not (tmp_path / "hard" / "best_feasible.json").exists()

  # Resumed under a tolerance the recorded state breaks: that record is not
  # reported as feasible (before, it was, judged by the old tolerance).
  stricter = tiny_config(num_steps=16, eval_every=4, **{"constraints.re.tolerance": 1e-3})
  summary = train.train_and_evaluate(stricter, str(tmp_path / "easy"))
  assert summary["best_feasible"] is None
  assert json.loads((tmp_path / "easy" / "best_feasible.json").read_text()) == record


def test_best_feasible_minimises_what_geco_minimises(tmp_path):
  """The lowest KL for the paper's GECO; the lowest squared error when GECO
  minimises it under a KL bound (there a lower KL is no better)."""
  from etils import epath  # pylint: disable=import-outside-toplevel

  state = {"w": jnp.zeros(2)}
  evaluations = [  # (kl, squared_error, constraint)
      {"kl": 5.0, "squared_error": 20.0, "constraint/kl": -1.0},
      {"kl": 4.0, "squared_error": 30.0, "constraint/kl": -2.0},   # lower KL
      {"kl": 6.0, "squared_error": 10.0, "constraint/kl": -0.5},   # lower error
      {"kl": 3.0, "squared_error": 5.0, "constraint/kl": 0.5},     # infeasible
  ]
  rate = tiny_config(**{"geco.minimise": "squared_error"})
  rate.constraints = ml_collections.ConfigDict({"kl": {"tolerance": 6.5}})
  for config, want_steps in ((tiny_config(), [1, 2]), (rate, [1, 3])):
    workdir = epath.Path(tmp_path / config.geco.minimise)
    best = train._BestFeasible(workdir, train._feasibility_criteria(config))
    kept = [step for step, metrics in enumerate(evaluations, start=1)
            if best.update(state, step, metrics)]
    best.close()
    assert kept == want_steps, config.geco.minimise
    record = json.loads((workdir / "best_feasible.json").read_text())
    assert record["step"] == want_steps[-1]
    assert ("minimised" in record["criteria"]) == (config.geco.minimise != "kl")


def test_best_feasible_is_dropped_when_its_evaluation_images_change(tmp_path, capsys):
  """The record names a digest of the images it was judged on: another generated
  test set (a resume with another dataset.num_test) starts a new record."""
  easy = {"constraints.re.tolerance": 0.9}
  summary = train.train_and_evaluate(
      tiny_config(num_steps=4, eval_every=4, **easy), str(tmp_path / "run"))
  record = summary["best_feasible"]
  assert record is not None and len(record["criteria"]["eval_images_sha1"]) == 40
  path = tmp_path / "run" / "best_feasible.json"

  # A record from before the digest existed is judged by what it names: kept.
  older = {**record, "criteria": {k: v for k, v in record["criteria"].items()
                                  if k != "eval_images_sha1"}}
  path.write_text(json.dumps(older))
  summary = train.train_and_evaluate(
      tiny_config(num_steps=4, eval_every=4, **easy), str(tmp_path / "run"))
  assert summary["best_feasible"] == older
  assert "another evaluation set" not in capsys.readouterr().err

  path.write_text(json.dumps(record))
  summary = train.train_and_evaluate(
      tiny_config(num_steps=4, eval_every=4, **easy, **{"dataset.num_test": 32}),
      str(tmp_path / "run"))
  assert "another evaluation set" in capsys.readouterr().err
  assert summary["best_feasible"] is None


def test_dataset_seed_keeps_a_generated_dataset_across_a_sweep_of_seeds():
  base = setup.make_dataset(tiny_config(seed=0))
  other_seed = setup.make_dataset(tiny_config(seed=7))
  assert not np.array_equal(base["train"]["image"], other_seed["train"]["image"])
  pinned = setup.make_dataset(tiny_config(seed=7, **{"dataset.seed": 0}))
  for split in ("train", "test"):
    np.testing.assert_array_equal(pinned[split]["image"], base[split]["image"])


def test_a_validation_split_is_held_out_of_training_and_chooses_best_feasible(
    tmp_path, capsys):
  """dataset.num_validation: the last training examples, not trained on; with
  eval_split='validation' the periodic evaluation and best_feasible use them."""
  plain = setup.make_dataset(tiny_config())
  held = setup.make_dataset(tiny_config(**{"dataset.num_validation": 56}))
  assert set(held) == {"train", "test", "validation"}
  for key in plain["train"]:
    np.testing.assert_array_equal(held["train"][key], plain["train"][key][:200])
    np.testing.assert_array_equal(held["validation"][key], plain["train"][key][200:])
    np.testing.assert_array_equal(held["test"][key], plain["test"][key])

  config = tiny_config(num_steps=8, eval_every=4, eval_split="validation",
                       **{"dataset.num_validation": 56, "constraints.re.tolerance": 0.9})
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["eval_split"] == "validation"
  experiment = train.Experiment(config, setup.make_dataset(config))
  state = experiment.initial_state()
  restored = restore_state(tmp_path / "run")
  state = state.replace(params=restored["params"])
  on_validation = experiment.evaluate(state, "validation", seed=config.seed + 1)
  on_test = experiment.evaluate(state, "test", seed=config.seed + 1)
  assert summary["eval"] == pytest.approx(on_validation)
  assert summary["eval"] != pytest.approx(on_test)
  record = summary["best_feasible"]
  assert record is not None and record["criteria"]["eval_split"] == "validation"
  assert record["criteria"]["num_validation"] == 56
  # The trainer never drew a held-out example: the batches of a run with the
  # validation split are those of a run whose training set is the first 200.
  first_200 = tiny_config(**{"dataset.num_train": 200})
  a = train.Experiment(config, setup.make_dataset(config))
  b = train.Experiment(first_200, setup.make_dataset(first_200))
  for step in range(13):   # a bit more than one epoch of 12 batches
    np.testing.assert_array_equal(a.train_batches.batch_at(step)["image"],
                                  b.train_batches.batch_at(step)["image"])

  # Resumed at its final step: the closing evaluation uses the validation split too.
  again = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert again["eval_split"] == "validation"
  assert again["eval"] == pytest.approx(on_validation)

  # Resumed with the test split: the record judged on the validation set is dropped.
  on_test_config = tiny_config(num_steps=12, eval_every=4,
                               **{"dataset.num_validation": 56,
                                  "constraints.re.tolerance": 0.9})
  summary = train.train_and_evaluate(on_test_config, str(tmp_path / "run"))
  assert "another evaluation set" in capsys.readouterr().err
  assert summary["eval_split"] == "test"
  assert summary["best_feasible"] is None or (
      summary["best_feasible"]["step"] == 12
      and "eval_split" not in summary["best_feasible"]["criteria"])

  # Holding out other examples on resume is refused: they were trained on.
  for change in ({"dataset.num_validation": 40}, {"dataset.num_validation": 0},
                 {"dataset.num_train": 200}, {"dataset.seed": 3}):
    with pytest.raises(setup.ConfigError, match="held-out validation examples"):
      setup.check_workdir_matches(
          tiny_config(num_steps=16, **{"dataset.num_validation": 56, **change}),
          tmp_path / "run")
  setup.check_workdir_matches(   # the same held-out examples: resumes
      tiny_config(num_steps=16, eval_split="validation", **{"dataset.num_validation": 56}),
      tmp_path / "run")


def test_resuming_a_derived_dataset_from_another_seed_is_refused(tmp_path):
  """Color-MNIST is drawn from the dataset's seed: another seed, other examples."""
  from configs import nvp_color_mnist  # pylint: disable=import-outside-toplevel

  def config(**overrides):
    return override(nvp_color_mnist.get_config(), **overrides)

  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "config.json").write_text(config().to_json_best_effort())
  for same in ({}, {"dataset.seed": 0}, {"num_steps": 10}):   # seed 0 either way
    setup.check_workdir_matches(config(**same), tmp_path)
  with pytest.raises(setup.ConfigError, match=r"dataset seed: 0 there, 3 here"):
    setup.check_workdir_matches(config(**{"dataset.seed": 3}), tmp_path)
  with pytest.raises(setup.ConfigError, match=r"seed: 0 there, 2 here; dataset seed: 0 "
                     r"there, 2 here"):
    setup.check_workdir_matches(config(seed=2), tmp_path)
  # A stored dataset is the same whatever its seed (config.dataset.seed unused).
  mnist = {"dataset.name": "mnist", "dataset.source": "npz"}
  (tmp_path / "config.json").write_text(tiny_config(**mnist).to_json_best_effort())
  setup.check_workdir_matches(tiny_config(**mnist, **{"dataset.seed": 5}), tmp_path)
  with pytest.raises(setup.ConfigError, match=r"\(seed: 0 there, 5 here\)"):
    setup.check_workdir_matches(tiny_config(**mnist, seed=5), tmp_path)


def test_a_non_finite_step_is_skipped_and_the_state_unchanged():
  config = tiny_config()
  experiment = train.Experiment(config, setup.make_dataset(config))
  state = experiment.initial_state()
  before = jax.tree_util.tree_map(np.asarray, state.params)
  lam_before = float(train.to_host(state.opt_state[0].lagrange_multiplier["re"]))
  batch = experiment.train_batches.batch_at(0)
  batch["image"] = batch["image"].copy()
  batch["image"][0, 0, 0, 0] = np.nan
  state, metrics = experiment.step_fn(state, experiment.device_batch(batch))
  metrics = train.to_host(metrics)
  assert metrics["finite"] == 0 and metrics["nonfinite_streak"] == 1
  assert int(train.to_host(state.step)) == 1
  for x, y in zip(jax.tree_util.tree_leaves(before),
                  jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_array_equal(x, np.asarray(y))
  assert float(train.to_host(state.opt_state[0].lagrange_multiplier["re"])) == lam_before
  state, metrics = experiment.step_fn(state, experiment.batch_at(1))
  assert train.to_host(metrics)["finite"] == 1
  assert int(train.to_host(state.nonfinite_streak)) == 0
  assert int(train.to_host(state.nonfinite_steps)) == 1


def test_fetched_metrics_are_each_steps_values_and_average_over_applied_updates():
  mesh_sharding = jax.sharding.NamedSharding(train.make_mesh(), jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  steps = []
  for i in range(150):  # three chunks of 64, the last one padded
    finite = float(i not in (20, 149))
    values = {"loss": rng.normal(), "lambda/re": 1.0 + i, "finite": finite,
              "nonfinite_steps": float(i >= 20) + float(i >= 149),
              "nonfinite_streak": float(i in (20, 149))}
    steps.append({k: jax.device_put(jnp.float32(v), mesh_sharding) for k, v in values.items()})
  fetched = train.fetch_metrics(steps)
  expected = {k: np.array([float(s[k]) for s in steps], np.float32) for k in steps[0]}
  assert set(fetched) == set(expected)
  for key, values in expected.items():
    np.testing.assert_array_equal(fetched[key], values)
  summary = train._host_metrics(fetched)
  applied = [i for i in range(150) if i not in (20, 149)]
  assert summary["loss"] == pytest.approx(np.mean(expected["loss"][applied]), rel=1e-6)
  assert summary["lambda/re"] == 149.0         # the last applied update's, not a mean
  assert summary["nonfinite_steps"] == 2.0 and summary["nonfinite_streak"] == 1.0
  assert "finite" not in summary


def test_too_many_non_finite_steps_in_a_row_stop_the_run_and_keep_the_checkpoint(
    tmp_path, monkeypatch):
  make_loss_fn = setup.make_loss_fn

  def poisoned(config, constraint_fn):
    loss_fn = make_loss_fn(config, constraint_fn)

    def fn(likelihood, batch, output, opt_state, step):
      loss, aux = loss_fn(likelihood, batch, output, opt_state, step)
      return jnp.where(step >= 5, jnp.nan, loss), aux

    return fn

  monkeypatch.setattr(setup, "make_loss_fn", poisoned)
  config = tiny_config(num_steps=20, log_every=1, max_consecutive_nonfinite=3)
  with pytest.raises(FloatingPointError, match=r"stopped at step 8: 3 updates in a row "
                     r"\(from step 6\).*Last finite values \(step 5\)"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  manager = ocp.CheckpointManager(tmp_path / "run" / "checkpoints")
  assert manager.all_steps() == [4]
  manager.close()
  state = restore_state(tmp_path / "run")
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state))


def test_a_multiplier_at_lambda_max_is_warned_about_once(tmp_path, monkeypatch):
  warnings = []
  monkeypatch.setattr(train.logging, "warning", lambda *args: warnings.append(args))
  config = tiny_config(num_steps=6, **{"geco.lambda_max": 1.5, "geco.lambda_lr": 0.1})
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["lambda"]["re"] == pytest.approx(1.5)
  at_max = [w for w in warnings if "lambda_max" in w[0]]
  assert len(at_max) == 1                       # logged at steps 2, 4, 6: warned once
  message = at_max[0][0] % at_max[0][1:]
  assert message.startswith("Step 2: the multiplier of constraint 're' reached "
                            "geco.lambda_max = 1.5")
  assert "constraints.re.lambda_lr" in message
  warnings.clear()   # below the bound, or no bound: no warning
  train._warn_at_lambda_max({"lambda/re": 1.49, "constraint_ma/re": 0.1}, 1.5, 8, set())
  train._warn_at_lambda_max({"lambda/re": 1e10}, None, 8, set())
  assert not warnings


@pytest.mark.parametrize("objective, learn", [("elbo", False), ("elbo", True),
                                              ("elbo_annealed", False)])
def test_elbo_baselines_train_and_report_sigma(tmp_path, objective, learn):
  config = tiny_config(objective=objective, num_steps=8,
                       **{"elbo.learn_sigma": learn, "elbo.sigma": 0.5,
                          "elbo.anneal_steps": 4})
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert "lambda" not in summary and summary["step"] == 8
  assert np.isfinite(summary["eval"]["gaussian_nll"])
  assert "constraint/re" in summary["eval"]   # ELBO runs still report the constraint
  if objective == "elbo_annealed":
    assert summary["sigma"] == pytest.approx(0.7)   # annealing ended at step 4
  elif learn:
    assert summary["sigma"] != pytest.approx(0.5)   # sigma was learned
    state = restore_state(tmp_path / "run")
    assert float(np.exp(state["params"]["likelihood"]["log_sigma"])) != pytest.approx(0.5)
  else:
    assert summary["sigma"] == pytest.approx(0.5)


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  process = subprocess.Popen(
      [sys.executable, "-m", "experiments.main", "--config", "configs/default.py",
       "--workdir", str(workdir), "--config.num_steps=100000",
       "--config.checkpoint_every=5", "--config.log_every=5",
       "--config.dataset.num_train=256", "--config.dataset.num_test=40",
       "--config.dataset.image_size=16", "--config.model.channels=(4, 8)",
       "--config.model.hidden_size=16", "--config.batch_size=16"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / "5").exists():
      assert process.poll() is None, process.communicate()
      assert time.time() < deadline, "no checkpoint after 240 s"
      time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 0, err[-2000:]
  summary = json.loads([l for l in out.splitlines() if l.startswith("final: ")][0][7:])
  assert summary["interrupted"] and 5 <= summary["step"] < 100000
  manager = ocp.CheckpointManager(workdir / "checkpoints")
  assert manager.latest_step() == summary["step"], "the interrupted step was saved"
  manager.close()


def test_a_signal_during_an_evaluation_still_saves_the_step(tmp_path, monkeypatch):
  """SIGTERM while evaluating a step that is not a checkpoint step: it used to
  stop the run with nothing saved since the last checkpoint."""
  evaluate = train.Experiment.evaluate

  def evaluate_then_signal(self, *args, **kwargs):
    metrics = evaluate(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)   # as if it came during the evaluation
    return metrics

  monkeypatch.setattr(train.Experiment, "evaluate", evaluate_then_signal)
  config = tiny_config(num_steps=12, eval_every=3, checkpoint_every=100)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["interrupted"] and summary["step"] == 3
  manager = ocp.CheckpointManager(tmp_path / "checkpoints")
  assert manager.all_steps() == [3]
  manager.close()


def test_a_signal_before_training_raises_interrupted_and_keeps_the_checkpoints(
    tmp_path, monkeypatch):
  """With a program's StopRequest, a signal that came before the first step
  stops there: nothing written before the workdir is prepared, and after it
  (during the restore) no checkpoint, the newest kept."""
  config = tiny_config(num_steps=4)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  stop = cli.StopRequest()   # not entered: its flag is set by hand below
  stop.signal = signal.SIGTERM
  with pytest.raises(cli.Interrupted, match="before training began; nothing was written") as e:
    train.train_and_evaluate(tiny_config(num_steps=8), str(tmp_path / "new"), stop=stop)
  assert e.value.exit_status == 128 + signal.SIGTERM
  assert not (tmp_path / "new").exists()

  stop = cli.StopRequest()
  restore_newest = train._restore_newest

  def restore_then_signal(*args):
    restored = restore_newest(*args)
    stop.signal = signal.SIGTERM    # as if it came during the restore
    return restored

  monkeypatch.setattr(train, "_restore_newest", restore_then_signal)
  with pytest.raises(cli.Interrupted, match=r"no checkpoint was written \(the newest, of "
                     r"step 4, is kept\)"):
    train.train_and_evaluate(tiny_config(num_steps=8), str(tmp_path / "run"), stop=stop)
  manager = ocp.CheckpointManager(tmp_path / "run" / "checkpoints")
  assert manager.all_steps() == [4]
  manager.close()


_EQUIVALENCE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from experiments import setup, train
    from tests.test_train import tiny_config
    assert jax.device_count() == 8, jax.devices()
    config = tiny_config(batch_size=32)
    data = setup.make_dataset(config)
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
      experiment = train.Experiment(config, data, devices)
      state = experiment.initial_state()
      lambdas = []
      for step in range(20):
        state, metrics = experiment.step_fn(state, experiment.batch_at(step))
        lambdas.append(float(train.to_host(metrics["lambda/re"])))
      out[name] = {"lambda": lambdas, "params": [np.asarray(train.to_host(x)).ravel().tolist()
                   for x in jax.tree_util.tree_leaves(state.params)],
                   "sharding": str(state.params["model"]["params"]["encoder_dense"]["kernel"].sharding)
                   if False else None}
    json.dump(out, sys.stdout)
""")


def test_eight_devices_follow_the_one_device_trajectory():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-c", _EQUIVALENCE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout)
  np.testing.assert_allclose(out["eight"]["lambda"], out["one"]["lambda"], rtol=1e-5)
  assert out["one"]["lambda"][-1] != out["one"]["lambda"][0]
  for x, y in zip(out["eight"]["params"], out["one"]["params"]):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _mnist_or_skip():
  if not os.environ.get("GECO_DATA_DIR"):
    pytest.skip("GECO_DATA_DIR is unset: no real MNIST (mnist.npz) to test on.")


# Each model, made small, on a dataset it serves.
SMOKE = {
    "conv_vae": dict(),
    "convdraw": {"dataset.name": "mnist", "dataset.source": "npz",
                 "model.name": "convdraw", "model.preset": "mnist_cpu",
                 "model.num_steps": 3, "model.hidden_channels": 8,
                 "model.latent_channels": 4, "model.read_channels": 4},
    "conditional_convdraw": {"dataset.name": "mnist_sum", "dataset.source": "npz",
                             "model.name": "conditional_convdraw",
                             "model.preset": "mnist_cpu", "model.num_steps": 3,
                             "model.hidden_channels": 8, "model.latent_channels": 4,
                             "model.read_channels": 4, "model.context_channels": 4},
    "vae_nvp": {"dataset.name": "mnist", "dataset.source": "npz",
                "model.name": "vae_nvp", "model.preset": "cpu", "model.latent_size": 4,
                "model.channels": (4, 8), "model.hidden_size": 16,
                "model.coupling_hidden_size": 16, "model.num_couplings": 2},
}


# The conv VAE's run is in the default suite; the larger models (a minute each on
# a 2-core CPU, mostly compilation) run with `pytest -m slow`.
@pytest.mark.parametrize("name", [
    name if name == "conv_vae" else pytest.param(name, marks=pytest.mark.slow)
    for name in sorted(SMOKE)])
def test_fifty_steps_of_each_model_lower_its_loss(name):
  overrides = dict(SMOKE[name])
  if name != "conv_vae":
    _mnist_or_skip()
  config = tiny_config(objective="elbo", **{"elbo.sigma": 0.1}, **overrides)
  for key in ("channels", "hidden_size", "latent_size"):
    if name != "conv_vae" and f"model.{key}" not in overrides:
      del config.model[key]
  if name != "conv_vae":
    del config.dataset["image_size"]   # a sprites option
  setup.validate_config(config)
  data = setup.make_dataset(config)   # 256 train examples (dataset.num_train)
  experiment = train.Experiment(config, data, jax.devices()[:1])
  state = experiment.initial_state()
  batch = experiment.batch_at(0)
  loss_fn = setup.make_loss_fn(config, experiment.constraint_fn)

  def loss_on(params):
    output = setup.apply_model(experiment.model, params["model"], batch,
                               jax.random.PRNGKey(7))
    return float(loss_fn(params["likelihood"], batch, output, None, 0)[0])

  before = loss_on(state.params)
  for step in range(50):
    state, metrics = experiment.step_fn(state, experiment.batch_at(step))
  after = loss_on(state.params)
  assert np.isfinite(after) and after < 0.9 * before, (before, after)


def test_fre_on_the_features_of_a_saved_cifar10_classifier(tmp_path):
  if not os.environ.get("GECO_DATA_DIR"):
    pytest.skip("GECO_DATA_DIR is unset: no cifar10.npz to test on.")
  from geco_jax.models import classifier as classifier_lib

  model = classifier_lib.CIFAR10Classifier(features=(4, 4, 4), hidden_size=8)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  path = classifier_lib.save_classifier(
      tmp_path / "classifier", params,
      {"architecture": classifier_lib.architecture_of(model), "test_accuracy": 0.1})
  config = tiny_config(**{"dataset.name": "cifar10", "dataset.source": "npz",
                          "dataset.num_train": 64})
  del config.dataset["image_size"]
  config.constraints.fre = dict(tolerance=0.5, features="classifier", classifier=str(path))
  setup.validate_config(config)
  experiment = train.Experiment(config, setup.make_dataset(config), jax.devices()[:1])
  state = experiment.initial_state()
  state, metrics = experiment.step_fn(state, experiment.batch_at(0))
  metrics = train.to_host(metrics)
  assert np.isfinite(metrics["constraint/fre"]) and metrics["lambda/fre"] > 0

  config.constraints.fre.classifier = str(tmp_path / "missing")
  with pytest.raises(setup.ConfigError, match="cifar10_classifier"):
    setup.validate_config(config)


@pytest.mark.parametrize("dual", ["sgd", "pi"])
def test_each_constraint_moves_its_multiplier_by_its_own_step_for_either_dual(dual):
  """constraints.<name>.lambda_lr, else geco.lambda_lr; the PI dual too (it once took
  geco.lambda_lr for every constraint). First step: lambda = exp(step * C)."""
  import geco_jax  # pylint: disable=import-outside-toplevel

  config = tiny_config(**{"geco.dual": dual, "geco.lambda_lr": 1e-2})
  config.constraints.kl = ml_collections.ConfigDict({"tolerance": 5.0, "lambda_lr": 0.5})
  setup.validate_config(config)
  assert setup.lambda_steps(config) == {"re": 1e-2, "kl": 0.5}
  tx = setup.make_optimizer(config)
  params = {"w": jnp.ones(3)}
  updates, state = tx.update({"w": jnp.zeros(3)}, tx.init(params), params,
                             constraint={"re": jnp.float32(2.0), "kl": jnp.float32(3.0)})
  multiplier = geco_jax.lagrange_multiplier(state)
  np.testing.assert_allclose(multiplier["re"], np.exp(1e-2 * 2.0), rtol=1e-6)
  np.testing.assert_allclose(multiplier["kl"], np.exp(0.5 * 3.0), rtol=1e-6)


def test_the_rate_constrained_form_minimises_the_squared_error_under_the_kl_bound(
    tmp_path):
  """geco.minimise='squared_error': loss = E||x - g||^2 + lambda (KL - kappa), by hand
  at the first step (C_ma = C); trained, the KL settles at its bound."""
  config = tiny_config(**{"geco.minimise": "squared_error", "geco.lambda_lr": 1e-2,
                          "geco.lambda_init": 0.5, "num_steps": 300})
  config.constraints = ml_collections.ConfigDict({"kl": {"tolerance": 3.0}})
  setup.validate_config(config)
  experiment = train.Experiment(config, setup.make_dataset(config), jax.devices()[:1])
  state = experiment.initial_state()
  batch = experiment.batch_at(0)
  opt_state = setup.make_optimizer(config).init(state.params)
  loss_fn = setup.make_loss_fn(config, experiment.constraint_fn)

  @jax.jit
  def loss_of(params):
    output = setup.apply_model(experiment.model, params, batch, jax.random.PRNGKey(3))
    loss, (constraint, _) = loss_fn({}, batch, output, opt_state, 0)
    return loss, (constraint, output)

  (loss, (constraint, output)), grads = jax.value_and_grad(loss_of, has_aux=True)(
      state.params["model"])
  images, reconstruction = np.asarray(batch["image"]), np.asarray(output.reconstruction)
  squared_error = np.mean(np.sum((images - reconstruction).reshape(len(images), -1) ** 2,
                                 axis=1))
  kl = np.mean(np.asarray(output.kl))
  np.testing.assert_allclose(constraint["kl"], kl - 3.0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, squared_error + 0.5 * (kl - 3.0), rtol=1e-5)
  # The decoder learns: the squared error's gradient reaches it (with the KL as
  # the objective and only a KL constraint, it would get none).
  assert any(float(jnp.abs(g).max()) > 0 for path, g in
             jax.tree_util.tree_leaves_with_path(grads) if "'dec_" in str(path))

  summary = train.train_and_evaluate(config, str(tmp_path))
  # KL = 3 + C_ma: at its bound, within a nat, after 300 steps.
  assert abs(summary["constraint_ma"]["kl"]) < 1.0, summary
  assert abs(summary["train_kl"] - 3.0) < 1.5, summary


def test_resuming_with_the_other_geco_objective_is_refused(tmp_path):
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  config = tiny_config()
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  setup.check_workdir_matches(tiny_config(), tmp_path)
  other = tiny_config(**{"geco.minimise": "squared_error"})
  other.constraints = ml_collections.ConfigDict({"kl": {"tolerance": 3.0}})
  with pytest.raises(setup.ConfigError, match=r"geco.minimise: kl there, squared_error here"):
    setup.check_workdir_matches(other, tmp_path)
