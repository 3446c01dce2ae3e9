"""Test helpers shared by several test files (imported as ``helpers``: pytest puts tests/ on sys.path)."""
import codecs
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def synthetic_classes(n: int, seed: int, size: int = 32):
    """Separable 10-class grey images, uint8 (N, size, size) and labels (N,) as tensors: class k = a bright 6x6
    square at cell k of a 2x5 grid, on dim noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.rand(n, size, size, generator=g) * 60
    off = (size - 28) // 2
    for i, k in enumerate(labels.tolist()):
        r, c = divmod(k, 5)
        images[i, off + 4 + 12 * r: off + 10 + 12 * r, off + 1 + 5 * c: off + 6 + 5 * c] = 230
    return images.to(torch.uint8), labels


def write_pngs(folder, images, labels=None) -> str:
    """uint8 (N, H, W) grey or (N, H, W, 3) -> PNGs named {i:06d}.png or {i:06d}_c{label:03d}.png."""
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(np.asarray(images)):
        name = f"{i:06d}.png" if labels is None else f"{i:06d}_c{int(labels[i]):03d}.png"
        Image.fromarray(img).save(os.path.join(folder, name))
    return str(folder)


# ---------------------------------------------------------------- launching commands with a watchdog
def _proc_table() -> dict:
    """{pid: (ppid, session id, start time, state)} of every process, from /proc (empty where there is none)."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        table[int(name)] = (int(fields[1]), int(fields[3]), int(fields[19]), fields[0])
    return table


def _descendants(roots, table) -> set:
    children = {}
    for pid, (ppid, _sid, _start, _state) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _describe(pid: int) -> str:
    """One line per process: pid, state, kernel wait channel, RANK, command line."""
    def read(name):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                return f.read()
        except OSError:
            return b""
    stat = read("stat").decode(errors="replace")
    state = stat[stat.rindex(")") + 2:].split()[0] if ")" in stat else "?"
    rank = [v.decode(errors="replace") for v in read("environ").split(b"\0") if v.startswith(b"RANK=")]
    cmd = read("cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
    return (f"  pid {pid} state {state} wchan {read('wchan').decode(errors='replace') or '?'}"
            f"{' ' + rank[0] if rank else ''}: {cmd[:300]}")


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _stacks(pids, budget: float = 20.0) -> str:
    """Python stacks of the still-running python processes, where py-spy is installed (best effort)."""
    tool, out, end = _py_spy(), [], time.monotonic() + budget
    if tool is None:
        return ""
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"python" not in f.read().split(b"\0")[0]:
                    continue
        except OSError:
            continue
        left = end - time.monotonic()
        if left <= 1:
            out.append("(no time left for the stacks of the other processes)")
            break
        try:  # with the C/C++ frames (the process is paused for it) where allowed, else the Python ones only
            for how in (["--native"], ["--nonblocking"]):
                r = subprocess.run([tool, "dump", *how, "--pid", str(pid)], capture_output=True, text=True,
                                   timeout=min(10.0, max(1.0, end - time.monotonic())))
                if r.returncode == 0:
                    break
            out.append(f"--- py-spy dump {how[0]} of {pid} ---\n{(r.stdout + r.stderr).strip()[:4000]}")
        except (OSError, subprocess.TimeoutExpired) as e:
            out.append(f"--- py-spy dump of {pid} failed: {e}")
    return "\n".join(out)


class _Watched:
    """A command started in its own session whose every descendant is remembered, so that all of them can be
    killed: torch's elastic launcher (accelerate launch, torchrun) starts each rank in a new session, so killing
    the launcher's process group alone would orphan the ranks."""

    def __init__(self, cmd, env, cwd):
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.seen = {self.proc.pid: None}  # pid -> start time (None: the launcher itself, which we wait for)
        self.chunks, self.lock = [], threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            data = os.read(self.proc.stdout.fileno(), 65536)
            if not data:
                break
            with self.lock:
                self.chunks.append(decoder.decode(data))
        with self.lock:
            self.chunks.append(decoder.decode(b"", final=True))
        self.proc.stdout.close()

    def output(self) -> str:
        with self.lock:
            text = "".join(self.chunks)
            self.chunks = [text]
        return text

    def track(self) -> set:
        """Record the current descendants (by parentage, and by the launcher's session); return the live ones."""
        table = _proc_table()
        roots = self.alive(table)
        for pid in _descendants(roots, table) | {p for p, v in table.items() if v[1] == self.proc.pid}:
            self.seen.setdefault(pid, table[pid][2])
        return self.alive(table)

    def alive(self, table=None) -> set:
        table = _proc_table() if table is None else table
        return {p for p, start in self.seen.items() if p in table and table[p][3] not in "ZX"
                and (table[p][2] == start if start is not None else self.proc.returncode is None)}
        # (the same start time: not a reused pid; the launcher counts until it has been waited for)

    def kill(self) -> tuple[str, str]:
        """Describe, freeze and SIGKILL every live process of the command; (description, stacks)."""
        live = self.track()
        lines = {p: _describe(p) for p in live}  # before SIGSTOP, which would hide the kernel wait channel
        stacks = _stacks(live)
        for _ in range(5):  # freeze first, so that nothing forks or restarts a rank meanwhile
            for pid in live:
                with _quiet():
                    os.kill(pid, signal.SIGSTOP)
            now = self.track() | live
            if now == live:
                break
            lines.update({p: _describe(p) for p in now - live})
            live = now
        ours = os.getpgrp()
        for pid in live:
            with _quiet():
                pgid = os.getpgid(pid)
                if pgid != ours:
                    os.killpg(pgid, signal.SIGKILL)
            with _quiet():
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:  # orphans are reaped by init
            time.sleep(0.05)
        self.reader.join(10)
        return "\n".join(lines[p] for p in sorted(lines)) or "  (none)", stacks


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


def run_launched(cmd, *, env=None, cwd=None, timeout: float = 600, grace: float = 60, done_marker=None,
                 tail: int = 3000, poll: float = 0.2) -> subprocess.CompletedProcess:
    """Run ``cmd`` (e.g. ``accelerate launch ...``) with a watchdog; its stdout and stderr go, interleaved, to
    the returned ``CompletedProcess``'s ``stdout`` (``stderr`` is "").

    The command runs in its own session, and every process it starts is tracked. All of them are SIGKILLed, and
    an AssertionError is raised with the last ``tail`` characters of the output, the processes that were still
    alive (state, kernel wait channel, RANK, command line) and their Python stacks (when py-spy is installed),
    when:
      * the run takes longer than ``timeout`` seconds; or
      * ``done_marker`` (a substring, or a compiled regular expression searched in the output) has appeared,
        i.e. the work is done, and the command has not exited ``grace`` seconds after its last appearance
        (a rank hanging at exit); or
      * the command exited but some process it started is still alive ``grace`` seconds later (an orphan).
    A non-zero exit status is not an error here: check ``returncode``.
    """
    if isinstance(done_marker, re.Pattern):
        def ends(text, at):  # end positions of the marker's matches that end after `at`
            return [m.end() for m in done_marker.finditer(text, max(0, at - 4096)) if m.end() > at]
    elif done_marker is not None:
        def ends(text, at):
            found, i = [], text.find(done_marker, max(0, at - len(done_marker) + 1))
            while i >= 0:
                found.append(i + len(done_marker))
                i = text.find(done_marker, i + 1)
            return found
    w = _Watched([str(c) for c in cmd], env, cwd)
    start = time.monotonic()
    marker_at, scanned, reason = None, 0, None
    while reason is None:
        exited = w.proc.poll() is not None
        w.track()
        if done_marker is not None:
            text = w.output()
            if len(text) > scanned:
                if ends(text, scanned):
                    marker_at = time.monotonic()  # grace counts from the marker's last appearance
                scanned = len(text)
        if exited:
            break
        now = time.monotonic()
        if now - start > timeout:
            reason = f"the command ran past its {timeout:g} s timeout"
        elif marker_at is not None and now - marker_at > grace:
            reason = (f"the work was done ({done_marker!r} was printed) but the command had not exited "
                      f"{grace:g} s later: a process is hanging")
        else:
            time.sleep(poll)
    if reason is None:  # the launcher exited: every process it started must be gone too, and the pipe closed
        deadline = time.monotonic() + grace
        while (w.alive() or w.reader.is_alive()) and time.monotonic() < deadline:
            time.sleep(poll)
        if w.alive():
            reason = f"the command exited ({w.proc.returncode}) but left processes running {grace:g} s later"
        elif w.reader.is_alive():
            reason = f"the command exited ({w.proc.returncode}) but its output pipe was still held open"
    if reason is None:
        w.reader.join()
        return subprocess.CompletedProcess(w.proc.args, w.proc.returncode, stdout=w.output(), stderr="")
    description, stacks = w.kill()
    left = w.alive()
    raise AssertionError(
        f"{reason}; killed all its processes after {time.monotonic() - start:.1f} s.\n"
        f"command: {' '.join(w.proc.args)}\n"
        f"processes still alive when killed:\n{description}\n"
        + (f"NOT killed (still alive): {sorted(left)}\n" if left else "")
        + (f"{stacks}\n" if stacks else "")
        + f"--- last {tail} characters of the output ---\n{w.output()[-tail:]}")
