"""Metadata scan speed and peak memory of the builder's select stage (no download).

    python tools/fixtures/make_fake_metadata.py --rows 1000000 --out /tmp/fake
    python tools/bench/bench_metadata_scan.py --metadata /tmp/fake/yfcc100m_dataset.tsv \\
        --subset /tmp/fake/yfcc100m_subset_data.tsv --out /tmp/fake/build

Prints rows/s of the full select stage (subset load, parse, filter, caption cleaning, parquet
writing) and, as the reference measured in the same run, of a bare line read of the same file
(the I/O + decompression floor); the ratio is the builder's overhead. Peak RSS from getrusage.
"""
from __future__ import annotations

import argparse
import bz2
import json
import resource
import shutil
import time
from pathlib import Path

from pipeline.build import BuildConfig, select_stage
from pipeline.metadata import detect_format


def bare_read(path: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    with (bz2.open(path, "rb") if detect_format(path) == "bz2" else open(path, "rb")) as f:
        for _ in f:
            n += 1
    return n, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metadata", type=Path, required=True)
    p.add_argument("--subset", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    shutil.rmtree(a.out, ignore_errors=True)
    rows, t_read = bare_read(a.metadata)
    t0 = time.perf_counter()
    stats = select_stage(BuildConfig(metadata=a.metadata, subset=a.subset, out=a.out, progress=False))
    t_scan = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows, "selected": stats["selected"], "subset_ids": stats["counts"].get("subset_rows"),
                      "scan_rows_per_s": round(rows / t_scan), "bare_read_rows_per_s": round(rows / t_read),
                      "scan_vs_bare_read": round(t_read / t_scan, 3), "scan_seconds": round(t_scan, 2),
                      "peak_rss_mb": round(peak_mb)}, indent=1))


if __name__ == "__main__":
    main()
