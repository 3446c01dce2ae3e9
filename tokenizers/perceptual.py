"""A perceptual loss that runs offline: distances between the features of a small network the project trains.

LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018) compares
images through the unit-normalised activations of an ImageNet network; the LDM / taming autoencoders add it to the
L1 term (Esser et al., arXiv 2012.09841, Sec. 3.1). Its VGG weights cannot be had offline, so this module trains
its own feature network on the images at hand and uses LPIPS' "baseline" form (Sec. 3, Eq. 1 with w_l = 1):

    d(x, x_hat) = mean_l  sum_c mean_{h,w} ( n(F_l(x)) - n(F_l(x_hat)) )^2,    n(v) = v / (||v||_c + eps)

F_l are the outputs of the stem and of each stage; n normalises each position's channel vector.

The network must not be the evaluation classifier (``mar.eval.classifier``) nor anything trained on its outputs:
a loss on the yardstick's own features would game fd_fmnist. This one differs in all three ways the issue names:
another architecture (residual stages with GroupNorm and strided convolutions, global average pooling; the
classifier is conv-BatchNorm-max-pool with a linear feature layer), another seed, and another data split (the
first 50,000 training images by default, ``data.split=train[:50000]``; the classifier sees all 60,000).

Glossary: B batch, C channels, K classes, F_l the l-th feature map.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FILE_FORMAT = "mar-perceptual-net"


@dataclass(frozen=True)
class PerceptualNetConfig:
    """Sizes of the feature network (stored in its file)."""

    in_channels: int = 1
    widths: tuple[int, ...] = (32, 64, 128)  # one stage each; every stage after the first halves the size
    blocks: int = 1  # residual blocks per stage
    groups: int = 8  # GroupNorm groups
    num_classes: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        for name in ("in_channels", "blocks", "groups", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"perceptual.{name} must be a positive int, got {value!r}")
        if not self.widths or any(not isinstance(w, int) or w < 1 or w % self.groups for w in self.widths):
            raise ValueError(f"perceptual.widths must be positive ints divisible by perceptual.groups={self.groups}, "
                             f"got {list(self.widths)}")


class _Block(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the input (pre-activation residual block)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class PerceptualNet(nn.Module):
    """(B, C, H, W) in [-1, 1] -> stem (3x3 conv) -> stages (a stride-2 3x3 conv from the second on, then residual
    blocks) -> GroupNorm, SiLU, global average pool -> linear logits (B, K). ``features`` returns the stem's and each
    stage's output."""

    def __init__(self, config: PerceptualNetConfig = PerceptualNetConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        self.stem = nn.Conv2d(config.in_channels, w[0], 3, padding=1)
        stages = []
        for i, width in enumerate(w):
            down = [nn.Conv2d(w[i - 1], width, 3, stride=2, padding=1)] if i else []
            stages.append(nn.Sequential(*down, *[_Block(width, config.groups) for _ in range(config.blocks)]))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.GroupNorm(config.groups, w[-1])
        self.head = nn.Linear(w[-1], config.num_classes)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.stem(x)
        out = [h]
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.silu(self.norm(self.features(x)[-1])).mean(dim=(2, 3)))

    def save(self, path, **info) -> None:
        """safetensors with the config (and ``info``, e.g. how it was trained) in the metadata (callers wanting an
        atomic write wrap it in ``mar.io.atomic_write``)."""
        meta = {"format": FILE_FORMAT, "config": json.dumps(asdict(self.config)), **{k: str(v) for k, v in info.items()}}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> PerceptualNet:
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"perceptual network file {path} does not exist: train one with `python train.py "
                                    "--config configs/fmnist_perceptual.yaml`") from None
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}): retrain it with `python train.py "
                             "--config configs/fmnist_perceptual.yaml`") from None
        if meta.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a perceptual network file (format {meta.get('format')!r}, expected "
                             f"{FILE_FORMAT!r}): vae.perceptual_net takes the file a task=feature_net run writes")
        net = cls(PerceptualNetConfig(**json.loads(meta["config"])))
        net.load_state_dict(load_file(str(path)))
        return net


def _unit(v: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each position's channel vector divided by its norm (LPIPS, Sec. 3)."""
    return v / (v.square().sum(dim=1, keepdim=True).sqrt() + eps)


class PerceptualLoss(nn.Module):
    """d(x, x_hat) of the module docstring, per image (B,), through a frozen ``PerceptualNet`` (eval mode; no
    gradient reaches its weights, only the images)."""

    def __init__(self, net: PerceptualNet) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:  # the network stays in eval mode
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real = [_unit(f) for f in self.net.features(x)]
        fake = [_unit(f) for f in self.net.features(x_hat)]
        return torch.stack([(a - b).square().sum(1).mean(dim=(1, 2)) for a, b in zip(real, fake)]).mean(0)
