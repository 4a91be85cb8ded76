r"""VAE+NVP with a 2-D latent on Micro-MNIST (7 fixed MNIST digits; paper Fig. 8):
plot 100 posterior samples per image for ELBO and for GECO. The batch is the
whole dataset (7 images).

  GECO_DATA_DIR=../shared/data python -m experiments.main \
      --config configs/nvp_micro_mnist.py --workdir runs/nvp_micro_mnist

``:accelerator`` after the file name selects the paper-sized model and
schedule. Baselines with the same model: ``--config.objective=elbo`` (fixed
sigma; add ``--config.elbo.learn_sigma=True`` to learn it) or
``--config.objective=elbo_annealed`` (GQN's sigma schedule, 2.0 -> 0.7).
"""

from configs import paper


def get_config(arg=None):
  config = paper.vae_nvp("micro_mnist", arg, preset="micro_mnist")
  config.batch_size = 7
  config.eval_num_examples = None
  config.num_image_samples = 7
  return config
