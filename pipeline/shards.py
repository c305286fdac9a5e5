"""Random access to the samples of a shard set: where each sample's bytes lie inside its tar.

The loader reads samples by offset instead of streaming tars, so it can shuffle the whole data
set per epoch, split it exactly between ranks, and restart at any batch (see pipeline/loader.py).
Offsets come from the DALI index files (`wds2idx`) the builder writes beside each tar; a tar
without one is scanned once with `tarfile`. The table is a few numpy arrays (about 40 bytes a
sample: 0.6 GB for YFCC15M), never a Python object per sample.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.files import atomic_output
from pipeline.manifest import Manifest

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")   # img2dataset's encode formats, preferred in this order


class ShardError(ValueError):
    """A shard disagrees with its manifest (missing, truncated, re-written since the build)."""


@dataclass
class SampleTable:
    """Byte ranges of every sample; -1 offset marks a missing component."""
    paths: list[Path]
    shard: np.ndarray        # int32 [N]
    image: np.ndarray        # int64 [N, 2] (offset, length)
    meta: np.ndarray         # int64 [N, 2] the .json
    text: np.ndarray         # int64 [N, 2] the .txt

    def __len__(self) -> int:
        return len(self.shard)


def _parse_index(idx: Path) -> list[dict[str, tuple[int, int]]]:
    """wds2idx v1.2: header `v1.2 N`, then one line per sample of `ext offset size name` groups."""
    lines = idx.read_text().splitlines()
    if not lines or not lines[0].startswith("v1."):
        raise ShardError(f"{idx}: not a DALI webdataset index (header {lines[:1]!r})")
    samples = []
    for n, line in enumerate(lines[1:], 2):
        f = line.split()
        if len(f) % 4:
            raise ShardError(f"{idx}:{n}: malformed index line")
        samples.append({f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)})
    return samples


# webdataset's naming rule: the key is the member's path up to the first dot of its file name, the
# extension everything after that dot ("a/0001.seg.png" -> "a/0001", "seg.png"). A file name
# without a dot, or starting with one, belongs to no sample.
_MEMBER_NAME = re.compile(r"((?:.*/)?[^.]+)\.([^/]*)")


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name as webdataset splits it, or None for no sample."""
    m = _MEMBER_NAME.fullmatch(name)
    return (m.group(1), m.group(2)) if m else None


def iter_tar_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """The samples of an open tar, in order: (key, {extension: member}) for each run of consecutive
    regular files with the same key, extensions lower-cased (as webdataset and DALI's indexer
    group). A damaged tar yields what it read before the damage (the last sample possibly
    incomplete), then raises the read error (tarfile.TarError, OSError or EOFError)."""
    key, parts = None, {}
    try:
        for m in tar:
            split = split_member_name(m.name) if m.isfile() else None
            if split is None:
                continue
            if split[0] != key:
                if parts:
                    yield key, parts
                key, parts = split[0], {}
            parts[split[1].lower()] = m
    except (tarfile.TarError, OSError, EOFError):
        if parts:
            yield key, parts
        raise
    if parts:
        yield key, parts


def _scan_tar(tar: Path) -> list[dict[str, tuple[int, int]]]:
    """Fallback without an index: each sample's components, (offset, size) by extension."""
    try:
        with tarfile.open(tar) as tf:
            return [{ext: (m.offset_data, m.size) for ext, m in parts.items()} for _, parts in iter_tar_samples(tf)]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{tar}: unreadable tar ({e})") from e


def build_sample_table(manifest: Manifest) -> SampleTable:
    """Locate every sample of every shard; each shard must hold the count its manifest promises."""
    paths, shard, image, meta, text = [], [], [], [], []
    indexes = manifest.index_paths() or [None] * len(manifest.shards)
    for s, (entry, tar, idx) in enumerate(zip(manifest.shards, manifest.shard_paths(), indexes)):
        if not tar.is_file():
            raise ShardError(f"{tar}: shard listed in {manifest.source or manifest.name} is missing")
        if tar.stat().st_size != entry.bytes:
            raise ShardError(f"{tar}: {tar.stat().st_size} bytes, the manifest says {entry.bytes} "
                             "(truncated or rewritten since the build; rebuild it)")
        samples = _parse_index(idx) if idx is not None and idx.is_file() else _scan_tar(tar)
        if len(samples) != entry.samples:
            raise ShardError(f"{tar}: {len(samples)} samples, the manifest says {entry.samples}")
        paths.append(tar)
        for comp in samples:
            shard.append(s)
            img = next((comp[e] for e in IMAGE_EXTS if e in comp), (-1, 0))
            image.append(img)
            meta.append(comp.get("json", (-1, 0)))
            text.append(comp.get("txt", (-1, 0)))
    as2 = lambda rows: np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    return SampleTable(paths, np.asarray(shard, dtype=np.int32), as2(image), as2(meta), as2(text))


class SampleReader:
    """Reads components with pread on file descriptors kept open (one per shard, opened lazily)."""

    def __init__(self, table: SampleTable):
        self.table = table
        self._fds: dict[int, int] = {}

    def _read(self, shard: int, where: np.ndarray) -> bytes | None:
        off, size = int(where[0]), int(where[1])
        if off < 0:
            return None
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.table.paths[shard], os.O_RDONLY)
        data = os.pread(fd, size, off)
        return data if len(data) == size else None

    def image(self, i: int) -> bytes | None:
        return self._read(int(self.table.shard[i]), self.table.image[i])

    def meta(self, i: int) -> bytes | None:
        return self._read(int(self.table.shard[i]), self.table.meta[i])

    def text(self, i: int) -> bytes | None:
        return self._read(int(self.table.shard[i]), self.table.text[i])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_index(tar: Path) -> Path:
    """DALI's wds2idx index beside the tar (skipped when an index newer than the tar exists)."""
    idx = tar.with_suffix(".idx")
    if idx.exists() and idx.stat().st_mtime >= tar.stat().st_mtime:
        return idx
    from wds2idx import IndexCreator   # ships with the nvidia-dali wheel
    with atomic_output(idx) as tmp:
        creator = IndexCreator(str(tar), str(tmp), verbose=False)
        creator.create_index()
        creator.close()
    return idx


def write_shard_set(out: Path, samples: list[dict], per_shard: int, name: str = "shards", index: bool = True) -> Path:
    """Write samples (dicts of extension -> bytes or str; None leaves a component out) as
    img2dataset-style tars, DALI indexes and a manifest; returns the manifest path. For tests,
    benchmarks and previews: real builds go through pipeline/build.py."""
    from pipeline.manifest import ShardEntry, save_manifest
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(0, len(samples), per_shard):
        tar_path = out / f"{s // per_shard:05d}.tar"
        with tarfile.open(tar_path, "w") as tar:
            for k, sample in enumerate(samples[s:s + per_shard], s):
                for ext, value in sample.items():
                    if value is None:
                        continue
                    data = value.encode() if isinstance(value, str) else value
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        idx = write_index(tar_path) if index else None
        entries.append(ShardEntry(path=tar_path.name, samples=len(samples[s:s + per_shard]),
                                  bytes=tar_path.stat().st_size, sha256=file_sha256(tar_path),
                                  index=idx.name if idx else None))
    manifest = out / "manifest.json"
    save_manifest(Manifest(name, str(out), entries), manifest)
    return manifest
