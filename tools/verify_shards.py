"""Verify a shard set against its manifest: every tar's size and sha256, every recorded index's sha256.

    python tools/verify_shards.py manifests/yfcc15m.json [--workers 8]

Run it before a long training run, or after copying shards between machines: starting a run only
checks sizes and indexes, not every byte. It says when the shards were last verified, hashes them
all (in parallel, with a progress bar), and records the result beside the manifest in
`<manifest stem>.verified.json` (the manifest itself is never rewritten). Exit status: 0 when every
shard matches, 1 when some differ (each is listed), 2 when the manifest cannot be used.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.integrity import last_verification, verification_path, verify_shards
from pipeline.cli import report, run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path, help="result manifest of a shard build")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="files hashed at once")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    before = last_verification(a.manifest)
    print(f"{a.manifest}: last verified {before.verified_at + (' (passed)' if before.ok else ' (FAILED)')}"
          if before is not None else f"{a.manifest}: never verified as it is now", file=sys.stderr)
    try:
        result = verify_shards(a.manifest, workers=a.workers, progress=not a.no_progress)
    except ValueError as e:      # a ShardError (missing shards, a forged entry) or an unreadable manifest
        return report(e, 2)
    for problem in result.problems:
        print(problem)
    status = "all match" if result.ok else f"{len(result.problems)} problem(s)"
    print(f"{result.shards} shards, {result.bytes:,} bytes verified at {result.verified_at}: {status} "
          f"(recorded in {verification_path(a.manifest)})", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
