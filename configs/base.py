"""Every field an experiment config has, with its default; each config starts here.

``experiments.setup.validate_config`` rejects any key that is not below (a
typo in a config file is an error, as it is on the command line), except
inside ``constraints`` (one entry per constraint), ``model`` (the model's
constructor arguments override its preset) and ``dataset`` (the dataset's
options).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 64                # global batch, split over all devices
  config.num_steps = 3000

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "sprites"
  config.dataset.source = "generated"   # explicit: "npz", "tfds" or "generated"
  config.dataset.data_dir = config_dict.placeholder(str)   # npz: $GECO_DATA_DIR
  config.dataset.num_train = config_dict.placeholder(int)  # derived/generated sets
  config.dataset.num_test = config_dict.placeholder(int)
  # Derived and generated datasets are drawn from this seed; None: config.seed
  # (set it to keep one dataset across a sweep of config.seed).
  config.dataset.seed = config_dict.placeholder(int)
  # The last num_validation training examples (after num_train) are held out,
  # not trained on: the 'validation' split that eval_split may name.
  config.dataset.num_validation = 0

  # name: conv_vae | convdraw | conditional_convdraw | vae_nvp. preset: a
  # ConvDraw preset (geco_jax.models.convdraw.PRESETS) or a VAE+NVP one (cpu,
  # accelerator, micro_mnist). Any other key overrides a constructor argument.
  config.model = ml_collections.ConfigDict()
  config.model.name = "conv_vae"
  config.model.preset = config_dict.placeholder(str)
  # Who computes the convolutions: 'xla', oneDNN's ('onednn'; ConvDraw also
  # 'onednn_winograd') or 'auto', which experiments.setup.make_model resolves
  # with the model's choose_convolutions: oneDNN's on one CPU device where it is
  # available (installed with geco-jax on x86-64 Linux, built with g++ at first
  # use), XLA's everywhere else (accelerators, several devices, no oneDNN).
  # Same parameters either way. On the project's 2-core CPU oneDNN's made the
  # conv VAE's step 1.47x and VAE+NVP's 1.35x faster (docs/performance.md,
  # lever 42), ConvDraw's 1.32-1.43x (lever 40).
  config.model.convolutions = "auto"

  # "geco" (paper Algorithm 1), "elbo" (fixed or learned sigma) or
  # "elbo_annealed" (GQN: sigma annealed linearly, sigma_start -> sigma_end).
  config.objective = "geco"
  config.elbo = ml_collections.ConfigDict()
  config.elbo.sigma = 1.0               # "elbo": the fixed sigma, or learned's start
  config.elbo.learn_sigma = False
  config.elbo.sigma_start = 2.0         # "elbo_annealed" (GQN values)
  config.elbo.sigma_end = 0.7
  config.elbo.anneal_steps = 2000       # GQN: 200k; scaled to the run

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-3  # Adam

  # GECO's dual update (Algorithm 1): lambda <- lambda * exp(lambda_lr * C_ma).
  config.geco = ml_collections.ConfigDict()
  # What GECO minimises under the constraints: "kl", the paper's KL(q(z|x) || pi(z));
  # or "squared_error", ||x - g(z)||^2 summed per image, under a KL constraint
  # (constraints.kl): the rate-constrained (information-bottleneck) form, with
  # lambda_kl = 2 sigma^2 beta of the beta-VAE.
  config.geco.minimise = "kl"
  config.geco.lambda_lr = 1e-4           # a constraint's own lambda_lr takes precedence
  config.geco.alpha = 0.99
  config.geco.lambda_init = 1.0
  config.geco.lambda_min = 1e-10
  config.geco.lambda_max = 1e10
  config.geco.dual = "sgd"              # or "pi" (nuPI, geco_jax.dual.pi)
  config.geco.pi_kp = 1.0               # used by dual="pi" only

  # One entry per constraint of paper Table 1 (re, fre, pncc, kl, cla), each
  # with its tolerance. GECO needs at least one; ELBO runs evaluate them.
  config.constraints = ml_collections.ConfigDict()

  config.log_every = 100                # metrics fetched from the device every k steps
  config.image_every = 1000
  config.num_image_samples = 64
  config.eval_every = 1000              # periodic evaluation and best_feasible
  # The split they use: "test", or "validation" (dataset.num_validation > 0), so
  # that best_feasible is not chosen on the test set it is then reported on.
  config.eval_split = "test"
  config.eval_num_examples = config_dict.placeholder(int)  # None: the whole split
  config.checkpoint_every = 1000
  config.max_checkpoints_to_keep = 3
  config.max_consecutive_nonfinite = 10  # skipped updates in a row before stopping
  config.distributed = False            # jax.distributed.initialize() (multi-host)
  # Training batches gathered on the device(s) from a copy of the training set
  # held there (geco_jax.data.DeviceEpochBatcher; one process only), instead of
  # host batches copied over by a thread: the same batches, no per-step copy.
  config.data_on_device = False
  # XLA flags this experiment runs with, added to $XLA_FLAGS by the entry
  # points before JAX starts (e.g. ConvDraw's CPU convolutions: configs/paper.py).
  config.xla_flags = ""
  return config
