"""The MAR transformer: a bidirectional MAE-style encoder/decoder over continuous tokens.

Glossary: B batch, L tokens per image (seq_len), P buffer positions (buffer_size, 64), D width,
C token channels (latent channels * patch_size**2), m masked tokens, K generation steps.

Training (``forward``): tokens -> random order per sample -> the first m = ceil(L*r) positions of
the order are masked -> the encoder sees [class buffer; visible tokens] -> the decoder fills the
masked positions with ``mask_token`` -> one condition z per token -> Diffusion Loss on masked tokens.
Generation (``sample_tokens``): all L tokens start masked and are unmasked over a cosine schedule.

Masks are kept as positions (``orders`` and a count m) rather than boolean tensors: the visible and
masked positions are slices of the order, so neither training nor generation needs ``nonzero()``
or any other host round trip.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from diffloss import DiffLoss
from diffloss.diffusion import annealed_step_counts
from diffloss.loss import NUM_TRAIN_TIMESTEPS, autocast_region, check_sampling_options
from mar import orders, schedules


class MAR(nn.Module):
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
        diffloss_depth: int = 6,
        diffloss_width: int = 1024,
        num_sampling_steps: str | int = "100",
        diffusion_batch_mul: int = 4,
        grad_checkpointing: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if img_size % (vae_stride * patch_size) != 0:
            raise ValueError(
                f"img_size {img_size} is not divisible by vae_stride*patch_size = {vae_stride * patch_size}: "
                "choose an image size that is a multiple of it"
            )
        if not 0.0 < mask_ratio_min <= 1.0:
            raise ValueError(f"mask_ratio_min must be in (0, 1], got {mask_ratio_min}")
        self.img_size, self.vae_stride, self.patch_size = img_size, vae_stride, patch_size
        self.token_channels = token_channels
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = token_channels * patch_size**2  # C
        self.num_classes, self.buffer_size = num_classes, buffer_size
        self.label_drop_prob, self.mask_ratio_min = label_drop_prob, mask_ratio_min
        self.diffusion_batch_mul = diffusion_batch_mul
        self.grad_checkpointing = grad_checkpointing
        norm = partial(nn.LayerNorm, eps=1e-6)
        block = partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm,
                        proj_drop=proj_dropout, attn_drop=attn_dropout)

        # Encoder.
        self.class_emb = nn.Embedding(num_classes, encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))  # the "no class" embedding
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim)
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

        # Diffusion Loss (initialised by itself, after the transformer, as in the reference).
        self.diffloss = DiffLoss(
            target_channels=self.token_embed_dim, z_channels=decoder_embed_dim, depth=diffloss_depth,
            width=diffloss_width, num_sampling_steps=num_sampling_steps, grad_checkpointing=grad_checkpointing,
            generator=generator,
        )

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, 0.02) embeddings and tokens; xavier-uniform Linears with zero bias; unit LayerNorms."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02, generator=generator)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- tokens <-> sequences
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c, H, W) -> (B, L, c*p*p): row-major over positions, channel-major inside a token."""
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwcpq", x)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, c*p*p) -> (B, c, H, W); the inverse of :meth:`patchify`."""
        b, p, h, w = x.shape[0], self.patch_size, self.seq_h, self.seq_w
        x = x.reshape(b, h, w, self.token_channels, p, p)
        x = torch.einsum("nhwcpq->nchpwq", x)
        return x.reshape(b, self.token_channels, h * p, w * p)

    def check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"class labels must be in [0, {self.num_classes - 1}], got "
                             f"min {int(labels.min())}, max {int(labels.max())}")

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

    # ---------------------------------------------------------------- training
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion Loss of a batch: tokens (B, c, h, w) scaled latents, labels (B,) -> scalar loss."""
        self.check_labels(labels)
        x = self.patchify(tokens)  # (B, L, C)
        b = x.shape[0]
        class_embedding = self.class_emb(labels)
        if self.training and self.label_drop_prob > 0:
            drop = orders.rand((b,), generator, x.device) < self.label_drop_prob
            class_embedding = torch.where(drop.unsqueeze(-1), self.fake_latent.to(class_embedding.dtype), class_embedding)
        order = orders.random_orders(b, self.seq_len, generator, x.device)
        ratio = schedules.sample_mask_ratio(generator, self.mask_ratio_min)
        m = schedules.num_masked_tokens(self.seq_len, ratio)
        _, visible = schedules.split_by_order(order, m)
        z = self.forward_mae_decoder(self.forward_mae_encoder(x, visible, class_embedding), visible)
        mask = schedules.mask_from_orders(order, m).to(x.dtype)  # (B, L), 1 = masked = in the loss
        n = self.diffusion_batch_mul
        target = x.detach().reshape(b * self.seq_len, -1).repeat(n, 1)
        return self.diffloss(target, z.reshape(b * self.seq_len, -1).repeat(n, 1), mask.reshape(-1).repeat(n),
                             generator=generator)

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
        sampler: str = "ddpm",
        eta: float = 0.0,
        diffusion_steps_schedule: tuple[int, int] | None = None,
        diffusion_steps_shape: str = "linear",
        autocast_dtype: torch.dtype | None = None,
        clip_denoised: float | None = None,
    ) -> torch.Tensor:
        """Generate (B, c, h, w) tokens (SPEC 4).

        ``generator``: one generator for the batch, or a list of B generators (one per sample), in
        which case sample b depends only on its own generator, whatever the batch around it.
        ``labels`` None generates unconditionally (the fake class vector).

        Fast path, opt-in (the defaults run the reference algorithm, unchanged):
        ``sampler="ddim"`` with ``eta`` in [0, 1] for the head (0 = deterministic); ``diffusion_steps_schedule``
        = (start, end) diffusion steps for the first and the last MAR iteration, interpolated over the
        iterations by ``diffusion_steps_shape`` ("linear" or "cosine", see ``annealed_step_counts``; None =
        the model's fixed ``num_sampling_steps``); ``autocast_dtype`` (torch.bfloat16 / torch.float16) runs the
        transformer and the head under autocast, tokens and diffusion arithmetic staying in the model dtype.

        Guard, opt-in (either path): ``clip_denoised`` r clamps the head's predicted x0 to [-r, r] at every
        diffusion step (``DiffLoss.sample``). It keeps an under-trained head stable: on the cosine schedule the
        first respaced step multiplies the eps error by sqrt(abar_989 / abar_999) ~ 350. None = the reference.
        """
        device, dtype = self.fake_latent.device, self.fake_latent.dtype
        b, L, C = batch_size, self.seq_len, self.token_embed_dim
        per_sample = isinstance(generator, (list, tuple))
        check_sampling_options(sampler, eta, autocast_dtype, clip_denoised)
        step_counts = self._diffusion_step_counts(diffusion_steps_schedule, diffusion_steps_shape, num_iter)
        fast = sampler != "ddpm" or step_counts is not None or autocast_dtype is not None
        if labels is not None:
            if labels.shape != (b,):
                raise ValueError(f"labels must have shape ({b},), got {tuple(labels.shape)}")
            self.check_labels(labels)
            class_embedding = self.class_emb(labels.to(device))
        else:
            class_embedding = self.fake_latent.expand(b, -1)
        use_cfg = cfg != 1.0
        if use_cfg:  # one batched forward for [cond; uncond]
            class_embedding = torch.cat([class_embedding, self.fake_latent.expand(b, -1)])
        masked_after = schedules.generation_schedule(L, num_iter)
        scales = schedules.cfg_scales(cfg, cfg_schedule, L, masked_after)
        order = orders.random_orders(b, L, generator, device)
        tokens = torch.zeros(b, L, C, device=device, dtype=dtype)
        masked_now = L
        with autocast_region(self, device.type, autocast_dtype):  # no-op on the exact path; casts weights once
            for k in tqdm(range(num_iter), disable=not progress, desc="MAR steps", leave=False):
                m_next = masked_after[k]
                if m_next == masked_now:  # the clamp left nothing to predict at this step
                    continue
                visible = order[:, masked_now:].sort(dim=-1).values
                pred = order[:, m_next:masked_now].sort(dim=-1).values  # (B, n) positions predicted now
                x, vis, pos = tokens, visible, pred
                if use_cfg:
                    x, vis, pos = torch.cat([x, x]), torch.cat([vis, vis]), torch.cat([pred, pred])
                z = self.forward_mae_decoder(self.forward_mae_encoder(x, vis, class_embedding), vis)
                z = torch.gather(z, 1, pos.unsqueeze(-1).expand(-1, -1, z.shape[-1]))  # (B or 2B, n, D)
                n = pred.shape[1]
                if not fast:  # the reference path
                    noise = self._step_noise(generator, b, n, use_cfg, device, dtype) if per_sample else None
                    new = self.diffloss.sample(z.reshape(-1, z.shape[-1]), temperature=temperature, cfg=scales[k],
                                               generator=None if per_sample else generator, noise=noise,
                                               clip_denoised=clip_denoised)
                else:
                    steps = step_counts[k] if step_counts is not None else None
                    drawn = 0 if sampler == "ddim" and eta == 0.0 else steps  # deterministic DDIM draws x_T only
                    noise = self._step_noise(generator, b, n, use_cfg, device, dtype, drawn) if per_sample else None
                    new = self.diffloss.sample(z.reshape(-1, z.shape[-1]).to(dtype), temperature=temperature,
                                               cfg=scales[k], generator=None if per_sample else generator,
                                               noise=noise, sampler=sampler, eta=eta, num_steps=steps,
                                               autocast_dtype=autocast_dtype, clip_denoised=clip_denoised)
                tokens = tokens.scatter(1, pred.unsqueeze(-1).expand(-1, -1, C), new.reshape(b, n, C).to(dtype))
                masked_now = m_next
        return self.unpatchify(tokens)

    @staticmethod
    def _diffusion_step_counts(schedule: tuple[int, int] | None, shape: str, num_iter: int) -> list[int] | None:
        """Diffusion steps per MAR iteration for the annealed fast path; None = the fixed num_sampling_steps."""
        if schedule is None:
            return None
        if not (isinstance(schedule, (tuple, list)) and len(schedule) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= NUM_TRAIN_TIMESTEPS
                        for v in schedule)):
            raise ValueError(f"diffusion_steps_schedule must be (start, end), two ints in [2, {NUM_TRAIN_TIMESTEPS}] "
                             f"(e.g. (100, 25)), or None, got {schedule!r}")
        return annealed_step_counts(schedule[0], schedule[1], num_iter, shape)

    def _step_noise(self, generators, b: int, n: int, use_cfg: bool, device, dtype, steps: int | None = None):
        """All diffusion noise of one generation step, drawn sample by sample from its own generator.

        Returns (x_T (B*n, C), per-step noise (S, rows, C)) in the row layout of ``DiffLoss.sample``:
        with CFG, x_T is shared by the two halves and the rows are [cond (B*n); uncond (B*n)].
        ``steps`` S defaults to ``num_sampling_steps``; S = 0 (deterministic DDIM) returns (x_T, None).
        """
        steps = self.diffloss.num_sampling_steps if steps is None else steps
        C = self.token_embed_dim
        halves = 2 if use_cfg else 1
        draws = [orders.randn((1 + steps * halves, n, C), g, device, dtype) for g in generators]
        x_t = torch.cat([d[0] for d in draws])  # (B*n, C)
        if steps == 0:
            return x_t, None
        per_step = torch.stack([d[1:].reshape(steps, halves, n, C) for d in draws], dim=2)  # (S, halves, B, n, C)
        return x_t, per_step.reshape(steps, halves * b * n, C)


def compile_for_sampling(model: MAR, **compile_kwargs) -> MAR:
    """Opt-in speed-up: ``torch.compile`` every transformer block and the Diffusion-Loss MLP, in place.

    Uses ``nn.Module.compile``, so parameter names and ``state_dict`` keys do not change. The first
    generation pays the compilation (about 46 s on one CPU core for the fmnist model: the encoder sees a
    new sequence length at every MAR step and the head a new row count, so shapes are marked dynamic
    unless ``compile_kwargs`` says otherwise). Results agree with eager to float rounding, not bit for bit.
    On CPU it brought no speed-up (benchmarks/README.md); it is meant for GPUs. Returns ``model``.
    """
    compile_kwargs.setdefault("dynamic", True)
    for block in (*model.encoder_blocks, *model.decoder_blocks):
        block.compile(**compile_kwargs)
    model.diffloss.net.compile(**compile_kwargs)
    return model
