"""Build webdataset shards + DALI indexes + a result manifest from a published image-text list.

    python tools/build_shards.py --preset cc3m  --url-list Train_GCC-training.tsv --out /data/cc3m
    python tools/build_shards.py --preset cc12m --url-list cc12m.tsv --out /data/cc12m
    python tools/build_shards.py --preset redcaps --url-list redcaps/annotations/ --out /data/redcaps
    python tools/build_shards.py --preset coco --images train2017/ --captions captions_train2017.json --out /data/coco
    python tools/build_shards.py --url-list any.parquet --url-col url --caption-col caption --out /data/mine
    python tools/build_shards.py --url-list list.tsv --columns url,caption,license --out /data/mine

The same builder as tools/build_yfcc15m.py (pipeline/build.py: select, download through
img2dataset, finalize; rerun the same command after a kill to resume), reading its rows from the
list (pipeline/sources.py). COCO packs the local images at the builder's stored size, without any
download; every caption of an image is kept. The manifest name defaults to the preset's (or the
list's file name). Inputs that cannot be used end with one `error:` line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline.build import build  # noqa: E402
from pipeline.build_options import add_build_options, build_config, run_build  # noqa: E402
from pipeline.cli import run_main  # noqa: E402
from pipeline.sources import FORMATS, PRESETS, CocoSource, UrlListSource  # noqa: E402

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=(*PRESETS, "coco"), help="a published list's format (README 'Data sources')")
    p.add_argument("--url-list", type=Path, help="the list: a csv, tsv, parquet or json-lines file, or a folder of them")
    p.add_argument("--input-format", choices=FORMATS, help="the list's format (default: from its file name)")
    p.add_argument("--url-col", default="url")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--columns", help="a csv/tsv without a header: its column names in order, comma-separated")
    p.add_argument("--extra-columns", default="", help="columns kept in each sample's json, comma-separated")
    p.add_argument("--images", type=Path, help="--preset coco: the folder of the images")
    p.add_argument("--captions", type=Path, help="--preset coco: captions_train2017.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-progress", action="store_true")
    add_build_options(p, skip=("url_template",))
    return p.parse_args(argv)


def source_from_args(a: argparse.Namespace) -> UrlListSource | CocoSource:
    if a.preset == "coco":
        if a.images is None or a.captions is None:
            raise SystemExit("--preset coco needs --images and --captions")
        return CocoSource(a.images, a.captions)
    if a.url_list is None:
        raise SystemExit("--url-list is required (or --preset coco with --images and --captions)")
    kw = dict(PRESETS.get(a.preset, {}))
    if a.columns:
        kw["columns"] = tuple(c.strip() for c in a.columns.split(","))
    if a.extra_columns:
        kw["extra_columns"] = tuple(c.strip() for c in a.extra_columns.split(",") if c.strip())
    fmt = a.input_format or kw.pop("format", None) or SUFFIX_FORMATS.get(a.url_list.suffix.lower())
    kw.pop("format", None)
    if fmt is None:
        raise SystemExit(f"{a.url_list}: say its format with --input-format ({', '.join(FORMATS)})")
    try:
        return UrlListSource(a.url_list, fmt, a.url_col, a.caption_col, **kw)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def main(argv=None) -> int:
    a = parse_args(argv)
    source = source_from_args(a)
    name = a.name or a.preset or (a.url_list.stem if a.url_list else "shards")
    return run_build(lambda: build(build_config(a, source=source, name=name)))


if __name__ == "__main__":   # img2dataset uses multiprocessing "spawn"
    sys.exit(run_main(main))
