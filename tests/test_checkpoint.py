"""Plain-data checkpoints: atomic writes (even under SIGKILL), safe loads, reference MAR files, safetensors."""
from __future__ import annotations

import argparse
import os
import pickle
import random
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from mar.engine.checkpoint import (CheckpointError, capture_rng_state, checkpoint_path, export_safetensors,
                            find_latest_checkpoint, load_checkpoint, load_reference_mar_state_dict,
                            numpy_state_from_plain, numpy_state_to_plain, read_safetensors, restore_rng_state,
                            save_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def tiny_state(offset: float) -> OrderedDict:
    return OrderedDict([("z_proj.weight", torch.arange(6.0).reshape(2, 3) + offset),
                        ("z_proj.bias", torch.full((2,), offset))])


def assert_state_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)  # safetensors stores keys sorted
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_save_then_weights_only_load(tmp_path):
    obj = {"model": tiny_state(0.0), "ema": tiny_state(1.0), "step": 7, "epoch": 1, "lr": 1e-4, "name": "run",
           "config": {"optim": {"betas": [0.9, 0.95], "lr": None}}, "flags": (True, False), "dtype": torch.bfloat16}
    path = save_checkpoint(obj, tmp_path / "ckpts" / "a.pt")
    raw = torch.load(path, weights_only=True)  # readable by a plain safe torch.load
    assert_state_equal(raw["model"], obj["model"]) and raw["config"] == obj["config"]
    back = load_checkpoint(path)
    assert {k: v for k, v in back.items() if k not in ("model", "ema")} == {
        k: v for k, v in obj.items() if k not in ("model", "ema")}
    assert_state_equal(back["ema"], obj["ema"])
    assert os.listdir(tmp_path / "ckpts") == ["a.pt"]


def test_save_rejects_what_a_safe_load_could_not_read(tmp_path):
    with pytest.raises(TypeError) as e:
        save_checkpoint({"model": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "a.pt")
    assert str(e.value).startswith("checkpoint['args'] is a argparse.Namespace: checkpoints hold only tensors")
    with pytest.raises(TypeError, match=r"checkpoint\['stats'\]\[1\] is a numpy.float64"):
        save_checkpoint({"stats": [1.0, np.float64(2.0)]}, tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()


# The child replaces `open` inside mar.engine.checkpoint by a file whose write() writes half of the chunk that crosses
# 1 MiB, flushes, reports its byte count on stdout and then blocks until it is killed: a deterministic mid-write.
CHILD = r"""
import sys, threading, torch, mar.engine.checkpoint as ck
real_open = open
class Blocking:
    def __init__(self, f): self.f, self.n = f, 0
    def write(self, b):
        b = bytes(b)
        if self.n + len(b) > (1 << 20):
            self.f.write(b[: len(b) // 2]); self.f.flush()
            print(self.n + len(b) // 2, flush=True)
            threading.Event().wait()
        self.n += len(b)
        return self.f.write(b)
    def __getattr__(self, name): return getattr(self.f, name)
    def __enter__(self): return self
    def __exit__(self, *a): self.f.close()
ck.open = lambda path, mode: Blocking(real_open(path, mode))
ck.save_checkpoint({"model": {"w": torch.ones(4 << 20)}, "step": 2}, sys.argv[1])
"""


def test_writer_killed_mid_write_leaves_old_checkpoint(tmp_path):
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 1}, path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        written = int(child.stdout.readline())  # the child is now blocked inside the write
        tmp = path.with_name(f".{path.name}.tmp-{child.pid}")  # mar.io.atomic_write's temporary
        assert tmp.stat().st_size == written and written < 16 << 20  # a partial 16 MiB file
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    old = load_checkpoint(path)
    assert old["step"] == 1 and torch.equal(old["model"]["w"], torch.zeros(3))
    with pytest.raises(CheckpointError, match=rf"^{tmp} is not a valid checkpoint \(truncated or corrupt file\?"):
        load_checkpoint(tmp)
    assert find_latest_checkpoint(tmp_path) == path  # the leftover .tmp file is ignored


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_checkpoint(tmp_path / "missing.pt")
    assert str(e.value) == f"checkpoint not found: {tmp_path / 'missing.pt'}"
    good = save_checkpoint({"w": torch.randn(1000)}, tmp_path / "good.pt").read_bytes()
    for name, data in [("truncated.pt", good[: len(good) // 2]), ("garbage.pt", b"not a checkpoint" * 10),
                       ("empty.pt", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name} is not a valid checkpoint (truncated or corrupt file?")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="is not a checkpoint dict"):
        load_checkpoint(tmp_path / "list.pt")


def make_reference_checkpoint(path: Path) -> None:
    """The layout of the published MAR checkpoint-last.pth: args pickled as an argparse.Namespace."""
    args = argparse.Namespace(model="mar_base", img_size=256, vae_stride=16, blr=1e-4, lr=None, cfg=2.9,
                              use_rep=False, output_dir="./output", betas=(0.9, 0.95))
    torch.save({"model": tiny_state(0.0), "model_ema": tiny_state(5.0), "optimizer": {"state": {}, "param_groups": []},
                "epoch": 399, "scaler": {"scale": 65536.0}, "args": args}, path)


class NotAllowed:  # any other class must still be refused
    def __init__(self):
        self.x = 1


def test_reference_mar_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    make_reference_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, weights_only=True)  # safe_globals is needed
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == (f"{path} holds objects that are not plain data (argparse.Namespace), so it cannot be "
                            "loaded safely; for a reference MAR checkpoint use load_reference_mar_state_dict")
    assert_state_equal(load_reference_mar_state_dict(path), tiny_state(5.0))
    assert_state_equal(load_reference_mar_state_dict(path, ema=False), tiny_state(0.0))

    torch.save({"model": tiny_state(0.0), "epoch": 3, "args": argparse.Namespace(a=1)}, tmp_path / "no_ema.pth")
    with pytest.raises(CheckpointError) as e:
        load_reference_mar_state_dict(tmp_path / "no_ema.pth")
    assert str(e.value) == (f"{tmp_path / 'no_ema.pth'} has no 'model_ema' or 'ema' state dict; its top-level keys "
                            "are: 'model', 'epoch', 'args'; pass ema=False to load 'model'")

    torch.save({"model_ema": tiny_state(0.0), "args": NotAllowed()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as e:
        load_reference_mar_state_dict(tmp_path / "evil.pth")
    assert str(e.value) == (f"{tmp_path / 'evil.pth'} holds objects that are not plain data ({NotAllowed.__module__}"
                            ".NotAllowed), so it cannot be loaded safely; only argparse.Namespace is allowed on top "
                            "of tensors and plain containers")


def test_reference_loader_reads_our_checkpoints_and_safetensors(tmp_path):
    ours = save_checkpoint({"model": tiny_state(1.0), "ema": tiny_state(2.0), "config": {}}, tmp_path / "o.pt")
    assert_state_equal(load_reference_mar_state_dict(ours), tiny_state(2.0))
    assert_state_equal(load_reference_mar_state_dict(ours, ema=False), tiny_state(1.0))

    st = export_safetensors(tiny_state(3.0), tmp_path / "mar.safetensors", {"weights": "ema", "preset": "mar_base"})
    state, meta = read_safetensors(st)
    assert_state_equal(state, tiny_state(3.0)) and meta == {"weights": "ema", "preset": "mar_base"}
    assert_state_equal(load_reference_mar_state_dict(st), tiny_state(3.0))
    with pytest.raises(CheckpointError) as e:
        load_reference_mar_state_dict(st, ema=False)
    assert str(e.value) == f"{st} holds the 'ema' weights only; pass ema=True"
    assert sorted(os.listdir(tmp_path)) == ["mar.safetensors", "o.pt"]  # no temporary files left


def test_safetensors_errors(tmp_path):
    with pytest.raises(TypeError, match=r"metadata must map str to str; got 'step': 3"):
        export_safetensors(tiny_state(0.0), tmp_path / "a.safetensors", {"step": 3})
    with pytest.raises(TypeError, match=r"'b' is a float, not a tensor"):
        export_safetensors({"a": torch.ones(1), "b": 1.0}, tmp_path / "a.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'bad.safetensors'} is not a valid safetensors file"):
        read_safetensors(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors file not found"):
        read_safetensors(tmp_path / "none.safetensors")


def draws(generator: torch.Generator) -> list:
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist(),
            torch.rand(2, generator=generator).tolist()]


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    draws(gen)  # move away from the seeded states
    save_checkpoint({"rng": capture_rng_state(gen)}, tmp_path / "r.pt")
    expected = draws(gen)
    draws(gen)
    other = torch.Generator().manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"], other)
    assert draws(other) == expected


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.MT19937, np.random.Philox])
def test_numpy_bit_generator_state_as_plain_data(tmp_path, bit_generator):
    rng = np.random.Generator(bit_generator(123))
    rng.random(5)
    save_checkpoint({"np": numpy_state_to_plain(rng.bit_generator.state)}, tmp_path / "n.pt")
    expected = rng.random(4)
    fresh = np.random.Generator(bit_generator(0))
    fresh.bit_generator.state = numpy_state_from_plain(load_checkpoint(tmp_path / "n.pt")["np"])
    np.testing.assert_array_equal(fresh.random(4), expected)


def test_find_latest_checkpoint(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    for step in (500, 2000, 1000):
        save_checkpoint({"step": step}, checkpoint_path(tmp_path, step))
    folder = tmp_path / "checkpoints"
    (folder / "step-00009000.pt.tmp-123").write_bytes(b"partial")
    (folder / "notes.txt").write_text("x")
    assert checkpoint_path(tmp_path, 2000) == folder / "step-00002000.pt"
    latest = find_latest_checkpoint(tmp_path)
    assert latest == folder / "step-00002000.pt" and load_checkpoint(latest)["step"] == 2000
