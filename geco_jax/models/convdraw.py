r"""ConvDraw (Gregor et al. 2016, "Towards conceptual compression"), plain and conditional.

A recurrent VAE with T steps. All recurrent state lives at half the image
resolution (a stride-2 "read" convolution; 14x14 for MNIST, 16x16 for
CIFAR-10); a canvas of logits at full resolution accumulates what the decoder
writes. With x the image, sigmoid the logistic function, h^enc / h^dec the
hidden states of two conv-LSTMs (zero at t = 0) and canvas_0 = 0, step
t = 1..T is

  e_t              = read_error(x - sigmoid(canvas_{t-1}))         (stride 2)
  h^enc_t          = LSTM_enc([read_x(x), e_t, h^dec_{t-1}], h^enc_{t-1})
  q(z_t | x, z_<t) = N(mu^q_t, diag(s^q_t)^2),  [mu^q_t, log s^q_t] = conv(h^enc_t)
  p(z_t | z_<t)    = N(mu^p_t, diag(s^p_t)^2),  [mu^p_t, log s^p_t] = conv(h^dec_{t-1})
  z_t              = mu_t + s_t * eps_t, eps_t ~ N(0, I); (mu_t, s_t) from q_t
                     when encoding, from p_t when sampling
  h^dec_t          = LSTM_dec([z_t], h^dec_{t-1})
  canvas_t         = canvas_{t-1} + write(h^dec_t)                 (stride-2 transpose)

and the reconstruction is g(z) = sigmoid(canvas_T) in [0, 1], the mean of the
likelihood whose scale the objective owns (GECO's constraint or an ELBO). The
prior is learned and autoregressive over steps, so the KL of the sequence
factorises into analytic per-step terms (paper notes, section 5):

  KL(q(z_1..T | x) || p(z_1..T)) = sum_t E_q[ KL(q_t || p_t) ],

each KL(q_t || p_t) between diagonal Gaussians summed over the latent's
positions and channels; ``kl`` is this sum evaluated on the sampled path
(one-sample estimate of the outer expectation, analytic inside).

The conditional model (``ConditionalConvDraw``) encodes one or more context
images with a small conv net, averages the encodings over the context images,
and concatenates the result to the inputs of the prior, the posterior and the
decoder LSTM, as GQN's generator does (Eslami et al. 2018).

Each conv-LSTM step computes all four gates with one convolution over its
concatenated inputs and hidden state; everything is NHWC. In the default
(unrolled) form, what is known before the loop is not recomputed in it: the
zero states of t = 1 are skipped (the first step's gate and prior convolutions
see only their non-zero inputs) and the encoder gates' share of read_x(x),
the same every step, is convolved once. Same parameters, same values to
float rounding (the scan forms compute everything and are tested against
it); 18% fewer FLOPs in the mnist_cpu training step (docs/performance.md).
The LSTM cells' state passes through ``geco_jax.ops.fusion.cotangent_barrier``
(the identity), without which XLA:CPU recomputed the cell's gradient chain
through time in every step's backward pass: 10-13% of the step (lever 33).

Recurrence forms (``recurrence``), identical in value and gradient:
- ``'unrolled'``: a Python loop over the steps (one submodule called T times).
- ``'scan'``: ``nn.scan`` rolled (a ``jax.lax.scan`` loop in the compiled code).
- ``'scan_unrolled'``: ``nn.scan`` with ``unroll=True``.
On XLA:CPU the backward pass of a rolled scan over a conv-LSTM is much slower
than the unrolled one (shared/docs/platform-notes.md), so ``'unrolled'`` is
the default; see the measurements below. (Accelerators were not measured; a
rolled scan, which compiles the step once, may pay off there for large T.)

Convolutions (``convolutions``): ``'xla'`` (XLA's own, everywhere) or
``'onednn'``: the gate, prior and posterior convolutions (stride 1, SAME, all
but 1 of the mnist_cpu step's 38 GFLOP) computed by oneDNN on XLA:CPU's thread
pool (``geco_jax.ops.onednn``; CPU only, the ``onednn`` extra, compiled at
first use). Same parameters and values to float rounding; on the project's
2-core CPU the mnist_cpu training step ran 6-11% faster with it
(docs/performance.md, levers 32 and 33). ``'onednn_winograd'`` is the same
but for the 3x3 convolutions with at least ``WINOGRAD_MIN_FEATURES`` outputs
(the gates'), which run Winograd's F(2x2, 3x3): 16 multiplications per 2x2
output tile instead of 36, as matrix products by oneDNN's sgemm (lever 38).
``choose_convolutions()`` says which to use on this machine: 'onednn_winograd'
on one CPU device where oneDNN is available, else 'xla' (what the
experiments' configs ask for with ``'auto'``).

Presets (``convdraw_preset(name)``; dicts of constructor keyword arguments):
  mnist_cpu            28x28x1, T=8,  hidden 32,  latent 8,  read 16, 3x3 kernels
  mnist_accelerator    28x28x1, T=16, hidden 160, latent 12, read 64, 5x5 kernels
  cifar10_cpu          32x32x3, T=8,  hidden 32,  latent 8,  read 16, 3x3 kernels
  cifar10_accelerator  32x32x3, T=32, hidden 256, latent 16, read 64, 5x5 kernels

Measured 2026-11-25 on the project's 2-core CPU, which other jobs shared (load
average 1-3, then about 5): mnist_cpu, batch 32 of 28x28x1, one full training
step (value_and_grad of a Gaussian ELBO + Adam, jitted), each run in a fresh
process; compile = lower + compile of the step; steps/s after a warm-up step;
3-6 runs per form, ranges shown.

  python -m pytest tests/test_convdraw.py -m slow -s    # prints both per form

                   compile (s)              steps/s
                   load 1-3   load ~5       load 1-3      load ~5
  'unrolled'       6.9-12.7   24-28         0.61-1.26     0.27-0.62
  'scan_unrolled'  6.7-9.6    26-34         0.83-1.15     0.33-0.55
  'scan' (rolled)  5.0-5.3    11-19         0.07-0.085    0.026-0.044

With 5x5 kernels: 9.3-10.2 s and 0.48-0.52 steps/s (load ~1.7), 21-30 s and
0.19-0.29 steps/s (load ~5), hence 3x3 in the CPU presets. Every compile was
under the 60 s budget. The rolled scan compiles fastest but trains 10-15x
slower (its backward pass); the two unrolled forms are indistinguishable, and
the Python loop is the default because it is the simplest to read and debug.

Usage:

  model = ConvDraw(**convdraw_preset("mnist_cpu"))
  params = model.init(init_rng, images, rng)
  out = model.apply(params, images, rng)            # VAEOutput
  kl_t = model.apply(params, images, rng, method=model.kl_per_step)   # [batch, T]
  samples = model.apply(params, rng, 16, method=model.sample)
  # Scoring given paths z_1..T (teacher forcing; for the marginal KL):
  z = model.apply(params, images, rng, method=model.trace).latent   # [batch, T, h, w, c]
  log_p = model.apply(params, z, method=model.log_prior)             # [batch]
  log_q = model.apply(params, z, images, method=model.log_posterior) # [batch]
  pairs = model.apply(params, z, images, method=model.pairwise_log_posterior)  # [J, B]
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from geco_jax.models.common import VAEOutput
from geco_jax.models.common import gaussian_kl
from geco_jax.ops import fusion
from geco_jax.ops import onednn

RECURRENCES = ("unrolled", "scan", "scan_unrolled")
# Who computes the stride-1 convolutions (gates, prior, posterior): XLA, or
# oneDNN on XLA:CPU's thread pool (``geco_jax.ops.onednn``; CPU only, optional).
CONVOLUTIONS = ("xla", "onednn", "onednn_winograd")
# With 'onednn_winograd', a 3x3 convolution with at least this many output
# channels (the gates') is Winograd's F(2x2, 3x3); the others are oneDNN's direct.
WINOGRAD_MIN_FEATURES = 64


def choose_convolutions(num_devices: int | None = None) -> tuple[str, str]:
  """The ``convolutions`` value for this machine, and why: what ``'auto'`` means.

  ``'onednn_winograd'`` where it can run: JAX's default backend is the CPU,
  the step runs on one device (XLA does not split the oneDNN calls over
  several) and ``geco_jax.ops.onednn`` is available (oneDNN's packages and a
  C++ compiler; its handlers are built here once, in about 5 s, then cached).
  ``'xla'`` everywhere else: on an accelerator, on several devices, or when
  oneDNN cannot run (the reason says why). Both compute the same function
  from the same parameters (to float rounding, about 1e-6 relative), so a
  checkpoint trained with one resumes with the other.

  Why this order: on the project's 2-core CPU, ConvDraw's mnist_cpu training
  step with 'onednn_winograd' ran at 1.01-1.16 of its PyTorch twin's speed,
  against 0.98-1.05 with 'onednn' and 0.93-0.97 with 'xla' in the same runs
  (docs/performance.md, lever 38).

  Args:
    num_devices: devices the step is split over (default: ``jax.device_count()``).
  """
  ok, why = onednn.usable_for_step(num_devices)
  return ("onednn_winograd" if ok else "xla"), why

PRESETS: dict[str, dict[str, Any]] = {
    # 3x3 kernels on the CPU: 5x5 has 2.8x the FLOPs and measured about half
    # the steps/s (module docstring); these presets are for tests, notebooks
    # and short runs.
    "mnist_cpu": dict(image_shape=(28, 28, 1), num_steps=8, hidden_channels=32,
                      latent_channels=8, read_channels=16, kernel_size=3),
    "mnist_accelerator": dict(image_shape=(28, 28, 1), num_steps=16,
                              hidden_channels=160, latent_channels=12,
                              read_channels=64, kernel_size=5),
    "cifar10_cpu": dict(image_shape=(32, 32, 3), num_steps=8, hidden_channels=32,
                        latent_channels=8, read_channels=16, kernel_size=3),
    "cifar10_accelerator": dict(image_shape=(32, 32, 3), num_steps=32,
                                hidden_channels=256, latent_channels=16,
                                read_channels=64, kernel_size=5),
}

# Channels of the context encoding added by ``convdraw_preset(..., conditional=True)``.
_CONTEXT_CHANNELS = {"mnist_cpu": 32, "mnist_accelerator": 128,
                     "cifar10_cpu": 32, "cifar10_accelerator": 256}


def convdraw_preset(name: str, conditional: bool = False) -> dict[str, Any]:
  """Constructor keyword arguments of a named configuration (a fresh copy).

  ``conditional=True`` adds ``context_channels`` for ``ConditionalConvDraw``.
  """
  if name not in PRESETS:
    raise ValueError(f"Unknown ConvDraw preset {name!r}; choose from {sorted(PRESETS)}.")
  kwargs = copy.deepcopy(PRESETS[name])
  if conditional:
    kwargs["context_channels"] = _CONTEXT_CHANNELS[name]
  return kwargs


class ConvDrawTrace(NamedTuple):
  """Everything one encoding pass computes; per-step arrays are [batch, T, ...].

  Attributes:
    reconstruction: sigmoid(canvas_T), [batch, H, W, C].
    kl: sum_t kl_per_step, [batch].
    kl_per_step: KL(q_t || p_t) summed over positions and channels, [batch, T].
    latent: z_t ~ q_t, [batch, T, H/2, W/2, latent_channels].
    posterior_mean, posterior_log_std: of q_t, shaped like ``latent``.
    prior_mean, prior_log_std: of p_t, shaped like ``latent``.
    log_posterior: log q(z_1..T | x) of ``latent``, [batch], from the noise
      each z_t was drawn with (exact however narrow q is; rescoring the path,
      ``log_posterior``, recomputes z_t - mu^q_t, which float32 loses when
      s^q_t is far below mu^q_t's resolution).
  """

  reconstruction: jax.Array
  kl: jax.Array
  kl_per_step: jax.Array
  latent: jax.Array
  posterior_mean: jax.Array
  posterior_log_std: jax.Array
  prior_mean: jax.Array
  prior_log_std: jax.Array
  log_posterior: jax.Array


class _Zeros(NamedTuple):
  """An input known to be zero (a state at t = 0): its share of a convolution is skipped."""
  shape: tuple


class _Gates(NamedTuple):
  """An input's share of a convolution, computed beforehand (it is the same every step)."""
  value: jax.Array
  channels: int


def _channels(group) -> int:
  return group.channels if isinstance(group, _Gates) else group.shape[-1]


class _GroupedConv(nn.Module):
  """``nn.Conv(features, (k, k), padding='SAME')`` of channel groups concatenated.

  The parameters are ``nn.Conv``'s (``kernel`` [k, k, sum of the groups'
  channels, features], ``bias`` [features], initialised alike), and so is
  the value, computed only over what is not known beforehand: a group given
  as ``None`` is absent (no channels), a ``_Zeros`` group has channels whose
  share is zero and is skipped, and a ``_Gates`` group's share was computed
  earlier with ``use_bias=False`` and is added. The remaining groups are
  convolved together, as one concatenation with the matching slices of the
  kernel: one convolution, as in ``nn.Conv``. ``convolutions`` picks who
  computes it (``CONVOLUTIONS``): XLA, or oneDNN (``geco_jax.ops.onednn``),
  with 'onednn_winograd' Winograd's F(2x2, 3x3) for 3x3 kernels with at least
  ``WINOGRAD_MIN_FEATURES`` features.
  """

  features: int
  kernel_size: int
  convolutions: str = "xla"

  @nn.compact
  def __call__(self, groups, use_bias: bool = True):
    groups = [g for g in groups if g is not None]
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, sum(_channels(g) for g in groups), self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    inputs, ranges, shares, offset = [], [], [], 0
    for group in groups:
      channels = _channels(group)
      if isinstance(group, _Gates):
        shares.append(group.value)
      elif not isinstance(group, _Zeros):
        inputs.append(group)
        if ranges and ranges[-1][1] == offset:
          ranges[-1] = (ranges[-1][0], offset + channels)   # adjacent: one slice
        else:
          ranges.append((offset, offset + channels))
      offset += channels
    if inputs:
      x = inputs[0] if len(inputs) == 1 else jnp.concatenate(inputs, axis=-1)
      w = jnp.concatenate([kernel[:, :, lo:hi] for lo, hi in ranges], axis=2)
      if self.convolutions == "xla":
        shares.append(jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
      else:
        winograd = (self.convolutions == "onednn_winograd" and k == 3
                    and self.features >= WINOGRAD_MIN_FEATURES)
        shares.append(onednn.conv2d_same(x, w, "winograd" if winograd else "direct"))
    if not shares:      # every input zero: the bias alone
      shape = (*groups[0].shape[:-1], self.features)
      return jnp.broadcast_to(bias, shape) if use_bias else jnp.zeros(shape, bias.dtype)
    out = shares[0]
    for share in shares[1:]:
      out = out + share
    return out + bias if use_bias else out


class ConvLSTMCell(nn.Module):
  """Convolutional LSTM; the four gates come from one convolution.

  [i, f, o, g] = conv([inputs..., h_{t-1}]);
  c_t = sigmoid(f + 1) c_{t-1} + sigmoid(i) tanh(g);  h_t = sigmoid(o) tanh(c_t).
  The +1 on the forget gate keeps the cell's memory open at initialisation.
  c_{t-1} passes through ``geco_jax.ops.fusion.cotangent_barrier`` (the
  identity, whose gradient XLA:CPU then keeps in memory between steps
  instead of recomputing the chain through time in every step).

  The gate convolution skips what is known to be zero and what was computed
  beforehand: a ``None`` state is the zero state (t = 0: no convolution of
  h, no forget term), and an input that is the same every step can be
  convolved once (``input_gates``) and passed as ``_Gates``. Values are those
  of the plain formula; ConvDraw's training step saves about a fifth of its
  convolution work this way (docs/performance.md).

  Attributes:
    features: channels of h and c.
    kernel_size: side of the square gate kernel.
    convolutions: who computes the gate convolution (``CONVOLUTIONS``).
  """

  features: int
  kernel_size: int
  convolutions: str = "xla"

  def setup(self):
    self.gates = _GroupedConv(4 * self.features, self.kernel_size, self.convolutions,
                              name="gates")

  def _zero_hidden(self, inputs):
    reference = next(g for g in inputs if g is not None)
    shape = reference.value.shape if isinstance(reference, _Gates) else reference.shape
    return _Zeros((*shape[:-1], self.features))

  def input_gates(self, inputs) -> _Gates:
    """The gates' share (no bias) of the arrays among ``inputs``, to reuse.

    ``inputs`` is the full sequence of a later call, with ``_Zeros`` standing
    for the inputs not precomputed; the result stands for the arrays (which
    must be adjacent) at their place in that later call.
    """
    value = self.gates([*inputs, self._zero_hidden(inputs)], use_bias=False)
    return _Gates(value, sum(g.shape[-1] for g in inputs
                             if g is not None and not isinstance(g, _Zeros)))

  def __call__(self, state, inputs):
    """``state`` = (c, h), or None for zeros; ``inputs`` a sequence as ``_GroupedConv``'s."""
    cell, hidden = (None, self._zero_hidden(inputs)) if state is None else state
    if cell is not None:
      # The cell's gradient flows back through time by elementwise work
      # alone; materialise it at each step, or XLA:CPU's fusions recompute
      # the whole chain in every step's backward pass (lever 33).
      cell = fusion.cotangent_barrier(cell)
    gates = self.gates([*inputs, hidden])
    input_gate, forget_gate, output_gate, candidate = jnp.split(gates, 4, axis=-1)
    new = nn.sigmoid(input_gate) * jnp.tanh(candidate)
    cell = new if cell is None else nn.sigmoid(forget_gate + 1.0) * cell + new
    hidden = nn.sigmoid(output_gate) * jnp.tanh(cell)
    return cell, hidden


class _ConvDrawStep(nn.Module):
  """One step t of ConvDraw (the equations of the module docstring).

  Called as ``step(carry, noise, x, x_read, context)`` where carry =
  (encoder state, decoder state, canvas logits) and noise ~ N(0, I) is this
  step's reparameterisation noise. With ``x`` None the step generates: z_t is
  drawn from the prior and the encoder is skipped (its state stays None).
  A None decoder (or, when encoding, encoder) state is the zero state of
  t = 1, whose convolutions are skipped; ``x_read`` may be the encoder's
  ``_Gates`` of it (``encoder_input_gates``), computed once for all steps.
  """

  image_channels: int
  hidden_channels: int
  latent_channels: int
  read_channels: int
  kernel_size: int
  convolutions: str = "xla"

  def setup(self):
    kernel = (self.kernel_size, self.kernel_size)
    conv = self.convolutions
    self.read_error = nn.Conv(self.read_channels, kernel, strides=(2, 2), name="read_error")
    self.encoder = ConvLSTMCell(self.hidden_channels, self.kernel_size, conv, name="encoder")
    self.posterior = _GroupedConv(2 * self.latent_channels, self.kernel_size, conv,
                                  name="posterior")
    self.prior = _GroupedConv(2 * self.latent_channels, self.kernel_size, conv, name="prior")
    self.decoder = ConvLSTMCell(self.hidden_channels, self.kernel_size, conv, name="decoder")
    self.write = nn.ConvTranspose(self.image_channels, kernel, strides=(2, 2),
                                  padding="SAME", name="write")

  def encoder_input_gates(self, x_read) -> _Gates:
    """The encoder gates' share of the read of x, which every step uses unchanged."""
    zeros = lambda channels: _Zeros((*x_read.shape[:-1], channels))  # noqa: E731
    return self.encoder.input_gates(
        (x_read, zeros(self.read_channels), zeros(self.hidden_channels)))

  def prior_params(self, previous_decoder_hidden, context):
    """(mu^p_t, log s^p_t) from h^dec_{t-1} (a ``_Zeros`` at t = 1)."""
    return jnp.split(self.prior((previous_decoder_hidden, context)), 2, axis=-1)

  def posterior_params(self, x, x_read, canvas, previous_decoder_hidden, encoder_state,
                       context):
    """The encoder's step: (h^enc_t state, mu^q_t, log s^q_t)."""
    # The encoder sees what the canvas still gets wrong, so later steps
    # spend their latent on the residual (Gregor et al. 2016).
    error_read = self.read_error(x - nn.sigmoid(canvas))
    encoder_state = self.encoder(
        encoder_state, (x_read, error_read, previous_decoder_hidden))
    mean, log_std = jnp.split(self.posterior((encoder_state[1], context)), 2, axis=-1)
    return encoder_state, mean, log_std

  def decode(self, z, decoder_state, canvas, context):
    """The decoder's step: (h^dec_t state, canvas_t) from z_t."""
    decoder_state = self.decoder(decoder_state, (z, context))
    return decoder_state, canvas + self.write(decoder_state[1])

  def encoder_hidden_gates(self, previous_decoder_hidden):
    """The encoder gates' share of h^dec_{t-1} (``_Zeros`` stays), to reuse."""
    if isinstance(previous_decoder_hidden, _Zeros):
      return previous_decoder_hidden
    zeros = lambda channels: _Zeros(  # noqa: E731
        (*previous_decoder_hidden.shape[:-1], channels))
    return self.encoder.input_gates(
        (zeros(self.read_channels), zeros(self.read_channels), previous_decoder_hidden))

  def __call__(self, carry, noise, x, x_read, context):
    encoder_state, decoder_state, canvas = carry
    previous_decoder_hidden = _previous_hidden(decoder_state, noise.shape[:-1],
                                               self.hidden_channels)
    prior_mean, prior_log_std = self.prior_params(previous_decoder_hidden, context)
    if x is None:
      mean, log_std = prior_mean, prior_log_std
    else:
      encoder_state, mean, log_std = self.posterior_params(
          x, x_read, canvas, previous_decoder_hidden, encoder_state, context)
    z = mean + jnp.exp(log_std) * noise
    decoder_state, canvas = self.decode(z, decoder_state, canvas, context)
    if x is None:
      outputs = {"latent": z}
    else:
      # (z_t - mu) / s is the noise itself: log q(z_t | x, z_<t) from it.
      log_q = jnp.sum((-0.5 * jnp.square(noise) - log_std
                       - 0.5 * math.log(2.0 * math.pi)).reshape(noise.shape[0], -1), axis=1)
      outputs = {"latent": z, "posterior_mean": mean, "posterior_log_std": log_std,
                 "prior_mean": prior_mean, "prior_log_std": prior_log_std,
                 "kl": gaussian_kl(mean, log_std, prior_mean, prior_log_std),
                 "log_posterior": log_q}
    return (encoder_state, decoder_state, canvas), outputs


def _previous_hidden(decoder_state, spatial_shape, channels):
  """h^dec_{t-1}: the state's hidden, or ``_Zeros`` for the None state of t = 1."""
  if decoder_state is None:
    return _Zeros((*spatial_shape, channels))
  return decoder_state[1]


def _gaussian_log_prob(z, mean, log_std):
  """log N(z; mean, diag(exp(log_std))^2) summed over every axis but the first."""
  log_prob = (-0.5 * jnp.square((z - mean) * jnp.exp(-log_std)) - log_std
              - 0.5 * math.log(2.0 * math.pi))
  return jnp.sum(log_prob.reshape(log_prob.shape[0], -1), axis=1)


class _ConvDrawCore(nn.Module):
  """What ConvDraw and ConditionalConvDraw share: the read of x and the T steps."""

  image_shape: Sequence[int] = (28, 28, 1)
  num_steps: int = 8
  hidden_channels: int = 32
  latent_channels: int = 8
  read_channels: int = 16
  kernel_size: int = 3
  recurrence: str = "unrolled"
  convolutions: str = "xla"

  def _setup_core(self):
    height, width, channels = self.image_shape
    if height % 2 or width % 2:
      raise ValueError(
          f"ConvDraw needs even image sides; got {tuple(self.image_shape)}.")
    if self.num_steps < 1:
      raise ValueError(f"num_steps must be >= 1; got {self.num_steps}.")
    if self.recurrence not in RECURRENCES:
      raise ValueError(
          f"recurrence must be one of {RECURRENCES}; got {self.recurrence!r}.")
    if self.convolutions not in CONVOLUTIONS:
      raise ValueError(
          f"convolutions must be one of {CONVOLUTIONS}; got {self.convolutions!r}.")
    if self.convolutions != "xla":
      onednn.require()
    kernel = (self.kernel_size, self.kernel_size)
    # x does not change over the steps: read it once, outside the loop.
    self.read_x = nn.Conv(self.read_channels, kernel, strides=(2, 2), name="read_x")
    step = _ConvDrawStep
    if self.recurrence != "unrolled":
      # Parameters are shared across steps (broadcast); noise is scanned over
      # its leading T axis; x, its read and the context are the same every step.
      step = nn.scan(
          _ConvDrawStep, variable_broadcast="params", split_rngs={"params": False},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), out_axes=0,
          length=self.num_steps,
          unroll=self.num_steps if self.recurrence == "scan_unrolled" else 1)
    # The same name for every form, so parameters are interchangeable.
    self.step = step(image_channels=channels, hidden_channels=self.hidden_channels,
                     latent_channels=self.latent_channels,
                     read_channels=self.read_channels, kernel_size=self.kernel_size,
                     convolutions=self.convolutions, name="step")

  def _run_steps(self, rng, batch_size, x, context, dtype):
    """All T steps; returns the final canvas and per-step outputs [batch, T, ...]."""
    height, width, channels = self.image_shape
    state_shape = (batch_size, height // 2, width // 2)
    # All the noise is drawn up front so that every recurrence form consumes
    # exactly the same numbers.
    noise = jax.random.normal(
        rng, (self.num_steps, *state_shape, self.latent_channels), dtype)
    canvas = jnp.zeros((batch_size, height, width, channels), dtype)
    x_read = None if x is None else self.read_x(x)
    if self.recurrence == "unrolled":
      # Known zeros and loop invariants are skipped in the Python loop: the
      # states of t = 1 are None (zero; their convolutions skipped) and the
      # encoder's convolution of x's read is computed once, not T times.
      carry = (None, None, canvas)
      if x_read is not None:
        x_read = self.step.encoder_input_gates(x_read)
      per_step = []
      for t in range(self.num_steps):
        carry, outputs = self.step(carry, noise[t], x, x_read, context)
        per_step.append(outputs)
      outputs = jax.tree.map(lambda *a: jnp.stack(a, axis=1), *per_step)
    else:
      zero_state = lambda: (jnp.zeros((*state_shape, self.hidden_channels), dtype),) * 2
      carry = (None if x is None else zero_state(), zero_state(), canvas)
      carry, outputs = self.step(carry, noise, x, x_read, context)
      outputs = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), outputs)
    return carry[2], outputs

  def _check_images(self, x):
    if tuple(x.shape[1:]) != tuple(self.image_shape):
      raise ValueError(
          f"Expected images of shape [batch, {', '.join(map(str, self.image_shape))}];"
          f" got {x.shape}.")

  def _trace(self, x, rng, context_encoding) -> ConvDrawTrace:
    self._check_images(x)
    canvas, outputs = self._run_steps(rng, x.shape[0], x, context_encoding, x.dtype)
    return ConvDrawTrace(
        reconstruction=nn.sigmoid(canvas), kl=jnp.sum(outputs["kl"], axis=1),
        kl_per_step=outputs["kl"], latent=outputs["latent"],
        posterior_mean=outputs["posterior_mean"],
        posterior_log_std=outputs["posterior_log_std"],
        prior_mean=outputs["prior_mean"], prior_log_std=outputs["prior_log_std"],
        log_posterior=jnp.sum(outputs["log_posterior"], axis=1))

  def _generate(self, rng, num_samples, context_encoding):
    canvas, _ = self._run_steps(rng, num_samples, None, context_encoding, jnp.float32)
    return nn.sigmoid(canvas)

  # Scoring a given path z_1..T (teacher forcing), for the marginal KL.

  def _check_latent(self, latent, what: str):
    if self.recurrence != "unrolled":
      raise ValueError(
          f"{what} runs the steps one by one; call it on "
          f"model.clone(recurrence='unrolled'), which has the same parameters "
          f"(this model's recurrence is {self.recurrence!r}).")
    height, width = self.image_shape[:2]
    expected = (self.num_steps, height // 2, width // 2, self.latent_channels)
    if latent.ndim != 5 or tuple(latent.shape[1:]) != expected:
      raise ValueError(
          f"{what}: expected a latent path of shape [batch, {', '.join(map(str, expected))}]"
          f" (T, H/2, W/2, latent_channels); got {latent.shape}.")

  def _decoder_path(self, latent, context):
    """Along a given path: h^dec_{t-1} and canvas_{t-1} for every t, and log p(z)."""
    height, width, channels = self.image_shape
    canvas = jnp.zeros((latent.shape[0], height, width, channels), latent.dtype)
    decoder_state, hiddens, canvases, log_prior = None, [], [], 0.0
    for t in range(self.num_steps):
      z = latent[:, t]
      previous = _previous_hidden(decoder_state, z.shape[:-1], self.hidden_channels)
      mean, log_std = self.step.prior_params(previous, context)
      log_prior = log_prior + _gaussian_log_prob(z, mean, log_std)
      hiddens.append(previous)
      canvases.append(canvas)
      decoder_state, canvas = self.step.decode(z, decoder_state, canvas, context)
    return hiddens, canvases, log_prior

  def _path_log_posterior(self, x, latent, context, all_pairs: bool):
    """log q(z|x) of given paths; [batch] row by row, or [J, B] for all pairs."""
    self._check_images(x)
    hiddens, canvases, _ = self._decoder_path(latent, context)
    x_read = self.read_x(x)
    if all_pairs:
      # Pair (j, b) = x_j with path b, flattened j-major; the decoder's path
      # (which does not depend on x) was run once per b, x's read once per j.
      num_x, num_z = x.shape[0], latent.shape[0]

      def from_x(a):
        return jnp.broadcast_to(a[:, None], (num_x, num_z, *a.shape[1:])).reshape(
            num_x * num_z, *a.shape[1:])

      def from_z(a):
        if isinstance(a, _Zeros):
          return _Zeros((num_x * num_z, *a.shape[1:]))
        if isinstance(a, _Gates):
          return _Gates(from_z(a.value), a.channels)
        return jnp.broadcast_to(a[None], (num_x, num_z, *a.shape[1:])).reshape(
            num_x * num_z, *a.shape[1:])

      # The encoder gates' shares of x's read (per j) and of h^dec_{t-1} (per
      # b) are convolved before pairing: per pair, only the error read and
      # h^enc are (about 60% of the gate convolution).
      gates = self.step.encoder_input_gates(x_read)
      x_read = _Gates(from_x(gates.value), gates.channels)
      x, latent = from_x(x), from_z(latent)
      hiddens = [from_z(self.step.encoder_hidden_gates(h)) for h in hiddens]
      canvases = [from_z(c) for c in canvases]
    else:
      x_read = self.step.encoder_input_gates(x_read)
    encoder_state, log_posterior = None, 0.0
    for t in range(self.num_steps):
      encoder_state, mean, log_std = self.step.posterior_params(
          x, x_read, canvases[t], hiddens[t], encoder_state, context)
      log_posterior = log_posterior + _gaussian_log_prob(latent[:, t], mean, log_std)
    return log_posterior.reshape(num_x, num_z) if all_pairs else log_posterior


class ConvDraw(_ConvDrawCore):
  """Unconditional ConvDraw with a learned autoregressive prior.

  Attributes:
    image_shape: (height, width, channels); height and width even.
    num_steps: T, the number of recurrent steps.
    hidden_channels: channels of both conv-LSTMs.
    latent_channels: channels of each z_t (at half the image resolution).
    read_channels: channels of the stride-2 reads of x and of the error.
    kernel_size: side of every square kernel.
    recurrence: 'unrolled' (Python loop), 'scan' (rolled nn.scan) or
      'scan_unrolled' (nn.scan, unroll=True); identical numbers.
    convolutions: 'xla' (XLA's own) or 'onednn' (the gate, prior and
      posterior convolutions by oneDNN on XLA:CPU's thread pool,
      ``geco_jax.ops.onednn``: CPU only, an optional extra; same parameters,
      same values to float rounding, 6-11% faster steps on the project's
      CPU), or 'onednn_winograd' (the same, the gates by Winograd's
      F(2x2, 3x3) when their kernels are 3x3). The strided reads and the
      write stay XLA's. ``choose_convolutions()`` picks one for this machine.

  The defaults are the ``mnist_cpu`` preset with the 'unrolled' recurrence.
  """

  def setup(self):
    self._setup_core()

  def trace(self, x, rng) -> ConvDrawTrace:
    """Encode x with z_t ~ q_t (noise from ``rng``); every per-step quantity."""
    return self._trace(x, rng, None)

  def __call__(self, x, rng) -> VAEOutput:
    """Encode x, draw z_1..T ~ q with ``rng``, decode; kl is summed over steps."""
    trace = self.trace(x, rng)
    return VAEOutput(reconstruction=trace.reconstruction, kl=trace.kl,
                     latent=trace.latent)

  def reconstruct(self, x, rng) -> VAEOutput:
    """Same as ``__call__``."""
    return self(x, rng)

  def kl_per_step(self, x, rng):
    """KL(q_t || p_t) per example and step, [batch, T]; sums to ``__call__``'s kl."""
    return self.trace(x, rng).kl_per_step

  def sample(self, rng, num_samples: int):
    """sigmoid(canvas_T) for z_t ~ p(z_t | z_<t): means of prior samples."""
    return self._generate(rng, num_samples, None)

  def log_prior(self, latent):
    """log p(z_1..T) = sum_t log p(z_t | z_<t) of given paths, [batch] (nats).

    ``latent`` is [batch, T, H/2, W/2, latent_channels], e.g. ``trace``'s
    ``latent``; the decoder is run along it (teacher forcing).
    """
    self._check_latent(latent, "log_prior")
    return self._decoder_path(latent, None)[2]

  def log_posterior(self, latent, x):
    """log q(z_1..T | x) = sum_t log q(z_t | x, z_<t) of given paths, [batch].

    Path i is scored under x[i]: the decoder runs along z (its states and
    canvas depend on z alone), the encoder reads x[i] and those states, as
    when encoding, but z_t is the given one instead of a fresh draw.
    """
    self._check_latent(latent, "log_posterior")
    if latent.shape[0] != x.shape[0]:
      raise ValueError(f"log_posterior scores path i under x[i]: got {latent.shape[0]} "
                       f"paths and {x.shape[0]} images (pairwise_log_posterior scores "
                       "all pairs).")
    return self._path_log_posterior(x, latent, None, all_pairs=False)

  def pairwise_log_posterior(self, latent, x):
    """log q(z_b | x_j) for every path b and image j, [num_images, num_paths].

    What the marginal KL's aggregate posterior needs
    (``geco_jax.metrics.marginal_kl``): the decoder's path is computed once
    per z_b and the read of x once per x_j, the encoder once per pair.
    """
    self._check_latent(latent, "pairwise_log_posterior")
    return self._path_log_posterior(x, latent, None, all_pairs=True)


class ContextEncoder(nn.Module):
  """Encodes context images to the state resolution and averages over them.

  r = mean_k f(context_k), f = relu(conv3x3(relu(conv_stride2(.)))). The mean,
  not GQN's sum, keeps r's scale independent of the number of context images.

  Attributes:
    features: channels of r.
    kernel_size: side of the stride-2 kernel.
  """

  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, context):
    """[batch, n_context, H, W, C] -> [batch, H/2, W/2, features]."""
    batch, num_context = context.shape[:2]
    h = context.reshape(batch * num_context, *context.shape[2:])
    h = nn.relu(nn.Conv(self.features, (self.kernel_size,) * 2, strides=(2, 2),
                        name="conv_stride2")(h))
    h = nn.relu(nn.Conv(self.features, (3, 3), name="conv")(h))
    return jnp.mean(h.reshape(batch, num_context, *h.shape[1:]), axis=1)


class ConditionalConvDraw(_ConvDrawCore):
  """ConvDraw conditioned on context images, as GQN's generator.

  The averaged context encoding r is concatenated to the inputs of the prior
  p(z_t | z_<t, r), the posterior q(z_t | x, z_<t, r) and the decoder LSTM.
  Context images are [batch, n_context, H, W, C_context] with the same H, W
  as x (any channels); a [batch, H, W, C_context] context counts as one image.

  Attributes: those of ``ConvDraw``, and
    context_channels: channels of the context encoding r.
  """

  context_channels: int = 32

  def setup(self):
    self._setup_core()
    self.context_encoder = ContextEncoder(self.context_channels, self.kernel_size,
                                          name="context_encoder")

  def _encode_context(self, context):
    if context.ndim == 4:
      context = context[:, None]
    height, width = self.image_shape[:2]
    if context.ndim != 5 or tuple(context.shape[2:4]) != (height, width):
      raise ValueError(
          f"Expected context of shape [batch, n_context, {height}, {width}, C];"
          f" got {context.shape}.")
    return self.context_encoder(context)

  def trace(self, x, rng, context) -> ConvDrawTrace:
    """Encode x given the context; every per-step quantity."""
    return self._trace(x, rng, self._encode_context(context))

  def __call__(self, x, rng, context) -> VAEOutput:
    """Encode x given the context, draw z_1..T ~ q with ``rng``, decode."""
    trace = self.trace(x, rng, context)
    return VAEOutput(reconstruction=trace.reconstruction, kl=trace.kl,
                     latent=trace.latent)

  def reconstruct(self, x, rng, context) -> VAEOutput:
    """Same as ``__call__``."""
    return self(x, rng, context)

  def kl_per_step(self, x, rng, context):
    """KL(q_t || p_t) per example and step, [batch, T]."""
    return self.trace(x, rng, context).kl_per_step

  def sample(self, rng, context):
    """sigmoid(canvas_T) for z_t ~ p(z_t | z_<t, r): one sample per context row."""
    return self._generate(rng, context.shape[0], self._encode_context(context))
