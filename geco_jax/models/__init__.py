"""VAE models. Every model returns a ``VAEOutput`` so trainers treat them alike."""

from geco_jax.models.classifier import CIFAR10Classifier
from geco_jax.models.classifier import MNISTClassifier
from geco_jax.models.classifier import load_classifier
from geco_jax.models.classifier import load_feature_fn
from geco_jax.models.classifier import load_probability_fn
from geco_jax.models.classifier import make_feature_fn
from geco_jax.models.classifier import make_probability_fn
from geco_jax.models.classifier import save_classifier
from geco_jax.models.common import VAEOutput
from geco_jax.models.common import gaussian_kl
from geco_jax.models.conv_vae import ConvVAE
from geco_jax.models.convdraw import PRESETS as CONVDRAW_PRESETS
from geco_jax.models.convdraw import ConditionalConvDraw
from geco_jax.models.convdraw import ConvDraw
from geco_jax.models.convdraw import ConvDrawTrace
from geco_jax.models.convdraw import convdraw_preset
from geco_jax.models.vae_nvp import VAENVP

__all__ = [
    "CIFAR10Classifier",
    "CONVDRAW_PRESETS",
    "ConditionalConvDraw",
    "ConvDraw",
    "ConvDrawTrace",
    "ConvVAE",
    "MNISTClassifier",
    "VAENVP",
    "VAEOutput",
    "convdraw_preset",
    "gaussian_kl",
    "load_classifier",
    "load_feature_fn",
    "load_probability_fn",
    "make_feature_fn",
    "make_probability_fn",
    "save_classifier",
]
