"""A plain convolutional VAE: the model of the default experiment.

Encoder: two stride-2 convolutions and a dense layer give the mean and log
standard deviation of a diagonal Gaussian q(z|x); prior pi(z) = N(0, I); the
KL is analytic. Decoder: a dense layer and two stride-2 transposed
convolutions give g(z) in [0, 1] (a sigmoid), the mean of the Gaussian
likelihood whose global sigma is left to the objective (GECO's RE constraint
or an ELBO baseline).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from geco_jax.models.common import VAEOutput
from geco_jax.models.common import gaussian_kl


class ConvVAE(nn.Module):
  """Convolutional VAE for images whose sides are divisible by 4.

  Attributes:
    image_shape: (height, width, channels) of the data.
    latent_size: dimension of z.
    channels: channels of the two convolutions (the decoder mirrors them).
    hidden_size: width of the dense layer on each side.
  """

  image_shape: Sequence[int] = (28, 28, 1)
  latent_size: int = 16
  channels: Sequence[int] = (32, 64)
  hidden_size: int = 256

  def setup(self):
    height, width, _ = self.image_shape
    if height % 4 or width % 4:
      raise ValueError(
          f"ConvVAE needs image sides divisible by 4; got {tuple(self.image_shape)}.")
    c1, c2 = self.channels
    self.encoder_convs = [
        nn.Conv(c1, (4, 4), strides=(2, 2), name="enc_conv1"),
        nn.Conv(c2, (4, 4), strides=(2, 2), name="enc_conv2"),
    ]
    self.encoder_dense = nn.Dense(self.hidden_size, name="enc_dense")
    self.posterior = nn.Dense(2 * self.latent_size, name="posterior")
    self.decoder_dense = nn.Dense(self.hidden_size, name="dec_dense")
    self.decoder_grid = nn.Dense((height // 4) * (width // 4) * c2, name="dec_grid")
    self.decoder_convs = [
        nn.ConvTranspose(c1, (4, 4), strides=(2, 2), name="dec_conv1"),
        nn.ConvTranspose(self.image_shape[2], (4, 4), strides=(2, 2), name="dec_conv2"),
    ]

  def encode(self, x):
    """Mean and log standard deviation of q(z|x), each [batch, latent_size]."""
    h = x
    for conv in self.encoder_convs:
      h = nn.relu(conv(h))
    h = nn.relu(self.encoder_dense(h.reshape(h.shape[0], -1)))
    mean, log_std = jnp.split(self.posterior(h), 2, axis=-1)
    return mean, log_std

  def decode(self, z):
    """g(z), the reconstruction mean in [0, 1], [batch, *image_shape]."""
    height, width, _ = self.image_shape
    h = nn.relu(self.decoder_dense(z))
    h = nn.relu(self.decoder_grid(h))
    h = h.reshape(z.shape[0], height // 4, width // 4, self.channels[1])
    h = nn.relu(self.decoder_convs[0](h))
    return nn.sigmoid(self.decoder_convs[1](h))

  def __call__(self, x, rng) -> VAEOutput:
    """Encode x, draw one z ~ q(z|x) with ``rng``, decode it."""
    mean, log_std = self.encode(x)
    z = mean + jnp.exp(log_std) * jax.random.normal(rng, mean.shape, mean.dtype)
    return VAEOutput(reconstruction=self.decode(z), kl=gaussian_kl(mean, log_std),
                     latent=z)

  def sample(self, rng, num_samples: int):
    """g(z) for z ~ pi(z) = N(0, I): the means of prior samples."""
    z = jax.random.normal(rng, (num_samples, self.latent_size))
    return self.decode(z)
