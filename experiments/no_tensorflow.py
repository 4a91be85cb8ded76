r"""Run an experiment module where TensorFlow is not installed.

  python -m experiments.no_tensorflow experiments.information_plane \
      --config configs/conv_vae_mnist.py --workdir runs/x [flags of that module]

clu's ``metric_writers`` package imports its TensorFlow summary writer when it
is imported, so ``experiments.train`` (hence ``experiments.main``,
``experiments.information_plane``) needs TensorFlow. Accelerator images that
ship JAX and PyTorch but no TensorFlow (the GPU machines this project's
accelerator numbers came from) can still run them through this runner: where
``tensorflow`` cannot be found, it stands in for
``clu.metric_writers.summary_writer`` with clu's own ``TorchTensorboardWriter``
(``torch.utils.tensorboard``; it needs torch and the ``tensorboard`` package),
which writes TensorBoard event files too, with the metrics as scalar summaries
instead of tensor summaries (``experiments.information_plane.read_scalars``
reads both). Where TensorFlow is installed the module runs unchanged.

Everything else (the config, the flags, the checkpoints) is the module's own.
"""

from __future__ import annotations

import importlib.util
import numbers
import runpy
import sys
import types


def _torch_summary_writer():
  """clu's TorchTensorboardWriter, adapted to what ``experiments.train`` writes."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from clu.metric_writers import torch_tensorboard_writer  # pylint: disable=import-outside-toplevel

  class SummaryWriter(torch_tensorboard_writer.TorchTensorboardWriter):
    """Images as [N, H, W, C] batches or [H, W, C]; hparams of any value type."""

    def write_images(self, step, images):
      for key, value in images.items():
        value = np.asarray(value)
        if value.ndim == 4:
          self._writer.add_images(key, value, global_step=step, dataformats="NHWC")
        else:
          self._writer.add_image(key, value, global_step=step, dataformats="HWC")

    def write_hparams(self, hparams):
      # torch takes int, float, str and bool only (clu's TF writer any value).
      self._writer.add_hparams(
          {k: v if isinstance(v, (numbers.Number, str, bool)) else str(v)
           for k, v in hparams.items()}, {})

  return SummaryWriter


def install(force: bool = False) -> bool:
  """Stands in for clu's TensorFlow summary writer when TensorFlow is missing.

  Returns whether it did (False where ``tensorflow`` can be imported, unless
  ``force``: the tests use it beside TensorFlow). Must run before
  ``clu.metric_writers`` is first imported.
  """
  if not force and importlib.util.find_spec("tensorflow") is not None:
    return False
  if "clu.metric_writers" in sys.modules:
    raise RuntimeError("clu.metric_writers was imported before the stand-in.")
  module = types.ModuleType("clu.metric_writers.summary_writer")

  class SummaryWriter:  # resolved on first use: clu.metric_writers imports this module
    def __new__(cls, logdir, *args, **kwargs):
      del args, kwargs
      return _torch_summary_writer()(logdir)

  module.SummaryWriter = SummaryWriter
  sys.modules[module.__name__] = module
  return True


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    print("usage: python -m experiments.no_tensorflow MODULE [its flags...]",
          file=sys.stderr)
    sys.exit(2)
  module = sys.argv[1]
  if install():
    print(f"[experiments.no_tensorflow] no TensorFlow: {module} writes TensorBoard "
          "files through torch.utils.tensorboard", file=sys.stderr)
  sys.argv = [module, *sys.argv[2:]]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
