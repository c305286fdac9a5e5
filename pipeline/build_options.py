"""The builder's command-line options, shared by tools/build_yfcc15m.py and tools/build_shards.py:
the BuildConfig fields exposed as --flags, and the config made from them."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Callable

from pipeline.build import BuildConfig, BuildError
from pipeline.cli import report
from pipeline.manifest import Manifest, ShardError
from pipeline.metadata import InputError
from pipeline.distributed_download import DISTRIBUTORS

# BuildConfig fields exposed as --flags (name -> help)
OPTIONS = {
    "name": "manifest name (<manifest-dir>/<name>.json)", "manifest_dir": "where <name>.json goes",
    "url_template": "image URL: {hash} {hash[0:3]} {photoid} {ext} or {download_url} (column 16)",
    "limit": "keep at most N rows (trial builds)", "sample_fraction": "keep this deterministic fraction of photos",
    "max_caption_chars": "cut longer titles/descriptions", "processes": "img2dataset processes",
    "threads": "img2dataset threads per process", "image_size": "resize target (px)",
    "resize_mode": "no | border | keep_ratio | keep_ratio_largest | center_crop", "encode_quality": "JPEG quality",
    "shard_size": "samples per shard", "timeout": "download timeout (s)", "retries": "download retries",
    "max_image_pixels": "reject images with more pixels (decompression bombs)",
    "max_download_bytes": "a larger download is a failure", "max_download_seconds": "a slower download is a failure",
    "distributor": "where the downloads run: multiprocessing (this machine) | ray (a cluster, README 'Many machines')",
    "ray_address": "with --distributor ray: auto (the cluster `ray start` began on this machine) or HOST:PORT",
}


def add_build_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    defaults = {f.name: f for f in dataclasses.fields(BuildConfig)}
    for name, help_ in OPTIONS.items():
        if name in skip:
            continue
        f = defaults[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ = {"limit": int, "manifest_dir": Path}.get(name, type(default))
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"{help_} (default {default})",
                       choices=DISTRIBUTORS if name == "distributor" else None)
    p.add_argument("--no-resize-only-if-bigger", action="store_true", help="also upscale small images")
    p.add_argument("--allow-private-network", action="store_true",
                   help="also fetch from loopback, private, link-local... addresses (never non-http URLs)")


def build_config(a: argparse.Namespace, **fixed) -> BuildConfig:
    """The BuildConfig of the parsed options; `fixed` values win over the flags."""
    kw = {k: getattr(a, k) for k in OPTIONS if getattr(a, k, None) is not None}
    kw.update(fixed)
    kw.setdefault("allow_private_network", a.allow_private_network)
    return BuildConfig(out=a.out, progress=not a.no_progress, resize_only_if_bigger=not a.no_resize_only_if_bigger,
                       **kw)


def run_build(make: Callable[[], Manifest]) -> int:
    """Run one build and print its manifest as one JSON line; a bad input or a failed build is one clear
    line and exit status 2 (pipeline/cli.py)."""
    try:
        m = make()
    except (InputError, BuildError, ShardError) as e:
        return report(e, 2)
    print(json.dumps({"manifest": str(Path(m.root) / "manifest.json"), "shards": len(m.shards),
                      "samples": m.total_samples}))
    return 0
