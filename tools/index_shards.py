"""Make a manifest for webdataset shards you already have (img2dataset or OpenCLIP layout).

    python tools/index_shards.py "/data/cc12m/{00000..01242}.tar" --name cc12m --index-dir /scratch/cc12m-index
    python tools/index_shards.py /data/mine/ --name mine [--manifest PATH] [--verify decode]

Writes `manifests/<name>.json` (or `--manifest PATH`) with every shard's usable sample count, size
and sha256, and a DALI index per tar, beside the tars or under `--index-dir` (then nothing is
written near the shards: they may be on a read-only file system). Every sample is checked; one
without an image or a caption, with an image whose header does not parse (`--verify decode`: that
does not decode fully), or with a key seen earlier is left out of the index and counted by kind.
A rerun reuses every tar whose size and mtime are unchanged; `--verify` reads them all again
(`--verify decode` also decodes every image). How it works: pipeline/indexing.py.
Exit status 0, or 2 with one `error:` line when the shards cannot be used.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.cli import report, run_main
from pipeline.indexing import IndexConfig, index_shards
from pipeline.manifest import ShardError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help='brace pattern ("/d/{00000..00099}.tar"), glob ("/d/*.tar") or a directory')
    p.add_argument("--name", required=True, help="data set name: manifests/<name>.json")
    p.add_argument("--manifest", type=Path, help="write the manifest here instead of manifests/<name>.json")
    p.add_argument("--index-dir", type=Path, help="keep the indexes (and the rerun state) here, away from the shards")
    p.add_argument("--verify", nargs="?", const="checksums", choices=("checksums", "decode"),
                   help="read every tar again (no reuse); 'decode' also decodes every image fully")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tars read at once")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        cfg = IndexConfig(a.shards, a.name, a.manifest or Path("manifests") / f"{a.name}.json", a.index_dir,
                          a.verify or "header", a.workers)
        manifest, info = index_shards(cfg, progress=not a.no_progress)
    except ShardError as e:
        return report(e, 2)
    print(json.dumps({"manifest": str(cfg.manifest), "shards": len(manifest.shards), "samples": manifest.total_samples,
                      "excluded": info["excluded_by_reason"], "read": info["read"], "reused": info["reused"]}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
