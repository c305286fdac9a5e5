"""The run directory (`out_dir`) as one trainer's property: an exclusive lock, the clean-up of
interrupted writes, and moving an earlier run aside when a new one is started in its place.

The lock is an `flock` on `<out_dir>/train.lock`, taken by rank 0 and held until the process exits;
the kernel drops it with the process, so a SIGKILLed or requeued run leaves no stale lock. The
file holds the host and PID of the holder, for the message a second trainer gets.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = "train.lock"


class RunDirBusy(RuntimeError):
    """Another trainer holds the run directory."""


class RunDirLock:
    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirBusy naming the holder. A file system without flock support
        gets a warning: the run proceeds unprotected rather than not at all."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)   # no truncation before the lock is ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "a process that just started"
            os.close(fd)
            raise RunDirBusy(f"{self.path.parent} is in use by another trainer ({holder}); wait for it to "
                             "finish or stop it, or give this run another out_dir") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            print(f"warning: {self.path}: cannot lock ({e.strerror}); nothing stops a second trainer on "
                  "this out_dir", file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)    # closing the descriptor drops the flock
            self.fd = None


def remove_stale_temps(out_dir: str | Path) -> list[Path]:
    """Temporary files of writes killed part-way (checkpoints, metrics, config); call with the lock held."""
    from trainer.checkpoint import remove_stale_temps as remove_checkpoint_temps
    out = Path(out_dir)
    removed = remove_checkpoint_temps(out / "checkpoints")
    for pattern in (".metrics.jsonl.*.tmp", ".config.yaml.*.tmp"):
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def move_run_aside(out_dir: str | Path) -> Path:
    """Move everything in `out_dir` but the lock into a new dated folder beside it; nothing is deleted."""
    out = Path(out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = out.parent / f"{out.name}.old-{stamp}", 1
    while dest.exists():
        n += 1
        dest = out.parent / f"{out.name}.old-{stamp}-{n}"
    dest.mkdir()
    for entry in out.iterdir():
        if entry.name != LOCK_NAME:
            os.rename(entry, dest / entry.name)
    return dest
