"""The shipped Fashion-MNIST weights sample the same bytes as before the toolkit refactor.

``tests/fixtures/shipped_samples_sha256.txt`` holds the sha256 of the 20 PNGs that ``python sample.py
--num-images 20 --out X`` wrote from ``pretrained/fmnist`` at commit 07c5b8a, before the model, head and
generation loop were split into parts. The same command must give the same files, byte for byte.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "tests" / "fixtures" / "shipped_samples_sha256.txt"


def test_shipped_weights_sample_the_recorded_bytes(tmp_path):
    want = dict(reversed(line.split()) for line in LIST.read_text().splitlines() if line and not line.startswith("#"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--num-images", "20", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp_path.glob("*_c*.png"))}
    assert len(want) == 20 and got == want
