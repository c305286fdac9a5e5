"""A manifest for webdataset shards already on disk (tools/index_shards.py): counts, checksums,
indexes, and every sample checked once.

Layouts read: img2dataset's (`NNNNN.tar` with `key.jpg` / `key.txt` / `key.json`, and
`NNNNN_stats.json` / `NNNNN.parquet` beside it, which are left alone) and OpenCLIP's; image
members in `jpg`, `jpeg`, `png` or `webp`. Members are grouped into samples by webdataset's own
key/extension split (pipeline/shards.py `split_member_name`), so a tar holds here the samples it
holds in OpenCLIP.

Every sample is checked, in one sequential read of its tar (which also computes the tar's sha256):
an image (`missing_image`), a caption (`missing_caption`: a visible `txt`, or a json `caption`,
`title`, `description` or `captions`), an image header that parses (PIL, plus the loader's
structural JPEG check; `--verify decode` decodes every image fully, tars in parallel), a key not
seen before in the set (`duplicate_key`: the first sample with a key is kept). A sample that fails
is left out of the tar's index and out of the manifest's count (`ShardEntry.excluded` records it,
with its reason), so the trainer never reads it, and the manifest's stats count them by kind.

The indexes are wds2idx v1.2 files listing only the usable samples: beside each tar by default,
or under `index_dir` (mirroring the shards' relative paths, the manifest's `index_root`), in
which case nothing is written anywhere near the shards (a read-only file system is fine).

A rerun reuses every tar whose size and mtime are unchanged since the last run (recorded in
`<index dir>/<name>.index_state.json`) together with the previous manifest's entry and its index;
a changed tar is read again. `verify` ("checksums" or "decode") reads every tar again.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.captions import has_visible_text
from pipeline.files import write_json_atomic
from pipeline.jpeg_check import jpeg_problem
from pipeline.manifest import Manifest, ShardEntry, ShardError, load_manifest, save_manifest
from pipeline.shards import IMAGE_EXTS, MAX_IMAGE_BYTES, MAX_TEXT_BYTES, file_sha256, index_line, \
    index_members, split_member_name, write_index_lines
from pipeline.verify import NOT_AN_IMAGE, image_problem
from pipeline.webp_header import webp_size

MISSING_IMAGE, MISSING_CAPTION, DUPLICATE_KEY = "missing_image", "missing_caption", "duplicate_key"
JSON_CAPTION_FIELDS = ("caption", "title", "description", "captions")
VERIFY_LEVELS = ("header", "checksums", "decode")    # what a run reads again; each includes the ones before
STATE_VERSION = 1
TWICE = "\0twice"        # marks a sample with one extension twice (no member extension holds a NUL)


def expand_shards(spec: str) -> list[Path]:
    """The tars a brace pattern ("/d/{00000..00099}.tar"), a glob ("/d/*.tar") or a directory (its
    *.tar, recursively) names, sorted; ShardError naming what is missing."""
    import braceexpand        # webdataset's dependency, for its brace syntax
    path = Path(spec)
    if path.is_dir():
        tars = sorted(p for p in path.rglob("*.tar") if p.is_file())
        if not tars:
            raise ShardError(f"{spec}: a directory without any .tar file")
        return tars
    tars, missing = [], []
    for name in braceexpand.braceexpand(spec):
        if glob.has_magic(name):
            tars += sorted(Path(p) for p in glob.glob(name) if p.endswith(".tar") and os.path.isfile(p))
        elif os.path.isfile(name):
            tars.append(Path(name))
        else:
            missing.append(name)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ShardError(f"{spec}: {len(missing)} tar(s) named are missing: {', '.join(missing[:3])}{more}")
    if not tars:
        raise ShardError(f"{spec}: matches no .tar file")
    if len(set(tars)) != len(tars):
        raise ShardError(f"{spec}: names some tars more than once")
    return tars


def common_root(tars: list[Path]) -> Path:
    return Path(os.path.commonpath([str(t.resolve().parent) for t in tars]))


@dataclass
class TarScan:
    """What one read of a tar found, kept small (about 16 bytes a sample, so a set of millions fits):
    each sample's key digest, the samples that fail by themselves, which samples its index file
    lists, the caption fields seen, its size and checksum."""
    rel: str
    bytes: int
    mtime_ns: int
    sha256: str
    digests: np.ndarray                        # 16-byte digest of each sample's key, every position
    bad: dict[int, tuple[str, str, str]]       # position -> (reason, detail, key): the sample's own failures
    listed: list[int]                          # positions the index file lists, in order
    caption_fields: set[str] = field(default_factory=set)
    reused: bool = False
    known_keys: dict[int, str] = field(default_factory=dict)   # keys of positions the index does not list


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest()


class _HashingReader(io.RawIOBase):
    """A file read front to back, hashed on the way (one read gives the samples and the sha256)."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        self.h.update(memoryview(buffer)[:n])
        return n

    def finish(self) -> str:
        while chunk := self.f.read(1 << 22):
            self.h.update(chunk)
        return self.h.hexdigest()


def _caption_fields(parts: dict[str, bytes]) -> set[str]:
    """The caption fields of one sample that show text."""
    found = set()
    txt = parts.get("txt")
    if txt is not None and has_visible_text(txt.decode("utf-8", "replace")):
        found.add("txt")
    meta = parts.get("json")
    if meta is not None:
        try:
            d = json.loads(meta)
        except (ValueError, RecursionError):
            d = None
        if isinstance(d, dict):
            for name in JSON_CAPTION_FIELDS:
                v = d.get(name)
                texts = v if isinstance(v, list) else [v]
                if any(isinstance(t, str) and has_visible_text(t) for t in texts):
                    found.add(name)
    return found


def _header_problem(data: bytes) -> tuple[str, str] | None:
    """The cheap image check: the header parses (PIL) and a JPEG is structurally complete."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            fmt, (w, h) = img.format, img.size
        except Exception as e:   # PIL raises many types for garbage; all mean "not an image"
            size = webp_size(data)       # this Pillow has no WebP codec; DALI decodes WebP
            if size is None:
                return NOT_AN_IMAGE, f"{type(e).__name__}: {e}"[:160]
            fmt, (w, h) = "WEBP", size
    if w < 1 or h < 1:
        return NOT_AN_IMAGE, "empty image"
    if fmt == "JPEG":
        return jpeg_problem(data)
    return None


def _decode_problem(data: bytes, max_pixels: int) -> tuple[str, str] | None:
    """The full decode check (pipeline/verify.py); a WebP, which this Pillow cannot decode, is
    decoded by OpenCV instead."""
    problem = image_problem(data, max_pixels)
    if problem is None or problem[0] != NOT_AN_IMAGE or webp_size(data) is None:
        return problem
    import cv2
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if decoded is not None else ("corrupt_image", "OpenCV cannot decode this WebP image")


def scan_tar(tar: Path, rel: str, decode: bool, max_pixels: int) -> tuple[TarScan, list[str]]:
    """Read the tar once: samples grouped as webdataset groups them, each sample checked; returns
    the scan and the index lines of the samples that pass (those the index is to list)."""
    st = tar.stat()
    digests, bad, fields, listed, lines = [], {}, set(), [], []
    key, comps, data = None, [], {}

    def close_sample():
        pos = len(digests)
        digests.append(_digest(key))
        problem = _sample_problem(data, decode, max_pixels, fields)
        if problem is not None:
            bad[pos] = (*problem, key)
        elif any(offset + size > st.st_size for _, offset, size, _ in comps):
            raise ShardError(f"{tar}: member {key!r} runs past the end of the tar (truncated)")
        else:
            listed.append(pos)
            lines.append(index_line(comps))

    with open(tar, "rb") as f:
        reader = _HashingReader(f)
        try:
            with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tf:
                for m in tf:
                    split = split_member_name(m.name) if m.isfile() else None
                    if split is None:
                        continue
                    if split[0] != key:
                        if key is not None:
                            close_sample()
                        key, comps, data = split[0], [], {}
                    ext = split[1].lower()
                    if any(c[0] == ext for c in comps):      # webdataset refuses such a sample
                        data[TWICE] = b""
                    comps.append((ext, m.offset_data, m.size, m.name))
                    limit = MAX_IMAGE_BYTES if ext in IMAGE_EXTS else MAX_TEXT_BYTES
                    if (ext in IMAGE_EXTS or ext in ("txt", "json")) and m.size <= limit:
                        data[ext] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardError(f"{tar}: unreadable tar ({e}); restore it from a good copy or leave it out") from e
        if key is not None:
            close_sample()
        sha = reader.finish()
    scan = TarScan(rel, st.st_size, st.st_mtime_ns, sha, np.array(digests, dtype="S16"), bad, listed, fields)
    return scan, lines


def _sample_problem(data: dict[str, bytes], decode: bool, max_pixels: int, fields: set[str]) -> tuple[str, str] | None:
    """Why a sample (its components' bytes) cannot be trained on, or None; adds its caption fields."""
    if TWICE in data:
        return DUPLICATE_KEY, "the same member name twice in a row (webdataset refuses such a sample)"
    image = next((data[e] for e in IMAGE_EXTS if e in data), None)
    if image is None:
        return MISSING_IMAGE, "no jpg, jpeg, png or webp member"
    found = _caption_fields(data)
    fields.update(found)
    if not found:
        return MISSING_CAPTION, "no txt and no caption, title, description or captions in the json"
    return _decode_problem(image, max_pixels) if decode else _header_problem(image)


def _reuse(tar: Path, rel: str, entry: ShardEntry, idx: Path) -> TarScan | None:
    """The scan of an unchanged tar, rebuilt from its previous entry and index (None if unusable)."""
    try:
        if entry.index_sha256 is None or file_sha256(idx) != entry.index_sha256:
            return None          # not the index this entry recorded: read the tar again
        lines = idx.read_text().splitlines()[1:]
    except OSError:
        return None
    excluded = {int(r["position"]): r for r in entry.excluded or ()}
    total = len(lines) + len(excluded)
    if len(lines) != entry.samples or any(p >= total for p in excluded):
        return None
    listed = [p for p in range(total) if p not in excluded]
    keys = dict(zip(listed, (split_member_name(index_members(line)[0][2])[0] for line in lines)))
    known = {p: r.get("key") or "" for p, r in excluded.items()}
    digests = np.array([_digest(keys[p] if p in keys else known[p]) for p in range(total)], dtype="S16")
    bad = {p: (r["reason"], r.get("detail", ""), known[p]) for p, r in excluded.items() if r["reason"] != DUPLICATE_KEY}
    st = tar.stat()
    return TarScan(rel, st.st_size, st.st_mtime_ns, entry.sha256, digests, bad, listed, reused=True, known_keys=known)


@dataclass
class IndexConfig:
    spec: str                         # brace pattern, glob or directory
    name: str
    manifest: Path                    # where the manifest is written
    index_dir: Path | None = None     # None: the indexes beside the tars
    verify: str = "header"            # header: reuse unchanged tars; checksums: read all again; decode: and decode
    workers: int = 4
    max_image_pixels: int = 89_478_485

    def __post_init__(self):
        if self.verify not in VERIFY_LEVELS:
            raise ValueError(f"verify {self.verify!r}: choose one of {', '.join(VERIFY_LEVELS)}")


def _index_path(cfg: IndexConfig, root: Path, rel: str) -> tuple[Path, str]:
    """(index file, its path relative to the manifest's index location)."""
    name = str(Path(rel).with_suffix(".idx"))
    return (cfg.index_dir if cfg.index_dir is not None else root) / name, name


def _state_path(cfg: IndexConfig) -> Path:
    return (cfg.index_dir if cfg.index_dir is not None else cfg.manifest.parent) / f"{cfg.name}.index_state.json"


def index_shards(cfg: IndexConfig, progress: bool = False) -> tuple[Manifest, dict]:
    """Check and index every tar, write the manifest; returns it and {"read": n, "reused": n}."""
    tars = expand_shards(cfg.spec)
    root = common_root(tars)
    if cfg.index_dir is not None:
        cfg.index_dir = cfg.index_dir.resolve()
        if cfg.index_dir == root or root in cfg.index_dir.parents:
            raise ShardError(f"--index-dir {cfg.index_dir} lies inside the shard folder {root}: give a folder elsewhere")
    rels = [str(t.resolve().relative_to(root)) for t in tars]
    state_path = _state_path(cfg)
    previous, state, old_fields = _previous(cfg, state_path)
    scans: dict[str, TarScan] = {}
    todo = []
    for tar, rel in zip(tars, rels):
        entry, seen = previous.get(rel), state.get(rel)
        st = tar.stat()
        if (cfg.verify == "header" and entry is not None and seen is not None
                and seen == {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns} and entry.bytes == st.st_size):
            reused = _reuse(tar, rel, entry, _index_path(cfg, root, rel)[0])
            if reused is not None:
                scans[rel] = reused
                continue
        todo.append((tar, rel))

    def read(pairs):
        from tqdm import tqdm
        with ThreadPoolExecutor(max(1, cfg.workers), thread_name_prefix="index") as pool:
            jobs = [pool.submit(_read_and_index, cfg, root, tar, rel) for tar, rel in pairs]
            for job in tqdm(jobs, desc="index", unit="tar", disable=not progress or len(jobs) < 2):
                s = job.result()
                scans[s.rel] = s

    read(todo)
    read_now = len(todo)
    duplicates = _duplicates([scans[r] for r in rels])
    # a reused tar whose left-out samples change (a duplicate of a key elsewhere appeared or went) is read again
    stale = [(t, r) for t, r in zip(tars, rels) if scans[r].reused and _wanted(scans[r], duplicates[r]) != scans[r].listed]
    if stale:
        read(stale)
        read_now += len(stale)
        duplicates = _duplicates([scans[r] for r in rels])
    entries, fields = [], set()
    for rel in rels:
        s = scans[rel]
        fields |= set(old_fields) if s.reused else s.caption_fields
        idx, idx_rel = _index_path(cfg, root, rel)
        keys = dict(s.known_keys)
        if duplicates[rel]:
            keys.update(_drop_from_index(cfg, s, idx, _wanted(s, duplicates[rel])))
        recs = sorted([{"position": p, "key": k, "reason": r, "detail": d} for p, (r, d, k) in s.bad.items()] +
                      [{"position": p, "key": keys[p], "reason": DUPLICATE_KEY,
                        "detail": f"key {keys[p]!r} already seen earlier in the set"} for p in duplicates[rel]],
                      key=lambda rec: rec["position"])
        entries.append(ShardEntry(path=rel, samples=len(s.digests) - len(recs), bytes=s.bytes, sha256=s.sha256,
                                  index=idx_rel, index_sha256=file_sha256(idx), index_tar_bytes=s.bytes,
                                  bad_samples=[] if cfg.verify == "decode" else None, excluded=recs or None))
    kinds = Counter(r["reason"] for e in entries for r in e.excluded or ())
    stats = {"index": {"tars": len(entries), "read": read_now, "reused": len(entries) - read_now,
                       "samples_in_tars": sum(len(s.digests) for s in scans.values()),
                       "usable": sum(e.samples for e in entries), "excluded": sum(kinds.values()),
                       "excluded_by_reason": dict(kinds.most_common()), "image_check": cfg.verify,
                       "spec": cfg.spec}}
    manifest = Manifest(name=cfg.name, root=str(root), shards=entries, stats=stats,
                        index_root=str(cfg.index_dir) if cfg.index_dir is not None else None,
                        caption_fields=sorted(fields))
    save_manifest(manifest, cfg.manifest)
    write_json_atomic(state_path, {"version": STATE_VERSION, "name": cfg.name, "caption_fields": sorted(fields),
                                   "tars": {s.rel: {"bytes": s.bytes, "mtime_ns": s.mtime_ns} for s in scans.values()}},
                      indent=0)
    if read_now == len(entries):
        from pipeline.integrity import verified_by_build    # every tar was hashed just now
        verified_by_build(cfg.manifest, manifest)
    return manifest, stats["index"]


def _read_and_index(cfg: IndexConfig, root: Path, tar: Path, rel: str) -> TarScan:
    """Scan one tar and write its index of the samples that pass (a worker's job: the index lines
    never pile up in memory)."""
    scan, lines = scan_tar(tar, rel, cfg.verify == "decode", cfg.max_image_pixels)
    _write_index(cfg, _index_path(cfg, root, rel)[0], lines)
    return scan


def _write_index(cfg: IndexConfig, idx: Path, lines: list[str]) -> None:
    try:
        write_index_lines(idx, lines)
    except OSError as e:
        where = "" if cfg.index_dir is not None else " (shards on a read-only file system: give --index-dir)"
        raise ShardError(f"{idx}: cannot write the index: {e.strerror}{where}") from None


def _duplicates(scans: list[TarScan]) -> dict[str, list[int]]:
    """Per tar, the positions whose key was seen earlier in the set (in shard order, the first
    occurrence kept, whatever became of it), apart from samples already failing by themselves."""
    digests = np.concatenate([s.digests for s in scans]) if scans else np.array([], dtype="S16")
    repeat = np.ones(len(digests), bool)
    repeat[np.unique(digests, return_index=True)[1]] = False
    out, start = {}, 0
    for s in scans:
        out[s.rel] = [int(p) for p in np.flatnonzero(repeat[start:start + len(s.digests)]) if int(p) not in s.bad]
        start += len(s.digests)
    return out


def _wanted(s: TarScan, duplicates: list[int]) -> list[int]:
    left_out = set(s.bad) | set(duplicates)
    return [p for p in range(len(s.digests)) if p not in left_out]


def _drop_from_index(cfg: IndexConfig, s: TarScan, idx: Path, wanted: list[int]) -> dict[int, str]:
    """Rewrite the index to list only `wanted` (a subset of what it lists); returns the keys of the
    positions dropped (or, for an index left as it is, nothing)."""
    if wanted == s.listed:
        return {}
    lines = idx.read_text().splitlines()[1:]
    by_position = dict(zip(s.listed, lines))
    keep = set(wanted)
    _write_index(cfg, idx, [by_position[p] for p in wanted])
    dropped = {p: split_member_name(index_members(line)[0][2])[0] for p, line in by_position.items() if p not in keep}
    s.listed = wanted
    return dropped


def _previous(cfg: IndexConfig, state_path: Path) -> tuple[dict[str, ShardEntry], dict[str, dict], list[str]]:
    """The last run's entries and tar stats by relative path, and its caption fields; empty when
    there is none usable."""
    try:
        state = json.loads(state_path.read_text())
        old = load_manifest(cfg.manifest)
    except (OSError, ValueError):
        return {}, {}, []
    if state.get("version") != STATE_VERSION or old.name != cfg.name or old.index_root != (
            str(cfg.index_dir) if cfg.index_dir is not None else None):
        return {}, {}, []
    return {e.path: e for e in old.shards}, state.get("tars", {}), state.get("caption_fields", [])
