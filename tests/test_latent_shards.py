"""The sharded latent cache (mar.engine.latent_shards, mar.engine.caching): written by 2 processes it equals the
single-process cache, interrupted and resumed it equals an uninterrupted one, training draws exactly the batches
of the single-file cache, another tokenizer is refused, and a writer's memory is bounded by the shard size."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open

from helpers import run_launched
from mar.config import TrainConfig, load_config
from mar.engine.caching import cache_latents
from mar.engine.data import LatentCacheDataset, build_dataset, train_batches
from mar.engine.latent_shards import INDEX, ShardedLatentDataset, plan_cache, write_shards
from mar.engine.tasks import MARTask, build_tokenizer
from mar.io import temp_path
from tokenizers import KLTokenizer, kl_vae_preset

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fashion-mnist"  # 200 training images
SHARD_MB = 0.1  # 16 items of (8, 8, 8) float32 moments and flips per shard: 13 shards


def tiny_tokenizer(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    KLTokenizer(kl_vae_preset("kl_f4_c4", in_channels=1, out_channels=1, scaling_factor=1.5)).save(path)
    return path


def config(tok: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        "--model.preset=mar_tiny", "--model.img_size=32", "--model.vae_stride=4", "--model.token_channels=4",
        "--model.num_classes=10", "--model.buffer_size=8", "--tokenizer.preset=kl_f4_c4",
        f"--tokenizer.checkpoint={tok}", "--data.kind=fashion_mnist", f"--data.path={FIXTURE}", "--data.image_size=32",
        "--data.num_workers=0", "--optim.batch_size=16", *extra])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Byte-for-byte comparisons need the same arithmetic in every process: the launched processes run at
    OMP_NUM_THREADS=1, and convolutions round differently at other thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def made(one_thread, tmp_path_factory):
    """One tokenizer; the single-file cache, the single-process shard folder, and the float16 shard folder."""
    root = tmp_path_factory.mktemp("caches")
    tok = tiny_tokenizer(root / "tok.safetensors", 0)
    cfg, acc = config(tok), Accelerator(cpu=True)
    cache_latents(cfg, root / "one.safetensors", acc)
    cache_latents(cfg, root / "shards", acc, shard_mb=SHARD_MB)
    cache_latents(cfg, root / "half", acc, shard_mb=SHARD_MB, dtype="float16")
    return root, tok, cfg, acc


def shard_bytes(folder: Path) -> dict[str, tuple]:
    """Each shard's metadata and tensor bytes (the header's key order is not fixed from process to process)."""
    out = {}
    for p in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            out[p.name] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())})
    return out


def test_the_plan_bounds_shards_and_aligns_batches():
    item = 32 * 16 * 16 * 2 * 2 + 8  # float16 moments and flipped moments of 32 x 16 x 16, an int64 label
    plan = plan_cache(1000, (32, 16, 16), "float16", True, 4.0, "fp", "data", batch_size=64)
    assert 4 * 2**20 // item == 127 and plan.shard_items == 64  # 127 fit; rounded down to whole batches
    assert plan.num_shards == 16 and plan.span(15) == (960, 40)
    assert plan.owned(1, 3) == [1, 4, 7, 10, 13] and plan.owned(0, 1) == list(range(16))
    small = plan_cache(1000, (32, 16, 16), "float16", True, 1.0, "fp", "data", batch_size=64)
    assert small.shard_items == 2**20 // item == 31  # less than a batch: as many as fit
    with pytest.raises(ValueError, match="dtype must be one of"):
        plan_cache(10, (8, 4, 4), "bfloat16", False, 1.0, "fp", "data")


def test_shards_equal_the_single_file_cache_item_for_item(made):
    root, *_ = made
    one, shards = LatentCacheDataset(root / "one.safetensors"), ShardedLatentDataset(root / "shards")
    assert shards.plan.num_shards == 13 and len(shards) == len(one) == 200
    for i in range(len(one)):
        for epoch in (0, 1):  # flipped and unflipped moments
            one.set_epoch(epoch), shards.set_epoch(epoch)
            (a, ya), (b, yb) = one[i], shards[i]
            assert ya == yb and torch.equal(a, b), i
    index = json.loads((root / "shards" / INDEX).read_text())
    assert [s["count"] for s in index["shards"]] == [16] * 12 + [8]
    # float16: the same moments, rounded
    half = ShardedLatentDataset(root / "half")
    shards.set_epoch(0)
    for i in (0, 57, 199):
        assert torch.equal(half[i][0], shards[i][0].half().float())


def test_training_draws_the_single_file_caches_batches(made):
    root, *_ = made
    a = train_batches(LatentCacheDataset(root / "one.safetensors", seed=3), 3, 8, 2, 5, 0, 1, num_workers=2)
    b = train_batches(ShardedLatentDataset(root / "shards", seed=3), 3, 8, 2, 5, 0, 1, num_workers=2)
    for _ in range(2 * 30):  # 30 steps of 12 per epoch from step 5: two epoch boundaries (new orders and flips)
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    cfg = load_config(TrainConfig, None, ["--data.kind=latents", f"--data.path={root / 'shards'}"])
    assert isinstance(build_dataset(cfg.data, 0), ShardedLatentDataset)


def test_two_processes_write_the_same_shards(made, tmp_path):
    root, tok, _, _ = made
    cfg = tmp_path / "cache.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model: {{preset: mar_tiny, img_size: 32, vae_stride: 4, token_channels: 4, num_classes: 10, buffer_size: 8}}
        tokenizer: {{preset: kl_f4_c4, checkpoint: {tok}}}
        data: {{kind: fashion_mnist, path: {FIXTURE}, image_size: 32, num_workers: 0}}
        optim: {{batch_size: 16}}
        """))
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    from test_train import free_port

    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "train.py"), "--config", str(cfg), "--cache-latents", str(tmp_path / "two"),
           f"--cache-shard-mb={SHARD_MB}"]
    proc = run_launched(cmd, cwd=tmp_path, env=env, timeout=300, grace=60)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "wrote" in proc.stdout and "13 shards" in proc.stdout
    assert shard_bytes(tmp_path / "two") == shard_bytes(root / "shards")  # tensors byte for byte, and the same metadata
    assert (tmp_path / "two" / INDEX).read_text() == (root / "shards" / INDEX).read_text()


def test_an_interrupted_cache_resumes_to_the_uninterrupted_one(made, tmp_path, capsys):
    root, _, cfg, acc = made
    out = tmp_path / "resumed"
    out.mkdir()
    ref = ShardedLatentDataset(root / "shards").plan
    ds = build_dataset(cfg.data, cfg.train.seed, return_pair=True)
    tok = build_tokenizer(cfg).eval()
    with torch.no_grad():
        written = write_shards(out, ref, ds, tok.encode_moments, [0, 2, 4], 16, progress=False, stop_after=2)
    assert [p.name for p in written] == ["shard-00000.safetensors", "shard-00002.safetensors"]
    temp_path(out / "shard-00004.safetensors").write_bytes(b"half a shard")  # the killed writer's temporary
    with pytest.raises(FileNotFoundError, match="shards but no index"):
        ShardedLatentDataset(out)  # an unfinished cache is never used
    cache_latents(cfg, out, acc, shard_mb=SHARD_MB)
    assert "2 of 13 shards are complete" in capsys.readouterr().out
    assert shard_bytes(out) == shard_bytes(root / "shards") and not list(out.glob(".*.tmp-*"))


def test_a_cache_of_another_tokenizer_is_refused(made, tmp_path):
    root, _, cfg, acc = made
    other = tiny_tokenizer(tmp_path / "other.safetensors", 1)
    task = MARTask(config(other, "--data.kind=latents", f"--data.path={root / 'shards'}"))
    task.dataset()
    with pytest.raises(ValueError, match="encoded by another tokenizer .* re-cache the data"):
        task.build("cpu")
    task = MARTask(config(other, "--data.kind=latents", f"--data.path={root / 'one.safetensors'}", "--data.hflip=true"))
    task.dataset()
    with pytest.raises(ValueError, match="encoded by another tokenizer"):
        task.build("cpu")
    same = MARTask(config(cfg.tokenizer.checkpoint, "--data.kind=latents", f"--data.path={root / 'shards'}"))
    same.dataset()
    same.build("cpu")  # its own tokenizer passes
    # writing into a folder that holds another tokenizer's cache is refused too, before anything is written
    before = shard_bytes(root / "shards")
    with pytest.raises(ValueError, match="holds a complete latent cache of other data, tokenizer or options"):
        cache_latents(config(other), root / "shards", acc, shard_mb=SHARD_MB)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "shard-00001.safetensors").write_bytes((root / "shards" / "shard-00001.safetensors").read_bytes())
    with pytest.raises(ValueError, match="belongs to another latent cache .*tokenizer_fingerprint"):
        cache_latents(config(other), partial, acc, shard_mb=SHARD_MB)
    assert shard_bytes(root / "shards") == before


PEAK = """
import sys, torch
sys.path.insert(0, {root!r})
from pathlib import Path
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action
from mar.engine.latent_shards import plan_cache, write_shards

class Synthetic(torch.utils.data.Dataset):  # items made on the fly: the data itself is never held
    def __len__(self): return {n}
    def __getitem__(self, i):
        return torch.randn(16, 32, 32, generator=torch.Generator().manual_seed(i)), i % 10

plan = plan_cache({n}, (16, 32, 32), "float32", False, {shard_mb}, "fp", "synthetic", batch_size=50)
with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
    write_shards(Path({out!r}), plan, Synthetic(), lambda x: x, plan.owned(0, 1), 50, progress=False)
live = peak = 0
for _, action, _, size in prof._memory_profile().timeline:  # torch's own allocator events, whatever the OS reports
    live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
    peak = max(peak, live)
print(peak / 2**20)
"""


def test_the_writers_memory_is_bounded_by_the_shard_not_the_dataset(tmp_path):
    """3,000 items of 64 KiB (188 MiB of moments) in 4 MiB shards: the peak of the tensors alive at once (torch's
    allocator, traced by its profiler) is a few shards; in one shard (the single-file case) it is the whole cache,
    so the measure can fail. The operating system's resident-set counters are not used: they are not reported
    the same way in every sandbox."""
    n, total_mib = 3000, 3000 * 16 * 32 * 32 * 4 / 2**20

    def peak(shard_mb: float, name: str) -> float:
        (tmp_path / name).mkdir()
        code = PEAK.format(root=str(ROOT), n=n, shard_mb=shard_mb, out=str(tmp_path / name))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        return float(proc.stdout.split()[-1])

    bounded, whole = peak(4.0, "small"), peak(1024.0, "whole")
    print(f"peak tensor memory: {bounded:.1f} MiB in 4 MiB shards, {whole:.1f} MiB in one shard, cache {total_mib:.1f} MiB")
    assert bounded < 0.15 * total_mib, (bounded, total_mib)
    assert whole > 0.9 * total_mib, (whole, total_mib)
    assert len(list((tmp_path / "small").glob("shard-*"))) == -(-n // 50)  # 4 MiB hold 63 items -> 50 per shard
