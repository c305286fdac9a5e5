"""The metadata scan at YFCC100M scale keeps its results: the parallel bz2 reader gives the rows and
counts of the standard library's, whole or damaged; the block-at-a-time fast path accepts exactly
the rows the line-by-line path accepts; and the scan's memory does not grow with the row count.
(Speed is measured by tools/bench/bench_metadata_scan.py, never asserted here.)"""
from __future__ import annotations

import bz2
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import meta_line
from pipeline import metadata, parallel_bz2
from pipeline.metadata import ScanStats, SubsetIds, read_metadata

ROOT = Path(__file__).resolve().parents[1]


def rows_text(n: int, seed: int = 0, dirty: bool = True) -> bytes:
    """n rows, with a few bad lines of every kind among them when `dirty`."""
    rnd = random.Random(seed)
    out = []
    for i in range(1, n + 1):
        out.append(meta_line(i, 1000 + i, f"{i:x}", f"title+{i}", "a+b" * rnd.randint(0, 30), f"http://x/{i}.jpg",
                             marker="1" if i % 97 == 0 else "0"))
        if dirty and i % 2500 == 0:
            out += [b"\n", b"too\tfew\n", meta_line(i, "12x", "h", "t", "d", "u"), meta_line(i, 1000 + i, "dup", "t", "d", "u"),
                    meta_line(i, 2_000_000 + i, "h", "caf", "d", "u").replace(b"caf", b"\xff")]
    return b"".join(out)


def scan(path: Path, subset: Path | None, threads: int):
    stats = ScanStats()
    ids = SubsetIds.from_file(subset, stats, progress=False) if subset else None
    rows = list(read_metadata(path, ids, stats, progress=False, threads=threads))
    return rows, stats.to_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    text = rows_text(12_000)
    whole = bz2.compress(text, 1)             # 100 kB blocks: dozens of blocks for the threads to share
    subset = d / "subset.tsv"
    ids = [1000 + i for i in range(1, 12_001, 3)] + [2_000_000 + i for i in range(2500, 12_001, 2500)]
    subset.write_text("".join(f"{n}\t{pid}\t0\n" for n, pid in enumerate(ids, 1)))
    kinds = {"whole": whole, "concatenated": whole + bz2.compress(text[:50_000], 1), "cut": whole[: len(whole) * 2 // 3],
             "trailing_bytes": whole + b"not bz2 at all", "empty": bz2.compress(b"")}
    damaged = bytearray(whole)
    damaged[len(damaged) * 5 // 6] ^= 0xFF                # one flipped byte in a late block
    kinds["damaged"] = bytes(damaged)
    paths = {}
    for k, data in kinds.items():
        paths[k] = d / f"{k}.bz2"
        paths[k].write_bytes(data)
    return paths, subset


@pytest.mark.parametrize("kind", ["whole", "concatenated", "cut", "trailing_bytes", "damaged"])
def test_parallel_and_stdlib_readers_give_the_same_rows_and_counts(files, kind):
    paths, subset = files
    path = paths[kind]
    with open(path, "rb") as f:       # which reader the parallel run really uses
        assert parallel_bz2.usable(f, 2) == (kind in ("whole", "concatenated", "damaged"))
    for sub in (subset, None):
        one, one_stats = scan(path, sub, threads=1)
        many, many_stats = scan(path, sub, threads=2)
        assert many == one and many_stats == one_stats
        assert len(one) > 1000
    if kind in ("cut", "damaged", "trailing_bytes"):     # data that is no bz2 stream is damage too
        assert one_stats["counts"]["truncated_input"] == 1
    else:
        assert "truncated_input" not in one_stats["counts"]
    assert one_stats["counts"]["malformed"] >= 4 and one_stats["counts"]["non_utf8"] >= 2


def test_a_damaged_block_hands_over_to_the_stdlib_after_the_delivered_bytes(files):
    """indexed_bzip2 really fails on the damaged file, mid-stream, after delivering correct bytes."""
    import threading
    paths, _ = files
    with open(paths["damaged"], "rb") as f:
        got = []
        with pytest.raises(parallel_bz2.Failed) as e:
            for out, _ in parallel_bz2.pieces(f, 2, 1 << 16, threading.Event()):
                got.append(out)
    assert e.value.delivered == sum(map(len, got)) > 0
    assert bz2.decompress(paths["whole"].read_bytes()).startswith(b"".join(got))


def test_the_block_fast_path_accepts_exactly_what_the_line_path_accepts(tmp_path, monkeypatch):
    """Photo ids in every spelling int() reads or refuses, CRLF, blank and whitespace lines: the
    file read with the numpy block path and with the line path alone gives the same rows and counts."""
    odd_ids = ["0000123", "+124", " 125", "126 ", "1_27", "", "9" * 18, "9" * 19, "9" * 20, "-130", "١٣١"]
    lines = [meta_line(i, 500 + i, "h", "t", "d", f"http://x/{i}") for i in range(1, 3000)]
    for k, pid in enumerate(odd_ids):
        lines.insert(200 * (k + 1), meta_line(7000 + k, "PID", "h", "t", "d", "u").replace(b"PID", pid.encode()))
    lines.insert(2500, b"   \n")
    lines.insert(2600, lines[2600].replace(b"\n", b"\r\n"))
    path = tmp_path / "m.tsv"
    path.write_bytes(b"".join(lines))
    monkeypatch.setattr(metadata._Lines, "PIECE", 4096)     # many small blocks: clean ones and dirty ones
    fast = scan(path, None, threads=1)
    used = []
    real = metadata._plain_rows
    monkeypatch.setattr(metadata, "_plain_rows", lambda data: used.append(real(data) is not None) and None)
    slow = scan(path, None, threads=1)
    assert any(used) and not all(used)          # both kinds of block were met
    assert fast == slow
    assert fast[1]["counts"]["malformed"] == 4      # '', 19 and 20 nines (past int64), Arabic digits


SCAN_MEMORY = r"""
import json, resource, sys, tracemalloc
from pathlib import Path
from pipeline.build import BuildConfig, select_stage
meta, subset, out = map(Path, sys.argv[1:4])
tracemalloc.start()
stats = select_stage(BuildConfig(metadata=meta, subset=subset, out=out, progress=False, shards_per_part=1,
                                 shard_size=1000))
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1], "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "rows": stats["counts"]["rows_read"], "selected": stats["selected"]}))
"""


def test_scan_memory_does_not_grow_with_the_row_count(tmp_path):
    """The select stage over 1M and over 2M rows (the same subset of 5,000 ids, so the same output):
    its traced peak and its peak RSS stay the same. Holding anything per row would add tens of MB."""
    row = meta_line(0, 0, "h", "title", "desc", "http://x/y.jpg").split(b"\t")
    head, tail = b"\t".join(row[:1]), b"\t".join(row[2:])
    subset = tmp_path / "subset.tsv"
    subset.write_text("".join(f"{i}\t{i * 199}\t0\n" for i in range(1, 5001)))     # spread over the first 1M
    results = {}
    for n in (1_000_000, 2_000_000):
        meta = tmp_path / f"m{n}.tsv"
        with open(meta, "wb") as f:
            for start in range(0, n, 100_000):
                f.write(b"".join(b"%s\t%d\t%s" % (head, i, tail) for i in range(start, start + 100_000)))
        proc = subprocess.run([sys.executable, "-c", SCAN_MEMORY, str(meta), str(subset), str(tmp_path / f"out{n}")],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        meta.unlink()
    small, large = results[1_000_000], results[2_000_000]
    assert (small["rows"], large["rows"]) == (1_000_000, 2_000_000)
    assert small["selected"] == large["selected"] == 5000
    assert large["peak"] < small["peak"] * 1.1 + (2 << 20), results
    assert large["rss_kb"] - small["rss_kb"] < 20_000, results


def _reference_clean_caption(raw: str) -> str:
    """clean_caption as it was before its fast paths (the rules of pipeline/captions.py, unskipped)."""
    from urllib.parse import unquote

    import ftfy

    from pipeline import captions as c
    if not raw:
        return ""
    text = c._TAGS.sub(" ", unquote(raw, errors="replace").replace("+", " "))
    text = c._URLS.sub(" ", text)
    if not text.isascii() or "&" in text or "\x1b" in text:
        text = ftfy.fix_text(text)
    text = c._SPACE.sub(" ", c._controls().sub("", c._SPACE.sub(" ", text))).strip()
    return text if c.has_visible_text(text) else ""


def test_the_caption_and_url_fast_paths_give_the_unskipped_answers():
    from pipeline.build import _FIELD, format_url
    from pipeline.captions import clean_caption
    from pipeline.netpolicy import UrlChecker, url_reason
    rnd = random.Random(1)
    pieces = ["a", "B", "+", "%20", "%09", "%0A", "%7F", "%01", "  ", "<b>", "</a>", "<br/>", "http://x.y/z", "www.q",
              "&amp;", "%C3%A9", "%E2%80%8B", "\x1b", "<", ">", "h", "ttp", "%", "%2"]
    for _ in range(3000):
        raw = "".join(rnd.choices(pieces, k=rnd.randint(0, 8)))
        assert clean_caption(raw) == _reference_clean_caption(raw), raw
    urls = ["https://images.example.invalid/data/abc/def/x.jpg", "http://127.0.0.1/a", "http://localhost/b",
            "http://127.0.0.1:8080/a", "http://LOCALHOST/a", "http://user:pw@x.invalid/a", "ftp://x.invalid/a",
            "http://x.invalid", "http://x.invalid?q", "http://x.invalid#f", "http://x.inv\talid/a", "http://10.0.0.1/a",
            "http://[::1]/a", "http:///a", "http://0x7f.1/a", "https://x.invalid./a", " http://x.invalid/a",
            "http://x.invalid\n.localhost/a", "http://[bad/a", "http://8.8.8.8/a"]
    for allow in (False, True):
        check, unskipped = UrlChecker(allow), UrlChecker(allow)
        for url in urls * 2:           # the second round answers from the origin cache
            assert check(url) == unskipped._check(url), url
    assert url_reason("http://10.0.0.1/x") == ("private_address", "host '10.0.0.1'")
    template = "https://h/{hash[0:3]}/{hash[3:6]}/{hash}{ext[-2:]}.{ext}?{photoid}{download_url[:]}"
    fields = dict(hash="abcdef99", ext="jpg", photoid=7, download_url="u")

    def reference(template, **fields):
        def sub(m):
            v = str(fields[m.group(1)])
            if m.group(2) is None and m.group(3) is None and "[" not in m.group(0):
                return v
            a, b = m.group(2), m.group(3)
            return v[int(a) if a else None:int(b) if b else None]
        return _FIELD.sub(sub, template)
    assert format_url(template, **fields) == reference(template, **fields) == "https://h/abc/def/abcdef99pg.jpg?7u"
    with pytest.raises(ValueError, match=r"unknown field 'nope'"):
        format_url("{hash}{nope}", **fields)
