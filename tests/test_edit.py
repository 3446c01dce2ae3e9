"""Zero-shot editing (mar.edit, mar.generate.masked with known tokens, sample.py edit).

The rules of the docstring of mar/edit.py, each checked: known tokens kept bit for bit, an all-unknown mask is
plain sampling, schedules count from the unknown count, rows with different unknown counts equal the rows run
one by one, the pixel -> token rule; then the shipped Fashion-MNIST weights inpaint 200 real test images.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from mar.config import SamplingOptions
from mar.edit import edit_tokens, known_tokens, region_mask, token_unknown
from mar.engine.data import FashionMNISTDataset
from mar.eval.classifier import class_accuracy, load_classifier
from mar.generate import masked
from mar.pipeline import decode_each, image_generators
from mar.run import load_run
from mar.schedules import cfg_scales, generation_schedule
from test_fast_path import tiny_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fashion-mnist"
GENS = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731


def _known(b, L, C, seed=0):
    return torch.randn(b, L, C, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg,options", [(1.0, SamplingOptions()), (3.0, SamplingOptions()),
                                         (2.0, SamplingOptions(sampler="ddim", diffusion_steps_schedule=(6, 3)))])
def test_known_tokens_are_kept_bit_for_bit(cfg, options):
    model = tiny_model()
    b, L, C = 3, model.seq_len, model.token_embed_dim
    known = torch.zeros(b, L, dtype=torch.bool)
    known[0, :8], known[1, ::3], known[2, 5] = True, True, True
    values = _known(b, L, C)
    out = masked(model, b, labels=torch.tensor([1, 2, 3]), num_iter=4, cfg=cfg, generator=GENS([1, 2, 3]),
                 options=options, known_tokens=values, known_mask=known)
    assert torch.equal(out[known], values[known])
    assert (out[~known] != 0).all() and not torch.allclose(out[~known], values[~known])  # the rest was generated


def test_all_unknown_is_plain_sampling_with_the_same_seed():
    model = tiny_model()
    b, L, C = 2, model.seq_len, model.token_embed_dim
    kw = dict(labels=torch.tensor([4, 7]), num_iter=5, cfg=2.5)
    for generator in (lambda: torch.Generator().manual_seed(3), lambda: GENS([10, 11])):
        plain = masked(model, b, generator=generator(), **kw)
        edited = masked(model, b, generator=generator(), known_tokens=_known(b, L, C),
                        known_mask=torch.zeros(b, L, dtype=torch.bool), **kw)
        assert torch.equal(plain, edited)
    # and through the image API: a mask that regenerates every pixel = sample_tokens with the images' seeds
    run_model, tok = tiny_model(img_size=16), _tokenizer()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    tokens, known = edit_tokens(run_model, tok, images, torch.ones(2, 16, 16, dtype=torch.bool), torch.tensor([4, 7]),
                                indices=[5, 9], seed=1, num_iter=5, cfg=2.5)
    assert not known.any()
    plain = run_model.sample_tokens(2, num_iter=5, cfg=2.5, labels=torch.tensor([4, 7]),
                                    generator=image_generators(1, [5, 9], "cpu"))
    assert torch.equal(run_model.unpatchify(tokens), plain)


def _tokenizer():
    from tokenizers import KLTokenizer, kl_vae_preset

    torch.manual_seed(0)
    return KLTokenizer(kl_vae_preset("kl_f4_c4", in_channels=1, out_channels=1, scaling_factor=1.5)).eval()


def test_rows_with_different_unknown_counts_equal_the_rows_one_by_one():
    model = tiny_model()
    b, L, C = 4, model.seq_len, model.token_embed_dim
    known = torch.zeros(b, L, dtype=torch.bool)
    known[0, :4], known[1, :12], known[3, 2:9] = True, True, True  # U = 12, 4, 16, 9
    values, labels = _known(b, L, C, 1), torch.tensor([0, 3, 6, 9])
    kw = dict(num_iter=6, cfg=2.0)
    batch = masked(model, b, labels=labels, generator=GENS(range(20, 24)), known_tokens=values, known_mask=known,
                   **kw)
    for i in range(b):
        one = masked(model, 1, labels=labels[i:i + 1], generator=GENS([20 + i]), known_tokens=values[i:i + 1],
                     known_mask=known[i:i + 1], **kw)
        err = (one[0] - batch[i]).abs().max() / batch[i].abs().max()
        assert err < 1e-5, (i, err)
        assert torch.equal(one[0][known[i]], batch[i][known[i]])


def test_schedules_count_from_the_unknown_tokens():
    """A recording head: each row predicts generation_schedule(U, K) tokens per step, under the linear CFG scale
    of U, and only its unknown positions, each once."""
    model = tiny_model(img_size=16, vae_stride=1)  # L = 256
    L, C = model.seq_len, model.token_embed_dim
    known = torch.zeros(1, L, dtype=torch.bool)
    known[0, :156] = True  # U = 100
    calls = []

    def record(z, *, temperature, cfg, generator, options, num_steps=None):
        calls.append((z.shape[0] // 2, cfg))
        return torch.full((z.shape[0] // 2, C), float(len(calls)))

    model.diffloss.sample = record
    out = masked(model, 1, labels=torch.tensor([2]), num_iter=16, cfg=4.0, generator=GENS([0]),
                 known_tokens=torch.zeros(1, L, C), known_mask=known)
    after = generation_schedule(100, 16)
    counts = [b - a for b, a in zip([100] + after[:-1], after)]
    scales = cfg_scales(4.0, "linear", 100, after)
    assert [c for c, _ in calls] == [c for c in counts if c]
    assert [s for _, s in calls] == pytest.approx([s for c, s in zip(counts, scales) if c])
    written = out[0, :, 0]
    assert (written[:156] == 0).all() and (written[156:] > 0).all()
    assert [int((written == k).sum()) for k in range(1, len(calls) + 1)] == [c for c in counts if c]


def test_a_token_is_unknown_if_any_pixel_of_its_patch_is():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 32, 32, generator=g) > 0.995  # a few scattered pixels
    got = token_unknown(pixels, 4)
    want = torch.tensor([[bool(pixels[n, 4 * r:4 * r + 4, 4 * c:4 * c + 4].any()) for r in range(8) for c in range(8)]
                         for n in range(2)])
    assert torch.equal(got, want) and 0 < got.sum() < 128
    one = torch.zeros(1, 32, 32, dtype=torch.bool)
    one[0, 17, 30] = True  # pixel (y 17, x 30) -> token row 4, column 7
    assert token_unknown(one, 4).nonzero().tolist() == [[0, 4 * 8 + 7]]
    with pytest.raises(ValueError, match="multiple of the 4-pixel token size"):
        token_unknown(torch.zeros(1, 30, 32, dtype=torch.bool), 4)


def test_region_masks():
    assert region_mask("lower-half", 32, 32)[16:].all() and not region_mask("lower-half", 32, 32)[:16].any()
    assert region_mask("left-half", 8, 6).sum() == 8 * 3
    centre = region_mask("center:16", 32, 32)
    assert centre[8:24, 8:24].all() and centre.sum() == 256
    assert region_mask("box:2,3,5,9", 16, 16).nonzero().min(0).values.tolist() == [3, 2]
    for bad in ("middle", "center:40", "box:5,5,2,9", "box:1,2,3"):
        with pytest.raises(ValueError, match="unknown region"):
            region_mask(bad, 32, 32)


# ------------------------------------------------------------------ the shipped weights on real images
@pytest.fixture(scope="module")
def shipped():
    return load_run(None)


def test_shipped_weights_inpaint_the_lower_half_of_200_test_images(shipped):
    """200 real Fashion-MNIST test images, lower half masked, generated under their own class with the shipped
    weights and their config's settings (cfg 3, 16 steps, 100 diffusion steps, guard 5), the exact sampler.
    Measured (2026-12-01, this project's CPU): class accuracy 87.0 % (the tokenizer's reconstructions of the same
    images 89.0 %, the images 92.5 %); the kept half differs from the tokenizer's reconstruction by 0.019 on
    average (pixels in [-1, 1]: 2.4 grey levels), 0.10 for the worst image. About 2 minutes on 2 cores."""
    model, tok, d = shipped.model, shipped.tokenizer, shipped.sample_defaults
    ds = FashionMNISTDataset(FIXTURE, split="test")
    x = torch.stack([ds[i][0] for i in range(200)])
    y = torch.tensor([ds[i][1] for i in range(200)])
    lower = region_mask("lower-half", 32, 32).expand(200, -1, -1)
    tokens, known = edit_tokens(model, tok, x, lower, y, indices=list(range(200)), seed=0, num_iter=d.num_iter,
                                cfg=d.cfg, options=d.sampling_options())
    kept = known_tokens(model, tok, x)
    assert known.sum(1).eq(32).all() and torch.equal(tokens[known], kept[known])  # upper 4 token rows, exactly
    out, recon = decode_each(tok, model.unpatchify(tokens)), decode_each(tok, model.unpatchify(kept))
    diff = (out[..., :16, :] - recon[..., :16, :]).abs()  # the known upper half, in pixel units of [-1, 1]
    assert diff.mean() < 0.03 and diff.mean((1, 2, 3)).max() < 0.2
    classifier = load_classifier(str(ROOT / "pretrained" / "fmnist" / "classifier.safetensors"))
    accuracy = class_accuracy(classifier, tok.to_uint8(out)[..., 0], y)
    assert accuracy >= 0.85, accuracy


def test_sample_py_edit_writes_results_inputs_grid_and_resumes(tmp_path, capsys):
    out = tmp_path / "edit"
    argv = ["edit", "--input", "fashion_mnist:test:0-2", "--fmnist-root", str(FIXTURE), "--mask", "lower-half",
            "--variations", "3", "--num-iter", "4", "--sampler", "ddim", "--diffusion-steps", "5", "5",
            "--out", str(out)]
    assert sample.main(argv) == 0, capsys.readouterr().err
    labels = [FashionMNISTDataset(FIXTURE, split="test")[i][1] for i in range(2)]
    names = sorted(p.name for p in out.glob("*_c*.png"))
    assert names == [f"{r:06d}_c{labels[r // 3]:03d}.png" for r in range(6)]
    assert sorted(p.name for p in (out / "inputs").iterdir()) == ["000.png", "001.png"]
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[:2] == (2 * (2 + 2 * 34), 2 * (2 + 5 * 34))  # 2 rows of input | mask | 3 results, x2
    results = [np.asarray(Image.open(out / n)).astype(int) for n in names]
    assert all((results[0] != r).mean() > 0.05 for r in results[1:3])  # variations differ...
    assert all(np.abs(results[0][:12] - r[:12]).mean() < 8 for r in results[1:3])  # ...in the regenerated half
    settings = json.loads((out / "settings.json").read_text())
    assert settings["complete"] and settings["key"]["variations"] == 3
    before = {n: (out / n).read_bytes() for n in names}
    assert sample.main(argv) == 0 and "(0 made now)" in capsys.readouterr().out  # a rerun keeps them
    assert {n: (out / n).read_bytes() for n in names} == before
    rc = sample.main([*argv, "--cfg", "2.0"])
    assert rc == 2 and "holds edits made with other inputs or settings" in capsys.readouterr().err


def test_sample_py_edit_outpaints_and_edits_the_class(tmp_path, capsys):
    x, _ = FashionMNISTDataset(FIXTURE, split="test", pad_to=28)[0]  # a real 28 px image, as a file
    Image.fromarray(((x[0] + 1) * 127.5).round().byte().numpy()).save(tmp_path / "boot.png")
    common = ["--variations", "1", "--num-iter", "4", "--sampler", "ddim", "--diffusion-steps", "5", "5"]
    for folder, extra in (("uncrop", []), ("pasted", ["--composite"])):
        rc = sample.main(["edit", "--input", str(tmp_path / "boot.png"), "--keep", "center:16", "--class", "8",
                          "--out", str(tmp_path / folder), *common, *extra])
        assert rc == 0, capsys.readouterr().err
        capsys.readouterr()
        assert [p.name for p in (tmp_path / folder).glob("*_c*.png")] == ["000000_c008.png"]  # under class 8
    given = np.asarray(Image.open(tmp_path / "uncrop" / "inputs" / "000.png")).astype(int)  # padded to 32
    made, pasted = (np.asarray(Image.open(tmp_path / f / "000000_c008.png")).astype(int) for f in ("uncrop", "pasted"))
    inside = region_mask("center:16", 32, 32).numpy()
    assert (made[~inside] != given[~inside]).mean() > 0.3  # the canvas around the kept centre is generated
    assert np.abs(made[inside] - given[inside]).mean() < 40  # the centre: the tokenizer's, shifted by its context
    assert np.array_equal(pasted[inside], given[inside]) and np.array_equal(pasted[~inside], made[~inside])
    rc = sample.main(["edit", "--input", str(tmp_path / "boot.png"), "--mask", "upper-half",
                      "--out", str(tmp_path / "x"), *common])
    err = capsys.readouterr().err.splitlines()[-1]
    assert rc == 2 and err.startswith("error: ") and "pass --class K" in err and not (tmp_path / "x").exists()
    rc = sample.main(["edit", "--input", str(tmp_path / "boot.png"), "--mask", "middle", "--class", "1",
                      "--out", str(tmp_path / "y"), *common])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "unknown region 'middle'" in err and not (tmp_path / "y").exists()


def test_sample_py_edit_with_a_published_format_checkpoint_on_an_rgb_photo(tmp_path, capsys):
    """The published layout (checkpoint-last.pth: pickled args, model / model_ema, no config) with --model and
    --tokenizer, on an RGB photo larger than the model (the ADM centre crop)."""
    import argparse

    from mar import create_model
    from tokenizers import KLTokenizer, kl_vae_preset

    torch.manual_seed(0)
    KLTokenizer(kl_vae_preset("kl_f4_c4", scaling_factor=1.5)).save(tmp_path / "tok.safetensors")  # RGB
    model = create_model("mar_tiny", img_size=32, vae_stride=4, token_channels=4, num_classes=10, buffer_size=4,
                         generator=torch.Generator().manual_seed(0))
    state = model.state_dict()
    torch.save({"model": state, "model_ema": state, "args": argparse.Namespace(model="mar_tiny")},
               tmp_path / "checkpoint-last.pth")
    photo = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    rc = sample.main(["edit", "--checkpoint", str(tmp_path / "checkpoint-last.pth"), "--model", "mar_tiny",
                      "--tokenizer", str(tmp_path / "tok.safetensors"), "--input", str(tmp_path / "photo.png"),
                      "--mask", "box:0,0,16,32", "--class", "7", "--variations", "2", "--num-iter", "3",
                      "--num-sampling-steps", "4", "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    made = sorted((tmp_path / "out").glob("*_c007.png"))
    assert len(made) == 2 and np.asarray(Image.open(made[0])).shape == (32, 32, 3)
    assert np.asarray(Image.open(tmp_path / "out" / "inputs" / "000.png")).shape == (32, 32, 3)
