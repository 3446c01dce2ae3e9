"""Training objective of the multi-scale VQVAE (VAR's tokenizer), as one module a generic loop can drive.

Glossary: B batch, x images in [-1, 1], f = quant_conv(encoder(x)) (B, Cz, H, H), S scales, F_k the running sum of
the quantized scales 0..k (F_{S-1} = f_hat), sg stop-gradient, x_hat = decoder(post_quant_conv(f + sg(f_hat - f))).

    recon = mean |x - x_hat| (l1) or mean (x - x_hat)^2 (l2)
    vq    = 1/S sum_k [beta * mse(sg F_k, f) + mse(F_k, sg f)]      (``MultiScaleQuantizer.forward``)
    loss  = recon + vq

Hybrid (``config.hybrid``, HART arXiv 2410.10812 Sec. 3.1, the "hybrid tokenizer"): per sample b one uniform
u_b from the step's generator; samples with u_b < 1/2 decode the continuous latent f itself (= f_hat + r,
r = f - f_hat, the gradient straight to the encoder), the others the straight-through f_hat as above. The vq term
is unchanged (every sample). The reference (hart/modules/models/autoencoder/quantize/hart_hybrid_quantize.py)
flips one Python ``random`` coin per batch; the per-sample coin from an explicit generator gives the same
expectation, both paths in every batch, and a reproducible run.

VAR (arXiv 2404.02905, Sec. 3.2) trains its tokenizer with a compound loss: reconstruction, the quantizer term,
and perceptual and adversarial terms. The reference release holds the quantizer term only (models/quant.py); the
perceptual (LPIPS, pretrained VGG) and adversarial terms are left out here, as in the KL-VAE and VQ objectives of
this package. There is no dead-code restart: the quantizer's ``ema_vocab_hit_SV`` and the logged per-scale usage
tell how much of the codebook each scale uses.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .multiscale import MultiScaleVQVAE
from .training import check_reconstructs, codebook_param_groups


class MultiScaleVQObjective(nn.Module):
    """Holds the multi-scale VQVAE; ``forward`` returns (loss, logs) with loss = recon + vq (module docstring)."""

    def __init__(self, tokenizer: MultiScaleVQVAE, recon_loss: Literal["l1", "l2"] = "l1") -> None:
        super().__init__()
        if recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {recon_loss!r}")
        check_reconstructs(tokenizer.config)
        self.tokenizer = tokenizer
        self.recon_loss = recon_loss

    def forward(self, images: torch.Tensor, step: int = 0, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, C, P, P) in [-1, 1] -> (scalar loss, detached logs: recon, vq, usage (mean over scales of
        the per-scale usage percent), usage_last (the finest scale's)). Without ``config.hybrid`` nothing is
        random (``step`` and ``generator`` are accepted for the loop's common call); with it ``generator`` draws
        the per-sample path (``continuous_paths``) and the logs add continuous_frac and recon_discrete /
        recon_continuous (the recon over each group, logged only when the group is not empty)."""
        tok = self.tokenizer
        quantizer = tok.quantize
        if self.training and quantizer.record_hit == 0 and step > 0:
            # a resumed run: the usage buffer's update count is not in the state dict (the reference's layout);
            # after ``step`` optimizer steps of one forward each it is step * S, so a resume updates as before
            quantizer.record_hit = step * quantizer.num_scales
        f = tok.encode_latent(images)
        f_hat, vq, usage = quantizer(f)
        continuous = self.continuous_paths(images.shape[0], generator, images.device) if tok.config.hybrid else None
        if continuous is not None:
            f_hat = torch.where(continuous[:, None, None, None], f.float(), f_hat)  # (B, Cz, H, H)
        recon = tok.decoder(tok.post_quant_conv(f_hat))
        diff = images - recon
        err = diff.abs() if self.recon_loss == "l1" else diff.square()  # (B, C, P, P)
        terms = {"recon": err.mean(), "vq": vq}
        loss = terms["recon"] + terms["vq"]
        logs = {k: v.detach() for k, v in terms.items()}
        logs.update(usage=usage.mean(), usage_last=usage[-1])
        if continuous is not None:
            logs.update(_group_logs(err.detach(), continuous))
        return loss, logs

    @staticmethod
    def continuous_paths(batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """(B,) bool: True where a sample decodes the continuous latent f (u_b < 1/2, u_b ~ U[0, 1) drawn on the
        generator's device, one per sample)."""
        if generator is None:
            raise ValueError("the hybrid (HART) objective draws each sample's decoder input with a torch.Generator: "
                             "pass generator=... (the training loop passes one per step)")
        return torch.rand(batch, generator=generator, device=generator.device).to(device) < 0.5

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups, each with ``lr_mult`` 1.0: the network split into decay / no decay (1-D tensors and
        biases), and the codebook alone without weight decay (decay would pull the codes to 0)."""
        codebook = self.tokenizer.quantize.embedding.weight
        return codebook_param_groups(self.tokenizer, codebook, lr, weight_decay, "msvq")


def _group_logs(err: torch.Tensor, continuous: torch.Tensor) -> dict[str, torch.Tensor]:
    """recon over the continuous and the discrete samples of err (B, ...), each only if that group has samples
    (an empty group would log NaN), and the continuous fraction of the batch."""
    per_sample = err.flatten(1).mean(1)  # (B,): equal-sized samples, so a group's mean is its recon
    n_cont = int(continuous.sum())  # one device sync
    logs = {"continuous_frac": continuous.float().mean()}
    for name, mask, n in (("recon_continuous", continuous, n_cont), ("recon_discrete", ~continuous,
                                                                     len(continuous) - n_cont)):
        if n:
            logs[name] = (per_sample * mask).sum() / n
    return logs
