"""Streaming readers of the YFCC100M metadata (Webscope TSV, plain or .bz2, or the SQLite form) and
of the YFCC15M subset list. Memory stays bounded: the metadata is never held, and the subset's
14.8M photo ids live in one sorted int64 numpy array (about 120 MB) searched in vectorised batches.

Bad rows are counted in `ScanStats` with a few `file:line` examples and skipped; only inputs that
are unusable as a whole (a wrong file, a wrong format, an empty file) raise `InputError`, naming
file and line. A row longer than `MAX_LINE_BYTES` is malformed (never held whole), and a photo id
outside the 64-bit range is malformed too.

Memory stays bounded whatever the input: the bz2 stream is decompressed a bounded piece at a time
(a few kilobytes of bz2 can hold gigabytes of newlines), and blank lines are skipped without
making an object per line.
"""
from __future__ import annotations

import bz2
import hashlib
import os
import queue
import re
import sqlite3
import threading
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from tqdm import tqdm

from pipeline import parallel_bz2
from pipeline.regular_files import RefusedFile, open_regular

METADATA_COLUMNS = 25
SUBSET_COLUMNS = 3
PROBE_LINES = 100        # no valid row among the first PROBE_LINES lines -> the file is the wrong one
MAX_EXAMPLES = 5         # file:line examples kept per reason
SQLITE_COLUMNS = ("photoid", "title", "description", "downloadurl", "licensename", "ext", "marker")
MAX_LINE_BYTES = 1 << 20  # a YFCC100M row is a few kB, its description included
INT64 = range(-(1 << 63), 1 << 63)    # photo ids are stored as int64
_BLANK_RUN = re.compile(rb"\n\n+")     # found at C speed, so a flood of empty lines costs no Python loop


def _numbered(block: bytes, before: int) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of the non-empty lines of `block`, whole lines ending in a newline, the
    first of them line `before + 1`."""
    lineno, pos = before, 0
    for run in _BLANK_RUN.finditer(block):
        for line in block[pos:run.start()].split(b"\n"):   # its last line ends at the run's first newline
            lineno += 1
            if line:
                yield lineno, line
        lineno += run.end() - run.start() - 1          # the empty lines of the run
        pos = run.end()
    if pos < len(block):
        for line in block[pos:-1].split(b"\n"):
            lineno += 1
            if line:
                yield lineno, line


class InputError(ValueError):
    """An input file that cannot be used at all (wrong file or format); the message names file:line."""


@dataclass
class ScanStats:
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str | None = None, n: int = 1) -> None:
        self.counts[reason] += n
        if where is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < MAX_EXAMPLES:
                ex.append(where)

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}


@dataclass(frozen=True)
class MetadataRow:
    photoid: int
    hash: str               # mirror hash: md5 of the download URL, each byte in hex without a leading zero
    title: str              # raw, URL-encoded
    description: str        # raw, URL-encoded
    download_url: str
    license: str
    ext: str
    is_video: bool
    where: str              # file:line, for error reports


def url_hash(download_url: str) -> str:
    """The multimedia-commons mirror hash of a photo (the SQLite form has no hash column)."""
    return "".join(f"{b:x}" for b in hashlib.md5(download_url.encode()).digest())


def detect_format(path: Path) -> str:
    """'sqlite', 'bz2' or 'tsv' from the file's magic bytes (the name may lie)."""
    try:
        with os.fdopen(open_regular(path, "an input file"), "rb") as f:
            head = f.read(16)
    except RefusedFile as e:
        raise InputError(str(e)) from e
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from e
    if head.startswith(b"SQLite format 3\0"):
        return "sqlite"
    if head.startswith(b"BZh"):
        return "bz2"
    return "tsv"


class Block:
    """Whole lines read together, each ending in a newline (blank lines and overlong lines included)."""
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


class _Lines:
    """Numbered byte lines (without the newline) of a plain or bz2 file, a progress bar over the bytes
    read from disk, and a truncated bz2 stream turned into a counted event instead of a crash.

    Empty lines are skipped (their numbers still count); a line longer than `MAX_LINE_BYTES` comes
    as None, its bytes dropped as they arrive. A thread reads and decompresses ahead (bz2 releases
    the GIL while it works; pipeline/parallel_bz2.py spreads it over `threads` cores where it can,
    with the same bytes), so decompression overlaps with parsing on the main thread; at most
    `QUEUED` pieces of at most `PIECE` bytes wait between the two. Whatever the thread raises is
    handed to the consumer: it never waits for a thread that has died."""

    CHUNK = 1 << 18    # raw bytes per read
    PIECE = 1 << 20    # decompressed bytes per queue item
    QUEUED = 8

    def __init__(self, path: Path, stats: ScanStats, desc: str, progress: bool, threads: int | None = None):
        self.path, self.stats, self.desc, self.progress = path, stats, desc, progress
        self.threads = parallel_bz2.available_cores() if threads is None else threads

    def _produce(self, raw: BinaryIO, compressed: bool, q: queue.Queue, stop: threading.Event) -> None:
        """Put (bytes, raw bytes consumed) on the queue; (b"", 0) at the end, an exception if the
        input fails (EOFError: the bz2 data ends mid-stream; everything before has been delivered).
        bz2 is decompressed on `threads` cores where pipeline/parallel_bz2.py can, else here."""
        try:
            skip = 0
            if compressed and parallel_bz2.usable(raw, self.threads):
                try:
                    for out, consumed in parallel_bz2.pieces(raw, self.threads, self.PIECE, stop):
                        q.put((out, consumed))
                    q.put((b"", 0))
                    return
                except parallel_bz2.Failed as e:    # a damaged block: the standard library says what it says
                    skip = e.delivered
                    raw.seek(0)
            self._produce_stdlib(raw, compressed, q, stop, skip)
        except Exception as e:       # handed over, never lost with the thread
            q.put((e, 0))

    def _produce_stdlib(self, raw: BinaryIO, compressed: bool, q: queue.Queue, stop: threading.Event,
                        skip: int) -> None:
        """The one-core reader; the first `skip` decompressed bytes (delivered already) are dropped."""
        dec, started = bz2.BZ2Decompressor(), False
        while not stop.is_set():
            data = raw.read(self.CHUNK if compressed else self.PIECE)
            if not data:
                if compressed and started:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
                q.put((b"", 0))
                return
            if not compressed:
                q.put((data, len(data)))
                continue
            consumed, feed = 0 if skip else len(data), data
            while not stop.is_set():
                started = started or bool(feed)
                out = dec.decompress(feed, self.PIECE)
                feed = b""
                if skip and out:
                    dropped = min(skip, len(out))
                    out, skip = out[dropped:], skip - dropped
                if out:
                    q.put((out, consumed))
                    consumed = 0
                if dec.eof:                # concatenated bz2 streams (pbzip2, lbzip2)
                    feed, dec, started = dec.unused_data, bz2.BZ2Decompressor(), False
                    if not feed:
                        break
                elif dec.needs_input:
                    break
            if consumed:
                q.put((b"", consumed))

    def _next(self, q: queue.Queue, reader: threading.Thread):
        while True:
            try:
                return q.get(timeout=1.0)
            except queue.Empty:
                if not reader.is_alive() and q.empty():
                    raise RuntimeError(f"{self.path}: the reader thread ended without a result") from None

    def __iter__(self) -> Iterator[tuple[int, bytes | None]]:
        for lineno, item in self.pieces():
            if isinstance(item, Block):
                for n, line in _numbered(item.data, lineno):
                    yield n, line if len(line) <= MAX_LINE_BYTES else None
            else:
                yield lineno, item

    def pieces(self) -> Iterator[tuple[int, "Block | bytes | None"]]:
        """(lines before, Block of whole lines) for most of the input, or (line number, line) for a
        last line without a newline and (line number, None) for an overlong line."""
        try:
            raw: BinaryIO = os.fdopen(open_regular(self.path, "an input file"), "rb")
        except (OSError, RefusedFile) as e:
            raise InputError(f"{self.path}: cannot read ({e})") from e
        size = os.fstat(raw.fileno()).st_size
        bar = tqdm(total=size, desc=self.desc, unit="B", unit_scale=True, disable=not self.progress,
                   mininterval=0.5, smoothing=0.1)
        q: queue.Queue = queue.Queue(maxsize=self.QUEUED)
        stop = threading.Event()
        reader = threading.Thread(target=self._produce, daemon=True,
                                  args=(raw, detect_format(self.path) == "bz2", q, stop))
        reader.start()
        lineno, rest, skipping = 0, b"", False     # newlines read; the line being read; inside an overlong line
        try:
            while True:
                chunk, consumed = self._next(q, reader)
                if isinstance(chunk, (EOFError, OSError)):
                    self.stats.add("truncated_input", f"{self.path}:{lineno + 1}: {chunk}")
                    break    # the partial last line is dropped with the rest of the stream
                if isinstance(chunk, Exception):
                    raise chunk
                if not chunk and not consumed:
                    if skipping or rest:
                        yield lineno + 1, None if skipping else rest
                    break
                bar.update(consumed)
                if skipping:
                    nl = chunk.find(b"\n")
                    if nl < 0:
                        continue
                    lineno += 1
                    yield lineno, None
                    chunk, skipping = chunk[nl + 1:], False
                last = chunk.rfind(b"\n")
                if last < 0:
                    rest += chunk
                else:
                    block, rest = rest + chunk[:last + 1], chunk[last + 1:]
                    yield lineno, Block(block)
                    lineno += block.count(b"\n")
                if len(rest) > MAX_LINE_BYTES:
                    rest, skipping = b"", True
        finally:
            stop.set()
            while reader.is_alive():      # unblock a producer waiting on a full queue
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
            bar.close()
            raw.close()


class _WrongFileGuard:
    """Raises InputError when the first lines of a file contain no valid row at all."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.good, self.first_bad = path, what, 0, None

    def bad(self, lineno: int, why: str) -> None:
        if self.good == 0:
            if self.first_bad is None:
                self.first_bad = f"{self.path}:{lineno}: {why}"
            if lineno >= PROBE_LINES:
                self.fail()

    def fail(self) -> None:
        raise InputError(f"{self.first_bad} (no valid row in the first lines: is this {self.what}?)")

    def finish(self) -> None:
        """At the end of the file: a file without a single valid row is the wrong one, or empty."""
        if self.good == 0:
            if self.first_bad is None:
                raise InputError(f"{self.path}: no rows at all (an empty file? expected {self.what})")
            self.fail()


class SubsetIds:
    """The YFCC15M photo ids as a sorted unique int64 array, plus which of them the metadata had."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids
        self.seen = np.zeros(len(ids), dtype=bool)

    @classmethod
    def from_file(cls, path: str | Path, stats: ScanStats, progress: bool = True) -> "SubsetIds":
        path = Path(path)
        guard = _WrongFileGuard(path, "the YFCC15M subset list (line, photo id, hash)")
        buf = array("q")
        for lineno, line in _Lines(path, stats, "subset", progress):
            parts = line.rstrip(b"\r").split(b"\t") if line is not None else None
            if parts is not None and len(parts) == 1 and not parts[0].strip():
                continue
            try:
                if parts is None:
                    raise ValueError(f"line longer than {MAX_LINE_BYTES} bytes")
                if len(parts) != SUBSET_COLUMNS:
                    raise ValueError(f"expected {SUBSET_COLUMNS} tab-separated columns, found {len(parts)}")
                pid = int(parts[1])
                if pid not in INT64:
                    raise ValueError("photo id out of the 64-bit range")
                buf.append(pid)
            except ValueError as e:
                stats.add("subset_malformed", f"{path}:{lineno}: {str(e)[:80]}")
                guard.bad(lineno, str(e)[:80])
                continue
            guard.good += 1
        guard.finish()
        ids = np.frombuffer(buf, dtype=np.int64) if len(buf) else np.zeros(0, np.int64)
        unique = np.unique(ids)
        stats.add("subset_rows", n=len(ids))
        if len(unique) < len(ids):
            sorted_ids = np.sort(ids)
            dups = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
            stats.add("duplicate_subset_id", n=len(dups))
            stats.examples["duplicate_subset_id"] = [f"{path}: photo id {i}" for i in np.unique(dups)[:MAX_EXAMPLES]]
        return cls(unique)

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, batch: np.ndarray) -> np.ndarray:
        """Position of each id in the subset, -1 where absent."""
        if len(self.ids) == 0:
            return np.full(len(batch), -1)
        pos = np.searchsorted(self.ids, batch)
        pos[pos == len(self.ids)] = 0
        return np.where(self.ids[pos] == batch, pos, -1)

    def missing(self) -> np.ndarray:
        return self.ids[~self.seen]


def read_metadata(path: str | Path, subset: SubsetIds | None, stats: ScanStats, progress: bool = True,
                  batch_lines: int = 8192, threads: int | None = None) -> Iterator[MetadataRow]:
    """Rows of the metadata (TSV / .bz2 / SQLite, detected) whose photo id is in `subset` (all rows
    when `subset` is None), in file order, each photo id at most once. A .bz2 file is decompressed
    on `threads` cores (default: all this process may use; 1: the standard library alone)."""
    path = Path(path)
    if detect_format(path) == "sqlite":
        yield from _read_sqlite(path, subset, stats, progress, batch_lines)
    else:
        yield from _read_tsv(path, subset, stats, progress, batch_lines, threads)


def _keep(subset: SubsetIds | None, ids, where_of, stats: ScanStats) -> list[int]:
    """Indices into the batch of rows to keep: in the subset, and not seen before."""
    if subset is None:
        return list(range(len(ids)))
    pos = subset.lookup(np.asarray(ids, dtype=np.int64))
    stats.add("not_in_subset", n=int((pos < 0).sum()))
    keep = []
    seen = subset.seen
    for i in np.flatnonzero(pos >= 0).tolist():
        p = pos[i]
        if seen[p]:
            stats.add("duplicate_photo", where_of(i))
            continue
        seen[p] = True
        keep.append(i)
    return keep


_MAX_DIGITS = 18     # a photo id of up to 18 ASCII digits is an int64 whatever its digits


def _plain_rows(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(photo ids, line starts, line ends) of a block of whole lines when every line is a plain row:
    25 columns, at most MAX_LINE_BYTES, a photo id of 1 to 18 ASCII digits. None when any line is
    not, and the block is read line by line instead. Found with numpy over the whole block, so the
    ~85% of YFCC100M rows outside the subset never become Python objects; the rows accepted here are
    exactly those the line-by-line path accepts with the same photo id."""
    arr = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(arr == 10)
    tabs = np.flatnonzero(arr == 9)
    n, per = len(ends), METADATA_COLUMNS - 1
    if n == 0 or len(tabs) != per * n:
        return None
    starts = np.empty(n, np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    t = tabs.reshape(n, per)
    # the tabs are sorted and number `per` a line: group i inside line i for every i <=> each line has `per`
    if not ((t[:, 0] >= starts).all() and (t[:, -1] < ends).all()) or (ends - starts).max() > MAX_LINE_BYTES:
        return None
    first = t[:, 0] + 1
    width = t[:, 1] - first
    if width.min() < 1 or width.max() > _MAX_DIGITS:
        return None
    w = int(width.max())
    cols = np.arange(w)
    digits = arr[np.minimum(first[:, None] + cols, len(arr) - 1)].astype(np.int64) - 48
    inside = cols < width[:, None]
    if ((digits < 0) | (digits > 9))[inside].any():
        return None
    ids = np.zeros(n, np.int64)
    for j in range(w):
        ids = np.where(inside[:, j], ids * 10 + digits[:, j], ids)
    return ids, starts, ends


def _read_tsv(path: Path, subset, stats, progress, batch_lines, threads=None) -> Iterator[MetadataRow]:
    guard = _WrongFileGuard(path, "the YFCC100M metadata (25 tab-separated columns)")
    lines: list[tuple[int, bytes]] = []
    ids: list[int] = []
    where = f"{path}:"

    def row(pid: int, lineno: int, line: bytes) -> MetadataRow | None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            stats.add("non_utf8", f"{path}:{lineno}: byte {e.start}")
            return None
        f = text.rstrip("\r").split("\t")
        return MetadataRow(pid, f[2], f[8], f[9], f[16], f[17], f[23], f[24].strip() == "1", where + str(lineno))

    def flush() -> Iterator[MetadataRow]:
        for i in _keep(subset, ids, lambda i: f"{path}:{lines[i][0]}", stats):
            r = row(ids[i], *lines[i])
            if r is not None:
                yield r
        lines.clear()
        ids.clear()

    def plain_block(before: int, data: bytes, found) -> Iterator[MetadataRow]:
        block_ids, starts, ends = found
        n = len(block_ids)
        stats.counts["rows_read"] += n
        guard.good += n
        for i in _keep(subset, block_ids, lambda i: f"{path}:{before + i + 1}", stats):
            r = row(int(block_ids[i]), before + i + 1, data[starts[i]:ends[i]])
            if r is not None:
                yield r

    for lineno, item in _Lines(path, stats, "metadata", progress, threads).pieces():
        if isinstance(item, Block):
            found = _plain_rows(item.data)
            if found is not None:
                yield from flush()          # rows stay in file order
                yield from plain_block(lineno, item.data, found)
                continue
            numbered = ((n, line if len(line) <= MAX_LINE_BYTES else None) for n, line in _numbered(item.data, lineno))
        else:
            numbered = ((lineno, item),)
        for lineno, line in numbered:
            stats.counts["rows_read"] += 1
            if line is None:
                why = f"line longer than {MAX_LINE_BYTES} bytes"
                stats.add("malformed", f"{path}:{lineno}: {why}")
                guard.bad(lineno, why)
                continue
            tabs = line.count(b"\t")
            if tabs != METADATA_COLUMNS - 1:
                if not line.strip():
                    stats.counts["rows_read"] -= 1
                    continue
                why = f"expected {METADATA_COLUMNS} tab-separated columns, found {tabs + 1}"
                stats.add("malformed", f"{path}:{lineno}: {why}")
                guard.bad(lineno, why)
                continue
            start = line.index(b"\t") + 1
            try:
                pid = int(line[start:line.index(b"\t", start)])
            except ValueError:
                stats.add("malformed", f"{path}:{lineno}: photo id is not an integer")
                guard.bad(lineno, "photo id is not an integer")
                continue
            if pid not in INT64:
                stats.add("malformed", f"{path}:{lineno}: photo id out of the 64-bit range")
                guard.bad(lineno, "photo id out of the 64-bit range")
                continue
            guard.good += 1
            lines.append((lineno, line))
            ids.append(pid)
            if len(ids) >= batch_lines:
                yield from flush()
    yield from flush()
    guard.finish()


def _read_sqlite(path: Path, subset, stats, progress, batch_lines) -> Iterator[MetadataRow]:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        con.text_factory = bytes      # decode ourselves, so bad UTF-8 is a counted row, not a crash
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        table = next((t.decode() for t in tables
                      if set(SQLITE_COLUMNS) <= {r[1].decode().lower() for r in con.execute(f"PRAGMA table_info('{t.decode()}')")}),
                     None)
    except sqlite3.DatabaseError as e:
        raise InputError(f"{path}:1: not a readable SQLite database ({e})") from e
    if table is None:
        raise InputError(f"{path}:1: no table with the YFCC100M columns {', '.join(SQLITE_COLUMNS)} "
                         f"(tables: {[t.decode() for t in tables]})")
    total = con.execute(f"SELECT max(rowid) FROM '{table}'").fetchone()[0] or 0
    if total == 0:
        con.close()
        raise InputError(f"{path}: table {table!r} holds no rows")
    cur = con.execute(f"SELECT rowid, {', '.join(SQLITE_COLUMNS)} FROM '{table}' ORDER BY rowid")
    bar = tqdm(total=total, desc="metadata (sqlite)", unit="row", unit_scale=True, disable=not progress,
               mininterval=0.5)
    try:
        while rows := cur.fetchmany(batch_lines):
            bar.update(len(rows))
            stats.counts["rows_read"] += len(rows)
            good, ids = [], []
            for r in rows:
                try:
                    pid = int(r[1])
                except (TypeError, ValueError):
                    stats.add("malformed", f"{path}:row {r[0]}: photo id {r[1]!r:.40} is not an integer")
                    continue
                if pid not in INT64:
                    stats.add("malformed", f"{path}:row {r[0]}: photo id out of the 64-bit range")
                    continue
                ids.append(pid)
                good.append(r)
            for i in _keep(subset, ids, lambda i: f"{path}:row {good[i][0]}", stats):
                rowid, _, *cols = good[i]
                try:
                    title, desc, url, lic, ext = (c.decode("utf-8") if isinstance(c, bytes) else str(c or "")
                                                  for c in cols[:5])
                except UnicodeDecodeError as e:
                    stats.add("non_utf8", f"{path}:row {rowid}: byte {e.start}")
                    continue
                yield MetadataRow(photoid=ids[i], hash=url_hash(url), title=title, description=desc,
                                  download_url=url, license=lic, ext=ext,
                                  is_video=str(cols[5].decode() if isinstance(cols[5], bytes) else cols[5]).strip() == "1",
                                  where=f"{path}:row {rowid}")
    finally:
        bar.close()
        con.close()
