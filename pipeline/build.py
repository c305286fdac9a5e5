"""The shard builder: metadata -> parquet manifest -> img2dataset -> shards + result manifest.

Built for YFCC15M (tools/build_yfcc15m.py); with `BuildConfig.source` the same stages read a URL
list instead (CC3M, CC12M, RedCaps, any csv/tsv/parquet/json-lines list), or pack local images
(COCO Captions, no download): pipeline/sources.py, tools/build_shards.py.

Stages (each resumable; kill the build at any point and rerun the same command):

1. **select**: stream the metadata, keep photos in the subset, clean captions, build URLs, write
   `OUT/parquet/part-NNNNN.parquet` (rows per part = a multiple of the shard size, so img2dataset
   makes no partial shards mid-way). Marker `OUT/state/select.json` (stats + a settings
   fingerprint) is written last; without it the stage reruns from scratch (it is deterministic).
2. **download**: img2dataset (parquet in, webdataset out) into this run's own directory
   `OUT/download/gen-<generation>-<token>/`; each shard its workers finish is moved into
   `OUT/shards/` while the run lives (tar, parquet, then `NNNNN_stats.json`: a stats file in
   `OUT/shards/` marks an accepted shard). Shards already accepted are skipped; before the run,
   every accepted shard's tar is checked (complete tar, sample count = stats) and a bad one is
   deleted so it is redone.
3. **finalize**: per tar, in a thread pool: its DALI index (wds2idx; an index kept from an earlier
   run is used only if it lists exactly this tar's members), sha256s of tar and index, and a
   decode-verification of every image (pipeline/verify.py; cached in `OUT/state/verified/` by
   the tar's sha256, so a rerun does not decode again). Then the result manifest
   `manifests/<name>.json` and a copy `OUT/shards/manifest.json`, with the images that failed
   verification listed per shard (`bad_samples`: the loader skips them unread), and a summary.

A build that would produce nothing (empty or wrong input files, nothing selected, every download
failed) stops with one line saying so (`InputError` / `BuildError`), never a manifest of 0
samples and a success.

Network policy and limits (pipeline/netpolicy.py, pipeline/fetch.py): only `http(s)` URLs without
credentials, to hosts that are not and do not resolve to loopback, private, link-local,
multicast, reserved or unspecified addresses, are selected (the others are counted by reason);
the download checks the same again on the address it connects to and on every redirect, and
ends a download after `max_download_bytes` of body or `max_download_seconds` in all (counted as
`download_too_large` / `download_too_slow`). `allow_private_network` lifts the address rule only
(the demo needs it: its images come from a loopback server).

At the end, the manifest's verification record (`<name>.verified.json` beside each copy of the
manifest, pipeline/integrity.py) says the shards were verified now, from the checksums just
computed.

Killed at any point, whatever was killed (the main process alone, one img2dataset worker, the
whole process group), one rerun of the same command finishes the build with exactly the samples
of an uninterrupted one, no duplicates. How (pipeline/build_lock.py, pipeline/download_run.py):

- one builder per output directory: a lock file made atomically in `OUT/state/lock/` (a hard
  link, which also holds on NFS); a second builder refuses with one line naming the first's host
  and PID. A lock whose process on this host is gone is superseded, never deleted and retaken.
- fencing: a SIGKILLed main process leaves its img2dataset workers running (they outlive it, as
  after an OOM kill). They can only write into their own run's download directory, which no
  later run reads: the rerun deletes it and downloads every shard the killed run had not
  accepted, even the ones its orphans finished afterwards (as failures, say, once the image
  server died with it). `stats.download.shards_redone_on_resume` counts these shards, those that
  an interrupted run had started and a later run downloaded again.
- a killed worker: multiprocessing would wait forever for its shard; the run notices, stops the
  download, and ends with one line (`error: img2dataset worker PID ... was killed ...; rerun the
  same command`), its finished shards kept. Ctrl-C during the download ends the same way.

Resize default: `keep_ratio` with the shorter side at 320 px and `resize_only_if_bigger`: training
crops 224 px (RandomResizedCrop scale 0.08-1 / 0.5-1) keep enough resolution, while a 320 px JPEG
has far fewer pixels to decode than a full 500x375 Flickr "medium" image, and smaller images are
never upscaled (no wasted bytes, no interpolation blur).

Multi-machine builds: `distributor="ray"` runs the download as one Ray task per shard on a
cluster started with `ray start` (pipeline/distributed_download.py; the SLURM recipe is in the
README and docs/DISTRIBUTED_BUILD.md). Every node must see OUT at the same path on a shared POSIX
file system (NFS, Lustre, GPFS): the shard checks, the finalize stage and the resume logic read
local paths, so object-store URLs (s3://...) are not supported as OUT.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.build_errors import BuildError
from pipeline.build_lock import BuildLock
from pipeline.captions import clean_caption, join_caption, truncate
from pipeline.distributed_download import check_distributor, download_engine, worker_env
from pipeline.fetch import DownloadPolicy
from pipeline.integrity import verification_path, verified_by_build
from pipeline.manifest import Manifest, ShardEntry, save_manifest
from pipeline.metadata import InputError, ScanStats, SubsetIds, read_metadata
from pipeline.download_run import (DownloadRun, Promoter, ResumeLedger, check_shards, done_ids,  # noqa: F401
                                   remove_incomplete, stats_files)    # check_shards: the tests' API
from pipeline.files import write_json_atomic
from pipeline.netpolicy import UrlChecker
from pipeline.sources import CocoSource, UrlListSource  # noqa: F401  (BuildConfig.source's types)
from pipeline.regular_files import is_regular
from pipeline.shards import file_sha256, write_index
from pipeline.verify import index_matches, verify_images

MIRROR_TEMPLATE = "https://multimedia-commons.s3-us-west-2.amazonaws.com/data/images/{hash[0:3]}/{hash[3:6]}/{hash}.jpg"
EXTRA_COLUMNS = ["photoid", "title", "description", "license"]
VERIFY_VERSION = 1       # bump when the verification rule changes: cached results are then redone


PARQUET_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("photoid", pa.int64()),
                            ("title", pa.string()), ("description", pa.string()), ("license", pa.string())])


@dataclass
class BuildConfig:
    out: Path                            # OUT/parquet, OUT/shards, OUT/state
    metadata: Path | None = None         # yfcc100m_dataset TSV (plain / .bz2) or the SQLite file
    subset: Path | None = None           # yfcc100m_subset_data.tsv (plain / .bz2); None = every photo
    # another source instead of the YFCC metadata (pipeline/sources.py): a URL list, or local
    # images with their captions (COCO)
    source: "UrlListSource | CocoSource | None" = None
    name: str = "yfcc15m"                # manifest name: <manifest_dir>/<name>.json
    manifest_dir: Path = Path("manifests")
    # selection
    url_template: str = MIRROR_TEMPLATE  # fields: {hash} {photoid} {download_url} {ext}, slices {hash[0:3]}
    limit: int | None = None             # keep at most this many rows (trial builds)
    sample_fraction: float = 1.0         # keep a deterministic pseudo-random fraction of photo ids
    max_caption_chars: int = 1000        # longer titles/descriptions are cut at a word boundary
    # download (img2dataset)
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads: int = 64
    image_size: int = 320
    resize_mode: str = "keep_ratio"      # img2dataset: no, border, keep_ratio, keep_ratio_largest, center_crop
    resize_only_if_bigger: bool = True
    encode_quality: int = 90
    shard_size: int = 10_000
    shards_per_part: int = 10            # parquet part = shard_size * shards_per_part rows
    timeout: int = 10                    # seconds one socket operation may wait
    retries: int = 0
    max_download_bytes: int = 50_000_000 # body bytes of one download; more is a failure (download_too_large)
    max_download_seconds: float = 60.0   # one download in all, redirects included (download_too_slow)
    allow_private_network: bool = False  # fetch from loopback/private/link-local... addresses (never non-http)
    max_image_pixels: int = 89_478_485   # decompression-bomb guard (PIL's default limit), before decode
    distributor: str = "multiprocessing" # or "ray" (see module docstring)
    ray_address: str = "auto"            # distributor ray: "auto" (`ray start` on this machine) or HOST:PORT
    progress: bool = True
    scan_threads: int | None = None      # cores decompressing a bz2 metadata file (None: all); same rows either way

    def __post_init__(self):
        if (self.metadata is None) == (self.source is None):
            raise ValueError("give the YFCC metadata or another source (a URL list, COCO), one of the two")
        self.metadata = Path(self.metadata) if self.metadata is not None else None
        self.subset = Path(self.subset) if self.subset is not None else None
        self.out, self.manifest_dir = Path(self.out), Path(self.manifest_dir)
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.max_download_bytes < 1 or not self.max_download_seconds > 0:
            raise ValueError(f"max_download_bytes and max_download_seconds must be > 0, got "
                             f"{self.max_download_bytes} and {self.max_download_seconds}")
        format_url(self.url_template, photoid=1, hash="0" * 32, download_url="http://x/y.jpg", ext="jpg")
        check_distributor(self.distributor)

    @property
    def parquet_dir(self) -> Path:
        return self.out / "parquet"

    @property
    def shard_dir(self) -> Path:
        return self.out / "shards"

    @property
    def state_dir(self) -> Path:
        return self.out / "state"

    @property
    def parquet_schema(self) -> pa.Schema:
        return PARQUET_SCHEMA if self.source is None else self.source.parquet_schema

    @property
    def extra_columns(self) -> list[str]:
        """The columns img2dataset keeps in each sample's json."""
        return EXTRA_COLUMNS if self.source is None else list(self.source.extra_columns)

    @property
    def caption_fields(self) -> list[str]:
        return ["description", "title", "txt"] if self.source is None else self.source.caption_fields

    def selection_fingerprint(self) -> dict:
        """Everything that decides the parquet rows (and so every shard's content and keys)."""
        def file_id(p):
            return None if p is None else {"path": str(Path(p).resolve()), "size": Path(p).stat().st_size}
        fingerprint = {"metadata": file_id(self.metadata), "subset": file_id(self.subset),
                       "url_template": self.url_template, "limit": self.limit, "sample_fraction": self.sample_fraction,
                       "max_caption_chars": self.max_caption_chars, "part_rows": self.shard_size * self.shards_per_part}
        if self.source is not None:         # only then: YFCC builds keep their fingerprint
            fingerprint["source"] = self.source.fingerprint()
        if self.allow_private_network:     # only when set: builds made before the option keep their fingerprint
            fingerprint["allow_private_network"] = True
        return fingerprint

    def download_policy(self) -> DownloadPolicy:
        return DownloadPolicy(allow_private=self.allow_private_network, max_bytes=self.max_download_bytes,
                              max_seconds=self.max_download_seconds)


_FIELD = re.compile(r"\{(\w+)(?:\[(-?\d*):(-?\d*)\])?\}")


def format_url(template: str, **fields) -> str:
    """`{name}` or `{name[a:b]}` substituted from fields (str.format cannot slice)."""
    out = []
    for literal, name, a, b in _template_parts(template):
        out.append(literal)
        if name is None:
            continue
        if name not in fields:
            raise ValueError(f"url template {template!r}: unknown field {name!r} (known: {sorted(fields)})")
        v = str(fields[name])
        out.append(v if a is None else v[a[0]:b[0]])
    return "".join(out)


@functools.lru_cache(maxsize=16)
def _template_parts(template: str) -> tuple:
    """(literal text, field name or None, (start,) or None, (end,) or None) pieces of a URL template,
    parsed once per template instead of once per row."""
    parts, pos = [], 0
    for m in _FIELD.finditer(template):
        sliced = not (m.group(2) is None and m.group(3) is None and "[" not in m.group(0))
        a, b = m.group(2), m.group(3)
        parts.append((template[pos:m.start()], m.group(1),
                      (int(a) if a else None,) if sliced else None, (int(b) if b else None,) if sliced else None))
        pos = m.end()
    parts.append((template[pos:], None, None, None))
    return tuple(parts)


def sampled(photoid: int, fraction: float) -> bool:
    """Deterministic per-photo coin (Fibonacci hashing), so trial builds are reproducible."""
    return fraction >= 1.0 or ((photoid * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) < fraction * 2 ** 64


# ---------------------------------------------------------------- stage 1: select -> parquet parts

def select_stage(cfg: BuildConfig) -> dict:
    """Stream the source's rows -> cleaned rows under the network policy -> parquet parts. Returns
    the selection stats."""
    inputs = (cfg.metadata, cfg.subset) if cfg.source is None else cfg.source.inputs()
    for path in inputs:
        if path is not None and not path.exists():
            raise InputError(f"{path}: no such file")
        if path is not None and not (is_regular(path) or path.is_dir() and cfg.source is not None):
            raise InputError(f"{path}: not a regular file")
    marker = cfg.state_dir / "select.json"
    fingerprint = cfg.selection_fingerprint()
    if marker.exists():
        done = json.loads(marker.read_text())
        if done["fingerprint"] == fingerprint:
            return done["stats"]
        if any(cfg.shard_dir.glob("*.tar")):
            raise InputError(f"{cfg.out}: already holds shards built with other selection settings "
                             f"({marker}); use a new --out or delete it")
    shutil.rmtree(cfg.parquet_dir, ignore_errors=True)
    (cfg.state_dir / "resume.json").unlink(missing_ok=True)      # shard ids of another selection
    cfg.parquet_dir.mkdir(parents=True)
    t0 = time.time()
    scan = ScanStats()
    part_rows = cfg.shard_size * cfg.shards_per_part
    schema = cfg.parquet_schema
    columns: dict[str, list] = {n: [] for n in schema.names}
    parts, kept, complete = 0, 0, True
    url_refused = UrlChecker(cfg.allow_private_network)

    def flush():
        nonlocal parts
        if columns["url"]:
            table = pa.table(columns, schema=schema)
            tmp = cfg.parquet_dir / f".part-{parts:05d}.tmp"
            pq.write_table(table, tmp)
            tmp.replace(cfg.parquet_dir / f"part-{parts:05d}.parquet")
            parts += 1
            for v in columns.values():
                v.clear()

    rows = _yfcc_rows(cfg, scan) if cfg.source is None else cfg.source.rows(scan, cfg.max_caption_chars, cfg.progress)
    for where, url, coin, values in rows:
        refused = url_refused(url)
        if refused is not None:
            scan.add(refused[0], f"{where}: {url[:80]}")
            continue
        if not sampled(coin, cfg.sample_fraction):   # a fraction of the usable rows
            scan.add("sampled_out")
            continue
        columns["url"].append(url)
        for k in schema.names[1:]:
            columns[k].append(values.get(k))
        kept += 1
        if len(columns["url"]) >= part_rows:
            flush()
        if cfg.limit is not None and kept >= cfg.limit:
            complete = False
            break
    flush()
    rows.close()
    stats = {**scan.to_dict(), "selected": kept, "parquet_parts": parts, "scan_complete": complete,
             "select_seconds": round(time.time() - t0, 2)}
    write_json_atomic(marker, {"fingerprint": fingerprint, "stats": stats}, indent=1)
    return stats


def _yfcc_rows(cfg: BuildConfig, scan: ScanStats):
    """(where, url, photo id, parquet values) of each usable YFCC photo: captions cleaned and cut,
    videos and captionless photos counted and left out; the subset ids never found, counted once
    the whole metadata was read."""
    subset = SubsetIds.from_file(cfg.subset, scan, cfg.progress) if cfg.subset is not None else None
    for row in read_metadata(cfg.metadata, subset, scan, cfg.progress, threads=cfg.scan_threads):
        if row.is_video:
            scan.add("video", row.where)
            continue
        title, desc = clean_caption(row.title), clean_caption(row.description)
        if len(title) > cfg.max_caption_chars or len(desc) > cfg.max_caption_chars:
            scan.add("caption_truncated", row.where)
            title, desc = truncate(title, cfg.max_caption_chars), truncate(desc, cfg.max_caption_chars)
        if not title and not desc:
            scan.add("no_caption", row.where)
            continue
        url = format_url(cfg.url_template, hash=row.hash, photoid=row.photoid, download_url=row.download_url,
                         ext=row.ext)
        yield row.where, url, row.photoid, {"caption": join_caption(title, desc), "photoid": row.photoid,
                                            "title": title, "description": desc, "license": row.license}
    if subset is not None:          # reached only when every row was read (not after --limit)
        missing = subset.missing()
        scan.add("missing_from_metadata", n=len(missing))
        scan.examples["missing_from_metadata"] = [f"{cfg.subset}: photo id {i}" for i in missing[:5]]


# ---------------------------------------------------------------- stage 2: download

def download_stage(cfg: BuildConfig, selected: int, lock: BuildLock) -> dict:
    """img2dataset into this run's own directory, finished shards promoted into the shard directory
    (pipeline/download_run.py). Returns {"shards_redone": ..., "skipped": ...}."""
    cfg.shard_dir.mkdir(parents=True, exist_ok=True)
    # img2dataset's incremental mode reads every *.json in the output folder as a shard's stats
    (cfg.shard_dir / "manifest.json").unlink(missing_ok=True)
    verification_path(cfg.shard_dir / "manifest.json").unlink(missing_ok=True)
    shutil.rmtree(cfg.shard_dir / "_tmp", ignore_errors=True)      # left by builders before download runs
    ledger = ResumeLedger(cfg.state_dir / "resume.json")
    run = DownloadRun(cfg.out, lock.generation, lock.token)
    removed = remove_incomplete(cfg.shard_dir)
    done = done_ids(cfg.shard_dir)
    ledger.add_started(removed | (run.earlier_started() - done))     # recorded before the evidence goes
    run.remove_earlier()
    expected = -(-selected // cfg.shard_size) if selected else 0
    marker = cfg.state_dir / "download.json"
    if marker.exists() and not removed and len(done) == expected:
        return {"shards_redone": len(ledger.redone), "skipped": True}
    marker.unlink(missing_ok=True)
    promoter = None
    if selected and len(done) < expected:
        promoter = _download(cfg, run, done, expected, ledger, selected)
    finished = len(done_ids(cfg.shard_dir))
    if promoter is not None and promoter.killed_worker is not None:
        pid, sig = promoter.killed_worker
        raise BuildError(f"img2dataset worker PID {pid} was killed by {signal.Signals(sig).name} (out of memory? "
                         f"then lower --processes or --threads); {finished} of {expected} shards are finished and "
                         f"kept; rerun the same command to download the rest")
    if promoter is not None and promoter.interrupted:
        raise BuildError(f"the download was interrupted; {finished} of {expected} shards are finished and kept; "
                         f"rerun the same command to download the rest")
    if finished != expected:
        raise BuildError(f"{cfg.shard_dir}: img2dataset finished {finished} of {expected} shards (the others failed: "
                         f"see its output above); rerun the same command to download the rest")
    write_json_atomic(marker, {"shards": expected}, indent=1)
    return {"shards_redone": len(ledger.redone), "skipped": False}


def _download(cfg: BuildConfig, run: DownloadRun, done: set[str], expected: int, ledger: ResumeLedger,
              selected: int) -> Promoter:
    """One img2dataset call for the shards not done yet; returns its promoter (what it accepted,
    and whether a worker was killed or the download interrupted)."""
    # checked by OpenCV on the image header, before any pixel buffer is allocated
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(cfg.max_image_pixels)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download
    from pipeline.img2dataset_guard import guarded_img2dataset
    run.prepare(done)
    promoter = Promoter(run, cfg.shard_dir, done, expected, ledger, selected, cfg.progress,
                        watch_workers=cfg.distributor == "multiprocessing")
    sigint = signal.getsignal(signal.SIGINT)       # img2dataset installs its own and never restores it
    try:
        orphans_exit = cfg.distributor == "multiprocessing"      # its workers are this process's children
        with download_engine(cfg.distributor, cfg.ray_address, worker_env(cfg.max_image_pixels), cfg.progress), \
                promoter, guarded_img2dataset(cfg.download_policy(), exit_orphans=orphans_exit):
            download(url_list=str(cfg.parquet_dir), input_format="parquet", url_col="url", caption_col="caption",
                     save_additional_columns=cfg.extra_columns, output_format="webdataset",
                     output_folder=str(run.dir), number_sample_per_shard=cfg.shard_size,
                     processes_count=cfg.processes, thread_count=cfg.threads, image_size=cfg.image_size,
                     resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
                     encode_quality=cfg.encode_quality, timeout=cfg.timeout, retries=cfg.retries,
                     max_image_area=float(cfg.max_image_pixels), incremental_mode="incremental",
                     distributor=cfg.distributor, enable_wandb=False, compute_hash="sha256")
    except SystemExit:             # img2dataset's SIGINT handler: Ctrl-C, or the promoter after a killed worker
        promoter.interrupted = True
    finally:
        signal.signal(signal.SIGINT, sigint)
        ledger.add_started(run.started())
        run.remove()
    return promoter


# ---------------------------------------------------------------- stage 3: finalize

# img2dataset error messages -> short reasons for the manifest
FAILURE_REASONS = [
    (re.compile(r"^unreadable local image"), lambda m: "unreadable_local_image"),      # COCO (pipeline/sources.py)
    (re.compile(r"refused by the network policy: (\w+)"), lambda m: m.group(1)),
    (re.compile(r"over the size limit of \d+ bytes"), lambda m: "download_too_large"),
    (re.compile(r"over the time limit of"), lambda m: "download_too_slow"),
    (re.compile(r"HTTP Error (\d+)"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed? ?out", re.I), lambda m: "timeout"),
    (re.compile(r"image decod|decode|cannot identify|imdecode|truncated", re.I), lambda m: "image_decode_error"),
    (re.compile(r"image area|too large|pixels", re.I), lambda m: "image_too_large"),
    (re.compile(r"Connection|refused|reset|Name or service", re.I), lambda m: "connection_error"),
    (re.compile(r"unknown url type|scheme", re.I), lambda m: "rejected_url"),
]


def failure_reason(message: str) -> str:
    for pattern, name in FAILURE_REASONS:
        if m := pattern.search(message):
            return name(m)
    return "other"


def verified_shard(cfg: BuildConfig, tar: Path, samples: int) -> ShardEntry:
    """The manifest entry of a finished tar: its index (made again if the one there does not list
    this tar), checksums, and the samples whose image fails verification."""
    idx = write_index(tar)
    if not index_matches(idx, tar):
        idx = write_index(tar, force=True)
        if not index_matches(idx, tar):
            raise BuildError(f"{idx}: wds2idx's index does not list the members of {tar} as tarfile reads them; "
                             f"delete both and rerun the same command to download that shard again")
    sha256 = file_sha256(tar)
    cache = cfg.state_dir / "verified" / f"{tar.stem}.json"
    key = {"sha256": sha256, "max_image_pixels": cfg.max_image_pixels, "version": VERIFY_VERSION}
    try:
        done = json.loads(cache.read_text())
        bad = done["bad_samples"] if done["key"] == key else None
    except (OSError, ValueError, KeyError, TypeError):
        bad = None
    if bad is None:
        bad = verify_images(tar, cfg.max_image_pixels)
        write_json_atomic(cache, {"key": key, "bad_samples": bad})
    size = tar.stat().st_size
    return ShardEntry(path=tar.name, samples=samples, bytes=size, sha256=sha256, index=idx.name,
                      index_sha256=file_sha256(idx), index_tar_bytes=size, bad_samples=bad)


def finalize_stage(cfg: BuildConfig, select_stats: dict, download_info: dict) -> Manifest:
    dl, status, errors = Counter(), Counter(), Counter()
    finished = []
    for stats_path in stats_files(cfg.shard_dir):
        s = json.loads(stats_path.read_text())
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            dl[k] += s.get(k, 0)
        status.update(s.get("status_dict", {}))
        sid = stats_path.name.split("_")[0]
        part = cfg.shard_dir / f"{sid}.parquet"
        if part.exists():
            t = pq.read_table(part, columns=["status", "error_message"])
            errors.update(e for st, e in zip(t["status"].to_pylist(), t["error_message"].to_pylist())
                          if st != "success" and e)
        if s.get("successes", 0) == 0:
            dl["empty_shards"] += 1
            continue
        finished.append((cfg.shard_dir / f"{sid}.tar", s["successes"]))
    # reading, hashing and decoding release the GIL: threads share the work without a process pool
    with ThreadPoolExecutor(max(1, cfg.processes), thread_name_prefix="verify") as pool:
        jobs = [pool.submit(verified_shard, cfg, tar, n) for tar, n in finished]
        shards = [job.result() for job in tqdm(jobs, desc="index+verify", unit="shard",
                                               disable=not cfg.progress or len(jobs) < 2)]
    failures = Counter()
    for msg, n in errors.items():
        failures[failure_reason(msg)] += n
    bad = Counter(b["reason"] for s in shards for b in s.bad_samples)
    stats = {
        "select": select_stats,
        "download": {"attempted": dl["count"], "downloaded": dl["successes"],
                     "failed_to_download": dl["failed_to_download"], "failed_to_resize": dl["failed_to_resize"],
                     "failures": dict(failures.most_common()), "errors": dict(errors.most_common(50)),
                     "empty_shards": dl["empty_shards"], "shards_redone_on_resume": download_info["shards_redone"]},
        "verify": {"bad_samples": sum(bad.values()), "reasons": dict(bad.most_common())},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "source"},
    }
    manifest = Manifest(name=cfg.name, root=str(cfg.shard_dir.resolve()), shards=shards, stats=stats,
                        caption_fields=cfg.caption_fields)
    paths = (cfg.manifest_dir / f"{cfg.name}.json", cfg.shard_dir / "manifest.json")
    save_manifest(manifest, *paths)
    for path in paths:         # every tar was hashed just now, by verified_shard
        verified_by_build(path, manifest)
    return manifest


def summary_table(m: Manifest) -> str:
    sel, dl = m.stats["select"], m.stats["download"]
    c = sel["counts"]
    rows = [("metadata rows read", c.get("rows_read", 0))]
    rows += [(f"  dropped: {k}", v) for k, v in c.items() if k not in ("rows_read", "subset_rows")]
    rows += [("subset ids", c.get("subset_rows", 0)), ("selected (parquet rows)", sel["selected"]),
             ("download attempted", dl["attempted"]), ("downloaded", dl["downloaded"])]
    rows += [(f"  failed: {k}", v) for k, v in dl["failures"].items()]
    rows += [("shards", len(m.shards)), ("samples in manifest", m.total_samples),
             ("  failed verification (skipped)", m.stats.get("verify", {}).get("bad_samples", 0)),
             ("bytes", sum(s.bytes for s in m.shards))]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v:>12,}" for k, v in rows)


def build(cfg: BuildConfig) -> Manifest:
    """Run (or resume) all stages, holding the output directory's lock; returns the result manifest."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    with BuildLock(cfg.out) as lock:
        return _build(cfg, lock)


def _build(cfg: BuildConfig, lock: BuildLock) -> Manifest:
    if cfg.source is not None and cfg.source.local:      # local images: packed here, nothing downloaded
        select_stats, download_info = cfg.source.pack(cfg)
        return _finish(cfg, finalize_stage(cfg, select_stats, download_info))
    select_stats = select_stage(cfg)
    if select_stats["selected"] == 0:
        counts = select_stats["counts"]
        dropped = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("rows_read", "subset_rows")) or "none"
        raise BuildError(f"no photo selected from {cfg.metadata or cfg.source.describe()} "
                         f"({counts.get('rows_read', 0)} rows read"
                         + (f", {counts.get('subset_rows', 0)} subset ids in {cfg.subset}" if cfg.subset else "")
                         + f"; dropped: {dropped}): nothing to build")
    download_info = download_stage(cfg, select_stats["selected"], lock)
    return _finish(cfg, finalize_stage(cfg, select_stats, download_info))


def _finish(cfg: BuildConfig, manifest: Manifest) -> Manifest:
    if cfg.progress:
        print(summary_table(manifest), file=sys.stderr)
    if manifest.total_samples == 0:
        dl = manifest.stats["download"]
        raise BuildError(f"none of the {dl['attempted']} downloads succeeded (failures: {dl['failures'] or 'none'}); "
                         f"the errors are listed in {cfg.manifest_dir / (cfg.name + '.json')}")
    return manifest
