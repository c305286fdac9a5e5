"""Metadata scan at YFCC100M scale: speed, peak memory and the share of bz2 decompression in the
builder's select stage (subset load, parse, filter, caption cleaning, parquet writing; no download).

    python tools/bench/bench_metadata_scan.py --rows 10000000 --work /tmp/scan10m     # makes the file first
    python tools/bench/bench_metadata_scan.py --metadata M.bz2 --subset S.tsv --work DIR

With a bz2 file, each phase runs in its own process (so each peak RSS is its own):
  decompress   the standard library's bz2 alone, one core, writing the text out: the decompression floor
  text         the select stage on that decompressed text: rows/s per CPU-second is the parse cost
  bz2_stdlib   the select stage on the bz2 file, decompressed by the standard library (threads=1)
  bz2_parallel the same, decompressed on every core by indexed_bzip2 (pipeline/parallel_bz2.py)
and reports the speed-up of bz2_parallel against bz2_stdlib (same run, same file), the share of
the stdlib run's CPU time spent decompressing, and whether all three select stages chose the same
rows (their parquet parts compared table by table). A plain TSV gets the `text` phase only.
"""
from __future__ import annotations

import argparse
import bz2
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def phase_select(metadata: Path, subset: Path, out: Path, threads: int | None) -> dict:
    from pipeline import build
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = build.select_stage(build.BuildConfig(metadata=metadata, subset=subset, out=out, progress=False,
                                                          scan_threads=threads))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = stats["counts"]["rows_read"]
    return {"rows": rows, "selected": stats["selected"], "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "rows_per_s": round(rows / wall), "rows_per_cpu_s": round(rows / cpu),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def phase_decompress(metadata: Path, text: Path) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    with bz2.open(metadata, "rb") as f, open(text, "wb") as out:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            out.write(block)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"rows": n, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "rows_per_s": round(n / wall),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def run_phase(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--phase", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_selection(a: Path, b: Path) -> bool:
    """Whether two select stages wrote the same rows (parquet parts compared one at a time)."""
    import pyarrow.parquet as pq
    pa_, pb = sorted((a / "parquet").glob("part-*.parquet")), sorted((b / "parquet").glob("part-*.parquet"))
    return len(pa_) == len(pb) and all(pq.read_table(x).equals(pq.read_table(y)) for x, y in zip(pa_, pb))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, help="folder for the generated input, the decompressed text and the outputs")
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the generated bz2 file (without --metadata)")
    p.add_argument("--metadata", type=Path)
    p.add_argument("--subset", type=Path)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="cores for the parallel bz2 phase (default: all this process may use)")
    p.add_argument("--keep-text", action="store_true", help="keep the decompressed text (several GB at 10M rows)")
    p.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)     # internal: one measured phase
    a = p.parse_args(argv)
    if a.phase:
        kind, *rest = a.phase
        if kind == "decompress":
            result = phase_decompress(Path(rest[0]), Path(rest[1]))
        else:
            result = phase_select(Path(rest[0]), Path(rest[1]), Path(rest[2]), None if rest[3] == "auto" else int(rest[3]))
        print(json.dumps(result))
        return 0
    if a.work is None:
        p.error("--work is required")
    a.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"cores": len(os.sched_getaffinity(0)), "parallel_threads": a.threads}
    if a.metadata is None:
        a.metadata, a.subset = a.work / "yfcc100m_dataset.bz2", a.work / "yfcc100m_subset_data.tsv"
        if not a.metadata.exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "tools/fixtures/make_fake_metadata.py"), "--rows", str(a.rows),
                            "--bz2", "--out", str(a.work)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            report["generate_seconds"] = round(time.perf_counter() - t0, 1)
    if a.subset is None:
        p.error("--subset is required with --metadata")
    from pipeline.metadata import detect_format
    from pipeline.parallel_bz2 import indexed_bzip2
    report["input"] = {"file": str(a.metadata), "mb": round(a.metadata.stat().st_size / 1e6)}
    if detect_format(a.metadata) != "bz2":
        report["text"] = run_phase("select", str(a.metadata), str(a.subset), str(a.work / "out_text"), "1")
        print(json.dumps(report, indent=1))
        return 0
    text = a.work / "decompressed.tsv"
    report["decompress"] = run_phase("decompress", str(a.metadata), str(text))
    report["input"]["decompressed_mb"] = round(text.stat().st_size / 1e6)
    report["text"] = run_phase("select", str(text), str(a.subset), str(a.work / "out_text"), "1")
    if not a.keep_text:
        text.unlink()
    report["bz2_stdlib"] = run_phase("select", str(a.metadata), str(a.subset), str(a.work / "out_stdlib"), "1")
    if indexed_bzip2 is not None and a.threads > 1:
        report["bz2_parallel"] = run_phase("select", str(a.metadata), str(a.subset), str(a.work / "out_parallel"),
                                           str(a.threads))
        report["speedup_parallel_vs_stdlib"] = round(report["bz2_stdlib"]["seconds"] / report["bz2_parallel"]["seconds"], 2)
        report["same_rows_parallel_vs_stdlib"] = same_selection(a.work / "out_stdlib", a.work / "out_parallel")
    else:
        report["bz2_parallel"] = "skipped: " + ("one thread asked for" if a.threads <= 1 else "indexed_bzip2 not installed")
    report["same_rows_text_vs_stdlib"] = same_selection(a.work / "out_text", a.work / "out_stdlib")
    std, txt = report["bz2_stdlib"], report["text"]
    report["bz2_share_of_stdlib_cpu"] = round(1 - txt["cpu_seconds"] / std["cpu_seconds"], 3)
    report["text_rows_per_cpu_s"] = txt["rows_per_cpu_s"]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
