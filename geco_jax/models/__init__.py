"""VAE models. Every model returns a ``VAEOutput`` so trainers treat them alike."""

from geco_jax.models.common import VAEOutput
from geco_jax.models.common import gaussian_kl
from geco_jax.models.conv_vae import ConvVAE
from geco_jax.models.vae_nvp import VAENVP

__all__ = ["ConvVAE", "VAENVP", "VAEOutput", "gaussian_kl"]
