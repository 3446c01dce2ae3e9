"""Image tokenizers behind one interface (``base.Tokenizer``): the KL-VAE (LDM architecture on diffusers'
AutoencoderKL), its checkpoint conversion and its training objective; and the VQ tokenizer (VQGAN-style, on
diffusers' VQModel) with its objective and continuous view; and VAR's multi-scale residual VQVAE
(``multiscale``: config, presets, tokenizer; ``multiscale_blocks``: encoder / decoder; ``multiscale_quant``: the
quantizer) with its objective (``multiscale_training``, HART's hybrid training included).

Note: this top-level package shadows Hugging Face's ``tokenizers``; nothing here uses that one.
"""

from .base import Tokenizer, open_tokenizer, tokenizer_kind
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
from .multiscale import (
    MULTISCALE_PRESETS,
    MultiScaleQuantizer,
    MultiScaleVQConfig,
    MultiScaleVQVAE,
    multiscale_preset,
    pyramid_teacher_inputs,
    pyramid_to_fhat,
    residual_pyramid,
)
from .multiscale_training import MultiScaleVQObjective
from .vq import (
    VQ_PRESETS,
    VQConfig,
    VQContinuousTokens,
    VQObjective,
    VQTokenizer,
    VQTrainConfig,
    build_vq_model,
    codebook_statistics,
    vq_preset,
)

__all__ = [
    "KL_VAE_PRESETS",
    "KLTokenizer",
    "KLVAEConfig",
    "KLVAEObjective",
    "MULTISCALE_PRESETS",
    "MultiScaleQuantizer",
    "MultiScaleVQConfig",
    "MultiScaleVQObjective",
    "MultiScaleVQVAE",
    "PatchDiscriminator",
    "Tokenizer",
    "VAETrainConfig",
    "VQConfig",
    "VQContinuousTokens",
    "VQObjective",
    "VQTokenizer",
    "VQTrainConfig",
    "VQ_PRESETS",
    "adversarial_factor",
    "build_autoencoder",
    "build_vq_model",
    "codebook_statistics",
    "compute_scaling_factor",
    "convert_ldm_vae_state_dict",
    "estimate_scaling_factor",
    "hinge_d_loss",
    "kl_vae_preset",
    "ldm_key_for",
    "multiscale_preset",
    "open_tokenizer",
    "pyramid_teacher_inputs",
    "pyramid_to_fhat",
    "read_state_dict_file",
    "residual_pyramid",
    "tokenizer_kind",
    "vq_preset",
]
