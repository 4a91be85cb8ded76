r"""The conv VAE on MNIST in the rate-constrained form: min ||x - g(z)||^2 s.t. KL <= kappa.

  GECO_DATA_DIR=../shared/data python -m experiments.main \
      --config configs/conv_vae_mnist_kl.py --workdir runs/conv_vae_mnist_kl

The paper's GECO minimises the KL under reconstruction constraints. With the
roles swapped, a KL constraint bounds the rate and GECO minimises the squared
error under it (``geco.minimise = 'squared_error'``): the information-bottleneck
form of the beta-VAE, stated in nats instead of through beta. The multiplier of
the KL constraint is then lambda = 2 sigma^2 beta.
"""

import ml_collections

from configs import conv_vae_mnist


def get_config() -> ml_collections.ConfigDict:
  config = conv_vae_mnist.get_config()
  config.geco.minimise = "squared_error"
  del config.constraints["re"]
  config.constraints.kl = ml_collections.ConfigDict()
  config.constraints.kl.tolerance = 10.0   # nats per image
  config.geco.lambda_lr = 1e-3            # C = KL - 10 is -10 at the start: 1e-2 took
                                          # lambda to 1e-3 in 100 steps, then overshot
  return config
