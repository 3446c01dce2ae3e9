"""VAR, next-scale prediction: a block-causal transformer over a pyramid of code maps (Tian et al. 2024,
arXiv 2404.02905, "Visual Autoregressive Modeling").

Glossary
    B   batch                       S   scales (len(patch_nums)); k = 0..S-1 a scale, coarse to fine
    pn  side of scale k's code map (patch_nums[k]); scale k holds pn_k^2 tokens, row-major
    L   tokens of all scales, sum_k pn_k^2 (680 at 256 px); first_l = pn_0^2 (the class token(s))
    C   width (64 * depth in the presets); H heads of C / H channels
    Cz  code vector channels of the quantizer (``token_dim``, 32 for the published VQVAE)
    V   codebook size (``vocab_size``)
    c   the condition of a row: class_emb(label), row ``num_classes`` = "no class" (classifier-free guidance)

Inputs (Sec. 3.2: p(r_0 .. r_{S-1}) = prod_k p(r_k | r_{<k}), every scale conditioned on the class):
    x_0 = c + pos_start;  x_k = word_embed(area-resize(f_hat_{<k}, pn_k)) for k >= 1 (the quantizer's
    ``teacher_inputs``); every token adds lvl_embed(k) + pos_1LC. Output token i predicts code i of
    cat(r_0 .. r_{S-1}).
Mask (Sec. 3.2 "block-wise causal attention mask"): token i attends to token j iff scale(j) <= scale(i).
Block (AdaLN, as DiT): (g1, g2, s1, s2, b1, b2) = Linear(SiLU(c)); x += g1 Attn(LN(x)(1 + s1) + b1);
    x += g2 FFN(LN(x)(1 + s2) + b2). Attention on l2-normalised q and k, q scaled by exp(min(s_h, ln 100)).
Head: logits = head(LN(h)(1 + scale) + shift), (scale, shift) = Linear(SiLU(c)) (``head_nm`` + ``head``).

The trunk (``NextScaleTrunk``) ends at ``hidden``: the hidden states before the head's norm, which a head
other than the categorical one reads (HART's residual Diffusion Loss on the last scale's states, a
continuous next-scale model's per-token Diffusion Loss). ``VAR`` adds the categorical head. Sampling uses
the KV-cache step API (``start_cache`` / ``first_input`` / ``scale_input`` / ``step``); the loop itself is
``mar.generate_scales.next_scale``. Parameter and buffer names are the reference's, so the published
``var_d*.pth`` load strictly. Differences from the reference: the class label is dropped only in training mode
and from an explicit generator (the reference draws from the global RNG in eval mode too); every draw of the
initialisation comes from one generator (the reference no-ops ``reset_parameters`` of Linear / LayerNorm
process-wide; here the layers are built on the meta device and initialised explicitly, in the reference's
order of draws, so the same seed gives the same weights).
"""
from __future__ import annotations

import inspect
import math
import numbers
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mar.next_scale_generator import NextScaleGenerator
from mar.orders import rand

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 256 px, L = 680
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # 512 px, L = 2240
_LN_100 = float(torch.tensor(100.0).log())  # the attention temperature's clamp, ln 100 in float32 as the reference


def _drop_path(x: Tensor, p: float, training: bool, generator) -> Tensor:
    """Stochastic depth: each row's branch is kept with prob 1 - p and then scaled by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = (rand((x.shape[0],), generator, x.device) >= p).to(x.dtype).div_(1.0 - p)
    return x * keep.view(-1, *([1] * (x.dim() - 1)))


class SelfAttention(nn.Module):
    """Multi-head attention, qkv without a k bias (``zero_k_bias`` buffer); optionally l2-normalised q, k."""

    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_l2_norm = num_heads, dim // num_heads, attn_l2_norm
        if attn_l2_norm:  # cosine attention with a learnt per-head temperature, clamped at 100
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.empty(1, num_heads, 1, 1))
            self.max_scale_mul = _LN_100
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.empty(dim)), nn.Parameter(torch.empty(dim))
        self.register_buffer("zero_k_bias", torch.empty(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_bias: Tensor | None, cache: dict | None = None) -> Tensor:
        """x (B, n, C) -> (B, n, C). ``attn_bias`` (1, 1, n, n) additive mask, or None (no mask). ``cache`` holds
        the (normalised) keys and values (B, H, T, C/H) of earlier scales; x's are appended to it in place."""
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # (B, H, n, C/H) each
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNSelfAttn(nn.Module):
    """One transformer block with adaptive LayerNorm from the condition (own ``ada_lin``, or the shared one
    plus a per-block ``ada_gss`` offset when ``shared_aln``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, norm_eps: float,
                 shared_aln: bool, attn_l2_norm: bool):
        super().__init__()
        self.dim, self.drop_path, self.shared_aln = dim, drop_path, shared_aln
        self.attn = SelfAttention(dim, num_heads, attn_l2_norm)
        self.ffn = FFN(dim, round(dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.empty(1, 1, 6, dim))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, cond: Tensor, attn_bias: Tensor | None, cache: dict | None = None,
                generator=None) -> Tensor:
        """x (B, n, C); cond (B, C), or the shared modulation (B, 1, 6, C) when ``shared_aln``. Drop path only in
        training mode without a KV cache (the cache is for sampling)."""
        mod = (self.ada_gss + cond) if self.shared_aln else self.ada_lin(cond).view(-1, 1, 6, self.dim)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)  # (B, 1, C) each
        p = self.drop_path if cache is None else 0.0
        h = self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias, cache).mul_(gamma1)
        x = x + _drop_path(h, p, self.training, generator)
        h = self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2)
        return x + _drop_path(h, p, self.training, generator)


class AdaLNBeforeHead(nn.Module):
    """LN(h)(1 + scale) + shift with (scale, shift) = Linear(SiLU(c)): the head's input."""

    def __init__(self, dim: int, norm_eps: float):
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return self.ln_wo_grad(h).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    """The shared AdaLN projection: (B, C) -> (B, 1, 6, C)."""

    def forward(self, cond: Tensor) -> Tensor:
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


def _check_int(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _materialise(module: nn.Module, device) -> None:
    """Uninitialised storage on ``device`` for every parameter and buffer of a module built on meta (no draws)."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device))
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


def _trunc_normal(t: Tensor, std: float, generator) -> None:
    """t <- trunc_normal(0, std, [-2, 2]) drawn on the generator's device (nn.init's bounds are absolute)."""
    tmp = torch.empty(t.shape, dtype=t.dtype, device=generator.device if generator is not None else "cpu")
    t.copy_(nn.init.trunc_normal_(tmp, std=std, generator=generator))


def _init_std(width: int, init_std: float) -> float:
    return (1 / width / 3) ** 0.5 if init_std < 0 else init_std  # < 0: "automated", sqrt(1 / (3 C))


def _init_linear(m: nn.Module, std: float, generator) -> None:
    """trunc_normal weight, zero bias (a Linear or an Embedding)."""
    _trunc_normal(m.weight, std, generator)
    if getattr(m, "bias", None) is not None:
        m.bias.zero_()


class NextScaleTrunk(NextScaleGenerator, nn.Module):
    """Everything of VAR but the categorical head: embeddings, block-causal blocks, KV-cache steps.

    Sizes only; no tokenizer (the sampler receives the quantizer). ``device="meta"`` builds the shapes only
    (no storage, no initialisation: parameter counts, manifests). Otherwise the weights are drawn from
    ``generator`` (None: torch's default generator) by ``init_weights`` with the ``init_*`` settings.
    """

    def __init__(self, *, depth: int = 16, embed_dim: int = 1024, num_heads: int = 16, vocab_size: int = 4096,
                 token_dim: int = 32, num_classes: int = 1000, patch_nums=PATCH_NUMS_256, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 attn_l2_norm: bool = True, cond_drop_rate: float = 0.1, init_std: float = -1.0,
                 init_head: float = 0.02, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5,
                 generator: torch.Generator | None = None, device=None):
        super().__init__()
        for name, value in (("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads),
                            ("vocab_size", vocab_size), ("token_dim", token_dim), ("num_classes", num_classes)):
            _check_int(name, value)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}: pick heads that "
                             "divide it")
        patch_nums = tuple(patch_nums)
        if len(patch_nums) < 2 or any(isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1
                                      for p in patch_nums) or list(patch_nums) != sorted(set(patch_nums)):
            raise ValueError(f"patch_nums must be >= 2 increasing ints >= 1 (scale sides, coarse to fine), got "
                             f"{patch_nums}")
        if not 0.0 <= cond_drop_rate < 1.0 or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"cond_drop_rate and drop_path_rate must be in [0, 1), got {cond_drop_rate}, "
                             f"{drop_path_rate}")
        self.depth, self.embed_dim, self.num_heads, self.vocab_size = depth, embed_dim, num_heads, vocab_size
        self.token_dim, self.num_classes, self.patch_nums = token_dim, num_classes, patch_nums
        self.cond_drop_rate, self.shared_aln = cond_drop_rate, shared_aln
        self.init_settings = dict(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head,
                                  init_std=init_std)
        ends = [0]
        for pn in patch_nums:
            ends.append(ends[-1] + pn * pn)
        self.begin_ends = list(zip(ends[:-1], ends[1:]))  # scale k's tokens are [begin, end)
        self.L, self.first_l = ends[-1], patch_nums[0] ** 2
        with torch.device("meta"):
            self._build(mlp_ratio, drop_path_rate, norm_eps, attn_l2_norm)
        if torch.device(device if device is not None else "cpu").type != "meta":
            _materialise(self, device)
            self.reset_buffers()
            self.init_weights(generator, **self.init_settings)

    def _build(self, mlp_ratio: float, drop_path_rate: float, norm_eps: float, attn_l2_norm: bool) -> None:
        c, d = self.embed_dim, self.depth
        self.word_embed = nn.Linear(self.token_dim, c)
        self.class_emb = nn.Embedding(self.num_classes + 1, c)  # row num_classes: "no class"
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, c))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c)) if self.shared_aln else nn.Identity()
        self.drop_path_rates = [float(r) for r in torch.linspace(0, drop_path_rate, d, device="cpu")]  # per block
        self.blocks = nn.ModuleList([AdaLNSelfAttn(c, self.num_heads, mlp_ratio, r, norm_eps, self.shared_aln,
                                                   attn_l2_norm) for r in self.drop_path_rates])
        self.register_buffer("lvl_1L", torch.empty(1, self.L, dtype=torch.int64))
        self.register_buffer("attn_bias_for_masking", torch.empty(1, 1, self.L, self.L))

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """lvl_1L (1, L): the scale of each token; the block-causal mask (1, 1, L, L): 0 where scale(query) >=
        scale(key), else -inf (Sec. 3.2); the zero k biases."""
        lvl = torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(self.patch_nums)]).view(1, self.L, 1)
        self.lvl_1L.copy_(lvl[:, :, 0])
        self.attn_bias_for_masking.copy_(torch.where(lvl >= lvl.transpose(1, 2), 0.0, -torch.inf).view_as(
            self.attn_bias_for_masking))
        for blk in self.blocks:
            blk.attn.zero_k_bias.zero_()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, init_adaln: float = 0.5,
                     init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1.0) -> None:
        """The reference's initialisation (its constructor, then its ``init_weights``), draws in its order.

        1. class_emb, pos_start, pos_1LC (scale by scale), lvl_embed ~ trunc_normal(std sqrt(1/(3C))); the two
           embeddings first spend one N(0, 1) draw of their shape (nn.Embedding's own init in the reference,
           overwritten there too); per block ada_gss ~ N(0, 1) / sqrt(C) (shared AdaLN only).
        2. trunc_normal(init_std; < 0: sqrt(1/(3C))) for word_embed, class_emb, lvl_embed, then every Linear in
           module order, biases 0 (``VAR`` then draws its head: head_nm's ada_lin, head); per block proj and fc2
           weights / sqrt(2 depth), AdaLN rows of (s1, s2, b1, b2) x init_adaln and of (g1, g2) x
           init_adaln_gamma. q_bias = v_bias = 0, scale_mul = ln 4.
        """
        c, gen_device = self.embed_dim, generator.device if generator is not None else "cpu"
        std0 = math.sqrt(1 / c / 3)
        for emb, params in ((self.class_emb, [self.class_emb.weight, self.pos_start] + [
                self.pos_1LC[:, b:e] for b, e in self.begin_ends]), (self.lvl_embed, [self.lvl_embed.weight])):
            torch.empty(emb.weight.shape, device=gen_device).normal_(generator=generator)
            for t in params:
                _trunc_normal(t, std0, generator)
        for blk in self.blocks if self.shared_aln else ():
            blk.ada_gss.copy_(torch.randn(blk.ada_gss.shape, generator=generator, device=gen_device) / c ** 0.5)
        std = _init_std(c, init_std)
        blocks = [m for blk in self.blocks for m in (blk.attn.mat_qkv, blk.attn.proj, blk.ffn.fc1, blk.ffn.fc2,
                                                    *([] if self.shared_aln else [blk.ada_lin[1]]))]
        shared = [self.shared_ada_lin[1]] if self.shared_aln else []
        for m in [self.word_embed, self.class_emb, self.lvl_embed, *shared, *blocks]:
            _init_linear(m, std, generator)
        for blk in self.blocks:
            blk.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            blk.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            ada = blk.ada_gss[0, 0] if self.shared_aln else blk.ada_lin[1].weight.view(6, c, c)  # g1 g2 s1 s2 b1 b2
            ada[2:].mul_(init_adaln)
            ada[:2].mul_(init_adaln_gamma)
            blk.attn.q_bias.zero_()
            blk.attn.v_bias.zero_()
            if blk.attn.attn_l2_norm:
                blk.attn.scale_mul_1H11.copy_(torch.full_like(blk.attn.scale_mul_1H11, 4.0).log())

    # ---------------------------------------------------------------- conditions and inputs
    def condition(self, labels_or_cond: Tensor, generator=None, drop: bool | None = None) -> Tensor:
        """c (B, C): class_emb of int labels (B,) in [0, num_classes] (num_classes = no class), or a float (B, C)
        condition passed through. ``drop`` (None: in training mode): each label becomes num_classes with prob
        cond_drop_rate, one uniform per row from ``generator`` (classifier-free guidance training)."""
        x = labels_or_cond
        if isinstance(x, Tensor) and x.is_floating_point():
            if x.dim() != 2 or x.shape[1] != self.embed_dim:
                raise ValueError(f"a float condition must be (B, {self.embed_dim}), got {tuple(x.shape)}")
            return x
        if not isinstance(x, Tensor) or x.dim() != 1 or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"labels must be a (B,) int tensor, got {getattr(x, 'dtype', type(x).__name__)} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}] ({self.num_classes} = no class), got "
                             f"[{int(x.min())}, {int(x.max())}]")
        x = x.to(self.class_emb.weight.device).long()
        if (self.training if drop is None else drop) and self.cond_drop_rate > 0:
            drop = rand((x.shape[0],), generator, x.device) < self.cond_drop_rate
            x = torch.where(drop, self.num_classes, x)
        return self.class_emb(x)

    def lvl_pos(self) -> Tensor:
        """(1, L, C): lvl_embed(scale of each token) + pos_1LC."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def first_input(self, cond: Tensor) -> Tensor:
        """Scale 0's inputs (B, first_l, C): c + pos_start + lvl/pos."""
        b = cond.shape[0]
        return (cond.unsqueeze(1).expand(b, self.first_l, -1) + self.pos_start.expand(b, self.first_l, -1)
                + self.lvl_pos()[:, :self.first_l])

    def scale_input(self, k: int, tokens: Tensor) -> Tensor:
        """Scale k's inputs (B, pn_k^2, C) from its Cz-channel tokens (B, pn_k^2, Cz) (k >= 1)."""
        b, e = self.begin_ends[k]
        return self.word_embed(tokens) + self.lvl_pos()[:, b:e]

    def embed(self, cond: Tensor, x_inputs: Tensor) -> Tensor:
        """Teacher-forced inputs (B, L, C) from c (B, C) and x_inputs (B, L - first_l, Cz)."""
        b = cond.shape[0]
        if not isinstance(x_inputs, Tensor) or tuple(x_inputs.shape) != (b, self.L - self.first_l, self.token_dim):
            raise ValueError(f"x_inputs must be (B, L - first_l, Cz) = ({b}, {self.L - self.first_l}, "
                             f"{self.token_dim}) (the quantizer's teacher_inputs), got "
                             f"{tuple(getattr(x_inputs, 'shape', ()))}")
        sos = cond.unsqueeze(1).expand(b, self.first_l, -1) + self.pos_start.expand(b, self.first_l, -1)
        x = torch.cat((sos, self.word_embed(x_inputs.float())), dim=1)
        return x + (self.lvl_embed(self.lvl_1L.expand(b, -1)) + self.pos_1LC)

    # ---------------------------------------------------------------- trunk
    def hidden(self, labels_or_cond: Tensor, x_inputs: Tensor, generator=None) -> tuple[Tensor, Tensor]:
        """Teacher forcing under the block-causal mask: (hidden (B, L, C) before the head's norm, c (B, C)).

        Draws from ``generator`` (training only): the label drop, then per block the drop-path keeps."""
        with torch.autocast(self.pos_start.device.type, enabled=False):
            cond = self.condition(labels_or_cond, generator)
            x = self.embed(cond, x_inputs)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        mod = self.shared_ada_lin(cond).to(dtype)
        bias = self.attn_bias_for_masking.to(dtype)
        x = x.to(dtype)
        for blk in self.blocks:
            x = blk(x, mod, bias, None, generator)
        return x.float(), cond

    def start_cache(self) -> list[dict]:
        """An empty KV cache, one dict per block, for ``step``."""
        return [{} for _ in self.blocks]

    def step(self, x: Tensor, cond: Tensor, cache: list[dict]) -> Tensor:
        """One scale through the blocks with the KV cache: inputs x (B, n, C) of the next scale, c (B, C) ->
        hidden (B, n, C). The scale attends to every cached scale and to itself, no mask (the block-causal
        mask's rows of that scale), and its keys and values are appended to ``cache``."""
        mod = self.shared_ada_lin(cond)
        for blk, kv in zip(self.blocks, cache):
            x = blk(x, mod, None, kv)
        return x

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups of the reference (train.py): no decay on 1-D tensors, biases, pos_*, lvl_embed, ada_gss
        and scale_mul, nor on a Diffusion Loss head (``diffloss.*``, as MAR's reference); ``weight_decay`` on the rest."""
        no_decay = ("pos_1LC", "pos_start", "lvl_embed", "ada_gss", "scale_mul")
        groups = {True: [], False: []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups[p.ndim == 1 or name.endswith("bias") or any(k in name for k in no_decay)
                       or name.startswith("diffloss.")].append(p)
        return [{"params": groups[False], "weight_decay": weight_decay}, {"params": groups[True], "weight_decay": 0.0}]


class VAR(NextScaleTrunk):
    """The trunk with the categorical head (``head_nm``, ``head``): logits over V codes per token."""

    def _build(self, mlp_ratio: float, drop_path_rate: float, norm_eps: float, attn_l2_norm: bool) -> None:
        super()._build(mlp_ratio, drop_path_rate, norm_eps, attn_l2_norm)
        self.head_nm = AdaLNBeforeHead(self.embed_dim, norm_eps)
        self.head = nn.Linear(self.embed_dim, self.vocab_size)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, init_adaln: float = 0.5,
                     init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1.0) -> None:
        """The trunk's (``NextScaleTrunk.init_weights``), then the head, last in the reference's module order:
        trunc_normal head_nm's ada_lin (x init_adaln) and head (x init_head when >= 0), biases 0."""
        super().init_weights(generator, init_adaln, init_adaln_gamma, init_head, init_std)
        std = _init_std(self.embed_dim, init_std)
        _init_linear(self.head_nm.ada_lin[1], std, generator)
        _init_linear(self.head, std, generator)
        if init_head >= 0:
            self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[1].weight.mul_(init_adaln)

    def logits(self, hidden: Tensor, cond: Tensor) -> Tensor:
        """hidden (B, n, C), c (B, C) -> float32 logits (B, n, V)."""
        return self.head(self.head_nm(hidden.float(), cond).float()).float()

    def forward(self, labels: Tensor, x_inputs: Tensor, generator=None) -> Tensor:
        """Teacher-forced logits (B, L, V); labels (B,), x_inputs (B, L - first_l, Cz) (``hidden``)."""
        return self.logits(*self.hidden(labels, x_inputs, generator))

    def training_loss(self, quantizer, f: Tensor, labels: Tensor, generator=None) -> tuple[Tensor, dict]:
        """(loss, logs) of latents f (B, Cz, h, w): the codes of every scale (Sec. 3.1, Algorithm 1), teacher
        forcing under the block-causal mask, cross-entropy over all L tokens (Sec. 3.2)."""
        idx = quantizer.encode_indices(f)
        return self.loss(self(labels, quantizer.teacher_inputs(idx), generator), torch.cat(idx, dim=1)), {}

    def _generate(self, batch_size: int, *, labels, cfg, cfg_schedule, temperature, generator, options,
                  known_codes, known_mask, progress) -> Tensor:
        """f_hat by ``mar.generate_scales.next_scale`` with the attached tokenizer's quantizer (and the
        ``_residual`` hook a subclass supplies: HART's residual head)."""
        from mar.generate_scales import next_scale

        quantizer = self.tokenizer.quantize
        return next_scale(self, quantizer, batch_size, labels=labels, cfg=cfg, cfg_schedule=cfg_schedule,
                          top_k=options.top_k or 0, top_p=options.top_p or 0.0, more_smooth=options.more_smooth,
                          temperature=temperature, generator=generator, known_codes=known_codes,
                          known_mask=known_mask, progress=progress,
                          residual=self._residual(quantizer, generator, temperature, options))

    def _residual(self, quantizer, generator, temperature: float, options):
        """What ``next_scale`` adds after the last scale (None: nothing; VAR samples codes only)."""
        return None

    def loss(self, logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Batch mean of sum_i CE_i / L (the reference trainer's weights 1/L per token); target (B, L) codes."""
        b = logits.shape[0]
        if tuple(logits.shape) != (b, self.L, self.vocab_size) or tuple(target.shape) != (b, self.L):
            raise ValueError(f"logits must be (B, {self.L}, {self.vocab_size}) and target (B, {self.L}) codes, got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")
        ce = F.cross_entropy(logits.reshape(-1, self.vocab_size).float(), target.reshape(-1).long(),
                             reduction="none", label_smoothing=label_smoothing).view(b, -1)
        weight = torch.ones(1, self.L, device=ce.device) / self.L
        return ce.mul(weight).sum(dim=-1).mean()


# ---------------------------------------------------------------- presets and published checkpoints
VAR_PRESETS: dict[str, dict] = {}


def _register(name: str, depth: int, init_adaln_gamma: float, **extra) -> None:
    """Depth d: width 64 d, d heads of 64 channels, drop-path up to 0.1 d / 24 (the reference's build_vae_var)."""
    VAR_PRESETS[name] = dict(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
                             init_adaln_gamma=init_adaln_gamma, **extra)


# The published ImageNet models (256 px; AdaLN gamma init as in the reference README's training commands).
_register("var_d16", 16, 1e-3)
_register("var_d20", 20, 1e-3)
_register("var_d24", 24, 1e-4)
_register("var_d30", 30, 1e-5)
_register("var_d36", 36, 5e-6, shared_aln=True, patch_nums=PATCH_NUMS_512)  # 512 px, shared AdaLN
# Small ones for CPU and small data (pass vocab_size, token_dim, patch_nums, num_classes of the tokenizer).
_register("var_d2", 2, 1e-3)
_register("var_d4", 4, 1e-3)
_register("var_d6", 6, 1e-3)


def create_var(name: str, **overrides) -> VAR:
    """Build a preset; keywords override it or set the other constructor arguments (e.g. ``device="meta"``).

    >>> model = create_var("var_d16")                                   # ImageNet 256, the published VQVAE
    >>> model = create_var("var_d2", vocab_size=512, token_dim=16, patch_nums=(1, 2, 3, 4, 6, 8), num_classes=10)
    """
    if name not in VAR_PRESETS:
        raise ValueError(f"unknown VAR preset {name!r}; valid presets: {', '.join(VAR_PRESETS)}")
    valid = [p for p in inspect.signature(NextScaleTrunk.__init__).parameters if p != "self"]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown VAR arguments {unknown}; valid arguments: {valid}")
    return VAR(**{**VAR_PRESETS[name], **overrides})


def load_var_checkpoint(path: str | Path, name: str = "var_d16", **overrides) -> VAR:
    """Preset ``name`` with the weights of a published ``var_d*.pth`` (a bare state dict) or of a reference
    training checkpoint (``['trainer']['var_wo_ddp']``), loaded strictly, in eval mode.

    ``torch.load(weights_only=True)``: tensors and plain containers only. Another file (the VQVAE, a MAR
    checkpoint, a VAR of another depth) is refused with one message saying what it is.
    """
    from mar.engine.checkpoint import _torch_load
    from mar.registry import load_state_dict_strict

    obj = _torch_load(path, "cpu", hint="a VAR checkpoint holds tensors and plain containers only")
    trainer = obj.get("trainer") if isinstance(obj, dict) else None
    state = trainer["var_wo_ddp"] if isinstance(trainer, dict) and isinstance(trainer.get("var_wo_ddp"), dict) else obj
    if isinstance(obj, dict) and ("model" in obj or "model_ema" in obj):
        raise ValueError(f"{str(path)!r} is not a VAR transformer checkpoint: it is a MAR training checkpoint "
                         "('model' / 'model_ema'); use mar.registry.load_pretrained")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} is not a VAR state dict (a bare dict of tensors, or "
                         "['trainer']['var_wo_ddp'])")
    if "class_emb.weight" not in state or "pos_1LC" not in state:
        tokenizer = "quantize.embedding.weight" in state or any(k.startswith(("encoder.", "decoder.")) for k in state)
        raise ValueError(f"{str(path)!r} is not a VAR transformer checkpoint: " + (
            "it is a tokenizer (VQVAE / VAE) checkpoint; open the VAR VQVAE with tokenizers.multiscale."
            "MultiScaleVQVAE.from_var_checkpoint" if tokenizer else f"its keys are {sorted(state)[:5]}"))
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    model = create_var(name, device="meta", **overrides)  # shapes only: the weights come from the file
    if depth != model.depth:
        raise ValueError(f"{str(path)!r} holds a depth-{depth} VAR (preset var_d{depth}), not {name} "
                         f"(depth {model.depth}): pass name='var_d{depth}'")
    _materialise(model, "cpu")
    load_state_dict_strict(model, dict(state), source=repr(str(path)))
    return model.eval()
