r"""Train a VAE with GECO from an ml_collections config.

  python -m experiments.main --config configs/default.py --workdir runs/default \
      [--config.num_steps=5000 --config.constraints.re.tolerance=0.08]

A config that does not exist, an override of a key that does not exist, a
value of the wrong type or a value that makes no sense ends with one line on
stderr and exit status 2, before anything is compiled.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs and checkpoints.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

USAGE_ERROR = 2


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def _parse_flags(argv):
  """Parse flags; a bad flag or config is one line and exit status 2, not a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  except (OSError, ImportError, SyntaxError, AttributeError, KeyError, TypeError,
          ValueError) as e:  # Raised while loading a broken config module.
    _fail(f"could not load the config: {type(e).__name__}: {e}")


def _quiet_library_logs() -> None:
  """Drop the INFO chatter of orbax (a dozen lines per checkpoint); keep warnings."""

  def keep(record) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname

  logging.get_absl_handler().python_handler.addFilter(keep)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if not isinstance(config, ml_collections.ConfigDict):
    # config_flags defers a load failure (missing file, broken module) to the
    # first use of the config; report it now, in one line.
    try:
      config.seed  # pylint: disable=pointless-statement
      reason = ""
    except OSError as e:
      reason = " ".join(str(e.__cause__ or e).split())
    except Exception:  # pylint: disable=broad-except
      reason = ""
    reason = reason or (
        f"get_config() returned {type(config).__name__}, not a ConfigDict")
    _fail(f"could not load --config={FLAGS['config'].serialize().split('=', 1)[-1]}: "
          f"{reason}")
  # Imported here so that --help and flag errors do not pay for JAX and TF.
  from experiments import setup
  from experiments import train

  try:
    setup.validate_config(config)
  except setup.ConfigError as e:
    _fail(str(e))
  _quiet_library_logs()
  logging.info("Config:\n%s", config)
  try:
    summary = train.train_and_evaluate(config, _WORKDIR.value)
  except FloatingPointError as e:  # Diverged: reported, the checkpoints kept.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print("final: " + json.dumps(summary, sort_keys=True), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
