"""Atomic file writes: a reader sees the old file or the complete new one, never a torn write.

The content goes to a temporary file beside the target (same directory, so the same file system),
is flushed to disk, and is renamed over the target in one step. A kill at any point leaves at
most a stale `.NAME.*.tmp` file behind, and the target untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; on a clean exit it is fsynced and renamed
    over `path`, on an exception removed. Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per process and thread, so concurrent writers of one target never share a temp file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj, **json_kwargs) -> None:
    """`obj` as JSON text (`json.dumps(obj, **json_kwargs)` and a newline), written atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, **json_kwargs) + "\n")
