"""experiments.evaluate, information_plane and micro_mnist on tiny runs."""

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from experiments import cli
from experiments import evaluate
from experiments import information_plane
from experiments import train
from tests.test_classifier import needs_mnist
from tests.test_train import ROOT
from tests.test_train import tiny_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run") / "run"
  summary = train.train_and_evaluate(tiny_config(num_steps=4), str(workdir))
  return workdir, summary


def test_evaluate_writes_the_papers_metrics(tiny_run):
  workdir, _ = tiny_run
  result = evaluate.evaluate_run(str(workdir), num_train=64, num_marginal=32)
  assert json.loads((workdir / "eval.json").read_text()) == result
  assert result["settings"] == {"checkpoint": "latest", "num_train": 64, "num_marginal": 32}
  # information_plane reuses it only for the same checkpoint step and settings.
  assert evaluate.stored_evaluation(str(workdir), 4, num_train=64, num_marginal=32) == result
  assert evaluate.stored_evaluation(str(workdir), 3, num_train=64, num_marginal=32) is None
  assert evaluate.stored_evaluation(str(workdir), 4, num_train=64, num_marginal=16) is None
  assert evaluate.stored_evaluation(str(workdir), 4, "best_feasible", num_train=64,
                                    num_marginal=32) is None
  for name in ("data", "reconstructions", "prior_samples"):
    assert (workdir / f"eval_{name}.png").exists()
  assert result["step"] == 4 and result["num_train_for_sigma"] == 64
  assert result["num_test"] == 40
  # Quantized NLL of 16x16 [0, 1] images: positive, finite, and bits/dim consistent.
  assert np.isfinite(result["nll"])
  assert result["nll_bits_per_dim"] == pytest.approx(result["nll"] / (256 * math.log(2)))
  assert result["average_kl"] > 0
  assert result["average_kl_per_dim"] == pytest.approx(result["average_kl"] / 4)
  assert set(result["marginal_kl"]) == {"kl", "standard_error", "num_examples"}
  assert result["marginal_kl"]["num_examples"] == 32
  # log N bounds the gap between the average and the marginal KL (metrics docstring).
  assert (result["average_kl"] - math.log(32) - 1.0 <= result["marginal_kl"]["kl"]
          <= result["average_kl"] + 1.0)
  assert set(result["constraints"]) == {"re"}
  # RE in its own units: ||x - g||^2 - D kappa^2 per example, mean over the split,
  # i.e. D (root_mse^2 - kappa^2) exactly (the same z per example); the mean of
  # per-example RMSEs is at most root_mse (Jensen).
  assert result["mse"] == pytest.approx(result["root_mse"] ** 2)
  assert result["constraints"]["re"] == pytest.approx(
      256 * (result["mse"] - 0.1 ** 2), rel=1e-4, abs=1e-4)
  assert result["rmse"] <= result["root_mse"] * (1 + 1e-6)
  assert result["train_root_mse"] == pytest.approx(result["sigma_star"], rel=1e-6)


def test_evaluate_agrees_with_an_independent_float64_computation(tiny_run):
  """sigma* from the training split, then the quantized-normal NLL of the test
  split, recomputed from the model's reconstructions in float64 with scipy's
  normal CDF (paper appendix D), the same z per example (evaluate's seeds)."""
  import jax
  import orbax.checkpoint as ocp
  from scipy import stats

  from experiments import setup

  workdir, _ = tiny_run
  result = evaluate.evaluate_run(str(workdir), num_train=40, num_marginal=0)
  config = evaluate.load_run_config(str(workdir))
  data = setup.make_dataset(config)
  experiment = train.Experiment(config, data, jax.devices()[:1])
  manager = ocp.CheckpointManager(workdir / "checkpoints")
  state = manager.restore(manager.latest_step(),
                          args=ocp.args.StandardRestore(experiment.initial_state()))
  manager.close()
  model, params = experiment.model, state.params["model"]
  rng, size = jax.random.PRNGKey(0), config.batch_size

  def reconstructions(images, first_key):
    out, kls = [], []
    for i, start in enumerate(range(0, len(images), size)):
      batch = images[start:start + size]
      n = len(batch)
      batch = np.concatenate([batch, np.repeat(batch[:1], size - n, axis=0)])
      output = model.apply(params, batch, jax.random.fold_in(rng, first_key + i))
      out.append(np.asarray(output.reconstruction, np.float64)[:n])
      kls.append(np.asarray(output.kl, np.float64)[:n])
    return np.concatenate(out), np.concatenate(kls)

  train_x = data["train"]["image"][:40].astype(np.float64)
  train_g, _ = reconstructions(data["train"]["image"][:40], 0)
  sigma = math.sqrt(np.mean((train_x - train_g) ** 2))   # the MLE of one global sigma
  assert result["sigma_star"] == pytest.approx(sigma, rel=1e-5)

  test_x = data["test"]["image"].astype(np.float64)
  test_g, test_kl = reconstructions(data["test"]["image"], 10**6)
  k = np.rint(test_x * 255)            # 8-bit values; bins of width 1/255 around k/255
  upper = np.where(k == 255, np.inf, (k + 0.5) / 255)
  lower = np.where(k == 0, -np.inf, (k - 0.5) / 255)
  log_p = np.log(stats.norm.cdf((upper - test_g) / sigma)
                 - stats.norm.cdf((lower - test_g) / sigma))
  nll = -log_p.reshape(len(test_x), -1).sum(axis=1).mean()
  assert result["nll"] == pytest.approx(nll, rel=1e-4)
  assert result["average_kl"] == pytest.approx(test_kl.mean(), rel=1e-5)
  assert result["mse"] == pytest.approx(np.mean((test_x - test_g) ** 2), rel=1e-5)
  assert result["rmse"] == pytest.approx(
      np.sqrt(((test_x - test_g) ** 2).reshape(len(test_x), -1).mean(axis=1)).mean(),
      rel=1e-5)


def test_a_damaged_checkpoint_is_one_clear_error(tiny_run, tmp_path):
  import shutil

  workdir, _ = tiny_run
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged)
  (damaged / "eval.json").write_text('{"kept": true}')
  for path in (damaged / "checkpoints" / "4").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(path.read_bytes()[:5])
  with pytest.raises(train.CheckpointError, match="checkpoint of step 4 .* cannot be restored"):
    evaluate.evaluate_run(str(damaged), num_train=64, num_marginal=0)
  assert json.loads((damaged / "eval.json").read_text()) == {"kept": True}


def test_a_run_older_than_a_config_field_still_evaluates(tiny_run, tmp_path):
  """config.json written before a field existed: the field takes configs/base.py's default."""
  import shutil

  from configs import base

  workdir, _ = tiny_run
  old = tmp_path / "old_run"
  shutil.copytree(workdir, old)
  stored = json.loads((old / "config.json").read_text())
  del stored["data_on_device"], stored["xla_flags"], stored["geco"]["dual"]
  stored["geco"]["lambda_lr"] = 0.125            # a stored value still wins over the default
  (old / "config.json").write_text(json.dumps(stored))
  config = evaluate.load_run_config(str(old))
  defaults = base.get_config()
  assert config.data_on_device is defaults.data_on_device is False
  assert config.xla_flags == defaults.xla_flags
  assert config.geco.dual == defaults.geco.dual and config.geco.lambda_lr == 0.125
  assert config.model.to_dict() == stored["model"]
  assert dict(config.constraints.re) == stored["constraints"]["re"]
  result = evaluate.evaluate_run(str(old), num_train=64, num_marginal=0)
  assert result["step"] == 4 and np.isfinite(result["nll"])


def test_convdraw_marginal_kl_of_posteriors_narrower_than_float32_resolves():
  """s^q = e^-25 everywhere: the paths never overlap, so the estimate is exactly
  mean(log q(z_i | x_i) - log p(z_i)) - log N, with log q from the drawn noise."""
  import jax
  import jax.numpy as jnp

  from geco_jax.models import ConvDraw

  model = ConvDraw(image_shape=(8, 8, 1), num_steps=2, hidden_channels=8, latent_channels=2,
                   read_channels=4, kernel_size=3)
  images = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 8, 1))
  params = jax.jit(model.init)(jax.random.PRNGKey(1), images, jax.random.PRNGKey(2))
  posterior = params["params"]["step"]["posterior"]
  # [mu, log s] = conv(h^enc): log s's output channels get zero weights and bias -25.
  posterior["kernel"] = posterior["kernel"].at[..., 2:].set(0.0)
  posterior["bias"] = posterior["bias"].at[2:].set(-25.0)
  rng = jax.random.PRNGKey(3)
  estimate = evaluate._convdraw_marginal_kl(   # pylint: disable=protected-access
      model, params, images, rng, batch_size=4, block_size=4)
  # The same paths as the estimator's (its batches of 4, keys folded by start).
  @jax.jit   # (compiled once: eagerly, op by op, this took longer than the rest)
  def path_scores(x, key):
    trace = model.apply(params, x, key, method=model.trace)
    log_p = model.apply(params, trace.latent, method=model.log_prior)
    rescored = model.apply(params, trace.latent, x, method=model.log_posterior)
    return trace.log_posterior, log_p, rescored

  own, log_prior = [], []
  for start in (0, 4):
    log_q, log_p, rescored = path_scores(images[start:start + 4],
                                         jax.random.fold_in(rng, start))
    own.append(log_q)
    log_prior.append(log_p)
    # Rescoring the path by teacher forcing cannot recover it at this width:
    # z_t - mu rounds to (nearly) 0, overstating log q by up to |eps|^2 / 2 (d / 2 = 32).
    assert np.min(np.asarray(rescored - log_q)) > 10
  expected = float(jnp.mean(jnp.concatenate(own) - jnp.concatenate(log_prior))) - math.log(6)
  assert float(estimate.kl) == pytest.approx(expected, rel=1e-5)


def test_evaluate_measures_another_configs_constraints(tiny_run):
  """--measure_with: constraints a run was not trained under, on the same test pass."""
  from experiments import setup

  workdir, _ = tiny_run
  measure = {"re": {"tolerance": 0.2}, "pncc": {"tolerance": 0.5, "patch_size": 3}}
  result = evaluate.evaluate_run(str(workdir), num_train=64, num_marginal=0,
                                 measure_constraints=measure)
  assert result["settings"]["measure_constraints"] == measure
  assert set(result["constraints"]) == {"re"}            # the run's own, unchanged
  assert set(result["measured_constraints"]) == {"re", "pncc"}
  # The same reconstructions as the run's own RE: D (mse - kappa^2) at either tolerance.
  assert result["measured_constraints"]["re"] == pytest.approx(
      256 * (result["mse"] - 0.2 ** 2), rel=1e-4, abs=1e-4)
  assert result["measured_constraints"]["re"] == pytest.approx(
      result["constraints"]["re"] - 256 * (0.2 ** 2 - 0.1 ** 2), rel=1e-4, abs=1e-4)
  # pNCC = kappa - mean correlation, a correlation in [-1, 1].
  assert -0.5 <= result["measured_constraints"]["pncc"] <= 1.5
  # A stored evaluation is reused only with the same measured constraints.
  assert evaluate.stored_evaluation(str(workdir), 4, num_train=64, num_marginal=0) is None
  assert evaluate.stored_evaluation(str(workdir), 4, num_train=64, num_marginal=0,
                                    measure_constraints=measure) == result
  with pytest.raises(setup.ConfigError, match="constraints.re.tolerance"):
    evaluate.evaluate_run(str(workdir), num_train=64, num_marginal=0,
                          measure_constraints={"re": {"tolerance": -1.0}})


def test_measure_with_is_not_held_to_the_rules_of_training_under_constraints(tiny_run):
  """A KL bound alone may be measured on a run that minimised the KL (training
  under it alone would leave the decoder untrained, and is refused)."""
  workdir, _ = tiny_run
  result = evaluate.evaluate_run(str(workdir), num_train=64, num_marginal=0,
                                 measure_constraints={"kl": {"tolerance": 5.0}})
  assert result["measured_constraints"]["kl"] == pytest.approx(
      result["average_kl"] - 5.0, rel=1e-4, abs=1e-4)


def test_a_damaged_config_json_is_a_config_error(tmp_path):
  from experiments import setup

  for text in ('{"seed": 0, "dataset": {"na', "[1, 2]", ""):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(setup.ConfigError, match="config.json.*damaged"):
      evaluate.load_run_config(str(tmp_path))


def test_measure_with_a_missing_config_is_one_line_and_status_2(tiny_run):
  workdir, _ = tiny_run
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--workdir",
                           str(workdir), "--measure_with=configs/no_such_config.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "no_such_config.py" in lines[0], result.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    ([], "config.json"),
    (["--num_test=-5"], "num_test"),       # before: evaluated 59 of 64 examples, status 0
])
def test_evaluate_bad_input_is_one_line_and_status_2(tmp_path, args, message):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--workdir",
                           str(tmp_path / "nothing"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def test_information_plane_workdir_that_is_a_file_is_one_line_and_status_2(tmp_path):
  (tmp_path / "a_file").write_text("mine")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "experiments.information_plane",
                           "--config", "configs/default.py", "--workdir",
                           str(tmp_path / "a_file")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "a_file" in lines[0], result.stderr[-2000:]
  assert (tmp_path / "a_file").read_text() == "mine"


def test_information_plane_variants():
  config = tiny_config()
  variants = information_plane.variants(config, [0.1, 0.2], elbo_rmse=0.15)
  assert list(variants) == ["elbo", "elbo_annealed", "geco_re_0.1", "geco_re_0.2",
                            "geco_matched"]
  assert variants["elbo"].objective == "elbo" and variants["elbo"].elbo.learn_sigma
  assert variants["elbo_annealed"].objective == "elbo_annealed"
  assert variants["geco_re_0.2"].constraints.re.tolerance == 0.2
  assert variants["geco_matched"].constraints.re.tolerance == 0.15
  assert config.objective == "geco" and config.constraints.re.tolerance == 0.1


def test_information_plane_variant_selection():
  information_plane.check_selection([], [0.1], match_elbo=False)
  information_plane.check_selection(["elbo", "geco_matched"], [], match_elbo=True)
  with pytest.raises(ValueError, match="unknown variant.*geco_re_0.2.*variants are elbo, "
                     "elbo_annealed, geco_re_0.1\\.$"):
    information_plane.check_selection(["geco_re_0.2"], [0.1], match_elbo=False)
  with pytest.raises(ValueError, match="unknown variant.*geco_matched"):
    information_plane.check_selection(["elbo", "geco_matched"], [], match_elbo=False)
  with pytest.raises(ValueError, match="name elbo in --variants"):
    information_plane.check_selection(["geco_matched"], [], match_elbo=True)


def test_information_plane_reads_the_trajectories_and_plots(tiny_run, tmp_path):
  workdir, summary = tiny_run
  series = information_plane.read_scalars(str(workdir), ("lambda/re", "kl", "rmse"))
  assert [step for step, _ in series["lambda/re"]] == [2, 4]
  assert series["lambda/re"][-1][1] == pytest.approx(summary["lambda"]["re"], rel=1e-6)
  evaluation = evaluate.evaluate_run(str(workdir), num_train=32, num_marginal=0)
  assert evaluation["marginal_kl"] is None          # 0: not computed
  config = tiny_config()
  row = information_plane._row("geco_re_0.1", config, summary, evaluation)
  assert set(row) == set(information_plane.COLUMNS)
  # Met in the constraint's own aggregate: the test root_mse, not the mean RMSE.
  assert row["re_satisfied"] == (evaluation["root_mse"] <= 0.1)
  assert row["re_satisfied"] == (evaluation["constraints"]["re"] <= 0)
  between = dict(evaluation, rmse=0.09, root_mse=0.11, mse=0.0121, train_root_mse=0.095)
  assert not information_plane._row("geco_re_0.1", config, summary, between)["re_satisfied"]
  assert information_plane.matched_target(between) == pytest.approx(0.095)
  assert information_plane.matched_target(between, "test") == pytest.approx(0.11)
  with pytest.raises(ValueError, match="split must be"):
    information_plane.matched_target(between, "valid")
  assert row["marginal_kl"] is None and row["marginal_kl_se"] is None
  table = information_plane.markdown_table([row])
  assert table.count("\n") == 3 and "geco_re_0.1" in table
  infeasible = dict(row, variant="geco_re_0.05", re_satisfied=False)
  feasible = dict(row, re_satisfied=True)
  elbo = dict(row, variant="elbo", objective="elbo", re_satisfied=None)
  assert information_plane.figure3_row([elbo, infeasible, feasible]) is feasible
  assert information_plane.figure3_row([elbo, infeasible]) is infeasible
  assert information_plane.figure3_row([elbo]) is None
  information_plane.plot([row], {"geco_re_0.1": series}, str(tmp_path))
  assert (tmp_path / "information_plane.png").exists()
  assert (tmp_path / "figure3.png").exists()


def test_an_interrupted_variant_ends_the_information_plane_before_any_table(
    tmp_path, monkeypatch):
  """A signal during the ELBO's training used to be a summary like any other:
  the unfinished ELBO was evaluated, tabled and (with --match_elbo) set GECO's
  target, and the next variant trained under a trainer that had forgotten
  the signal. Now the run stops with its step saved, and the same call
  resumes it and goes on."""
  config = tiny_config(num_steps=6, eval_every=3, checkpoint_every=100)
  experiment_evaluate = train.Experiment.evaluate
  calls = []

  def evaluate_then_signal(self, *args, **kwargs):
    metrics = experiment_evaluate(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGTERM)   # as if it came during the evaluation
    return metrics

  monkeypatch.setattr(train.Experiment, "evaluate", evaluate_then_signal)
  only = ("elbo", "geco_re_0.1")
  stop = cli.StopRequest()
  with stop, pytest.raises(cli.Interrupted, match="by SIGTERM during variant elbo at "
                           "step 3, which is saved") as e:
    information_plane.run(config, str(tmp_path), [0.1], match_elbo=False, only=only,
                          stop=stop, num_train=32, num_marginal=0)
  assert e.value.exit_status == 128 + signal.SIGTERM
  assert sorted(os.listdir(tmp_path)) == ["elbo"], "no other variant, no table"
  rows = information_plane.run(config, str(tmp_path), [0.1], match_elbo=False, only=only,
                               stop=cli.StopRequest(), num_train=32, num_marginal=0)
  assert [row["variant"] for row in rows] == ["elbo", "geco_re_0.1"]
  assert all(row["steps"] == 6 for row in rows)
  assert (tmp_path / "results.csv").exists()


def test_micro_mnist_variants_from_a_locked_config(tmp_path):
  from configs import nvp_micro_mnist
  from experiments import micro_mnist

  config = nvp_micro_mnist.get_config()
  config.lock()   # as --config gives it
  variants = micro_mnist.variants(config, str(tmp_path), 0.9)
  assert list(variants) == ["elbo", "geco_re", "geco_re_cla"]
  assert variants["geco_re_cla"].constraints.cla.classifier == str(tmp_path)
  assert "cla" not in config.constraints
  assert list(micro_mnist.variants(config, str(tmp_path / "none"), 0.9)) == ["elbo",
                                                                              "geco_re"]


@needs_mnist
def test_micro_mnist_checks_its_data_before_writing(tmp_path):
  """A batch larger than micro_mnist's images is one line, exit 2, and no workdir."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
      [sys.executable, "-m", "experiments.micro_mnist", "--config",
       "configs/nvp_micro_mnist.py", "--config.batch_size=8", "--workdir",
       str(tmp_path / "run"), "--classifier", str(tmp_path / "none")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 2, done.stderr[-2000:]
  lines = [l for l in done.stderr.strip().splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and "exceeds the 7 training examples" in lines[0], done.stderr
  assert "Traceback" not in done.stderr
  assert not (tmp_path / "run").exists()


def test_the_marginal_kl_programs_are_shared_by_a_models_runs_not_their_parameters():
  """Compiled once per model (cached), with the parameters as arguments: a second
  run's estimate is its own, equal to one from a fresh cache."""
  import jax

  from experiments import setup
  from geco_jax.models import ConvDraw
  from geco_jax.models import ConvVAE
  from geco_jax.models import VAENVP

  images = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 8, 1))
  rng = jax.random.PRNGKey(3)
  models = [
      ConvVAE(image_shape=(8, 8, 1), channels=(4, 8), hidden_size=8, latent_size=2),
      VAENVP(image_shape=(8, 8, 1), channels=(4, 8), hidden_size=8, latent_size=2,
             num_couplings=2, coupling_hidden_size=8),
      ConvDraw(image_shape=(8, 8, 1), num_steps=2, hidden_channels=8, latent_channels=2,
               read_channels=4, kernel_size=3),
  ]
  caches = (evaluate._encoder_fn, evaluate._vae_nvp_marginal_kl_fns,  # pylint: disable=protected-access
            evaluate._convdraw_marginal_kl_fns)                       # pylint: disable=protected-access
  for model in models:
    runs = [{"model": setup.init_model(model, jax.random.PRNGKey(seed), {"image": images})}
            for seed in (1, 7)]
    estimates = [evaluate._marginal_kl(model, params, {"image": images}, rng)["kl"]  # pylint: disable=protected-access
                 for params in runs]
    assert estimates[0] != estimates[1], type(model).__name__
    for cache in caches:
      cache.cache_clear()
    fresh = evaluate._marginal_kl(model, runs[1], {"image": images}, rng)["kl"]  # pylint: disable=protected-access
    assert fresh == pytest.approx(estimates[1], rel=1e-6), type(model).__name__
    again = evaluate._marginal_kl(model, runs[1], {"image": images}, rng)["kl"]  # pylint: disable=protected-access
    assert again == pytest.approx(estimates[1], rel=1e-6)
    assert sum(cache.cache_info().hits for cache in caches) == 1, type(model).__name__
