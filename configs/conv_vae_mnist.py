r"""The default conv VAE on MNIST, GECO with an RE constraint (small and fast).

  GECO_DATA_DIR=../shared/data python -m experiments.main \
      --config configs/conv_vae_mnist.py --workdir runs/conv_vae_mnist

The quick information-plane study on a 2-core CPU (docs/results.md) uses it:

  GECO_DATA_DIR=../shared/data python -m experiments.information_plane \
      --config configs/conv_vae_mnist.py --workdir runs/info_plane_conv_vae_mnist \
      --tolerances=0.1,0.125,0.15 --match_elbo
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.batch_size = 64
  config.num_steps = 3000
  config.dataset.name = "mnist"
  config.dataset.source = "npz"           # GECO_DATA_DIR/mnist.npz; or "tfds"

  config.model.name = "conv_vae"
  config.model.latent_size = 16
  config.model.channels = (16, 32)
  config.model.hidden_size = 128

  config.optimizer.learning_rate = 1e-3
  config.geco.lambda_lr = 1e-4            # RE sums 784 squared errors: keep nu small
  config.elbo.anneal_steps = 1500         # GQN's 2.0 -> 0.7, over half the run

  config.constraints.re = ml_collections.ConfigDict()
  config.constraints.re.tolerance = 0.1   # per-pixel RMSE

  config.log_every = 50
  config.eval_every = 1000
  config.eval_num_examples = 2000
  config.checkpoint_every = 1000
  config.num_image_samples = 32
  return config
