"""Full verification of a shard set against its manifest, and the record of when it last passed.

Starting a run checks what is cheap (each tar's size, each index against its tar); reading every
byte of a terabyte shard set is left to `verify_shards`, run by the builder at the end of a build
(from the checksums it has just computed) and by users before a long run (tools/verify_shards.py).
It compares every tar's size and sha256 with the manifest, and every index's sha256 where the
manifest recorded one, hashing several files at once (hashlib releases the GIL).

The result is kept beside the manifest in `<manifest stem>.verified.json` (`verification_path`),
never in the manifest itself, whose checksum identifies the data set to the trainer. The record
names the sha256 of the manifest it verified, so a record left beside a rebuilt manifest does not
vouch for it (`last_verification` returns None then).
"""
from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from pipeline.files import write_json_atomic
from pipeline.manifest import MAX_MANIFEST_BYTES, Manifest, ShardEntry, ShardError, load_manifest
from pipeline.regular_files import RefusedFile, open_regular, read_regular

READ_BLOCK = 1 << 22


@dataclass
class Verification:
    manifest: str                  # the manifest file verified
    manifest_sha256: str           # its content when verified
    verified_at: str               # ISO 8601, UTC
    shards: int
    bytes: int
    problems: list[str] = field(default_factory=list)   # one line per shard or index that differs

    @property
    def ok(self) -> bool:
        return not self.problems


def verification_path(manifest_path: str | Path) -> Path:
    """Where the verification record of a manifest is kept: `<dir>/<stem>.verified.json`."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(f"{manifest_path.stem}.verified.json")


def _sha256_bytes(path: Path) -> str:
    return hashlib.sha256(read_regular(path, MAX_MANIFEST_BYTES, "a shard manifest")).hexdigest()


def _hash_file(path: Path, progress: "tqdm | None", lock: threading.Lock) -> str:
    h = hashlib.sha256()
    with open(open_regular(path, "a shard"), "rb") as f:
        while block := f.read(READ_BLOCK):
            h.update(block)
            if progress is not None:
                with lock:
                    progress.update(len(block))
    return h.hexdigest()


def _check_shard(entry: ShardEntry, tar: Path, idx: Path | None, progress, lock) -> list[str]:
    try:
        size = tar.stat().st_size
        if size != entry.bytes:
            return [f"{tar}: {size} bytes, the manifest says {entry.bytes}"]
        problems = []
        if _hash_file(tar, progress, lock) != entry.sha256:
            problems.append(f"{tar}: sha256 differs from the manifest's (changed since the build)")
        if idx is not None and entry.index_sha256 is not None and _hash_file(idx, None, lock) != entry.index_sha256:
            problems.append(f"{idx}: sha256 differs from the manifest's (changed since the build)")
        return problems
    except (OSError, RefusedFile) as e:
        return [f"{tar}: unreadable ({e})"]


def verify_shards(manifest_path: str | Path, workers: int = 4, progress: bool = True) -> Verification:
    """Every shard (and recorded index) of the manifest hashed and compared with it; the result is
    also written to `verification_path(manifest_path)`. ShardError when the manifest itself is
    unusable or its shards cannot be found."""
    manifest_path = Path(manifest_path)
    digest = _sha256_bytes(manifest_path)
    manifest = load_manifest(manifest_path)
    shard_dir = manifest.shard_dir()
    tars = [shard_dir / e.path for e in manifest.shards]
    index_dir = Path(manifest.index_root) if manifest.index_root is not None else shard_dir
    indexes = [None if e.index is None else index_dir / e.index for e in manifest.shards]
    total = sum(e.bytes for e in manifest.shards)
    lock = threading.Lock()
    with tqdm(total=total, desc="verify", unit="B", unit_scale=True, disable=not progress) as bar, \
            ThreadPoolExecutor(max(1, workers), thread_name_prefix="verify_shards") as pool:
        jobs = [pool.submit(_check_shard, e, tar, idx, bar, lock) for e, tar, idx in
                zip(manifest.shards, tars, indexes)]
        problems = [p for job in jobs for p in job.result()]
    result = Verification(str(manifest_path), digest, _now(), len(manifest.shards), total, problems)
    record_verification(manifest_path, result)
    return result


def verified_by_build(manifest_path: str | Path, manifest: Manifest) -> Verification:
    """The record of a manifest the builder has just written from checksums it computed on the
    finished files: a full verification, without reading them again."""
    manifest_path = Path(manifest_path)
    result = Verification(str(manifest_path), _sha256_bytes(manifest_path), _now(), len(manifest.shards),
                          sum(e.bytes for e in manifest.shards))
    record_verification(manifest_path, result)
    return result


def record_verification(manifest_path: str | Path, result: Verification) -> None:
    write_json_atomic(verification_path(manifest_path), asdict(result), indent=1)


def last_verification(manifest_path: str | Path) -> Verification | None:
    """The recorded verification of this manifest as it is now, or None (never verified, the record
    is unreadable, or the manifest changed since)."""
    manifest_path = Path(manifest_path)
    try:
        d = json.loads(read_regular(verification_path(manifest_path), 1 << 24, "a verification record"))
        result = Verification(**d)
        return result if result.manifest_sha256 == _sha256_bytes(manifest_path) else None
    except (OSError, ValueError, TypeError, RecursionError, ShardError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
