"""Bad input and failures found by trying the project as a new user: each gives one clear message, an exit
code != 0, and loses nothing. train.py and sample.py run in-process here (their ``main``), on tiny sizes."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
import train
from mar.engine.loop import MetricsLog, ema_update
from mar.generate import masked
from mar.io import FolderBusy, FolderLock, remove_stale_temps
from test_fast_path import tiny_model
from test_train import write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")


def run_train(tmp_path, capsys, *overrides, name="run"):
    cfg = write_config(tmp_path)
    rc = train.main(["--config", str(cfg), f"--train.output_dir={tmp_path / name}", *overrides])
    out = capsys.readouterr()
    return rc, out.out, out.err


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1] if err.strip() else ""


# ------------------------------------------------------------------ step settings
@pytest.mark.parametrize("override,message", [
    ("--train.save_every_steps=0", "train.save_every_steps must be >= 1"),
    ("--train.log_every_steps=0", "train.log_every_steps must be >= 1"),
    ("--train.max_steps=0", "train.max_steps must be >= 1"),
    ("--train.max_steps=-3", "train.max_steps must be >= 1"),
    ("--optim.epochs=0", "optim.epochs must be >= 1"),
])
def test_unchecked_step_settings_are_refused_before_anything_is_written(tmp_path, capsys, override, message):
    rc, _, err = run_train(tmp_path, capsys, override)
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ one run per folder
def test_a_second_training_run_into_a_busy_folder_is_refused(tmp_path, capsys):
    with FolderLock(tmp_path / "run", what="training run"):  # what a running train.py holds
        rc, _, err = run_train(tmp_path, capsys, "--train.max_steps=1")
    assert rc == 2 and "is in use by another training run (pid " in last_line(err) and "choose another" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no config, metrics or checkpoint
    rc, _, _ = run_train(tmp_path, capsys, "--train.max_steps=1")  # the lock went with its holder
    assert rc == 0 and (tmp_path / "run" / "mar_ema.safetensors").is_file() and not (tmp_path / "run" / ".lock").exists()


def test_a_lock_dies_with_its_holder(tmp_path):
    code = f"import time; from mar.io import FolderLock; FolderLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(FolderBusy, match=rf"pid {child.pid}"):
        FolderLock(tmp_path).acquire()
    child.kill()
    child.wait()
    child.stdout.close()
    FolderLock(tmp_path).acquire().release()  # kill -9 released it


def test_a_second_sample_run_into_a_busy_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "samples"
    with FolderLock(out, what="sample.py run"):
        rc = sample.main(["--num-images", "2", "--num-iter", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "is in use by another sample.py run" in last_line(err)
    assert list(out.iterdir()) == []  # no settings.json was written for the refused run


# ------------------------------------------------------------------ failed runs leave no records
def test_sample_options_are_checked_before_the_folder_is_touched(tmp_path, capsys):
    out = tmp_path / "s"
    for bad, message in [(["--cfg", "-1"], "cfg must be a finite number >= 0"),
                         (["--temperature", "0"], "temperature must be a finite number > 0"),
                         (["--sampler", "ddpm", "--eta", "0.5"], "applies to sampler='ddim' only")]:
        rc = sample.main(["--num-images", "2", "--num-iter", "2", "--batch-size", "2", "--out", str(out), *bad])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
        assert not out.exists()
    # a folder whose run wrote its settings but no image (it failed or was stopped) does not block a new run
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"format": "mar-samples-v1", "key": {"cfg": -1.0}}))
    assert sample.main(["--num-images", "2", "--num-iter", "2", "--batch-size", "2", "--cfg", "2.0", "--out", str(out)]) == 0
    assert len(list(out.glob("*_c*.png"))) == 2 and json.loads((out / "settings.json").read_text())["key"]["cfg"] == 2


def test_train_checks_the_data_before_it_rewrites_config_yaml(tmp_path, capsys):
    assert run_train(tmp_path, capsys, "--train.max_steps=1")[0] == 0
    config = (tmp_path / "run" / "config.yaml").read_bytes()
    rc, _, err = run_train(tmp_path, capsys, "--train.max_steps=2", "--optim.batch_size=512")
    assert rc == 2 and "fewer than one global batch of 512" in last_line(err)
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config


def test_no_resume_into_a_folder_with_checkpoints_is_refused(tmp_path, capsys):
    assert run_train(tmp_path, capsys, "--train.max_steps=1")[0] == 0
    rc = train.main(["--config", str(tmp_path / "tiny.yaml"), f"--train.output_dir={tmp_path / 'run'}",
                     "--train.max_steps=2", "--no-resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "--no-resume" in err and "pass a new train.output_dir" in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000001.pt"]


# ------------------------------------------------------------------ resume, temporaries, disk full
def test_metrics_jsonl_holds_each_step_once_after_a_resume_that_replays_steps(tmp_path, capsys):
    """Checkpoints at 2 and 4, then step-4's is lost (killed before the write): the resume from step 2 replays
    steps 3 and 4. metrics.jsonl must not list them twice."""
    assert run_train(tmp_path, capsys, "--train.max_steps=4", "--train.save_every_steps=2")[0] == 0
    run = tmp_path / "run"
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "checkpoints" / "step-00000004.pt").unlink()
    (run / "mar_ema.safetensors").unlink()
    assert run_train(tmp_path, capsys, "--train.max_steps=4", "--train.save_every_steps=2")[0] == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in first]  # the replay is exact


def test_metrics_log_drops_the_rows_a_resume_replays(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)))
    log = MetricsLog(path, resume_step=3)
    log.log(4, {"loss": 0.5})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_temporaries_of_a_killed_run_are_removed(tmp_path, capsys):
    assert run_train(tmp_path, capsys, "--train.max_steps=2", "--train.stop_at_step=1")[0] == 0
    ckpts = tmp_path / "run" / "checkpoints"
    stale = [ckpts / ".step-00000002.pt.tmp-4194303", tmp_path / "run" / ".config.yaml.tmp-4194302"]
    for p in stale:
        p.write_bytes(b"half a file")
    assert run_train(tmp_path, capsys, "--train.max_steps=2")[0] == 0
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001.pt", "step-00000002.pt"]
    mine = tmp_path / f".x.tmp-{os.getpid()}"  # a live writer's temporary is kept unless the caller holds the lock
    mine.write_bytes(b"")
    assert remove_stale_temps(tmp_path) == [] and remove_stale_temps(tmp_path, any_pid=True) == [mine]


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    assert run_train(tmp_path, capsys, "--train.max_steps=2", "--train.stop_at_step=1")[0] == 0
    import mar.engine.checkpoint as ck

    real = ck.torch.save

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(getattr(f, "name", "")))

    monkeypatch.setattr(ck.torch, "save", full)
    rc, _, err = run_train(tmp_path, capsys, "--train.max_steps=2")
    monkeypatch.setattr(ck.torch, "save", real)
    line = last_line(err)
    assert rc == 2 and line.startswith("error: No space left on device") and "free disk space" in line
    assert "Traceback" not in err
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001.pt"]  # no temporary, the old one intact
    assert torch.load(ckpts / "step-00000001.pt", weights_only=True)["step"] == 1


# ------------------------------------------------------------------ the LR schedule ends where the run ends
def logged_lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_a_run_cut_short_by_max_steps_ends_its_cosine_schedule_at_its_last_step(tmp_path, capsys):
    """The tiny config says 50 epochs; train.max_steps=6 makes the run 6 steps, and the cosine spans those
    (warmup 1 epoch = 0.x steps is fractional here: steps_per_epoch is the data's). Before, the schedule kept its
    50 epochs and the run ended near the peak LR."""
    args = ("--train.max_steps=6", "--optim.lr_schedule=cosine", "--optim.min_lr=1.0e-5", "--optim.warmup_epochs=0",
            "--optim.lr=1.0e-3")
    assert run_train(tmp_path, capsys, *args)[0] == 0
    lrs = logged_lrs(tmp_path / "run")
    # lr of step s (logged after it) = lr_at(s-1 of 6 steps)
    expected = {s: 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (s - 1) / 6)) for s in range(1, 7)}
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[6] < 0.1e-3  # the last step is near min_lr, not near the peak


def test_a_resume_that_would_restart_the_schedule_is_refused_unless_asked(tmp_path, capsys):
    cosine = ("--optim.lr_schedule=cosine", "--optim.min_lr=0.0", "--optim.warmup_epochs=0", "--optim.lr=1.0e-3")
    assert run_train(tmp_path, capsys, "--train.max_steps=4", "--train.stop_at_step=2", *cosine)[0] == 0
    run = tmp_path / "run"
    config, metrics = (run / "config.yaml").read_bytes(), (run / "metrics.jsonl").read_bytes()
    rc, _, err = run_train(tmp_path, capsys, "--train.max_steps=8", *cosine)
    line = last_line(err)
    assert rc == 2 and "belongs to a run of 4 steps" in line and "--train.max_steps=4" in line
    assert "--train.reschedule=true" in line and "--train.stop_at_step" in line
    assert (run / "config.yaml").read_bytes() == config and (run / "metrics.jsonl").read_bytes() == metrics
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002.pt"]
    # asked for: the run continues from step 2 on the schedule of 8 steps (a warm restart)
    assert run_train(tmp_path, capsys, "--train.max_steps=8", "--train.reschedule=true", *cosine)[0] == 0
    lrs = logged_lrs(run)
    assert sorted(lrs) == list(range(1, 9))
    assert lrs[3] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 8)), rel=1e-12)
    assert lrs[2] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 1 / 4)), rel=1e-12)  # the 4-step run's


# ------------------------------------------------------------------ the rest
def test_cfg_and_temperature_are_checked_by_the_library():
    model = tiny_model()
    for kw, message in [({"cfg": -0.5}, "cfg must be a finite number >= 0"), ({"temperature": 0.0}, "temperature"),
                        ({"temperature": -1.0}, "temperature"), ({"cfg": float("nan")}, "cfg")]:
        with pytest.raises(ValueError, match=message):
            masked(model, 1, num_iter=2, **kw)


def test_train_help_names_configs_that_exist(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    named = re.findall(r"configs/[\w.]+\.yaml", capsys.readouterr().out)
    assert named and all((ROOT / n).is_file() for n in named), named


def test_ema_pairs_parameters_by_name():
    class AB(torch.nn.Module):
        def __init__(self, first):
            super().__init__()
            for name in (("a", "b") if first == "a" else ("b", "a")):
                setattr(self, name, torch.nn.Linear(2, 2))

    ema, model = AB("a"), AB("b")  # the same names, registered in the other order
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
        for i, p in enumerate(model.parameters()):
            p.fill_(i + 1.0)
    ema_update(ema, model, 0.5)
    for name, p in ema.named_parameters():
        torch.testing.assert_close(p, 0.5 * model.get_parameter(name))
    with pytest.raises(ValueError, match="different parameters"):
        ema_update(ema, torch.nn.Linear(2, 2), 0.5)


def test_the_tests_need_nothing_outside_the_repository(tmp_path):
    """The tests that read manifests and fixtures pass from a copy of the repository with no ../shared beside it."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    copy = tmp_path / "clone"
    for f in files:
        if (ROOT / f).is_file() and not f.startswith("pretrained/"):
            (copy / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, copy / f)
    assert not (copy.parent / "shared").exists()
    tests = ["tests/test_mar.py::test_mar_base_state_dict_matches_manifest",
             "tests/test_diffloss.py::test_parameter_names_and_shapes_match_mar_base_checkpoint",
             "tests/test_kl_vae.py", "tests/test_data.py::test_fashion_mnist_dataset"]
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "passed" in proc.stdout and "skipped" not in proc.stdout
