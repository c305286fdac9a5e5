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
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.files import write_json_atomic

MISSING_LISTED = 3     # missing shards named in an error


class ShardError(ValueError):
    """A shard disagrees with its manifest (missing, truncated, re-written since the build)."""


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


@dataclass
class Manifest:
    name: str
    root: str                                    # absolute shard directory at build time
    shards: list[ShardEntry]
    stats: dict = field(default_factory=dict)    # build statistics (rows read, failures by reason...)
    source: Path | None = None                   # where this manifest was read from

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
        return [d / s.index for s in self.shards]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "root": self.root,
            "total_samples": self.total_samples,
            "num_shards": len(self.shards),
            "shards": [vars(s) for s in self.shards],
            "stats": self.stats,
        }


def _listing(paths: list[Path]) -> str:
    more = len(paths) - MISSING_LISTED
    return ", ".join(map(str, paths[:MISSING_LISTED])) + (f" and {more} more" if more > 0 else "")


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        shards = [ShardEntry(**s) for s in d["shards"]]
        return Manifest(name=d["name"], root=d["root"], shards=shards, stats=d.get("stats", {}), source=path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a shard manifest ({e})") from e


def save_manifest(manifest: Manifest, *paths: str | Path) -> None:
    """Write the manifest json atomically to every path given."""
    for path in paths:
        write_json_atomic(path, manifest.to_dict(), indent=1)
