"""Generation loops, as functions outside the model: masked generation (MAR paper, Sec. 3.3) with known tokens.

Glossary: B batch, L tokens per image, C token channels (the head's token shape), D condition width,
U tokens to generate in a row (L, or the row's unknown count when editing), K generation steps, n tokens
predicted at a step.

``masked`` is the MAR sampling loop of the reference, parameterised by an order policy and by known tokens:

1. each row gets an order (``mar.orders``: random, or raster) with its known positions moved to the back
   (``known_first``), so they are visible from the first step and never predicted;
2. the cosine schedule runs over the row's U unknown tokens (``generation_schedule(U, K)``) and so does the
   linear CFG ramp (``cfg_scales(.., U, ..)``): an edit of 16 tokens takes K steps over those 16;
3. at each step the generator conditions on [class buffer; visible tokens], the head samples the n tokens of
   the step from their z, and they are written into the sequence; the known tokens are never written, so
   they come out bit for bit as they went in.

Rows with different unknown counts follow different schedules; the loop runs each group of rows with the same
count as one batch (one group when every row has the same mask). With one generator per row (a list) every
row's draws come only from its own generator, so a row comes out the same in any batch.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffloss.loss import autocast_region
from mar.config.schema import SamplingOptions
from mar.feature_cache import CachedConditions
from mar.orders import known_first, make_orders, rand
from mar.schedules import cfg_scales, check_guidance, generation_schedule


def _check_no_feature_cache(options: SamplingOptions, loop: str) -> None:
    if options.feature_cache != "off":
        raise ValueError(f"feature_cache={options.feature_cache!r} is for MAR's masked loop; the {loop} loop has "
                         "none: set feature_cache=off (the causal loop has its own kv_cache)")


def _select(generator, rows: list[int]):
    return [generator[r] for r in rows] if isinstance(generator, (list, tuple)) else generator


@torch.no_grad()
def masked(model, batch_size: int, *, labels: Tensor | None = None, num_iter: int = 64, cfg: float = 1.0,
           cfg_schedule: str = "linear", temperature: float = 1.0, generator=None,
           options: SamplingOptions | None = None, known_tokens: Tensor | None = None,
           known_mask: Tensor | None = None, order: str = "random", progress: bool = False) -> Tensor:
    """Generate token sequences (B, L, *token_shape) with a masked generator (``mar.model.MAR``).

    ``labels`` (B,) class labels, or None for unconditional generation (the fake class vector). ``cfg`` >= 0
    (1 = no guidance) with a ``linear`` or ``constant`` schedule; ``temperature`` > 0 scales the head's noise.
    ``generator``: one ``torch.Generator`` for the batch, or a list of B (row b then depends only on its own).
    ``options``: the head's sampler settings (``SamplingOptions()``, the default, is the reference sampler).

    Editing: ``known_tokens`` (B, L, *token_shape) and ``known_mask`` (B, L) bool (True = known). Known
    tokens are kept exactly, the encoder sees them from the first step, the schedules count from each row's
    unknown count U, and rows may differ in U; K is capped at U (a row with U = 0 is returned as given).
    Draws, per row or from the one generator: the order keys (B, L) first, then the head's at each step.
    """
    options = SamplingOptions() if options is None else options
    check_guidance(cfg, temperature)
    device = model.fake_latent.device
    b, L = batch_size, model.seq_len
    tokens, known_mask = _start(model, b, generator, known_tokens, known_mask)
    class_embedding = model.embed_labels(labels, b)  # (B, D)
    orders = known_first(make_orders(order, b, L, generator, device), known_mask)
    with autocast_region(model, device.type, options.autocast_dtype):  # no-op on the exact path
        for u, rows, idx in _groups_by_unknown(known_mask):
            tokens[idx] = _masked_rows(model, tokens[idx], orders[idx], class_embedding[idx], u, min(num_iter, u),
                                       cfg, cfg_schedule, temperature, _select(generator, rows), options, progress)
    return tokens


def _start(model, b: int, generator, known_tokens: Tensor | None = None, known_mask: Tensor | None = None
           ) -> tuple[Tensor, Tensor]:
    """(tokens (b, L, *token_shape), known mask (b, L) bool) a generation loop starts from, after the checks:
    one generator or b of them; zeros in the head's token dtype (codes int64, else the model's float dtype) with
    the known tokens written in (no known tokens: an all-False mask)."""
    if isinstance(generator, (list, tuple)) and len(generator) != b:
        raise ValueError(f"got {len(generator)} generators for a batch of {b}: pass one per sample")
    head, device = model.head, model.fake_latent.device
    dtype = head.token_dtype if head.kind == "discrete" else model.fake_latent.dtype
    tokens = torch.zeros(b, model.seq_len, *head.token_shape, device=device, dtype=dtype)
    if known_mask is None:
        return tokens, torch.zeros(b, model.seq_len, dtype=torch.bool, device=device)
    known_mask, tokens = _check_known(known_tokens, known_mask, tokens)
    return tokens, known_mask


def _groups_by_unknown(known_mask: Tensor) -> list[tuple[int, list[int], Tensor]]:
    """(U, rows, rows as an index tensor) for each unknown count U > 0 among the rows, in order of first row:
    rows with the same count share one schedule and run as one batch (U = 0 rows stay as given)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for row, u in enumerate((~known_mask).sum(1).tolist()):
        groups[u].append(row)
    return [(u, rows, torch.tensor(rows, device=known_mask.device)) for u, rows in groups.items() if u > 0]


def _check_known(known_tokens: Tensor | None, known_mask: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(known mask, the sequence with the known tokens written in) after shape checks."""
    if known_tokens is None:
        raise ValueError("known_mask needs known_tokens (the tokens of the known positions)")
    if known_mask.shape != tokens.shape[:2] or known_mask.dtype != torch.bool:
        raise ValueError(f"known_mask must be bool of shape {tuple(tokens.shape[:2])} (B, L), got "
                         f"{known_mask.dtype} {tuple(known_mask.shape)}")
    if known_tokens.shape != tokens.shape:
        raise ValueError(f"known_tokens must have shape {tuple(tokens.shape)} (B, L, *token_shape), got "
                         f"{tuple(known_tokens.shape)}")
    known_mask = known_mask.to(tokens.device)
    keep = known_mask.view(*known_mask.shape, *([1] * (tokens.dim() - 2)))
    return known_mask, torch.where(keep, known_tokens.to(tokens.device, tokens.dtype), tokens)


def _masked_rows(model, tokens: Tensor, orders: Tensor, class_embedding: Tensor, num_unknown: int, num_iter: int,
                 cfg: float, cfg_schedule: str, temperature: float, generator, options: SamplingOptions,
                 progress: bool) -> Tensor:
    """The loop for rows that share one unknown count U: tokens (b, L, ...) -> (b, L, ...)."""
    head = model.head
    b = tokens.shape[0]
    trailing = tokens.shape[2:]
    masked_after = generation_schedule(num_unknown, num_iter)
    scales = cfg_scales(cfg, cfg_schedule, num_unknown, masked_after)
    steps = options.steps_per_iteration(num_iter)
    use_cfg = cfg != 1.0
    if use_cfg:  # one batched forward for [cond; uncond]
        class_embedding = torch.cat([class_embedding, model.embed_labels(None, b)])
    cached = None
    if options.feature_cache != "off":  # opt-in (mar.feature_cache); "off" is the reference loop below
        cached = CachedConditions(model, options.feature_cache, options.cache_refresh, b, use_cfg, tokens.device,
                                  options.autocast_dtype or model.fake_latent.dtype)
    masked_now, written = num_unknown, None
    for k in tqdm(range(num_iter), disable=not progress, desc="MAR steps", leave=False):
        m_next = masked_after[k]
        if m_next == masked_now:  # the clamp left nothing to predict at this step
            continue
        visible = orders[:, masked_now:].sort(dim=-1).values
        pred = orders[:, m_next:masked_now].sort(dim=-1).values  # (b, n) positions predicted now
        if cached is not None:
            z = cached(tokens, visible, pred, written, class_embedding)  # (b or 2b, n, D)
            written = pred
        else:
            x, vis, pos = tokens, visible, pred
            if use_cfg:
                x, vis, pos = torch.cat([x, x]), torch.cat([vis, vis]), torch.cat([pred, pred])
            z = model.conditions(x, vis, class_embedding)  # (b or 2b, L, D)
            z = torch.gather(z, 1, pos.unsqueeze(-1).expand(-1, -1, z.shape[-1]))  # (b or 2b, n, D)
        n = pred.shape[1]
        new = head.sample(z.reshape(-1, z.shape[-1]).to(model.fake_latent.dtype), temperature=temperature,
                          cfg=scales[k], generator=generator, options=options, num_steps=steps[k])
        index = pred.view(b, n, *([1] * len(trailing))).expand(b, n, *trailing)
        tokens = tokens.scatter(1, index, new.reshape(b, n, *trailing).to(tokens.dtype))
        masked_now = m_next
    return tokens


@torch.no_grad()
def causal(model, batch_size: int, *, labels: Tensor | None = None, cfg: float = 1.0, cfg_schedule: str = "linear",
           temperature: float = 1.0, generator=None, options: SamplingOptions | None = None, kv_cache: bool = True,
           progress: bool = False) -> Tensor:
    """Generate (B, L, *token_shape) with a causal generator (``mar.causal.CausalAR``), one token per step.

    Step i feeds the token of step i-1 (at its position, announcing position o_i) and the head samples
    x_{o_i} from the last output. ``kv_cache`` keeps each block's keys and values, so a step computes one
    position; False recomputes the whole prefix at every step (the same tokens up to float rounding: with a
    categorical head the same codes). CFG and its linear schedule are MAR's with K = U = L (the scale at step i
    is 1 + (cfg - 1) (i + 1) / L); ``generator`` and ``options`` as in ``masked``. Draws: the order keys (random
    order only), then the head's at each step.
    """
    options = SamplingOptions() if options is None else options
    check_guidance(cfg, temperature)
    _check_no_feature_cache(options, "causal")
    head = model.head
    device, dtype = model.fake_latent.device, model.fake_latent.dtype
    b, L = batch_size, model.seq_len
    tokens, _ = _start(model, b, generator)
    class_embedding = model.embed_labels(labels, b)
    order = model.make_orders(b, generator, device)  # (b, L), first position first
    scales = cfg_scales(cfg, cfg_schedule, L, generation_schedule(L, L))
    steps = options.steps_per_iteration(L)
    use_cfg = cfg != 1.0
    order2 = torch.cat([order, order]) if use_cfg else order
    if use_cfg:
        class_embedding = torch.cat([class_embedding, model.embed_labels(None, b)])
    token_dtype = tokens.dtype
    generated = tokens.new_zeros(order2.shape[0], *tokens.shape[1:])  # the tokens in generation order
    caches = [{} for _ in model.blocks] if kv_cache else None
    rows = torch.arange(b, device=device)
    with autocast_region(model, device.type, options.autocast_dtype):  # no-op in fp32
        prefix = torch.cat([model.buffer(class_embedding), model.inputs(None, None, order2[:, :1])], dim=1)
        for i in tqdm(range(L), disable=not progress, desc="AR steps", leave=False):
            if i == 0:
                x = prefix
            elif kv_cache:
                x = model.inputs(generated[:, i - 1:i], order2[:, i - 1:i], order2[:, i:i + 1])
            else:
                x = torch.cat([prefix, model.inputs(generated[:, :i], order2[:, :i], order2[:, 1:i + 1])], dim=1)
            z = model.run_blocks(x, caches)[:, -1]  # (b or 2b, D)
            new = head.sample(z.to(dtype), temperature=temperature, cfg=scales[i], generator=generator,
                              options=options, num_steps=steps[i]).to(token_dtype)  # (b, ...)
            tokens[rows, order[:, i]] = new
            generated[:, i] = torch.cat([new, new]) if use_cfg else new
    return tokens


def select_confident(confidence: Tensor, candidates: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """MaskGIT's pick (Chang et al. 2022, Sec. 3.2, step 3): of each row's candidate positions (b, n) with their
    confidences (b, n), the ``keep`` most confident: (their indices into the candidates (b, keep), their
    positions (b, keep)). Ties go to the earlier candidate."""
    if not 0 <= keep <= candidates.shape[1]:
        raise ValueError(f"keep must be in [0, {candidates.shape[1]}], got {keep}")
    idx = torch.sort(confidence, dim=1, descending=True, stable=True).indices[:, :keep]
    return idx, torch.gather(candidates, 1, idx)


@torch.no_grad()
def maskgit(model, batch_size: int, *, labels: Tensor | None = None, num_iter: int = 8, cfg: float = 1.0,
            cfg_schedule: str = "linear", temperature: float = 1.0, generator=None,
            options: SamplingOptions | None = None, known_tokens: Tensor | None = None,
            known_mask: Tensor | None = None, progress: bool = False) -> Tensor:
    """MaskGIT's iterative decoding (Chang et al. 2022, Sec. 3.2) with a masked generator and a categorical head.

    At step k every unknown token is sampled in parallel (``head.sample_with_confidence``: temperature, CFG
    on logits, top-k / top-p); its confidence is its log-probability plus Gumbel noise scaled by
    ``options.choice_temperature * (1 - (k+1)/K)`` (the reference implementation's annealed pick noise); the
    most confident are kept so that the cosine schedule's count remains unknown (``generation_schedule``), the
    rest are masked again. Known tokens (editing) are kept and never re-masked; schedules count from each
    row's unknown count, as in ``masked``. Draws per step: the head's, then the pick noise.
    """
    options = SamplingOptions() if options is None else options
    check_guidance(cfg, temperature)
    _check_no_feature_cache(options, "MaskGIT")
    head = model.head
    if head.kind != "discrete" or not hasattr(head, "sample_with_confidence"):
        raise ValueError("MaskGIT decoding needs a categorical head (discrete tokens): set model.head=categorical")
    device = model.fake_latent.device
    tokens, known_mask = _start(model, batch_size, generator, known_tokens, known_mask)
    class_embedding = model.embed_labels(labels, batch_size)
    with autocast_region(model, device.type, options.autocast_dtype):
        for u, rows, idx in _groups_by_unknown(known_mask):
            tokens[idx] = _maskgit_rows(model, tokens[idx], known_mask[idx], class_embedding[idx], u,
                                        min(num_iter, u), cfg, cfg_schedule, temperature, _select(generator, rows),
                                        options, progress)
    return tokens


def _maskgit_rows(model, tokens: Tensor, fixed: Tensor, class_embedding: Tensor, num_unknown: int, num_iter: int,
                  cfg: float, cfg_schedule: str, temperature: float, generator, options: SamplingOptions,
                  progress: bool) -> Tensor:
    """MaskGIT decoding of rows that share one unknown count U: tokens (b, L), fixed (b, L) bool."""
    b, L = tokens.shape
    masked_after = generation_schedule(num_unknown, num_iter)
    scales = cfg_scales(cfg, cfg_schedule, num_unknown, masked_after)
    use_cfg = cfg != 1.0
    if use_cfg:
        class_embedding = torch.cat([class_embedding, model.embed_labels(None, b)])
    fixed = fixed.clone()
    masked_now = num_unknown
    for k in tqdm(range(num_iter), disable=not progress, desc="MaskGIT steps", leave=False):
        m_next = masked_after[k]
        by_state = torch.argsort((~fixed).to(torch.uint8), dim=1, stable=True)  # fixed, then unknown; ascending
        visible, unknown = by_state[:, :L - masked_now], by_state[:, L - masked_now:]
        x, vis, pos = tokens, visible, unknown
        if use_cfg:
            x, vis, pos = torch.cat([x, x]), torch.cat([vis, vis]), torch.cat([unknown, unknown])
        z = model.conditions(x, vis, class_embedding)
        z = torch.gather(z, 1, pos.unsqueeze(-1).expand(-1, -1, z.shape[-1]))
        codes, logprob = model.head.sample_with_confidence(
            z.reshape(-1, z.shape[-1]).to(model.fake_latent.dtype), temperature=temperature, cfg=scales[k],
            generator=generator, options=options)
        codes, logprob = codes.view(b, masked_now), logprob.view(b, masked_now).float()
        noise_scale = options.choice_temperature * (1.0 - (k + 1) / num_iter)
        u = rand((b, masked_now), generator, tokens.device, dtype=torch.float64).clamp(1e-20, 1 - 1e-12)
        confidence = logprob.double() + noise_scale * -torch.log(-torch.log(u))
        idx, chosen = select_confident(confidence, unknown, masked_now - m_next)
        tokens = tokens.scatter(1, chosen, torch.gather(codes, 1, idx))
        fixed = fixed.scatter(1, chosen, True)
        masked_now = m_next
    return tokens
