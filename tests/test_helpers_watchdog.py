"""helpers.run_launched: the watchdog the multi-process tests launch through. A command that prints its
done marker and then hangs is killed, with everything it started, after `grace` seconds; a normal one returns."""
import os
import re
import sys
import time

import pytest

from helpers import _proc_table, run_launched

HANG = "import sys, time; print('wrote /x/mar_ema.safetensors', flush=True); print('oops', file=sys.stderr, flush=True); time.sleep(3600)"
# A launcher-like parent whose child starts its own session (as torch's elastic agent starts each rank)
# and hangs after the marker, while the parent waits for it.
HANG_IN_NEW_SESSION = ("import subprocess, sys; "
                       f"p = subprocess.Popen([sys.executable, '-c', {HANG!r}], start_new_session=True); "
                       "print('child', p.pid, flush=True); p.wait()")


def gone(pid: int) -> bool:
    state = _proc_table().get(pid)
    return state is None or state[3] in "ZX"


def test_exits_normally_returns_the_output():
    code = "import sys; print('hello'); print('to stderr', file=sys.stderr); sys.exit(3)"
    proc = run_launched([sys.executable, "-c", code], env=dict(os.environ), timeout=60, grace=5, done_marker="hello")
    assert proc.returncode == 3
    assert "hello" in proc.stdout and "to stderr" in proc.stdout


@pytest.mark.parametrize("code", [HANG, HANG_IN_NEW_SESSION], ids=["same-session", "rank-in-new-session"])
def test_hang_after_the_marker_is_killed_with_the_output(code):
    grace, t0 = 2.0, time.monotonic()
    with pytest.raises(AssertionError) as e:
        run_launched([sys.executable, "-c", code], env=dict(os.environ), timeout=120, grace=grace,
                     done_marker=re.compile(r"wrote \S*mar_ema\.safetensors"))
    took = time.monotonic() - t0
    assert took < grace + 20, took  # not the 120 s timeout (py-spy stack dumps, when installed, take a little)
    msg = str(e.value)
    assert "had not exited" in msg and "wrote /x/mar_ema.safetensors" in msg and "oops" in msg
    assert "processes still alive when killed" in msg and "time.sleep(3600)" in msg
    pids = [int(p) for p in re.findall(r"^  pid (\d+) ", msg, flags=re.M)]
    assert len(pids) == (1 if code == HANG else 2)
    time.sleep(0.5)
    assert all(gone(p) for p in pids), [p for p in pids if not gone(p)]  # nothing orphaned


def test_timeout_without_marker_kills():
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="timeout") as e:
        run_launched([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(3600)"],
                     env=dict(os.environ), timeout=2, grace=60, done_marker="never printed")
    assert time.monotonic() - t0 < 25 and "started" in str(e.value)


def test_an_orphan_left_behind_is_an_error():
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'], "
            "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print('orphan', p.pid, flush=True); time.sleep(1)")
    try:
        proc = run_launched([sys.executable, "-c", code], env=dict(os.environ), timeout=60, grace=2)
    except AssertionError as e:
        msg = str(e)
    else:
        os.kill(int(proc.stdout.split()[1]), 9)
        pytest.fail("the orphan was not noticed")
    assert "left processes running" in msg
    orphan = int(re.search(r"orphan (\d+)", msg).group(1))
    assert f"  pid {orphan} " in msg
    time.sleep(0.5)
    assert gone(orphan)
