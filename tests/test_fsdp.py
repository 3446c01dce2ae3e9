"""train.fsdp (mar/engine/fsdp.py) on CPU: 2 gloo processes sharded with FSDP2's fully_shard, against DDP.

Tested here: the CPU fallback (``shard_model``: the wrap rule applied with fully_shard, the optimizer re-pointed
at the shards, no DDP on top), FSDP == DDP after 3 steps (gradient accumulation, clipping, AdamW, the sharded EMA),
full plain checkpoints (they load for sampling on one device, and their optimizer state in a plain AdamW), an
exact pause / resume under FSDP (with gradient checkpointing), the config checks, the wrap rule accelerate's
plugin applies (its policy, on CPU without a process group), and gradient checkpointing under bf16 autocast.

Not testable on CPU: accelerate's own FSDP path (accelerate applies the plugin only to GPU-like distributed types:
``Accelerator(fsdp_plugin=...)`` + ``prepare`` on CUDA, nccl), ``train.fsdp_cpu_offload`` (FSDP2's offload
pins memory: CUDA only; refused on CPU), bf16 mixed precision under FSDP on CUDA (autocast over fp32 shards, the
policy train.py's plugin passes), shard_grad_op timings and memory. On a GPU node, check them with

    accelerate launch --multi_gpu --num_processes 8 train.py --config configs/mar_huge_in256.yaml \\
        --data.path=/data/imagenet/train --tokenizer.checkpoint=pretrained/kl16.ckpt --train.fsdp=true \\
        --train.max_steps=20 --train.save_every_steps=10 --train.output_dir=runs/fsdp_check

then the same command without --train.fsdp=true (another output_dir): the losses in metrics.jsonl agree to bf16
noise, and the step-20 checkpoint of the FSDP run loads with ``mar.run.load_run``.
"""
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from test_train import final_state, free_port, losses, run_train

from mar.config import ConfigError, RunConfig, TrainConfig, load_config
from mar.engine.checkpoint import CheckpointError
from mar.engine.fsdp import Sharding, blocks_to_wrap, fsdp_plugin_kwargs, sharding_for, wrap_class_names
from mar.engine.loop import param_groups
from mar.registry import create_model

# clipping active at every step (the norm is far above 1e-3), two micro-batches per step (no_sync), no warmup,
# an LR that moves the weights by ~1e-3 a step (500x the tolerance); the EMA rate is the tiny config's 0.9
COMMON = ("--train.max_steps=3", "--optim.warmup_epochs=0", "--optim.lr=1.0e-3", "--optim.grad_clip=0.001",
          "--optim.batch_size=4", "--optim.grad_accum=2")
TOL = 2e-6


def launcher():
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DDP, FSDP, and an FSDP run with gradient checkpointing paused at step 2 then resumed: 2 processes each."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = {"tmp": tmp}
    out["ddp"] = run_train(tmp, *COMMON, launcher=launcher(), name="ddp")
    out["fsdp"] = run_train(tmp, *COMMON, "--train.fsdp=true", launcher=launcher(), name="fsdp")
    resume = (*COMMON, "--train.fsdp=true", "--model.grad_checkpointing=true")
    out["paused"] = run_train(tmp, *resume, "--train.stop_at_step=2", launcher=launcher(), name="resumed")
    out["resumed"] = run_train(tmp, *resume, launcher=launcher(), name="resumed")
    return out


def text(proc):
    return proc.stdout + proc.stderr


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def fingerprint(proc) -> tuple[float, float]:
    line = next(x for x in text(proc).splitlines() if "fingerprint" in x)
    return tuple(float(v) for v in line.rsplit("fingerprint ", 1)[1].rstrip(")").split(", "))


def test_fsdp_equals_ddp(runs):
    tmp = runs["tmp"]
    assert "parameters consistent on all 2 processes (FSDP" in text(runs["fsdp"])
    a, b = final_state(tmp / "fsdp", 3), final_state(tmp / "ddp", 3)
    assert a["fsdp"] == {"processes": 2, "sharding": "full_shard", "cpu_offload": False, "by": "fully_shard"}
    assert "fsdp" not in b  # the plain path writes what it always wrote
    for part in ("model", "ema"):
        assert max_diff(a[part], b[part]) <= TOL, part
    # the comparison can fail: 1 step moves the weights far more than the tolerance
    assert max_diff(a["model"], final_state(tmp / "resumed", 2)["model"]) > 10 * TOL
    assert not torch.equal(a["ema"]["z_proj.weight"], a["model"]["z_proj.weight"])
    # the optimizer state: the plain format (index-keyed), the same numbers
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in ob["state"]:
        assert max_diff(oa["state"][i], ob["state"][i]) <= TOL, i
    la, lb = losses(tmp / "fsdp"), losses(tmp / "ddp")
    assert [la[s] for s in (1, 2, 3)] == pytest.approx([lb[s] for s in (1, 2, 3)], rel=1e-5)
    assert fingerprint(runs["fsdp"]) == pytest.approx(fingerprint(runs["ddp"]), rel=1e-9)


def test_fsdp_checkpoint_loads_on_one_device(runs):
    from mar.run import load_run

    tmp = runs["tmp"]
    ckpt = final_state(tmp / "fsdp", 3)
    for source, ema, want in ((tmp / "fsdp" / "checkpoints" / "step-00000003.pt", True, ckpt["ema"]),
                              (tmp / "fsdp" / "checkpoints" / "step-00000003.pt", False, ckpt["model"]),
                              (tmp / "fsdp", True, ckpt["ema"])):  # the run folder: its mar_ema.safetensors export
        run = load_run(source, ema=ema)
        assert max_diff(run.model.state_dict(), want) == 0.0, source
    g = torch.Generator().manual_seed(0)
    tokens = run.model.sample_tokens(2, num_iter=2, cfg=1.0, labels=torch.tensor([0, 1]), generator=g)
    assert tokens.shape == (2, 4, 8, 8) and torch.isfinite(run.tokenizer.decode(tokens)).all()
    # the optimizer state loads into a plain AdamW of the unsharded model
    model = run.model
    opt = torch.optim.AdamW(param_groups(model, 0.02, (f"{model._head_name}.",)), lr=1e-3)
    opt.load_state_dict(ckpt["optimizer"])
    assert all(opt.state[p]["exp_avg"].shape == p.shape for g in opt.param_groups for p in g["params"])


def test_fsdp_pause_and_resume_is_exact(runs):
    """Paused at step 2 and resumed (with gradient checkpointing on) == the straight FSDP run, bit for bit."""
    tmp = runs["tmp"]
    assert "paused at step 2 of 3" in text(runs["paused"]) and "resumed from" in text(runs["resumed"])
    a, b = final_state(tmp / "fsdp", 3), final_state(tmp / "resumed", 3)
    for part in ("model", "ema"):
        assert max_diff(a[part], b[part]) == 0.0, part
    for i in a["optimizer"]["state"]:
        assert max_diff(a["optimizer"]["state"][i], b["optimizer"]["state"][i]) == 0.0
    la, lb = losses(tmp / "fsdp"), losses(tmp / "resumed")
    assert [la[s] for s in (1, 2, 3)] == [lb[s] for s in (1, 2, 3)]
    # the sharded EMA is the full one, bit for bit: ema_3 = lerp(ema_2, model_3, 1 - 0.9)
    e2 = final_state(tmp / "resumed", 2)["ema"]
    assert max_diff({k: v.lerp(b["model"][k], 1.0 - 0.9) for k, v in e2.items()}, b["ema"]) == 0.0
    assert max_diff(e2, b["ema"]) > 10 * TOL


@pytest.mark.parametrize("override, message", [
    ("train.fsdp_cpu_offload=true", "train.fsdp_sharding and fsdp_cpu_offload are for sharded training: set "
                                    "train.fsdp=true, or drop them"),
    ("train.fsdp_sharding=shard_grad_op", "set train.fsdp=true, or drop them"),
    ("train.fsdp_sharding=hybrid_shard", "train.fsdp_sharding"),
])
def test_config_checks(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=[override])
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=["train.fsdp=true", "train.mixed_precision=fp16"])
    assert "fsdp does not support mixed_precision fp16" in str(e.value) and "mixed_precision=bf16" in str(e.value)
    cfg = load_config(TrainConfig, overrides=["train.fsdp=true", "train.fsdp_sharding=shard_grad_op",
                                              "train.fsdp_cpu_offload=true"])
    assert (cfg.train.fsdp, cfg.train.fsdp_sharding, cfg.train.fsdp_cpu_offload) == (True, "shard_grad_op", True)


def test_config_error_from_train_py_is_one_line(tmp_path):
    proc = run_train(tmp_path, "--train.fsdp_cpu_offload=true", check=False, name="bad")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: ") and "train.fsdp=true" in proc.stderr


def test_what_fsdp_refuses():
    acc = SimpleNamespace(distributed_type="MULTI_CPU", num_processes=2, print=print)
    on = RunConfig(fsdp=True)
    with pytest.raises(ValueError, match="train.fsdp is for task=mar"):
        sharding_for(on, "tokenizer", acc)
    with pytest.raises(ValueError, match="launched with FSDP .* but train.fsdp is false"):
        sharding_for(RunConfig(), "mar", SimpleNamespace(distributed_type="FSDP", num_processes=2))
    assert sharding_for(RunConfig(), "mar", acc) is None  # the plain path
    assert sharding_for(on, "mar", SimpleNamespace(distributed_type="NO", num_processes=1, print=print)) is None
    # an optimizer state keyed by names (not Optimizer.state_dict's indices) is refused with one message
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match="not the plain index-keyed state"):
        Sharding(on, acc).load_optimizer_state(model, opt, {"state": {"weight": {}}, "param_groups": [
            {"params": ["weight", "bias"]}]})


def tiny_mar(**kw):
    return create_model("mar_tiny", img_size=32, vae_stride=4, token_channels=4, num_classes=10, buffer_size=8,
                        num_sampling_steps="5", generator=torch.Generator().manual_seed(0), **kw)


def test_wrap_rule_and_accelerate_plugin():
    """The plugin train.py passes on CUDA, and the units accelerate's FSDP2 policy picks with it: every block."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from mar.next_scale import VAR

    var = VAR(depth=2, embed_dim=32, num_heads=2, vocab_size=16, token_dim=8, num_classes=10, patch_nums=(1, 2),
              generator=torch.Generator().manual_seed(0))
    assert wrap_class_names(var) == ["AdaLNSelfAttn"] and len(blocks_to_wrap(var)) == 2
    model = tiny_mar()
    assert wrap_class_names(model) == ["Block"] and len(blocks_to_wrap(model)) == 2 + 2  # encoder + decoder
    assert fsdp_plugin_kwargs(RunConfig(fsdp=True), cuda=False) is None  # CPU: shard_model instead
    with mock.patch.dict(os.environ):  # the plugin reads (and sets) FSDP_* variables
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(**fsdp_plugin_kwargs(RunConfig(fsdp=True, fsdp_sharding="shard_grad_op"),
                                                                     cuda=True))  # as train.py builds it
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
        mp = plugin.mixed_precision_policy  # no casts: fp32 shards and reductions, bf16 compute from autocast
        assert (mp.param_dtype, mp.reduce_dtype, mp.output_dtype) == (None, None, None)
        plugin.transformer_cls_names_to_wrap = wrap_class_names(model)  # what Sharding.prepare does
        plugin.set_auto_wrap_policy(model)
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        assert [m for m in model.modules() if policy(m)] == blocks_to_wrap(model)


def test_grad_checkpointing_under_bf16_autocast_is_exact():
    """Same seeds: loss and every gradient equal with and without grad_checkpointing, under CPU bf16 autocast;
    the blocks really ran twice (the recompute) and in bf16."""
    def run(checkpointing: bool):
        model = tiny_mar(grad_checkpointing=checkpointing).train()
        calls, dtypes = [], []
        for blk in model.encoder_blocks:
            blk.register_forward_pre_hook(lambda *a: calls.append(1))
        model.encoder_blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        g = torch.Generator().manual_seed(1)
        tokens, labels = torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        torch.manual_seed(3)  # dropout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens, labels, generator=torch.Generator().manual_seed(2))
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls), set(dtypes)

    (l0, g0, n0, d0), (l1, g1, n1, d1) = run(False), run(True)
    assert (n0, n1) == (2, 4) and d0 == d1 == {torch.bfloat16}
    assert torch.equal(l0, l1) and torch.isfinite(l0)
    assert g0.keys() == g1.keys() and all(g0[k] is not None for k in g0)
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k


def test_fsdp_equals_ddp_for_var(tmp_path):
    """VAR (arch var: the next-scale generator, AdaLNSelfAttn units) under FSDP == DDP after 2 steps."""
    import json

    from helpers import run_launched
    from test_next_scale_train import FIXTURE, ROOT, TINY_VAR
    from test_train import env
    from tokenizers.multiscale import MultiScaleVQVAE, multiscale_preset

    tok = tmp_path / "msvq.safetensors"
    MultiScaleVQVAE(multiscale_preset("msvq_f4", in_channels=1, out_channels=1, hybrid=True),
                    generator=torch.Generator().manual_seed(0)).save(tok)
    states = {}
    for name, extra in (("ddp", []), ("fsdp", ["--train.fsdp=true"])):
        cmd = [*launcher(), str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "fmnist_var.yaml"),
               "--data.kind=fashion_mnist", f"--data.path={FIXTURE}", "--optim.batch_size=4",
               f"--train.output_dir={tmp_path / name}", "--train.max_steps=2", "--train.log_every_steps=1",
               "--optim.warmup_epochs=0", "--optim.lr=1.0e-3", *TINY_VAR, f"--tokenizer.checkpoint={tok}", *extra]
        proc = run_launched(cmd, cwd=tmp_path, env=env(), timeout=600, grace=60)
        assert proc.returncode == 0, proc.stdout[-3000:]
        states[name] = final_state(tmp_path / name, 2)
    a, b = states["fsdp"], states["ddp"]
    assert a["fsdp"]["by"] == "fully_shard" and a["config"]["model"]["arch"] == "var"
    for part in ("model", "ema"):
        assert max_diff(a[part], b[part]) <= TOL, part
    rows = {n: [json.loads(x)["loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in states}
    assert rows["fsdp"] == pytest.approx(rows["ddp"], rel=1e-5) and len(rows["ddp"]) == 2
