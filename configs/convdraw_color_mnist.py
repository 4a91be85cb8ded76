r"""Unconditional ConvDraw on Color-MNIST (three MNIST digits as R, G, B; 1000
modes) with GECO, RE constraint (paper section 4.2).

  GECO_DATA_DIR=../shared/data python -m experiments.main \
      --config configs/convdraw_color_mnist.py --workdir runs/convdraw_color_mnist

``:accelerator`` after the file name selects the paper-sized model and
schedule. Baselines with the same model: ``--config.objective=elbo`` (fixed
sigma; add ``--config.elbo.learn_sigma=True`` to learn it) or
``--config.objective=elbo_annealed`` (GQN's sigma schedule, 2.0 -> 0.7).
"""

from configs import paper


def get_config(arg=None):
  config = paper.convdraw("color_mnist", "mnist", arg)
  return config
