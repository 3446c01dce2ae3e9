"""Generation cost of the large models, extrapolated from a short real run (for machines where a full
run is too slow: MAR-B at 256 px with 64 iterations and 100 diffusion steps takes minutes per image on
one CPU core).

Method (printed as an extrapolation): one real ``sample_tokens`` run with few iterations (``--probe-iter``,
e.g. 16) and ``--probe-steps`` diffusion steps per iteration is timed iteration by iteration:
    transformer time T_tr(v) of each encoder + decoder pass, v = tokens visible at that iteration;
    head time per diffusion step h(n), n = tokens predicted at that iteration.
The target generation (``--num-iter``, and the variant's diffusion steps S_k) is then
    T = sum_k [ T_tr(v_k) + S_k * h(n_k) ]
with T_tr and h interpolated linearly between the probed points (held flat outside them). The probe
runs after a warm-up run of the same shapes with 2 diffusion steps (kernels are created per shape).
``--validate-iter`` compares the extrapolation with a real run of another length.

    OMP_NUM_THREADS=1 python benchmarks/sampling_cost_model.py --setting mar_base_256 --num-iter 64 \\
        --steps 100 --cfg 3.0 --variant exact "sampler=ddim,anneal=50-10,precision=bf16" --vae
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from bench_sampling import HeadTimer
from common import build, diffusion_steps_per_iter, machine_line, parse_variant, sync, timed
from mar import schedules


def schedule(model, num_iter: int) -> tuple[list[int], list[int], list[int]]:
    """(k, visible tokens v_k, predicted tokens n_k) of the iterations that predict tokens, in order
    (``sample_tokens`` skips an iteration whose clamped mask length leaves nothing to predict)."""
    L, masked_now, kept, vis, pred = model.seq_len, model.seq_len, [], [], []
    for k, m_next in enumerate(schedules.generation_schedule(L, num_iter)):
        if m_next < masked_now:
            kept.append(k)
            vis.append(L - masked_now)
            pred.append(masked_now - m_next)
        masked_now = m_next
    return kept, vis, pred


def run(model, batch: int, num_iter: int, cfg: float, variant: dict, seed: int = 0) -> tuple[float, HeadTimer]:
    labels = torch.arange(batch) % model.num_classes
    with HeadTimer(model, "cpu") as head:
        sync("cpu")
        t0 = time.perf_counter()
        model.sample_tokens(batch, num_iter=num_iter, cfg=cfg, labels=labels,
                            generator=torch.Generator().manual_seed(seed), **variant)
        total = time.perf_counter() - t0
    head.start = t0
    return total, head


def probe(model, batch: int, num_iter: int, steps: int, cfg: float, variant: dict, warmup: bool) -> dict:
    """Per-iteration costs of a real run with `steps` fixed diffusion steps (the variant's sampler and
    precision kept): {"vis": [...], "tr": [...] s, "tok": [...], "head": [...] s per diffusion step}."""
    fixed = {**variant, "diffusion_steps_schedule": (steps, steps)}
    if warmup:
        run(model, batch, num_iter, cfg, {**variant, "diffusion_steps_schedule": (2, 2)})
    total, head = run(model, batch, num_iter, cfg, fixed)
    _, vis, pred = schedule(model, num_iter)
    prev_end, tr, per_step = head.start, [], defaultdict(list)
    for (start, end), n in zip(head.calls, pred):
        tr.append(start - prev_end)
        per_step[n].append((end - start) / steps)
        prev_end = end
    tok = sorted(per_step)
    order = np.argsort(vis)
    return {"vis": [vis[i] for i in order], "tr": [tr[i] for i in order], "tok": tok,
            "head": [float(np.median(per_step[n])) for n in tok], "total": total, "head_total": head.seconds}


def predict(m: dict, model, num_iter: int, steps: list[int]) -> tuple[float, float]:
    """(transformer seconds, head seconds) of a generation of `num_iter` iterations with steps[k]
    diffusion steps at iteration k, from probe data."""
    kept, vis, pred = schedule(model, num_iter)
    tr = float(np.interp(vis, m["vis"], m["tr"]).sum())
    hd = float(sum(steps[k] * np.interp(n, m["tok"], m["head"]) for k, n in zip(kept, pred)))
    return tr, hd


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="mar_base_256")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--num-iter", type=int, default=64)
    p.add_argument("--steps", type=int, default=100, help="the model's num_sampling_steps (exact path)")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--variant", nargs="+", default=["exact"])
    p.add_argument("--probe-iter", type=int, default=16)
    p.add_argument("--probe-steps", type=int, default=10)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--validate-iter", type=int, default=0, help="also time a real run of this many iterations")
    p.add_argument("--validate-steps", type=int, default=10, help="its diffusion steps (fixed for every variant)")
    p.add_argument("--vae", action="store_true", help="time the KL-16 decode of the batch (random weights)")
    a = p.parse_args(argv)
    model = build(a.setting).eval()
    model.diffloss.set_sampling_steps(a.steps)
    print(machine_line())
    print(f"# {a.setting} ({sum(q.numel() for q in model.parameters()) / 1e6:.1f}M params), seq_len {model.seq_len}, "
          f"batch {a.batch}, num_iter {a.num_iter}, cfg {a.cfg}, {a.steps} diffusion steps on the exact path")
    print(f"# EXTRAPOLATED from a real run of {a.probe_iter} iterations x {a.probe_steps} diffusion steps per variant")
    print("variant | transformer s  head s  total s/image  images/s | transformer% head% | probe run s")
    results = {}
    for spec in a.variant:
        variant = parse_variant(spec)
        if "num_iter" in variant or variant.get("feature_cache", "off") != "off":
            raise SystemExit(f"variant {spec!r}: the cost model extrapolates per-iteration costs of the uncached "
                             "loop at --num-iter; time iters= and cache= variants with bench_sampling.py")
        m = probe(model, a.batch, a.probe_iter, a.probe_steps, a.cfg, variant, not a.no_warmup)
        tr, hd = predict(m, model, a.num_iter, diffusion_steps_per_iter(model, variant, a.num_iter))
        total = results[spec] = tr + hd
        print(f"{spec} | {tr / a.batch:13.2f} {hd / a.batch:7.2f} {total / a.batch:14.2f} {a.batch / total:9.4f} | "
              f"{100 * tr / total:11.1f}% {100 * hd / total:4.1f}% | {m['total']:.1f}", flush=True)
        print(f"#   probe: pass {min(m['tr']):.3f}-{max(m['tr']):.3f} s (visible {m['vis'][0]}-{m['vis'][-1]}); "
              f"head step {1e3 * min(m['head']):.1f}-{1e3 * max(m['head']):.1f} ms "
              f"(tokens {m['tok'][0]}-{m['tok'][-1]})",
              flush=True)
        if a.validate_iter:
            fixed = {**variant, "diffusion_steps_schedule": (a.validate_steps, a.validate_steps)}
            run(model, a.batch, a.validate_iter, a.cfg, {**variant, "diffusion_steps_schedule": (2, 2)})
            real, head = run(model, a.batch, a.validate_iter, a.cfg, fixed)
            vtr, vhd = predict(m, model, a.validate_iter, [a.validate_steps] * a.validate_iter)
            print(f"#   validation: real run of {a.validate_iter} iterations x {a.validate_steps} steps {real:.2f} s "
                  f"(head {head.seconds:.2f} s); extrapolated {vtr + vhd:.2f} s (head {vhd:.2f} s); "
                  f"real/extrapolated {real / (vtr + vhd):.2f}", flush=True)
    if "exact" in results:
        for spec, total in results.items():
            if spec != "exact":
                print(f"# speed-up of {spec!r} over exact: {results['exact'] / total:.2f}x")
    if a.vae:
        from tokenizers import KLTokenizer

        tok = KLTokenizer("kl16").eval()
        tokens = torch.randn(a.batch, 16, model.seq_h, model.seq_w)
        with torch.no_grad():
            t32 = timed(lambda: tok.decode(tokens), repeats=2)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                t16 = timed(lambda: tok.decode(tokens), repeats=2)
        print(f"# KL-16 decode at {model.img_size} px, batch {a.batch}: fp32 {t32 / a.batch:.2f} s/image, "
              f"bf16 autocast {t16 / a.batch:.2f} s/image")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"# wall time of this benchmark: {time.perf_counter() - t0:.0f} s")
