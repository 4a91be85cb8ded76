r"""Conditional ConvDraw on MNIST-sum-hard: context (x1, x2), target x3 with l3 =
(l1 * l2) mod 10 (our documented reading of the paper's harder relation);
GECO, RE constraint.

  GECO_DATA_DIR=../shared/data python -m experiments.main \
      --config configs/convdraw_mnist_sum_hard.py --workdir runs/convdraw_mnist_sum_hard

``:accelerator`` after the file name selects the paper-sized model and
schedule. Baselines with the same model: ``--config.objective=elbo`` (fixed
sigma; add ``--config.elbo.learn_sigma=True`` to learn it) or
``--config.objective=elbo_annealed`` (GQN's sigma schedule, 2.0 -> 0.7).
"""

from configs import paper


def get_config(arg=None):
  config = paper.convdraw("mnist_sum_hard", "mnist", arg, conditional=True)
  return config
