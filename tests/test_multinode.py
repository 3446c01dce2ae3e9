"""Multi-node launch on one host: two `accelerate launch` commands, one per "machine" (--num_machines 2,
--machine_rank 0 / 1, one process each, rendezvous on localhost), train the tiny MAR as one 2-process job. The
result equals the 2-process single-machine run bit for bit: same ranks, same seeds, same gloo all-reduce of two
gradients. This is the README's N-node command with N = 2 and 1 process per node."""
import sys
import threading
from pathlib import Path

from helpers import run_launched
from test_train import DONE, env, final_state, free_port, losses, run_train, write_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("--train.max_steps=3",)


def accelerate(*flags):
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--mixed_precision", "no",
            "--dynamo_backend", "no", *flags]


def test_two_machines_equal_two_processes_on_one(tmp_path):
    one = run_train(tmp_path, *STEPS, name="one_machine",
                    launcher=accelerate("--num_processes", "2", "--num_machines", "1",
                                        "--main_process_port", str(free_port())))
    cfg, port, out = write_config(tmp_path), free_port(), tmp_path / "two_machines"
    procs = [None, None]

    def machine(rank: int) -> None:
        cmd = [*accelerate("--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
                           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)),
               str(ROOT / "train.py"), "--config", str(cfg), f"--train.output_dir={out}", *STEPS]
        # machine 1 never prints the export line (the main process writes it): its end is its exit
        procs[rank] = run_launched(cmd, cwd=tmp_path, env=env(), timeout=600, grace=60,
                                   done_marker=DONE if rank == 0 else None)

    threads = [threading.Thread(target=machine, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank, proc in enumerate(procs):
        assert proc is not None and proc.returncode == 0, (rank, proc and proc.stdout[-3000:])
    assert "parameters identical on all 2 processes" in procs[0].stdout
    a, b = final_state(out, 3), final_state(tmp_path / "one_machine", 3)
    for part in ("model", "ema", "optimizer"):
        assert a[part].keys() == b[part].keys(), part
    for part in ("model", "ema"):
        for k in a[part]:
            assert a[part][k].equal(b[part][k]), (part, k)
    for i in b["optimizer"]["state"]:
        for k, v in b["optimizer"]["state"][i].items():
            assert v.equal(a["optimizer"]["state"][i][k]), (i, k)
    assert losses(out) == losses(tmp_path / "one_machine")
    # the comparison can fail: training moved the weights
    first = final_state(tmp_path / "one_machine", 3)["model"]["z_proj.weight"]
    assert not first.equal(final_state(tmp_path / "one_machine", 3)["ema"]["z_proj.weight"])
