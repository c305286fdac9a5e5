"""The result manifest of a shard build: which shards exist, how many samples each holds, checksums.

Written by the builder (pipeline/build.py), read by the loader and the trainer. The trainer takes
its epoch length from here, never from a user flag.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.files import write_json_atomic


@dataclass
class ShardEntry:
    path: str            # tar file name, relative to the shard directory
    samples: int         # successful samples in the tar
    bytes: int
    sha256: str
    index: str | None = None  # DALI index file (wds2idx) name, relative to the shard directory


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

    def shard_dir(self) -> Path:
        """The shard directory: beside this manifest if the shards are there, else `root`."""
        if self.source is not None and self.shards and (self.source.parent / self.shards[0].path).exists():
            return self.source.parent
        return Path(self.root)

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
