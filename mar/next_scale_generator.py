"""What the pipeline, editing and training ask of a next-scale generator (VAR, HART, continuous next-scale),
in the shape they ask it of MAR: ``generate``, ``sample_tokens``, ``patchify`` / ``unpatchify``,
``check_labels``, ``seq_len``, ``img_size``, and the tokenizer the model samples through.

Glossary: B batch, S scales (patch_nums), L = sum_k pn_k^2 tokens, h x w = pn_{S-1} x pn_{S-1} the last scale,
Cz latent channels, s = vae_stride pixels per last-scale token side.

A next-scale model's sampler needs its tokenizer (VAR and HART update f_hat through the quantizer's phi convs;
the continuous model decodes a latent): ``attach(tokenizer)`` keeps a reference that is not a sub-module, so
the model's state dict holds only its own keys (the published ``var_d*.pth`` layout). ``generate`` returns
f_hat (B, Cz, h, w), the latent the tokenizer decodes; ``unpatchify`` passes it through.

Settings, mapped onto sample.py's: ``num_iter`` is the number of scales (one scale per step; only S is valid);
``cfg`` is VAR's guidance t (0 = none; t_k = cfg k / (S - 1) with the ``linear`` schedule, t_k = cfg with
``constant``); ``temperature`` divides the logits (VAR) or scales the diffusion noise (continuous, HART's
residual); ``options.top_k`` / ``top_p`` / ``more_smooth`` are VAR's sampler settings.

Editing (VAR, arXiv 2404.02905, Sec. 7 "zero-shot generalization"): the known tokens are teacher-forced at
every scale. The keep mask of the last scale (B, h w) gives each scale's mask as the reference's notebook does:
bilinear resize of the keep mask to pn_k x pn_k, kept where > 0.5; scales of at most 3 tokens are kept whole.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def scale_known_mask(keep_last: Tensor, patch_nums) -> Tensor:
    """(B, h w) bool keep mask of the last scale -> (B, L) bool for every scale (module docstring)."""
    side = patch_nums[-1]
    if keep_last.dim() != 2 or keep_last.shape[1] != side * side:
        raise ValueError(f"the known mask must be (B, {side * side}) (the last scale) or (B, L), got "
                         f"{tuple(keep_last.shape)}")
    grid = keep_last.view(-1, 1, side, side).float()
    masks = []
    for pn in patch_nums:
        m = F.interpolate(grid, size=(pn, pn), mode="bilinear", align_corners=False).gt(0.5)
        masks.append(torch.ones_like(m) if pn * pn <= 3 else m)
    return torch.cat([m.flatten(1) for m in masks], dim=1)


class NextScaleGenerator:
    """Mixed into ``mar.next_scale.NextScaleTrunk``: the generator interface of the family (module docstring).
    A model class implements ``_generate(batch_size, labels, cfg, cfg_schedule, temperature, generator, options,
    known_codes, known_mask, progress) -> f_hat``."""

    vae_stride: int = 1  # pixels per last-scale token side (set from the tokenizer when the model is built)
    patch_size: int = 1  # a token is one latent position (editing's pixel-to-token mask)

    def attach(self, tokenizer) -> "NextScaleGenerator":
        """Sample through ``tokenizer`` (kept as a plain reference, not a sub-module); returns the model."""
        object.__setattr__(self, "_tokenizer_ref", (tokenizer,))
        if getattr(tokenizer, "stride", None):
            self.vae_stride = tokenizer.stride
        return self

    @property
    def tokenizer(self):
        ref = self.__dict__.get("_tokenizer_ref")
        if ref is None:
            raise ValueError("this next-scale model has no tokenizer to sample through: call model.attach(tokenizer) "
                             "(mar.run.load_run does it)")
        return ref[0]

    @property
    def seq_len(self) -> int:
        return self.L

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def img_size(self) -> int:
        return self.patch_nums[-1] * self.vae_stride

    def check_labels(self, labels: Tensor) -> None:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"class labels must be in [0, {self.num_classes - 1}], got "
                             f"min {int(labels.min())}, max {int(labels.max())}")

    def patchify(self, tokens: Tensor) -> Tensor:
        """The tokenizer's encoding as the known tokens of editing: codes (B, L) as they are."""
        return tokens

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """``generate``'s f_hat (B, Cz, h, w) as the tokenizer decodes it."""
        return tokens

    def check_num_iter(self, num_iter: int | None) -> None:
        if num_iter is not None and num_iter != self.num_scales:
            raise ValueError(f"a next-scale model generates one scale per step: num_iter must be its {self.num_scales} "
                             f"scales (patch_nums {list(self.patch_nums)}), got {num_iter}")

    def generate(self, batch_size: int, *, labels: Tensor | None = None, num_iter: int | None = None,
                 cfg: float = 1.0, cfg_schedule: str = "linear", temperature: float = 1.0, generator=None,
                 options=None, known_tokens: Tensor | None = None, known_mask: Tensor | None = None,
                 progress: bool = False) -> Tensor:
        """f_hat (B, Cz, h, w) (module docstring); ``known_tokens`` (B, L) codes with ``known_mask`` (B, h w) of
        the last scale or (B, L) edit an image."""
        from mar.config.schema import SamplingOptions

        self.check_num_iter(num_iter)
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        if labels is not None:
            self.check_labels(labels)
        if known_mask is not None and known_mask.shape[-1] != self.L:
            known_mask = scale_known_mask(known_mask.bool(), self.patch_nums)
        options = SamplingOptions() if options is None else options
        return self._generate(batch_size, labels=labels, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
                              generator=generator, options=options, known_codes=known_tokens, known_mask=known_mask,
                              progress=progress)

    def sample_tokens(self, batch_size: int, num_iter: int | None = None, cfg: float = 1.0,
                      cfg_schedule: str = "linear", labels: Tensor | None = None, temperature: float = 1.0,
                      generator=None, progress: bool = False, *, options=None) -> Tensor:
        """``generate`` with MAR's ``sample_tokens`` signature (the training task's progress grids)."""
        return self.generate(batch_size, labels=labels, num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule,
                             temperature=temperature, generator=generator, options=options, progress=progress)
