"""A sharded latent cache: a folder of bounded safetensors shards and an index, written by every process of a launch.

Glossary: N items (dataset order), S items per shard, K = ceil(N / S) shards, r rank, W processes (all machines).

Layout of a cache folder::

    index.json                 written last, by the main process, once every shard is complete
    shard-00000.safetensors    items [0, S): moments (S, 2C, h, w), moments_flip (with flips), labels (S,)
    shard-00001.safetensors    items [S, 2S) ...

- The plan (``ShardPlan``) depends only on the data, the tokenizer and the options, never on W: shard k holds
  items [kS, min((k+1)S, N)) and is encoded in batches that start at kS, so 1 process and W processes write the
  same shards, byte for byte. Process r writes shards k = r, r + W, r + 2W, ... and holds one shard in memory
  at a time (S from ``shard_mb``: moments, flips and labels of S items fit in it).
- Every shard carries its plan (start, count, dtype, flips, the tokenizer's weight fingerprint, the data) in its
  metadata. A shard is written atomically (``mar.io.atomic_write``), so a file under its final name is complete;
  an interrupted run leaves only temporaries, deleted when the command is rerun, which then writes just the
  missing shards. A shard of another plan in the folder is refused, never mixed in.
- Moments are stored as float32 (the default: the same numbers as the single-file cache) or float16 (half the
  bytes; the effect on the training loss is measured by benchmarks/latent_cache_dtype.py).

``ShardedLatentDataset`` reads a complete folder: items in dataset order, memory-mapped (safetensors ``safe_open``,
one handle per shard, opened lazily in each DataLoader worker), so the seeded permutation of
``mar.engine.data`` draws exactly the items, and so the batches, of the single-file cache of the same data.
"""
from __future__ import annotations

import bisect
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from mar.engine.checkpoint import export_safetensors
from mar.engine.data import _SeededFlips
from mar.eval.sample_folders import fingerprint
from mar.io import write_text


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's weights (names, dtypes, shapes, bytes): what a latent cache records of its maker."""
    return fingerprint(tokenizer.state_dict())


INDEX = "index.json"
FORMAT = "mar-latent-shards-v1"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class ShardPlan:
    """What a cache folder holds; equal plans make equal shards."""

    items: int
    shard_items: int
    moments_shape: tuple[int, ...]  # (2C, h, w)
    dtype: str  # float32 | float16
    flip: bool
    tokenizer_fingerprint: str
    data: str  # what was encoded (kind, path, split, image size), for the refusal message

    @property
    def num_shards(self) -> int:
        return math.ceil(self.items / self.shard_items)

    def span(self, k: int) -> tuple[int, int]:
        """(start, count) of shard k."""
        start = k * self.shard_items
        return start, min(self.shard_items, self.items - start)

    @staticmethod
    def file(k: int) -> str:
        return f"shard-{k:05d}.safetensors"

    def owned(self, rank: int, world: int) -> list[int]:
        return list(range(rank, self.num_shards, world))

    def shard_meta(self, k: int) -> dict[str, str]:
        start, count = self.span(k)
        return {"format": FORMAT, "plan": json.dumps(asdict(self), sort_keys=True), "shard": str(k),
                "start": str(start), "count": str(count)}


def plan_cache(items: int, moments_shape: tuple[int, ...], dtype: str, flip: bool, shard_mb: float,
               tokenizer_fingerprint: str, data: str, batch_size: int = 1) -> ShardPlan:
    """S = the most items whose moments (and flipped moments) and labels fit in ``shard_mb`` MiB (at least 1),
    rounded down to a multiple of the encoding batch when it holds one: then every encoding batch is the one the
    single-file cache encodes (batch j = items [jB, (j+1)B)), so both give the same numbers, bit for bit."""
    if dtype not in DTYPES:
        raise ValueError(f"latent cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not shard_mb > 0:
        raise ValueError(f"the shard size must be > 0 MiB, got {shard_mb}")
    if items < 1:
        raise ValueError("the dataset is empty: nothing to cache")
    item_bytes = math.prod(moments_shape) * DTYPES[dtype].itemsize * (2 if flip else 1) + 8  # + the int64 label
    shard_items = max(1, min(items, int(shard_mb * 2**20) // item_bytes))
    if shard_items < items and shard_items >= batch_size:
        shard_items -= shard_items % batch_size
    return ShardPlan(items, shard_items, tuple(int(s) for s in moments_shape), dtype, bool(flip),
                     tokenizer_fingerprint, data)


def _read_meta(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return None  # unreadable: not a complete shard


def completed_shards(folder: Path, plan: ShardPlan) -> set[int]:
    """The shards of ``plan`` already complete in ``folder``; a shard file written for another plan is refused."""
    done = set()
    for k in range(plan.num_shards):
        path = folder / plan.file(k)
        if not path.is_file():
            continue
        meta = _read_meta(path)
        if meta is None:
            continue  # corrupt (a crashed disk, a copy cut short): rewritten
        if meta != plan.shard_meta(k):
            theirs = json.loads(meta.get("plan", "{}"))
            diff = sorted(key for key, value in asdict(plan).items() if theirs.get(key) != _jsonable(value))
            raise ValueError(f"{path} belongs to another latent cache (it differs in {', '.join(diff) or 'its span'}; "
                             "a resume needs the first run's data, tokenizer, --cache-dtype, --cache-shard-mb and "
                             f"optim.batch_size): rerun with those, pass a new --cache-latents folder, or delete {folder}")
        done.add(k)
    stray = sorted(p.name for p in folder.glob("shard-*.safetensors")
                   if not p.name[6:11].isdigit() or int(p.name[6:11]) >= plan.num_shards)
    if stray:
        raise ValueError(f"{folder} holds shards beyond this cache's {plan.num_shards} ({', '.join(stray[:3])}): "
                         f"it is another cache; pass a new --cache-latents folder or delete it")
    return done


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def write_shards(folder: Path, plan: ShardPlan, dataset, encode: Callable[[torch.Tensor], torch.Tensor],
                 shards: list[int], batch_size: int, num_workers: int = 0, progress: bool = True,
                 stop_after: int | None = None) -> list[Path]:
    """Encode and write ``shards`` of ``plan``, one at a time. ``dataset[i]`` is (image, label), or (image,
    flipped image, label) when ``plan.flip``; ``encode(images) -> moments (B, 2C, h, w)``. ``stop_after``: return
    after that many shards (a test's interruption). Returns the files written."""
    batches = [list(range(b, min(b + batch_size, start + count)))
               for k in shards for start, count in [plan.span(k)] for b in range(start, start + count, batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    dtype, written = DTYPES[plan.dtype], []
    parts: dict[str, list[torch.Tensor]] = {"moments": [], "moments_flip": [], "labels": []}
    queue = iter(shards)
    k = next(queue, None)
    bar = tqdm(total=sum(plan.span(k)[1] for k in shards), desc="caching latents", unit="img", disable=not progress)
    for batch in loader:
        parts["moments"].append(encode(batch[0]).to("cpu", dtype))
        if plan.flip:
            parts["moments_flip"].append(encode(batch[1]).to("cpu", dtype))
        parts["labels"].append(batch[-1].long())
        bar.update(len(batch[-1]))
        if sum(len(x) for x in parts["labels"]) == plan.span(k)[1]:  # shard k is complete: write it, free it
            tensors = {name: torch.cat(x) for name, x in parts.items() if x}
            written.append(export_safetensors(tensors, folder / plan.file(k), plan.shard_meta(k)))
            parts = {name: [] for name in parts}
            k = next(queue, None)
            if stop_after is not None and len(written) == stop_after:
                break
    bar.close()
    return written


def write_index(folder: Path, plan: ShardPlan, info: dict[str, Any] | None = None) -> Path:
    """index.json, once every shard of ``plan`` is complete in ``folder`` (else one clear error); ``info``: what
    else a reader should know (the tokenizer's file and config), not part of the plan."""
    missing = sorted(set(range(plan.num_shards)) - completed_shards(folder, plan))
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {plan.num_shards} shards are missing in {folder} (first: "
                                f"{plan.file(missing[0])}). On several machines the folder must be on a file system "
                                "they share; otherwise rerun the command to write the missing shards")
    index = {"format": FORMAT, "plan": asdict(plan), **(info or {}),
             "shards": [{"file": plan.file(k), "start": plan.span(k)[0], "count": plan.span(k)[1]}
                        for k in range(plan.num_shards)]}
    return write_text(folder / INDEX, json.dumps(index, indent=1) + "\n")


def read_index(folder: Path) -> dict[str, Any] | None:
    path = folder / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): delete it and rerun the --cache-latents command") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path} is not the index of a sharded latent cache ({FORMAT})")
    return index


def index_plan(index: dict[str, Any]) -> ShardPlan:
    p = dict(index["plan"])
    return ShardPlan(**{**p, "moments_shape": tuple(p["moments_shape"])})


class ShardedLatentDataset(_SeededFlips):
    """Items of a complete shard folder: (moments (2C, h, w) float32, label) in dataset order, memory-mapped; the
    flipped moments are used when hflip and ``hflip_coin(seed, epoch, index)`` (as ``LatentCacheDataset``)."""

    def __init__(self, folder: str | os.PathLike, hflip: bool = True, seed: int = 0):
        self.folder, self.hflip, self.seed, self._files = Path(folder), hflip, seed, {}
        index = read_index(self.folder)
        if index is None:
            hint = (" it holds shards but no index: the cache run did not finish; rerun its --cache-latents command"
                    if any(self.folder.glob("shard-*.safetensors")) else " write it with train.py --cache-latents DIR")
            raise FileNotFoundError(f"latent cache not found: {self.folder / INDEX};{hint}")
        self.plan = index_plan(index)
        if hflip and not self.plan.flip:
            raise ValueError(f"{self.folder} holds no flipped moments: pass data.hflip=false or re-cache with flips")
        shards = index["shards"]
        for s in shards:
            path = self.folder / s["file"]
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} of the latent cache {self.folder} is missing: rerun the "
                                        "--cache-latents command that wrote it (it writes just the missing shards)")
        self.starts = [int(s["start"]) for s in shards]
        labels = []
        for s in shards:
            with safe_open(str(self.folder / s["file"]), framework="pt") as f:
                labels.append(f.get_tensor("labels"))
        self.labels = torch.cat(labels)
        if len(self.labels) != self.plan.items:
            raise ValueError(f"{self.folder}: the shards hold {len(self.labels)} items, the index {self.plan.items}")
        self.shard_files = [s["file"] for s in shards]
        self.moments_shape = self.plan.moments_shape
        self.tokenizer_fingerprint = self.plan.tokenizer_fingerprint

    def __len__(self) -> int:
        return self.plan.items

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open the shards themselves
        return {**self.__dict__, "_files": {}}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a latent cache of {len(self)} items")
        k = bisect.bisect_right(self.starts, index) - 1
        if k not in self._files:
            self._files[k] = safe_open(str(self.folder / self.shard_files[k]), framework="pt")
        name = "moments_flip" if self._flip(index) else "moments"
        at = index - self.starts[k]
        return self._files[k].get_slice(name)[at : at + 1][0].float(), int(self.labels[index])
