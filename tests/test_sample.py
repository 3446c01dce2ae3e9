"""sample.py end to end on CPU with a tiny MAR and a tiny grey KL-VAE (random weights, made here).

Image i must be a function of (weights, settings, i) only: the same bytes at batch sizes 1, 3 and 8,
with 1 or 2 processes, and after an interrupted run is resumed. Those comparisons run sample.py in
subprocesses, as users do (the script sets MKL's reproducible mode for its own process).
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from helpers import run_launched
from mar import create_model
from mar import run as run_loader
from mar.eval import sample_folders as sampling
from mar.pipeline import decode_each, label_of
from mar.engine.checkpoint import export_safetensors, read_safetensors, save_checkpoint
from mar.config import TrainConfig, config_to_dict, load_config
from tokenizers import KLTokenizer, kl_vae_preset

ROOT = Path(__file__).resolve().parents[1]
N = 10  # images of the reference run (one per class)
DONE = re.compile(r"images in [0-9.]+ s: .*images/s|nothing generated")  # a setting's last line (main process)
TINY = dict(img_size=32, vae_stride=4, token_channels=4, num_classes=10, buffer_size=8, num_sampling_steps="5")


def perturbed(model, scale, seed):
    """Random weights everywhere (the zero-initialised DiffLoss outputs would hide the conditioning)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """A train.py-like run folder, a published-format checkpoint, and a shipped-weights folder."""
    d = tmp_path_factory.mktemp("sample_weights")
    torch.manual_seed(0)
    tok = KLTokenizer(kl_vae_preset("kl_f4_c4", in_channels=1, out_channels=1, scaling_factor=1.5))
    tok.save(d / "tokenizer.safetensors")
    overrides = [f"--model.{k}={v}" for k, v in TINY.items()] + [
        "--model.preset=mar_tiny", "--tokenizer.preset=kl_f4_c4", "--sample.num_iter=4", "--sample.cfg=2.0",
        f"--tokenizer.checkpoint={d / 'tokenizer.safetensors'}"]
    config = config_to_dict(load_config(TrainConfig, None, overrides))
    ema = perturbed(create_model("mar_tiny", generator=torch.Generator().manual_seed(0), **TINY), 0.05, 1).state_dict()
    raw = {k: v + 0.02 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) for k, v in ema.items()}
    meta = {"weights": "ema", "config": json.dumps(config), "tokenizer": json.dumps(tok.config.to_dict())}
    export_safetensors(ema, d / "run" / "mar_ema.safetensors", meta)
    save_checkpoint({"model": raw, "ema": ema, "config": config, "step": 1},
                    d / "run" / "checkpoints" / "step-00000001.pt")
    # the published layout: pickled argparse args next to "model" and "model_ema"
    torch.save({"model": raw, "model_ema": ema, "args": argparse.Namespace(model="mar_tiny")},
               d / "checkpoint-last.pth")
    # shipped weights: the two files only; the config's tokenizer path does not exist on the user's machine
    config["tokenizer"]["checkpoint"] = "/nowhere/tokenizer.safetensors"
    export_safetensors(ema, d / "shipped" / "mar_ema.safetensors", {**meta, "config": json.dumps(config)})
    shutil.copy(d / "tokenizer.safetensors", d / "shipped" / "tokenizer.safetensors")
    return d


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONUNBUFFERED="1")
    e.pop("WORLD_SIZE", None)
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(files, out, *args, processes=1):
    """sample.py --run <fixture run> in a subprocess (2 processes: accelerate launch, gloo on CPU)."""
    if processes == 1:
        launcher = [sys.executable]
    else:
        launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                    str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port())]
    cmd = [*launcher, str(ROOT / "sample.py"), "--run", str(files / "run"), "--out", str(out), *args]
    if processes == 1:
        proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    else:  # a rank hanging at exit fails fast, with the output, and none is orphaned
        proc = run_launched(cmd, env=env(), timeout=300, grace=60, done_marker=DONE)
    assert proc.returncode == 0, f"sample.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def pngs(folder):
    """{name: uint8 array} of the sample PNGs of a folder."""
    return {p.name: np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*_c*.png"))}


def assert_same_images(a, b):
    assert a.keys() == b.keys()
    for k in a:
        diff = np.abs(a[k].astype(int) - b[k].astype(int))
        assert diff.max() == 0, f"{k}: {int((diff > 0).sum())} pixels differ, by up to {diff.max()}"


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """The uninterrupted run: N images, batch 8, one process."""
    out = tmp_path_factory.mktemp("reference") / "ref"
    proc = run_script(files, out, "--num-images", str(N), "--batch-size", "8")
    assert "s/image" in proc.stdout and "images/s" in proc.stdout
    return out


def settings(folder):
    return json.loads((Path(folder) / "settings.json").read_text())


# ---------------------------------------------------------------- reproducibility
def test_reference_run_outputs(reference):
    images = pngs(reference)
    assert list(images) == [f"{i:06d}_c{i % 10:03d}.png" for i in range(N)]  # label(i) = classes[i % 10]
    assert images["000000_c000.png"].shape == (32, 32)  # grey tokenizer -> grey PNGs
    stack = np.stack(list(images.values())).astype(int)
    assert stack.std() > 10 and all((stack[0] != s).mean() > 0.5 for s in stack[1:])  # real, distinct images
    s = settings(reference)
    assert s["complete"] and s["num_images"] == N and s["key"]["cfg"] == 2.0 and s["key"]["num_iter"] == 4  # run's
    assert s["runs"][-1]["generated"] == N and s["seconds_per_image"] > 0 and s["images_per_second"] > 0
    assert (reference / "grid.png").is_file()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_same_index_same_image_at_any_batch_size(files, reference, tmp_path, batch_size):
    run_script(files, tmp_path / "out", "--num-images", str(N), "--batch-size", str(batch_size))
    assert_same_images(pngs(tmp_path / "out"), pngs(reference))


def test_two_processes_give_the_same_images(files, reference, tmp_path):
    proc = run_script(files, tmp_path / "out", "--num-images", str(N), "--batch-size", "3", processes=2)
    assert "on 2 process(es)" in proc.stdout
    last = settings(tmp_path / "out")["runs"][-1]
    assert last["num_processes"] == 2 and last["per_process"] == [5, 5]  # both ranks really worked
    assert_same_images(pngs(tmp_path / "out"), pngs(reference))


def test_interrupted_run_resumes_to_the_uninterrupted_images(files, reference, tmp_path):
    """What a SIGKILL leaves: some PNGs, temporaries of unfinished writes, even an empty file."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "grid.png").unlink()
    missing = [3, 5, 6, 9]
    for i in missing:
        (out / f"{i:06d}_c{i:03d}.png").unlink()
    (out / ".000005_c005.png.tmp-4242").write_bytes(b"\x89PNG half written")
    (out / ".settings.json.tmp-4242").write_text("{")
    (out / "000009_c009.png").touch()  # an empty file under a final name is not a complete image
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*_c*.png") if p.stat().st_size}
    proc = run_script(files, out, "--num-images", str(N), "--batch-size", "3")
    assert f"{N - len(missing)} of {N} images exist, generating {len(missing)}" in proc.stdout
    assert_same_images(pngs(out), pngs(reference))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_c*.png") if p.name in kept} == kept  # not rewritten
    assert not list(out.glob(".*tmp-*"))
    runs = settings(out)["runs"]
    assert [(r["generated"], r["kept"]) for r in runs] == [(N, 0), (len(missing), N - len(missing))]
    assert settings(out)["complete"] and (out / "grid.png").is_file()


# ---------------------------------------------------------------- in-process runs (no cross-process comparisons)
def call(capsys, *argv):
    rc = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_sweep_writes_a_folder_per_setting_with_npz_and_grid(files, tmp_path, capsys):
    rc, out, _ = call(capsys, "--run", files / "run", "--out", tmp_path, "--cfg", "1.0", "3.0",
                      "--temperature", "0.5", "1.0", "--num-images", 4, "--batch-size", 4, "--npz")
    assert rc == 0 and out.count("s/image") == 4
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["cfg1.0_temp0.5", "cfg1.0_temp1.0", "cfg3.0_temp0.5", "cfg3.0_temp1.0"]
    for name in folders:
        folder = tmp_path / name
        key = settings(folder)["key"]
        assert f"cfg{key['cfg']}_temp{key['temperature']}" == name
        images = pngs(folder)
        assert len(images) == 4
        arr = np.load(folder / "samples.npz")["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (4, 32, 32, 3)
        np.testing.assert_array_equal(arr, np.stack([np.repeat(a[..., None], 3, -1) for a in images.values()]))
        # 4 images of 10 classes: one row, 2x enlarged, 2 px white padding between tiles
        grid = np.asarray(Image.open(folder / "grid.png"))
        assert grid.shape == (2 * (2 + 32 + 2), 2 * (2 + 4 * 34))
        for j, a in enumerate(images.values()):
            np.testing.assert_array_equal(grid[4:68:2, 4 + 68 * j:68 + 68 * j:2], a)
    a, b = pngs(tmp_path / folders[0]), pngs(tmp_path / folders[3])
    assert all((a[k] != b[k]).mean() > 0.3 for k in a)  # the settings matter


def test_rerun_keeps_extends_and_refuses_other_settings(files, tmp_path, capsys):
    args = ["--run", files / "run", "--out", tmp_path, "--num-images", 4, "--batch-size", 2]
    assert call(capsys, *args)[0] == 0
    first = pngs(tmp_path)
    rc, out, _ = call(capsys, *args)
    assert rc == 0 and "all 4 images already exist" in out
    rc, out, _ = call(capsys, *args[:-4], "--num-images", 6, "--batch-size", 2)  # extending keeps 0..3
    assert rc == 0 and "4 of 6 images exist, generating 2" in out
    assert {k: v for k, v in pngs(tmp_path).items() if k in first}.keys() == first.keys()
    assert [(r["generated"], r["kept"]) for r in settings(tmp_path)["runs"]] == [(4, 0), (0, 4), (2, 4)]
    runs = settings(tmp_path)["runs"]  # the speed covers every run that generated images, not just the last
    assert settings(tmp_path)["seconds_per_image"] == pytest.approx((runs[0]["seconds"] + runs[2]["seconds"]) / 6)
    before = sorted(p.name for p in tmp_path.iterdir())
    for extra, message in [(["--cfg", "3.0"], "cfg: 2.0 there, 3.0 now"),
                           (["--seed", "1"], "seed: 0 there, 1 now"),
                           (["--no-ema"], "ema: true there, false now"),
                           (["--num-images", "3"], "beyond --num-images 3")]:
        argv = args[:-4] + ["--num-images", 6] + extra if extra[0] != "--num-images" else args[:-4] + extra
        rc, _, err = call(capsys, *argv)
        assert rc == 2 and message in err, err
        assert "--out" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_published_checkpoint_and_ema_choice(files, tmp_path, capsys):
    common = ["--num-images", 3, "--batch-size", 3]
    assert call(capsys, "--run", files / "run", "--out", tmp_path / "run_ema", *common)[0] == 0
    pub = ["--checkpoint", files / "checkpoint-last.pth", "--model", "mar_tiny", "--tokenizer",
           files / "tokenizer.safetensors", "--num-iter", 4, "--cfg", 2.0, "--num-sampling-steps", 5]
    assert call(capsys, *pub, "--out", tmp_path / "pub_ema", *common)[0] == 0
    assert call(capsys, *pub, "--no-ema", "--out", tmp_path / "pub_raw", *common)[0] == 0
    assert call(capsys, "--run", files / "run", "--no-ema", "--out", tmp_path / "run_raw", *common)[0] == 0
    assert_same_images(pngs(tmp_path / "pub_ema"), pngs(tmp_path / "run_ema"))  # sizes inferred from shapes
    assert_same_images(pngs(tmp_path / "pub_raw"), pngs(tmp_path / "run_raw"))  # step-*.pt "model" weights
    a, b = pngs(tmp_path / "pub_ema"), pngs(tmp_path / "pub_raw")
    assert all((a[k] != b[k]).mean() > 0.3 for k in a)
    assert settings(tmp_path / "pub_ema")["key"]["model"]["img_size"] == 32
    assert settings(tmp_path / "run_raw")["weights"]["mar"].endswith("step-00000001.pt")


def test_default_weights_folder_and_grid_only(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "DEFAULT_RUN", files / "shipped")
    monkeypatch.chdir(tmp_path)
    rc, out, _ = call(capsys, "--num-images", 3)  # no weights given: the shipped folder
    assert rc == 0
    made = tmp_path / "samples" / "shipped" / "cfg2.0_temp1.0"
    assert len(pngs(made)) == 3 and settings(made)["weights"]["tokenizer"].endswith("shipped/tokenizer.safetensors")
    rc, _, _ = call(capsys, "--grid-only", "--classes", "1,4", "--out", tmp_path / "grid")
    assert rc == 0 and sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["grid.png", "settings.json"]
    # default size: 8 per class, one row per class -> 2 rows of 8 tiles
    assert np.asarray(Image.open(tmp_path / "grid" / "grid.png")).shape == (2 * (2 + 2 * 34), 2 * (2 + 8 * 34))
    monkeypatch.setattr(sample, "DEFAULT_RUN", tmp_path / "nothing")
    rc, _, err = call(capsys, "--num-images", 3)
    assert rc == 2 and "no weights given: pass --run" in err


@pytest.mark.parametrize("argv,message", [
    (["--run", "{d}/missing"], "run folder not found"),
    (["--checkpoint", "{d}/missing.pth", "--model", "mar_tiny"], "checkpoint not found"),
    (["--checkpoint", "{d}/checkpoint-last.pth", "--model", "mar_small", "--tokenizer", "{d}/tokenizer.safetensors"],
     "--model mar_small: {d}/checkpoint-last.pth does not fit this model: shape mismatch"),
    (["--checkpoint", "{d}/checkpoint-last.pth", "--tokenizer", "{d}/tokenizer.safetensors"],
     "has no config: pass --model PRESET (it looks like mar_tiny)"),
    (["--run", "{d}/run", "--model", "mar_small"],
     "holds a mar_tiny model (from its config) but --model says mar_small"),
    (["--run", "{d}/run", "--classes", "0,10"], "class 10 is out of range: this model has classes 0..9"),
    (["--run", "{d}/run", "--num-iter", "65"], "--num-iter must be in [1, 64]"),
    (["--run", "{d}/run", "--grid-only", "--npz"], "drop --npz"),
    (["--run", "{d}/run", "--num-images", "0"], "must be >= 1"),
    (["--run", "{d}/run", "--tokenizer", "{d}/missing.safetensors"], "tokenizer not found"),
])
def test_errors_are_one_clear_line(files, tmp_path, capsys, argv, message):
    rc, _, err = call(capsys, *[a.format(d=files) for a in argv], "--out", tmp_path / "o")
    assert rc == 2 and message.format(d=files) in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "o").exists()


def test_conflicting_options_exit_2(files, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--run", str(files / "run"), "--num-images", "4", "--per-class", "2"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------- pure helpers
def test_labels_and_grid_layout():
    assert [label_of(i, [3, 7]) for i in range(5)] == [3, 7, 3, 7, 3]
    assert sampling.sample_name(12, [3, 7]) == "000012_c003.png"
    assert sampling.default_num_images(10) == 80 and sampling.default_num_images(1000) == 64
    # 3 classes, 7 images: 2 columns of each class, rows by class (indices 0,3 | 1,4 | 2,5)
    assert sampling.grid_layout(7, [0, 1, 2]) == ([0, 3, 1, 4, 2, 5], 2)
    assert sampling.grid_layout(5, list(range(10))) == ([0, 1, 2, 3, 4], 5)
    assert sampling.grid_layout(100, list(range(1000))) == (list(range(64)), 8)


def test_existing_samples_refuses_foreign_images(tmp_path):
    (tmp_path / "000001_c001.png").write_bytes(b"x")
    (tmp_path / "000002_c002.png").write_bytes(b"")  # empty: not complete
    assert sampling.existing_samples(tmp_path, 4, [0, 1, 2, 3]) == {1}
    with pytest.raises(sampling.SettingsMismatch, match="class 3"):
        sampling.existing_samples(tmp_path, 4, [2, 3])  # image 1 would be class 3
    with pytest.raises(sampling.SettingsMismatch, match="no settings.json"):
        sampling.check_folder(tmp_path, {}, 4, [0, 1, 2, 3])


def test_npz_streams_the_pngs(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    for i, a in enumerate(images):
        Image.fromarray(a).save(tmp_path / sampling.sample_name(i, [0, 1]))
    sampling.write_npz(tmp_path / "samples.npz", tmp_path, 5, [0, 1], chunk=2)
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"], images)


@torch.no_grad()
def test_decoding_does_not_depend_on_the_batch():
    """Float-exact: image 0 decoded from a batch of 8 generated tokens == from a batch of 1 (whose
    unpatchify strides differ); batched or channels-last decoding picks other conv kernels."""
    model = create_model("mar_tiny", generator=torch.Generator().manual_seed(0), **TINY)
    torch.manual_seed(0)
    tok = KLTokenizer(kl_vae_preset("kl_f4_c4", in_channels=1, out_channels=1)).eval()
    seq = torch.randn(8, model.seq_len, model.token_embed_dim, generator=torch.Generator().manual_seed(1))
    batch, single = model.unpatchify(seq), model.unpatchify(seq[:1])
    assert batch.stride() != single.stride()
    a, b = decode_each(tok, batch), decode_each(tok, single)
    assert torch.equal(a[:1], b)
    assert torch.equal(a, torch.cat([tok.decode(batch[j:j + 1].contiguous()) for j in range(8)]))


def test_sizes_from_a_state_dict():
    model = create_model("mar_tiny", img_size=48, vae_stride=8, token_channels=4, patch_size=2, num_classes=7,
                         buffer_size=5)
    state = model.state_dict()
    assert run_loader.infer_kwargs(state, 4, 8, "x") == dict(num_classes=7, buffer_size=5, patch_size=2, img_size=48)
    assert run_loader.guess_preset(state) == "it looks like mar_tiny"
    with torch.device("meta"):
        assert run_loader.guess_preset(create_model("mar_base").state_dict()) == "it looks like mar_base"
    assert run_loader.guess_preset({"x": torch.zeros(1)}) == "it is not a MAR state dict"


def test_evaluate_sweep_table_plot_report_and_best(files, tmp_path, capsys):
    """evaluate.py sweep: samples each cfg x temperature, scores each folder like `score` does, writes
    CSV/JSON/plots/report and names the setting with the lowest Frechet distance."""
    import csv

    import evaluate
    from mar.eval.classifier import ClassifierConfig, FashionClassifier, save_classifier
    from mar.eval.metrics import score_folder

    torch.manual_seed(0)
    clf = tmp_path / "clf.safetensors"
    save_classifier(FashionClassifier(ClassifierConfig()), clf)
    fixture = ROOT / "tests" / "fixtures" / "fashion-mnist"
    out, report = tmp_path / "sweep", tmp_path / "report.md"
    feats = ["--features", "fmnist", "--classifier", str(clf), "--fmnist-root", str(fixture), "--cpu"]
    code = evaluate.main(["sweep", "--run", str(files / "run"), "--cfg", "1.0", "3.0", "--temperature", "0.5", "1.0",
                          "--num-images", "10", "--num-iter", "4", "--ref", "fashion_mnist:test", "--out", str(out),
                          "--report", str(report), *feats])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(float(r["cfg"]), float(r["temperature"])) for r in rows] == [(1, .5), (1, 1), (3, .5), (3, 1)]
    assert all(int(r["num_images"]) == 10 for r in rows)  # also in the plots' titles
    summary = json.load(open(out / "sweep.json"))
    fds = [float(r["fd_fmnist"]) for r in rows]
    assert summary["best"]["fd_fmnist"] == min(fds) and len(set(fds)) == 4
    again = score_folder(str(out / "cfg3.0_temp1.0"), ref_stats=summary["reference"], metrics=["fid", "isc"],
                         features="fmnist", classifier=str(clf), cuda=False, fmnist_root=str(fixture))
    assert again["metrics"]["fd_fmnist"] == pytest.approx(fds[3], rel=1e-9)
    assert again["metrics"]["class_accuracy"] == pytest.approx(float(rows[3]["class_accuracy"]))
    for metric, path in summary["plots"].items():
        with Image.open(path) as im:
            assert im.size == (720, 460)
    text = report.read_text()
    assert "**(best)**" in text and "sweep_fd_fmnist.png" in text and text.count("\n| ") == 5


def test_fast_path_flags_are_opt_in_and_recorded(files, tmp_path, capsys):
    """--sampler/--diffusion-steps/--precision reach sample_tokens: other images than the exact default, and a
    folder made with them is refused for a rerun without them (they are part of the settings key)."""
    exact = tmp_path / "exact"
    fast = tmp_path / "fast"
    assert call(capsys, "--run", str(files / "run"), "--num-images", "4", "--out", str(exact))[0] == 0
    code, _, _ = call(capsys, "--run", str(files / "run"), "--num-images", "4", "--out", str(fast), "--sampler", "ddim",
                   "--diffusion-steps", "5", "2", "--precision", "bf16")
    assert code == 0
    key = settings(fast)["key"]
    assert key["sampler"] == "ddim" and key["diffusion_steps"] == [5, 2] and key["precision"] == "bf16"
    assert any((pngs(exact)[k] != pngs(fast)[k]).any() for k in pngs(exact))
    code, _, err = call(capsys, "--run", str(files / "run"), "--num-images", "4", "--out", str(fast))
    assert code == 2 and "another --out" in err
    # the feature cache and the static-shape padding are part of the key too (absent at their defaults)
    cached = tmp_path / "cached"
    assert call(capsys, "--run", str(files / "run"), "--num-images", "4", "--out", str(cached), "--feature-cache",
                "both", "--cache-refresh", "3", "--row-bucket", "16")[0] == 0
    key = settings(cached)["key"]
    assert (key["feature_cache"], key["cache_refresh"], key["row_bucket"]) == ("both", 3, 16)
    assert not {"feature_cache", "cache_refresh", "row_bucket"} & set(settings(exact)["key"])
    code, _, err = call(capsys, "--run", str(files / "run"), "--num-images", "4", "--out", str(cached))
    assert code == 2 and "another --out" in err


def test_clip_denoised_from_the_run_config_and_the_command_line(files, tmp_path, capsys):
    """The guard is off unless asked for: a run's `sample.clip_denoised` turns it on (recorded in the settings
    key), `--clip-denoised off` gives the reference images again, and a bad value is refused by argparse."""
    state, meta = read_safetensors(files / "run" / "mar_ema.safetensors")
    config = json.loads(meta["config"])
    config["sample"]["clip_denoised"] = 0.05
    guarded_run = tmp_path / "guarded_run"
    export_safetensors(state, guarded_run / "mar_ema.safetensors", {**meta, "config": json.dumps(config)})
    shutil.copy(files / "tokenizer.safetensors", guarded_run / "tokenizer.safetensors")
    common = ["--num-images", 4, "--batch-size", 4]
    assert call(capsys, "--run", files / "run", "--out", tmp_path / "ref", *common)[0] == 0
    assert call(capsys, "--run", guarded_run, "--out", tmp_path / "cfg", *common)[0] == 0
    assert call(capsys, "--run", guarded_run, "--out", tmp_path / "off", "--clip-denoised", "off", *common)[0] == 0
    assert call(capsys, "--run", files / "run", "--out", tmp_path / "cli", "--clip-denoised", "0.05", *common)[0] == 0
    keys = {name: settings(tmp_path / name)["key"] for name in ("ref", "off", "cfg", "cli")}
    assert "clip_denoised" not in keys["ref"] and "clip_denoised" not in keys["off"]
    assert keys["cfg"]["clip_denoised"] == keys["cli"]["clip_denoised"] == 0.05
    ref, guarded = pngs(tmp_path / "ref"), pngs(tmp_path / "cfg")
    assert_same_images(pngs(tmp_path / "off"), ref)
    assert list(pngs(tmp_path / "cli").values())[0].tobytes() == list(guarded.values())[0].tobytes()
    assert all((ref[k] != guarded[k]).mean() > 0.3 for k in ref)
    for bad in ("0", "-1", "abc"):
        with pytest.raises(SystemExit) as e:
            sample.main(["--run", str(files / "run"), "--clip-denoised", bad])
        assert e.value.code == 2 and "expected a positive number or 'off'" in capsys.readouterr().err
