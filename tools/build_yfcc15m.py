"""Build YFCC15M (or the synthetic demo) into webdataset shards + DALI indexes + a result manifest.

    python tools/build_yfcc15m.py --metadata yfcc100m_dataset.bz2 --subset yfcc100m_subset_data.tsv.bz2 \\
        --out /data/yfcc15m [--processes 16 --threads 64 --image-size 320 ...]
    python tools/build_yfcc15m.py --demo --out DIR [--demo-samples 4000 --demo-eval-per-class 40]

Rerun the same command after a kill to resume. Stages and options: pipeline/build.py. Inputs that
cannot be used (missing, empty, the wrong file) and builds that would hold no sample end with one
`error:` line and exit status 2.

Network policy: only http(s) URLs without credentials whose hosts are public addresses are
fetched, redirects included; `--allow-private-network` also allows loopback, private and other
local addresses (`--demo` sets it: its images come from a loopback server). One download is
limited to `--max-download-bytes` of body and `--max-download-seconds` in all.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline.build import BuildConfig, build  # noqa: E402
from pipeline.build_lock import BuildLock  # noqa: E402
from pipeline.build_options import add_build_options, build_config, run_build  # noqa: E402
from pipeline.cli import run_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metadata", type=Path, help="yfcc100m_dataset TSV (plain/.bz2) or SQLite file")
    p.add_argument("--subset", type=Path, help="yfcc100m_subset_data.tsv (plain/.bz2)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-progress", action="store_true")
    add_build_options(p)
    g = p.add_argument_group("demo")
    g.add_argument("--demo", action="store_true", help="generate and build the synthetic demo data set")
    g.add_argument("--demo-samples", type=int, default=4000)
    g.add_argument("--demo-eval-per-class", type=int, default=40)
    g.add_argument("--demo-seed", type=int, default=0)
    g.add_argument("--demo-design", choices=("colour", "structure", "groups"), default="groups",
                   help="groups (default): pattern x shape classes, 2-4 copies of the object per image, colour a "
                        "nuisance, Flickr-noisy captions; structure: the same with one large object; colour: the "
                        "first demo data, colour x shape classes, exact captions (docs/DEMO.md)")
    g.add_argument("--demo-clean-captions", action="store_true",
                   help="every demo title and description names the class exactly (the caption-noise study's control)")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace, **fixed) -> BuildConfig:
    fixed.setdefault("metadata", a.metadata)
    fixed.setdefault("subset", a.subset)
    return build_config(a, **fixed)


def run_demo(a: argparse.Namespace):
    with BuildLock(a.out):      # before the source data and the server: a second builder refuses first
        return _run_demo(a)


def _run_demo(a: argparse.Namespace):
    from demokit.data import DemoDataConfig, demo_url_template, generate
    from demokit.http_server import ImageServer
    meta, subset = generate(DemoDataConfig(out=a.out, samples=a.demo_samples, eval_per_class=a.demo_eval_per_class,
                                           seed=a.demo_seed, noisy_captions=not a.demo_clean_captions,
                                           design=a.demo_design))
    port_file = a.out / "source" / "server_port"
    try:   # same port as last time, so a resumed build keeps the same URLs (and shards)
        server = ImageServer(a.out / "source" / "images", port=int(port_file.read_text()))
    except (OSError, ValueError):
        server = ImageServer(a.out / "source" / "images")
    port_file.write_text(str(server.port))
    demo_defaults = dict(name="demo", manifest_dir=a.out / "manifests", image_size=128, shard_size=500,
                         processes=2, threads=16, timeout=5)
    fixed = {k: v for k, v in demo_defaults.items() if getattr(a, k) is None}
    with server:
        return build(config_from_args(a, metadata=meta, subset=subset, url_template=demo_url_template(server.base_url),
                                      allow_private_network=True, **fixed))


def main(argv=None) -> int:
    a = parse_args(argv)
    if not a.demo and a.metadata is None:
        raise SystemExit("--metadata is required (or --demo)")
    return run_build(lambda: run_demo(a) if a.demo else build(config_from_args(a)))


if __name__ == "__main__":   # img2dataset uses multiprocessing "spawn"
    sys.exit(run_main(main))
