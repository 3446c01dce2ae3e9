"""LDM-format KL-VAE checkpoints -> diffusers ``AutoencoderKL`` state dicts, with strict checking.

The MAR release's ``kl16.ckpt`` stores the VAE in the layout of the LDM code base
(``encoder.down.{i}.block.{j}``, ``encoder.mid.attn_1.q`` as 1x1 convs, ...). diffusers names the same
tensors differently (``encoder.down_blocks.{i}.resnets.{j}``, ``...attentions.0.to_q`` as Linear).

The key map is generated from the *target* model: every diffusers key is translated to the LDM key it
must come from (``ldm_key_for``), so the map covers any number of levels / res blocks / attention
placements, and "all keys used, none missing, none unexpected, all shapes equal" is checked exactly.
(diffusers' own ``convert_ldm_vae_checkpoint`` leaves attention inside encoder down blocks unmapped.)

Level order: LDM ``encoder.down.{i}`` and diffusers ``encoder.down_blocks.{i}`` both count from the
full-resolution level (i = 0); LDM ``decoder.up.{i}`` also counts from full resolution, but diffusers
``decoder.up_blocks.{k}`` counts from the lowest resolution, so k = num_levels - 1 - i.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# diffusers attention sub-module -> LDM AttnBlock sub-module (q/k/v/proj_out are 1x1 convs in LDM).
_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_MAX_LISTED = 8  # keys listed per category in error messages


def _attn_param(rest: str) -> str:
    """'to_out.0.weight' -> 'proj_out.weight' (diffusers Attention param -> LDM AttnBlock param)."""
    module, _, param = rest.rpartition(".")
    if module not in _ATTN_NAMES:
        raise KeyError(rest)
    return f"{_ATTN_NAMES[module]}.{param}"


def _resnet_param(rest: str) -> str:
    """diffusers ResnetBlock2D param -> LDM ResnetBlock param (only the 1x1 shortcut is renamed)."""
    return rest.replace("conv_shortcut", "nin_shortcut")


def ldm_key_for(diffusers_key: str, num_levels: int) -> str:
    """The LDM key a diffusers ``AutoencoderKL`` key is loaded from (``num_levels`` = len(block_out_channels))."""
    k = diffusers_key
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet_param(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", k):
        return f"encoder.down.{m[1]}.attn.{m[2]}.{_attn_param(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{_resnet_param(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", k):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.attn.{m[2]}.{_attn_param(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", k):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet_param(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", k):
        return f"{m[1]}.mid.attn_1.{_attn_param(m[2])}"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", k):
        return f"{m[1]}.norm_out.{m[2]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", k):
        return k
    raise KeyError(f"no LDM name known for the diffusers key {k!r}")


def ldm_key_map(target: nn.Module) -> dict[str, str]:
    """{LDM key: diffusers key} for every tensor of the diffusers ``AutoencoderKL`` ``target``."""
    num_levels = len(target.encoder.down_blocks)
    return {ldm_key_for(k, num_levels): k for k in target.state_dict()}


def _listing(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


def convert_ldm_vae_state_dict(
    ldm_state_dict: Mapping[str, torch.Tensor], target: nn.Module
) -> dict[str, torch.Tensor]:
    """Strictly convert an LDM-format VAE state dict to the keys/shapes of the diffusers model ``target``.

    ``target`` only supplies names and shapes (it may live on the meta device). 1x1 conv weights of
    attention layers, (C, C, 1, 1) in LDM, become Linear weights (C, C). Raises ValueError naming every
    missing, unexpected and wrongly shaped key (LDM names) unless all keys match one-to-one.
    """
    key_map = ldm_key_map(target)
    expected = target.state_dict()
    if not any(k.startswith(("encoder.", "decoder.")) for k in ldm_state_dict):
        first = ", ".join(list(ldm_state_dict)[:5]) or "(empty)"
        raise ValueError(
            f"this is not a KL-VAE state dict: no 'encoder.*'/'decoder.*' keys (first keys: {first}). "
            "Pass the VAE checkpoint (e.g. kl16.ckpt), not a MAR or other model checkpoint."
        )
    missing = [k for k in key_map if k not in ldm_state_dict]
    unexpected = [k for k in ldm_state_dict if k not in key_map]
    converted: dict[str, torch.Tensor] = {}
    wrong_shape: list[str] = []
    for ldm_key, diffusers_key in key_map.items():
        if ldm_key not in ldm_state_dict:
            continue
        tensor = ldm_state_dict[ldm_key]
        want = expected[diffusers_key].shape
        if tensor.ndim == 4 and len(want) == 2 and tuple(tensor.shape[2:]) == (1, 1):
            tensor = tensor[:, :, 0, 0]  # 1x1 conv (out, in, 1, 1) -> Linear (out, in)
        if tensor.shape != want:
            wrong_shape.append(
                f"{ldm_key}: checkpoint {tuple(ldm_state_dict[ldm_key].shape)}, model expects "
                f"{tuple(want)} (diffusers key {diffusers_key})"
            )
            continue
        converted[diffusers_key] = tensor
    if missing or unexpected or wrong_shape:
        parts = [
            _listing(title, items)
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", wrong_shape),
            )
            if items
        ]
        raise ValueError(
            "the LDM VAE state dict does not match the configured KL-VAE architecture:\n"
            + "\n".join(parts)
            + "\nFix: pass the KLVAEConfig (preset) the checkpoint was trained with, or the right checkpoint file."
        )
    return converted


def read_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a VAE state dict from ``path``: a torch checkpoint ``{"model": sd}`` (the MAR release's
    kl16.ckpt), a torch file holding a bare state dict, or a ``.safetensors`` file. Loads on CPU with
    ``weights_only=True`` (no pickled code is run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"KL-VAE checkpoint not found: {str(path)!r}. Pass the path of a local VAE checkpoint "
            "(e.g. the MAR release's kl16.ckpt) or a .safetensors state dict; nothing is downloaded."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({err}).") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ... depending on the bytes
        raise ValueError(
            f"{str(path)!r} could not be read by torch.load(weights_only=True) ({type(err).__name__}): it is "
            "not a PyTorch checkpoint, or it pickles objects other than tensors. Pass the VAE checkpoint "
            "(e.g. kl16.ckpt) or a .safetensors file of the VAE state dict."
        ) from err
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{str(path)!r} holds neither a state dict nor {{'model': state_dict}}; pass the VAE checkpoint "
            "(e.g. kl16.ckpt, whose ['model'] entry is the bare VAE state dict)."
        )
    return dict(obj)


def read_tokenizer_metadata(path: str | Path, writer: str) -> dict[str, str]:
    """The metadata of a tokenizer .safetensors file written by ``writer`` (a class name, for the messages):
    FileNotFoundError if it is missing, ValueError if it is not a safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {str(path)!r} (written by {writer}.save)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:
        raise ValueError(f"{str(path)!r} is not a safetensors file written by {writer}.save ({err})") from err
