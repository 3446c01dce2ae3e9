"""train.py end to end on CPU with tiny configs: data parallel equivalence, exact resume, signals,
non-finite losses and config errors. Runs the real entry point in subprocesses."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import run_launched

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fashion-mnist"
DONE = re.compile(r"wrote \S*(mar_ema|tokenizer)\.safetensors")  # finish()'s last line: the work is done
TINY = f"""
task: mar
model: {{preset: mar_tiny, img_size: 32, vae_stride: 4, token_channels: 4, num_classes: 10, buffer_size: 8,
        num_sampling_steps: "5", attn_dropout: 0.1, proj_dropout: 0.1}}
tokenizer: {{preset: kl_f4_c4, checkpoint: TOKENIZER}}
data: {{kind: fashion_mnist, path: {FIXTURE}, image_size: 32, num_workers: 0}}
optim: {{batch_size: 8, blr: 1.0e-3, warmup_epochs: 1, epochs: 50, ema_rate: 0.9}}
train: {{save_every_steps: 3, log_every_steps: 1, sample_every_steps: 1000}}
sample: {{num_iter: 4}}
"""


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONUNBUFFERED="1")
    e.pop("WORLD_SIZE", None)
    return e


def write_config(tmp_path):
    """The tiny config, with a small random grey tokenizer saved next to it."""
    tok = tmp_path / "tokenizer.safetensors"
    if not tok.exists():
        from tokenizers import KLTokenizer, kl_vae_preset

        torch.manual_seed(0)
        KLTokenizer(kl_vae_preset("kl_f4_c4", in_channels=1, out_channels=1, scaling_factor=1.5)).save(tok)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("TOKENIZER", str(tok)))
    return cfg


def run_train(tmp_path, *overrides, launcher=(), check=True, name="run"):
    cfg = write_config(tmp_path)
    cmd = [*launcher, *([] if launcher else [sys.executable]), str(ROOT / "train.py"), "--config", str(cfg),
           f"--train.output_dir={tmp_path / name}", *overrides]
    if launcher:  # several processes: a rank hanging at exit fails fast, with the output, and none is orphaned
        proc = run_launched(cmd, cwd=tmp_path, env=env(), timeout=600, grace=60, done_marker=DONE)
    else:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def final_state(run_dir, step):
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}.pt", weights_only=True)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def assert_states_close(a, b, atol=1e-6):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=atol, msg=f"{part}.{k}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exact_resume(tmp_path):
    """6 steps straight == 3 steps of the same 6-step run (paused by train.stop_at_step), automatic resume from
    the run directory, 3 more. The LR schedule spans the run's 6 steps in both."""
    run_train(tmp_path, "--train.max_steps=6", name="straight")
    paused = run_train(tmp_path, "--train.max_steps=6", "--train.stop_at_step=3", name="resumed")
    assert "paused at step 3 of 6" in paused.stdout + paused.stderr
    assert not (tmp_path / "resumed" / "mar_ema.safetensors").exists()  # a paused run exports nothing
    second = run_train(tmp_path, "--train.max_steps=6", name="resumed")
    assert "resumed from" in second.stdout + second.stderr
    a, b = final_state(tmp_path / "straight", 6), final_state(tmp_path / "resumed", 6)
    assert_states_close(a, b, atol=0)  # same process layout: bit-identical
    la, lb = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [la[s] for s in range(1, 7)] == [lb[s] for s in range(1, 7)]
    # the EMA really moved away from the raw weights, so comparing it means something
    k = "z_proj.weight"
    assert not torch.equal(a["ema"][k], a["model"][k])
    # the checkpoint is plain data with the optimiser state, step and config
    assert a["step"] == 6 and a["config"]["model"]["preset"] == "mar_tiny" and a["optimizer"]["state"]
    assert (tmp_path / "straight" / "config.yaml").exists()
    assert (tmp_path / "straight" / "mar_ema.safetensors").exists()


def test_two_process_data_parallel_equals_single_process(tmp_path):
    """2 CPU processes (gloo) x batch 8 == 1 process x 2 accumulation steps x batch 8."""
    single = run_train(tmp_path, "--train.max_steps=3", "--optim.grad_accum=2", name="single")
    assert "parameters identical on all 1 processes" in single.stdout + single.stderr
    accelerate = Path(sys.executable).parent / "accelerate"
    launcher = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    ddp = run_train(tmp_path, "--train.max_steps=3", launcher=launcher, name="ddp")
    assert "parameters identical on all 2 processes" in ddp.stdout + ddp.stderr  # rank 0 and 1 agree bitwise
    assert_states_close(final_state(tmp_path / "single", 3), final_state(tmp_path / "ddp", 3), atol=2e-6)
    ls, ld = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    for s in (1, 2, 3):
        assert ld[s] == pytest.approx(ls[s], rel=1e-5)


def test_sigterm_saves_a_checkpoint_and_rerun_resumes(tmp_path):
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "sig"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(cfg), f"--train.output_dir={run_dir}",
                             "--train.save_every_steps=100000", "--train.max_steps=100000"],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    ckpts = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    assert len(ckpts) == 1, out[-2000:]
    stopped_at = torch.load(ckpts[0], weights_only=True)["step"]
    assert stopped_at >= 1 and "stopped by signal" in out
    again = run_train(tmp_path, "--train.max_steps=100000", f"--train.stop_at_step={stopped_at + 1}", name="sig")
    assert f"at step {stopped_at}" in again.stdout + again.stderr


def test_non_finite_loss_stops_without_checkpoint(tmp_path):
    proc = run_train(tmp_path, "--train.max_steps=20", "--train.save_every_steps=1", "--optim.lr=1.0e+30",
                     "--optim.warmup_epochs=0", "--optim.grad_clip=0", check=False, name="nan")
    assert proc.returncode == 3, proc.stderr[-2000:]
    msg = proc.stderr.strip().splitlines()[-1]
    assert "non-finite loss" in msg and "at step" in msg
    bad_step = int(msg.split("at step ")[1].split(";")[0])
    saved = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "nan" / "checkpoints").glob("step-*.pt"))
    assert saved == list(range(1, bad_step + 1))  # every good step saved, none for the failed one
    for p in (tmp_path / "nan" / "checkpoints").glob("step-*.pt"):
        torch.load(p, weights_only=True)


@pytest.mark.parametrize("args,message", [
    (["--model.presett=mar_tiny"], "unknown key 'model.presett' (did you mean 'preset'?)"),
    (["--optim.batch_size=eight"], "optim.batch_size"),
    (["--data.kind=cifar"], "data.kind"),
    (["--model.preset=mar_gigantic"], "valid presets: mar_base"),
    (["--model.img_size=30"], "img_size must be a multiple of"),
])
def test_config_errors_are_one_clear_line(tmp_path, args, message):
    proc = run_train(tmp_path, "--train.max_steps=1", *args, check=False, name="bad")
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_missing_config_file(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / "nope.yaml")],
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr
