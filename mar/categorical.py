"""The cross-entropy (categorical) per-token head: logits over a codebook, guided, filtered, sampled.

Glossary
    N   rows (one per token); with classifier-free guidance the head receives 2N rows [cond; uncond]
    V   codes (the tokenizer's codebook size, ``num_codes``)
    D   condition width (the generator's decoder width, ``z_channels``)
    B   per-sample generators; generator b owns the n = N / B consecutive rows [b n, (b+1) n)
    s   classifier-free guidance scale (``cfg``), T temperature, k top-k, p top-p (nucleus mass)
    l   logits (N, V); pi = softmax(l)

This is the cross-entropy baseline of the MAR paper (Li et al. 2024, Sec. 5.1 and Table 1: the same generator
over discrete VQ tokens with a categorical head in place of Diffusion Loss), behind the Head interface of
``mar.heads``. The head is an MLP from z to V logits; everything after the logits is a pure function here:

    loss        CE_r = -log softmax(l_r)[x_r];  L = sum_r m_r CE_r / sum_r m_r   (plain mean without a mask)
    guidance    l = l_u + s (l_c - l_u)          Ho & Salimans 2022, Eq. 6, applied to logits; s = 1: none
    temperature l = l / T
    top-k       keep l_i >= l_(k), the k-th largest logit of the row (ties at the boundary are all kept)
    top-p       keep i iff  sum_{j: pi_j > pi_i} pi_j < p   (Holtzman et al. 2020, Sec. 3.1): the smallest set of
                most probable codes with mass >= p, plus every code tied with the least probable one in it
    sampling    c = argmax_i (l_i + g_i),  g_i = -log(-log u_i),  u_i ~ U(0, 1)   (Gumbel-max: P(c = i) = pi_i)
    confidence  log softmax(l)[c] of the processed logits (MaskGIT, Chang et al. 2022, Sec. 3.2, ranks the
                sampled tokens by their predicted probability)

``process_logits`` applies guidance, then temperature, then top-k, then top-p (the order of common language-
model samplers); filtered entries become -inf, so they are never sampled and have log-probability -inf.

Every draw takes a ``torch.Generator`` or a list of B per-sample generators (``mar.orders.rand``); a list
makes row group b depend only on generator b, so a sample comes out the same in any batch. None means
torch's default generator, as everywhere else in the project.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mar.orders import rand
from mar.schedules import check_guidance

# A nucleus mass within this many ulps of the logits' dtype below p counts as reaching p (float rounding of the
# softmax and of the running sum must not pull an extra code into the nucleus).
_TOP_P_ULPS = 16


def _materialise(module: nn.Module) -> nn.Module:
    """Give a module built on the meta device uninitialised storage on torch's default device, in place.

    ``Module.to_empty`` does the same through ``empty_like``, whose meta path imports sympy on first use (most
    of a second); ``torch.empty`` of each shape does not. No draws either way.
    """
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return module


def check_top(top_k, top_p) -> None:
    """One clear error unless top_k is None or an int >= 1 and top_p is None or a number in (0, 1]."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be None (no top-k filter) or an int >= 1 (keep the k most likely codes), "
                         f"got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be None (no nucleus filter) or a number in (0, 1] (the nucleus' probability "
                         f"mass; 1 keeps every code), got {top_p!r}")


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point (N, V) tensor, got {shape}")


def guided_logits(logits: Tensor, cfg: float) -> Tensor:
    """Classifier-free guidance on logits (Ho & Salimans 2022, Eq. 6): l_u + s (l_c - l_u).

    cfg == 1: ``logits`` (N, V) unchanged. Otherwise ``logits`` is [cond; uncond] (2N, V) -- the cond half
    first, as the generator stacks them -- and the result is (N, V).
    """
    _check_logits(logits)
    if float(cfg) == 1.0:
        return logits
    if len(logits) % 2:
        raise ValueError(f"with cfg != 1 the logits must hold [cond; uncond] rows (an even count), got "
                         f"{len(logits)} rows: pass both halves, or cfg = 1")
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + float(cfg) * (cond - uncond)


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep every entry whose logit is >= the k-th largest of its row (boundary ties kept); the rest -> -inf.

    k >= V keeps everything. (N, V) -> (N, V).
    """
    check_top(k, None)
    _check_logits(logits)
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (N, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2020, Sec. 3.1): keep i iff the mass of strictly more probable codes is < p.

    pi = softmax(logits) per row. That keeps the smallest set of most probable codes whose mass is >= p, plus
    every code tied with the least probable code of that set; the rest -> -inf. p == 1 keeps everything.
    The probabilities and their running sums are taken in float64, and a mass within a few ulps of the
    logits' dtype below p counts as reaching p, so rounding does not add a code. (N, V) -> (N, V).
    """
    check_top(None, p)
    _check_logits(logits)
    if float(p) == 1.0:
        return logits
    probs = torch.softmax(logits.double(), dim=-1)  # (N, V)
    ascending = probs.sort(dim=-1).values
    descending = ascending.flip(-1)
    # mass of the c most probable codes, c = 0..V-1: mass_of_top[:, c] = sum(descending[:, :c])
    mass_of_top = torch.cat([torch.zeros_like(descending[:, :1]), descending.cumsum(-1)[:, :-1]], dim=-1)
    # codes strictly more probable than each entry (its tied codes share the count): in [0, V - 1]
    num_above = logits.shape[-1] - torch.searchsorted(ascending, probs, right=True)
    mass_above = mass_of_top.gather(-1, num_above)  # (N, V): sum_{j: pi_j > pi_i} pi_j
    tolerance = _TOP_P_ULPS * torch.finfo(logits.dtype).eps
    return logits.masked_fill(mass_above >= float(p) - tolerance, float("-inf"))


def process_logits(logits: Tensor, *, temperature: float, cfg: float, top_k: int | None = None,
                   top_p: float | None = None) -> Tensor:
    """The logits the head samples from, in this order: guidance, / temperature, top-k, then top-p.

    ``logits`` (N, V), or [cond; uncond] (2N, V) when cfg != 1 (``guided_logits``). The order is that of
    common language-model samplers: the nucleus is taken over the top-k codes' renormalised probabilities.
    Returns (N, V) float32 logits with -inf on the filtered codes.
    """
    check_guidance(cfg, temperature)
    check_top(top_k, top_p)
    _check_logits(logits)
    out = guided_logits(logits.float(), cfg) / float(temperature)
    if top_k is not None:
        out = filter_top_k(out, top_k)
    if top_p is not None:
        out = filter_top_p(out, top_p)
    return out


def sample_codes(logits: Tensor, generator) -> Tensor:
    """One code per row by Gumbel-max: argmax(logits + g), g = -log(-log u), so P(code i) = softmax(logits)_i.

    ``generator``: one torch.Generator (None: torch's default), or a list of B generators, generator b owning
    rows [b n, (b+1) n) with n = N / B; the uniforms are then drawn as (B, n V), so row group b depends only
    on generator b. -inf entries are never drawn. (N, V) -> (N,) int64.
    """
    _check_logits(logits)
    n_rows, n_codes = logits.shape
    if isinstance(generator, (list, tuple)):
        if len(generator) == 0 or n_rows % len(generator):
            raise ValueError(f"got {len(generator)} generators for {n_rows} rows: pass one generator per sample, "
                             f"a count that divides the rows (each owns N / B consecutive rows)")
        shape = (len(generator), n_rows // len(generator) * n_codes)
    else:
        shape = (n_rows, n_codes)
    u = rand(shape, generator, logits.device, torch.float32).reshape(n_rows, n_codes)
    u = u.clamp_min(torch.finfo(u.dtype).tiny)  # u = 0 would give g = -inf
    gumbel = -torch.log(-torch.log(u))
    return (logits.float() + gumbel).argmax(dim=-1)


class CategoricalHead(nn.Module):
    """Cross entropy over ``num_codes`` codes from z (MAR paper, Sec. 5.1): an MLP z -> logits.

    net = LayerNorm(D) -> Linear(D, width) -> GELU -> [depth - 1 x (Linear(width, width) -> GELU)]
    -> Linear(width, V). The Linears are xavier-uniform from ``generator`` (in that order), biases 0, the
    LayerNorm 1 / 0. The layers are made on the meta device and then given storage on torch's default
    device, so building the head draws only from ``generator`` (torch's default generator when it is None),
    never from nn.Linear's own initialisation.
    """

    kind = "discrete"
    token_shape: tuple[int, ...] = ()
    token_dtype = torch.int64

    def __init__(self, num_codes: int, z_channels: int, depth: int = 2, width: int = 256,
                 generator: torch.Generator | None = None):
        super().__init__()
        for name, value in (("num_codes", num_codes), ("z_channels", z_channels), ("depth", depth), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_codes, self.z_channels, self.depth, self.width = int(num_codes), int(z_channels), int(depth), int(width)
        meta = torch.device("meta")
        layers: list[nn.Module] = [nn.LayerNorm(z_channels, device=meta), nn.Linear(z_channels, width, device=meta),
                                   nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width, device=meta), nn.GELU()]
        layers.append(nn.Linear(width, num_codes, device=meta))
        self.net = _materialise(nn.Sequential(*layers))  # no draws so far: meta layers, empty storage
        self.initialize_weights(generator)

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """Xavier-uniform Linear weights from ``generator`` (first layer first), zero biases, unit LayerNorm."""
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _check_z(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.z_channels:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must be (N, {self.z_channels}) conditions, got {shape}")

    def logits(self, z: Tensor) -> Tensor:
        """z (N, D) -> logits (N, V) (in the autocast dtype under autocast)."""
        self._check_z(z)
        return self.net(z)

    def loss(self, target: Tensor, z: Tensor, mask: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """Scalar cross entropy sum(CE_r m_r) / sum(m_r) (plain mean without mask), in float32 even under autocast.

        target (N,) code indices, z (N, D), mask (N,) weights (1 = count the row). No draws (``generator``
        is accepted for the Head interface and unused).
        """
        self._check_z(z)
        if not isinstance(target, Tensor) or tuple(target.shape) != (z.shape[0],) or target.is_floating_point() \
                or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"target must be ({z.shape[0]},) integer code indices (int64), got "
                             f"{getattr(target, 'dtype', type(target).__name__)} {tuple(getattr(target, 'shape', ()))}")
        if mask is not None and tuple(mask.shape) != (z.shape[0],):
            raise ValueError(f"mask must be ({z.shape[0]},), got {tuple(mask.shape)}")
        logits = self.logits(z)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            ce = F.cross_entropy(logits.float(), target.long(), reduction="none")  # (N,) float32
            if mask is None:
                return ce.mean()
            mask = mask.to(ce.dtype)
            return (ce * mask).sum() / mask.sum()

    def _processed(self, z: Tensor, temperature: float, cfg: float, options) -> Tensor:
        return process_logits(self.logits(z), temperature=temperature, cfg=cfg,
                              top_k=getattr(options, "top_k", None), top_p=getattr(options, "top_p", None))

    @torch.no_grad()
    def sample(self, z: Tensor, *, temperature: float = 1.0, cfg: float = 1.0, generator=None, options=None,
               num_steps: int | None = None) -> Tensor:
        """New codes (N',) int64 from ``process_logits`` then ``sample_codes``.

        cfg == 1: z (N, D), N' = N; cfg != 1: z = [cond; uncond] (2N, D), N' = N. ``options`` may carry
        ``top_k`` / ``top_p`` (read with getattr; None or absent = no filter). ``num_steps`` is ignored (no
        steps). ``generator``: one generator or a list of B, as in ``sample_codes``.
        """
        return sample_codes(self._processed(z, temperature, cfg, options), generator)

    @torch.no_grad()
    def sample_with_confidence(self, z: Tensor, *, temperature: float = 1.0, cfg: float = 1.0, generator=None,
                               options=None, num_steps: int | None = None) -> tuple[Tensor, Tensor]:
        """(codes (N',) int64, logprob (N',) float32): ``sample``'s codes (same draws) and log softmax of the
        processed logits at them, MaskGIT's confidence (Chang et al. 2022, Sec. 3.2)."""
        logits = self._processed(z, temperature, cfg, options)
        codes = sample_codes(logits, generator)
        logprob = torch.log_softmax(logits, dim=-1).gather(-1, codes[:, None])[:, 0]
        return codes, logprob


@dataclass(frozen=True)
class CategoricalHeadSpec:
    """The categorical head's sizes; registered under ``module_name`` in the generator."""

    depth: int = 2
    width: int = 256
    module_name: str = "categorical"

    def build(self, token_dim: int, z_channels: int, generator: torch.Generator | None = None) -> CategoricalHead:
        """A head over ``token_dim`` codes (for discrete tokens the generator's token_dim is the codebook size)."""
        return CategoricalHead(num_codes=token_dim, z_channels=z_channels, depth=self.depth, width=self.width,
                               generator=generator)

    def input_embedding(self, token_dim: int, width: int) -> nn.Module:
        """Discrete tokens enter the generator through an embedding table nn.Embedding(token_dim, width).

        The generator is meant to initialise it N(0, 0.02) from its own generator. Built without touching
        torch's default generator: the table is handed in as ``torch.empty`` storage (``_weight``, which skips
        nn.Embedding's own N(0, 1) draw), then filled with a placeholder N(0, 0.02) from a private generator of
        fixed seed 0 (deterministic, and never uninitialised memory should the generator leave it as built).
        """
        embedding = nn.Embedding(token_dim, width, _weight=torch.empty(token_dim, width))
        placeholder = torch.Generator(device=embedding.weight.device).manual_seed(0)
        with torch.no_grad():
            embedding.weight.normal_(0.0, 0.02, generator=placeholder)
        return embedding
