"""Tests of geco_jax.models.convdraw: shapes, the per-step KL against NumPy, the
three recurrence forms against each other, sampling, conditioning and a few
training steps.

Tiny models (8x8 images, T = 3) and few compiled programs keep the file fast on
a 2-core CPU: XLA:CPU compile time, not run time, is what costs here, so each
model gets one jitted ``evaluate`` (loss, gradients and every per-example
output) and one jitted ``sample``, each called with several inputs.
"""

import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geco_jax.models.common import VAEOutput
from geco_jax.models.convdraw import PRESETS
from geco_jax.models.convdraw import RECURRENCES
from geco_jax.models.convdraw import ConditionalConvDraw
from geco_jax.models.convdraw import ConvDraw
from geco_jax.models.convdraw import convdraw_preset

BATCH, STEPS, LATENT = 2, 3, 4
IMAGE_SHAPE = (8, 8, 1)
TINY = dict(image_shape=IMAGE_SHAPE, num_steps=STEPS, hidden_channels=8,
            latent_channels=LATENT, read_channels=4, kernel_size=3)
STATE = (IMAGE_SHAPE[0] // 2, IMAGE_SHAPE[1] // 2)
NUM_SAMPLES = 3


def _key(seed):
  # RngBitGenerator keys: XLA:CPU compiles them in a fraction of the time of
  # threefry, the default (about 2.5 s per program on the 2-core machine).
  # The slow training-step test uses default keys, as a trainer would.
  return jax.random.key(seed, impl="rbg")


def _images(seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (BATCH, *IMAGE_SHAPE))


def _context(seed=10, num_context=3, channels=2):
  return jax.random.uniform(jax.random.PRNGKey(seed),
                            (BATCH, num_context, *IMAGE_SHAPE[:2], channels))


def _loss(model, params, x, rng, *context):
  """Gaussian ELBO (sigma = 0.1, constants dropped), averaged over the batch."""
  output = model.apply(params, x, rng, *context)
  squared_error = jnp.sum(jnp.square(x - output.reconstruction), axis=(1, 2, 3))
  return jnp.mean(squared_error / (2 * 0.1**2) + output.kl)


def _compiled(model):
  """Jitted ``evaluate(params, x, rng, *context)`` and ``sample(params, rng, *context)``."""

  @jax.jit
  def evaluate(params, x, rng, *context):
    loss, grads = jax.value_and_grad(lambda p: _loss(model, p, x, rng, *context))(params)
    return dict(
        loss=loss, grads=grads,
        output=model.apply(params, x, rng, *context),
        reconstruct=model.apply(params, x, rng, *context, method=model.reconstruct),
        trace=model.apply(params, x, rng, *context, method=model.trace),
        kl_per_step=model.apply(params, x, rng, *context, method=model.kl_per_step))

  @jax.jit
  def sample(params, rng, *context):
    args = context if context else (NUM_SAMPLES,)
    return model.apply(params, rng, *args, method=model.sample)

  return evaluate, sample


def _setup(model, *context):
  params = jax.jit(model.init)(_key(0), _images(), _key(1), *context)
  evaluate, sample = _compiled(model)
  reference = jax.device_get(evaluate(params, _images(), _key(2), *context))
  return types.SimpleNamespace(model=model, params=params, context=context,
                               evaluate=evaluate, sample=sample, reference=reference)


@pytest.fixture(scope="module")
def unconditional():
  return _setup(ConvDraw(**TINY))


@pytest.fixture(scope="module")
def conditional():
  return _setup(ConditionalConvDraw(**TINY, context_channels=4), _context())


def _check_output(output):
  assert isinstance(output, VAEOutput)
  assert output.reconstruction.shape == (BATCH, *IMAGE_SHAPE)
  assert output.kl.shape == (BATCH,)
  assert output.latent.shape == (BATCH, STEPS, *STATE, LATENT)
  reconstruction = np.asarray(output.reconstruction)
  assert np.all((reconstruction >= 0) & (reconstruction <= 1))
  kl = np.asarray(output.kl)
  assert np.all(np.isfinite(kl)) and np.all(kl >= 0)


@pytest.mark.parametrize("which", ["unconditional", "conditional"])
def test_shapes_and_ranges(which, request):
  setup = request.getfixturevalue(which)
  results = setup.reference
  _check_output(results["output"])
  assert results["kl_per_step"].shape == (BATCH, STEPS)
  np.testing.assert_allclose(np.sum(results["kl_per_step"], axis=1),
                             results["output"].kl, rtol=1e-5)
  jax.tree.map(np.testing.assert_allclose, results["reconstruct"], results["output"])
  samples = np.asarray(setup.sample(setup.params, _key(5), *setup.context))
  expected_rows = BATCH if setup.context else NUM_SAMPLES
  assert samples.shape == (expected_rows, *IMAGE_SHAPE)
  assert np.all((samples >= 0) & (samples <= 1))


def _numpy_gaussian_kl(mean_q, log_std_q, mean_p, log_std_p):
  """KL(N_q || N_p) of diagonal Gaussians, float64, summed over all but the first axis."""
  mean_q, log_std_q, mean_p, log_std_p = (
      np.asarray(a, np.float64) for a in (mean_q, log_std_q, mean_p, log_std_p))
  var_q, var_p = np.exp(2 * log_std_q), np.exp(2 * log_std_p)
  kl = 0.5 * (var_q / var_p + (mean_q - mean_p) ** 2 / var_p - 1) + log_std_p - log_std_q
  return kl.reshape(kl.shape[0], -1).sum(axis=1)


@pytest.mark.parametrize("which", ["unconditional", "conditional"])
def test_kl_per_step_matches_numpy(which, request):
  results = request.getfixturevalue(which).reference
  trace = results["trace"]
  for name in ("latent", "posterior_mean", "posterior_log_std", "prior_mean",
               "prior_log_std"):
    assert getattr(trace, name).shape == (BATCH, STEPS, *STATE, LATENT), name
  for t in range(STEPS):
    expected = _numpy_gaussian_kl(trace.posterior_mean[:, t], trace.posterior_log_std[:, t],
                                  trace.prior_mean[:, t], trace.prior_log_std[:, t])
    np.testing.assert_allclose(trace.kl_per_step[:, t], expected, rtol=1e-4, atol=1e-4)
  assert np.all(trace.kl_per_step >= 0)
  np.testing.assert_allclose(trace.kl, np.sum(trace.kl_per_step, axis=1), rtol=1e-5)
  np.testing.assert_allclose(trace.kl_per_step, results["kl_per_step"])
  np.testing.assert_allclose(trace.kl, results["output"].kl)
  # z_t is a reparameterised draw from q_t: standardised, it is O(1) noise.
  standardised = (trace.latent - trace.posterior_mean) / np.exp(trace.posterior_log_std)
  assert np.all(np.abs(standardised) < 10)
  if which == "unconditional":
    # p(z_1) comes from the zero initial decoder state: the same for every example.
    np.testing.assert_allclose(trace.prior_mean[0, 0], trace.prior_mean[1, 0])
    np.testing.assert_allclose(trace.prior_log_std[0, 0], trace.prior_log_std[1, 0])


@pytest.fixture(scope="module", params=["unconditional", "conditional"])
def recurrence_results(request):
  """Per recurrence form: (evaluate's results, samples), with the same parameters.

  The conditional model is checked for 'scan' only: 'scan_unrolled' differs
  from it only in the unroll factor, and each form costs a compilation.
  """
  setup = request.getfixturevalue(request.param)
  assert setup.model.recurrence == "unrolled"
  forms = ("unrolled", "scan") if setup.context else RECURRENCES
  x, rng = _images(), _key(2)
  results = {}
  for recurrence in forms:
    model = setup.model.clone(recurrence=recurrence)
    # Every form has the same parameter tree, so parameters are interchangeable.
    shapes = jax.eval_shape(model.init, _key(0), x, rng, *setup.context)
    assert jax.tree.structure(shapes) == jax.tree.structure(setup.params), recurrence
    jax.tree.map(lambda s, p: np.testing.assert_equal(s.shape, p.shape),
                 shapes, setup.params)
    if recurrence == "unrolled":
      evaluate, sample = setup.evaluate, setup.sample
    else:
      evaluate, sample = _compiled(model)
    results[recurrence] = jax.device_get(
        (evaluate(setup.params, x, rng, *setup.context),
         sample(setup.params, _key(5), *setup.context)))
  return results


def test_recurrence_forms_agree(recurrence_results):
  """'unrolled', 'scan' and 'scan_unrolled' give the same values and gradients."""
  reference = recurrence_results["unrolled"]
  for recurrence, results in recurrence_results.items():
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 results, reference)


@pytest.mark.parametrize("which", ["unconditional", "conditional"])
def test_gradients_finite_and_reach_every_parameter(which, request):
  results = request.getfixturevalue(which).reference
  assert np.isfinite(results["loss"])
  for path, grad in jax.tree_util.tree_leaves_with_path(results["grads"]):
    assert np.all(np.isfinite(grad)), jax.tree_util.keystr(path)
    assert np.any(grad != 0), jax.tree_util.keystr(path)


def test_prior_samples_differ_across_rngs(unconditional):
  first = unconditional.sample(unconditional.params, _key(5))
  second = unconditional.sample(unconditional.params, _key(6))
  assert np.max(np.abs(first - second)) > 1e-4
  # Different rows of one call are different samples too.
  assert np.max(np.abs(first[0] - first[1])) > 1e-4


def test_conditional_output_depends_on_context(conditional):
  setup, x, rng = conditional, _images(), _key(2)
  other_context = _context(seed=12)
  output = setup.reference["output"]
  other = setup.evaluate(setup.params, x, rng, other_context)["output"]
  assert np.max(np.abs(output.reconstruction - other.reconstruction)) > 1e-5
  assert np.max(np.abs(output.kl - other.kl)) > 1e-5
  samples = setup.sample(setup.params, rng, *setup.context)
  other_samples = setup.sample(setup.params, rng, other_context)
  assert np.max(np.abs(samples - other_samples)) > 1e-5


def test_context_of_one_image_may_drop_its_axis(conditional):
  model, params = conditional.model, conditional.params
  encode = jax.jit(lambda context: model.apply(
      params, context, method=lambda module, c: module._encode_context(c)))
  single = _context(num_context=1)
  np.testing.assert_allclose(encode(single[:, 0]), encode(single))
  assert encode(single).shape == (BATCH, *STATE, 4)


def test_adam_steps_reduce_loss(unconditional):
  setup = unconditional
  # Fixed images with structure (bars) so there is something to learn.
  rows = np.arange(IMAGE_SHAPE[0])[:, None] * np.ones(IMAGE_SHAPE[1])
  x = jnp.asarray(np.stack([rows % 4 < 2, rows.T % 4 < 2]).astype(np.float32)[..., None])
  tx = optax.adam(1e-2)
  apply_adam = jax.jit(lambda grads, opt_state, params: (
      lambda updates, opt_state: (optax.apply_updates(params, updates), opt_state))(
          *tx.update(grads, opt_state, params)))
  params, opt_state, losses = setup.params, tx.init(setup.params), []
  for i in range(40):
    # The fixture's compiled evaluate gives the gradients: no new compilation.
    results = setup.evaluate(params, x, _key(100 + i))
    params, opt_state = apply_adam(results["grads"], opt_state, params)
    losses.append(float(results["loss"]))
  before, after = np.mean(losses[:3]), np.mean(losses[-3:])
  assert np.all(np.isfinite(losses)) and after < 0.7 * before, (before, after)


def test_presets():
  for name in PRESETS:
    kwargs = convdraw_preset(name)
    assert "context_channels" not in kwargs
    model = ConvDraw(**kwargs)
    height, width, channels = kwargs["image_shape"]
    x = jax.ShapeDtypeStruct((2, height, width, channels), jnp.float32)
    rng = jax.random.PRNGKey(0)
    # Abstract evaluation: shapes of the full-size presets without running them.
    output, _ = jax.eval_shape(model.init_with_output, rng, x, rng)
    assert output.reconstruction.shape == x.shape
    assert output.latent.shape == (2, kwargs["num_steps"], height // 2, width // 2,
                                   kwargs["latent_channels"])
    conditional = convdraw_preset(name, conditional=True)
    assert conditional["context_channels"] > 0
    ConditionalConvDraw(**conditional)
  convdraw_preset("mnist_cpu")["num_steps"] = 99  # a copy: the preset is unchanged
  assert PRESETS["mnist_cpu"]["num_steps"] != 99
  with pytest.raises(ValueError, match="Unknown ConvDraw preset"):
    convdraw_preset("imagenet")


def test_invalid_configurations():
  x, rng = _images(), jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="recurrence"):
    ConvDraw(**{**TINY, "recurrence": "rolled"}).init(rng, x, rng)
  with pytest.raises(ValueError, match="even"):
    ConvDraw(**{**TINY, "image_shape": (7, 8, 1)}).init(
        rng, jnp.zeros((1, 7, 8, 1)), rng)
  with pytest.raises(ValueError, match="Expected images"):
    ConvDraw(**TINY).init(rng, jnp.zeros((1, 10, 10, 1)), rng)
  with pytest.raises(ValueError, match="Expected context"):
    ConditionalConvDraw(**TINY).init(rng, x, rng, jnp.zeros((BATCH, 1, 6, 6, 1)))


@pytest.mark.slow
@pytest.mark.parametrize("recurrence", RECURRENCES)
def test_mnist_cpu_training_step_compiles_in_time(recurrence):
  """The requirement: a mnist_cpu training step (batch 32) compiles in < 60 s on 2 cores.

  Prints compile time and steps/s (python -m pytest tests/test_convdraw.py -m slow -s).
  """
  model = ConvDraw(**convdraw_preset("mnist_cpu"), recurrence=recurrence)
  x = jax.random.uniform(jax.random.PRNGKey(0), (32, 28, 28, 1))
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x, jax.random.PRNGKey(2))
  tx = optax.adam(1e-3)

  def step(params, opt_state, images, rng):
    loss, grads = jax.value_and_grad(lambda p: _loss(model, p, images, rng))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  start = time.perf_counter()
  compiled = jax.jit(step).lower(params, opt_state, x, jax.random.PRNGKey(3)).compile()
  compile_seconds = time.perf_counter() - start
  params, opt_state, loss = compiled(params, opt_state, x, jax.random.PRNGKey(3))
  loss.block_until_ready()
  steps, start = 0, time.perf_counter()
  while steps < 3 or time.perf_counter() - start < 5:
    params, opt_state, loss = compiled(params, opt_state, x, jax.random.PRNGKey(steps))
    loss.block_until_ready()
    steps += 1
  rate = steps / (time.perf_counter() - start)
  print(f"\n{recurrence}: compile {compile_seconds:.1f} s, {rate:.3f} steps/s")
  assert compile_seconds < 60
  assert np.isfinite(float(loss))


def test_grouped_conv_is_nn_conv_of_the_concatenation():
  """nn.Conv's parameters and value; known zeros skipped, precomputed shares added."""
  import flax.linen as nn

  from geco_jax.models.convdraw import _Gates
  from geco_jax.models.convdraw import _GroupedConv
  from geco_jax.models.convdraw import _Zeros

  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  a, b, c = (jax.random.normal(k, (2, 5, 6, n)) for k, n in zip(keys, (3, 4, 2)))
  reference, grouped = nn.Conv(7, (3, 3), padding="SAME"), _GroupedConv(7, 3)
  params = reference.init(_key(1), jnp.concatenate([a, b, c], -1))
  same = jax.tree.map(np.array_equal, params, grouped.init(_key(1), [a, b, c]))
  assert all(jax.tree.leaves(same)), "the same parameters, initialised alike"
  params = jax.tree.map(lambda p: p + 0.1, params)           # a non-zero bias too
  conv = lambda *groups: reference.apply(params, jnp.concatenate(groups, -1))  # noqa: E731
  apply = lambda *groups, **kw: grouped.apply(params, list(groups), **kw)  # noqa: E731
  zeros = lambda x: _Zeros(x.shape)  # noqa: E731
  close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)  # noqa: E731

  close(apply(a, b, c), conv(a, b, c))
  close(apply(a, zeros(b), c), conv(a, jnp.zeros_like(b), c))
  share = apply(a, zeros(b), zeros(c), use_bias=False)
  close(apply(_Gates(share, 3), b, c), conv(a, b, c))
  close(apply(_Gates(share, 3), zeros(b), c), conv(a, jnp.zeros_like(b), c))
  close(apply(zeros(a), zeros(b), zeros(c)), conv(*map(jnp.zeros_like, (a, b, c))))
  two = grouped.init(_key(1), [a, None, c])                  # None: absent, no channels
  np.testing.assert_allclose(grouped.apply(two, [a, None, c]),
                             reference.apply(two, jnp.concatenate([a, c], -1)), rtol=1e-5)


def test_lstm_zero_state_as_none_is_the_zero_state():
  from geco_jax.models.convdraw import ConvLSTMCell

  cell = ConvLSTMCell(4, 3)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 3))
  zero = (jnp.zeros((2, 5, 5, 4)),) * 2
  params = cell.init(_key(0), zero, (x,))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6),
               cell.apply(params, None, (x,)), cell.apply(params, zero, (x,)))


# Scoring given paths (teacher forcing), for ConvDraw's marginal KL.


def _numpy_log_normal(z, mean, log_std):
  z, mean, log_std = (np.asarray(a, np.float64) for a in (z, mean, log_std))
  terms = -0.5 * ((z - mean) / np.exp(log_std)) ** 2 - log_std - 0.5 * np.log(2 * np.pi)
  return terms.reshape(terms.shape[0], -1).sum(axis=1)


@pytest.fixture(scope="module")
def scored_paths(unconditional):
  """One jitted program: a trace, and its paths scored every way, on 3 images."""
  model, params = unconditional.model, unconditional.params
  x = jax.random.uniform(jax.random.PRNGKey(7), (3, *IMAGE_SHAPE))

  @jax.jit
  def score(params, x, rng):
    trace = model.apply(params, x, rng, method=model.trace)
    z = trace.latent
    return dict(
        trace=trace,
        log_prior=model.apply(params, z, method=model.log_prior),
        log_posterior=model.apply(params, z, x, method=model.log_posterior),
        # path b under image j, row by row: z[[0, 1, 2, 0, 1, 2]] under x[[1, 2, 0, 2, 0, 1]]
        crossed=model.apply(params, z[jnp.array([0, 1, 2, 0, 1, 2])],
                            x[jnp.array([1, 2, 0, 2, 0, 1])], method=model.log_posterior),
        pairwise=model.apply(params, z, x[:2], method=model.pairwise_log_posterior))

  return jax.device_get(score(params, x, _key(3)))


def test_teacher_forcing_along_the_sampled_path_gives_its_densities(scored_paths):
  # Scoring the encoding pass's own path must reproduce, step by step, the
  # posterior and prior that pass drew it from: log q and log p are the
  # Gaussian densities at z of the trace's means and scales.
  trace = scored_paths["trace"]
  np.testing.assert_allclose(
      scored_paths["log_posterior"],
      _numpy_log_normal(trace.latent, trace.posterior_mean, trace.posterior_log_std),
      rtol=1e-5)
  np.testing.assert_allclose(
      scored_paths["log_prior"],
      _numpy_log_normal(trace.latent, trace.prior_mean, trace.prior_log_std), rtol=1e-5)
  # The trace's own log q, from the noise each z_t was drawn with, is the same density.
  assert trace.log_posterior.shape == (3,)
  np.testing.assert_allclose(trace.log_posterior, scored_paths["log_posterior"], rtol=1e-5)


def test_pairwise_scores_are_the_row_by_row_scores_of_every_pair(scored_paths):
  pairwise = scored_paths["pairwise"]          # [2 images, 3 paths]
  assert pairwise.shape == (2, 3)
  np.testing.assert_allclose(np.diag(pairwise), scored_paths["log_posterior"][:2], rtol=1e-5)
  crossed = scored_paths["crossed"]           # path b under image j, see scored_paths
  for (b, j), value in zip([(0, 1), (1, 2), (2, 0), (0, 2), (1, 0), (2, 1)], crossed):
    if j < 2:
      np.testing.assert_allclose(pairwise[j, b], value, rtol=1e-5)


def test_one_step_convdraw_scores_are_its_gaussian_posteriors():
  # T = 1: q(z|x_j) is the Gaussian the encoding pass of x_j computes, whatever
  # z is scored, so the pairwise scores are known independently of teacher forcing.
  model = ConvDraw(**dict(TINY, num_steps=1))
  x = jax.random.uniform(jax.random.PRNGKey(8), (3, *IMAGE_SHAPE))
  params = model.init(_key(0), x, _key(1))
  trace = model.apply(params, x, _key(2), method=model.trace)
  pairwise = model.apply(params, trace.latent, x, method=model.pairwise_log_posterior)
  for j in range(3):
    expected = _numpy_log_normal(
        trace.latent, np.broadcast_to(trace.posterior_mean[j], trace.latent.shape),
        np.broadcast_to(trace.posterior_log_std[j], trace.latent.shape))
    np.testing.assert_allclose(pairwise[j], expected, rtol=1e-5)


def test_scoring_needs_the_unrolled_form_and_a_path_of_the_right_shape(unconditional):
  params, x = unconditional.params, _images()
  z = unconditional.reference["trace"].latent
  scanned = ConvDraw(**TINY, recurrence="scan")
  with pytest.raises(ValueError, match=r"clone\(recurrence='unrolled'\)"):
    scanned.apply(params, z, method=scanned.log_prior)
  unrolled = scanned.clone(recurrence="unrolled")
  np.testing.assert_allclose(unrolled.apply(params, z, method=unrolled.log_prior),
                             unconditional.model.apply(params, z,
                                                       method=unconditional.model.log_prior),
                             rtol=1e-6)
  model = unconditional.model
  with pytest.raises(ValueError, match="latent path of shape"):
    model.apply(params, z[:, :2], x, method=model.log_posterior)
  with pytest.raises(ValueError, match="path i under x"):
    model.apply(params, z, x[:1], method=model.log_posterior)


def test_convdraw_marginal_kl_of_identical_images_is_its_path_kl():
  # With every held-out image the same, the aggregate posterior is that image's
  # posterior, so each term log q_N(z_s) - log p(z_s) is log q(z_s|x) - log p(z_s)
  # exactly. With distinct images, log q_N(z_s) >= log q(z_s|x_s) - log N for
  # every sample, and E_{z ~ q(z|x_s)}[log q_N(z) - log q(z|x_s)] = -KL(q_s || q_N)
  # <= 0 (below for these seeds).
  from experiments import evaluate
  model = ConvDraw(**TINY)
  x = jax.random.uniform(jax.random.PRNGKey(9), (5, *IMAGE_SHAPE))
  params = jax.jit(model.init)(_key(0), x, _key(1))
  rng = jax.random.PRNGKey(4)
  # Compiled once each (eagerly, op by op, these took most of the test's time).
  latent = jax.jit(lambda x, key: model.apply(params, x, key, method=model.trace).latent)
  path_kl_of = jax.jit(lambda z, images: model.apply(params, z, images,
                                                     method=model.log_posterior)
                       - model.apply(params, z, method=model.log_prior))
  for images in (jnp.broadcast_to(x[:1], x.shape), x):
    estimate = evaluate._convdraw_marginal_kl(model, params, images, rng, batch_size=2,
                                              block_size=2)
    z = jnp.concatenate([latent(images[s:s + 2], jax.random.fold_in(rng, s))
                         for s in (0, 2, 4)])
    path_kl = path_kl_of(z, images)
    if images is x:
      assert float(estimate.kl) >= float(jnp.mean(path_kl)) - np.log(5) - 1e-3
      assert float(estimate.kl) < float(jnp.mean(path_kl)) - 1e-3   # distinct: below
    else:
      np.testing.assert_allclose(estimate.kl, jnp.mean(path_kl), rtol=1e-5)
      np.testing.assert_allclose(estimate.standard_error,
                                 jnp.std(path_kl, ddof=1) / np.sqrt(5), rtol=1e-4)
