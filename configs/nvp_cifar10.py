r"""VAE+NVP on CIFAR-10 with GECO, RE constraint: the Table 2 setting (marginal
KL, ELBO 725.2 vs GECO 45.3 in the paper); the npz source is the partial
CIFAR-10 of shared/data.

  GECO_DATA_DIR=../shared/data python -m experiments.main \
      --config configs/nvp_cifar10.py --workdir runs/nvp_cifar10

``:accelerator`` after the file name selects the paper-sized model and
schedule. Baselines with the same model: ``--config.objective=elbo`` (fixed
sigma; add ``--config.elbo.learn_sigma=True`` to learn it) or
``--config.objective=elbo_annealed`` (GQN's sigma schedule, 2.0 -> 0.7).
"""

from configs import paper


def get_config(arg=None):
  config = paper.vae_nvp("cifar10", arg)
  return config
