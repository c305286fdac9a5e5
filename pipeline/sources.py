"""Data sources other than YFCC's metadata, for the shard builder (pipeline/build.py): URL lists
that img2dataset downloads (CC3M, CC12M, RedCaps, any csv / tsv / parquet / json-lines list), and
local images with their captions (COCO Captions), packed without any download.

A `UrlListSource` yields the rows of the builder's select stage: (where, url, coin id, values),
captions tidied (`tidy_caption`: they are plain text already) and cut at `max_caption_chars`,
rows without a URL or a caption counted (`no_url`, `no_caption`) and left out, malformed rows
of a text file counted (`malformed`). The builder then applies its network policy, writes the
parquet parts and downloads them as for YFCC: same manifest, fault counting and resume.

A `CocoSource` groups the annotations of a captions JSON (`captions_train2017.json`) by image,
and packs each image (resized as img2dataset resizes downloads: the same `Resizer`) with all of
its captions into img2dataset-layout shards: `txt` = the first caption, the json's `captions` =
all five to seven (the loader draws one per step). Each shard is written as img2dataset writes
one (tar, parquet with a status per row, `_stats.json` last), so the builder's finalize stage and
its one-rerun resume apply unchanged: a rerun packs the shards that are not complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from pipeline.captions import tidy_caption, truncate
from pipeline.manifest import ShardError, check_relative_path
from pipeline.metadata import InputError, ScanStats
from pipeline.regular_files import RefusedFile, read_regular
from pipeline.shards import MAX_IMAGE_BYTES

FORMATS = ("csv", "tsv", "parquet", "jsonl", "redcaps")
# the published files (README "Data sources"): headerless tsv columns, or RedCaps' annotation folders
PRESETS = {
    "cc3m": {"format": "tsv", "columns": ("caption", "url")},           # Train_GCC-training.tsv
    "cc12m": {"format": "tsv", "columns": ("url", "caption")},          # cc12m.tsv
    "redcaps": {"format": "redcaps", "extra_columns": ("subreddit", "image_id")},   # annotations/*.json
}


def _coin(url: str) -> int:
    """A per-row integer for the builder's deterministic sampling coin."""
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class UrlListSource:
    path: Path                                # a file, or a folder of files
    format: str = "parquet"                   # csv | tsv | parquet | jsonl | redcaps
    url_col: str = "url"
    caption_col: str = "caption"
    columns: tuple[str, ...] | None = None     # a file without a header: its column names, in order
    extra_columns: tuple[str, ...] = ()        # kept in each sample's json
    local = False

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.columns is not None and self.format not in ("csv", "tsv"):
            raise ValueError("columns: only for a csv or tsv file without a header")
        if self.columns is not None and not {self.url_col, self.caption_col} <= set(self.columns):
            raise ValueError(f"columns {list(self.columns)} must name the url column {self.url_col!r} and the "
                             f"caption column {self.caption_col!r}")

    @property
    def parquet_schema(self) -> pa.Schema:
        return pa.schema([("url", pa.string()), ("caption", pa.string())] +
                         [(c, pa.string()) for c in self.extra_columns])

    caption_fields = ["txt"]

    def inputs(self) -> tuple[Path, ...]:
        return (self.path,)

    def describe(self) -> str:
        return str(self.path)

    def files(self) -> list[Path]:
        if not self.path.is_dir():
            return [self.path]
        suffix = {"redcaps": ".json", "jsonl": ".jsonl"}.get(self.format, f".{self.format}")
        found = sorted(p for p in self.path.iterdir() if p.name.endswith(suffix) and p.is_file())
        if not found:
            raise InputError(f"{self.path}: a folder without any {suffix} file")
        return found

    def fingerprint(self) -> dict:
        return {"files": [{"path": str(p.resolve()), "size": p.stat().st_size} for p in self.files()],
                "format": self.format, "url_col": self.url_col, "caption_col": self.caption_col,
                "columns": list(self.columns) if self.columns else None, "extra_columns": list(self.extra_columns)}

    def rows(self, scan: ScanStats, max_caption_chars: int, progress: bool = False) -> Iterator[tuple]:
        """(where, url, coin, {"caption", extra columns}) for each usable row, in file order."""
        for path in self.files():
            for where, record in self._records(path, scan):
                scan.add("rows_read")
                url = (record.get(self.url_col) or "").strip() if isinstance(record.get(self.url_col), str) else ""
                raw = record.get(self.caption_col)
                caption = tidy_caption(raw) if isinstance(raw, str) else ""
                if not url:
                    scan.add("no_url", where)
                    continue
                if not caption:
                    scan.add("no_caption", where)
                    continue
                if len(caption) > max_caption_chars:
                    scan.add("caption_truncated", where)
                    caption = truncate(caption, max_caption_chars)
                extra = {c: None if record.get(c) is None else str(record[c]) for c in self.extra_columns}
                yield where, url, _coin(url), {"caption": caption, **extra}

    def _records(self, path: Path, scan: ScanStats) -> Iterator[tuple[str, dict]]:
        wanted = [self.url_col, self.caption_col, *self.extra_columns]
        if self.format == "parquet":
            import pyarrow.parquet as pq
            f = pq.ParquetFile(path)
            missing = [c for c in (self.url_col, self.caption_col) if c not in f.schema_arrow.names]
            if missing:
                raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(f.schema_arrow.names)}); "
                                 "name the columns with --url-col / --caption-col")
            cols = [c for c in wanted if c in f.schema_arrow.names]
            n = 0
            for batch in f.iter_batches(columns=cols, batch_size=65536):
                for record in batch.to_pylist():
                    n += 1
                    yield f"{path.name}:row {n}", record
        elif self.format in ("csv", "tsv"):
            yield from self._text_records(path, scan, wanted)
        elif self.format == "jsonl":
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    try:
                        record = json.loads(line)
                    except ValueError:
                        record = None
                    if not isinstance(record, dict):
                        scan.add("malformed", f"{path.name}:{n}")
                        continue
                    yield f"{path.name}:{n}", record
        else:        # RedCaps: {"info": ..., "annotations": [{"url", "caption", "subreddit", "image_id", ...}]}
            try:
                annotations = json.loads(path.read_bytes())["annotations"]
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{path}: not a RedCaps annotation file (expected a json object with a list "
                                 f"'annotations'): {e}") from None
            for n, record in enumerate(annotations, 1):
                if not isinstance(record, dict):
                    scan.add("malformed", f"{path.name}:annotation {n}")
                    continue
                record.setdefault("subreddit", path.stem)
                yield f"{path.name}:annotation {n}", record

    def _text_records(self, path: Path, scan: ScanStats, wanted: list[str]) -> Iterator[tuple[str, dict]]:
        import pyarrow.csv as pcsv
        tsv = self.format == "tsv"

        def invalid(row):
            scan.add("malformed", f"{path.name}:{row.number}" if row.number is not None else path.name)
            return "skip"
        read = pcsv.ReadOptions(column_names=list(self.columns) if self.columns else None, block_size=1 << 24)
        # a tsv caption may hold quote characters: no quoting in tsv, as in the published files
        parse = pcsv.ParseOptions(delimiter="\t" if tsv else ",", quote_char=False if tsv else '"',
                                  invalid_row_handler=invalid)
        try:
            reader = pcsv.open_csv(path, read_options=read, parse_options=parse,
                                   convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in wanted}))
        except pa.ArrowInvalid as e:
            raise InputError(f"{path}: not a readable {self.format} file ({e})") from None
        names = reader.schema.names
        missing = [c for c in (self.url_col, self.caption_col) if c not in names]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names[:10])}); a file without a "
                             "header needs --columns, or name the columns with --url-col / --caption-col")
        n = 0 if self.columns else 1
        for batch in reader:
            cols = {c: batch.column(c).to_pylist() for c in wanted if c in names}
            for i in range(batch.num_rows):
                n += 1
                yield f"{path.name}:{n}", {c: v[i] for c, v in cols.items()}


@dataclass(frozen=True)
class CocoSource:
    images: Path                # the folder of the image files (train2017/)
    captions: Path              # captions_train2017.json
    local = True
    extra_columns = ("image_id", "file_name")
    caption_fields = ["captions", "txt"]

    def __post_init__(self):
        object.__setattr__(self, "images", Path(self.images))
        object.__setattr__(self, "captions", Path(self.captions))

    def inputs(self) -> tuple[Path, ...]:
        return self.images, self.captions

    def describe(self) -> str:
        return f"{self.captions} with {self.images}"

    def fingerprint(self) -> dict:
        return {"captions": {"path": str(self.captions.resolve()), "size": self.captions.stat().st_size},
                "images": str(self.images.resolve())}

    def read(self, scan: ScanStats, max_caption_chars: int) -> list[dict]:
        """One record per image with a caption: {"image_id", "file_name", "captions"}, by image id."""
        for p in self.inputs():
            if not p.exists():
                raise InputError(f"{p}: no such file or folder")
        try:
            d = json.loads(self.captions.read_bytes())
            images, annotations = d["images"], d["annotations"]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{self.captions}: not a COCO captions file (expected 'images' and 'annotations'): "
                             f"{e}") from None
        captions = defaultdict(list)      # in annotation id order, whatever the file's order
        for a in sorted((a for a in annotations if isinstance(a, dict)), key=lambda a: (a.get("id") or 0)):
            text = tidy_caption(a.get("caption") or "") if isinstance(a.get("caption"), str) else ""
            if text:
                captions[a.get("image_id")].append(truncate(text, max_caption_chars))
        records = []
        for img in sorted(images, key=lambda i: i.get("id", 0)):
            scan.add("rows_read")
            if not captions.get(img.get("id")):
                scan.add("no_caption", f"{self.captions.name}: image {img.get('id')}")
                continue
            records.append({"image_id": img["id"], "file_name": img.get("file_name", ""),
                            "captions": captions[img["id"]]})
        return records

    def pack(self, cfg) -> tuple[dict, dict]:
        """Pack every shard not yet complete (pipeline/download_run.py's rule); returns the select
        stats and the download info the builder's finalize stage takes."""
        from pipeline.build_errors import BuildError
        from pipeline.download_run import done_ids, remove_incomplete
        if cfg.limit is not None or cfg.sample_fraction != 1.0:
            raise InputError("--limit and --sample-fraction are not supported for COCO builds")
        scan = ScanStats()
        records = self.read(scan, cfg.max_caption_chars)
        if not records:
            raise BuildError(f"no image with a caption in {self.describe()}: nothing to build")
        # shards are resumed by id, so they must all come from one selection and one packing: refuse a
        # rerun with other settings rather than mixing old and new shards (the URL builds' rule too)
        marker = cfg.state_dir / "pack.json"
        settings = {**cfg.selection_fingerprint(), "shard_size": cfg.shard_size, "image_size": cfg.image_size,
                    "resize_mode": cfg.resize_mode, "encode_quality": cfg.encode_quality}
        settings = json.loads(json.dumps(settings, default=str))
        if marker.exists() and json.loads(marker.read_text()) != settings and any(cfg.shard_dir.glob("*.tar")):
            raise InputError(f"{cfg.out}: already holds shards built with other settings ({marker}); "
                             "use a new --out or delete it")
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(settings))
        cfg.shard_dir.mkdir(parents=True, exist_ok=True)
        redone = remove_incomplete(cfg.shard_dir)
        done = done_ids(cfg.shard_dir)
        resizer = _resizer(cfg)
        # OpenCV's decode, resize and encode release the GIL (img2dataset shares one Resizer between threads too)
        with ThreadPoolExecutor(max(1, cfg.processes), thread_name_prefix="pack") as pool:
            jobs = [pool.submit(_pack_shard, cfg, sid, records[first:first + cfg.shard_size], self.images, resizer)
                    for first in range(0, len(records), cfg.shard_size)
                    if (sid := f"{first // cfg.shard_size:05d}") not in done]
            for job in jobs:
                job.result()
        stats = {**scan.to_dict(), "selected": len(records), "parquet_parts": 0, "scan_complete": True}
        return stats, {"shards_redone": len(redone), "skipped": False}


def _resizer(cfg):
    import os
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.resizer import Resizer       # the downloads' own resizing, for the same stored size
    return Resizer(image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
                   encode_quality=cfg.encode_quality, max_image_area=float(cfg.max_image_pixels))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _pack_shard(cfg, sid: str, records: list[dict], images: Path, resizer) -> None:
    """One shard as img2dataset writes it: tar and parquet, then `_stats.json` (the shard is complete)."""
    import pyarrow.parquet as pq
    from pipeline.files import atomic_output, write_json_atomic
    status, errors, keys, failed_dl, failed_resize = [], [], [], 0, 0
    with atomic_output(cfg.shard_dir / f"{sid}.tar") as tmp, tarfile.open(tmp, "w") as tar:
        for i, rec in enumerate(records):
            key = f"{sid}{i:04d}"
            keys.append(key)
            try:      # a captions file may come from anyone: its names stay inside the image folder
                check_relative_path(rec["file_name"], "file_name")
                data = read_regular(images / rec["file_name"], MAX_IMAGE_BYTES, "an image")
            except (OSError, RefusedFile, ShardError) as e:
                failed_dl += 1
                status.append("failed_to_download")
                errors.append(f"unreadable local image: {getattr(e, 'strerror', None) or e}")
                continue
            img, width, height, ow, oh, err = resizer(io.BytesIO(data))
            if err is not None:
                failed_resize += 1
                status.append("failed_to_resize")
                errors.append(f"image decode error: {err}")
                continue
            meta = {"key": key, "status": "success", "image_id": rec["image_id"], "file_name": rec["file_name"],
                    "caption": rec["captions"][0], "captions": rec["captions"], "width": width, "height": height,
                    "original_width": ow, "original_height": oh}
            _add(tar, f"{key}.jpg", img)
            _add(tar, f"{key}.txt", rec["captions"][0].encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            status.append("success")
            errors.append(None)
    pq.write_table(pa.table({"key": keys, "status": status, "error_message": errors}), cfg.shard_dir / f"{sid}.parquet")
    successes = status.count("success")
    write_json_atomic(cfg.shard_dir / f"{sid}_stats.json",
                      {"count": len(records), "successes": successes, "failed_to_download": failed_dl,
                       "failed_to_resize": failed_resize, "status_dict": dict(Counter(status))})
