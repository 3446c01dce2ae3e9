"""The offline perceptual loss (tokenizers/perceptual.py): the distance against its formula, gradients only into
the images, the file round trip and its messages; the KL-VAE objective with the term; the feature_net task and a
tokenizer run that uses its file and exports its EMA weights, through train.py; Fashion-MNIST split parts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mar.engine.data import FashionMNISTDataset, parse_split
from tokenizers import KLTokenizer, KLVAEObjective, VAETrainConfig, kl_vae_preset
from tokenizers.perceptual import PerceptualLoss, PerceptualNet, PerceptualNetConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fashion-mnist"


def tiny_net(seed: int = 0) -> PerceptualNet:
    torch.manual_seed(seed)
    return PerceptualNet(PerceptualNetConfig(widths=(8, 16), groups=4)).double()


def test_distance_equals_its_formula_and_only_the_images_get_gradient():
    net = tiny_net()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    loss = PerceptualLoss(net)
    d = loss(x, y)
    expected = []
    for i in range(2):
        per_layer = []
        for a, b in zip(net.features(x[i:i + 1]), net.features(y[i:i + 1])):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            per_layer.append(((a - b) ** 2).sum(1).mean())
        expected.append(torch.stack(per_layer).mean())
    assert torch.allclose(d, torch.stack(expected), rtol=1e-10, atol=0)
    assert len(net.features(x)) == 3  # the stem and two stages
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert loss(x, x).abs().max() < 1e-12
    loss.train()
    assert not loss.net.training  # the network stays in eval mode inside a training objective


def test_file_round_trip_and_messages(tmp_path):
    net = tiny_net().float()
    net.save(tmp_path / "p.safetensors", steps=5)
    back = PerceptualNet.load(tmp_path / "p.safetensors")
    x = torch.rand(1, 1, 16, 16)
    assert back.config == net.config and torch.equal(back(x), net(x))
    with pytest.raises(FileNotFoundError, match="fmnist_perceptual.yaml"):
        PerceptualNet.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        PerceptualNet.load(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "mar-fmnist-classifier"})
    with pytest.raises(ValueError, match="not a perceptual network file"):
        PerceptualNet.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="go together"):
        VAETrainConfig(perceptual_weight=1.0)
    with pytest.raises(ValueError, match="divisible"):
        PerceptualNetConfig(widths=(6, 16), groups=4)


def test_objective_adds_the_weighted_term(tmp_path):
    tiny_net().float().save(tmp_path / "p.safetensors")
    cfg = kl_vae_preset("kl_f4_c4", in_channels=1, out_channels=1, block_out_channels=(8, 16, 16), layers_per_block=1,
                        norm_num_groups=4, encoder_attention=False, mid_block_add_attention=False)
    torch.manual_seed(0)
    obj = KLVAEObjective(KLTokenizer(cfg), VAETrainConfig(disc_weight=0.0, kl_weight=0.1, perceptual_weight=0.7,
                                                         perceptual_net=str(tmp_path / "p.safetensors")))
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    loss, logs = obj(x, 0, torch.Generator().manual_seed(4))
    terms = obj.terms(x, torch.Generator().manual_seed(4))
    assert torch.allclose(loss, terms["recon"] + 0.1 * terms["kl"] + 0.7 * terms["perceptual"], rtol=1e-6)
    assert logs["perceptual"] > 0
    # the perceptual network's weights are not trained
    trained = {id(p) for group in obj.param_groups(1e-3, 0.0) for p in group["params"]}
    assert not trained & {id(p) for p in obj.perceptual.parameters()}
    three = dict(in_channels=3, out_channels=3)
    with pytest.raises(ValueError, match="1-channel images"):
        KLVAEObjective(KLTokenizer(kl_vae_preset("kl_f4_c4", **three, block_out_channels=(8, 16, 16), norm_num_groups=4)),
                       VAETrainConfig(perceptual_weight=1.0, perceptual_net=str(tmp_path / "p.safetensors")))


def test_split_parts():
    assert parse_split("train") == ("train", None) and parse_split("test[10:20]") == ("test", slice(10, 20))
    assert parse_split("train[:150]") == ("train", slice(None, 150))
    full = FashionMNISTDataset(FIXTURE, split="train")
    head, tail = FashionMNISTDataset(FIXTURE, split="train[:150]"), FashionMNISTDataset(FIXTURE, split="train[150:]")
    assert (len(head), len(tail)) == (150, 50)
    assert torch.equal(tail[0][0], full[150][0]) and tail[0][1] == full[150][1]
    for bad in ("valid", "train[1]", "train[a:b]"):
        with pytest.raises(ValueError, match="split must be"):
            parse_split(bad)
    with pytest.raises(ValueError, match="is empty"):
        FashionMNISTDataset(FIXTURE, split="train[500:]")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_feature_net_then_a_tokenizer_with_its_perceptual_term_through_train_py(tmp_path):
    small = ["--optim.batch_size=8", f"--data.path={FIXTURE}", "--train.log_every_steps=1"]
    run("--config", str(ROOT / "configs" / "fmnist_perceptual.yaml"), *small, "--data.split=train[:100]",
        "--perceptual.widths=[8, 16, 16]", "--train.max_steps=3", f"--train.output_dir={tmp_path / 'feat'}", cwd=tmp_path)
    feat = tmp_path / "feat" / "perceptual.safetensors"
    net = PerceptualNet.load(feat)
    ckpt = torch.load(tmp_path / "feat" / "checkpoints" / "step-00000003.pt", weights_only=True)
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in net.state_dict().items())  # the EMA weights
    assert net.config.widths == (8, 16, 16)
    run("--config", str(ROOT / "configs" / "fmnist_tokenizer_perceptual.yaml"), *small, "--train.max_steps=2",
        f"--vae.perceptual_net={feat}", f"--train.output_dir={tmp_path / 'tok'}", cwd=tmp_path)
    ckpt = torch.load(tmp_path / "tok" / "checkpoints" / "step-00000002.pt", weights_only=True)
    assert any(k.startswith("perceptual.net.") for k in ckpt["model"])
    exported = load_file(str(tmp_path / "tok" / "tokenizer.safetensors"))
    ema = {k.removeprefix("vae."): v for k, v in ckpt["ema"].items()}
    raw = {k.removeprefix("tokenizer.vae."): v for k, v in ckpt["model"].items() if k.startswith("tokenizer.")}
    key = next(k for k in exported if k.endswith("conv_in.weight"))
    short = key.removeprefix("vae.")
    assert torch.equal(exported[key], ema[short]) and not torch.equal(exported[key], raw[short])  # vae.export_ema
