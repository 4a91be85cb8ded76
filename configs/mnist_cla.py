r"""Conv VAE on MNIST with GECO under two constraints: RE and CLA (paper Table 1).

GECO minimises the KL subject to reconstructions within a per-pixel RMSE of
0.1 *and* recognised by an MNIST classifier with an average probability of at
least 0.9 for the true class. Train the classifier first (once), then:

  GECO_DATA_DIR=../shared/data python -m experiments.train_classifier \
      --config configs/mnist_classifier.py --workdir runs/mnist_classifier
  GECO_DATA_DIR=../shared/data python -m experiments.main \
      --config configs/mnist_cla.py --workdir runs/mnist_cla

``constraints.cla.classifier`` is the directory the first command saved.
"""

from configs import conv_vae_mnist


def get_config():
  config = conv_vae_mnist.get_config()   # conv VAE, MNIST (npz), RE 0.1
  config.eval_num_examples = None

  config.constraints.re.tolerance = 0.1   # per-pixel RMSE
  config.eval_every = 1000
  config.constraints.cla = dict(
      tolerance=0.9,                      # mean probability of the true class
      lambda_lr=5e-2,                     # C is a probability, ~1000x smaller than RE
      classifier="runs/mnist_classifier/classifier",
  )
  return config
