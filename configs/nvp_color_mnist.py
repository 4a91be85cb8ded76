r"""VAE+NVP on Color-MNIST with GECO, RE constraint: the Table 2 setting (marginal
KL, ELBO 182.5 vs GECO 10.3 in the paper). Run ``--config.objective=elbo`` for
the ELBO row.

  GECO_DATA_DIR=../shared/data python -m experiments.main \
      --config configs/nvp_color_mnist.py --workdir runs/nvp_color_mnist

``:accelerator`` after the file name selects the paper-sized model and
schedule. Baselines with the same model: ``--config.objective=elbo`` (fixed
sigma; add ``--config.elbo.learn_sigma=True`` to learn it) or
``--config.objective=elbo_annealed`` (GQN's sigma schedule, 2.0 -> 0.7).
"""

from configs import paper


def get_config(arg=None):
  config = paper.vae_nvp("color_mnist", arg)
  return config
