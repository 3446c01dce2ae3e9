"""A toolkit for autoregressive image generation around MAR (masked autoregressive generation over continuous
tokens with Diffusion Loss): tokenizer, generator and head as parts, generation loops, training and evaluation."""
from mar.config.schema import SamplingOptions
from mar.model import MAR
from mar.registry import PRESETS, create_model, load_pretrained
from mar.run import load_run

__all__ = ["MAR", "PRESETS", "SamplingOptions", "create_model", "load_pretrained", "load_run"]
