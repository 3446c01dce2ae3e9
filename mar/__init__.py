"""MAR: masked autoregressive image generation over continuous tokens with Diffusion Loss."""
from mar.model import MAR
from mar.registry import PRESETS, create_model, load_pretrained

__all__ = ["MAR", "PRESETS", "create_model", "load_pretrained"]
