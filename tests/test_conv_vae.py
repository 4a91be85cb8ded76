"""The conv VAE's building blocks (the model itself is trained in test_train.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geco_jax.models.conv_vae import SubpixelConvTranspose


@pytest.mark.parametrize("kernel_size,stride",
                         [(4, 2), (3, 2), (5, 2), (2, 2), (3, 1), (5, 3), (4, 3), (1, 2)])
def test_subpixel_conv_transpose_is_flax_conv_transpose(kernel_size, stride):
  """Same parameters (names, shapes, initial values), values and gradients."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 6, 3))
  reference = nn.ConvTranspose(4, (kernel_size, kernel_size), strides=(stride, stride))
  subpixel = SubpixelConvTranspose(4, kernel_size, stride)
  params = reference.init(jax.random.PRNGKey(1), x)
  same = jax.tree_util.tree_map(np.array_equal, params, subpixel.init(jax.random.PRNGKey(1), x))
  assert all(jax.tree_util.tree_leaves(same))
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)   # a non-zero bias too
  np.testing.assert_allclose(subpixel.apply(params, x), reference.apply(params, x),
                             atol=1e-5)
  loss = lambda module: lambda p: jnp.sum(jnp.sin(module.apply(p, x)))  # noqa: E731
  for got, expected in zip(jax.tree_util.tree_leaves(jax.grad(loss(subpixel))(params)),
                           jax.tree_util.tree_leaves(jax.grad(loss(reference))(params))):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
