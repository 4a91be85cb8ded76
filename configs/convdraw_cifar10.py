r"""Unconditional ConvDraw on CIFAR-10 with GECO, RE constraint (paper section
4.2, Fig. 4). The npz source is the partial CIFAR-10 of shared/data (4000
train, 1000 test); ``--config.dataset.source=tfds`` reads the full set where
TFDS has it.

  GECO_DATA_DIR=../shared/data python -m experiments.main \
      --config configs/convdraw_cifar10.py --workdir runs/convdraw_cifar10

``:accelerator`` after the file name selects the paper-sized model and
schedule. Baselines with the same model: ``--config.objective=elbo`` (fixed
sigma; add ``--config.elbo.learn_sigma=True`` to learn it) or
``--config.objective=elbo_annealed`` (GQN's sigma schedule, 2.0 -> 0.7).
"""

from configs import paper


def get_config(arg=None):
  config = paper.convdraw("cifar10", "cifar10", arg)
  return config
