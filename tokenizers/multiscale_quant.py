"""VAR's residual multi-scale quantizer (``quantize`` inside ``tokenizers.multiscale.MultiScaleVQVAE``), its phi
convs, and the two resizing functions the whole pyramid uses.

Paper: Tian et al. 2024, "Visual Autoregressive Modeling" (arXiv 2404.02905), Sec. 3.2 and Algorithms 1-2; the
layout of FoundationVision/VAR at commit 78b9539 (models/quant.py). Our own code.

Glossary: B batch, S scales, k scale index (0..S-1), pn_k side of scale k's token map (``patch_nums``),
H = pn_{S-1} side of the latent, Cz latent channels (z_channels), V codebook size (vocab_size),
L = sum_k pn_k^2 tokens per image, e_v codebook vector v, f encoder latent (B, Cz, H, H), f_hat its
reconstruction, F_k the running sum of scales 0..k, phi_k the residual conv of scale k. Tokens are row-major.

Encoding (Algorithm 1): rest = f, f_hat = 0; for k = 0..S-1:
    z_k   = area(rest, pn_k)                       (none at the last scale)
    idx_k = argmin_v |z_k|^2 + |e_v|^2 - 2 z_k.e_v  per position
    h_k   = phi_k(bicubic(e[idx_k], H))            (no resize at the last scale)
    f_hat += h_k; rest -= h_k
phi_k(h) = (1 - r) h + r conv3x3_k(h), r = quant_resi; share_quant_resi convs, the one whose tick is nearest to
k/(S-1) (ticks linspace(1/(3n), 1-1/(3n), n) for n = 4 convs, else linspace(1/(2n), 1-1/(2n), n)).
Resizing: area = adaptive average pooling, bicubic = A -0.75, half-pixel centres, clamped border, no antialias.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .multiscale import MultiScaleVQConfig


# ---- resizing (one place each) ----------------------------------------------------------------------------
def area_down(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size), adaptive average pooling (the only downsampling used)."""
    return F.interpolate(x, size=(size, size), mode="area")


def bicubic_up(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size), bicubic A=-0.75, align_corners False (the only upsampling used)."""
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


# ---- the multi-scale quantizer ----------------------------------------------------------------------------
class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h) (Sec. 3.2: a conv per scale to reduce the upsampling information loss)."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1.0 - self.ratio) + super().forward(h) * self.ratio


def _phi_bank(cfg: MultiScaleVQConfig) -> tuple[nn.Module, list[nn.Module]]:
    """The ``quantize.quant_resi`` container with the reference's key layout, and its convs in order:
    share 0 -> ``quant_resi.{k}`` (one per scale), 1 -> ``quant_resi.qresi``, n -> ``quant_resi.qresi_ls.{i}``."""
    count = {0: cfg.num_scales, 1: 1}.get(cfg.share_quant_resi, cfg.share_quant_resi)
    convs = [Phi(cfg.z_channels, cfg.quant_resi) if cfg.quant_resi > 1e-6 else nn.Identity() for _ in range(count)]
    if cfg.share_quant_resi == 0:
        bank = nn.ModuleList(convs)
    else:
        bank = nn.Module()
        if cfg.share_quant_resi == 1:
            bank.qresi = convs[0]
        else:
            bank.qresi_ls = nn.ModuleList(convs)
    return bank, convs


def phi_ticks(count: int) -> list[float]:
    """Positions in [0, 1] of ``count`` residual convs, computed as numpy.linspace does (start + i * step, the last
    = stop): linspace(1/3/n, 1 - 1/3/n, n) for n = 4, else linspace(1/2/n, 1 - 1/2/n, n)."""
    start = 1 / 3 / count if count == 4 else 1 / 2 / count
    stop = 1 - start
    if count == 1:
        return [start]
    step = (stop - start) / (count - 1)
    return [i * step + start for i in range(count - 1)] + [stop]


class MultiScaleQuantizer(nn.Module):
    """The residual multi-scale quantizer (Algorithm 1), ``quantize`` inside the VQVAE.

    Holds ``embedding`` (V, Cz), ``quant_resi`` (the phi convs) and the buffer ``ema_vocab_hit_SV`` (S, V): the
    per-scale code-hit counts smoothed during training (``record_hit`` counts scale updates: the first is a copy,
    the next 99 an EMA with 0.9, then 0.99; the reference updates it only under torch.distributed, this class in
    every training forward).
    """

    def __init__(self, config: MultiScaleVQConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_nums = config.patch_nums
        self.quant_resi, self._phis = _phi_bank(config)  # registered before the codebook: the reference's key order
        self.embedding = nn.Embedding(config.vocab_size, config.z_channels)
        ticks = phi_ticks(len(self._phis))
        last = config.num_scales - 1
        # the first of equal distances, as numpy.argmin (ties at k = 2, 7 of 10 scales fall on the upper conv in
        # float arithmetic)
        self._phi_of_scale = [min(range(len(ticks)), key=lambda i: abs(ticks[i] - k / last)) for k in range(last + 1)]
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(config.num_scales, config.vocab_size))
        self.record_hit = 0  # scale updates of the usage buffer (not saved, as in the reference)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    # ---- phi and the pieces ----------------------------------------------------------------------------------
    def phi_index(self, k: int) -> int:
        """Which residual conv scale k uses: the tick nearest to k / (S - 1)."""
        if not (isinstance(k, int) and 0 <= k < self.num_scales):
            raise ValueError(f"scale index must be an int in [0, {self.num_scales}), got {k!r}")
        return self._phi_of_scale[k]

    def phi(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """phi_k(h) = (1 - r) h + r conv_k(h) on (B, Cz, H, W); the identity when quant_resi is 0."""
        return self._phis[self.phi_index(k)](h)

    def embed_codes(self, idx: torch.Tensor) -> torch.Tensor:
        """codes (B, n) int64 in [0, V) -> codebook vectors (B, n, Cz)."""
        if idx.ndim != 2:
            raise ValueError(f"expected codes of shape (B, n), got {tuple(idx.shape)}")
        self._check_codes([idx])
        return self.embedding(idx)

    def _check_codes(self, idx_list: list[torch.Tensor]) -> None:
        """Integer codes in [0, V) (one device sync for the whole list)."""
        for idx in idx_list:
            if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
                raise ValueError(f"codes must be integer (int64) tensors, got {idx.dtype}")
        flat = torch.cat([idx.reshape(-1) for idx in idx_list])
        if flat.numel():
            low, high = torch.aminmax(flat)
            if int(low) < 0 or int(high) >= self.config.vocab_size:
                raise ValueError(f"codes must lie in [0, {self.config.vocab_size}), got [{int(low)}, {int(high)}]")

    def _check_scales(self, idx_list: list[torch.Tensor], count: int | None = None) -> None:
        """``count`` scales (default: any prefix of 1..S) of codes (B, pn_k^2), integers in [0, V)."""
        n = len(idx_list)
        if (count is not None and n != count) or not 1 <= n <= self.num_scales:
            want = f"all {count}" if count is not None else f"1..{self.num_scales}"
            raise ValueError(f"expected codes of {want} scales (a list of (B, pn_k^2) tensors), got {n}")
        for k, idx in enumerate(idx_list):
            pn = self.patch_nums[k]
            if idx.ndim != 2 or idx.shape[1] != pn * pn or idx.shape[0] != idx_list[0].shape[0]:
                raise ValueError(f"scale {k} needs codes of shape (B, {pn * pn}), got {tuple(idx.shape)}")
        self._check_codes(idx_list)

    def _code_map(self, idx: torch.Tensor, k: int) -> torch.Tensor:
        """codes (B, pn_k^2) of scale k (already checked) -> (B, Cz, pn_k, pn_k) codebook vectors (row-major)."""
        pn = self.patch_nums[k]
        return self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], -1, pn, pn)

    def _h(self, e: torch.Tensor, k: int, contiguous: bool = False) -> torch.Tensor:
        """h_k = phi_k(bicubic(e, H)), no resize at the last scale. The reference makes the resized map contiguous
        when encoding only (``contiguous``): the same values, but a conv on another memory layout rounds
        differently, so it is mirrored for bit-equal golden comparisons."""
        h = e if k == self.num_scales - 1 else bicubic_up(e, self.patch_nums[-1])
        return self.phi(h.contiguous() if contiguous else h, k)

    def _zeros(self, batch: int) -> torch.Tensor:
        side = self.patch_nums[-1]
        w = self.embedding.weight
        return torch.zeros(batch, self.config.z_channels, side, side, device=w.device, dtype=torch.float32)

    def _nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Cz, pn, pn) -> (B, pn^2) codes: argmin_v |z|^2 + |e_v|^2 - 2 z.e_v (first of equal minima)."""
        b, c = z.shape[:2]
        z_nc = z.detach().permute(0, 2, 3, 1).reshape(-1, c)
        e = self.embedding.weight.detach()
        d = z_nc.square().sum(1, keepdim=True) + e.square().sum(1)
        return torch.addmm(d, z_nc, e.t(), alpha=-2.0).argmin(dim=1).reshape(b, -1)

    def _check_latent(self, f: torch.Tensor) -> None:
        side, cz = self.patch_nums[-1], self.config.z_channels
        if f.ndim != 4 or tuple(f.shape[1:]) != (cz, side, side):
            raise ValueError(f"expected a latent of shape (B, {cz}, {side}, {side}) (patch_nums[-1] = {side}), got "
                             f"{tuple(f.shape)}")

    # ---- the API of the next-scale generators --------------------------------------------------------------
    @torch.no_grad()
    def encode_indices(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Algorithm 1: latent f (B, Cz, H, H) -> [codes (B, pn_k^2) int64] for k = 0..S-1 (float32, autocast off:
        the nearest code is an argmin)."""
        self._check_latent(f)
        rest, out = f.detach().float().clone(), []
        with torch.autocast(device_type=f.device.type, enabled=False):
            for k, pn in enumerate(self.patch_nums):
                idx = self._nearest(rest if k == self.num_scales - 1 else area_down(rest, pn))
                rest -= self._h(self._code_map(idx, k), k, contiguous=True)
                out.append(idx)
        return out

    def indices_to_fhat(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Algorithm 2: f_hat = sum_k h_k (B, Cz, H, H) of the codes of all S scales (or of a coarse prefix)."""
        self._check_scales(idx_list)
        f_hat = self._zeros(idx_list[0].shape[0])
        for k, idx in enumerate(idx_list):
            f_hat.add_(self._h(self._code_map(idx, k), k))
        return f_hat

    def teacher_inputs(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing inputs of scales 1..S-1 (Sec. 3.1: scale k is predicted from r_<k): area(F_{k-1}, pn_k),
        F_k = sum_{j<=k} h_j. [codes] of all S scales -> (B, L - pn_0^2, Cz), row-major per scale."""
        self._check_scales(idx_list, self.num_scales)
        f_hat, inputs = self._zeros(idx_list[0].shape[0]), []
        for k in range(self.num_scales - 1):
            f_hat = f_hat + self._h(self._code_map(idx_list[k], k), k)
            inputs.append(area_down(f_hat, self.patch_nums[k + 1]).flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    def next_input(self, k: int, f_hat: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling step after scale k: f_hat += phi_k(bicubic(h, H)) in place (h (B, Cz, pn_k, pn_k), the sampled
        codes' vectors); returns (f_hat, area(f_hat, pn_{k+1})), or (f_hat, f_hat) after the last scale."""
        self.phi_index(k)  # checks k
        pn = self.patch_nums[k]
        if h.ndim != 4 or tuple(h.shape[1:]) != (self.config.z_channels, pn, pn):
            raise ValueError(f"scale {k} needs h of shape (B, {self.config.z_channels}, {pn}, {pn}), got "
                             f"{tuple(h.shape)}")
        self._check_latent(f_hat)
        f_hat.add_(self._h(h, k))
        if k == self.num_scales - 1:
            return f_hat, f_hat
        return f_hat, area_down(f_hat, self.patch_nums[k + 1])

    # ---- training ------------------------------------------------------------------------------------------
    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass on a latent f (B, Cz, H, H) -> (f_hat, vq_loss, usage), in float32 without autocast.

        f_hat = f + sg(f_hat - f) (straight-through: the values of the quantized sum, gradient identity to f);
        vq_loss = 1/S sum_k [beta * mse(sg F_k, f) + mse(F_k, sg f)], F_k = sum_{j<=k} h_j (each scale's running
        sum; the codebook and the phi convs get gradient from the second term, the encoder from the first);
        usage (S,): per scale the percentage of codes whose smoothed hit count reaches
        0.08 * world_size * B*H*H / V (the reference's margin, the full-resolution position count at every scale).
        """
        self._check_latent(f)
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            f_ng = f.detach()
            rest, f_hat = f_ng.clone(), torch.zeros_like(f_ng)
            loss, hits = 0.0, []
            for k, pn in enumerate(self.patch_nums):
                idx = self._nearest(rest if k == self.num_scales - 1 else area_down(rest, pn))
                hits.append(torch.bincount(idx.reshape(-1), minlength=self.config.vocab_size).float())
                h = self._h(self._code_map(idx, k), k, contiguous=True)
                f_hat = f_hat + h
                rest = rest - h.detach()
                loss = loss + (F.mse_loss(f_hat.detach(), f) * self.config.beta + F.mse_loss(f_hat, f_ng))
            loss = loss * (1.0 / self.num_scales)
            f_hat = (f_hat.detach() - f_ng) + f
        return f_hat, loss, self._usage(torch.stack(hits), f.numel() // f.shape[1])

    @torch.no_grad()
    def _usage(self, hits: torch.Tensor, positions: int) -> torch.Tensor:
        """Update ``ema_vocab_hit_SV`` with this batch's hits (S, V) in training, then the usage (S,) percent."""
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if self.training:
                torch.distributed.all_reduce(hits)
        if self.training:
            for k in range(self.num_scales):  # the reference counts scales, not forwards, in record_hit
                ema = self.ema_vocab_hit_SV[k]
                if self.record_hit == 0:
                    ema.copy_(hits[k])
                elif self.record_hit < 100:
                    ema.mul_(0.9).add_(hits[k] * 0.1)
                else:
                    ema.mul_(0.99).add_(hits[k] * 0.01)
                self.record_hit += 1
        margin = world * positions / self.config.vocab_size * 0.08
        return (self.ema_vocab_hit_SV >= margin).float().mean(dim=1) * 100.0
