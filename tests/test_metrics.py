"""mar.eval.metrics (torch-fidelity wrappers), mar.eval.files (image sources, statistics files) and
mar.eval.classifier (Fashion-MNIST features).

No Inception weights exist offline: the tests build a random-weights file whose BatchNorm running
statistics are calibrated on random images (otherwise features collapse), once per session. Inception
costs ~0.2 s per image and ~3.5 s per 2048-d FID on one CPU thread, so it sees 8 images per folder and
few FID computations; everything about file formats and agreement between paths is checked on the cheap
Fashion-MNIST classifier features, which go through the same torch-fidelity machinery.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as inception_module
from PIL import Image
from safetensors.torch import save_file
from torch_fidelity.utils import create_feature_extractor

from helpers import synthetic_classes, write_pngs
from mar.eval.classifier import (EXTRACTOR_NAME, ClassifierConfig, FashionClassifier, class_accuracy, cosine_lr,
                            load_classifier, predict_logits, read_classifier_metadata, register_fmnist_extractor,
                            save_classifier, to_network_input, train_classifier)
from mar.eval.files import ImageFiles, load_statistics, read_adm_npz, save_statistics, write_adm_npz
from mar.eval.metrics import (INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL,
                              compute_reference_stats, feature_space, file_sha256, folder_class_accuracy,
                              resolve_inception_weights, score_against_stats, score_folder, score_folders)

N_INCEPTION = 8  # images per folder seen by Inception


def make_random_inception(path, seed: int = 0) -> None:
    """A random-init FeatureExtractorInceptionV3 state dict, BatchNorm statistics calibrated on noise images."""
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng():
        torch.manual_seed(seed)
        mp.setattr(inception_module, "load_state_dict_from_url", lambda *a, **k: None)  # no download, no load
        mp.setattr(inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    net.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(2):
            net((torch.rand(4, 3, 32, 32, generator=g) * 255).to(torch.uint8))
    torch.save(net.state_dict(), path)


def load_folder(folder) -> torch.Tensor:
    """Independent reader: PNGs sorted by name -> uint8 (N, 3, H, W)."""
    names = sorted(os.listdir(folder))
    arrs = [np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")) for f in names]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "random-inception.pth"
    if not path.exists():
        make_random_inception(path)
    return str(path)


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.uniform(0, 255, (N_INCEPTION, 4, 4, 3)), np.ones((1, 8, 8, 1))).astype(np.uint8)
    stripes = rng.uniform(0, 255, (N_INCEPTION, 32, 32, 3))
    stripes[:, ::2] = 255 - stripes[:, ::2]
    a = write_pngs(root / "A", smooth)
    Image.fromarray(smooth[0].mean(-1).astype(np.uint8)).save(os.path.join(a, "000000.png"))  # one grey PNG
    images_c, labels_c = synthetic_classes(40, seed=1)
    return {"A": a, "B": write_pngs(root / "B", stripes.astype(np.uint8)),
            "C": write_pngs(root / "C", images_c.numpy(), labels_c.numpy()),  # class-labelled "samples"
            "D": write_pngs(root / "D", (torch.rand(40, 32, 32, generator=torch.Generator().manual_seed(2)) * 255)
                            .to(torch.uint8).numpy())}


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """A FashionClassifier trained briefly on synthetic separable classes; (path, model, held-out accuracy)."""
    torch.manual_seed(0)
    model = FashionClassifier(ClassifierConfig())
    x, y = synthetic_classes(640, seed=3)
    losses = train_classifier(model, x, y, epochs=3, batch_size=64, generator=torch.Generator().manual_seed(0))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    xt, yt = synthetic_classes(200, seed=4)
    acc = class_accuracy(model, xt, yt)
    path = str(tmp_path_factory.getbasetemp() / "classifier.safetensors")
    save_classifier(model, path, test_accuracy=acc)
    return path, model, acc


@pytest.fixture(scope="session")
def inception_ab(folders, inception_weights):
    return score_folders(folders["A"], folders["B"], inception_weights=inception_weights, cuda=False)


# --- Inception ----------------------------------------------------------------------------------------------------
def test_inception_metrics_against_different_folder_are_sane(inception_ab):
    m, meta = inception_ab["metrics"], inception_ab["meta"]
    assert set(m) == {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall", "f_score"}
    assert m["fid"] > 0 and m["kid_mean"] > 0
    assert 1.0 - 1e-9 <= m["is_mean"] <= 1008  # exp(KL) >= 1; at most the number of classes
    for k in ("precision", "recall"):
        assert 0.0 <= m[k] <= 1.0
    p, r = m["precision"], m["recall"]
    assert m["f_score"] == pytest.approx(2 * p * r / max(1e-5, p + r))
    assert (meta["num_gen"], meta["num_ref"], meta["kid_subset_size"], meta["isc_splits"]) == (N_INCEPTION,) * 4
    assert meta["feature_extractor"] == "inception-v3-compat"


def test_inception_folder_against_its_own_statistics_is_zero(folders, inception_weights, inception_ab, tmp_path):
    stats = compute_reference_stats(folders["A"], str(tmp_path / "a.npz"), inception_weights=inception_weights,
                                    cuda=False)
    with np.load(tmp_path / "a.npz") as f:
        assert set(f.files) == {"mu", "sigma"} and f["mu"].dtype == f["sigma"].dtype == np.float64
        assert f["mu"].shape == (2048,)
    assert stats.meta["num_images"] == str(N_INCEPTION)
    res = score_against_stats(folders["A"], str(tmp_path / "a.npz"), inception_weights=inception_weights, cuda=False)
    assert abs(res["metrics"]["fid"]) <= 1e-6 * inception_ab["metrics"]["fid"]
    assert res["metrics"]["is_mean"] == inception_ab["metrics"]["is_mean"]  # same generated features, same splits


def test_inception_weights_missing_gives_clear_message(monkeypatch, tmp_path):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as e:
        resolve_inception_weights(None)
    for text in (INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL, INCEPTION_WEIGHTS_ENV, "--inception-weights",
                 str(tmp_path / ".cache" / "mar")):
        assert text in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.pth.*--inception-weights"):
        resolve_inception_weights(str(tmp_path / "nope.pth"))
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(FileNotFoundError, match=f"env.pth.*{INCEPTION_WEIGHTS_ENV}"):
        resolve_inception_weights(None)
    default = tmp_path / ".cache" / "mar" / INCEPTION_WEIGHTS_FILE
    default.parent.mkdir(parents=True)
    default.write_bytes(b"x")
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV)
    assert resolve_inception_weights(None) == str(default)
    assert resolve_inception_weights(str(default)) == str(default)  # explicit path first


def test_wrong_inception_weights_file_is_rejected(classifier, tmp_path):
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(ValueError, match="not a PyTorch state dict.*" + INCEPTION_WEIGHTS_FILE):
        feature_space("inception", inception_weights=str(tmp_path / "text.pth"))
    torch.save(FashionClassifier().state_dict(), tmp_path / "other.pth")
    for wrong in (str(tmp_path / "other.pth"), classifier[0]):  # another model's weights, pickled or safetensors
        with pytest.raises(ValueError, match="not a state dict of torch-fidelity's FeatureExtractorInceptionV3"):
            feature_space("inception", inception_weights=wrong)


# --- Fashion-MNIST classifier -------------------------------------------------------------------------------------
def test_classifier_learns_separable_classes(classifier):
    assert classifier[2] >= 0.95


def test_cosine_lr_schedule():
    assert cosine_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 1.0, 10) == pytest.approx(0.5)  # halfway through the decay: (1 + cos(pi/2)) / 2
    assert cosine_lr(100, 100, 1.0, 10) == pytest.approx(0.0)


def test_to_network_input_conversions():
    g = torch.Generator().manual_seed(0)
    grey = (torch.rand(3, 28, 28, generator=g) * 255).to(torch.uint8)
    x = to_network_input(grey.unsqueeze(1).expand(3, 3, 28, 28))  # grey stored as RGB
    assert x.shape == (3, 1, 32, 32)
    assert torch.equal(x[:, 0, 2:30, 2:30], grey.float() / 127.5 - 1)
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, 30:] == -1).all()  # black padding, as mar.engine.data
    assert torch.equal(to_network_input(x), x)  # float in [-1, 1] at 32x32 passes through
    rgb = torch.tensor([30, 60, 120], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    assert torch.allclose(to_network_input(rgb), torch.full((1, 1, 32, 32), 70 / 127.5 - 1))  # channel mean
    assert to_network_input(torch.zeros(2, 64, 64, dtype=torch.uint8)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="expected images"):
        to_network_input(torch.zeros(2, 2, 32, 32))


def test_class_accuracy_matches_hand_count(classifier, folders):
    model = classifier[1]
    x, _ = synthetic_classes(20, seed=5)
    pred = predict_logits(model, x).argmax(1)
    labels = pred.clone()
    labels[:6] = (pred[:6] + 1) % 10  # exactly 6 of 20 wrong
    assert class_accuracy(model, x, labels) == pytest.approx(14 / 20)
    images = load_folder(folders["C"])
    labels_c = torch.tensor([int(f[-7:-4]) for f in sorted(os.listdir(folders["C"]))])
    hand = sum(int(model(to_network_input(images[i:i + 1])).argmax()) == int(labels_c[i]) for i in range(len(images)))
    assert folder_class_accuracy(folders["C"], classifier[0]) == pytest.approx(hand / len(images))
    assert folder_class_accuracy(folders["D"], classifier[0]) is None  # unlabelled names


def test_classifier_file_roundtrip_and_wrong_files(classifier, tmp_path):
    path, model, acc = classifier
    x, _ = synthetic_classes(8, seed=6)
    assert torch.equal(predict_logits(load_classifier(path), x), predict_logits(model, x))
    assert read_classifier_metadata(path)["test_accuracy"] == pytest.approx(acc)
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_classifier(str(tmp_path / "missing.safetensors"))
    torch.save(model.state_dict(), tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="not a safetensors classifier file"):
        load_classifier(str(tmp_path / "pickle.pth"))
    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a Fashion-MNIST classifier.*something-else"):
        load_classifier(str(tmp_path / "other.safetensors"))
    small = FashionClassifier(ClassifierConfig(widths=(8, 16, 32)))
    save_classifier(small, str(tmp_path / "small.safetensors"))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    from safetensors import safe_open
    with safe_open(str(tmp_path / "small.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "mismatch.safetensors"), metadata=meta)  # default weights, small config
    with pytest.raises(ValueError, match="do not fit"):
        load_classifier(str(tmp_path / "mismatch.safetensors"))


def test_registered_extractor_equals_network(classifier):
    path, model, _ = classifier
    name = register_fmnist_extractor()
    assert register_fmnist_extractor() == name == EXTRACTOR_NAME  # idempotent
    extractor = create_feature_extractor(name, ["features", "logits"], cuda=False,
                                         feature_extractor_weights_path=path)
    grey = (torch.rand(5, 32, 32, generator=torch.Generator().manual_seed(7)) * 255).to(torch.uint8)
    feats, logits = extractor(grey[:, None].expand(5, 3, 32, 32))
    with torch.no_grad():
        x = grey[:, None].float() / 127.5 - 1  # (5, 1, 32, 32)
        assert torch.equal(feats, model.features(x))
        assert torch.equal(logits, model(x))
        small = grey[:, 2:30, 2:30]  # 28x28: padded back with black
        padded = F.pad(small[:, None].float() / 127.5 - 1, (2, 2, 2, 2), value=-1.0)
        assert torch.equal(extractor(small[:, None].expand(5, 3, 28, 28))[0], model.features(padded))


def test_fmnist_metrics_match_torch_fidelity_public_api(folders, classifier):
    path = classifier[0]
    ours = score_folders(folders["C"], folders["D"], features="fmnist", classifier=path, cuda=False,
                         kid_subset_size=30)
    theirs = torch_fidelity.calculate_metrics(
        input1=folders["C"], input2=folders["D"], cuda=False, isc=True, fid=True, kid=True, prc=True,
        feature_extractor=EXTRACTOR_NAME, feature_extractor_weights_path=path, kid_subset_size=30,
        isc_splits=10, save_cpu_ram=True, cache=False, verbose=False)
    names = {"frechet_inception_distance": "fd_fmnist", "inception_score_mean": "is_fmnist_mean",
             "inception_score_std": "is_fmnist_std", "kernel_inception_distance_mean": "kd_fmnist_mean",
             "kernel_inception_distance_std": "kd_fmnist_std", "precision": "precision_fmnist",
             "recall": "recall_fmnist", "f_score": "f_score_fmnist"}
    assert set(ours["metrics"]) == set(names.values())  # honest names: no fid / kid / is keys
    for k, v in theirs.items():  # torch-fidelity forms mu1 - mu2 in float32; we cast mu to float64 first
        assert ours["metrics"][names[k]] == pytest.approx(v, rel=1e-6 if k.startswith("frechet") else 1e-9), k


def test_fd_fmnist_equals_closed_form(folders, classifier):
    """FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), with tr sqrt(S1 S2) = nuclear norm of
    A B^T for A = X1c / sqrt(n1 - 1), B = X2c / sqrt(n2 - 1) (X centred features): no matrix square root."""
    path, model, _ = classifier
    res = score_folders(folders["C"], folders["D"], metrics="fid", features="fmnist", classifier=path, cuda=False)
    with torch.no_grad():
        f1, f2 = (model.features(load_folder(folders[k])[:, :1].float() / 127.5 - 1).double() for k in "CD")
    a = (f1 - f1.mean(0)) / (len(f1) - 1) ** 0.5
    b = (f2 - f2.mean(0)) / (len(f2) - 1) ** 0.5
    fd = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + (a * a).sum() + (b * b).sum()
    fd = fd - 2 * torch.linalg.svdvals(a @ b.T).sum()
    assert res["metrics"]["fd_fmnist"] == pytest.approx(fd.item(), rel=1e-5)
    self_fd = score_folders(folders["C"], folders["C"], metrics="fid", features="fmnist", classifier=path, cuda=False)
    assert abs(self_fd["metrics"]["fd_fmnist"]) < 1e-6 * fd.item()


# --- statistics files ---------------------------------------------------------------------------------------------
def test_npz_and_our_statistics_give_the_same_fd(folders, classifier, tmp_path):
    path = classifier[0]
    kw = {"features": "fmnist", "classifier": path, "cuda": False}
    npz, ours = str(tmp_path / "d.npz"), str(tmp_path / "d.safetensors")
    compute_reference_stats(folders["D"], npz, **kw)
    compute_reference_stats(folders["D"], ours, format="ours", **kw)
    s_npz, s_ours = load_statistics(npz), load_statistics(ours)
    assert s_npz.mu.dtype == s_ours.sigma.dtype == np.float64 and s_npz.mu.shape == (256,)
    assert np.array_equal(s_npz.mu, s_ours.mu) and np.array_equal(s_npz.sigma, s_ours.sigma)
    assert s_ours.meta["feature_extractor"] == EXTRACTOR_NAME and s_ours.meta["num_images"] == "40"
    assert s_ours.meta["weights_sha256"] == file_sha256(path) and s_npz.meta == {}
    fd = [score_against_stats(folders["C"], p, metrics="fid", **kw)["metrics"]["fd_fmnist"] for p in (npz, ours)]
    direct = score_folders(folders["C"], folders["D"], metrics="fid", **kw)["metrics"]["fd_fmnist"]
    assert fd[0] == fd[1] == pytest.approx(direct, rel=1e-12)
    # generated images from an ADM npz (arr_0) score the same as the PNG folder they came from
    write_adm_npz(load_folder(folders["C"]).permute(0, 2, 3, 1).numpy(), str(tmp_path / "c_samples.npz"))
    from_npz = score_against_stats(str(tmp_path / "c_samples.npz"), npz, metrics="fid", **kw)
    assert from_npz["metrics"]["fd_fmnist"] == fd[0]
    with pytest.raises(ValueError, match="use the extension .npz"):
        compute_reference_stats(folders["D"], str(tmp_path / "d.npz"), format="ours", **kw)


def test_adm_npz_roundtrip_and_reference_layout(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), np.arange(5)
    write_adm_npz(images, str(tmp_path / "s.npz"), labels)
    assert np.array_equal(read_adm_npz(str(tmp_path / "s.npz")), images)
    with np.load(tmp_path / "s.npz") as f:
        assert np.array_equal(f["arr_1"], labels)
    with pytest.raises(ValueError, match=r"uint8 images \(N, H, W, 3\)"):
        write_adm_npz(images.astype(np.float32), str(tmp_path / "bad.npz"))
    # ADM reference batch layout: images plus mu/sigma (float32 mu here) and spatial statistics
    mu, sigma = rng.normal(size=4).astype(np.float32), np.eye(4)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    stats = load_statistics(str(tmp_path / "ref.npz"))
    assert stats.mu.dtype == np.float64 and np.array_equal(stats.mu, mu.astype(np.float64))
    assert np.array_equal(stats.sigma, sigma)
    save_statistics(stats, str(tmp_path / "ref.safetensors"))
    assert np.array_equal(load_statistics(str(tmp_path / "ref.safetensors")).mu, stats.mu)
    np.savez(tmp_path / "nomu.npz", arr_0=images)
    with pytest.raises(ValueError, match="holds no FID statistics"):
        load_statistics(str(tmp_path / "nomu.npz"))
    with pytest.raises(ValueError, match=".npz.*.safetensors"):
        load_statistics(str(tmp_path / "stats.pt"))


def test_mismatched_statistics_are_refused(folders, classifier, inception_weights, tmp_path):
    path = classifier[0]
    kw = {"features": "fmnist", "classifier": path, "cuda": False}
    ours = str(tmp_path / "d.safetensors")
    compute_reference_stats(folders["D"], ours, **kw)
    with pytest.raises(ValueError, match="computed with mar-fmnist-classifier features, not inception-v3-compat"):
        score_against_stats(folders["C"], ours, metrics="fid", inception_weights=inception_weights, cuda=False)
    other = str(tmp_path / "other.safetensors")
    save_classifier(FashionClassifier(), other)
    with pytest.raises(ValueError, match="other mar-fmnist-classifier weights"):
        score_against_stats(folders["C"], ours, metrics="fid", features="fmnist", classifier=other, cuda=False)
    np.savez(tmp_path / "adm.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-d but the mar-fmnist-classifier features are 256-d"):
        score_against_stats(folders["C"], str(tmp_path / "adm.npz"), metrics="fid", **kw)
    with pytest.raises(ValueError, match="kid need reference images"):
        score_against_stats(folders["C"], ours, metrics="fid,kid", **kw)
    with pytest.raises(ValueError, match="unknown metrics"):
        score_folders(folders["C"], folders["D"], metrics="fid,ppl", **kw)
    with pytest.raises(ValueError, match="--classifier"):
        feature_space("fmnist")


def test_score_folder_dispatch_and_class_accuracy(folders, classifier, tmp_path):
    path = classifier[0]
    res = score_folder(folders["C"], ref=folders["D"], metrics="fid", features="fmnist", classifier=path, cuda=False)
    assert set(res["metrics"]) == {"fd_fmnist", "class_accuracy"}
    assert res["metrics"]["class_accuracy"] == folder_class_accuracy(folders["C"], path)
    assert "not FID" in res["meta"]["descriptions"]["fd_fmnist"]
    with pytest.raises(ValueError, match="exactly one reference"):
        score_folder(folders["C"], features="fmnist", classifier=path)


def test_image_folder_reading_and_errors(tmp_path, folders):
    files = ImageFiles(folders["A"])
    grey = files[0]  # the grey PNG: three equal channels
    assert grey.dtype == torch.uint8 and grey.shape == (3, 32, 32)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert files.labels() is None and ImageFiles(folders["C"]).labels()[:3] == [
        int(f[-7:-4]) for f in sorted(os.listdir(folders["C"]))[:3]]
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFiles(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFiles(str(tmp_path / "empty"))
    write_pngs(tmp_path / "mixed", np.zeros((1, 8, 8), np.uint8))
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "mixed" / "x.png")
    with pytest.raises(ValueError, match="differ in size"):
        ImageFiles(str(tmp_path / "mixed"))


def test_sample_folder_ignores_grid_and_other_pictures(tmp_path):
    """sample.py writes grid.png beside the {index}_c{class}.png samples: only the samples are scored."""
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i:06d}_c{i % 2:03d}.png")
    Image.fromarray(np.zeros((20, 50, 3), np.uint8)).save(tmp_path / "grid.png")
    files = ImageFiles(str(tmp_path))
    assert [os.path.basename(p) for p in files.paths] == ["000000_c000.png", "000001_c001.png", "000002_c000.png"]
    assert files.labels() == [0, 1, 0]
    assert int(files[2].float().mean()) == 80


def truncated_png(path, seed: int = 0) -> None:
    """A real 32x32 noise PNG cut to half its bytes: the header (size) reads, the pixel data is short."""
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_or_garbled_image_is_reported_with_its_file_name(tmp_path, classifier):
    folder = tmp_path / "gen"
    write_pngs(folder, np.random.default_rng(1).integers(0, 256, (5, 32, 32), dtype=np.uint8))
    cut = folder / "000003.png"
    truncated_png(cut)
    files = ImageFiles(str(folder))  # the header pass reads the size of the cut file
    assert files[2].shape == (3, 32, 32)
    with pytest.raises(ValueError) as e:
        files[3]
    assert str(e.value) == f"cannot read image {cut}: OSError: image file is truncated; delete or replace the file"
    with pytest.raises(ValueError) as e:  # the same through torch-fidelity's reading
        score_folders(str(folder), str(folder), metrics="fid", features="fmnist", classifier=classifier[0], cuda=False)
    assert str(e.value) == f"cannot read image {cut}: OSError: image file is truncated; delete or replace the file"
    garbled = folder / "000004.png"
    garbled.write_bytes(b"not a PNG at all")
    with pytest.raises(ValueError) as e:  # the header pass in __init__
        ImageFiles(str(folder))
    assert str(e.value) == (f"cannot read image {garbled}: UnidentifiedImageError: cannot identify image file "
                            f"'{garbled}'; delete or replace the file")


KID_MESSAGE = ("kid_subset_size (--kid-subset-size) is {}, but KID needs subsets of at least 2 images (its unbiased "
               "estimate divides by m(m-1)): pass --kid-subset-size 2 or more (default 1000; it is capped at the "
               "number of images per set)")


def test_kid_subset_size_below_2_is_refused_before_extraction(folders, classifier, monkeypatch):
    import mar.eval.metrics as metrics_module

    kw = {"features": "fmnist", "classifier": classifier[0], "cuda": False}
    small = score_folders(folders["C"], folders["D"], metrics="kid", kid_subset_size=2, **kw)
    assert small["meta"]["kid_subset_size"] == 2 and np.isfinite(small["metrics"]["kd_fmnist_mean"])

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted")

    monkeypatch.setattr(metrics_module, "extract_features", no_extraction)
    for bad in (1, 0, -3):
        with pytest.raises(ValueError) as e:
            score_folders(folders["C"], folders["D"], metrics="fid,kid", kid_subset_size=bad, **kw)
        assert str(e.value) == KID_MESSAGE.format(bad)
    with pytest.raises(ValueError) as e:  # checked before the images or the weights are even looked at
        score_folder("missing-folder", ref="missing-too", metrics="kid", kid_subset_size=1, features="fmnist",
                     classifier="missing.safetensors")
    assert str(e.value) == KID_MESSAGE.format(1)


def fail_halfway(path_arg: int = 0):
    """A writer that leaves half a file at its target (argument ``path_arg``), then fails like a full disk."""
    def write(*args, **kwargs):
        target = args[path_arg]
        if hasattr(target, "write"):
            target.write(b"PK\x03\x04 half")
        else:
            with open(target, "wb") as f:
                f.write(b"half")
        raise OSError(28, "No space left on device")
    return write


def test_statistics_and_classifier_files_are_written_atomically(tmp_path, monkeypatch):
    import mar.eval.classifier as classifier_module
    import mar.eval.files as files_module

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3))
    old = files_module.FIDStatistics(x.mean(0), np.cov(x, rowvar=False), {"num_images": "6"})
    new = files_module.FIDStatistics(np.zeros(3), np.eye(3), {"num_images": "9"})
    for name in ("s.npz", "s.safetensors"):
        save_statistics(old, str(tmp_path / name))
    model_path = tmp_path / "clf.safetensors"
    save_classifier(FashionClassifier(ClassifierConfig(widths=(4, 8))), str(model_path), test_accuracy=0.25)
    assert sorted(os.listdir(tmp_path)) == ["clf.safetensors", "s.npz", "s.safetensors"]  # no temporaries
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}

    monkeypatch.setattr(np, "savez", fail_halfway(0))  # savez(file object, **arrays)
    monkeypatch.setattr(files_module, "save_numpy_safetensors", fail_halfway(1))  # save_file(arrays, path, ...)
    monkeypatch.setattr(classifier_module, "save_file", fail_halfway(1))
    for name in ("s.npz", "s.safetensors"):
        with pytest.raises(OSError, match="No space left"):
            save_statistics(new, str(tmp_path / name))
    with pytest.raises(OSError, match="No space left"):
        save_classifier(FashionClassifier(ClassifierConfig(widths=(4, 8))), str(model_path), test_accuracy=0.5)
    with pytest.raises(OSError, match="No space left"):
        write_adm_npz(np.zeros((1, 2, 2, 3), np.uint8), str(tmp_path / "samples.npz"))
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files intact, nothing else left
    for name in ("s.npz", "s.safetensors"):
        assert load_statistics(str(tmp_path / name)).meta.get("num_images", "6") == "6"
        np.testing.assert_array_equal(load_statistics(str(tmp_path / name)).mu, old.mu)
    assert read_classifier_metadata(str(model_path))["test_accuracy"] == 0.25
