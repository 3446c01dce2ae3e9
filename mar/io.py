"""Files the project writes: one atomic-write helper, and the PNG, grid and JSON writers built on it.

Every file is first written as ``.<name>.tmp-<pid>`` in its own folder, flushed and fsynced, then renamed
over the final name with ``os.replace`` (and the folder fsynced): a reader, or a resume after a crash, sees
the old file or the new one, never half of one. A process killed mid-write (kill -9) leaves its temporary
behind; ``remove_stale_temps`` deletes those whose writer is no longer alive. PIL only, no torchvision I/O.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def temp_path(path: Path) -> Path:
    """Where ``atomic_write`` puts the bytes of ``path`` while it writes them."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)``, fsync tmp, rename it over ``path`` and fsync the folder; returns ``path``.

    On any error (disk full included) the temporary is removed and the old ``path``, if any, is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(obj, path: str | os.PathLike) -> Path:
    """``obj`` as indented JSON, atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, any_pid: bool = False) -> list[Path]:
    """Delete the temporaries of ``atomic_write`` in ``folder`` whose writer has died (all of them with
    ``any_pid``, for a caller that holds the folder's lock); returns what was removed."""
    folder = Path(folder)
    removed = []
    for p in folder.iterdir() if folder.is_dir() else ():
        m = TEMP_NAME.match(p.name)
        if m and p.is_file() and (any_pid or not _pid_alive(int(m.group("pid")))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# --- images ------------------------------------------------------------------------------------------------------
def _as_hwc_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {img.dtype}")
    return img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img


def save_png(img: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one (H, W, C) or (H, W) uint8 image as PNG, atomically."""
    image = Image.fromarray(_as_hwc_uint8(img))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, value: int = 255) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) image."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, upscale: int = 1) -> None:
    """Write a grid PNG of (N, H, W, C) uint8 images; ``upscale`` enlarges small images (nearest)."""
    grid = make_grid(images, nrow)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    save_png(grid, path)


def write_grid(images: np.ndarray, nrow: int, path: str | os.PathLike) -> None:
    """Grid PNG of (n, H, W, C) uint8 images; images smaller than 64 px are enlarged (nearest)."""
    save_grid(images, path, nrow=nrow, upscale=max(1, 64 // np.asarray(images).shape[1]))


# --- one writer per folder --------------------------------------------------------------------------------------
class FolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive lock on a folder: ``fcntl.flock`` on ``<folder>/.lock``, held until ``release`` or the process
    ends (also by kill -9: the kernel drops it, so a lock never outlives its holder). The file records the
    holder's pid and command for the message a second writer gets, and is removed on release."""

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.folder, self.what, self._fd = Path(folder), what, None

    @property
    def path(self) -> Path:
        return self.folder / ".lock"

    def acquire(self) -> FolderLock:
        import fcntl
        import sys
        import time

        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FolderBusy(f"{self.folder} is in use by another {self.what} ({holder}): wait for it to "
                                 "finish, or choose another output folder") from None
            try:  # the holder we waited on may have removed the file meanwhile: lock the file that is there
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{' '.join(sys.argv)}".encode()[:4000])
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_os_error(e: OSError) -> str:
    """An OSError as one line with the fix (disk full, permissions, read-only file system)."""
    import errno

    what = f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else "")
    fix = {errno.ENOSPC: "free disk space (or use another output folder) and rerun: complete files are kept and "
                         "a training run resumes from its last checkpoint",
           errno.EACCES: "check the folder's permissions, or use another output folder",
           errno.EROFS: "the file system is read-only: use another output folder"}.get(e.errno, "")
    return f"{what}; {fix}" if fix else what
