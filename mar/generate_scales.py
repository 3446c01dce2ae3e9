"""Next-scale generation: VAR's coarse-to-fine sampling loop, as a function (Tian et al. 2024, arXiv
2404.02905, Sec. 3.2 and Algorithm 2; the reference's ``autoregressive_infer_cfg``).

Glossary
    B   images; with guidance the transformer runs 2B rows [cond; uncond] (uncond = class ``num_classes``)
    S   scales, k = 0..S-1;  pn_k the side of scale k;  n = pn_k^2 tokens at scale k;  L = sum_k n_k
    V   codebook size;  Cz code vector channels;  h x w = pn_{S-1} x pn_{S-1} the f_hat grid
    t_k guidance at scale k

Per scale k (the transformer keeps a KV cache, so scale k costs its own n tokens):
    logits      l = (1 + t_k) l_cond - t_k l_uncond,   t_k = cfg * k / (S - 1)      (a linear ramp: no guidance
                at the first scale, 1 + cfg times the conditional direction at the last)
    filters     / temperature, then top-k, then top-p, exactly as the reference's ``sample_with_top_k_top_p_``
    draw        r_k = multinomial(softmax(l)), one code per token
    next input  f_hat += phi_k(up(embed(r_k)));  x_{k+1} = word_embed(down(f_hat, pn_{k+1}))   (the quantizer's
                ``next_input``; the f_hat accumulation of the paper's Algorithm 2)

``cfg`` follows the reference: t = 0 is no guidance (``cfg=0``), unlike ``mar.generate.masked`` whose scale s
is 1 for none; here the conditional logits are weighted by s = 1 + t_k.

Randomness: one ``torch.Generator`` for the batch draws exactly the reference's numbers (``multinomial`` over
the (B n, V) probabilities of a scale, and with ``more_smooth`` one (B, n, V) exponential draw after it), so the
same seed gives the reference's codes; a list of B generators gives each image its own draws (image i is the
same in any batch). None: torch's default generator.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mar.categorical import filter_top_k


def cfg_ramp(cfg: float, k: int, num_scales: int, schedule: str = "linear") -> float:
    """Guidance t_k = cfg * k / (S - 1) of scale k (the reference's ``cfg * ratio``, same float arithmetic);
    ``constant``: t_k = cfg at every scale."""
    if schedule == "constant":
        return float(cfg)
    return cfg * (k / (num_scales - 1))


def guide(logits: Tensor, t: float, batch_size: int) -> Tensor:
    """(1 + t) l_cond - t l_uncond from [cond; uncond] logits (2B, n, V); t == 0 with B rows: the logits as given."""
    if logits.shape[0] == batch_size:
        return logits
    return (1 + t) * logits[:batch_size] - t * logits[batch_size:]


def filter_top_p_ascending(logits: Tensor, top_p: float) -> Tensor:
    """The reference's nucleus filter: sort ascending, remove the codes whose cumulative softmax mass (from the
    least probable up) is <= 1 - top_p, never the most probable one. (..., V) -> (..., V), -inf where removed.

    Without ties this is the rule of ``mar.categorical.filter_top_p`` (keep i iff the mass of the strictly more
    probable codes is < p); the arithmetic is the reference's instead (float32 sums, ties split by the sort
    order, no rounding tolerance), so that the same seed draws the reference's codes.
    """
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """top-k (keep logits >= the k-th largest, ties kept; 0 = off) then top-p (0 = off). (B, n, V) -> same."""
    if top_k > 0:
        logits = filter_top_k(logits.reshape(-1, logits.shape[-1]), top_k).view_as(logits)
    if top_p > 0:
        logits = filter_top_p_ascending(logits, top_p)
    return logits


def _per_image(generator) -> bool:
    return isinstance(generator, (list, tuple))


def _on(generator, x: Tensor) -> Tensor:
    return x.to(generator.device) if generator is not None and generator.device != x.device else x


def draw_codes(probs: Tensor, generator) -> Tensor:
    """One code per row of probs (B, n, V) -> (B, n) int64, by ``torch.multinomial(.., 1, replacement=True)``
    over the (B n, V) rows with one generator, or over each image's (n, V) rows with its own."""
    b, n, v = probs.shape
    if _per_image(generator):
        rows = [torch.multinomial(_on(g, probs[i]), 1, replacement=True, generator=g) for i, g in enumerate(generator)]
        return torch.cat(rows).to(probs.device).view(b, n)
    flat = _on(generator, probs.reshape(-1, v))
    return torch.multinomial(flat, 1, replacement=True, generator=generator).to(probs.device).view(b, n)


def smooth_embedding(logits: Tensor, ratio: float, codebook: Tensor, generator) -> Tensor:
    """``more_smooth``: the codebook mixed by a Gumbel softmax of the filtered logits x (1 + ratio) at
    tau = max(0.27 (1 - 0.95 ratio), 0.005) (the reference's MaskGIT-style temperature); ratio = k / (S - 1).
    logits (B, n, V), codebook (V, Cz) -> (B, n, Cz). One exponential draw E of (B, n, V) (or (n, V) per image),
    gumbel = -log E."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    scaled = logits.mul(1 + ratio)
    if _per_image(generator):
        e = torch.cat([torch.empty(scaled.shape[1:], device=g.device).exponential_(generator=g)[None].to(scaled.device)
                       for g in generator])
    else:
        dev = generator.device if generator is not None else scaled.device
        e = torch.empty(scaled.shape, dtype=scaled.dtype, device=dev).exponential_(generator=generator)
        e = e.to(scaled.device)
    soft = ((scaled + (-e.log())) / tau).softmax(dim=-1)
    return soft @ codebook.unsqueeze(0)


def random_labels(batch_size: int, num_classes: int, generator=None, device=None) -> Tensor:
    """Uniform class labels (B,) drawn as the reference does when it is given none: one multinomial of B
    samples over the classes (a list of B generators: one label each)."""
    uniform = torch.full((1, num_classes), 1.0 / num_classes)
    if isinstance(generator, (list, tuple)):
        out = [torch.multinomial(_on(g, uniform), 1, replacement=True, generator=g).cpu() for g in generator]
        return torch.cat(out).view(batch_size).to(device)
    return torch.multinomial(_on(generator, uniform), batch_size, replacement=True,
                             generator=generator).view(batch_size).to(device)


def _check(model, quantizer, b: int, labels, cfg, top_k, top_p, temperature, generator, known_codes, known_mask):
    if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {b!r}")
    if isinstance(generator, (list, tuple)) and len(generator) != b:
        raise ValueError(f"got {len(generator)} generators for a batch of {b}: pass one per image")
    for name, v, ok, hint in (("cfg", cfg, lambda x: x >= 0, ">= 0, 0 = no guidance"),
                              ("temperature", temperature, lambda x: x > 0, "> 0"),
                              ("top_p", top_p, lambda x: 0 <= x <= 1, "in [0, 1], 0 = off")):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not ok(float(v)):
            raise ValueError(f"{name} must be a number {hint}, got {v!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if labels is not None and (not isinstance(labels, Tensor) or tuple(labels.shape) != (b,)):
        raise ValueError(f"labels must be a ({b},) int tensor (None: no class), got "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    weight = quantizer.embedding.weight
    if tuple(weight.shape) != (model.vocab_size, model.token_dim) or \
            tuple(getattr(quantizer, "patch_nums", model.patch_nums)) != tuple(model.patch_nums):
        raise ValueError(f"the quantizer (codebook {tuple(weight.shape)}, patch_nums "
                         f"{getattr(quantizer, 'patch_nums', '?')}) does not fit the model (V={model.vocab_size}, "
                         f"Cz={model.token_dim}, patch_nums {model.patch_nums}): use the tokenizer the model was "
                         "trained on")
    if (known_codes is None) != (known_mask is None):
        raise ValueError("pass known_codes and known_mask together (editing), or neither")
    if known_mask is not None and (tuple(known_codes.shape) != (b, model.L) or tuple(known_mask.shape) != (b, model.L)
                                   or known_mask.dtype != torch.bool):
        raise ValueError(f"known_codes must be ({b}, {model.L}) codes and known_mask ({b}, {model.L}) bool, got "
                         f"{tuple(known_codes.shape)} and {known_mask.dtype} {tuple(known_mask.shape)}")


@torch.no_grad()
def next_scale(model, quantizer, batch_size: int, *, labels: Tensor | None = None, cfg: float = 1.0, top_k: int = 0,
               top_p: float = 0.0, more_smooth: bool = False, temperature: float = 1.0, generator=None,
               known_codes: Tensor | None = None, known_mask: Tensor | None = None, progress: bool = False,
               return_codes: bool = False, cfg_schedule: str = "linear", residual=None):
    """Sample f_hat (B, Cz, h, w) coarse to fine (see the module docstring); ``return_codes``: (f_hat, codes (B, L)).

    ``model``: ``mar.next_scale.VAR``; ``quantizer``: its multi-scale quantizer (``embedding``, ``embed_codes``,
    ``next_input``). ``labels`` (B,) in [0, num_classes] (num_classes = no class); None: no class for every image
    (``random_labels`` draws the reference's random classes). ``cfg`` >= 0, 0 = no guidance (the uncond rows are
    then skipped). ``top_k`` 0 / ``top_p`` 0 = off. ``more_smooth``: f_hat from a Gumbel softmax mix of the
    codebook instead of the drawn codes (the reference's visualisation option; the codes are still drawn and
    returned). Editing: ``known_codes`` (B, L) with ``known_mask`` (B, L) bool: at every scale the known codes
    replace the drawn ones (which are drawn all the same, so the random stream does not depend on the mask).
    ``cfg_schedule`` "constant": t_k = cfg at every scale instead of the ramp. ``residual(hidden, codes, t)``
    (HART): called after the last scale with its hidden states (B or 2B rows, n, C), its codes (B, n) and its
    guidance t; what it returns (B, Cz, h, w) is added to f_hat.
    """
    _check(model, quantizer, batch_size, labels, cfg, top_k, top_p, temperature, generator, known_codes, known_mask)
    b, device, num_scales = batch_size, model.pos_start.device, len(model.patch_nums)
    labels = torch.full((b,), model.num_classes, device=device) if labels is None else labels.to(device)
    guided = cfg != 0
    rows = torch.cat((labels, torch.full_like(labels, model.num_classes))) if guided else labels
    cond = model.condition(rows, drop=False)  # (2B or B, C)
    x, cache = model.first_input(cond), model.start_cache()
    side = model.patch_nums[-1]
    f_hat = cond.new_zeros(b, model.token_dim, side, side)
    codes = []
    for k, pn in enumerate(tqdm(model.patch_nums, disable=not progress, desc="scales")):
        ratio = k / (num_scales - 1)
        t = cfg_ramp(cfg, k, num_scales, cfg_schedule)
        hidden = model.step(x, cond, cache)
        logits = guide(model.logits(hidden, cond), t, b)
        if temperature != 1:
            logits = logits / temperature
        logits = filter_logits(logits, top_k, top_p)
        idx = draw_codes(logits.softmax(dim=-1), generator)  # (B, n)
        if known_mask is not None:
            begin, end = model.begin_ends[k]
            known = known_mask[:, begin:end].to(device)
            idx = torch.where(known, known_codes[:, begin:end].to(device), idx)
        codes.append(idx)
        if more_smooth:
            h = smooth_embedding(logits, ratio, quantizer.embedding.weight, generator)
            if known_mask is not None:
                h = torch.where(known[..., None], quantizer.embed_codes(idx), h)
        else:
            h = quantizer.embed_codes(idx)  # (B, n, Cz)
        f_hat, nxt = quantizer.next_input(k, f_hat, h.transpose(1, 2).reshape(b, model.token_dim, pn, pn))
        if k + 1 < num_scales:
            x = model.scale_input(k + 1, nxt.view(b, model.token_dim, -1).transpose(1, 2))
            x = x.repeat(2, 1, 1) if guided else x
    if residual is not None:
        f_hat = f_hat + residual(hidden, codes[-1], t)
    return (f_hat, torch.cat(codes, dim=1)) if return_codes else f_hat
