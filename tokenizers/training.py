"""The KL-VAE training objective (LDM-style autoencoder loss) as one module a generic loop can drive.

Glossary: B batch, C image channels, H/W image size, x images in [-1, 1], x_hat reconstructions,
z unscaled latents (the tokenizer's scaling factor is applied only to MAR tokens, never here),
D the PatchGAN discriminator (logits per patch), f the adversarial switch (0 before disc_start, else 1).

    posterior q(z|x) = N(mu, exp(logvar)),  z = mu + exp(logvar/2) * eps,  x_hat = decode(z)
    recon  = mean_pixels |x - x_hat|  (l1)  or  mean_pixels (x - x_hat)^2  (l2)
    kl     = mean_B  0.5 * sum_{C,h,w} (mu^2 + exp(logvar) - 1 - logvar)
    g_adv  = -mean D_sg(x_hat)                  D_sg: D's weights detached (trains the VAE only)
    d_loss = 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(sg(x_hat))))      hinge (trains D only)
    loss   = recon + kl_weight * kl + disc_weight * f * g_adv + f * d_loss

One backward pass and one optimizer step over ``objective.parameters()`` train both networks: the
two adversarial terms never send gradient into each other's network. Before disc_start the terms are
still computed (times 0), so every parameter gets a (zero) gradient each step, as DDP requires.

Differences from the LDM/taming recipe, on purpose: LPIPS needs pretrained VGG weights that cannot be obtained
offline, so the perceptual term (opt-in, ``perceptual_weight``) is LPIPS' baseline form on a feature network the
project trains itself (``tokenizers.perceptual``):  loss += perceptual_weight * mean_B d(x, x_hat). No adaptive
generator weight (the ratio of gradient norms at the decoder's last layer), which needs a second autograd pass;
disc_weight is a fixed number instead. There is no BatchNorm (the discriminator uses GroupNorm), so nothing depends
on per-process batch statistics under DDP.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .kl_vae import KLTokenizer
from .perceptual import PerceptualLoss, PerceptualNet


@dataclass(frozen=True)
class VAETrainConfig:
    """Loss weights and discriminator shape for KL-VAE training (disc_weight 0 = no discriminator)."""

    recon_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 0  # optimizer step at which the adversarial terms switch on
    disc_lr_mult: float = 1.0  # discriminator lr = lr * disc_lr_mult
    disc_channels: int = 64  # width of the first discriminator conv (doubles per layer, up to 8x)
    disc_layers: int = 3  # stride-2 convs: one logit per (2**disc_layers)-pixel patch
    perceptual_weight: float = 0.0  # weight of the offline perceptual term (tokenizers.perceptual); 0 = none
    perceptual_net: str | None = None  # its feature network: the file a task=feature_net run writes
    export_ema: bool = False  # export the EMA of the weights (optim.ema_rate) instead of the raw weights

    def __post_init__(self) -> None:
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        if (self.perceptual_weight > 0) != (self.perceptual_net is not None):
            raise ValueError("vae.perceptual_weight > 0 and vae.perceptual_net go together: set both (the network "
                             "file from `python train.py --config configs/fmnist_perceptual.yaml`) or neither")
        for name in ("kl_weight", "disc_weight", "disc_lr_mult", "perceptual_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.disc_lr_mult == 0:
            raise ValueError("disc_lr_mult must be > 0; set disc_weight=0 to disable the discriminator")
        for name, low in (("disc_start", 0), ("disc_channels", 1), ("disc_layers", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    @property
    def use_discriminator(self) -> bool:
        return self.disc_weight > 0


def adversarial_factor(step: int, disc_start: int) -> float:
    """f(step) = 0 before disc_start, 1 from disc_start on."""
    return 1.0 if step >= disc_start else 0.0


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))): scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) -> patch logits (B, 1, H / 2**layers, W / 2**layers).

    ``layers`` conv(4x4, stride 2, pad 1) + LeakyReLU(0.2) (GroupNorm on all but the first), widths
    channels * (1, 2, 4, 8, 8, ...), then a 3x3 conv to one logit channel.
    """

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.layers = layers
        blocks: list[nn.Module] = []
        cin = in_channels
        for i in range(layers):
            cout = channels * min(2**i, 8)
            blocks.append(nn.Conv2d(cin, cout, 4, stride=2, padding=1))
            if i > 0:  # >= 4 channels per group where the width allows it
                blocks.append(nn.GroupNorm(math.gcd(32, max(cout // 4, 1)), cout))
            blocks.append(nn.LeakyReLU(0.2))
            cin = cout
        blocks.append(nn.Conv2d(cin, 1, 3, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patch = 2**self.layers
        if images.shape[-2] < patch or images.shape[-1] < patch:
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])} are smaller than the discriminator's "
                f"{patch}x{patch} patch; lower disc_layers to at most log2(min(H, W))."
            )
        return self.net(images)


def _posterior(tokenizer: KLTokenizer, images: torch.Tensor):
    """q(z|x) (diffusers' DiagonalGaussianDistribution, logvar clamped to [-30, 20]) after shape checks."""
    cfg = tokenizer.config
    if images.ndim != 4 or images.shape[1] != cfg.in_channels:
        raise ValueError(f"expected images of shape (B, {cfg.in_channels}, H, W), got {tuple(images.shape)}")
    cfg.check_image_size(images.shape[2], images.shape[3])
    return tokenizer.vae.encode(images).latent_dist


class KLVAEObjective(nn.Module):
    """Holds the tokenizer (VAE) and the optional discriminator; ``forward`` returns (loss, logs)."""

    def __init__(self, tokenizer: KLTokenizer, config: VAETrainConfig | None = None) -> None:
        super().__init__()
        self.config = config or VAETrainConfig()
        cfg = tokenizer.config
        check_reconstructs(cfg)
        self.tokenizer = tokenizer
        self.perceptual: PerceptualLoss | None = None
        if self.config.perceptual_net is not None:
            net = PerceptualNet.load(self.config.perceptual_net)
            if net.config.in_channels != cfg.in_channels:
                raise ValueError(f"vae.perceptual_net {self.config.perceptual_net} takes {net.config.in_channels}-"
                                 f"channel images, the tokenizer {cfg.in_channels}: train one on the same images")
            self.perceptual = PerceptualLoss(net)
        self.discriminator: PatchDiscriminator | None = None
        if self.config.use_discriminator:
            self.discriminator = PatchDiscriminator(cfg.in_channels, self.config.disc_channels,
                                                    self.config.disc_layers)

    def terms(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The unweighted loss terms (graph attached): recon, kl; with a discriminator also g_adv,
        d_loss, logits_real, logits_fake (mean patch logits)."""
        vae = self.tokenizer.vae
        posterior = _posterior(self.tokenizer, images)
        z = posterior.sample(generator=generator)  # (B, C_lat, h, w), unscaled
        recon = vae.decode(z).sample  # (B, C, H, W)
        diff = images - recon
        out = {
            "recon": diff.abs().mean() if self.config.recon_loss == "l1" else diff.square().mean(),
            "kl": posterior.kl().mean(),  # kl() sums over (C_lat, h, w) -> (B,)
        }
        if self.perceptual is not None:
            out["perceptual"] = self.perceptual(images, recon).mean()
        if self.discriminator is not None:
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            fake_for_g = torch.func.functional_call(self.discriminator, frozen, (recon,))
            logits_real = self.discriminator(images)
            logits_fake = self.discriminator(recon.detach())
            out["g_adv"] = -fake_for_g.mean()
            out["d_loss"] = hinge_d_loss(logits_real, logits_fake)
            out["logits_real"] = logits_real.mean()
            out["logits_fake"] = logits_fake.mean()
        return out

    def forward(
        self, images: torch.Tensor, step: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, C, H, W) in [-1, 1] -> (scalar loss, detached logs). Logs hold the unweighted
        terms (recon, kl and, with a discriminator, g_adv, d_loss, logits_real, logits_fake)."""
        cfg = self.config
        t = self.terms(images, generator)
        loss = t["recon"] + cfg.kl_weight * t["kl"]
        if self.perceptual is not None:
            loss = loss + cfg.perceptual_weight * t["perceptual"]
        if self.discriminator is not None:
            f = adversarial_factor(step, cfg.disc_start)
            loss = loss + cfg.disc_weight * f * t["g_adv"] + f * t["d_loss"]
        return loss, {k: v.detach() for k, v in t.items()}

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: VAE and discriminator (lr * disc_lr_mult), each split into decay / no decay
        (1-D tensors and biases). Every group carries ``lr_mult`` so a schedule can set lr = base * lr_mult."""
        groups = []
        parts = [("vae", self.tokenizer, 1.0)]
        if self.discriminator is not None:
            parts.append(("disc", self.discriminator, self.config.disc_lr_mult))
        for name, module, mult in parts:
            decay, no_decay = decay_split(module.named_parameters())
            for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
                if params:
                    groups.append({"name": f"{name}_{suffix}", "params": params, "lr": lr * mult,
                                   "lr_mult": mult, "weight_decay": wd})
        return groups


def check_reconstructs(config) -> None:
    """A reconstruction objective needs as many output channels as input channels."""
    if config.in_channels != config.out_channels:
        raise ValueError(f"the tokenizer maps {config.in_channels} to {config.out_channels} channels; a "
                         "reconstruction objective needs in_channels == out_channels")


def decay_split(named_parameters) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay) of ``(name, parameter)`` pairs: weights of 2 or more dims decay; 1-D tensors (norms) and
    biases do not (the usual AdamW grouping)."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return decay, no_decay


def codebook_param_groups(tokenizer: nn.Module, codebook: nn.Parameter, lr: float, weight_decay: float,
                          prefix: str) -> list[dict]:
    """AdamW groups of a VQ tokenizer, each with ``lr_mult`` 1.0: the network split by ``decay_split`` into
    ``<prefix>_decay`` / ``<prefix>_no_decay``, and the codebook alone without weight decay (decay would pull the
    codes to 0); empty groups are left out."""
    decay, no_decay = decay_split((n, p) for n, p in tokenizer.named_parameters() if p is not codebook)
    groups = []
    for name, params, wd in ((f"{prefix}_decay", decay, weight_decay), (f"{prefix}_no_decay", no_decay, 0.0),
                             ("codebook", [codebook], 0.0)):
        if params:
            groups.append({"name": name, "params": params, "lr": lr, "lr_mult": 1.0, "weight_decay": wd})
    return groups


@torch.no_grad()
def estimate_scaling_factor(
    tokenizer: KLTokenizer, batches: Iterable[torch.Tensor], generator: torch.Generator | None = None
) -> float:
    """1 / std of unscaled posterior samples z over the given image batches (B, C, H, W) in [-1, 1].

    Equals ``kl_vae.compute_scaling_factor(torch.cat(all z))`` (unbiased std over all elements, no mean shift
    applied to tokens) but streams: per-batch mean and sum of squared deviations are merged in float64
    (Chan et al.), so memory does not grow with the number of batches. Store the result with
    ``tokenizer.config = dataclasses.replace(tokenizer.config, scaling_factor=s)``.
    """
    count, mean, m2 = 0, 0.0, 0.0
    for images in batches:
        z = _posterior(tokenizer, images).sample(generator=generator).double()
        n_b = z.numel()
        mean_b = z.mean().item()
        m2_b = (z - mean_b).square().sum().item()
        total = count + n_b
        delta = mean_b - mean
        m2 += m2_b + delta * delta * count * n_b / total
        mean += delta * n_b / total
        count = total
    if count < 2:
        raise ValueError(f"estimate_scaling_factor got {count} latent values; pass at least one image batch")
    std = math.sqrt(m2 / (count - 1))
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latent std is {std}; the latents are constant or not finite, cannot compute a scale")
    return 1.0 / std
