r"""Conditional ConvDraw on MNIST-rotate: context (x1, x2), target a digit of
class l2 rotated by 36 * l1 degrees; GECO, RE constraint (paper section 4.2).

  GECO_DATA_DIR=../shared/data python -m experiments.main \
      --config configs/convdraw_mnist_rotate.py --workdir runs/convdraw_mnist_rotate

``:accelerator`` after the file name selects the paper-sized model and
schedule. Baselines with the same model: ``--config.objective=elbo`` (fixed
sigma; add ``--config.elbo.learn_sigma=True`` to learn it) or
``--config.objective=elbo_annealed`` (GQN's sigma schedule, 2.0 -> 0.7).
"""

from configs import paper


def get_config(arg=None):
  config = paper.convdraw("mnist_rotate", "mnist", arg, conditional=True)
  return config
