"""HART's residual head and the continuous next-scale model, against independent computations (tiny sizes)."""
import pytest
import torch

from mar.generate_scales import next_scale
from mar.hart import create_hart
from mar.next_scale_diffusion import create_next_scale_diffusion
from mar.next_scale_generator import scale_known_mask
from tokenizers.multiscale import MultiScaleVQVAE, bicubic_up, multiscale_preset

PN = (1, 2, 3, 4, 6, 8)


@pytest.fixture(scope="module")
def tok():
    return MultiScaleVQVAE(multiscale_preset("msvq_f4", in_channels=1, out_channels=1, hybrid=True),
                           generator=torch.Generator().manual_seed(0)).eval()


def hart(tok, seed=1):
    return create_hart("var_d2", embed_dim=32, num_heads=2, vocab_size=512, token_dim=16, num_classes=10,
                       patch_nums=PN, diffloss_depth=1, diffloss_width=32, generator=torch.Generator().manual_seed(seed))


def test_hart_residual_target_is_the_latent_minus_the_vq_reconstruction(tok):
    model = hart(tok).train()
    f = tok.encode_latent(torch.rand(3, 1, 32, 32) * 2 - 1).detach()
    seen = {}
    model.diffloss.loss = lambda target, z, generator=None: seen.update(target=target, z=z) or target.sum() * 0
    loss, logs = model.training_loss(tok.quantize, f, torch.tensor([0, 4, 9]), torch.Generator().manual_seed(0))
    codes = tok.quantize.encode_indices(f)
    residual = f - tok.quantize.indices_to_fhat(codes)  # what quantization loses (HART Sec. 3.1)
    assert torch.equal(seen["target"], residual.flatten(2).transpose(1, 2).reshape(-1, 16))
    assert seen["z"].shape == (3 * 64, 32)
    assert torch.isclose(loss, logs["ce"]) and logs["ce"] > 0  # the CE part is VAR's


def test_hart_sampling_adds_the_residual_to_var_s_f_hat(tok):
    """The residual hook adds its output after the last scale and changes nothing before it."""
    model = hart(tok).eval()
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    labels = torch.tensor([1, 7])
    plain = next_scale(model, tok.quantize, 2, labels=labels, cfg=1.5, generator=gens())
    seen = {}

    def residual(hidden, codes, t):
        seen.update(rows=hidden.shape[0], codes=codes, t=t)
        return torch.full_like(plain, 0.25)

    with_r, codes = next_scale(model, tok.quantize, 2, labels=labels, cfg=1.5, generator=gens(), residual=residual,
                               return_codes=True)
    assert torch.allclose(with_r, plain + 0.25) and seen["rows"] == 4 and seen["t"] == 1.5
    assert torch.equal(seen["codes"], codes[:, -64:])
    model.attach(tok)
    out = model.generate(2, labels=labels, cfg=1.5, generator=gens())  # the real head: f_hat + r, r from diffusion
    assert out.shape == plain.shape and not torch.allclose(out, plain)
    r = out - plain  # the codes are drawn first from the same generators, so the difference is the residual
    assert r.abs().mean() > 0 and torch.isfinite(r).all()


def test_continuous_next_scale_trains_on_the_pyramid_and_samples_per_image():
    model = create_next_scale_diffusion("var_d2", embed_dim=32, num_heads=2, token_dim=4, patch_nums=PN,
                                        num_classes=10, diffloss_depth=1, diffloss_width=32, num_sampling_steps="4",
                                        generator=torch.Generator().manual_seed(0))
    f = torch.randn(2, 4, 8, 8)
    seen = {}
    model.diffloss.loss = lambda target, z, generator=None: seen.update(target=target) or target.sum() * 0
    model.training_loss(f, torch.tensor([1, 2]))
    # the targets are the residual maps r_k of every scale, row-major; their upsampled sum is f
    maps, start = [], 0
    for pn in PN:
        maps.append(seen["target"].view(2, -1, 4)[:, start:start + pn * pn].transpose(1, 2).reshape(2, 4, pn, pn))
        start += pn * pn
    total = sum(m if m.shape[-1] == 8 else bicubic_up(m, 8) for m in maps)
    assert start == model.L and torch.allclose(total, f, atol=1e-5)
    del model.diffloss.loss
    model.eval()
    gens = lambda idx: [torch.Generator().manual_seed(i) for i in idx]  # noqa: E731
    both = model.sample(3, labels=torch.tensor([0, 5, 9]), cfg=2.0, generator=gens([0, 1, 2]))
    alone = model.sample(1, labels=torch.tensor([9]), cfg=2.0, generator=gens([2]))
    assert both.shape == (3, 4, 8, 8) and torch.allclose(alone[0], both[2], atol=1e-5)
    with pytest.raises(ValueError, match="editing is for VAR and HART"):
        model.generate(1, known_tokens=torch.zeros(1, model.L, dtype=torch.long),
                       known_mask=torch.ones(1, 64, dtype=torch.bool))


def test_scale_known_mask_follows_the_reference_rule():
    """Bilinear resize of the last scale's keep mask, > 0.5; scales of at most 3 tokens are kept whole."""
    keep = torch.zeros(1, 8, 8, dtype=torch.bool)
    keep[:, :4] = True  # the upper half is kept
    mask = scale_known_mask(keep.view(1, 64), PN)
    sizes = [p * p for p in PN]
    parts = mask.split(sizes, dim=1)
    assert parts[0].all()  # 1x1: always the image's
    assert parts[1].view(2, 2)[0].all() and not parts[1].view(2, 2)[1].any()
    assert torch.equal(parts[-1].view(8, 8), keep[0])
    with pytest.raises(ValueError, match="known mask"):
        scale_known_mask(torch.ones(1, 63, dtype=torch.bool), PN)


@pytest.mark.parametrize("overrides,message", [
    (["--model.arch=var", "--model.head=categorical", "--tokenizer.preset=kl_f4_c8"], "needs a multi-scale tokenizer"),
    (["--model.head=hybrid"], "head 'hybrid' (HART) is for model.arch=var"),
    (["--model.patch_nums=[1,2,4]"], "patch_nums is for model.arch=var"),
    (["--model.arch=var", "--model.img_size=32", "--model.vae_stride=4", "--model.patch_nums=[1,2,4]"],
     "patch_nums must end at the latent side"),
    (["--model.arch=var", "--model.img_size=32", "--model.vae_stride=4", "--model.patch_nums=[2,1,8]"],
     "strictly increasing"),
    (["--tokenizer.preset=kl_f4_c8", "--tokenizer.hybrid=true"], "tokenizer.hybrid is for multi-scale"),
    (["--tokenizer.preset=msvq_f4"], "is for model.arch=var"),
    (["--model.arch=var", "--model.head=diffloss", "--tokenizer.preset=kl_f4_c8"], "needs model.patch_nums"),
    (["--model.arch=var", "--model.head=categorical", "--tokenizer.preset=msvq_f4", "--model.img_size=32",
      "--model.vae_stride=4", "--model.patch_nums=[1,2,8]"], "must be null for VAR/HART"),
])
def test_next_scale_configs_are_checked(overrides, message):
    from mar.config import ConfigError, TrainConfig, load_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(TrainConfig, None, overrides)
