"""Causal autoregressive generators: a decoder-only transformer over tokens in raster or random order, with a
KV cache (MAR paper, Sec. 5.1 and Table 1: "AR, raster, causal" and "MAR, random, causal").

Glossary: B batch, L tokens per image, P buffer positions (class tokens), D width, o an order (B, L): o_i is
the position generated at step i (a permutation of range(L); raster: o_i = i).

The sequence is the buffer followed by L inputs; the output at input i is the condition z_i of token
x_{o_i}, and the head (Diffusion Loss or cross-entropy) models x_{o_i} given z_i:

    buffer_j  = class vector + pos[j]                                        j < P
    input_0   = start + query[o_0]
    input_i   = embed(x_{o_{i-1}}) + pos[P + o_{i-1}] + query[o_i]             i >= 1

``pos`` tells a token where it sits; ``query`` tells the model which position comes next. Raster AR could do
without ``query`` (the next position is fixed), random-order AR cannot: "the position of the next token"
must be given (MAR paper, Sec. 5.1; as in sigma-GPT / RandAR), so both orders use the same layout.
Attention is causal over the whole sequence (timm ``Block`` parameters, the official checkpoint names; the
forward below calls their submodules so that one code path serves training, cached and uncached generation).

Generation (``mar.generate.causal``) appends one input per step. With the KV cache each block keeps the keys
and values of the positions seen so far, so a step costs one position; without it the whole prefix is
recomputed at every step (the check of the cache, and the "uncached" row of the speed comparison).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from mar import orders as orders_mod
from mar.feature_cache import block_output, block_qkv
from mar.generate import causal
from mar.heads import DiffusionHeadSpec, HeadSpec
from mar.model import TokenGenerator, init_transformer

CAUSAL_ORDERS = ("raster", "random")


def block_forward(block: Block, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
    """A timm ``Block`` under a causal mask, over new positions x (B, n, D) after the cached ones.

    ``cache`` (a dict, filled in place) holds the keys and values (B, H, T, hd) of the T positions before x;
    None attends within x only (training, or a full recomputation). New position j (global T + j) attends to
    every cached position and to new positions <= j. Same arithmetic as ``Block.forward(x, is_causal=True)``
    on the whole sequence.
    """
    attn = block.attn
    n = x.shape[1]
    q, k, v = block_qkv(block, x)
    past = 0
    if cache is not None:
        if "k" in cache:
            past = cache["k"].shape[2]
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
    dropout = attn.attn_drop.p if block.training else 0.0
    if past == 0:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    else:
        allowed = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
    return block_output(block, x, out)


class CausalAR(TokenGenerator):
    """Decoder-only causal transformer with a per-token head; ``order`` raster or random (see the module
    docstring). Sizes: ``embed_dim``/``depth``/``num_heads`` (a preset's encoder sizes)."""

    def __init__(
        self,
        img_size: int = 256,
        vae_stride: int = 16,
        patch_size: int = 1,
        token_channels: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        buffer_size: int = 64,
        label_drop_prob: float = 0.1,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        order: str = "raster",
        head: HeadSpec = DiffusionHeadSpec(depth=6, width=1024),
        kv_cache: bool = True,
        grad_checkpointing: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self._set_sequence(img_size, vae_stride, patch_size, token_channels, head)
        if order not in CAUSAL_ORDERS:
            raise ValueError(f"unknown order {order!r} for a causal generator: use one of {', '.join(CAUSAL_ORDERS)}")
        if buffer_size < 1:
            raise ValueError(f"a causal generator needs buffer_size >= 1 (the class tokens), got {buffer_size}")
        self.order = order
        self.num_classes, self.buffer_size, self.label_drop_prob = num_classes, buffer_size, label_drop_prob
        self.grad_checkpointing = grad_checkpointing
        self.kv_cache = kv_cache  # generation default (``sample_tokens(kv_cache=...)`` overrides it)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.class_emb = nn.Embedding(num_classes, embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, embed_dim))
        self.start_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.z_proj = head.input_embedding(self.token_embed_dim, embed_dim)
        self.z_proj_ln = norm(embed_dim)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + self.seq_len, embed_dim))
        self.query_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm,
                                           proj_drop=proj_dropout, attn_drop=attn_dropout) for _ in range(depth)])
        self.norm = norm(embed_dim)
        self.initialize_weights(generator)
        self._register_head(head, self.token_embed_dim, embed_dim, generator)

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, 0.02) embeddings and tokens; xavier-uniform Linears with zero bias; unit LayerNorms (as MAR)."""
        init_transformer(self, [self.class_emb.weight, self.fake_latent, self.start_token, self.pos_embed_learned,
                                self.query_pos_embed_learned], generator)

    # ---------------------------------------------------------------- orders and inputs
    def make_orders(self, batch_size: int, generator=None, device=None) -> torch.Tensor:
        """(B, L) generation orders, first position first: raster (no draws) or uniformly random."""
        if self.order == "raster":
            return torch.arange(self.seq_len, device=device).expand(batch_size, -1).clone()
        return orders_mod.random_orders(batch_size, self.seq_len, generator, device)

    def buffer(self, class_embedding: torch.Tensor) -> torch.Tensor:
        """(B, P, D) class tokens with their positions, layer-normed like every input."""
        b, d = class_embedding.shape
        x = class_embedding.unsqueeze(1).expand(b, self.buffer_size, d) + self.pos_embed_learned[:, :self.buffer_size]
        return self.z_proj_ln(x)

    def inputs(self, tokens: torch.Tensor | None, prev: torch.Tensor | None, nxt: torch.Tensor) -> torch.Tensor:
        """Inputs (B, n, D): tokens (B, n, ...) at positions ``prev`` (B, n) announcing positions ``nxt`` (B, n).
        ``tokens`` None: the start input (n = 1) announcing ``nxt``."""
        query = self.query_pos_embed_learned[0][nxt]  # (B, n, D)
        if tokens is None:
            x = self.start_token.expand(nxt.shape[0], 1, -1) + query
        else:
            x = self.z_proj(tokens) + self.pos_embed_learned[0][self.buffer_size + prev] + query
        return self.z_proj_ln(x)

    def run_blocks(self, x: torch.Tensor, caches: list[dict] | None = None) -> torch.Tensor:
        """The causal stack over new positions x (B, n, D) (after the cached ones, if ``caches``) -> (B, n, D)."""
        for i, blk in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block_forward, blk, x, use_reentrant=False)
            else:
                x = block_forward(blk, x, cache)
        return self.norm(x)

    def in_order(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """x (B, L, ...) by position -> x_{o_0}, ..., x_{o_{L-1}} (B, L, ...)."""
        idx = order.view(x.shape[0], self.seq_len, *([1] * (x.dim() - 2))).expand_as(x)
        return torch.gather(x, 1, idx)

    def conditions(self, x: torch.Tensor, order: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: z (B, L, D), z_i the condition of token x_{o_i}; x (B, L, ...) by position."""
        return self._conditions_in_order(self.in_order(x, order), order, class_embedding)

    def _conditions_in_order(self, ordered: torch.Tensor, order: torch.Tensor, class_embedding: torch.Tensor):
        seq = torch.cat([self.buffer(class_embedding), self.inputs(None, None, order[:, :1]),
                         self.inputs(ordered[:, :-1], order[:, :-1], order[:, 1:])], dim=1)
        return self.run_blocks(seq)[:, self.buffer_size:]

    # ---------------------------------------------------------------- training
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The head's loss on every token (teacher forcing in the model's order): tokens (B, c, h, w) or codes
        (B, h, w), labels (B,) -> scalar. Labels are dropped with ``label_drop_prob`` for CFG, as in MAR."""
        self.check_labels(labels)
        x = self.patchify(tokens)
        b = x.shape[0]
        class_embedding = self.train_class_embedding(labels, generator, x.device)
        order = self.make_orders(b, generator, x.device)
        ordered = self.in_order(x, order)  # the targets, and (shifted by one) the inputs
        z = self._conditions_in_order(ordered, order, class_embedding)  # (B, L, D)
        target = ordered.detach().reshape(b * self.seq_len, *x.shape[2:])
        return self.head.loss(target, z.reshape(b * self.seq_len, -1), None, generator=generator)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def sample_tokens(self, batch_size: int, num_iter: int | None = None, cfg: float = 1.0,
                      cfg_schedule: str = "linear", labels: torch.Tensor | None = None, temperature: float = 1.0,
                      generator=None, progress: bool = False, *, options=None, kv_cache: bool | None = None,
                      **keywords) -> torch.Tensor:
        """Generate (B, c, h, w) tokens (or (B, h, w) codes) one position per step (``mar.generate.causal``).

        ``num_iter`` must be None or L (a causal generator predicts one token per step). ``kv_cache`` False
        recomputes the prefix at every step (same tokens; the speed comparison's other row); None takes the
        model's ``kv_cache`` attribute (on unless the config's ``model.kv_cache`` is false).
        """
        if keywords:
            raise ValueError(f"a causal generator takes its sampler settings as options, not {sorted(keywords)}")
        tokens = self.generate(batch_size, num_iter=num_iter, labels=labels, cfg=cfg, cfg_schedule=cfg_schedule,
                               temperature=temperature, generator=generator, options=options, kv_cache=kv_cache,
                               progress=progress)
        return self.unpatchify(tokens)

    def generate(self, batch_size: int, *, num_iter: int | None = None, known_tokens=None, known_mask=None,
                 kv_cache: bool | None = None, **kwargs) -> torch.Tensor:
        """Token sequences (B, L, ...) by ``mar.generate.causal`` (its keywords). Editing (known tokens) needs a
        masked generator: a causal one conditions each token on the tokens before it in its order only."""
        if known_tokens is not None or known_mask is not None:
            raise ValueError("editing needs a masked generator (model.arch mar or maskgit): a causal generator sees "
                             "only the tokens before each one in its order, so it cannot keep tokens after them")
        if num_iter not in (None, self.seq_len):
            raise ValueError(f"a causal generator predicts one token per step: num_iter must be {self.seq_len} "
                             f"(the number of tokens), got {num_iter}")
        kv_cache = self.kv_cache if kv_cache is None else kv_cache
        return causal(self, batch_size, kv_cache=kv_cache, **kwargs)
