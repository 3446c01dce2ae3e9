"""Fashion-MNIST domain classifier: a small CNN whose features replace Inception's on 32x32 grey images.

Inception-v3 was trained on ImageNet photographs; on 32x32 grey clothing its features say little. This
network, trained on Fashion-MNIST in about a minute on a CPU, gives a domain feature space instead.
Metrics computed on it are named for what they are: ``fd_fmnist`` (Frechet distance on this
classifier's features), ``kd_fmnist``, ``is_fmnist`` -- never "FID". Their numbers compare only runs
scored with the same classifier file (the statistics files record its hash).

Glossary
  B     batch size
  H, W  image height/width; the network sees 32x32 (28x28 is padded, other sizes are resized)
  F     feature width (``feature_dim``, 256): penultimate activations, used for FD / KD / precision-recall
  K     number of classes (10): the logits, used for the IS-style score and class accuracy

Input convention: grey images as float in [-1, 1] of shape (B, 1, 32, 32), as ``mar.engine.data`` returns
them; ``to_network_input`` converts uint8 images of any channel count and size to that.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from mar.engine.data import FashionMNISTDataset
from mar.io import atomic_write

FILE_FORMAT = "mar-fmnist-classifier"  # safetensors metadata "format" of a classifier file
EXTRACTOR_NAME = "mar-fmnist-classifier"  # name registered in torch-fidelity's feature-extractor registry
TRAIN_HINT = "train one with `python evaluate.py train-classifier --data /usr/share/datasets/fashion-mnist --out FILE`"


@dataclass(frozen=True)
class ClassifierConfig:
    """Sizes of the CNN; stored in the weights file so a file rebuilds its own network."""

    in_channels: int = 1
    image_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 256
    num_classes: int = 10


class FashionClassifier(nn.Module):
    """Conv stages (3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool) -> flatten -> Linear -> ReLU -> Linear.

    (B, 1, 32, 32) -> stages -> (B, widths[-1], 32/2^n, 32/2^n) -> features (B, F) -> logits (B, K).
    """

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        layers, c_in = [], config.in_channels
        for c_out in config.widths:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.stages = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.widths)
        self.feature = nn.Linear(c_in * side * side, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 32, 32) in [-1, 1] -> (B, F) penultimate activations (after ReLU)."""
        return F.relu(self.feature(self.stages(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 32, 32) in [-1, 1] -> (B, K) logits."""
        return self.head(self.features(x))


def to_network_input(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 (B, H, W) / (B, C, H, W) with C in {1, 3}, or float in [-1, 1] -> (B, 1, size, size) float in [-1, 1].

    Grey = channel mean (exact for grey images stored as RGB). 28x28 (raw Fashion-MNIST) is padded by
    2 pixels of black (-1) on each side, as ``mar.engine.data`` pads; other sizes are resized (bilinear, antialias).
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, H, W) or (B, 1|3, H, W), got shape {tuple(images.shape)}")
    x = images.float().mean(dim=1, keepdim=True)  # (B, 1, H, W); mean of integers: exact for grey-as-RGB
    if images.dtype == torch.uint8:
        x = x / 127.5 - 1.0  # the same numbers as mar.engine.data's pixel / 127.5 - 1
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if (h, w) == (28, 28) and size > 28 and size % 2 == 0:  # raw Fashion-MNIST: pad with black like mar.engine.data
        p = (size - 28) // 2
        return F.pad(x, (p, p, p, p), value=-1.0)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup to base_lr over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def train_classifier(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 2,
                     batch_size: int = 128, lr: float = 3e-3, weight_decay: float = 0.05,
                     generator: torch.Generator | None = None, log=None) -> list[float]:
    """Cross-entropy training with AdamW and a warmup + cosine schedule; returns the per-step losses.

    images: (N, 1, 32, 32) float in [-1, 1] or uint8 (N, [C,] H, W); labels: (N,) int64. Each epoch visits a
    permutation drawn from ``generator``. ``log(epoch, mean_loss)`` is called after each epoch if given.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (> 0), got {len(images)} images, {len(labels)} labels")
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = epochs * steps_per_epoch
    losses, step = [], 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), batch_size):
            idx = order[i:i + batch_size]
            x = to_network_input(images[idx], model.config.image_size).to(device)
            y = labels[idx].to(device)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, lr, warmup_steps=max(1, total // 20))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        if log is not None:
            log(epoch, sum(losses[-steps_per_epoch:]) / steps_per_epoch)
    model.eval()
    return losses


@torch.no_grad()
def predict_logits(model: FashionClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Images as accepted by ``to_network_input`` -> (N, K) logits (eval mode, on the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(to_network_input(images[i:i + batch_size], model.config.image_size).to(device)).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.config.num_classes)


def class_accuracy(classifier: FashionClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose argmax class equals their label: mean_i [argmax_k logits_ik == y_i]."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (> 0), got {len(images)} images, {len(labels)} labels")
    pred = predict_logits(classifier, images).argmax(dim=1)
    return (pred == labels).double().mean().item()


def save_classifier(model: FashionClassifier, path: str, **info) -> None:
    """Write the state dict as safetensors, atomically (``mar.io.atomic_write``: an old file survives a failed
    write); metadata holds the format tag, the config and ``info``."""
    meta = {"format": FILE_FORMAT, "config": json.dumps(asdict(model.config))}
    meta.update({k: json.dumps(v) for k, v in info.items()})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def read_classifier_metadata(path: str) -> dict:
    """The metadata dict of a classifier file, checked to be one; JSON values decoded."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier file {path} not found; {TRAIN_HINT}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a safetensors classifier file ({e}); {TRAIN_HINT}") from None
    if meta.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not a Fashion-MNIST classifier written by mar.eval.classifier (metadata format "
                         f"{meta.get('format')!r}, expected {FILE_FORMAT!r}); {TRAIN_HINT}")
    return {k: (v if k == "format" else json.loads(v)) for k, v in meta.items()}


def load_classifier(path: str, device: torch.device | str | None = None) -> FashionClassifier:
    """Rebuild the network from the file's config and load its weights strictly; returns it in eval mode."""
    meta = read_classifier_metadata(path)
    cfg = meta["config"]
    model = FashionClassifier(ClassifierConfig(**{**cfg, "widths": tuple(cfg["widths"])}))
    try:
        model.load_state_dict(load_file(path), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the network in its own metadata "
                         f"({str(e).splitlines()[0]}); {TRAIN_HINT}") from None
    return model.to(device).eval() if device is not None else model.eval()


class FeatureExtractorFMNIST(FeatureExtractorBase):
    """torch-fidelity adapter: uint8 (B, 3, H, W) RGB -> ("features" (B, F), "logits" (B, K)) as float32.

    Created by torch-fidelity as ``cls(name, features_list, feature_extractor_weights_path=PATH, ...)``;
    the weights path is a classifier file written by ``save_classifier``.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"the {EXTRACTOR_NAME} feature extractor needs a classifier file (--classifier PATH); "
                             f"{TRAIN_HINT}")
        self.net = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] in (1, 3)):
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        feats = self.net.features(to_network_input(x, self.net.config.image_size))  # (B, F)
        out = {"features": feats, "logits": self.net.head(feats)}  # logits (B, K)
        return tuple(out[name].float() for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


def register_fmnist_extractor() -> str:
    """Register ``FeatureExtractorFMNIST`` in torch-fidelity (idempotent); returns its registry name."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, FeatureExtractorFMNIST)
    return EXTRACTOR_NAME


def fashion_mnist_uint8(split: str, root: str | None = None, pad_to: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as the model sees it (``mar.engine.data``: padded to 32x32 with black): uint8 (N, H, W), labels (N,)."""
    ds = FashionMNISTDataset(root=root, split=split, pad_to=pad_to, hflip=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # (N, 1, H, W) in [-1, 1]
    images = ((x[:, 0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)  # exact inverse of p / 127.5 - 1
    return images, torch.tensor([ds[i][1] for i in range(len(ds))], dtype=torch.long)
