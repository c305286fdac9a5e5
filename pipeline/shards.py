"""Random access to the samples of a shard set: where each sample's bytes lie inside its tar.

The loader reads samples by offset instead of streaming tars, so it can shuffle the whole data
set per epoch, split it exactly between ranks, and restart at any batch (see pipeline/loader.py).
Offsets come from the DALI index files (`wds2idx`) the builder writes beside each tar; a tar
without one is scanned once with `tarfile`. An index is used only once it is shown to belong to
its tar (the checksum and tar size the manifest recorded, and the tar headers at its first and
last offsets); a mismatch is a `ShardError` naming the index, since reading at a wrong index's
offsets would turn tar headers into captions. The samples the build found bad come along in
`SampleTable.recorded_bad`. The table is a few numpy arrays (about 40 bytes a sample: 0.6 GB for
YFCC15M), never a Python object per sample.

Limits, checked before anything is read: an index larger than its tar (or than `MAX_INDEX_BYTES`)
is refused, and every entry of an index must lie inside its tar (a negative, huge or overflowing
offset or size is a `ShardError` naming the line). Components larger than `MAX_IMAGE_BYTES`
(images) or `MAX_TEXT_BYTES` (captions, metadata) are never read: the loader counts such a
sample as bad.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.files import atomic_output
from pipeline.manifest import Manifest, ShardEntry, ShardError, save_manifest  # noqa: F401  (ShardError: re-exported)
from pipeline.regular_files import RefusedFile, is_regular, read_regular

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")   # img2dataset's encode formats, preferred in this order
MAX_IMAGE_BYTES = 128 << 20    # an encoded image; a 40-megapixel JPEG is a few tens of MB
MAX_TEXT_BYTES = 1 << 20       # a caption or its json metadata
MAX_INDEX_BYTES = 256 << 20    # an index line is shorter than the tar headers it lists: ~100 bytes a sample
_MAX_OFFSET = 1 << 62          # past any real file; keeps offset + size inside int64


@dataclass
class SampleTable:
    """Byte ranges of every sample; -1 offset marks a missing component."""
    paths: list[Path]
    shard: np.ndarray        # int32 [N]
    image: np.ndarray        # int64 [N, 2] (offset, length)
    meta: np.ndarray         # int64 [N, 2] the .json
    text: np.ndarray         # int64 [N, 2] the .txt
    recorded_bad: dict[int, str] = field(default_factory=dict)   # sample -> reason, found at build time

    def __len__(self) -> int:
        return len(self.shard)


# A sample's components: extension -> (data offset, size) in the tar
Components = dict[str, tuple[int, int]]


def parse_index(lines: list[str], where: Path, tar_bytes: int | None = None) -> list[Components]:
    """The samples of a wds2idx v1.x index, given as its lines: a header `v1.2 N`, then one line per
    sample of `ext offset size name` groups. Every offset and size must be a non-negative integer,
    and with `tar_bytes` every member must end inside the tar; else ShardError naming the line."""
    if not lines or not lines[0].startswith("v1."):
        raise ShardError(f"{where}: not a DALI webdataset index (header {lines[:1]!r})")
    end = _MAX_OFFSET if tar_bytes is None else tar_bytes
    samples = []
    for n, line in enumerate(lines[1:], 2):
        f = line.split()
        if len(f) % 4:
            raise ShardError(f"{where}:{n}: malformed index line")
        comp = {}
        for i in range(0, len(f), 4):
            try:
                offset, size = int(f[i + 1]), int(f[i + 2])
            except ValueError:
                raise ShardError(f"{where}:{n}: malformed index line (offset and size must be integers)") from None
            if not (0 <= offset <= end and 0 <= size <= end - offset):
                raise ShardError(f"{where}:{n}: member {f[i + 3][:80]!r} at offset {offset} with size {size} "
                                 f"does not lie inside the {end}-byte tar (a damaged or forged index)")
            comp[f[i]] = (offset, size)
        samples.append(comp)
    return samples


def index_members(line: str) -> list[tuple[int, int, str]]:
    """(offset, size, member name) of each component on one sample line of an index."""
    f = line.split()
    return [(int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f) - 3, 4)]


@functools.cache
def _webdataset_split() -> Callable[[str], tuple[str | None, str | None]]:
    # imported on first use: webdataset imports torch, which a builder process has no other need of
    try:
        from webdataset.tariterators import base_plus_ext
        return base_plus_ext
    except ImportError:      # a bare GPU machine (tools/gpu_report.py): webdataset 0.2's own rule, restated
        return _base_plus_ext


def _base_plus_ext(path: str) -> tuple[str | None, str | None]:
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", path)
    return (m.group(1), m.group(2)) if m else (None, None)


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name, split by webdataset's own function (the key is the
    path up to the first dot of the file name: "a/0001.seg.png" -> "a/0001", "seg.png"), so a tar
    reads the same here as in OpenCLIP; None for a name that belongs to no sample (no dot, or a
    file name starting with one)."""
    key, ext = _webdataset_split()(name)
    return None if key is None else (key, ext)


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


def scan_tar(tar: Path) -> tuple[list[Components], list[str]]:
    """Each sample's components, and its key, read from the tar itself (the fallback without an index)."""
    try:
        size = tar.stat().st_size
        with tarfile.open(tar) as tf:
            found = [(key, {ext: (m.offset_data, m.size) for ext, m in parts.items()})
                     for key, parts in iter_tar_samples(tf)]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{tar}: unreadable tar ({e})") from e
    for key, comp in found:
        if any(offset + length > size for offset, length in comp.values()):
            raise ShardError(f"{tar}: member {key!r} runs past the end of the {size}-byte tar (truncated)")
    return [comp for _, comp in found], [key for key, _ in found]


def member_header(fd: int, data_offset: int) -> tuple[str, int] | None:
    """(name, size) from the tar header block just before `data_offset`, or None when the 512 bytes
    there are not a valid header (checksum)."""
    if data_offset < 512:
        return None
    block = os.pread(fd, 512, data_offset - 512)
    if len(block) < 512:
        return None
    try:
        stored = int(block[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
        size = int(block[124:136].replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError:
        return None
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)   # some old writers
    if stored not in (unsigned, signed):
        return None
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    return (f"{prefix.decode('utf-8', 'replace')}/{name}" if prefix else name), size


def _check_index(entry: ShardEntry, tar: Path, idx: Path, raw: bytes, lines: list[str]) -> None:
    """Trust an index only once it is shown to belong to this tar: the checksum and tar size the
    manifest recorded when the index was made (where recorded), and the tar members at its first
    and last offsets, which must carry the names and sizes the index gives them. (Reading the
    member at every offset would cost one read per sample at every start, on every rank.)"""
    fix = "rerun the build to index it again, or delete the index to read the offsets from the tar"
    if entry.index_sha256 is not None and hashlib.sha256(raw).hexdigest() != entry.index_sha256:
        raise ShardError(f"{idx}: not the index the manifest recorded for {tar.name} (sha256 differs: swapped "
                         f"or rewritten since the build); {fix}")
    size = tar.stat().st_size
    if entry.index_tar_bytes is not None and entry.index_tar_bytes != size:
        raise ShardError(f"{idx}: made for a {entry.index_tar_bytes}-byte tar, {tar.name} has {size} bytes; {fix}")
    first, last = index_members(lines[1]) if len(lines) > 1 else [], index_members(lines[-1])
    if not first or not last:
        return      # no sample: nothing is read through this index
    first, last = min(first), max(last)
    fd = os.open(tar, os.O_RDONLY)
    try:
        for offset, length, name in (first, last):
            found = member_header(fd, offset)
            if found is None or found[1] != length or not _same_member_name(found[0], name):
                seen = "no tar header" if found is None else f"member {found[0]!r} ({found[1]} bytes)"
                raise ShardError(f"{idx}: does not belong to {tar.name}: at offset {offset} the index has {name!r} "
                                 f"({length} bytes), the tar has {seen} (a stale or swapped index); {fix}")
    finally:
        os.close(fd)


def _same_member_name(in_header: str, in_index: str) -> bool:
    # a name longer than the header's 100-byte field is stored in an extension header before it,
    # with a cut copy in the field itself
    return in_header == in_index or (len(in_index) > 100 and in_index.startswith(in_header))


def _recorded_bad(entry: ShardEntry, tar: Path, key_at: Callable[[int], str | None], count: int,
                  first: int) -> dict[int, str]:
    """The samples the build found bad (ShardEntry.bad_samples), by global index (`first` is the
    shard's first); each must still be at its recorded position, under its recorded key."""
    bad = {}
    for rec in entry.bad_samples or ():
        pos, key = int(rec["position"]), rec.get("key")
        if not 0 <= pos < count or (key is not None and key_at(pos) != key):
            raise ShardError(f"{tar}: the manifest's bad sample {key!r} is not sample {pos} of the tar "
                             "(rewritten since the build); rebuild the manifest")
        bad[first + pos] = rec.get("reason", "corrupt_image")
    return bad


def _index_key(line: str) -> str | None:
    split = split_member_name(index_members(line)[0][2]) if line.strip() else None
    return split[0] if split else None


def _without_excluded(entry: ShardEntry, tar: Path, samples: list[Components],
                      keys: list[str]) -> tuple[list[Components], list[str]]:
    """A scanned tar's samples less those its indexing left out (`ShardEntry.excluded`), so a tar
    read without its index yields what the index lists; each left-out sample must still be where
    it was recorded."""
    if not entry.excluded:
        return samples, keys
    drop = set()
    for rec in entry.excluded:
        pos = int(rec["position"])
        if pos >= len(keys) or (rec.get("key") is not None and keys[pos] != rec["key"]):
            raise ShardError(f"{tar}: the manifest's left-out sample {rec.get('key')!r} is not sample {pos} of the "
                             "tar (rewritten since it was indexed); run tools/index_shards.py again")
        drop.add(pos)
    keep = [i for i in range(len(keys)) if i not in drop]
    return [samples[i] for i in keep], [keys[i] for i in keep]


def index_line(members: list[tuple[str, int, int, str]]) -> str:
    """One sample's line of a wds2idx v1.2 index: `ext offset size name` per component."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)


def write_index_lines(idx: Path, lines: list[str]) -> None:
    """A wds2idx v1.2 index of the given sample lines (some samples of a tar may be left out: the
    loader and DALI's reader then read only those listed), written atomically."""
    idx.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(idx) as tmp:
        tmp.write_text(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))


def read_index(idx: Path, tar_bytes: int) -> bytes:
    """The bytes of an index file, refused (ShardError) before reading when it is not a regular file
    or is larger than its tar could need (`MAX_INDEX_BYTES` at most)."""
    try:
        return read_regular(idx, min(max(tar_bytes, 1 << 16), MAX_INDEX_BYTES), f"the index of a {tar_bytes}-byte tar")
    except (RefusedFile, OSError) as e:
        raise ShardError(f"{idx}: unusable index ({e}); rerun the build to index it again, or delete it") from None


def build_sample_table(manifest: Manifest) -> SampleTable:
    """Locate every sample of every shard; each shard must hold the count its manifest promises,
    and an index is used only once it is shown to belong to its tar."""
    paths, shard, image, meta, text, recorded_bad = [], [], [], [], [], {}
    tars = manifest.shard_paths()
    indexes = manifest.index_paths() or [None] * len(manifest.shards)
    for s, (entry, tar, idx) in enumerate(zip(manifest.shards, tars, indexes)):
        if not tar.exists():
            raise ShardError(f"{tar}: shard listed in {manifest.source or manifest.name} is missing")
        if not is_regular(tar):
            raise ShardError(f"{tar}: shard listed in {manifest.source or manifest.name} is not a regular file")
        if tar.stat().st_size != entry.bytes:
            raise ShardError(f"{tar}: {tar.stat().st_size} bytes, the manifest says {entry.bytes} (truncated or "
                             f"rewritten since the build): restore the shard from a good copy or rerun the build "
                             f"that made {manifest.source or manifest.name}, then check the set with "
                             f"python tools/verify_shards.py {manifest.source or 'MANIFEST'}")
        if idx is not None and idx.is_file():
            raw = read_index(idx, entry.bytes)
            lines = raw.decode("utf-8", "replace").splitlines()
            samples = parse_index(lines, idx, entry.bytes)
            _check_index(entry, tar, idx, raw, lines)
            key_at = lambda pos, lines=lines: _index_key(lines[pos + 1])  # noqa: E731
        else:
            samples, keys = _without_excluded(entry, tar, *scan_tar(tar))
            key_at = keys.__getitem__
        if len(samples) != entry.samples:
            raise ShardError(f"{tar}: {len(samples)} samples, the manifest says {entry.samples}")
        recorded_bad.update(_recorded_bad(entry, tar, key_at, len(samples), len(shard)))
        paths.append(tar)
        for comp in samples:
            shard.append(s)
            image.append(next((comp[e] for e in IMAGE_EXTS if e in comp), (-1, 0)))
            meta.append(comp.get("json", (-1, 0)))
            text.append(comp.get("txt", (-1, 0)))
    as2 = lambda rows: np.asarray(rows, dtype=np.int64).reshape(-1, 2)  # noqa: E731
    return SampleTable(paths, np.asarray(shard, dtype=np.int32), as2(image), as2(meta), as2(text), recorded_bad)


class SampleReader:
    """Reads components with pread on file descriptors kept open (one per shard, opened lazily)."""

    def __init__(self, table: SampleTable):
        self.table = table
        self._fds: dict[int, int] = {}

    def _read(self, shard: int, where: np.ndarray, limit: int) -> bytes | None:
        """The component's bytes; None when it is absent, larger than `limit` (never read), or no
        longer all there (the tar shrank since the table was made)."""
        off, size = int(where[0]), int(where[1])
        if off < 0 or size > limit:
            return None
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.table.paths[shard], os.O_RDONLY)
        data = os.pread(fd, size, off)
        return data if len(data) == size else None

    def image(self, i: int) -> bytes | None:
        return self._read(int(self.table.shard[i]), self.table.image[i], MAX_IMAGE_BYTES)

    def meta(self, i: int) -> bytes | None:
        return self._read(int(self.table.shard[i]), self.table.meta[i], MAX_TEXT_BYTES)

    def text(self, i: int) -> bytes | None:
        return self._read(int(self.table.shard[i]), self.table.text[i], MAX_TEXT_BYTES)

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


def write_index(tar: Path, force: bool = False) -> Path:
    """DALI's wds2idx index beside the tar (kept when an index newer than the tar exists, unless `force`)."""
    idx = tar.with_suffix(".idx")
    if not force and idx.exists() and idx.stat().st_mtime >= tar.stat().st_mtime:
        return idx
    from wds2idx import IndexCreator   # ships with the nvidia-dali wheel
    with atomic_output(idx) as tmp:
        creator = IndexCreator(str(tar), str(tmp), verbose=False)
        creator.create_index()
        creator.close()
    return idx


def write_shard_set(out: Path, samples: list[dict], per_shard: int, name: str = "shards", index: bool = True,
                    verify: bool = False) -> Path:
    """Write samples (dicts of extension -> bytes or str; None leaves a component out) as
    img2dataset-style tars, DALI indexes and a manifest; returns the manifest path. For tests,
    benchmarks and previews: real builds go through pipeline/build.py. With `verify`, every image
    is verified as the build does and the bad ones are recorded in the manifest; without it the
    manifest records none (not verified), and the loader finds bad images itself."""
    from pipeline.verify import verify_images
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
        size = tar_path.stat().st_size
        entries.append(ShardEntry(path=tar_path.name, samples=len(samples[s:s + per_shard]), bytes=size,
                                  sha256=file_sha256(tar_path), index=idx.name if idx else None,
                                  index_sha256=file_sha256(idx) if idx else None,
                                  index_tar_bytes=size if idx else None,
                                  bad_samples=verify_images(tar_path) if verify else None))
    manifest = out / "manifest.json"
    save_manifest(Manifest(name, str(out), entries), manifest)
    return manifest
