"""Feature caching across MAR generation steps (opt-in; ``SamplingOptions.feature_cache``).

Glossary: b rows (2b with CFG: [cond; uncond]), P buffer slots, L token positions, S = P + L slots (slot P + i is
token position i), D width, H heads, hd head width, n tokens predicted at a step, w tokens written at the step
before.

Between two MAR steps only the w tokens just written change the encoder's input, and the decoder's input
changes at those w slots only (mask token -> encoded token). LazyMAR (Yan et al. 2025, arXiv 2503.12450,
Sec. 3.2-3.3) observes that the features of the other tokens, and the gap between the conditional and the
unconditional branch, change little from one step to the next, and reuses them:

``tokens`` (the token cache): at a refresh step the encoder and decoder run over every slot and each block's
keys and values are kept per slot. At the steps in between only the *active* slots are computed: in the encoder
the w tokens written since (their keys/values join the cache), in the decoder those w slots plus the n slots
predicted now (their conditions are what the head needs). An active slot's queries attend to every valid slot's
keys/values, cached or new; the other slots keep their last outputs. With an up-to-date cache this is the
full forward (the attention is over the same keys and values); the approximation is only that cached slots
do not see the tokens written since the last refresh.

``cfg`` (the condition cache): at a refresh step both branches run and the residual r = z_uncond - z_cond of
every position is kept; in between only the conditional branch runs and z_uncond = z_cond + r (LazyMAR's
condition cache, Sec. 3.3), halving the transformer's rows.

Both are off by default; ``feature_cache="off"`` runs the reference loop untouched (``mar.generate``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def block_qkv(block, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A timm ``Block``'s queries, keys and values (B, H, n, hd) of rows x (B, n, D): norm1, qkv, q/k norms."""
    attn = block.attn
    b, n, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def block_output(block, x: Tensor, attended: Tensor) -> Tensor:
    """The rest of a timm ``Block`` after its attention: heads merged, proj, then the residual, LayerScale and the
    MLP branch. x (B, n, D) the block's input rows, attended (B, H, n, hd) the attention's output for them."""
    b, n, _ = x.shape
    out = block.attn.proj_drop(block.attn.proj(block.attn.norm(attended.transpose(1, 2).reshape(b, n, -1))))
    x = x + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _attend(block, x: Tensor, slots: Tensor, keys: Tensor, values: Tensor, valid: Tensor) -> Tensor:
    """A timm ``Block`` on the active rows x (B, A, D) at ``slots`` (B, A) of a slot sequence whose keys and values
    (B, H, S, hd) are cached: the active rows' own keys/values are written into the cache first, then their queries
    attend to every slot with ``valid`` (B, S) True. Same arithmetic as ``Block.forward`` over the valid slots."""
    attn = block.attn
    b, a, _ = x.shape
    q, k, v = block_qkv(block, x)
    idx = slots.view(b, 1, a, 1).expand(-1, attn.num_heads, -1, attn.head_dim)
    keys.scatter_(2, idx, k.to(keys.dtype))
    values.scatter_(2, idx, v.to(values.dtype))
    out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=valid[:, None, None, :])
    return block_output(block, x, out)


class TokenCache:
    """Per-slot keys and values of every encoder and decoder block of a MAR, for ``rows`` rows, and which encoder
    slots they are valid for. Filled by ``refresh`` (every slot), extended by ``step`` (the active slots)."""

    def __init__(self, model, rows: int, device, dtype):
        self.model = model
        s = model.buffer_size + model.seq_len

        def kv(blocks):
            return [(torch.zeros(rows, blk.attn.num_heads, s, blk.attn.head_dim, device=device, dtype=dtype),
                     torch.zeros(rows, blk.attn.num_heads, s, blk.attn.head_dim, device=device, dtype=dtype))
                    for blk in blocks]

        self.enc, self.dec = kv(model.encoder_blocks), kv(model.decoder_blocks)
        self.enc_valid = torch.zeros(rows, s, dtype=torch.bool, device=device)
        self.dec_valid = torch.ones(rows, s, dtype=torch.bool, device=device)  # the decoder sees every slot

    def _views(self, rows: int):
        """The caches of the first ``rows`` rows (views: writes reach the cache)."""
        return ([(k[:rows], v[:rows]) for k, v in self.enc], [(k[:rows], v[:rows]) for k, v in self.dec],
                self.enc_valid[:rows], self.dec_valid[:rows])

    def _encoder_inputs(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """The encoder's inputs (B, n, D) of the tokens at ``positions`` (B, n): z_proj, + position, LayerNorm."""
        m = self.model
        x = m.z_proj(torch.gather(tokens, 1, positions.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])))
        pos = m.encoder_pos_embed_learned[0, m.buffer_size + positions]  # (B, n, D)
        return m.z_proj_ln(x + pos)

    def refresh(self, tokens: Tensor, visible: Tensor, class_embedding: Tensor) -> Tensor:
        """The full forward over every slot, keeping each block's keys/values: tokens (B, L, C), visible (B, V)
        positions, class_embedding (B, D) -> z (B, L, D') of every position (B <= the cache's rows)."""
        m = self.model
        b, p = tokens.shape[0], m.buffer_size
        enc, dec, enc_valid, dec_valid = self._views(b)
        # Encoder: the buffer (class vectors) and the visible tokens.
        buffer = class_embedding.unsqueeze(1).expand(b, p, -1).to(tokens.dtype) + m.encoder_pos_embed_learned[:, :p]
        x = torch.cat([m.z_proj_ln(buffer), self._encoder_inputs(tokens, visible)], dim=1)
        slots = torch.cat([torch.arange(p, device=x.device).expand(b, -1), visible + p], dim=1)
        enc_valid.zero_()
        enc_valid.scatter_(1, slots, True)
        for blk, (k, v) in zip(m.encoder_blocks, enc):
            x = _attend(blk, x, slots, k, v, enc_valid)
        x = m.decoder_embed(m.encoder_norm(x))
        # Decoder: every slot (mask tokens where nothing is visible).
        full = m.mask_token.to(x.dtype).expand(b, p + m.seq_len, x.shape[-1])
        x = full.scatter(1, slots.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x) + m.decoder_pos_embed_learned
        every = torch.arange(p + m.seq_len, device=x.device).expand(b, -1)
        for blk, (k, v) in zip(m.decoder_blocks, dec):
            x = _attend(blk, x, every, k, v, dec_valid)
        return m.decoder_norm(x)[:, p:] + m.diffusion_pos_embed_learned

    def step(self, tokens: Tensor, written: Tensor, predict: Tensor) -> Tensor:
        """A cached step: the tokens just ``written`` (B, w) positions enter the encoder, the decoder recomputes
        their slots and the ``predict`` (B, n) slots, over the cached keys/values -> z (B, n, D') of ``predict``."""
        m = self.model
        b, p = tokens.shape[0], m.buffer_size
        enc, dec, enc_valid, dec_valid = self._views(b)
        x = self._encoder_inputs(tokens, written)
        slots = written + p
        enc_valid.scatter_(1, slots, True)
        for blk, (k, v) in zip(m.encoder_blocks, enc):
            x = _attend(blk, x, slots, k, v, enc_valid)
        x = m.decoder_embed(m.encoder_norm(x))  # (B, w, D')
        masked = m.mask_token.to(x.dtype).expand(b, predict.shape[1], x.shape[-1])
        active = torch.cat([slots, predict + p], dim=1)  # (B, w + n)
        x = torch.cat([x, masked], dim=1) + m.decoder_pos_embed_learned[0, active]
        for blk, (k, v) in zip(m.decoder_blocks, dec):
            x = _attend(blk, x, active, k, v, dec_valid)
        z = m.decoder_norm(x[:, written.shape[1]:])
        return z + m.diffusion_pos_embed_learned[0, predict]


class CachedConditions:
    """The conditions a MAR step needs, with the feature cache of ``mode`` (``cfg``, ``tokens`` or ``both``) and a
    full forward every ``refresh`` executed steps (the first included). ``use_cfg``: rows are [cond; uncond]."""

    def __init__(self, model, mode: str, refresh: int, rows: int, use_cfg: bool, device, dtype):
        self.model, self.refresh, self.use_cfg = model, refresh, use_cfg
        self.tokens_cache = mode in ("tokens", "both")
        self.cfg_cache = use_cfg and mode in ("cfg", "both")
        self.cache = TokenCache(model, 2 * rows if use_cfg else rows, device, dtype) if self.tokens_cache else None
        self.residual: Tensor | None = None  # (b, L, D') z_uncond - z_cond at the last refresh
        self.count = 0

    def __call__(self, tokens: Tensor, visible: Tensor, predict: Tensor, written: Tensor | None,
                 class_embedding: Tensor) -> Tensor:
        """z (b or 2b, n, D') of the ``predict`` positions (b, n): tokens (b, L, C), visible (b, V) positions,
        ``written`` (b, w) the positions written at the previous executed step (None at the first),
        class_embedding (b or 2b, D)."""
        m, b = self.model, tokens.shape[0]
        full = self.count % self.refresh == 0 or written is None
        self.count += 1
        rows = 2 * b if self.use_cfg and (full or not self.cfg_cache) else b
        x, vis, pred = tokens, visible, predict
        if rows == 2 * b:
            x, vis, pred = torch.cat([x, x]), torch.cat([vis, vis]), torch.cat([pred, pred])
        emb = class_embedding[:rows]
        if self.cache is not None:
            if full:
                z_all = self.cache.refresh(x, vis, emb)
            else:
                z = self.cache.step(x, torch.cat([written, written]) if rows == 2 * b else written, pred)
        else:
            z_all = m.conditions(x, vis, emb)
            full = True  # the cfg cache alone: a full forward over the rows it runs
        if full:
            if self.cfg_cache and rows == 2 * b:
                self.residual = z_all[b:] - z_all[:b]
            z = torch.gather(z_all, 1, pred.unsqueeze(-1).expand(-1, -1, z_all.shape[-1]))
        if self.use_cfg and rows == b:  # the unconditional branch from the cached residual
            r = torch.gather(self.residual, 1, predict.unsqueeze(-1).expand(-1, -1, z.shape[-1]))
            z = torch.cat([z, z + r])
        return z
