"""MAR, the generator: a bidirectional MAE-style encoder/decoder over tokens (MAR paper, Sec. 3.3-3.4).

Glossary: B batch, L tokens per image (seq_len), P buffer positions (buffer_size, 64), D width,
C token channels (latent channels * patch_size**2), m masked tokens, V visible tokens.

Training (``forward``): tokens -> random order per sample -> the first m = ceil(L*r) positions of the order
are masked -> the encoder sees [class buffer; visible tokens] -> the decoder fills the masked positions with
``mask_token`` -> one condition z per token -> the head's loss on the masked tokens.
Generation is a loop outside the module (``mar.generate.masked``); it asks the model only for
``embed_labels`` and ``conditions`` (and ``head.sample``). ``sample_tokens`` is that loop with this model.

The head is a part (``mar.heads``): built from a spec after the transformer's own initialisation (the
reference's order of random draws) and registered under the spec's name, ``diffloss`` for the Diffusion Loss
head, so the published checkpoints' keys (``diffloss.net.*``) load unchanged.

Masks are kept as positions (orders and a count m) rather than boolean tensors: the visible and masked
positions are slices of the order, so neither training nor generation needs ``nonzero()`` or any other host
round trip.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from mar import orders, schedules
from mar.config.schema import SamplingOptions, precision_of
from mar.generate import masked, maskgit
from mar.heads import DiffusionHeadSpec, HeadSpec

MAR_B_HEAD = DiffusionHeadSpec(depth=6, width=1024)  # the published MAR-B Diffusion Loss head


def init_transformer(module: nn.Module, normal: list[torch.Tensor], generator: torch.Generator | None) -> None:
    """The reference's initialisation, in its order of draws: N(0, 0.02) for the tensors ``normal`` (then for a
    code embedding table ``module.z_proj``, discrete tokens only: no draw otherwise), then xavier-uniform for
    every Linear (zero bias) and unit LayerNorms, in module order."""
    if isinstance(getattr(module, "z_proj", None), nn.Embedding):
        normal = [*normal, module.z_proj.weight]
    for p in normal:
        nn.init.normal_(p, std=0.02, generator=generator)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TokenGenerator(nn.Module):
    """What every generator of the family shares: the token sequence layout (``patchify`` / ``unpatchify``),
    the class vectors (``class_emb``, ``fake_latent``) and the head registered under its spec's name.

    A subclass sets ``seq_h``, ``seq_w``, ``seq_len``, ``patch_size``, ``token_channels``, ``num_classes``,
    ``class_emb``, ``fake_latent`` and ``_head_name``, and implements ``forward`` (the training loss) and
    ``sample_tokens``.
    """

    @property
    def head(self) -> nn.Module:
        """The per-token head (``mar.heads.Head``), registered under its spec's ``module_name``."""
        return self._modules[self._head_name]

    @property
    def diffusion_batch_mul(self) -> int:
        """Rows per token in the training loss: the Diffusion Loss head's ``batch_mul`` (1 for other heads)."""
        return getattr(self.head, "batch_mul", 1)

    def _register_head(self, head, token_dim: int, z_channels: int, generator) -> None:
        if hasattr(type(self), head.module_name):
            raise ValueError(f"a head cannot be registered as {head.module_name!r}: the generator has an attribute of "
                             "that name; give its spec another module_name")
        self._head_name = head.module_name
        self.add_module(head.module_name, head.build(token_dim, z_channels, generator))

    def _set_sequence(self, img_size: int, vae_stride: int, patch_size: int, token_channels: int, head) -> None:
        """Check the sizes and set the sequence layout: seq_h = seq_w = img_size / (vae_stride * patch_size),
        seq_len = L, token_embed_dim = C (token_channels * patch_size**2)."""
        if img_size % (vae_stride * patch_size) != 0:
            raise ValueError(
                f"img_size {img_size} is not divisible by vae_stride*patch_size = {vae_stride * patch_size}: "
                "choose an image size that is a multiple of it"
            )
        if getattr(head, "kind", "continuous") == "discrete" and patch_size != 1:
            raise ValueError(f"discrete tokens (code indices) need patch_size 1, got {patch_size}")
        self.img_size, self.vae_stride, self.patch_size = img_size, vae_stride, patch_size
        self.token_channels = token_channels
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = token_channels * patch_size**2  # C

    def train_class_embedding(self, labels: torch.Tensor, generator, device) -> torch.Tensor:
        """class_emb(labels) (B, D), each row replaced by the fake "no class" latent with probability
        ``label_drop_prob`` while training (one uniform per row from ``generator``: CFG's unconditional rows)."""
        class_embedding = self.class_emb(labels)
        if self.training and self.label_drop_prob > 0:
            drop = orders.rand((labels.shape[0],), generator, device) < self.label_drop_prob
            class_embedding = torch.where(drop.unsqueeze(-1), self.fake_latent.to(class_embedding.dtype), class_embedding)
        return class_embedding

    # ---------------------------------------------------------------- tokens <-> sequences
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c, H, W) -> (B, L, c*p*p): row-major over positions, channel-major inside a token.
        Discrete tokens (code indices) (B, h, w) -> (B, L), row-major (patch_size 1)."""
        if x.dim() == 3:
            return x.flatten(1)
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwcpq", x)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, c*p*p) -> (B, c, H, W); the inverse of :meth:`patchify` (codes (B, L) -> (B, h, w))."""
        if x.dim() == 2:
            return x.reshape(x.shape[0], self.seq_h, self.seq_w)
        b, p, h, w = x.shape[0], self.patch_size, self.seq_h, self.seq_w
        x = x.reshape(b, h, w, self.token_channels, p, p)
        x = torch.einsum("nhwcpq->nchpwq", x)
        return x.reshape(b, self.token_channels, h * p, w * p)

    def check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"class labels must be in [0, {self.num_classes - 1}], got "
                             f"min {int(labels.min())}, max {int(labels.max())}")

    def embed_labels(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """The class vectors of the buffer: class_emb(labels) (B, D), or the fake "no class" latent for None."""
        if labels is None:
            return self.fake_latent.expand(batch_size, -1)
        if labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
        self.check_labels(labels)
        return self.class_emb(labels.to(self.fake_latent.device))


class MAR(TokenGenerator):
    def __init__(
        self,
        img_size: int = 256,
        vae_stride: int = 16,
        patch_size: int = 1,
        token_channels: int = 16,
        encoder_embed_dim: int = 768,
        encoder_depth: int = 12,
        encoder_num_heads: int = 12,
        decoder_embed_dim: int = 768,
        decoder_depth: int = 12,
        decoder_num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        buffer_size: int = 64,
        label_drop_prob: float = 0.1,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        mask_ratio_min: float = 0.7,
        mask_ratio_schedule: str = "truncnorm",
        head: HeadSpec = MAR_B_HEAD,
        grad_checkpointing: bool = False,
        generator: torch.Generator | None = None,
    ):
        """Sizes as in the reference (defaults: MAR-B at 256 px on KL-16 tokens); ``head`` is the per-token
        head's spec (``mar.heads``; default the MAR-B Diffusion Loss); ``generator`` seeds the initialisation.
        ``mask_ratio_schedule``: the training mask ratio, ``truncnorm`` (MAR, the reference) or ``cosine``
        (MaskGIT's r = cos(pi/2 u)); see ``mar.schedules.MASK_RATIO_SCHEDULES``."""
        super().__init__()
        self._set_sequence(img_size, vae_stride, patch_size, token_channels, head)
        if not 0.0 < mask_ratio_min <= 1.0:
            raise ValueError(f"mask_ratio_min must be in (0, 1], got {mask_ratio_min}")
        if mask_ratio_schedule not in schedules.MASK_RATIO_SCHEDULES:
            raise ValueError(f"unknown mask_ratio_schedule {mask_ratio_schedule!r}: use one of "
                             f"{', '.join(schedules.MASK_RATIO_SCHEDULES)}")
        self.mask_ratio_schedule = mask_ratio_schedule
        self.num_classes, self.buffer_size = num_classes, buffer_size
        self.label_drop_prob, self.mask_ratio_min = label_drop_prob, mask_ratio_min
        self.grad_checkpointing = grad_checkpointing
        norm = partial(nn.LayerNorm, eps=1e-6)
        block = partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm,
                        proj_drop=proj_dropout, attn_drop=attn_dropout)

        # Encoder.
        self.class_emb = nn.Embedding(num_classes, encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))  # the "no class" embedding
        self.z_proj = head.input_embedding(self.token_embed_dim, encoder_embed_dim)  # tokens -> D
        self.z_proj_ln = norm(encoder_embed_dim)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList([block(encoder_embed_dim, encoder_num_heads) for _ in range(encoder_depth)])
        self.encoder_norm = norm(encoder_embed_dim)

        # Decoder.
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth)])
        self.decoder_norm = norm(decoder_embed_dim)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))
        self.initialize_weights(generator)

        # The head (initialised by itself, after the transformer, as in the reference).
        self._register_head(head, self.token_embed_dim, decoder_embed_dim, generator)

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, 0.02) embeddings and tokens; xavier-uniform Linears with zero bias; unit LayerNorms."""
        init_transformer(self, [self.class_emb.weight, self.fake_latent, self.mask_token,
                                self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                                self.diffusion_pos_embed_learned], generator)

    # ---------------------------------------------------------------- encoder / decoder
    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_mae_encoder(self, x: torch.Tensor, visible: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) tokens, visible (B, L-m) sorted positions, class_embedding (B, D) -> (B, P+L-m, D)."""
        x = self.z_proj(x)  # (B, L, D)
        b, _, d = x.shape
        buffer = class_embedding.unsqueeze(1).expand(b, self.buffer_size, d).to(x.dtype)
        x = torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned  # (B, P+L, D)
        x = self.z_proj_ln(x)
        keep = torch.cat([torch.arange(self.buffer_size, device=x.device).expand(b, -1), visible + self.buffer_size], 1)
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, d))  # drop masked positions
        return self.encoder_norm(self._blocks(self.encoder_blocks, x))

    def forward_mae_decoder(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """x (B, P+L-m, D) encoded, visible (B, L-m) -> z (B, L, D'), one condition per token."""
        x = self.decoder_embed(x)
        b, _, d = x.shape
        keep = torch.cat([torch.arange(self.buffer_size, device=x.device).expand(b, -1), visible + self.buffer_size], 1)
        full = self.mask_token.to(x.dtype).expand(b, self.seq_len + self.buffer_size, d)
        x = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), x)  # masked positions hold mask_token
        x = self.decoder_norm(self._blocks(self.decoder_blocks, x + self.decoder_pos_embed_learned))
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    def conditions(self, x: torch.Tensor, visible: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        """z (B, L, D') for tokens x (B, L, C) of which the sorted positions ``visible`` (B, V) are seen."""
        return self.forward_mae_decoder(self.forward_mae_encoder(x, visible, class_embedding), visible)

    # ---------------------------------------------------------------- training
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The head's loss on a batch: tokens (B, c, h, w) scaled latents, labels (B,) -> scalar loss."""
        self.check_labels(labels)
        x = self.patchify(tokens)  # (B, L, C)
        b = x.shape[0]
        class_embedding = self.train_class_embedding(labels, generator, x.device)
        order = orders.random_orders(b, self.seq_len, generator, x.device)
        if self.mask_ratio_schedule == "truncnorm":
            ratio = schedules.sample_mask_ratio(generator, self.mask_ratio_min)
        else:
            ratio = schedules.sample_mask_ratio_cosine(generator)
        m = schedules.num_masked_tokens(self.seq_len, ratio)
        _, visible = schedules.split_by_order(order, m)
        z = self.conditions(x, visible, class_embedding)  # (B, L, D')
        mask = schedules.mask_from_orders(order, m).to(x.dtype)  # (B, L), 1 = masked = in the loss
        target = x.detach().reshape(b * self.seq_len, *x.shape[2:])
        return self.head.loss(target, z.reshape(b * self.seq_len, -1), mask.reshape(-1), generator=generator)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def sample_tokens(
        self,
        batch_size: int,
        num_iter: int = 64,
        cfg: float = 1.0,
        cfg_schedule: str = "linear",
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        progress: bool = False,
        *,
        options=None,
        sampler: str = "ddpm",
        eta: float = 0.0,
        diffusion_steps_schedule: tuple[int, int] | None = None,
        diffusion_steps_shape: str = "linear",
        autocast_dtype: torch.dtype | None = None,
        clip_denoised: float | None = None,
        feature_cache: str = "off",
        cache_refresh: int = 2,
        distilled_steps: int | None = None,
        row_bucket: int | None = None,
    ) -> torch.Tensor:
        """Generate (B, c, h, w) tokens: ``mar.generate.masked`` with this model, unpatchified.

        ``generator``: one generator for the batch, or a list of B generators (one per sample), in which case
        sample b depends only on its own generator, whatever the batch around it. ``labels`` None generates
        unconditionally (the fake class vector).

        The sampler settings are ``options`` (a ``mar.config.SamplingOptions``), or the same settings as
        keywords (``autocast_dtype`` for its ``precision``); the defaults are the reference algorithm. Opt-in:
        ``sampler="ddim"`` with ``eta``, ``diffusion_steps_schedule=(first, last)`` annealed over the iterations
        (``diffusion_steps_shape``), ``autocast_dtype`` bf16 / fp16, the guard ``clip_denoised`` r, the feature
        cache across steps (``feature_cache`` cfg / tokens / both, a full forward every ``cache_refresh`` steps;
        ``mar.feature_cache``), the distilled head in ``distilled_steps`` steps, and ``row_bucket`` (the head's rows
        padded to a multiple of it: static shapes for CUDA graphs).
        """
        keywords = dict(sampler=sampler, eta=eta, diffusion_steps_schedule=diffusion_steps_schedule,
                        diffusion_steps_shape=diffusion_steps_shape, precision=precision_of(autocast_dtype),
                        clip_denoised=clip_denoised, feature_cache=feature_cache, cache_refresh=cache_refresh,
                        distilled_steps=distilled_steps, row_bucket=row_bucket)
        if options is None:
            options = SamplingOptions(**keywords)
        elif SamplingOptions(**keywords) != SamplingOptions():
            raise ValueError("pass the sampler settings either as options or as keywords, not both")
        tokens = masked(self, batch_size, labels=labels, num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule,
                        temperature=temperature, generator=generator, options=options, progress=progress)
        return self.unpatchify(tokens)

    def generate(self, batch_size: int, **kwargs) -> torch.Tensor:
        """Token sequences (B, L, C) by ``mar.generate.masked`` with this model: that loop's keywords (labels,
        num_iter, cfg, cfg_schedule, temperature, generator, options, progress, and known_tokens / known_mask
        to edit). Every generator has ``generate``; the pipeline and editing call it."""
        return masked(self, batch_size, **kwargs)


class MaskGIT(MAR):
    """MaskGIT (Chang et al. 2022) on this project's parts: the MAR encoder/decoder over discrete codes with a
    categorical head, trained with MaskGIT's cosine mask ratio (Sec. 3.2), generated by confidence
    (``mar.generate.maskgit``: every masked token is sampled at each step and the most confident are kept).

    The network is MAR's MAE-style encoder/decoder (the encoder sees the visible tokens only, the decoder fills
    [MASK]), not MaskGIT's single BERT over [MASK] inputs: the comparison with MAR isolates the training mask
    ratio and the sampling rule. The state dict is MAR's.
    """

    def __init__(self, *args, mask_ratio_schedule: str = "cosine", **kwargs):
        super().__init__(*args, mask_ratio_schedule=mask_ratio_schedule, **kwargs)

    @torch.no_grad()
    def sample_tokens(self, batch_size: int, num_iter: int = 8, cfg: float = 1.0, cfg_schedule: str = "linear",
                      labels: torch.Tensor | None = None, temperature: float = 1.0, generator=None,
                      progress: bool = False, *, options=None, **keywords) -> torch.Tensor:
        """(B, h, w) codes by ``mar.generate.maskgit`` (``options.choice_temperature`` is its pick noise)."""
        if keywords:
            raise ValueError(f"MaskGIT takes its sampler settings as options, not {sorted(keywords)}")
        tokens = self.generate(batch_size, labels=labels, num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule,
                               temperature=temperature, generator=generator, options=options, progress=progress)
        return self.unpatchify(tokens)

    def generate(self, batch_size: int, **kwargs) -> torch.Tensor:
        """Token sequences (B, L) by ``mar.generate.maskgit`` (its keywords; known_tokens / known_mask edit)."""
        return maskgit(self, batch_size, **kwargs)


def compile_for_sampling(model: MAR, head_kwargs: dict | None = None, **compile_kwargs) -> MAR:
    """Opt-in speed-up: ``torch.compile`` every transformer block and the head's MLP, in place.

    Uses ``nn.Module.compile``, so parameter names and ``state_dict`` keys do not change. The first
    generation pays the compilation (about 46 s on one CPU core for the fmnist model: the encoder sees a
    new sequence length at every MAR step and the head a new row count, so shapes are marked dynamic
    unless ``compile_kwargs`` says otherwise). Results agree with eager to float rounding, not bit for bit.
    On CPU it brought no speed-up (benchmarks/README.md); it is meant for GPUs. Returns ``model``.

    ``head_kwargs`` replaces ``compile_kwargs`` for the head's MLP (and an attached distilled head's student):
    with the ``row_bucket`` sampling option the head sees only a few row counts, so
    ``head_kwargs={"mode": "reduce-overhead", "dynamic": False}`` captures one CUDA graph per count.
    """
    compile_kwargs.setdefault("dynamic", True)
    for block in (*model.encoder_blocks, *model.decoder_blocks):
        block.compile(**compile_kwargs)
    head_kwargs = compile_kwargs if head_kwargs is None else head_kwargs
    model.head.net.compile(**head_kwargs)
    distilled = getattr(model.head, "distilled_head", None)
    if distilled is not None:
        distilled.student.net.compile(**head_kwargs)
    return model
