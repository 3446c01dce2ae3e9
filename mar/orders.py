"""Orders over token positions, and the seeded draws they are made from (pure functions).

Glossary: B batch, L tokens per image (seq_len).

An order is a (B, L) int64 permutation of range(L) per sample. The masked generators read it from the
back: with m tokens still unknown, ``order[:, m:]`` are visible and ``order[:, :m]`` are still to be
predicted, so the positions at the front of the order are generated last (MAR paper, Sec. 3.3: "random
order"). Policies:
- ``random_orders``: a uniform random permutation (MAR training and generation);
- ``raster_orders``: row-major positions, predicted first-to-last (causal AR's raster order);
- ``known_first``: any order with the known positions moved to the back (visible from the first step) and
  the unknown ones kept in their relative order at the front; the identity on an order with nothing known.

Everything stochastic takes a ``torch.Generator``, or a list of B generators (one per sample, which makes
sample b's draws independent of the rest of the batch).
"""
from __future__ import annotations

import torch

ORDER_POLICIES = ("random", "raster")


def _draw(fn, shape: tuple[int, ...], generator, device, dtype=torch.float32) -> torch.Tensor:
    """Call ``fn(shape, generator=..., device=..., dtype=...)`` drawing on the generator's device.

    ``generator`` may be None (global RNG), one generator, or a list of one generator per row of
    ``shape[0]``; the result is moved to ``device``.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per sample")
        return torch.cat([_draw(fn, (1, *shape[1:]), g, device, dtype) for g in generator])
    gen_device = generator.device if generator is not None else device
    return fn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def rand(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """U[0, 1) draws; ``generator`` as in :func:`_draw`."""
    return _draw(lambda s, **kw: torch.rand(s, **kw), tuple(shape), generator, device, dtype)


def randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """N(0, 1) draws; ``generator`` as in :func:`_draw`."""
    return _draw(lambda s, **kw: torch.randn(s, **kw), tuple(shape), generator, device, dtype)


def random_orders(batch_size: int, seq_len: int, generator=None, device=None) -> torch.Tensor:
    """One uniformly random permutation of range(L) per sample: (B, L) int64.

    argsort of i.i.d. uniforms is a uniform random permutation (ties have probability ~0).
    """
    keys = rand((batch_size, seq_len), generator, device, dtype=torch.float64)
    return torch.argsort(keys, dim=-1)


def raster_orders(batch_size: int, seq_len: int, device=None) -> torch.Tensor:
    """Row-major order read from the back: position 0 is generated first, L-1 last. (B, L) int64, no draws."""
    return torch.arange(seq_len - 1, -1, -1, device=device).expand(batch_size, seq_len).clone()


def make_orders(policy: str, batch_size: int, seq_len: int, generator=None, device=None) -> torch.Tensor:
    """The orders of a named policy: ``"random"`` (draws from ``generator``) or ``"raster"`` (no draws)."""
    if policy == "random":
        return random_orders(batch_size, seq_len, generator, device)
    if policy == "raster":
        return raster_orders(batch_size, seq_len, device)
    raise ValueError(f"unknown order policy {policy!r}: use one of {', '.join(ORDER_POLICIES)}")


def known_first(orders: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``orders`` (B, L) with each row's known positions (``known`` (B, L) bool, by position) moved to the back.

    A stable sort on "is the position at this place of the order known": the unknown positions keep their
    relative order (a uniform random order stays uniform over the unknown set), and a row with nothing known
    is returned unchanged.
    """
    if known.shape != orders.shape or known.dtype != torch.bool:
        raise ValueError(f"known must be a bool tensor of shape {tuple(orders.shape)}, got "
                         f"{known.dtype} {tuple(known.shape)}")
    is_known = known.gather(1, orders).to(torch.uint8)  # (B, L): 1 where order[b, j] is a known position
    return orders.gather(1, torch.argsort(is_known, dim=-1, stable=True))
