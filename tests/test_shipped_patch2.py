"""The shipped patch-2 MAR (pretrained/fmnist/mar_patch2_ema.safetensors) loads from any folder and samples
garments of the classes asked for: the shipped evaluation classifier, an independent network, names the class
of most of them. Its 10,000-sample figures are in pretrained/fmnist/README.md; this checks that the committed
file and the code still agree, at a size the CI machine samples in seconds."""
import os
import subprocess
import sys
from pathlib import Path

from mar.eval.metrics import folder_class_accuracy

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "pretrained" / "fmnist" / "mar_patch2_ema.safetensors"


def test_shipped_patch2_weights_sample_the_classes_asked_for(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    # From a folder outside the repository: the tokenizer is found beside the weights.
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(WEIGHTS), "--cfg", "7",
                           "--num-iter", "8", "--num-sampling-steps", "25", "--num-images", "40", "--seed", "3",
                           "--out", str(tmp_path / "s")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted((tmp_path / "s").glob("*_c*.png"))
    assert len(files) == 40 and len({int(f.stem.split("_c")[1]) for f in files}) == 10
    acc = folder_class_accuracy(str(tmp_path / "s"), str(ROOT / "pretrained" / "fmnist" / "classifier.safetensors"))
    # At cfg 7: 96.0 % of 500 samples, 94.8 % of 10,000; chance is 10 %, the 64-token default weights give 89.9 %.
    assert acc >= 0.8, acc
