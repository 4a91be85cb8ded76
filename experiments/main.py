r"""Train a VAE with GECO from an ml_collections config.

  python -m experiments.main --config configs/default.py --workdir runs/default \
      [--config.num_steps=5000 --config.constraints.re.tolerance=0.08]

A config that does not exist, an override of a key that does not exist, a
value of the wrong type or a value that makes no sense ends with one line on
stderr and exit status 2, before anything is compiled.

SIGTERM or Ctrl-C during training saves the step in flight and exits 0 with
``"interrupted": true`` in the summary; before training began (while the
config, the data or the model load), it stops there with one line and exit
status 128 + the signal, nothing written; a second signal stops at once
(exit 130).
"""

from __future__ import annotations

import json
import os
import sys

from absl import logging

from experiments import cli

# Entered by cli.run before the flags are parsed: no signal is lost (see cli.StopRequest).
STOP = cli.StopRequest()


def initialize_distributed() -> None:
  """``jax.distributed.initialize()``, before any JAX computation.

  On Cloud TPU, Slurm or Open MPI, JAX finds the coordinator and the process
  ids itself; elsewhere set ``JAX_COORDINATOR_ADDRESS`` (host:port of process
  0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on every host.
  """
  import jax

  env = os.environ
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in env:
    kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
  for key, name in (("JAX_NUM_PROCESSES", "num_processes"),
                    ("JAX_PROCESS_ID", "process_id")):
    if key in env:
      kwargs[name] = int(env[key])
  jax.distributed.initialize(**kwargs)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config_or_fail()
  # Imported here so that --help and flag errors do not pay for JAX; the
  # trainer (and TensorFlow, through clu) only once the config is valid.
  from experiments import setup

  try:
    setup.validate_config(config)
    setup.check_workdir_matches(config, cli.WORKDIR.value)
    setup.check_workdir_usable(cli.WORKDIR.value)
  except setup.ConfigError as e:
    cli.fail(str(e))
  STOP.raise_if_requested("before training began; nothing was written.")
  cli.quiet_library_logs()
  cli.apply_xla_flags(config)
  if config.distributed:
    try:
      initialize_distributed()
    except (ValueError, RuntimeError) as e:
      cli.fail("config.distributed=True, but jax.distributed.initialize() failed: "
               f"{' '.join(str(e).split())}. Run under a cluster JAX detects (e.g. "
               "SLURM), or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
               "JAX_PROCESS_ID.")
  from experiments import train
  try:
    data = setup.make_dataset(config)  # a missing dataset is reported here
    logging.info("Config:\n%s", config)
    summary = train.train_and_evaluate(config, cli.WORKDIR.value, data=data, stop=STOP)
  except (setup.ConfigError, train.CheckpointError) as e:
    cli.fail(" ".join(str(e).split()))
  except FloatingPointError as e:  # Diverged: reported, the checkpoints kept.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:  # a second SIGTERM / SIGINT: stop now, unsaved
    print("error: stopped by a second signal, without saving this step; the newest "
          "complete checkpoint is kept, and the run resumes from it.",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)  # pylint: disable=protected-access  (orbax's threads would print)
  print("final: " + json.dumps(summary, sort_keys=True), flush=True)


if __name__ == "__main__":
  cli.require("config", "workdir")
  cli.run(main, stop=STOP)
