"""Reading files that inputs name (manifests, indexes, configs, checkpoints): regular files only,
with a size limit checked before anything is read.

A FIFO or a device named like a data file would block a reader forever (a FIFO without a writer)
or never end (/dev/zero); a sparse file of a few kilobytes on disk can claim gigabytes. So a file is
opened without blocking, checked on the open descriptor (no race with a rename between a check and
the open), and its size compared with the limit of what it claims to be before a byte is read.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


class RefusedFile(ValueError):
    """A file that is not a regular file, or is larger than the limit for what it should be."""


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def is_regular(path: str | Path) -> bool:
    """Whether `path` is (or links to) a regular file; False where it cannot be examined."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: str | Path, what: str = "file") -> int:
    """A read-only descriptor of `path`, a regular file; RefusedFile for anything else (without
    blocking on a FIFO), OSError where it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise RefusedFile(f"{path}: {_kind(mode)}, not a regular file; refused as {what}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    """The content of the regular file `path`, refused (RefusedFile) when it is larger than
    `max_bytes`, before it is read."""
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise RefusedFile(f"{path}: {size:,} bytes, more than the {max_bytes:,} allowed for {what}; refused")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:           # it grew while being read
        raise RefusedFile(f"{path}: more than the {max_bytes:,} bytes allowed for {what}; refused")
    return data
