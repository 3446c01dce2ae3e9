"""Plain-data checkpoints: atomic saves, `weights_only` loads, reference MAR files, safetensors exports.

A checkpoint is a dict of tensors, numbers, strings, None, lists, tuples and dicts only, so that
``torch.load(path, weights_only=True)`` reads it without running arbitrary unpickling code. A training
checkpoint looks like (the trainer picks the keys)::

    {"model": state_dict, "ema": state_dict, "optimizer": optimizer.state_dict(),
     "config": config_to_dict(cfg), "step": int, "epoch": int, "rng": capture_rng_state(generator)}

Every file is written with ``mar.io.atomic_write``: a reader, or a resume after a crash, sees the old file or
the new one, never half of one.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mar.io import atomic_write

_PLAIN_SCALARS = (bool, int, float, str, type(None), torch.dtype, torch.Size)
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A file is missing pieces, is not a checkpoint, or holds objects a safe load refuses."""


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first value that `torch.load(weights_only=True)` could not read back."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_SCALARS:
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict) and type(obj).__module__ in ("builtins", "collections"):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where} has a key of type {type(k).__name__} ({k!r}): use str or int keys")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: checkpoints hold only tensors, numbers, "
        "strings, None, lists, tuples and dicts (so torch.load(weights_only=True) can read them); convert it "
        "first (configs: mar.config.config_to_dict, RNG states: capture_rng_state, numpy: torch.from_numpy)")


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """Atomically write the plain-data dict `obj` with torch.save (see the module docstring)."""
    check_plain(obj)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


# --- safe loading ---------------------------------------------------------------------------------------------
def _torch_load(path: str | os.PathLike, map_location: Any, allow: tuple[type, ...] = (),
                hint: str = "for a reference MAR checkpoint use load_reference_mar_state_dict") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            unsafe = []
        if unsafe:
            raise CheckpointError(
                f"{path} holds objects that are not plain data ({', '.join(unsafe)}), so it cannot be loaded "
                f"safely; {hint}") from None
        first = re.split(r"\.\s", str(e).strip(), maxsplit=1)[0][:200]
        raise CheckpointError(f"{path} is not a valid checkpoint (truncated or corrupt file? "
                              f"{type(e).__name__}: {first})") from None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` with ``torch.load(weights_only=True)``."""
    obj = _torch_load(path, map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint dict (found a {type(obj).__name__})")
    return obj


def _is_safetensors(path: Path) -> bool:
    """safetensors layout: 8-byte little-endian header length, then a JSON header starting with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def _keys(d: dict, limit: int = 12) -> str:
    keys = [repr(k) for k in d]
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} keys)" if len(keys) > limit else "")


def load_reference_mar_state_dict(path: str | os.PathLike, ema: bool = True) -> dict[str, torch.Tensor]:
    """The MAR weights of a published ``checkpoint-last.pth``, of our checkpoint, or of a safetensors export.

    Reference files pickle their ``args`` as an `argparse.Namespace`; only that class is allowed on top of
    the `weights_only` allowlist, so no arbitrary code runs. ema=True -> ``model_ema`` (reference) or ``ema``
    (ours); ema=False -> ``model``. A safetensors export holds one set of weights; its metadata key
    ``weights`` ("ema"/"model"), when present, must match the request.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        state, meta = read_safetensors(path)
        want = "ema" if ema else "model"
        if meta.get("weights", want) != want:
            raise CheckpointError(f"{path} holds the '{meta['weights']}' weights only; pass ema={not ema}")
        return state
    ckpt = _torch_load(path, "cpu", allow=(argparse.Namespace,),
                       hint="only argparse.Namespace is allowed on top of tensors and plain containers")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint dict (found a {type(ckpt).__name__})")
    names = ("model_ema", "ema") if ema else ("model",)
    for name in names:
        if isinstance(ckpt.get(name), dict):
            return dict(ckpt[name])
    other = "pass ema=False to load 'model'" if ema else "pass ema=True to load the EMA weights"
    raise CheckpointError(f"{path} has no {' or '.join(map(repr, names))} state dict; its top-level keys are: "
                          f"{_keys(ckpt)}; {other}")


# --- safetensors ----------------------------------------------------------------------------------------------
def export_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                       metadata: dict[str, str] | None = None) -> Path:
    """Atomically write `state_dict` (tensors only) with string `metadata` as a safetensors file."""
    metadata = dict(metadata or {})
    for k, v in metadata.items():
        if not (isinstance(k, str) and isinstance(v, str)):
            raise TypeError(f"safetensors metadata must map str to str; got {k!r}: {v!r}")
    tensors = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"export_safetensors: {k!r} is a {type(v).__name__}, not a tensor")
        tensors[k] = v.detach().contiguous().cpu()

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict on CPU, metadata) of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None


# --- RNG states as plain data ---------------------------------------------------------------------------------
def numpy_state_to_plain(state: dict) -> dict:
    """A numpy bit-generator state dict with its arrays stored as {"bytes": uint8 tensor, "dtype", "shape"}."""
    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, np.ndarray):
            return {"bytes": torch.from_numpy(v.reshape(-1).view(np.uint8).copy()), "dtype": str(v.dtype),
                    "shape": list(v.shape)}
        return v.item() if isinstance(v, np.generic) else v
    return conv(state)


def numpy_state_from_plain(state: dict) -> dict:
    """Inverse of `numpy_state_to_plain` (accepted by ``np.random.set_state`` / ``bit_generator.state``)."""
    def conv(v: Any) -> Any:
        if isinstance(v, dict) and set(v) == {"bytes", "dtype", "shape"}:
            return np.frombuffer(v["bytes"].numpy().tobytes(), dtype=v["dtype"]).reshape(v["shape"]).copy()
        return {k: conv(x) for k, x in v.items()} if isinstance(v, dict) else v
    return conv(state)


def capture_rng_state(generator: torch.Generator | None = None) -> dict:
    """Global RNG states (python `random`, numpy's global RandomState, torch CPU and CUDA) plus `generator`'s."""
    version, internal, gauss_next = random.getstate()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": numpy_state_to_plain(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state(),
        "torch_cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Inverse of `capture_rng_state`: the next random draws repeat those after the capture."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    np.random.set_state(numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("torch_cuda", [])
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        warnings.warn(f"checkpoint holds CUDA RNG states for {len(cuda)} devices, this process sees {n}: "
                      "CUDA random streams are not restored")
    if generator is not None:
        if "generator" not in state:
            raise CheckpointError("the RNG state holds no 'generator' state (captured without a generator)")
        generator.set_state(state["generator"])


# --- run folders ----------------------------------------------------------------------------------------------
def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the training checkpoint of `step` lives: ``<run_dir>/checkpoints/step-<step, 8 digits>.pt``."""
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}.pt"


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The `checkpoint_path` with the highest step in `run_dir`, or None (leftover ``.tmp-*`` files ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_file() and (m := _STEP_FILE.match(p.name))]
    return max(steps)[1] if steps else None
