"""Image tokenizers behind one interface (``base.Tokenizer``): the KL-VAE (LDM architecture on diffusers'
AutoencoderKL), its checkpoint conversion and its training objective.

Note: this top-level package shadows Hugging Face's ``tokenizers``; nothing here uses that one.
"""

from .base import Tokenizer, open_tokenizer
from .convert import convert_ldm_vae_state_dict, ldm_key_for, read_state_dict_file
from .kl_vae import (
    KL_VAE_PRESETS,
    KLTokenizer,
    KLVAEConfig,
    build_autoencoder,
    compute_scaling_factor,
    kl_vae_preset,
)
from .training import (
    KLVAEObjective,
    PatchDiscriminator,
    VAETrainConfig,
    adversarial_factor,
    estimate_scaling_factor,
    hinge_d_loss,
)

__all__ = [
    "KL_VAE_PRESETS",
    "KLTokenizer",
    "KLVAEConfig",
    "KLVAEObjective",
    "PatchDiscriminator",
    "Tokenizer",
    "VAETrainConfig",
    "adversarial_factor",
    "build_autoencoder",
    "compute_scaling_factor",
    "convert_ldm_vae_state_dict",
    "estimate_scaling_factor",
    "hinge_d_loss",
    "kl_vae_preset",
    "ldm_key_for",
    "open_tokenizer",
    "read_state_dict_file",
]
