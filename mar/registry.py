"""Generator presets by name, and loading published or project checkpoints into them.

A preset pins only sizes (width, depths, heads, the head's MLP); everything else (image size, tokenizer
stride, number of classes, dropout...) comes from the caller's config. ``create_model`` composes the parts:
the generator (``mar.model.MAR``) with its head spec (``mar.heads.DiffusionHeadSpec`` from the
``diffloss_*``, ``num_sampling_steps`` and ``diffusion_batch_mul`` keywords).
"""
from __future__ import annotations

from pathlib import Path

import torch

from mar.categorical import CategoricalHeadSpec
from mar.causal import CausalAR
from mar.heads import DiffusionHeadSpec
from mar.model import MAR, MaskGIT

# name: (width D, encoder depth, decoder depth, heads, DiffLoss depth, DiffLoss width)
PRESETS: dict[str, dict[str, int]] = {}


def register(name: str, width: int, depth: int, heads: int, diffloss_depth: int, diffloss_width: int) -> None:
    PRESETS[name] = dict(
        encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
        decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads,
        diffloss_depth=diffloss_depth, diffloss_width=diffloss_width,
    )


# The published models (SPEC 2): 207,924,768 / 478,326,304 / 942,403,104 parameters at 256 px, KL-16.
register("mar_base", 768, 12, 12, 6, 1024)
register("mar_large", 1024, 16, 16, 8, 1280)
register("mar_huge", 1280, 20, 16, 12, 1536)
# Small models for tests and small data (Fashion-MNIST default).
register("mar_tiny", 64, 2, 4, 2, 64)
register("mar_mini", 128, 3, 4, 3, 128)  # the ablation cells (configs/ablations)
register("mar_small", 192, 4, 6, 3, 256)
register("mar_medium", 384, 6, 8, 4, 512)


def preset_kwargs(name: str) -> dict[str, int]:
    if name not in PRESETS:
        raise ValueError(f"unknown MAR preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


GENERATORS = {"mar": MAR, "maskgit": MaskGIT, "causal": CausalAR}
HEAD_SPECS = ("diffloss", "categorical")


def create_model(name: str, arch: str = "mar", head: str = "diffloss", **kwargs) -> MAR:
    """Build a preset; keyword arguments override the preset's sizes or set the other generator options.

    ``arch``, the generator: ``mar`` (MAR), ``maskgit`` or ``causal`` (a decoder-only AR of the encoder's width with
    encoder_depth + decoder_depth blocks, the same number of transformer blocks as MAR; ``order``, raster or
    random). ``head``: ``diffloss`` or ``categorical`` (the cross-entropy head; its MLP has the preset's
    diffloss depth and width, and ``token_channels`` is then the codebook size).

    >>> model = create_model("mar_base")                       # ImageNet 256, KL-16, 1000 classes
    >>> model = create_model("mar_tiny", img_size=32, vae_stride=4, token_channels=4, num_classes=10)
    >>> model = create_model("mar_tiny", "causal", "categorical", img_size=32, vae_stride=4, token_channels=512,
    ...                      num_classes=10, order="random")
    """
    if arch not in GENERATORS:
        raise ValueError(f"unknown generator arch {arch!r}: use one of {', '.join(GENERATORS)}")
    if head not in HEAD_SPECS:
        raise ValueError(f"unknown head {head!r}: use one of {', '.join(HEAD_SPECS)}")
    args = preset_kwargs(name)
    args.update({k: v for k, v in kwargs.items() if v is not None})
    depth, width = args.pop("diffloss_depth"), args.pop("diffloss_width")
    steps, batch_mul = args.pop("num_sampling_steps", "100"), args.pop("diffusion_batch_mul", 4)
    if head == "diffloss":
        spec = DiffusionHeadSpec(depth=depth, width=width, num_sampling_steps=steps, batch_mul=batch_mul,
                                 grad_checkpointing=args.get("grad_checkpointing", False))
    else:
        spec = CategoricalHeadSpec(depth=depth, width=width)
    order, kv_cache = args.pop("order", None), args.pop("kv_cache", None)
    if kv_cache and arch != "causal":
        raise ValueError(f"kv_cache needs causal attention; arch {arch!r} is bidirectional")
    if arch != "causal":
        if order not in (None, "random"):
            raise ValueError(f"arch {arch!r} trains on random orders; order {order!r} is for causal")
        return GENERATORS[arch](head=spec, **args)
    for key in ("mask_ratio_min", "mask_ratio_schedule"):
        args.pop(key, None)
    enc = dict(embed_dim=args.pop("encoder_embed_dim"), num_heads=args.pop("encoder_num_heads"),
               depth=args.pop("encoder_depth") + args.pop("decoder_depth"))
    for key in ("decoder_embed_dim", "decoder_num_heads"):
        args.pop(key)
    return CausalAR(head=spec, order=order or "raster", kv_cache=kv_cache is not False, **enc, **args)


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with one readable message on a mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + ", ".join(
                f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:5]))
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ValueError(
            f"{source} does not fit this model: " + "; ".join(parts)
            + ". Check the preset name, img_size/vae_stride/patch_size, token_channels and num_classes."
        )
    model.load_state_dict(state_dict, strict=True)


def load_pretrained(name: str, path: str | Path, ema: bool = True, **kwargs) -> MAR:
    """Build preset ``name`` and load a published ``checkpoint-last.pth`` (or a project checkpoint).

    ``ema=True`` (default) takes the EMA weights the published numbers use; ``ema=False`` the raw
    ones. Loading never unpickles arbitrary objects (see ``mar.engine.checkpoint``).
    """
    from mar.engine.checkpoint import load_reference_mar_state_dict

    state_dict = load_reference_mar_state_dict(path, ema=ema)
    model = create_model(name, **kwargs)
    load_state_dict_strict(model, state_dict, source=str(path))
    return model.eval()
