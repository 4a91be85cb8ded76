"""Shared builders of the paper's experiment configs (one file per experiment).

Each ``configs/<model>_<dataset>.py`` calls one builder here and states, in its
docstring, the command that runs it and what it reproduces. A config takes an
optional argument after a colon: ``cpu`` (default; sized for a 2-core CPU) or
``accelerator`` (the paper-sized model), e.g.
``--config configs/convdraw_mnist.py:accelerator``.
"""

from typing import Optional

import ml_collections

from configs import base

SIZES = ("cpu", "accelerator")


def _size(arg) -> str:
  size = arg or "cpu"
  if size not in SIZES:
    raise ValueError(f"config argument must be one of {SIZES}; got {size!r}.")
  return size


def _common(dataset: str, source: str, size: str) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.dataset.name = dataset
  config.dataset.source = source
  config.batch_size = 32 if size == "cpu" else 64
  config.num_steps = 3000 if size == "cpu" else 200_000
  # GQN annealed sigma over its first 200k of 1.6M+ steps (1/8 of the run);
  # scaled to these runs, over the first half (a choice, docs/results.md).
  config.elbo.anneal_steps = config.num_steps // 2
  config.optimizer.learning_rate = 1e-3 if size == "cpu" else 5e-4
  config.log_every = 50 if size == "cpu" else 500
  config.image_every = 500 if size == "cpu" else 5000
  config.eval_every = 1000 if size == "cpu" else 10000
  config.eval_num_examples = 1000 if size == "cpu" else None
  config.checkpoint_every = 500 if size == "cpu" else 5000
  config.num_image_samples = 16 if size == "cpu" else 64
  return config


def add_re(config, tolerance: float, lambda_lr: Optional[float] = None):
  """RE constraint: per-pixel RMSE <= tolerance (paper Table 1).

  Its multiplier's step is ``config.geco.lambda_lr`` (1e-4) unless ``lambda_lr``
  is given, so that ``--config.geco.lambda_lr`` sets it from the command line.
  """
  config.constraints.re = ml_collections.ConfigDict()
  config.constraints.re.tolerance = tolerance
  if lambda_lr is not None:
    config.constraints.re.lambda_lr = lambda_lr
  return config


# XLA:CPU (jaxlib 0.10) runs a convolution through YNNPACK by default, on one
# thread when the work per image is small (below about 40 MFLOP: measured
# 92-99 GF/s for them against 170-200 GF/s above, on 2 cores, whatever the
# batch). Every gate convolution of the CPU ConvDraw presets is below, so
# ConvDraw keeps YNNPACK for dots and reductions and leaves convolutions to
# XLA's own (Eigen) kernels, which use both cores: its training step runs
# 1.3-1.5x faster (docs/performance.md). The conv VAE and VAE+NVP measured
# faster with YNNPACK's convolutions and keep the default. On an accelerator
# this CPU flag does nothing.
CPU_CONVOLUTIONS_WITHOUT_YNNPACK = (
    "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce")

# ConvDraw's flags: the above, and 512-bit vectors for XLA's own loops (the
# LSTMs' elementwise work; the CPU is AVX-512): ConvDraw's JAX / torch ratio
# 0.87 -> 0.92 in two pairs of benchmark runs (docs/performance.md, lever 22).
CONVDRAW_CPU_XLA_FLAGS = (
    CPU_CONVOLUTIONS_WITHOUT_YNNPACK + " --xla_cpu_prefer_vector_width=512")


def convdraw(dataset: str, preset_family: str, arg=None, *, source: str = "npz",
             tolerance: float = 0.1, conditional: bool = False):
  """ConvDraw (or conditional ConvDraw) with GECO and an RE constraint."""
  size = _size(arg)
  config = _common(dataset, source, size)
  config.model.name = "conditional_convdraw" if conditional else "convdraw"
  config.model.preset = f"{preset_family}_{size}"
  # Who computes the stride-1 convolutions. 'auto' (experiments.setup.make_model,
  # geco_jax.models.convdraw.choose_convolutions): on one CPU device where
  # oneDNN is available (installed with geco-jax on x86-64 Linux, built with
  # g++ at first use), 'onednn_winograd': the gates' 3x3 convolutions by
  # Winograd's F(2x2, 3x3) with oneDNN's sgemm, the others by oneDNN's direct
  # ones, on XLA:CPU's pool; everywhere else (accelerators, several devices,
  # no oneDNN) XLA's own, 'xla'. On the project's CPU the step ran at
  # 1.23-1.25 of its PyTorch twin's with 'onednn_winograd' against 0.86-0.93
  # with 'xla' (docs/performance.md, levers 38-40). Same parameters either
  # way: set 'xla' to pin XLA's. (configs/base.py sets 'auto' for every model;
  # it is repeated here because ConvDraw's meaning of it differs.)
  config.model.convolutions = "auto"
  config.xla_flags = CONVDRAW_CPU_XLA_FLAGS
  return add_re(config, tolerance)


def vae_nvp(dataset: str, arg=None, *, source: str = "npz", tolerance: float = 0.1,
            preset=None):
  """VAE with a RealNVP posterior, GECO with an RE constraint."""
  size = _size(arg)
  config = _common(dataset, source, size)
  config.model.name = "vae_nvp"
  config.model.preset = preset or size
  config.batch_size = 64
  return add_re(config, tolerance)
