"""Datasets: ADM center crop, image folders, IDX / Fashion-MNIST, cached latents, seeded flips and orders."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mar.engine.checkpoint import export_safetensors
from mar.engine.data import (CLASS_NAMES, EpochSampler, FashionMNISTDataset, ImageFolderDataset, LatentCacheDataset,
                      center_crop_arr, epoch_permutation, hflip_coin, item_generator, read_idx, save_latent_cache,
                      to_tensor)

FIXTURE = Path(__file__).parent / "fixtures" / "fashion-mnist"


def box_half(a: np.ndarray) -> np.ndarray:
    """PIL's BOX resize by exactly 2, by hand: separable passes (horizontal, then vertical), each rounding the
    2-pixel mean half-up to uint8."""
    a = a.astype(np.int64)
    h = (a[:, 0::2] + a[:, 1::2] + 1) // 2
    return ((h[0::2] + h[1::2] + 1) // 2).astype(np.uint8)


def test_center_crop_box_downsample_then_crop():
    # 24x16 (W x H) to 8: 16 >= 2*8 -> box to 12x8; the short side is then 8 (bicubic is the identity);
    # center crop: left = (12 - 8) // 2 = 2.
    a = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    out = np.asarray(center_crop_arr(Image.fromarray(a), 8))
    np.testing.assert_array_equal(out, box_half(a)[:, 2:10])
    # 40x64 (W x H) to 10: box twice (40x64 -> 20x32 -> 10x16), then crop top = (16 - 10) // 2 = 3
    a = np.random.default_rng(1).integers(0, 256, (64, 40, 3), dtype=np.uint8)
    out = np.asarray(center_crop_arr(Image.fromarray(a), 10))
    np.testing.assert_array_equal(out, box_half(box_half(a))[3:13])


def test_center_crop_bicubic_geometry():
    # 9x6 (W x H) to 4: no box step (6 < 8); bicubic to (round(9 * 4/6), 4) = (6, 4); crop left (6-4)//2 = 1
    a = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    expected = np.asarray(im.resize((6, 4), resample=Image.BICUBIC))[:, 1:5]
    np.testing.assert_array_equal(np.asarray(center_crop_arr(im, 4)), expected)
    # a constant image stays constant (bicubic weights sum to one) and the crop is square
    out = center_crop_arr(Image.new("RGB", (1000, 333), (10, 200, 30)), 64)
    assert out.size == (64, 64) and np.all(np.asarray(out) == np.array([10, 200, 30], dtype=np.uint8))


def test_to_tensor_range():
    im = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8))
    np.testing.assert_allclose(to_tensor(im)[:, 0, 0].numpy(), [-1.0, 1.0, 51 / 127.5 - 1], rtol=0, atol=1e-7)


def make_folder(root: Path) -> dict[str, np.ndarray]:
    """Two classes (created in reverse order), a nested sub-folder, a hidden folder and a non-image file."""
    rng = np.random.default_rng(3)
    arrays = {}
    for rel in ["zebra/b.png", "zebra/a.png", "apple/x/c.png", "apple/d.bmp"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        arrays[rel] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(arrays[rel]).save(root / rel)
    (root / "zebra" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    Image.fromarray(arrays["zebra/a.png"]).save(root / ".cache" / "e.png")
    return arrays


def test_image_folder_items(tmp_path):
    arrays = make_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, image_size=8, hflip=True, seed=5)
    assert ds.classes == ["apple", "zebra"] and len(ds) == 4
    order = ["apple/d.bmp", "apple/x/c.png", "zebra/a.png", "zebra/b.png"]
    assert [(Path(p).relative_to(tmp_path).as_posix(), y) for p, y in ds.samples] == [
        (order[0], 0), (order[1], 0), (order[2], 1), (order[3], 1)]
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i, rel in enumerate(order):
            x, y = ds[i]
            expected = torch.from_numpy(arrays[rel]).permute(2, 0, 1).float() / 127.5 - 1  # 8x8: crop is identity
            if hflip_coin(5, epoch, i):
                expected = expected.flip(-1)
            assert y == ds.samples[i][1] and torch.equal(x, expected)
    pair = ImageFolderDataset(tmp_path, image_size=8, return_pair=True)[2]
    assert torch.equal(pair[1], pair[0].flip(-1)) and pair[2] == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderDataset(tmp_path / "none")
    with pytest.raises(ValueError) as e:
        ImageFolderDataset(tmp_path)
    assert str(e.value).startswith(f"no class sub-folders in {tmp_path}: expected <root>/<class name>/<image>")
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path)
    Image.new("RGB", (16, 16)).save(tmp_path / "cls" / "good.png")
    (tmp_path / "cls" / "bad.png").write_bytes(b"this is not a PNG")
    png = (tmp_path / "cls" / "good.png").read_bytes()
    (tmp_path / "cls" / "cut.png").write_bytes(png[: len(png) // 2])
    ds = ImageFolderDataset(tmp_path, image_size=8)
    for name in ("bad.png", "cut.png"):
        with pytest.raises(ValueError) as e:
            ds[[Path(p).name for p, _ in ds.samples].index(name)]
        assert str(e.value).startswith(f"cannot read image {tmp_path / 'cls' / name}: ")


def test_image_folder_refuses_class_folders_without_images(tmp_path):
    arrays = make_folder(tmp_path)  # apple/, zebra/ with images
    for empty in ("mango/nested", "kiwi"):  # labels that would never appear
        (tmp_path / empty).mkdir(parents=True)
    (tmp_path / "kiwi" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError) as e:
        ImageFolderDataset(tmp_path, image_size=8)
    assert str(e.value) == (f"class folder(s) with no images (.jpg, .jpeg, .png, .bmp, .webp, .ppm, .pgm, .tif, .tiff) "
                            f"in {tmp_path}: kiwi, mango; add images to them or remove them (every sub-folder of "
                            "the root whose name does not start with '.' is a class)")
    Image.fromarray(arrays["apple/d.bmp"]).save(tmp_path / "mango" / "nested" / "m.png")  # nested images count
    (tmp_path / "kiwi" / "notes.txt").unlink()
    (tmp_path / "kiwi").rmdir()
    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert ds.classes == ["apple", "mango", "zebra"] and sorted({y for _, y in ds.samples}) == [0, 1, 2]


def test_flips_reproducible_from_seed_epoch_index():
    coins = [hflip_coin(7, 3, i) for i in range(1000)]
    assert coins == [hflip_coin(7, 3, i) for i in range(1000)]
    assert 430 < sum(coins) < 570  # a fair coin: 500 +- 4.4 sigma
    assert coins != [hflip_coin(7, 4, i) for i in range(1000)] and coins != [hflip_coin(8, 3, i) for i in range(1000)]
    # the coin is the first draw of the item's own generator
    assert coins[:50] == [bool(torch.randint(2, (), generator=item_generator(7, 3, i))) for i in range(50)]


def test_epoch_order_and_sampler():
    p = epoch_permutation(50, seed=1, epoch=2)
    assert p.dtype == torch.int64 and sorted(p.tolist()) == list(range(50))
    assert torch.equal(p, epoch_permutation(50, 1, 2)) and not torch.equal(p, epoch_permutation(50, 1, 3))
    shards = []
    for rank in range(3):
        s = EpochSampler(50, seed=1, rank=rank, world_size=3)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(s) == 16 and shards[-1] == p[:48][rank::3].tolist()
        s.set_epoch(2, start=5)
        assert list(s) == shards[-1][5:] and len(s) == 11
    assert sorted(i for shard in shards for i in shard) == sorted(p[:48].tolist())


def write_idx(path: Path, arr: np.ndarray, magic: int | None = None, gz: bool = False, cut: int = 0) -> Path:
    data = struct.pack(">I", magic if magic is not None else 0x800 + arr.ndim)
    data += struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    data = data[: len(data) - cut]
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_read_idx_hand_made(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (False, True):
        out = read_idx(write_idx(tmp_path / f"a{gz}", arr, gz=gz), ndim=3)
        assert out.dtype == np.uint8 and np.array_equal(out, arr)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l", np.array([3, 1, 4]))), [3, 1, 4])
    with pytest.raises(ValueError) as e:
        read_idx(write_idx(tmp_path / "m", arr, magic=0x903), ndim=3)
    assert str(e.value) == f"{tmp_path / 'm'} is not a valid uint8 IDX file: magic number 00000903, expected 00000803"
    with pytest.raises(ValueError) as e:
        read_idx(tmp_path / "l", ndim=3)  # a label file where images are expected
    assert str(e.value) == f"{tmp_path / 'l'} is not a valid uint8 IDX file: magic number 00000801, expected 00000803"
    with pytest.raises(ValueError) as e:
        read_idx(write_idx(tmp_path / "t", arr, cut=5, gz=True))
    assert str(e.value) == (f"{tmp_path / 't'}: 35 bytes do not match its header (sizes [2, 3, 4] -> 40 bytes): "
                            "the file is truncated or corrupt")
    (tmp_path / "z").write_bytes(gzip.compress(b"x" * 100)[:20])
    with pytest.raises(ValueError, match=r"is not a valid IDX file: corrupt gzip data"):
        read_idx(tmp_path / "z")
    with pytest.raises(FileNotFoundError, match="IDX file not found"):
        read_idx(tmp_path / "none")


def test_read_idx_fixture():
    images = read_idx(FIXTURE / "train-images-idx3-ubyte.gz", ndim=3)
    labels = read_idx(FIXTURE / "train-labels-idx1-ubyte.gz", ndim=1)
    raw = gzip.decompress((FIXTURE / "train-images-idx3-ubyte.gz").read_bytes())
    assert raw[:16] == struct.pack(">IIII", 2051, 200, 28, 28)  # the 16-byte image header, by hand
    np.testing.assert_array_equal(images.reshape(-1), np.frombuffer(raw[16:], dtype=np.uint8))
    # golden values: the first labels of Fashion-MNIST train (Debian dataset-fashion-mnist, read once by hand)
    assert labels[:12].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9]
    assert images.shape == (200, 28, 28) and int(images[0].sum()) == 76247 and int(images.sum()) == 11409065


def test_fashion_mnist_dataset():
    ds = FashionMNISTDataset(FIXTURE, split="train", pad_to=32, hflip=True, seed=1)
    raw = read_idx(FIXTURE / "train-images-idx3-ubyte.gz")
    assert len(ds) == 200 and len(FashionMNISTDataset(FIXTURE, split="test")) == 200
    for i in range(20):
        x, y = ds[i]
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and CLASS_NAMES[y] == CLASS_NAMES[ds.labels[i]]
        inner = torch.from_numpy(raw[i]).float() / 127.5 - 1
        if hflip_coin(1, 0, i):
            inner = inner.flip(-1)
        assert torch.equal(x[0, 2:30, 2:30], inner)  # centered: 2 pixels of background each side
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert torch.all(x[0][border] == -1.0)
    assert FashionMNISTDataset(FIXTURE, pad_to=None)[0][0].shape == (1, 28, 28)
    x, xf, y = FashionMNISTDataset(FIXTURE, return_pair=True)[3]
    assert torch.equal(xf, x.flip(-1)) and y == 3 and CLASS_NAMES[9] == "Ankle boot"


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        FashionMNISTDataset(tmp_path)
    assert str(e.value) == (
        f"Fashion-MNIST file train-images-idx3-ubyte.gz not found in {tmp_path}: install the Debian package "
        "dataset-fashion-mnist (apt-get update && apt-get install -y dataset-fashion-mnist) or pass "
        "data.path=<folder with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz>")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        FashionMNISTDataset(FIXTURE, split="val")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))  # raw (not gzipped) files
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 2]))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        FashionMNISTDataset(tmp_path)


def test_latent_cache_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(6, 4, 2, 2, generator=g).half()  # (N, 2C, h, w), C = 2
    flipped = moments.flip(-1)
    labels = torch.tensor([5, 4, 3, 2, 1, 0])
    path = tmp_path / "cache" / "latents.safetensors"
    save_latent_cache(path, moments, flipped, labels, {"tokenizer": "kl16", "image_size": "256"})
    ds = LatentCacheDataset(path, hflip=True, seed=9)
    assert len(ds) == 6 and ds.moments_shape == (4, 2, 2) and ds.meta["tokenizer"] == "kl16"
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(6):
            m, y = ds[i]
            expected = flipped[i] if hflip_coin(9, epoch, i) else moments[i]
            assert y == 5 - i and m.dtype == torch.float32 and torch.equal(m, expected.float())
    clone = pickle.loads(pickle.dumps(ds))  # as sent to DataLoader workers
    assert torch.equal(clone[2][0], ds[2][0])
    plain = LatentCacheDataset(path, hflip=False)
    assert all(torch.equal(plain[i][0], moments[i].float()) for i in range(6))
    with pytest.raises(IndexError):
        plain[6]


def test_latent_cache_errors(tmp_path):
    m = torch.zeros(3, 4, 2, 2)
    save_latent_cache(tmp_path / "noflip.safetensors", m, None, torch.arange(3))
    with pytest.raises(ValueError, match="holds no flipped moments: pass hflip=False"):
        LatentCacheDataset(tmp_path / "noflip.safetensors")
    with pytest.raises(ValueError, match=r"moments must be \(N, 2C, h, w\) float16/float32"):
        save_latent_cache(tmp_path / "x.safetensors", m[0], None, torch.arange(3))
    with pytest.raises(ValueError, match="moments_flip"):
        save_latent_cache(tmp_path / "x.safetensors", m, m[:2], torch.arange(3))
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(3,\)"):
        save_latent_cache(tmp_path / "x.safetensors", m, None, torch.zeros(3))
    export_safetensors({"moments": m, "labels": torch.arange(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="is not a latent cache written by save_latent_cache"):
        LatentCacheDataset(tmp_path / "other.safetensors", hflip=False)
    with pytest.raises(FileNotFoundError, match="latent cache not found"):
        LatentCacheDataset(tmp_path / "none.safetensors")
