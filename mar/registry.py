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


GENERATORS = {"mar": MAR, "maskgit": MaskGIT, "causal": CausalAR, "var": None}  # var: create_next_scale
HEAD_SPECS = ("diffloss", "categorical", "hybrid")
# The ModelConfig keys a next-scale model does not read (MAR's masking, buffer and dropouts; VAR has none).
_MAR_ONLY = ("buffer_size", "mask_ratio_min", "mask_ratio_schedule", "attn_dropout", "proj_dropout", "order",
             "kv_cache", "patch_size", "img_size", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def create_next_scale(name: str, head: str = "categorical", *, token_channels: int, token_dim: int | None = None,
                      patch_nums=None, vae_stride: int | None = None, label_drop_prob: float = 0.1,
                      diffloss_depth: int | None = None, diffloss_width: int | None = None,
                      num_sampling_steps=None, diffusion_batch_mul: int = 4, grad_checkpointing: bool = False,
                      encoder_embed_dim: int | None = None, encoder_depth: int | None = None,
                      encoder_num_heads: int | None = None, **kwargs):
    """A next-scale generator from a VAR preset (``mar.next_scale.VAR_PRESETS``, var_d*): ``head`` categorical
    (VAR: ``token_channels`` = the codebook size V, ``token_dim`` = its vectors' channels), hybrid (HART, the same
    plus the residual Diffusion Loss head, 8 sampling steps unless ``num_sampling_steps``) or diffloss
    (continuous next-scale: ``token_channels`` = the latent channels, ``patch_nums`` required).
    ``encoder_embed_dim`` / ``encoder_depth`` / ``encoder_num_heads`` override the preset's width, depth, heads;
    ``label_drop_prob`` is VAR's class dropout. MAR-only keys (buffer, mask ratio, dropouts) are ignored."""
    from mar.hart import HART_RESIDUAL_STEPS, HART
    from mar.next_scale import VAR, VAR_PRESETS, create_var
    from mar.next_scale_diffusion import NextScaleDiffusion

    if name not in VAR_PRESETS:
        create_var(name)  # the one message listing the valid presets
    for key in _MAR_ONLY:
        kwargs.pop(key, None)
    args = dict(VAR_PRESETS[name])
    args.update({k: v for k, v in (("embed_dim", encoder_embed_dim), ("depth", encoder_depth),
                                   ("num_heads", encoder_num_heads)) if v is not None})
    if encoder_depth is not None:
        args["drop_path_rate"] = 0.1 * encoder_depth / 24
    args.update(kwargs, cond_drop_rate=label_drop_prob)
    if patch_nums is not None:
        args["patch_nums"] = tuple(patch_nums)
    head_sizes = dict(diffloss_depth=diffloss_depth or 3, diffloss_width=diffloss_width or 256,
                      diffusion_batch_mul=diffusion_batch_mul, grad_checkpointing=grad_checkpointing)
    if head == "categorical":
        model = VAR(vocab_size=token_channels, token_dim=token_dim or 32, **args)
    elif head == "hybrid":
        model = HART(vocab_size=token_channels, token_dim=token_dim or 32, **head_sizes,
                     num_sampling_steps=num_sampling_steps or HART_RESIDUAL_STEPS, **args)
    elif head == "diffloss":
        if patch_nums is None:
            raise ValueError("continuous next-scale needs patch_nums (the scales of the latent pyramid)")
        model = NextScaleDiffusion(token_dim=token_channels, **head_sizes, num_sampling_steps=num_sampling_steps or "100",
                                   **args)
    else:
        raise ValueError(f"unknown head {head!r} for a next-scale model: use categorical (VAR), hybrid (HART) or "
                         "diffloss (continuous)")
    if vae_stride is not None:
        model.vae_stride = vae_stride
    return model


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
    if arch == "var":
        return create_next_scale(name, head, **kwargs)
    if head == "hybrid":
        raise ValueError("head 'hybrid' (HART) is for arch 'var'")
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
