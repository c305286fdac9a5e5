"""The result manifest of a shard build: which shards exist, how many samples each holds, checksums.

Written by the builder (pipeline/build.py), read by the loader and the trainer. The trainer takes
its epoch length from here, never from a user flag. The JSON format is described in
manifests/README.md; fields added later are optional, and a manifest without them loads with
those fields "not recorded" (None).

Where the shards are (`Manifest.shard_dir`), by one rule: beside the manifest when every shard is
there; under the manifest's `root` (the build's shard directory) when none of them is beside it
and every shard is there; otherwise a `ShardError` that lists what is missing. A manifest never
reads some shards from one place and the rest from the other, and a copied shard set with a
shard missing fails instead of silently reading the original.

Indexes are relative to the shard directory, or to `index_root` when a manifest made by
tools/index_shards.py keeps them elsewhere (`--index-dir`).

A manifest may come from anyone, so every entry is checked in form when it is made or loaded
(`ShardError` naming the entry): shard and index paths are relative and stay inside the shard
directory (no absolute path, no `..`), checksums are 64 lowercase hex digits, counts are
non-negative integers. That the checksums match the files is verified by tools/verify_shards.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.files import write_json_atomic
from pipeline.regular_files import RefusedFile, read_regular

MISSING_LISTED = 3     # missing shards named in an error
MAX_MANIFEST_BYTES = 256 << 20   # a manifest lists shards and their bad samples: megabytes, not gigabytes
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ShardError(ValueError):
    """A shard disagrees with its manifest (missing, truncated, re-written since the build)."""


def check_relative_path(value, what: str) -> str:
    """`value` if it names a file inside the shard directory: a relative POSIX path without `..`,
    empty or absolute parts; else ShardError."""
    if not isinstance(value, str) or not value or "\0" in value or "\\" in value:
        raise ShardError(f"{what} {value!r}: expected a file name relative to the shard directory")
    parts = PurePosixPath(value).parts
    if value.startswith("/") or any(p in ("..", ".") for p in parts) or "//" in value or value.endswith("/"):
        raise ShardError(f"{what} {value!r}: must be relative and stay inside the shard directory")
    return value


def _check_count(value, what: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ShardError(f"{what} {value!r}: expected an integer >= 0")


def _check_sha256(value, what: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or _SHA256.fullmatch(value) is None:
        raise ShardError(f"{what} {value!r}: expected a sha256 of 64 lowercase hex digits")


def _check_bad_samples(value, what: str = "bad_samples") -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise ShardError(f"{what} {value!r}: expected a list or null")
    for rec in value:
        if not isinstance(rec, dict):
            raise ShardError(f"{what} entry {rec!r}: expected an object")
        _check_count(rec.get("position"), f"{what} position")
        for key in ("key", "reason", "detail"):
            if rec.get(key) is not None and not isinstance(rec[key], str):
                raise ShardError(f"{what} {key} {rec[key]!r}: expected a string")


@dataclass
class ShardEntry:
    path: str            # tar file name, relative to the shard directory
    samples: int         # successful samples in the tar
    bytes: int
    sha256: str
    index: str | None = None  # DALI index file (wds2idx) name, relative to the shard directory
    # the index file's sha256 and the size of the tar it was made from; None: not recorded
    index_sha256: str | None = None
    index_tar_bytes: int | None = None
    # samples whose image failed verification at build time: {"position": n-th sample of the tar,
    # "key": its key, "reason": ..., "detail": ...}; [] = all verified, None = not verified
    bad_samples: list[dict] | None = None
    # samples of the tar left out of its index by tools/index_shards.py (no image, no caption, an
    # image that does not parse, a repeated key): {"position": n-th sample of the whole tar, "key",
    # "reason", "detail"}; `samples` and the index then count only the others. None: none left out.
    excluded: list[dict] | None = None

    def __post_init__(self):
        check_relative_path(self.path, "shard path")
        if self.index is not None:
            check_relative_path(self.index, "index path")
        _check_count(self.samples, "samples")
        _check_count(self.bytes, "bytes")
        _check_count(self.index_tar_bytes, "index_tar_bytes", optional=True)
        _check_sha256(self.sha256, "sha256")
        _check_sha256(self.index_sha256, "index_sha256", optional=True)
        _check_bad_samples(self.bad_samples)
        _check_bad_samples(self.excluded, "excluded")


@dataclass
class Manifest:
    name: str
    root: str                                    # absolute shard directory at build time
    shards: list[ShardEntry]
    stats: dict = field(default_factory=dict)    # build statistics (rows read, failures by reason...)
    source: Path | None = None                   # where this manifest was read from
    # absolute directory the `index` paths are relative to when the indexes are kept away from the
    # shards (tools/index_shards.py --index-dir); None: beside the shards, in the shard directory
    index_root: str | None = None
    # what a sample's caption can come from ("txt", and the json fields "title", "description",
    # "captions"...); None: not recorded (manifests made before it)
    caption_fields: list[str] | None = None

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def _missing_in(self, directory: Path) -> list[Path]:
        return [directory / s.path for s in self.shards if not (directory / s.path).is_file()]

    def shard_dir(self) -> Path:
        """The one directory that holds every shard (see the module docstring); ShardError if none does."""
        root = Path(self.root)
        name = str(self.source) if self.source is not None else f"manifest {self.name!r}"
        if self.source is not None:
            beside = self.source.parent
            missing = self._missing_in(beside)
            if not missing:
                return beside
            same = beside.resolve() == root.resolve()
            if len(missing) < len(self.shards) or same:
                why = "" if same else (f" (a manifest beside its shards reads every one from there, never from "
                                       f"its root {root})")
                raise ShardError(f"{name}: {len(missing)} of {len(self.shards)} shards missing beside it: "
                                 f"{_listing(missing)}{why}")
        missing = self._missing_in(root)
        if missing:
            none_beside = "none of its shards is beside it and " if self.source is not None else ""
            raise ShardError(f"{name}: {none_beside}{len(missing)} of {len(self.shards)} shards are missing "
                             f"under its root {root}: {_listing(missing)}")
        return root

    def shard_paths(self) -> list[Path]:
        d = self.shard_dir()
        return [d / s.path for s in self.shards]

    def index_paths(self) -> list[Path] | None:
        d = self.shard_dir()
        if any(s.index is None for s in self.shards):
            return None
        where = Path(self.index_root) if self.index_root is not None else d
        return [where / s.index for s in self.shards]

    def to_dict(self) -> dict:
        d = {"name": self.name, "root": self.root}
        for key in ("index_root", "caption_fields"):     # only when recorded: older manifests keep their bytes
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        d.update({
            "total_samples": self.total_samples,
            "num_shards": len(self.shards),
            "shards": [{k: v for k, v in vars(s).items() if k != "excluded" or v is not None} for s in self.shards],
            "stats": self.stats,
        })
        return d


def _listing(paths: list[Path]) -> str:
    more = len(paths) - MISSING_LISTED
    return ", ".join(map(str, paths[:MISSING_LISTED])) + (f" and {more} more" if more > 0 else "")


def load_manifest(path: str | Path) -> Manifest:
    """The manifest at `path`, every entry checked in form (ShardError naming the entry)."""
    path = Path(path)
    try:
        d = json.loads(read_regular(path, MAX_MANIFEST_BYTES, "a shard manifest"))
    except RefusedFile as e:
        raise ShardError(str(e)) from None
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not a shard manifest ({e})") from e
    try:
        if not isinstance(d, dict) or not isinstance(d.get("shards"), list):
            raise TypeError("expected an object with a list of shards")
        if not isinstance(d.get("name"), str) or not isinstance(d.get("root"), str):
            raise TypeError("name and root must be strings")
        stats = d.get("stats", {})
        index_root, caption_fields = d.get("index_root"), d.get("caption_fields")
        if index_root is not None and (not isinstance(index_root, str) or not index_root.startswith("/")):
            raise TypeError(f"index_root {index_root!r} must be an absolute directory")
        if caption_fields is not None and (not isinstance(caption_fields, list)
                                           or not all(isinstance(f, str) for f in caption_fields)):
            raise TypeError(f"caption_fields {caption_fields!r} must be a list of names")
        shards = []
        for n, s in enumerate(d["shards"]):
            try:
                shards.append(ShardEntry(**s))
            except ShardError as e:
                raise ShardError(f"{path}: shard {n}: {e}") from None
        return Manifest(name=d["name"], root=d["root"], shards=shards, stats=stats if isinstance(stats, dict) else {},
                        source=path, index_root=index_root, caption_fields=caption_fields)
    except ShardError:
        raise
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a shard manifest ({e})") from e


def save_manifest(manifest: Manifest, *paths: str | Path) -> None:
    """Write the manifest json atomically to every path given."""
    for path in paths:
        write_json_atomic(path, manifest.to_dict(), indent=1)
