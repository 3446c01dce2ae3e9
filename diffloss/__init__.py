"""Diffusion Loss: the AdaLN MLP denoiser, the Gaussian diffusion it trains with, and the DiffLoss module."""
from .diffusion import (
    GaussianDiffusion,
    cosine_alpha_bar,
    cosine_betas,
    cosine_diffusion,
    respace_timesteps,
    respaced_betas,
)
from .loss import DiffLoss, guided_model_output
from .mlp import SimpleMLPAdaLN, timestep_embedding

__all__ = [
    "DiffLoss",
    "GaussianDiffusion",
    "SimpleMLPAdaLN",
    "cosine_alpha_bar",
    "cosine_betas",
    "cosine_diffusion",
    "guided_model_output",
    "respace_timesteps",
    "respaced_betas",
    "timestep_embedding",
]
