"""A plain convolutional VAE: the model of the default experiment.

Encoder: two stride-2 convolutions and a dense layer give the mean and log
standard deviation of a diagonal Gaussian q(z|x); prior pi(z) = N(0, I); the
KL is analytic. Decoder: two dense layers and two stride-2 transposed
convolutions give g(z) in [0, 1] (a sigmoid), the mean of the Gaussian
likelihood whose global sigma is left to the objective (GECO's RE constraint
or an ELBO baseline).

The transposed convolutions are ``SubpixelConvTranspose``: the function and the
parameters of ``flax.linen.ConvTranspose``, computed as one stride-1
convolution and a depth-to-space reshape, because XLA:CPU differentiates the
kernel of an input-dilated convolution (what ``ConvTranspose`` lowers to)
with a slow generic loop: measured, half the time of this model's training
step (docs/performance.md). Its stride-1 convolution is
``geco_jax.ops.conv.valid_convolution``, whose kernel gradient XLA:CPU runs as
matrix products: XLA's own form of it was a quarter of VAE+NVP's step.

Convolutions (``convolutions``, ``CONVOLUTIONS``): ``'xla'`` (XLA's own,
everywhere; the default) or ``'onednn'``: all four convolutions, with their
gradients, by oneDNN on XLA:CPU's thread pool (``geco_jax.ops.onednn.conv2d``;
one CPU device, float32), with the same parameters and values to float
rounding. On the project's 2-core CPU the training step is faster with
oneDNN's (docs/performance.md, lever 42); ``choose_convolutions()`` says which
to use on this machine.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from geco_jax.models.common import VAEOutput
from geco_jax.models.common import gaussian_kl
from geco_jax.ops import conv
from geco_jax.ops import onednn

# Who computes the convolutions: XLA, or oneDNN (geco_jax.ops.onednn).
CONVOLUTIONS = ("xla", "onednn")


def choose_convolutions(num_devices: int | None = None) -> tuple[str, str]:
  """The ``convolutions`` value for this machine, and why: what ``'auto'`` means.

  ``'onednn'`` where ``onednn.usable_for_step(num_devices)``: the CPU backend,
  one device (``num_devices``, default ``jax.device_count()``) and oneDNN
  available (its handlers are built on the first call, then cached);
  ``'xla'`` otherwise: on an accelerator, over several devices (XLA does not
  partition oneDNN's calls) or without oneDNN or a compiler. Both compute
  the same function from the same parameters (to float rounding), so a
  checkpoint trained with one resumes with the other.

  Why: on the project's 2-core CPU the conv VAE's training step ran 1.47x and
  VAE+NVP's 1.35x faster with 'onednn' than with 'xla' (docs/performance.md,
  lever 42).
  """
  ok, why = onednn.usable_for_step(num_devices)
  return ("onednn" if ok else "xla"), why


def _check_convolutions(owner, convolutions: str) -> None:
  if convolutions not in CONVOLUTIONS:
    raise ValueError(f"{type(owner).__name__}: convolutions must be one of {CONVOLUTIONS}; "
                     f"got {convolutions!r}.")
  if convolutions == "onednn":
    onednn.require()


def _onednn_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                 rhs_dilation=None, dimension_numbers=None,
                                 feature_group_count=1, precision=None, **unused):
  """``lax.conv_general_dilated`` as ``nn.Conv`` calls it, by ``onednn.conv2d``.

  Takes what ``ConvEncoderDecoder``'s convolutions use (NHWC, HWIO, no
  dilation, one group) and refuses the rest.
  """
  del precision   # float32 throughout
  expected = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  if (any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
      or feature_group_count != 1 or unused.get("batch_group_count", 1) != 1
      or (dimension_numbers is not None
          and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          != expected)):
    raise ValueError("convolutions='onednn' takes undilated, ungrouped NHWC x HWIO "
                     "convolutions only.")
  return onednn.conv2d(lhs, rhs, window_strides, padding)


def _subpixel_taps(kernel_size: int, stride: int):
  """Which kernel tap each output phase reads at each input offset, along one axis.

  ``lax.conv_transpose(..., 'SAME')`` (Flax's ``ConvTranspose``) correlates the
  stride-dilated input, padded by ``before`` = the larger half of
  ``kernel_size + stride - 2``, with the kernel as stored. Output
  ``j = stride * q + r`` (phase r) then reads tap i from input ``q + d`` with
  ``d = (r + i - before) / stride`` for the taps where that is whole.

  Each phase reads at most ``window = ceil(kernel_size / stride)`` consecutive
  offsets. Returns ``index[u, r]``, the tap that phase r applies to input
  ``q + start[r] + u - pad_before`` of the input padded by ``padding``
  (``kernel_size`` where there is none: a zero), ``start`` and ``padding``
  (before, after), such that phase r of the output is rows
  ``start[r] : start[r] + n`` of a VALID ``window``-tap convolution of the
  padded input.
  """
  total = kernel_size + stride - 2
  before = kernel_size - 1 if stride > kernel_size - 1 else -(-total // 2)
  offsets = {(r, i): (r + i - before) // stride
             for r in range(stride) for i in range(kernel_size)
             if (r + i - before) % stride == 0}
  lowest, highest = min(offsets.values()), max(offsets.values())
  # A phase without taps (kernel_size < stride) reads nothing: a zero window.
  first = [min((d for (p, _), d in offsets.items() if p == r), default=lowest)
           for r in range(stride)]
  last = [max((d for (p, _), d in offsets.items() if p == r), default=lowest)
          for r in range(stride)]
  window = max(b - a + 1 for a, b in zip(first, last))
  index = np.full((window, stride), kernel_size)
  for (r, i), d in offsets.items():
    index[d - first[r], r] = i
  start = [a - lowest for a in first]
  # z (the VALID convolution) must reach row start[r] + n - 1 for every phase.
  after = highest + max(0, max(start) + window - (highest - lowest + 1))
  return index, start, (-lowest, after)


class SubpixelConvTranspose(nn.Module):
  """``nn.ConvTranspose(features, (k, k), strides=(s, s), padding='SAME')``, rewritten.

  The same parameters (``kernel`` [k, k, in, features] with the same
  initialiser, ``bias`` [features]) and the same function up to float
  rounding, computed as one stride-1 convolution of the undilated input with
  ``ceil(k / s)``-tap windows, whose s * s * features output channels are the
  s x s output phases (the kernel's taps regrouped by ``_subpixel_taps``),
  then, per phase, its rows and columns (phases may read windows that start
  one input apart) interleaved into the output (depth-to-space). Its
  gradients are ordinary convolutions, which XLA:CPU runs fast;
  ``ConvTranspose``'s kernel gradient is not. For k = 4, s = 2 it multiplies
  exactly as many weights as the transposed convolution: each phase has a
  2 x 2 window.

  Attributes:
    features: output channels.
    kernel_size: side of the square kernel.
    stride: the upsampling factor.
    convolutions: who computes the stride-1 convolution (``CONVOLUTIONS``):
      XLA (``valid_convolution``, the input padded first) or oneDNN
      (``onednn.conv2d``, the padding its own).
  """

  features: int
  kernel_size: int
  stride: int
  convolutions: str = "xla"

  @nn.compact
  def __call__(self, x):
    _check_convolutions(self, self.convolutions)
    k, s, features = self.kernel_size, self.stride, self.features
    batch, height, width, channels = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, channels, features))
    bias = self.param("bias", nn.initializers.zeros_init(), (features,))
    index, start, padding = _subpixel_taps(k, s)
    window = index.shape[0]
    padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))   # tap k: zeros
    phases = padded[index[:, None, :, None], index[None, :, None, :]]  # [u, u, s, s, in, out]
    phases = phases.transpose(0, 1, 4, 2, 3, 5).reshape(window, window, channels,
                                                        s * s * features)
    if self.convolutions == "onednn":
      z = onednn.conv2d(x, phases, (1, 1), (padding, padding))
    else:
      # Padded here, convolved VALID: with the padding inside the convolution,
      # XLA:CPU computes this kernel gradient with a slow generic loop (measured 3x).
      x = jnp.pad(x, ((0, 0), padding, padding, (0, 0)))
      # XLA's convolution; its kernel gradient as dots on the CPU (lever 34).
      z = conv.valid_convolution(x, phases)
    z = z.reshape(*z.shape[:3], s, s, features)
    if len(set(start)) == 1:
      a = start[0]
      y = z[:, a:a + height, a:a + width]                       # [b, h, w, s, s, f]
    else:
      y = jnp.stack([jnp.stack([z[:, a:a + height, c:c + width, r, q]
                                for q, c in enumerate(start)], axis=3)
                     for r, a in enumerate(start)], axis=3)     # [b, h, w, s, s, f]
    y = y.transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(batch, height * s, width * s, features) + bias


class ConvEncoderDecoder(nn.Module):
  """The convolutional encoder torso and decoder that ConvVAE and VAENVP share.

  Encoder features: h(x) = relu(dense(flatten(relu(conv2(relu(conv1(x))))))),
  two 4x4 stride-2 convolutions and a dense layer of ``hidden_size``.
  Decoder: g(z) = sigmoid(tconv2(relu(tconv1(relu(grid(relu(dense(z)))))))),
  a dense layer, a dense layer to the quarter-resolution grid of
  ``channels[1]`` and two 4x4 stride-2 transposed convolutions
  (``SubpixelConvTranspose``). The parameters are named ``enc_conv1``,
  ``enc_conv2``, ``enc_dense``, ``dec_dense``, ``dec_grid``, ``dec_conv1`` and
  ``dec_conv2`` at the top of the model's tree.

  A base class without fields: subclasses declare ``image_shape`` (sides
  divisible by 4), ``channels`` (two), ``hidden_size`` and ``convolutions``
  (``CONVOLUTIONS``: who computes the four convolutions), and call
  ``setup_encoder_decoder()`` in their ``setup``.
  """

  def setup_encoder_decoder(self):
    height, width, _ = self.image_shape
    if height % 4 or width % 4:
      raise ValueError(f"{type(self).__name__} needs image sides divisible by 4; "
                       f"got {tuple(self.image_shape)}.")
    _check_convolutions(self, self.convolutions)
    onednn_convs = self.convolutions == "onednn"
    extra = {"conv_general_dilated": _onednn_conv_general_dilated} if onednn_convs else {}
    c1, c2 = self.channels
    self.encoder_convs = [
        nn.Conv(c1, (4, 4), strides=(2, 2), name="enc_conv1", **extra),
        nn.Conv(c2, (4, 4), strides=(2, 2), name="enc_conv2", **extra),
    ]
    self.encoder_dense = nn.Dense(self.hidden_size, name="enc_dense")
    self.decoder_dense = nn.Dense(self.hidden_size, name="dec_dense")
    self.decoder_grid = nn.Dense((height // 4) * (width // 4) * c2, name="dec_grid")
    self.decoder_convs = [
        SubpixelConvTranspose(c1, 4, 2, self.convolutions, name="dec_conv1"),
        SubpixelConvTranspose(self.image_shape[2], 4, 2, self.convolutions, name="dec_conv2"),
    ]

  def encoder_features(self, x):
    """h(x), [batch, hidden_size]."""
    h = x
    for conv in self.encoder_convs:
      h = nn.relu(conv(h))
    return nn.relu(self.encoder_dense(h.reshape(h.shape[0], -1)))

  def decode(self, z):
    """g(z), the reconstruction mean in [0, 1], [batch, *image_shape]."""
    height, width, _ = self.image_shape
    h = nn.relu(self.decoder_dense(z))
    h = nn.relu(self.decoder_grid(h))
    h = h.reshape(z.shape[0], height // 4, width // 4, self.channels[1])
    h = nn.relu(self.decoder_convs[0](h))
    return nn.sigmoid(self.decoder_convs[1](h))


class ConvVAE(ConvEncoderDecoder):
  """Convolutional VAE for images whose sides are divisible by 4.

  Attributes:
    image_shape: (height, width, channels) of the data.
    latent_size: dimension of z.
    channels: channels of the two convolutions (the decoder mirrors them).
    hidden_size: width of the dense layer on each side.
    convolutions: who computes the convolutions (``CONVOLUTIONS``): XLA, or
      oneDNN on XLA:CPU's thread pool (one CPU device; ``choose_convolutions``).
  """

  image_shape: Sequence[int] = (28, 28, 1)
  latent_size: int = 16
  channels: Sequence[int] = (32, 64)
  hidden_size: int = 256
  convolutions: str = "xla"

  def setup(self):
    self.setup_encoder_decoder()
    self.posterior = nn.Dense(2 * self.latent_size, name="posterior")

  def encode(self, x):
    """Mean and log standard deviation of q(z|x), each [batch, latent_size]."""
    mean, log_std = jnp.split(self.posterior(self.encoder_features(x)), 2, axis=-1)
    return mean, log_std

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
