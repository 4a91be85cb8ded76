"""VAE + NVP: a convolutional VAE whose posterior is a conditional RealNVP flow.

The paper's second model ("Taming VAEs", Sec. 5; paper-notes Sec. 5): the
encoder is a Gaussian base conditioned on x followed by a fully connected
conditional RealNVP (Dinh et al. 2016), so that q(z|x) can be far from
Gaussian; the KL is then estimated by Monte Carlo.

Encoder. Features h = h(x) from two stride-2 convolutions and a dense layer (as
in ConvVAE). A diagonal Gaussian base

    q0(z0 | x) = N(z0; mu(h), diag sigma(h)^2),

then z = f_K o ... o f_1(z0), each f_k an affine coupling layer conditioned on
h. Layer k splits the coordinates of z by an alternating mask into a
conditioning half a and a transformed half b (coordinate i is in a when
i + k is even, so consecutive layers swap roles and every coordinate is
transformed once K >= 2):

    z'_a = z_a
    z'_b = z_b * exp(s_k(z_a, h)) + t_k(z_a, h),   s_k = B * tanh(s_raw / B),

with s_raw and t_k from one small MLP of [z_a, h]. Bounding |s_k| < B
(``max_log_scale``) keeps one layer from stretching or squashing a coordinate
by more than e^B, which keeps exp(s) and the density finite early in
training; near zero s_k ~ s_raw, so the bound does not bias small scales.
Ordered a before b, the Jacobian of f_k is block triangular with identity on a
and diag(exp(s_k)) on b, hence

    log |det J_k| = sum_{i in b} s_k(z_a, h)_i,

and the inverse is exact because z_a passes through unchanged:

    z_b = (z'_b - t_k(z'_a, h)) * exp(-s_k(z'_a, h)).

By the change of variables,

    log q(z | x) = log q0(z0 | x) - sum_k log |det J_k|.

Prior pi(z) = N(0, I). KL(q(z|x) || pi(z)) has no closed form, so each forward
pass uses the one-sample Monte Carlo estimate

    kl_hat(x) = log q(z | x) - log pi(z),   z = f(mu + sigma * eps),  eps ~ N(0, I),

whose expectation over eps is exactly the KL (its definition), so it is
unbiased, and it is differentiable by reparameterisation. One sample can be
negative (z may land where q < pi); only its average is a KL. GECO's Lagrangian
(Algorithm 1) uses the batch mean, so the loss stays unbiased.

Decoder: as ConvVAE, a dense layer and two stride-2 transposed convolutions
give g(z) in [0, 1] (a sigmoid).

Latent size. It must be at least 2: a coupling layer needs both halves
non-empty, and in one dimension every layer would be an x-conditioned affine
map of a Gaussian, i.e. still a Gaussian (use ConvVAE). Odd sizes are fine:
the halves then differ in size by one and swap between layers.

Initialisation. The last layer of every coupling MLP starts at zero, so every
f_k starts as the identity and q(z|x) starts as the Gaussian base: training
starts from a plain VAE and the flow learns departures from it (as Glow
zero-initialises its last convolutions).

Presets (constructor keyword arguments, without ``image_shape``):

* ``CPU_PRESET``: latent 16, 4 couplings, channels 32/64 -- trains on a 2-core
  CPU at MNIST size.
* ``ACCELERATOR_PRESET``: latent 64, 8 couplings, channels 64/128, wider MLPs --
  for CIFAR-10 / CelebA / Color-MNIST on a GPU or TPU.
* ``MICRO_MNIST_PRESET``: latent 2, 6 couplings, for the paper's Fig. 8
  (posterior samples of 7 digits plotted in the plane).

Use: ``VAENVP(image_shape=(28, 28, 1), **CPU_PRESET)``.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from geco_jax.models.common import VAEOutput
from geco_jax.models.conv_vae import ConvEncoderDecoder

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)

# Read-only, so that ``**PRESET`` cannot be edited in place by one caller for all.
CPU_PRESET = MappingProxyType(dict(
    latent_size=16, num_couplings=4, channels=(32, 64), hidden_size=256,
    coupling_hidden_size=128))
ACCELERATOR_PRESET = MappingProxyType(dict(
    latent_size=64, num_couplings=8, channels=(64, 128), hidden_size=512,
    coupling_hidden_size=512))
MICRO_MNIST_PRESET = MappingProxyType(dict(
    latent_size=2, num_couplings=6, channels=(32, 64), hidden_size=256,
    coupling_hidden_size=64))


def standard_normal_log_prob(z):
  """log N(z; 0, I) = sum_i [-z_i^2 / 2 - log(2 pi) / 2], over the last axis."""
  return jnp.sum(-0.5 * jnp.square(z) - _HALF_LOG_TWO_PI, axis=-1)


def coupling_masks(latent_size: int, num_couplings: int):
  """The binary mask of each coupling layer: 1 = conditioning (a), 0 = transformed (b).

  Layer k conditions on the coordinates i with i + k even and transforms the
  others, so the masks alternate and every coordinate is transformed by some
  layer once ``num_couplings >= 2``. For odd sizes the halves differ by one.
  """
  return [tuple(int((i + k) % 2 == 0) for i in range(latent_size))
          for k in range(num_couplings)]


class AffineCoupling(nn.Module):
  """One conditional affine coupling layer (RealNVP), fully connected.

  Written with the mask m (1 on a, 0 on b) as in Dinh et al. (2016, eq. 9):
  the MLP reads m * z, so it sees only z_a, and s and t are multiplied by
  1 - m, so z' = z * exp(s) + t leaves z_a exactly unchanged (exp(0) = 1,
  t = 0 there) and log|det| = sum(s) counts only b. Elementwise masks rather
  than gathers and scatters: the same maths, and XLA compiles it faster.

  Attributes:
    mask: one 0/1 entry per coordinate; 1 = conditioning, 0 = transformed.
    hidden_size: width of the MLP's two hidden layers.
    max_log_scale: B, the bound on |s|.
  """

  mask: Sequence[int]
  hidden_size: int = 128
  max_log_scale: float = 2.0

  def setup(self):
    self.hidden = [nn.Dense(self.hidden_size, name="hidden1"),
                   nn.Dense(self.hidden_size, name="hidden2")]
    # Zero output: s = t = 0, the layer starts as the identity.
    self.output = nn.Dense(2 * len(self.mask), name="output",
                           kernel_init=nn.initializers.zeros,
                           bias_init=nn.initializers.zeros)

  def log_scale_and_shift(self, z, h):
    """s(z_a, h), bounded in (-B, B), and t(z_a, h); both zero on a; each [..., L]."""
    conditioning = jnp.asarray(self.mask, z.dtype)
    u = jnp.concatenate([z * conditioning, h], axis=-1)
    for layer in self.hidden:
      u = nn.relu(layer(u))
    raw_log_scale, shift = jnp.split(self.output(u), 2, axis=-1)
    bound = self.max_log_scale
    log_scale = bound * jnp.tanh(raw_log_scale / bound)
    return (1 - conditioning) * log_scale, (1 - conditioning) * shift

  def forward(self, z, h):
    """z -> z' = z * exp(s) + t, and log|det dz'/dz| = sum_b s ([..., L], [...])."""
    log_scale, shift = self.log_scale_and_shift(z, h)
    return z * jnp.exp(log_scale) + shift, jnp.sum(log_scale, axis=-1)

  def inverse(self, z, h):
    """z' -> z = (z' - t) * exp(-s), and the forward log|det dz'/dz| there (same s)."""
    # m * z' = m * z, so s and t are recomputed exactly as in the forward pass.
    log_scale, shift = self.log_scale_and_shift(z, h)
    return (z - shift) * jnp.exp(-log_scale), jnp.sum(log_scale, axis=-1)


class VAENVP(ConvEncoderDecoder):
  """Convolutional VAE with a conditional RealNVP posterior (see module docstring).

  Attributes:
    image_shape: (height, width, channels) of the data; sides divisible by 4.
    latent_size: dimension of z, at least 2.
    num_couplings: K, the number of coupling layers; 0 leaves the Gaussian base
      (a ConvVAE with a Monte Carlo KL).
    channels: channels of the two convolutions (the decoder mirrors them).
    hidden_size: width of the dense layer on each side; also the size of the
      features h(x) that condition the couplings.
    coupling_hidden_size: width of the hidden layers of each coupling's MLP.
    max_log_scale: B, the bound on each coupling's log-scale |s|.
    convolutions: who computes the convolutions (``conv_vae.CONVOLUTIONS``):
      XLA, or oneDNN on XLA:CPU's thread pool (one CPU device;
      ``conv_vae.choose_convolutions``).
  """

  image_shape: Sequence[int] = (28, 28, 1)
  latent_size: int = 16
  num_couplings: int = 4
  channels: Sequence[int] = (32, 64)
  hidden_size: int = 256
  coupling_hidden_size: int = 128
  max_log_scale: float = 2.0
  convolutions: str = "xla"

  def setup(self):
    if self.latent_size < 2:
      raise ValueError(
          "VAENVP needs latent_size >= 2 (a coupling layer splits z into two non-empty "
          f"halves; a 1-D posterior would stay Gaussian: use ConvVAE); got {self.latent_size}.")
    if self.num_couplings < 0:
      raise ValueError(f"num_couplings must be >= 0; got {self.num_couplings}.")
    if not self.max_log_scale > 0:
      raise ValueError(f"max_log_scale must be > 0; got {self.max_log_scale}.")
    self.setup_encoder_decoder()
    self.base = nn.Dense(2 * self.latent_size, name="base")
    self.couplings = [
        AffineCoupling(mask, self.coupling_hidden_size, self.max_log_scale,
                       name=f"coupling{k}")
        for k, mask in enumerate(coupling_masks(self.latent_size, self.num_couplings))
    ]

  # Encoder ------------------------------------------------------------------ #

  def encode_base(self, x):
    """Features h(x) [batch, hidden_size], and q0's mean and log std [batch, latent_size]."""
    h = self.encoder_features(x)
    mean, log_std = jnp.split(self.base(h), 2, axis=-1)
    return h, mean, log_std

  def flow_forward(self, z0, h):
    """z = f(z0) and sum_k log|det J_k|.

    Args:
      z0: base samples, [batch, ..., latent_size] (any axes between, e.g. samples).
      h: features h(x), [batch, hidden_size]; broadcast over the middle axes.

    Returns:
      z with the shape of z0, and the summed log-determinant, z0.shape[:-1].
    """
    h = _broadcast_features(h, z0)
    z, log_det = z0, jnp.zeros(z0.shape[:-1], z0.dtype)
    for coupling in self.couplings:
      z, layer_log_det = coupling.forward(z, h)
      log_det = log_det + layer_log_det
    return z, log_det

  def flow_inverse(self, z, h):
    """z0 = f^{-1}(z) and the forward sum_k log|det J_k| at z0 (same sign as flow_forward)."""
    h = _broadcast_features(h, z)
    z0, log_det = z, jnp.zeros(z.shape[:-1], z.dtype)
    for coupling in reversed(self.couplings):
      z0, layer_log_det = coupling.inverse(z0, h)
      log_det = log_det + layer_log_det
    return z0, log_det

  def posterior_samples(self, x, rng, num_samples: int = 1):
    """Draw z ~ q(z|x) and return it with its exact log q(z|x).

    Returns:
      z, [batch, num_samples, latent_size], reparameterised (differentiable in
      the parameters), and log q(z|x), [batch, num_samples].
    """
    h, mean, log_std = self.encode_base(x)
    eps = jax.random.normal(rng, (mean.shape[0], num_samples, self.latent_size), mean.dtype)
    z0 = mean[:, None] + jnp.exp(log_std)[:, None] * eps
    # (z0 - mean) / std is eps itself: use it rather than recompute it.
    log_q0 = jnp.sum(-0.5 * jnp.square(eps) - log_std[:, None] - _HALF_LOG_TWO_PI, axis=-1)
    z, log_det = self.flow_forward(z0, h)
    return z, log_q0 - log_det

  def log_posterior(self, z, x):
    """log q(z|x) of given z, through the exact inverse flow.

    Args:
      z: [batch, latent_size] or [batch, ..., latent_size]; row i is scored
        under x[i] (for the marginal KL, put many z per x on the middle axes).
      x: images, [batch, *image_shape].

    Returns:
      log q(z|x), z.shape[:-1].
    """
    h, mean, log_std = self.encode_base(x)
    z0, log_det = self.flow_inverse(z, h)
    mean, log_std = _broadcast_features(mean, z0), _broadcast_features(log_std, z0)
    eps = (z0 - mean) * jnp.exp(-log_std)
    log_q0 = jnp.sum(-0.5 * jnp.square(eps) - log_std - _HALF_LOG_TWO_PI, axis=-1)
    return log_q0 - log_det

  # The decoder, decode(z), is ConvEncoderDecoder's.

  def __call__(self, x, rng) -> VAEOutput:
    """Draw one z ~ q(z|x) with ``rng``, decode it; kl is the one-sample estimate."""
    z, log_q = self.posterior_samples(x, rng, 1)
    z, log_q = z[:, 0], log_q[:, 0]
    kl = log_q - standard_normal_log_prob(z)
    return VAEOutput(reconstruction=self.decode(z), kl=kl, latent=z)

  def sample(self, rng, num_samples: int):
    """g(z) for z ~ pi(z) = N(0, I): the means of prior samples."""
    z = jax.random.normal(rng, (num_samples, self.latent_size))
    return self.decode(z)


def _broadcast_features(h, z):
  """h [batch, d] broadcast against z [batch, ..., latent] to [batch, ..., d]."""
  middle = z.shape[1:-1]
  h = h.reshape(h.shape[0], *(1,) * len(middle), h.shape[-1])
  return jnp.broadcast_to(h, (h.shape[0], *middle, h.shape[-1]))
