"""oneDNN convolutions on XLA:CPU's pool (geco_jax.ops.onednn) and ConvDraw's use of them.

The values are checked against XLA's own convolution, and XLA's against a
direct sum over the kernel's taps (first principles), for shapes that split
unevenly over the pool's threads. Without oneDNN (the `onednn` extra) or a
C++ compiler these tests skip, unless GECO_REQUIRE_ONEDNN=1 (CI sets it),
which turns the skip into a failure.
"""

import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import convdraw_mnist
from configs import default as default_config
from experiments import setup
from geco_jax.models import ConvDraw
from geco_jax.models import ConvVAE
from geco_jax.models import VAENVP
from geco_jax.models import conv_vae as conv_vae_lib
from geco_jax.models import convdraw as convdraw_lib
from geco_jax.models import convdraw_preset
from geco_jax.ops import onednn


@pytest.fixture(scope="module")
def require_onednn():
  ok, why = onednn.available()
  if not ok:
    if os.environ.get("GECO_REQUIRE_ONEDNN") == "1":
      pytest.fail(f"GECO_REQUIRE_ONEDNN=1, but oneDNN is unavailable: {why}")
    pytest.skip(f"oneDNN unavailable: {why}")
  return why


def _xla_conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _taps_conv(x, w):
  """SAME stride-1 convolution as a sum over the kernel's taps (numpy, float64)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  kh, kw = w.shape[:2]
  n, h, wd, _ = x.shape
  padded = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
  out = np.zeros((n, h, wd, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += padded[:, i:i + h, j:j + wd, :] @ w[i, j]
  return out


# (batch, height, width, in channels, out channels, kh, kw): odd batches split
# unevenly over the pool's threads; batch 1 is one chunk; even and non-square
# kernels pad unevenly; 80 -> 128 is ConvDraw's encoder gate convolution.
SHAPES = [(32, 14, 14, 80, 128, 3, 3), (5, 7, 9, 3, 4, 1, 3), (3, 6, 5, 2, 7, 5, 2),
          (1, 4, 4, 16, 16, 3, 3), (7, 8, 8, 40, 24, 4, 4)]


def _arrays(shape):
  n, h, wd, c, f, kh, kw = shape
  keys = jax.random.split(jax.random.PRNGKey(sum(shape)), 3)
  return (jax.random.normal(keys[0], (n, h, wd, c)), jax.random.normal(keys[1], (kh, kw, c, f)),
          jax.random.normal(keys[2], (n, h, wd, f)))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


# Winograd's F(2x2, 3x3) takes 3x3 kernels; odd sides end in a half tile, one
# pixel is one tile of zeros around it, and under 32 tiles the call is one chunk.
WINOGRAD_SHAPES = [(32, 14, 14, 80, 128, 3, 3), (5, 7, 9, 3, 4, 3, 3), (1, 1, 1, 2, 2, 3, 3),
                   (3, 6, 5, 2, 7, 3, 3), (7, 8, 8, 40, 24, 3, 3), (2, 3, 14, 128, 40, 3, 3)]
CASES = ([("direct", shape) for shape in SHAPES]
         + [("winograd", shape) for shape in WINOGRAD_SHAPES])


@pytest.mark.parametrize("algorithm,shape", CASES, ids=str)
def test_values_and_gradients_equal_xlas(require_onednn, algorithm, shape):
  x, w, dy = _arrays(shape)
  assert _rel(_taps_conv(x, w), _xla_conv(x, w)) < 1e-5   # the reference itself
  results = []
  for conv in (_xla_conv, jax.jit(lambda x, w: onednn.conv2d_same(x, w, algorithm))):
    y, vjp = jax.vjp(conv, x, w)
    results.append((y, *vjp(dy)))
  for name, a, b in zip(("value", "input gradient", "kernel gradient"), *results):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert _rel(a, b) < 1e-5, name


def test_winograd_gradients_are_the_taps_sums(require_onednn):
  """First principles, float64: dx and dw of <dy, x * w> as sums over the taps."""
  x, w, dy = _arrays((3, 5, 6, 4, 3, 3, 3))
  _, vjp = jax.vjp(lambda x, w: onednn.conv2d_same(x, w, "winograd"), x, w)
  dx, dw = vjp(dy)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  g = np.asarray(dy, np.float64)
  wf = np.asarray(w, np.float64)
  want_dw = np.zeros(w.shape)
  want_dxp = np.zeros(xp.shape)
  for i in range(3):
    for j in range(3):
      want_dw[i, j] = np.einsum("nhwc,nhwf->cf", xp[:, i:i + 5, j:j + 6], g)
      want_dxp[:, i:i + 5, j:j + 6] += g @ wf[i, j].T
  assert _rel(want_dw, dw) < 1e-5
  assert _rel(want_dxp[:, 1:-1, 1:-1], dx) < 1e-5


def test_winograd_kernel_is_g_g_gt():
  """U_(4i + j) = (G g G^T)_ij per channel pair, with Lavin & Gray's G for F(2x2, 3x3)."""
  _, w, _ = _arrays((1, 1, 1, 3, 2, 3, 3))
  g = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]])
  want = np.einsum("ik,klcf,jl->ijcf", g, np.asarray(w, np.float64), g).reshape(16, 3, 2)
  assert _rel(want, onednn.winograd_kernel(w)) < 1e-6


def test_many_calls_in_one_program(require_onednn):
  """Independent calls run concurrently on XLA's pool; each result must be its own."""
  x, w, _ = _arrays((6, 8, 8, 16, 32, 3, 3))
  scales = jnp.arange(1.0, 9.0)

  def many(conv):
    return jnp.stack([conv(x * s, w) for s in scales])

  for algorithm in onednn.ALGORITHMS:
    assert _rel(many(_xla_conv), jax.jit(lambda: many(
        lambda x, w: onednn.conv2d_same(x, w, algorithm)))()) < 1e-5, algorithm


def test_winograd_without_the_instruction_set_clones(require_onednn, tmp_path):
  """The Winograd transforms' plain x86-64 form (what CPUs without AVX2 run) is right too.

  The handlers' transforms are compiled for AVX-512, AVX2 and plain x86-64, and the
  loader picks one; here the library is built with the plain form alone
  (-DGECO_WINOGRAD_CLONES=) and checked against XLA, in a fresh process.
  """
  script = """
import jax, jax.numpy as jnp, numpy as np
from geco_jax.ops import onednn
root = onednn.check_installed()
lib = root / "lib"
path = onednn.build_ffi_library(onednn._SOURCE, "onednn_conv_plain", [
    "-O3", "-fopenmp", f"-I{root / 'include'}", f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}",
    "-DGECO_WINOGRAD_CLONES="])
onednn._build = lambda root: path
keys = jax.random.split(jax.random.PRNGKey(0), 3)
for n, h, w, c, f in [(5, 7, 9, 3, 4), (3, 14, 14, 80, 128), (2, 6, 5, 32, 16)]:
  x = jax.random.normal(keys[0], (n, h, w, c))
  k = jax.random.normal(keys[1], (3, 3, c, f))
  dy = jax.random.normal(keys[2], (n, h, w, f))
  def loss(conv):
    return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(conv(x, k) * dy), (0, 1)))
  xla = loss(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, k)
  plain = loss(lambda x, k: onednn.conv2d_same(x, k, "winograd"))(x, k)
  for a, b in zip(jax.tree.leaves(xla), jax.tree.leaves(plain)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a)), (n, h, w, c, f)
print("plain ok", path.name)
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", GECO_JAX_CACHE=str(tmp_path))
  done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "plain ok onednn_conv_plain-" in done.stdout


def test_vmap(require_onednn):
  x, w, _ = _arrays((4, 6, 6, 3, 5, 3, 3))
  xs = jnp.stack([x, 2 * x])
  assert _rel(jax.vmap(_xla_conv, (0, None))(xs, w),
              jax.vmap(onednn.conv2d_same, (0, None))(xs, w)) < 1e-5


def test_bad_inputs_are_rejected(require_onednn):
  x, w, _ = _arrays((2, 4, 4, 3, 5, 3, 3))
  with pytest.raises(ValueError, match="float32"):
    onednn.conv2d_same(x.astype(jnp.float16), w.astype(jnp.float16))
  with pytest.raises(ValueError, match=r"x \[n, h, w, c\]"):
    onednn.conv2d_same(x, w[:, :, :2])
  with pytest.raises(ValueError, match="algorithm must be one of"):
    onednn.conv2d_same(x, w, "fft")
  with pytest.raises(ValueError, match="3x3 kernels; got 2x3"):
    onednn.conv2d_same(x, w[:2], "winograd")


# conv2d: any strides and padding ------------------------------------------------

def _xla_window_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# (batch, height, width, in, out, kh, kw), strides, padding: the conv VAE's
# encoder convolutions (4x4, stride 2, pad 1; one input channel) and its
# decoder's stride-1 2x2 windows with their padding; windows that do not fit
# evenly (rows of x no output reads), asymmetric padding and strides, SAME at
# stride 2, VALID, and odd batches that split unevenly over the pool.
WINDOW_CASES = [
    ((5, 28, 28, 1, 16, 4, 4), (2, 2), ((1, 1), (1, 1))),
    ((7, 14, 14, 16, 32, 4, 4), (2, 2), ((1, 1), (1, 1))),
    ((3, 7, 7, 32, 64, 2, 2), (1, 1), ((1, 1), (1, 1))),
    ((3, 14, 14, 16, 4, 2, 2), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 7, 3, 5, 3, 2), (2, 3), ((0, 2), (1, 0))),
    ((3, 9, 8, 4, 6, 3, 3), (2, 2), "SAME"),
    ((1, 6, 5, 2, 3, 3, 2), (1, 2), "VALID"),
]


@pytest.mark.parametrize("shape,strides,padding", WINDOW_CASES, ids=str)
def test_conv2d_values_and_gradients_equal_xlas(require_onednn, shape, strides, padding):
  x, w, _ = _arrays(shape)
  results = []
  for conv in (_xla_window_conv,
               jax.jit(onednn.conv2d, static_argnums=(2, 3))):
    y, vjp = jax.vjp(lambda x, w: conv(x, w, strides, padding), x, w)
    dy = jax.random.normal(jax.random.PRNGKey(7), y.shape)
    results.append((y, *vjp(dy)))
  for name, a, b in zip(("value", "input gradient", "kernel gradient"), *results):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    assert _rel(a, b) < 1e-5, name


def test_conv2d_is_the_taps_sum_with_strides_and_padding(require_onednn):
  """First principles, float64: y, dx and dw of a strided, padded window as sums over taps."""
  (sh, sw), ((top, bottom), (left, right)) = (2, 3), ((0, 2), (1, 0))
  x, w, _ = _arrays((2, 9, 7, 3, 5, 3, 2))
  y, vjp = jax.vjp(lambda x, w: onednn.conv2d(x, w, (sh, sw), ((top, bottom), (left, right))),
                   x, w)
  oh, ow = (9 + top + bottom - 3) // sh + 1, (7 + left + right - 2) // sw + 1
  assert y.shape == (2, oh, ow, 5)
  dy = jax.random.normal(jax.random.PRNGKey(3), y.shape)
  dx, dw = vjp(dy)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
  wf, g = np.asarray(w, np.float64), np.asarray(dy, np.float64)
  want_y = np.zeros(y.shape)
  want_dxp, want_dw = np.zeros(xp.shape), np.zeros(w.shape)
  for i in range(3):
    for j in range(2):
      rows, cols = slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw)
      want_y += xp[:, rows, cols] @ wf[i, j]
      want_dw[i, j] = np.einsum("nhwc,nhwf->cf", xp[:, rows, cols], g)
      want_dxp[:, rows, cols] += g @ wf[i, j].T
  assert _rel(want_y, y) < 1e-5
  assert _rel(want_dw, dw) < 1e-5
  assert _rel(want_dxp[:, top:top + 9, left:left + 7], dx) < 1e-5


def test_conv2d_bad_windows_are_rejected(require_onednn):
  x, w, _ = _arrays((2, 4, 4, 3, 5, 3, 3))
  with pytest.raises(ValueError, match="strides must be two positive ints"):
    onednn.conv2d(x, w, (0, 1))
  with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID' or"):
    onednn.conv2d(x, w, (1, 1), "FULL")
  with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID' or"):
    onednn.conv2d(x, w, (1, 1), ((1, 1),))
  with pytest.raises(ValueError, match="padding must be non-negative"):
    onednn.conv2d(x, w, (1, 1), ((-1, 0), (0, 0)))
  with pytest.raises(ValueError, match="does not fit in the 4 x 4 image"):
    onednn.conv2d(x, jnp.zeros((5, 5, 3, 2)), (1, 1), "VALID")
  with pytest.raises(ValueError, match="conv2d takes float32"):
    onednn.conv2d(x.astype(jnp.float16), w.astype(jnp.float16))


def test_handlers_refuse_shapes_that_do_not_match_the_window(require_onednn):
  """A result or operand of the wrong shape is an error, not a read or write out of bounds."""
  x, w, _ = _arrays((2, 8, 8, 3, 5, 3, 3))
  attributes = onednn._window_attributes(((2, 2), ((1, 1), (1, 1))))
  for shape in [(2, 8, 8, 5), (2, 4, 4, 6), (3, 4, 4, 5)]:   # stride 1's; channels; batch
    with pytest.raises(Exception, match="does not match"):
      jax.block_until_ready(onednn._ffi("window", "forward", shape, x, w, **attributes))
  assert onednn._ffi("window", "forward", (2, 4, 4, 5), x, w, **attributes).shape == (2, 4, 4, 5)


def test_missing_onednn_says_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setenv("GECO_ONEDNN_ROOT", str(tmp_path))
  with pytest.raises(onednn.OneDNNUnavailable, match=r"not found under .*\[onednn\]"):
    onednn.check_installed()
  with pytest.raises(onednn.OneDNNUnavailable, match=str(tmp_path)):
    onednn.onednn_root()


def test_missing_compiler_is_named(monkeypatch, require_onednn):
  monkeypatch.setenv("CXX", "no-such-compiler-geco")
  with pytest.raises(onednn.OneDNNUnavailable, match="no-such-compiler-geco"):
    onednn.check_installed()


def test_the_build_is_cached(require_onednn):
  root = onednn.check_installed()
  first = onednn._build(root)
  mtime = first.stat().st_mtime_ns
  assert onednn._build(root) == first and first.stat().st_mtime_ns == mtime


# ConvDraw --------------------------------------------------------------------


def _assert_same_loss_and_gradients(model, fast, params, x, rng):
  """``fast`` (oneDNN's convolutions) gives ``model``'s loss and gradients to float rounding.

  Returns the lowered text of ``fast``'s jitted loss and gradient, to check who computes what.
  Some gradients are exactly zero at initialisation (VAE+NVP's), hence the floor.
  """
  def loss(m):
    def f(p):
      out = m.apply(p, x, rng)
      return jnp.mean(jnp.square(out.reconstruction - x)) + jnp.mean(out.kl)
    return jax.jit(jax.value_and_grad(f))

  (value, grads), (fast_value, fast_grads) = loss(model)(params), loss(fast)(params)
  assert abs(float(value) - float(fast_value)) <= 1e-5 * abs(float(value))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(fast_grads)):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * max(float(jnp.max(jnp.abs(a))), 1e-6)
  return loss(fast).lower(params).as_text()


@pytest.mark.parametrize("recurrence,convolutions", [
    ("unrolled", "onednn"), ("unrolled", "onednn_winograd"),
    pytest.param("scan", "onednn", marks=pytest.mark.slow)])
def test_convdraw_with_onednn_equals_xla(require_onednn, recurrence, convolutions):
  x = jax.random.uniform(jax.random.PRNGKey(0), (5, 28, 28, 1))
  rng = jax.random.PRNGKey(1)
  # T = 3 keeps the compiles short; every step's kind (t = 1 with its zero
  # states, later steps) is there.
  model = ConvDraw(**dict(convdraw_preset("mnist_cpu"), num_steps=3), recurrence=recurrence)
  params = model.init(jax.random.PRNGKey(2), x, rng)
  fast = model.clone(convolutions=convolutions)
  assert jax.tree.structure(fast.init(jax.random.PRNGKey(2), x, rng)) == jax.tree.structure(params)
  program = _assert_same_loss_and_gradients(model, fast, params, x, rng)
  # Who computes what: with 'onednn_winograd' the gates (3x3, 128 features) are
  # Winograd's and the prior and posterior (16 features) oneDNN's direct ones.
  assert ("GecoWinogradConvForward" in program) == (convolutions == "onednn_winograd")
  assert "GecoOnednnConvForward" in program


def test_convdraw_rejects_unknown_convolutions():
  x = jnp.zeros((2, 28, 28, 1))
  with pytest.raises(ValueError, match="convolutions must be one of"):
    ConvDraw(**convdraw_preset("mnist_cpu"), convolutions="cudnn").init(
        jax.random.PRNGKey(0), x, jax.random.PRNGKey(1))


def test_config_convolutions_are_validated(monkeypatch, tmp_path):
  config = convdraw_mnist.get_config()
  assert config.model.convolutions == "auto"
  setup.validate_config(config)
  config.model.convolutions = "cudnn"
  with pytest.raises(setup.ConfigError, match=r"convolutions must be one of \('auto', 'xla'"):
    setup.validate_config(config)
  config.model.convolutions = "onednn"
  monkeypatch.setenv("GECO_ONEDNN_ROOT", str(tmp_path))
  with pytest.raises(setup.ConfigError, match=r"convolutions='onednn': oneDNN .* not found"):
    setup.validate_config(config)


# Each model's choice: ConvDraw's Winograd gates, the conv VAE's (and VAE+NVP's) direct ones.
CHOOSERS = [(convdraw_lib, "onednn_winograd"), (conv_vae_lib, "onednn")]


@pytest.mark.parametrize("lib,fast", CHOOSERS, ids=["convdraw", "conv_vae"])
def test_choose_convolutions_picks_onednn_on_one_cpu_device(require_onednn, lib, fast):
  choice, why = lib.choose_convolutions(1)
  assert choice == fast and choice in lib.CONVOLUTIONS
  assert require_onednn in why   # oneDNN's version


@pytest.mark.parametrize("lib,fast", CHOOSERS, ids=["convdraw", "conv_vae"])
def test_choose_convolutions_falls_back_to_xla(monkeypatch, lib, fast):
  del fast
  choice, why = lib.choose_convolutions()   # tests/conftest.py: 8 host devices
  assert choice == "xla" and "on 8 devices" in why
  assert lib.choose_convolutions(2)[0] == "xla"
  monkeypatch.setattr(onednn, "available", lambda: (False, "no oneDNN in this test"))
  assert lib.choose_convolutions(1) == (
      "xla", "oneDNN's convolutions are unavailable here: no oneDNN in this test")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  choice, why = lib.choose_convolutions(1)
  assert choice == "xla" and "'gpu'" in why


def test_choose_convolutions_without_onednn_installed(tmp_path):
  """No oneDNN under GECO_ONEDNN_ROOT: XLA's convolutions, and the reason names it."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", GECO_ONEDNN_ROOT=str(tmp_path / "none"))
  result = subprocess.run(
      [sys.executable, "-c", "from geco_jax.models import convdraw; "
       "print(*convdraw.choose_convolutions(1), sep='|')"],
      env=env, capture_output=True, text=True, timeout=120, check=True)
  choice, why = result.stdout.strip().splitlines()[-1].split("|")
  assert choice == "xla" and "not found" in why and str(tmp_path / "none") in why


def test_make_model_resolves_auto_on_its_devices(require_onednn, caplog):
  config = convdraw_mnist.get_config()
  caplog.set_level(logging.INFO)
  assert setup.make_model(config, (28, 28, 1), num_devices=1).convolutions == "onednn_winograd"
  assert "config.model.convolutions='auto': 'onednn_winograd'" in caplog.text
  assert setup.make_model(config, (28, 28, 1)).convolutions == "xla"   # 8 host devices
  config.model.convolutions = "onednn"
  assert setup.make_model(config, (28, 28, 1), num_devices=1).convolutions == "onednn"
  # 'auto' is not refused on several devices (as 'onednn' is): it picks 'xla' there.
  config.model.convolutions = "auto"
  images = np.zeros((64, 28, 28, 1), np.float32)
  setup.check_data(config, {"train": {"image": images}, "test": {"image": images}})


def test_main_without_onednn_is_one_line_and_exit_status_2(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", GECO_ONEDNN_ROOT=str(tmp_path / "none"))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config", "configs/convdraw_mnist.py",
       "--config.model.convolutions=onednn", "--workdir", str(tmp_path / "run")],
      cwd=pathlib.Path(__file__).parents[1], env=env, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "convolutions='onednn'" in lines[0] and "[onednn]" in lines[0]
  assert not (tmp_path / "run").exists()


def test_several_devices_are_refused(require_onednn):
  config = convdraw_mnist.get_config()
  config.model.convolutions = "onednn"
  images = np.zeros((64, 28, 28, 1), np.float32)
  assert jax.device_count() > 1   # tests/conftest.py: 8 host devices
  with pytest.raises(setup.ConfigError, match="runs on one CPU device"):
    setup.check_data(config, {"train": {"image": images}, "test": {"image": images}})


def test_a_run_may_resume_with_the_other_convolutions(tmp_path):
  """XLA's and oneDNN's convolutions share the parameters: a run may switch on resume."""
  config = convdraw_mnist.get_config()
  (tmp_path / "checkpoints" / "100").mkdir(parents=True)
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  config.model.convolutions = "onednn"
  setup.check_workdir_matches(config, tmp_path)          # no error
  config.model.hidden_channels = 64
  with pytest.raises(setup.ConfigError, match="another run"):
    setup.check_workdir_matches(config, tmp_path)


def test_the_source_ships_with_the_package():
  source = pathlib.Path(onednn.__file__).with_name("onednn_conv.cc")
  assert source.is_file() and "XLA_FFI_DEFINE_HANDLER_SYMBOL" in source.read_text()


def test_sharded_over_devices(require_onednn):
  """Sharded inputs give the right values (XLA gathers the batch: not partitioned)."""
  devices = np.array(jax.devices()[:4])
  if devices.size < 2:
    pytest.skip("needs several (host) devices")
  mesh = jax.sharding.Mesh(devices, ("data",))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x, w, _ = _arrays((4 * devices.size, 6, 6, 8, 16, 3, 3))
  x = jax.device_put(x, batch)

  def loss(conv):
    return jax.jit(jax.value_and_grad(lambda w, x: jnp.sum(jnp.sin(conv(x, w)))))

  (value, grad), (fast_value, fast_grad) = loss(_xla_conv)(w, x), loss(onednn.conv2d_same)(w, x)
  assert abs(float(value) - float(fast_value)) <= 1e-4 * abs(float(value)) + 1e-4
  assert _rel(grad, fast_grad) < 1e-5


def test_build_ffi_library_caches_a_build_and_names_a_failed_one(tmp_path, monkeypatch):
  if shutil.which(os.environ.get("CXX", "g++")) is None:
    pytest.skip("no C++ compiler")
  monkeypatch.setenv("GECO_JAX_CACHE", str(tmp_path / "cache"))
  source = pathlib.Path(__file__).parents[1] / "benchmarks" / "skip_conv.cc"
  built = onednn.build_ffi_library(source, "skip_conv", [])
  assert built.parent == tmp_path / "cache" and built.name.startswith("skip_conv-")
  assert onednn.build_ffi_library(source, "skip_conv", []) == built   # cached
  # Other arguments are another build.
  assert onednn.build_ffi_library(source, "skip_conv", ["-DGECO_TEST=1"]) != built
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  with pytest.raises(onednn.OneDNNUnavailable, match="building broken.cc failed"):
    onednn.build_ffi_library(broken, "broken", [])
  assert not list((tmp_path / "cache").glob("broken-*"))   # nothing half-built is kept


# The conv VAE and VAE+NVP -----------------------------------------------------


@pytest.mark.parametrize("cls", [ConvVAE, VAENVP], ids=lambda c: c.__name__)
def test_conv_vae_with_onednn_equals_xla(require_onednn, cls):
  """Same parameters, same value and gradients (float rounding), and no XLA convolution left."""
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 28, 28, 1))
  rng = jax.random.PRNGKey(1)
  extra = dict(coupling_hidden_size=16, num_couplings=2) if cls is VAENVP else {}
  model = cls(channels=(8, 16), hidden_size=32, **extra)
  fast = model.clone(convolutions="onednn")
  params = model.init(jax.random.PRNGKey(2), x, rng)
  fast_params = fast.init(jax.random.PRNGKey(2), x, rng)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, fast_params))
  # (The relus pass a gradient or not by the sign of a pre-activation: a value
  # within rounding of zero could flip one; in these inputs none does.)
  program = _assert_same_loss_and_gradients(model, fast, params, x, rng)
  assert program.count("GecoOnednnWindowConvForward") == 4
  assert program.count("GecoOnednnWindowConvBackwardWeights") == 4
  # The encoder's first convolution's input is the data: no data gradient.
  assert program.count("GecoOnednnWindowConvBackwardData") == 3
  assert "convolution" not in program.replace("Conv", "")


def test_conv_vae_rejects_unknown_convolutions():
  with pytest.raises(ValueError, match=r"ConvVAE: convolutions must be one of \('xla', 'onednn'\)"):
    ConvVAE(convolutions="onednn_winograd").init(
        jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match="SubpixelConvTranspose: convolutions must be one of"):
    conv_vae_lib.SubpixelConvTranspose(4, 4, 2, "cudnn").init(
        jax.random.PRNGKey(0), jnp.zeros((1, 7, 7, 2)))


def test_default_config_resolves_auto_per_model(require_onednn, caplog):
  config = default_config.get_config()
  assert config.model.convolutions == "auto"
  caplog.set_level(logging.INFO)
  assert setup.make_model(config, (28, 28, 1), num_devices=1).convolutions == "onednn"
  assert "config.model.convolutions='auto': 'onednn'" in caplog.text
  assert setup.make_model(config, (28, 28, 1)).convolutions == "xla"   # 8 host devices
  config.model.name = "vae_nvp"
  config.model.preset = "cpu"
  config.model.channels = (8, 16)
  config.model.hidden_size = 32
  assert setup.make_model(config, (28, 28, 1), num_devices=1).convolutions == "onednn"


def test_conv_vae_config_convolutions_are_validated():
  config = default_config.get_config()
  config.model.convolutions = "onednn_winograd"   # ConvDraw's only
  with pytest.raises(setup.ConfigError, match=(
      r"convolutions must be one of \('auto', 'xla', 'onednn'\) for conv_vae; "
      r"got 'onednn_winograd'")):
    setup.validate_config(config)
