"""Parallel bz2 decompression for the metadata scan. YFCC100M is one ~13 GB bz2 stream, and the
standard library's bz2 decompresses it on one core at about 100,000 rows/s; the rest of the scan
is faster than that, so decompression sets the pace unless it runs on several cores.

indexed_bzip2 (a maintained C++ library with Python wheels; `pip install indexed-bzip2`) finds the
block boundaries of one bz2 stream and decompresses its blocks on N threads without the GIL. It is
used only where it gives exactly the bytes the standard library gives:

- a file that does not end in a bz2 end-of-stream marker (cut short, or followed by other bytes,
  which indexed_bzip2 would skip with a warning) is left to the standard library from the start,
  which reports the damage as a counted `truncated_input`;
- where it raises mid-stream (a damaged block), `Failed` says how many bytes it delivered, and the
  caller goes on with the standard library after those bytes (tests/test_metadata.py compares the
  two readers on whole, concatenated, cut, padded and damaged files).
"""
from __future__ import annotations

import io
import os
import threading
from typing import BinaryIO, Iterator

try:
    import indexed_bzip2
except ImportError:      # optional: without it the scan decompresses on one core
    indexed_bzip2 = None

_EOS_MAGIC = 0x177245385090      # 48 bits closing every bz2 stream, then a 32-bit CRC, then 0-7 zero bits
_TAIL = 11                       # bytes that hold magic, CRC and padding whatever the padding


class Failed(Exception):
    """indexed_bzip2 stopped mid-stream after `delivered` decompressed bytes (all of them correct)."""

    def __init__(self, delivered: int, cause: BaseException):
        super().__init__(f"parallel bz2 decompression failed after {delivered} bytes: {cause}")
        self.delivered = delivered


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        return os.cpu_count() or 1


def usable(raw: BinaryIO, threads: int) -> bool:
    """Whether to decompress `raw` (a seekable bz2 file at offset 0) in parallel: more than one
    thread asked for, the library installed, and the file ending in an end-of-stream marker."""
    if threads <= 1 or indexed_bzip2 is None:
        return False
    size = os.fstat(raw.fileno()).st_size
    if size < 4 + 10:            # "BZh9" plus the shortest end of stream
        return False
    raw.seek(size - _TAIL)
    tail = int.from_bytes(raw.read(_TAIL), "big")
    raw.seek(0)
    return any(tail & ((1 << pad) - 1) == 0 and (tail >> (pad + 32)) & ((1 << 48) - 1) == _EOS_MAGIC
               for pad in range(8))


class _Counted(io.RawIOBase):
    """The compressed file as indexed_bzip2 reads it, remembering how far it has read (the progress
    bar counts compressed bytes). Handing it a file object, not a descriptor, keeps this count."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.high = raw, 0
        self._lock = threading.Lock()     # its threads may read concurrently

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        with self._lock:
            n = self.raw.readinto(buf)
            self.high = max(self.high, self.raw.tell())
        return n

    def read(self, n: int = -1) -> bytes:
        with self._lock:
            data = self.raw.read(n)
            self.high = max(self.high, self.raw.tell())
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        with self._lock:
            return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


def pieces(raw: BinaryIO, threads: int, piece: int, stop: threading.Event) -> Iterator[tuple[bytes, int]]:
    """(decompressed bytes, compressed bytes newly read) of `raw` on `threads` threads, at most
    `piece` bytes at a time, until the end or until `stop` is set. Raises Failed mid-stream."""
    counted = _Counted(raw)
    f = indexed_bzip2.open(counted, parallelization=threads)
    delivered = reported = 0
    try:
        while not stop.is_set():
            try:
                out = f.read(piece)
            except Exception as e:     # the library raises RuntimeError (C++ exceptions) for bad data
                raise Failed(delivered, e) from e
            if not out:
                return
            delivered += len(out)
            high = counted.high
            yield out, high - reported
            reported = high
    finally:
        f.close()
