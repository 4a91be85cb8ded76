r"""Unconditional ConvDraw on CelebA (centre-cropped, 64x64) with GECO, RE
constraint (paper section 4.2). CelebA is read through TFDS only
(``$TFDS_DATA_DIR``); it is not in shared/data, so this config runs where TFDS
has prepared celeb_a. It uses the CIFAR-10 ConvDraw presets at 64x64.

  TFDS_DATA_DIR=/path/to/tfds python -m experiments.main \
      --config configs/convdraw_celeb_a.py --workdir runs/convdraw_celeb_a

``:accelerator`` after the file name selects the paper-sized model and
schedule. Baselines with the same model: ``--config.objective=elbo`` (fixed
sigma; add ``--config.elbo.learn_sigma=True`` to learn it) or
``--config.objective=elbo_annealed`` (GQN's sigma schedule, 2.0 -> 0.7).
"""

from configs import paper


def get_config(arg=None):
  config = paper.convdraw("celeb_a", "cifar10", arg, source="tfds")
  return config
