"""The few-step distilled head (diffloss.distill, train.py task=distill_head, load_run's distilled_head).

- an analytic teacher (Gaussian data: the exact eps is known in closed form, and its guided DDIM map x_T -> x_0
  is affine, composed here step by step): the distillation loss falls and the 1- and 2-step students reproduce
  that closed-form map;
- the training targets are the states of ``GaussianDiffusion.ddim_sample_loop`` (recorded independently through
  ``DiffLoss.sample(sampler="ddim")``) and a student step is the DDIM formula;
- train.py task=distill_head on a tiny MAR run, the export loaded by load_run and sampled through
  ``sample_tokens(options=SamplingOptions(distilled_steps=...))``; the default path is unchanged by the attach;
- per-sample generators give batch-independent rows; bad input gives one clear error.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffloss import DiffLoss, cosine_diffusion
from diffloss.distill import DistilledHead, DistillObjective, teacher_states
from mar.config import ConfigError, SamplingOptions, TrainConfig, load_config
from mar.engine.checkpoint import read_safetensors
from mar.heads import NO_DISTILLED_HEAD, load_distilled_head, save_distilled_head

ROOT = Path(__file__).resolve().parents[1]
FULL = cosine_diffusion(None, 1000)  # the 1000-step schedule the nets are fed timesteps of


class GaussianTeacher(nn.Module):
    """The exact eps of data x0 | c ~ N(M c, s2 I): eps(x_t, t) = sqrt(1 - a) (x_t - sqrt(a) M c) / (a s2 + 1 - a),
    a = abar_t; output (N, 2C) = (eps, 0)."""

    def __init__(self, m: torch.Tensor, s2: float):
        super().__init__()
        self.m, self.s2 = m, s2

    def forward(self, x, t, c):
        a = FULL.alphas_cumprod[t].to(x.dtype)[:, None]
        eps = (1 - a).sqrt() * (x - a.sqrt() * (c @ self.m.T)) / (a * self.s2 + 1 - a)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


def closed_form_ddim(x_T, mu, s2, diffusion):
    """The guided DDIM map for Gaussian data: eps_u + w (eps_c - eps_u) is the exact eps of the mean
    mu = mu_u + w (mu_c - mu_u), and each DDIM step is x' - sqrt(a') mu = k (x - sqrt(a) mu) with
    k = sqrt(a') g + sqrt(1 - a') (1 - sqrt(a) g) / sqrt(1 - a), g = sqrt(a) s2 / (a s2 + 1 - a)."""
    ab = diffusion.alphas_cumprod.tolist()
    x = x_T.double()
    for i in reversed(range(len(ab))):
        a, a_next = ab[i], ab[i - 1] if i > 0 else 1.0
        g = math.sqrt(a) * s2 / (a * s2 + 1 - a)
        k = math.sqrt(a_next) * g + math.sqrt(1 - a_next) * (1 - math.sqrt(a) * g) / math.sqrt(1 - a)
        x = math.sqrt(a_next) * mu + k * (x - math.sqrt(a) * mu)
    return x.float()


def test_student_learns_the_closed_form_teacher_map():
    torch.manual_seed(0)
    C, D, s2 = 2, 4, 0.25
    m = torch.randn(C, D, generator=torch.Generator().manual_seed(1)) / 2
    teacher = GaussianTeacher(m, s2)
    head = DistilledHead(C, D, depth=2, width=64, steps=(1, 2), teacher_steps=20, cfg_max=3.0,
                         generator=torch.Generator().manual_seed(0))
    objective = DistillObjective(head, teacher, no_guidance_prob=0.1)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(250):
        c, u = torch.randn(128, D, generator=g), 0.3 * torch.randn(128, D, generator=g)
        loss, logs = objective(c, u, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(logs) == {"loss_s1", "loss_s2"}
    assert sum(losses[-20:]) / 20 < 0.05 * sum(losses[:5]) / 5  # the distillation loss falls

    gt = torch.Generator().manual_seed(5)
    c, u = torch.randn(256, D, generator=gt), 0.3 * torch.randn(256, D, generator=gt)
    for w in (1.0, 2.0):
        z, mu = (torch.cat([c, u]), (u + w * (c - u)) @ m.T) if w != 1 else (c, c @ m.T)
        ref = closed_form_ddim(torch.randn(256, C, generator=torch.Generator().manual_seed(9)), mu.double(), s2,
                               head.teacher_diffusion())
        # the teacher code itself agrees with the closed form
        x_T = torch.randn(256, C, generator=torch.Generator().manual_seed(9))
        states = teacher_states(teacher, head.teacher_diffusion(), x_T, c, u if w != 1 else c, torch.full((256,), w))
        torch.testing.assert_close(states[-1], ref, rtol=0, atol=2e-3)
        for steps in (1, 2):
            out = head.sample(z, cfg=w, generator=torch.Generator().manual_seed(9), num_steps=steps)
            err = ((out - ref) ** 2).mean().item()
            assert err < 0.06 * s2, f"{steps} step(s), cfg {w}: mse {err:.4f} vs the data variance {s2}"


class Recorder(nn.Module):
    """The net, remembering the cond-half inputs x it is called with (DDIM's state before each step)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []
        self.cond_embed = net.cond_embed  # DiffLoss.sample embeds the condition once per call

    def forward(self, x, t, c, embedded=False):
        self.seen.append(x[: len(x) // 2].clone())
        return self.net(x, t, c, embedded=embedded)


def random_diffloss(C=4, D=8, seed=3):
    dl = DiffLoss(C, D, depth=2, width=32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in dl.net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return dl


def test_targets_are_the_states_of_ddim_sample_loop():
    C, D, K, n, w = 4, 8, 12, 6, 2.5
    dl = random_diffloss(C, D)
    g = torch.Generator().manual_seed(4)
    c, u, x_T = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g), torch.randn(n, C, generator=g)
    states = teacher_states(dl.net, cosine_diffusion(K), x_T, c, u, torch.full((n,), w), clip_denoised=5.0)
    net, dl.net = dl.net, Recorder(dl.net)
    final = dl.sample(torch.cat([c, u]), cfg=w, sampler="ddim", num_steps=K, noise=(x_T, None), clip_denoised=5.0)
    seen, dl.net = dl.net.seen, net
    assert states.shape == (K + 1, n, C) and len(seen) == K
    torch.testing.assert_close(states[:K], torch.stack(seen), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(states[K], final, rtol=1e-6, atol=1e-6)

    head = DistilledHead(C, D, depth=1, width=16, steps=(1, 2, 4), teacher_steps=K)
    abar = [*cosine_diffusion(K).alphas_cumprod.flip(0).tolist(), 1.0]  # state b lives at index K-1-b
    assert head.boundaries(4) == [0, 3, 6, 9, 12] and head.boundaries(1) == [0, 12]
    x, x0 = torch.randn(n, C, generator=g), torch.randn(n, C, generator=g)
    for b, b_next in ((0, 3), (6, 12), (9, 12)):
        a, a2 = abar[b], abar[b_next]
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)  # DDIM (Song et al. eq. 12, sigma = 0) from x0_hat
        torch.testing.assert_close(head.step(x, x0, b, b_next), math.sqrt(a2) * x0 + math.sqrt(1 - a2) * eps)

    class Oracle(DistilledHead):  # predicts the x0 whose DDIM step lands on the recorded state: loss 0
        def predict(self, x, b, b_next, c, u, w):
            a, a2 = abar[b], abar[b_next]
            r = math.sqrt((1 - a2) / (1 - a))
            return (states[b_next] - r * x) / (math.sqrt(a2) - r * math.sqrt(a))

    oracle = Oracle(C, D, depth=1, width=16, steps=(1, 2, 4), teacher_steps=K)
    loss, logs = oracle.distillation_loss(dl.net, c, u, torch.full((n,), w), x_T, clip_denoised=5.0)
    assert loss.item() < 1e-9 and set(logs) == {"loss_s1", "loss_s2", "loss_s4"}


def test_per_sample_generators_give_batch_independent_rows():
    head = DistilledHead(4, 8, depth=2, width=16, steps=(1, 3), teacher_steps=12)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    z = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))  # 3 samples x 2 tokens
    for cfg in (1.0, 2.0):
        full = torch.cat([z.reshape(6, 8), (z + 1).reshape(6, 8)]) if cfg != 1 else z.reshape(6, 8)
        one = torch.cat([z[1], z[1] + 1]) if cfg != 1 else z[1]
        batch = head.sample(full, temperature=0.8, cfg=cfg, generator=gens([10, 11, 12]), num_steps=3)
        alone = head.sample(one, temperature=0.8, cfg=cfg, generator=gens([11]), num_steps=3)
        torch.testing.assert_close(batch[2:4], alone, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(batch[0:2], batch[2:4])
        # static shapes: the student runs on rows padded to a multiple of 8, the tokens are the same rows
        seen = []
        hook = head.student.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
        padded = head.sample(full, temperature=0.8, cfg=cfg, generator=gens([10, 11, 12]), num_steps=3, row_bucket=8)
        hook.remove()
        assert seen == [8, 8, 8] and padded.shape == batch.shape
        torch.testing.assert_close(padded, batch, rtol=1e-6, atol=1e-6)


def test_bad_input_gives_one_clear_error(tmp_path):
    from mar.heads import DiffusionHead

    head = DistilledHead(4, 8, depth=1, width=16, steps=(1, 2), teacher_steps=10, cfg_max=3.0)
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"trained for 1, 2 step\(s\), not 4"):
        head.sample(z, num_steps=4)
    with pytest.raises(ValueError, match=r"guidance scales in \[1, 3\], got cfg=4"):
        head.sample(z, cfg=4.0, num_steps=1)
    diffusion_head = DiffusionHead(4, 8, depth=1, width=16, num_sampling_steps="5")
    with pytest.raises(ValueError) as e:
        diffusion_head.sample(z, options=SamplingOptions(distilled_steps=1))
    assert str(e.value) == NO_DISTILLED_HEAD and "--distilled-head FILE" in NO_DISTILLED_HEAD
    with pytest.raises(ValueError, match="distilled for tokens of 4 channels and conditions of width 8, this "
                                         "model's head has 4 and 6"):
        DiffusionHead(4, 6, depth=1, width=16).attach_distilled(head)
    keys = set(diffusion_head.state_dict())
    diffusion_head.attach_distilled(head)
    assert set(diffusion_head.state_dict()) == keys  # the published keys: the distilled head is not a submodule
    assert diffusion_head.sample(z, options=SamplingOptions(distilled_steps=2), generator=torch.Generator()).shape == (4, 4)
    path = save_distilled_head(head, tmp_path / "head.safetensors")
    assert load_distilled_head(path).steps == (1, 2)
    state, meta = read_safetensors(path)
    assert json.loads(meta["steps"]) == [1, 2] and meta["teacher_steps"] == "10"
    with pytest.raises(ValueError, match="is not a distilled head"):
        DistilledHead.from_state(state, {**meta, "format": "x"}, "bad.safetensors")
    with pytest.raises(ValueError, match="damaged distilled head"):
        DistilledHead.from_state({k: v for k, v in state.items() if "final_layer" not in k}, meta, "bad.safetensors")
    for override, message in ((["distill.steps=[0, 2]"], "distill.steps"),
                              (["distill.steps=[1, 8]", "distill.teacher_steps=4"], "distill.teacher_steps"),
                              (["distill.cfg_max=0.5"], "distill.cfg_max")):
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, None, ["task=distill_head", *override])


# ---------------------------------------------------------------- train.py task=distill_head on a tiny MAR run
def make_mar_run(folder: Path, seed: int) -> Path:
    """A tiny MAR run folder (mar_ema.safetensors + tokenizer.safetensors) with random, non-zero head weights."""
    from mar.engine.tasks import MARTask
    from mar.registry import create_model
    from tokenizers import KLTokenizer, kl_vae_preset

    torch.manual_seed(0)
    tok = KLTokenizer(kl_vae_preset("kl_f4_c4", in_channels=1, out_channels=1, scaling_factor=1.5))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(folder / "tokenizer.safetensors")
    cfg = load_config(TrainConfig, None, [
        "model.preset=mar_tiny", "model.img_size=32", "model.vae_stride=4", "model.token_channels=4",
        "model.num_classes=10", "model.buffer_size=8", "model.num_sampling_steps=5", "tokenizer.preset=kl_f4_c4",
        f"tokenizer.checkpoint={folder / 'tokenizer.safetensors'}", "tokenizer.in_channels=1"])
    model = create_model("mar_tiny", img_size=32, vae_stride=4, token_channels=4, num_classes=10, buffer_size=8,
                         num_sampling_steps="5", generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in model.diffloss.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())) * 0.05)
    task = MARTask(cfg)
    task.tokenizer = tok
    return task.export(model, model, None, folder, "cpu")


DISTILL = """
task: distill_head
distill: {{teacher: {teacher}, depth: 1, width: 32, steps: [1, 2], teacher_steps: 6, cfg_max: 3.0, rows: 32,
          clip_denoised: 5.0}}
data: {{kind: latents, path: {cache}, hflip: false, num_workers: 0}}
optim: {{batch_size: 4, lr: 1.0e-3, warmup_epochs: 0, epochs: 1, ema_rate: 0.9, ema_warmup: true, weight_decay: 0.0}}
train: {{output_dir: {out}, max_steps: 3, save_every_steps: 3, log_every_steps: 1, sample_every_steps: 3}}
sample: {{num_iter: 2, cfg: 2.0}}
"""


def test_train_py_distill_head_then_load_run_and_sample(tmp_path):
    from mar.engine.data import save_latent_cache
    from mar.run import load_run

    mar_dir = tmp_path / "mar"
    make_mar_run(mar_dir, seed=1)
    g = torch.Generator().manual_seed(0)
    moments = torch.cat([torch.randn(16, 4, 8, 8, generator=g), torch.full((16, 4, 8, 8), -4.0)], dim=1)
    save_latent_cache(tmp_path / "latents.safetensors", moments, None, torch.arange(16) % 10)
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(DISTILL.format(teacher=mar_dir, cache=tmp_path / "latents.safetensors", out=tmp_path / "distill"))
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    export = tmp_path / "distill" / "head_distilled.safetensors"
    rows = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss_s1"]) for r in rows)
    assert (tmp_path / "distill" / "samples" / "step-00000003.png").is_file()
    _, meta = read_safetensors(export)
    info = json.loads(meta["info"])
    assert info["mar_weights"] == str(mar_dir / "mar_ema.safetensors") and info["training_steps"] == "3"

    plain = load_run(mar_dir)
    run = load_run(mar_dir, distilled_head=export)
    assert run.model.state_dict().keys() == plain.model.state_dict().keys()
    labels, gen = torch.tensor([1, 7]), lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]
    for steps in (1, 2):
        out = run.model.sample_tokens(2, num_iter=2, cfg=2.0, labels=labels, generator=gen(),
                                      options=SamplingOptions(distilled_steps=steps))
        assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    exact = run.model.sample_tokens(2, num_iter=2, cfg=2.0, labels=labels, generator=gen())  # default path
    assert torch.equal(exact, plain.model.sample_tokens(2, num_iter=2, cfg=2.0, labels=labels, generator=gen()))
    with pytest.raises(ValueError, match=r"trained for 1, 2 step\(s\), not 4"):
        run.model.sample_tokens(1, num_iter=2, generator=torch.Generator(), options=SamplingOptions(distilled_steps=4))
    with pytest.raises(ValueError, match="no distilled head is attached"):
        plain.model.sample_tokens(1, num_iter=2, generator=torch.Generator(), options=SamplingOptions(distilled_steps=1))
    # the distill run folder loads the MAR it was distilled from, with the head
    assert load_run(tmp_path / "distill").model.head.distilled_head is not None
    # the same sizes, other weights: refused by the fingerprint
    make_mar_run(tmp_path / "other", seed=2)
    with pytest.raises(ValueError, match="was distilled from other MAR weights"):
        load_run(tmp_path / "other", distilled_head=export)
