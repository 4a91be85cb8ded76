r"""Paper Figure 8: posteriors of a 2-D-latent VAE+NVP on Micro-MNIST, ELBO vs GECO.

  GECO_DATA_DIR=../shared/data python -m experiments.micro_mnist \
      --config configs/nvp_micro_mnist.py --workdir runs/micro_mnist \
      [--classifier=runs/mnist_classifier/classifier]

Trains (or collects) into ``workdir/<variant>``:

- ``elbo``: the Gaussian ELBO with a learned sigma;
- ``geco_re``: GECO with the config's RE constraint;
- ``geco_re_cla``: GECO with RE and CLA (the MNIST classifier of
  ``--classifier``, mean probability of the true class >= ``--cla_tolerance``);
  skipped, with a message, when no classifier is there;

then draws ``--num_samples`` z ~ q(z|x) for each of the 7 images and writes
``posterior_samples.npz`` (per variant: samples [7, S, 2]), ``summary.json``
and ``figure8.png`` (one panel per variant, samples coloured by image, with
the prior's 1- and 2-sigma circles).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags
from absl import logging

from experiments import cli

# Entered by cli.run before the flags are parsed: no signal is lost (see cli.StopRequest).
STOP = cli.StopRequest()
_CLASSIFIER = flags.DEFINE_string("classifier", "runs/mnist_classifier/classifier",
                                  "The MNIST classifier of the CLA variant.")
_CLA_TOLERANCE = flags.DEFINE_float("cla_tolerance", 0.9,
                                    "CLA: mean probability of the true class.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 100, "Posterior samples per image.",
                                    lower_bound=1)


def variants(config, classifier: str, cla_tolerance: float) -> dict:
  from experiments.information_plane import with_objective

  out = {"elbo": with_objective(config, "elbo", learn_sigma=True),
         "geco_re": with_objective(config, "geco")}
  if os.path.isdir(classifier):
    cla = with_objective(config, "geco")
    with cla.unlocked():  # command-line configs are locked
      cla.constraints.cla = dict(tolerance=cla_tolerance, lambda_lr=5e-2,
                                 classifier=classifier)
    out["geco_re_cla"] = cla
  else:
    logging.warning("No classifier at %s: the RE + CLA variant is skipped.", classifier)
  return out


def posterior_samples(run_dir: str, num_samples: int, seed: int = 0) -> np.ndarray:
  """[num_images, num_samples, 2] samples of q(z|x) of a run's newest checkpoint."""
  import jax
  import orbax.checkpoint as ocp

  from experiments import evaluate
  from experiments import setup
  from experiments import train

  config = evaluate.load_run_config(run_dir)
  data = setup.make_dataset(config)
  experiment = train.Experiment(config, data, jax.devices()[:1])
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(run_dir), "checkpoints"))
  state = manager.restore(manager.latest_step(),
                          args=ocp.args.StandardRestore(experiment.initial_state()))
  manager.close()
  model = experiment.model
  z, _ = model.apply(jax.device_get(state.params)["model"], data["test"]["image"],
                     jax.random.PRNGKey(seed), num_samples, method=model.posterior_samples)
  return np.asarray(z)


def plot(samples: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4), squeeze=False)
  theta = np.linspace(0, 2 * np.pi, 200)
  for ax, (name, z) in zip(axes[0], samples.items()):
    for i in range(z.shape[0]):
      ax.scatter(z[i, :, 0], z[i, :, 1], s=4, label=str(i))
    for radius in (1, 2):
      ax.plot(radius * np.cos(theta), radius * np.sin(theta), "k:", linewidth=0.8)
    ax.set_aspect("equal")
    ax.set_xlim(-3.5, 3.5)
    ax.set_ylim(-3.5, 3.5)
    ax.set_title(name)
  axes[0][0].legend(title="image", fontsize=6, markerscale=2, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config_or_fail()
  from experiments import setup
  if config.dataset.name != "micro_mnist" or config.model.name != "vae_nvp":
    cli.fail("this experiment needs a VAE+NVP on micro_mnist, e.g. "
             "configs/nvp_micro_mnist.py")
  todo = variants(config, _CLASSIFIER.value, _CLA_TOLERANCE.value)
  try:
    for variant in todo.values():
      setup.validate_config(variant)
    # The data's checks too, before the workdir is made.
    data = {name: setup.make_dataset(variant) for name, variant in todo.items()}
  except setup.ConfigError as e:
    cli.fail(str(e))
  cli.quiet_library_logs()
  from experiments import train

  workdir = cli.WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  summaries, samples = {}, {}
  for name, variant in todo.items():
    run_dir = os.path.join(workdir, name)
    summary = train.train_and_evaluate(variant, run_dir, data=data[name], stop=STOP)
    if summary["interrupted"]:
      raise cli.Interrupted(
          f"stopped by {cli.signal_name(STOP.signal)} during variant {name} at step "
          f"{summary['step']}, which is saved; the same command resumes it and collects "
          "the variants already trained. No figure was written.", STOP.signal)
    summaries[name] = {k: summary.get(k) for k in ("step", "eval", "lambda", "satisfied",
                                                   "sigma", "seconds", "total_seconds")}
    samples[name] = posterior_samples(run_dir, _NUM_SAMPLES.value)
  np.savez(os.path.join(workdir, "posterior_samples.npz"), **samples)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summaries, f, indent=1, sort_keys=True)
  plot(samples, os.path.join(workdir, "figure8.png"))
  print(json.dumps(summaries, sort_keys=True))


if __name__ == "__main__":
  cli.require("config", "workdir")
  cli.run(main, stop=STOP)
