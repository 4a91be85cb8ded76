"""The default experiment from the command line: bad input, a short run, resumption."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Small enough to run in seconds on a CPU; the full default run is the slow test below.
SHORT = ["--config.num_steps=30", "--config.log_every=10", "--config.image_every=30",
         "--config.checkpoint_every=10", "--config.dataset.num_train=512",
         "--config.dataset.num_test=100", "--config.num_image_samples=16"]


def _run(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _summary(result) -> dict:
  lines = [l for l in result.stdout.splitlines() if l.startswith("final: ")]
  assert len(lines) == 1, result.stdout + result.stderr
  return json.loads(lines[0][len("final: "):])


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/does_not_exist.py"], "does_not_exist.py"),
    (["--config", "configs/default.py", "--config.no_such_key=1"], "no_such_key"),
    (["--config", "configs/default.py", "--config.batch_size=abc"], "batch_size"),
    (["--config", "configs/default.py", "--config.batch_size=0"], "batch_size"),
    (["--config", "configs/default.py", "--config.constraints.re.tolerance=-0.1"],
     "tolerance"),
    (["--config", "configs/default.py", "--config.geco.alpha=1.5"], "alpha"),
    (["--config", "configs/default.py", "--config.dataset.name=imagenet"], "dataset.name"),
    (["--config", "configs/default.py", "--config.objective=vae"], "objective"),
    (["--config", "configs/default.py", "--config.model.name=convdraw"], "model.preset"),
    (["--config", "configs/default.py", "--config.model.name=convdraw",
      "--config.model.preset=mnist_cpu"], "ConvDraw has no such argument"),
    (["--config", "configs/convdraw_mnist.py", "--config.dataset.name=mnist_sum"],
     "conditional_convdraw"),
    (["--config", "configs/convdraw_mnist_sum.py", "--config.model.name=convdraw"],
     "(context, target)"),
    (["--config", "configs/convdraw_mnist.py:huge"], "accelerator"),
    (["--config", "configs/convdraw_mnist.py", "--config.model.convolutions=cudnn"],
     "convolutions must be one of"),
    (["--config", "configs/default.py", "--config.batch_size=30000"], "batch_size"),
    (["--config", "configs/default.py", "--config.model.hiden_size=8"],
     "it has no field 'hiden_size'; Did you mean \"hidden_size\""),
    (["--config", "configs/default.py", "--config.eval_split=train"], "eval_split must be"),
    (["--config", "configs/default.py", "--config.eval_split=validation"],
     "needs config.dataset.num_validation > 0"),
    (["--config", "configs/default.py", "--config.dataset.seed=-1"],
     "dataset.seed must be an integer >= 0"),
    (["--config", "configs/default.py", "--config.dataset.num_validation=-1"],
     "num_validation must be an integer >= 0"),
    (["--config", "configs/default.py", "--config.dataset.num_train=100",
      "--config.dataset.num_validation=100"], "must leave training examples"),
    (["--config", "configs/default.py", "--config.dataset.num_train=100",
      "--config.dataset.num_validation=50"], "left after holding out"),
    (["--config", "configs/nvp_micro_mnist.py", "--config.dataset.num_validation=1"],
     "nothing can be held out"),
    (["--config", "configs/default.py", "--config.constraints.re.tolerance=inf"],
     "tolerance must be finite"),
    (["--config", "configs/default.py", "--config.distributed=True"],
     "jax.distributed.initialize() failed"),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, args, message):
  result = _run(*args, "--workdir", str(tmp_path / "run"))
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert message in lines[0]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists(), "nothing is written for a bad config"


def _run_main_script(script: str, workdir) -> subprocess.CompletedProcess:
  """``script`` (which ends by running experiments.main) with a tiny default config."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
      [sys.executable, "-c", script, "--config", "configs/default.py", "--workdir",
       str(workdir), "--config.dataset.num_train=64", "--config.dataset.num_test=16"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_second_signal_is_one_line_and_exit_status_130(tmp_path):
  """The second SIGTERM / SIGINT stops at once (the trainer raises KeyboardInterrupt
  from its handler): one line, no traceback, status 130 as for a shell's Ctrl-C."""
  script = textwrap.dedent("""
      from experiments import cli, main, train
      def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
      train.train_and_evaluate = interrupted
      cli.require("config", "workdir")
      cli.run(main.main, stop=main.STOP)
  """)
  result = _run_main_script(script, tmp_path / "run")
  assert result.returncode == 130, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: stopped by a second signal"), result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_an_unknown_field_in_a_config_file_is_an_error(tmp_path):
  config_file = tmp_path / "typo.py"
  config_file.write_text(
      "from configs import default\n"
      "def get_config():\n"
      "  config = default.get_config()\n"
      "  config.optimizer.learnig_rate = 1e-3\n"
      "  return config\n")
  result = _run("--config", str(config_file), "--workdir", str(tmp_path / "run"))
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
  assert "optimizer.learnig_rate" in result.stderr


def test_model_arguments_the_model_rejects_are_a_config_error(tmp_path):
  # Checks that only the model makes (VAENVP: latent_size >= 2) are reported as
  # a ConfigError (one line and status 2 from experiments.main, above), and
  # before the workdir is created.
  from configs import nvp_mnist
  from experiments import setup
  from experiments import train
  config = nvp_mnist.get_config()
  config.model.latent_size = 1
  config.dataset.num_train, config.dataset.num_test = 64, 32
  with pytest.raises(setup.ConfigError,
                     match=r"config.model: the vae_nvp model cannot be built: .*latent_size >= 2"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_workdir_that_cannot_be_written_is_a_config_error(tmp_path):
  # (experiments.main reports a ConfigError as one line and status 2, above.)
  from experiments import setup
  (tmp_path / "a_file").write_text("not a directory")
  for workdir, reason in ((tmp_path / "a_file", "File exists"),
                          (tmp_path / "a_file" / "run", "Not a directory")):
    with pytest.raises(setup.ConfigError, match=f"--workdir {workdir} cannot be used: {reason}"):
      setup.prepare_workdir(workdir)
  assert (tmp_path / "a_file").read_text() == "not a directory"
  setup.prepare_workdir(tmp_path / "new" / "run")
  assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())


def test_an_unusable_workdir_is_found_before_anything_loads(tmp_path):
  """check_workdir_usable refuses what prepare_workdir would, without writing;
  experiments.main then fails with one line, before the data or the model (it
  used to print the config and load the data first)."""
  from experiments import setup
  (tmp_path / "a_file").write_text("not a directory")
  for workdir, reason in ((tmp_path / "a_file", "it is a file"),
                          (tmp_path / "a_file" / "run", f"it lies under a file, {tmp_path / 'a_file'}")):
    with pytest.raises(setup.ConfigError, match=f"--workdir {workdir} cannot be used: {reason}"):
      setup.check_workdir_usable(workdir)
  setup.check_workdir_usable(tmp_path / "new" / "run")
  setup.check_workdir_usable(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"], "nothing is written"
  result = _run("--config", "configs/default.py", "--workdir", str(tmp_path / "a_file"))
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      f"error: --workdir {tmp_path / 'a_file'} cannot be used: it is a file."]


def test_missing_workdir_is_an_error(tmp_path):
  result = _run("--config", "configs/default.py")
  assert result.returncode == 2
  assert "workdir" in result.stderr


def test_short_run_logs_checkpoints_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  result = _run("--config", "configs/default.py", "--workdir", str(workdir), *SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = _summary(result)
  assert summary["step"] == 30
  assert set(summary["lambda"]) == {"re"} and summary["lambda"]["re"] > 0
  assert "eval" in summary and summary["eval"]["rmse"] > 0
  events = list(workdir.glob("events.out.tfevents.*"))
  assert events, "no TensorBoard event file"
  assert (workdir / "checkpoints" / "30").is_dir()
  assert "steps/s" in result.stderr  # progress: steps/s and ETA are logged

  # The event file holds the scalars and the image grids.
  from tensorboard.backend.event_processing import event_accumulator
  accumulator = event_accumulator.EventAccumulator(str(workdir), size_guidance={
      event_accumulator.TENSORS: 0})
  accumulator.Reload()
  tags = set(accumulator.Tags()["tensors"])
  for tag in ("kl", "loss", "lambda/re", "constraint/re", "constraint_ma/re", "gaussian_nll",
              "grad_norm", "param_norm", "update_norm", "nonfinite_steps",
              "steps_per_sec", "eval/kl", "eval/gaussian_nll", "eval/constraint/re",
              "data", "reconstructions", "prior_samples"):
    assert tag in tags, (tag, sorted(tags))

  # Started again in the same workdir with more steps, it resumes at step 30.
  again = _run("--config", "configs/default.py", "--workdir", str(workdir),
               *SHORT[1:], "--config.num_steps=40")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resumed from the checkpoint of step 30" in again.stderr
  assert _summary(again)["step"] == 40

  # A run that diverges says so in one line, exits 1 and leaves the checkpoints as they were.
  diverged = _run("--config", "configs/default.py", "--workdir", str(workdir),
                  *SHORT[1:], "--config.num_steps=60", "--config.log_every=5",
                  "--config.max_consecutive_nonfinite=3",
                  "--config.optimizer.learning_rate=1e8")
  assert diverged.returncode == 1, diverged.stderr[-3000:]
  last_line = diverged.stderr.strip().splitlines()[-1]
  assert "error: training stopped at step" in last_line, last_line
  assert "non-finite loss or gradient" in last_line
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit())[-1] == 40

  # Another model in the same workdir: one line, exit 2, the run left as it was.
  stored = (workdir / "config.json").read_text()
  other = _run("--config", "configs/default.py", "--workdir", str(workdir), *SHORT[1:],
               "--config.num_steps=60", "--config.model.hidden_size=32")
  assert other.returncode == 2, other.stderr[-3000:]
  lines = other.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "hidden_size" in lines[0]
  assert "holds checkpoints of another run" in lines[0]
  assert (workdir / "config.json").read_text() == stored
  assert not (workdir / "corrupt_checkpoints").exists()


@pytest.mark.slow
def test_default_experiment_meets_its_constraint(tmp_path):
  result = _run("--config", "configs/default.py", "--workdir", str(tmp_path / "run"),
                timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = _summary(result)
  assert summary["satisfied"], summary
  assert summary["eval"]["constraint/re"] <= 0, summary
  assert summary["best_feasible"]["step"] == 3000, summary


# --------------------------------------------------------------------------- #
# Two constraints, one of them CLA, on MNIST
# --------------------------------------------------------------------------- #

DATA_DIR = os.environ.get("GECO_DATA_DIR")
needs_mnist = pytest.mark.skipif(
    not DATA_DIR or not os.path.exists(os.path.join(DATA_DIR or "", "mnist.npz")),
    reason="GECO_DATA_DIR is unset or has no mnist.npz; set it to the shared data "
           "directory (e.g. GECO_DATA_DIR=../shared/data) to run this test.")


def test_cla_without_a_trained_classifier_says_how_to_train_one(tmp_path):
  result = _run("--config", "configs/mnist_cla.py", "--workdir", str(tmp_path / "run"),
                f"--config.constraints.cla.classifier={tmp_path / 'missing'}")
  assert result.returncode == 2, result.stderr
  assert "experiments.train_classifier" in result.stderr.strip().splitlines()[-1]


def test_cla_needs_labelled_mnist(tmp_path):
  result = _run("--config", "configs/mnist_cla.py", "--workdir", str(tmp_path / "run"),
                "--config.dataset.name=sprites", "--config.dataset.source=generated")
  assert result.returncode == 2
  assert "labelled MNIST" in result.stderr


@needs_mnist
def test_re_and_cla_constraints_train_together(tmp_path):
  import jax
  import jax.numpy as jnp
  from geco_jax.models import classifier as classifier_lib

  # An untrained classifier is enough to check the wiring (not the accuracy).
  model = classifier_lib.MNISTClassifier()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  path = classifier_lib.save_classifier(
      tmp_path / "classifier", params,
      {"architecture": classifier_lib.architecture_of(model), "test_accuracy": 0.1})
  result = _run("--config", "configs/mnist_cla.py", "--workdir", str(tmp_path / "run"),
                f"--config.constraints.cla.classifier={path}", *SHORT[:-3])
  assert result.returncode == 0, result.stderr[-3000:]
  summary = _summary(result)
  assert set(summary["lambda"]) == {"re", "cla"}
  assert {"constraint/re", "constraint/cla"} <= set(summary["eval"])


def test_a_signal_before_training_stops_there_in_one_line_writing_nothing(tmp_path):
  """A SIGINT while the data loads used to be a KeyboardInterrupt wherever it
  landed: reported as "a second signal", a traceback, or (inside JAX's gc
  callback) ignored, the run going on. Now the program's StopRequest keeps it
  and the run stops before writing its workdir: one line, status 128 + 2."""
  script = textwrap.dedent("""
      import os, signal
      from experiments import cli, main, setup
      make_dataset = setup.make_dataset
      def make_dataset_then_signal(config):
        data = make_dataset(config)
        os.kill(os.getpid(), signal.SIGINT)   # as if Ctrl-C came while it loaded
        return data
      setup.make_dataset = make_dataset_then_signal
      cli.require("config", "workdir")
      cli.run(main.main, stop=main.STOP)
  """)
  result = _run_main_script(script, tmp_path / "run")
  assert result.returncode == 128 + signal.SIGINT, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert errors == [f"error: stopped by SIGINT before training began; nothing was "
                    f"written to {tmp_path / 'run'}."], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


def test_ctrl_c_in_a_program_without_a_stop_request_is_one_line(tmp_path):
  script = textwrap.dedent("""
      from experiments import cli, evaluate
      def interrupted(argv):
        raise KeyboardInterrupt
      cli.require("workdir")
      cli.run(interrupted)
  """)
  result = subprocess.run([sys.executable, "-c", script, "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 130, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      "error: interrupted (SIGINT); what was written before is kept."]
