r"""The CIFAR-10 classifier whose penultimate features are FRE's (paper Table 1), trained here.

  GECO_DATA_DIR=/path/to/data python -m experiments.train_classifier \
      --config configs/cifar10_classifier.py --workdir runs/cifar10_classifier

saves ``runs/cifar10_classifier/classifier`` if its test accuracy reaches
``min_accuracy``; ``geco_jax.models.classifier.load_feature_fn`` of that path
gives FRE's feature function. Reads ``cifar10.npz`` from ``GECO_DATA_DIR`` (or
``dataset.data_dir``); ``--config.dataset.source=tfds`` reads TFDS instead.

The paper uses a pretrained CIFAR-10 ResNet; none can be downloaded here, and
the ``cifar10.npz`` of shared/data is partial (4,000 train, 1,000 test
images), so this is a small conv net trained on those 4,000 images.

Measured with this config (seed 0), on a 2-core CPU shared with other jobs
(load ~5): test accuracy 0.661 on the 1,000 test images, 8 min 20 s wall
(20 epochs of 62 steps, ~25 s per epoch under that load, ~17 s unloaded).
Augmentation matters with only 4,000 images: without it
(``--config.augment.flip=False --config.augment.crop_padding=0``) the same
training reached 0.589 and a test loss of 2.95 (it memorises the training set,
train loss 0.002), against 1.03 with it; 30 epochs with augmentation reached
0.682 in about twice the time.

For FRE's tolerance (a per-feature RMSE): the 256 features have an RMS of
1.45 on the test images (``feature_rms`` in the saved metadata; 70% of them
are 0 after the ReLU). Mean per-feature RMSE between a test image and: itself
with Gaussian noise of std 0.05, 0.25; its 2x2 box blur (a pixel RMSE of
0.063), 0.31; its 4x4 box blur (pixel RMSE 0.10), 0.62; another test image,
1.33.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0                      # initialisation, batch order, augmentation
  config.batch_size = 64
  config.num_epochs = 20
  config.learning_rate = 1e-3          # Adam (AdamW with weight_decay > 0)
  config.learning_rate_schedule = "cosine"  # decays to 0 by the last step; or "constant"
  config.weight_decay = 0.0
  config.eval_batch_size = 500
  config.min_accuracy = 0.45           # below it nothing is saved and the run fails

  # Of the training images, on the host: left-right flips with probability
  # 1/2 and shifts of up to crop_padding pixels (reflection padding, random
  # crop). crop_padding=0 and flip=False: none.
  config.augment = ml_collections.ConfigDict()
  config.augment.flip = True
  config.augment.crop_padding = 4

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "cifar10"      # trains a CIFAR10Classifier
  config.dataset.source = "npz"        # or "tfds"
  config.dataset.data_dir = config_dict.placeholder(str)   # None: $GECO_DATA_DIR
  # None: the whole split. The first examples otherwise (for quick tests).
  config.dataset.num_train = config_dict.placeholder(int)
  config.dataset.num_test = config_dict.placeholder(int)

  # geco_jax.models.classifier.CIFAR10Classifier.
  config.model = ml_collections.ConfigDict()
  config.model.features = (32, 64, 128)  # channels of each block's 3x3 convs
  config.model.convs_per_block = 2       # conv-ReLU layers per block, then 2x2 max pool
  config.model.hidden_size = 256         # the FRE features
  return config
