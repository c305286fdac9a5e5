"""Shared fixtures: a YFCC-format fixture data set with every bad-input case, a loopback image server
with injected faults, and one real img2dataset build of it shared by the builder tests."""
from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

LICENSE = "Attribution-NonCommercial License"


def meta_line(lineno: int, photoid, phash: str, title: str, desc: str, url: str, marker: str = "0",
              ncols: int = 25) -> bytes:
    """One Webscope metadata row: the 25 tab-separated columns of yfcc100m_dataset."""
    f = [str(lineno), str(photoid), phash, "12345@N00", "nick", "2010-01-01 00:00:00.0", "1262304000",
         "Canon+EOS", title, desc, "tag1,tag2", "", "", "", "", f"http://www.flickr.com/photos/x/{photoid}/",
         url, LICENSE, "http://creativecommons.org/licenses/by-nc/2.0/", "1", "2", "abc", "def", "jpg", marker]
    return ("\t".join(f[:ncols]) + "\n").encode()


def jpeg(w: int, h: int, seed: int) -> bytes:
    from PIL import Image, ImageDraw
    rnd = random.Random(seed)
    img = Image.new("RGB", (w, h), tuple(rnd.randrange(256) for _ in range(3)))
    ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


@dataclass
class Fixture:
    root: Path
    metadata: Path
    subset: Path
    server: object
    expected: dict = field(default_factory=dict)   # photoid -> (title, description, txt) after cleaning
    faults: dict = field(default_factory=dict)     # photoid -> fault kind (in subset, must fail download)
    lines: dict = field(default_factory=dict)      # reason -> metadata line numbers that must be counted


def make_fixture(root: Path, server_factory) -> Fixture:
    """Metadata + subset exercising every cleaning rule and bad-input case, images served over HTTP."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    server = server_factory(img_dir)
    fx = Fixture(root, root / "yfcc100m_dataset.tsv", root / "yfcc100m_subset_data.tsv", server)
    rows: list[bytes] = []
    subset: list[int] = []

    def add(pid, title, desc, url, marker="0", in_subset=True, ncols=25, raw: bytes | None = None):
        lineno = len(rows) + 1
        rows.append(raw if raw is not None else meta_line(lineno, pid, f"{pid:x}", title, desc, url, marker, ncols))
        if in_subset:
            subset.append(pid)
        return lineno

    def image(pid, w, h):
        (img_dir / f"{pid}.jpg").write_bytes(jpeg(w, h, pid))
        return server.url(f"{pid}.jpg")

    # cleaning rules, each with its exact expected text
    long_desc = "word " * 700
    cases = [
        ("Red+Bus", "A+%3Cb%3Ebig%3C%2Fb%3E+bus+http%3A%2F%2Fflic.kr%2Fp%2Fx", "Red Bus", "A big bus"),
        ("caf%C3%83%C2%A9+au+lait", "", "café au lait", ""),
        ("", "line+one%0A%0Aline%09two%01+end%0D%0A", "", "line one line two end"),
        ("%3Ca+href%3D%22http%3A%2F%2Fx.org%22%3Emy+link%3C%2Fa%3E+www.x.com%2Fpage+text", "Same",
         "my link text", "Same"),
        ("Tom+%26amp%3B+Jerry", "%3Ci%3Eitalic%3C%2Fi%3E%3Cbr%3Enext", "Tom & Jerry", "italic next"),
        ("Long+one", long_desc.replace(" ", "+"), "Long one", ("word " * 200).strip()),
    ]
    for i, (t, d, et, ed) in enumerate(cases):
        pid = 1000 + i
        add(pid, t, d, image(pid, 80 + 10 * i, 60 + 25 * i))
        fx.expected[pid] = (et, ed)
    fx.lines["caption_truncated"] = [len(rows)]
    # plain rows to fill several shards, varied sizes and aspect ratios
    for i in range(22):
        pid = 2000 + i
        add(pid, f"photo+{i}", f"description+number+{i}", image(pid, 40 + 13 * i, 200 - 5 * i))
        fx.expected[pid] = (f"photo {i}", f"description number {i}")
    # download faults: in the subset, with captions; each must fail with its own reason
    for i, kind in enumerate(["404", "500", "hang", "corrupt", "not_image", "bomb"]):
        pid = 3000 + i
        add(pid, f"fault+{kind}", "", server.fault_url(kind, f"{pid}.jpg"))
        fx.faults[pid] = kind
    # selection faults, each counted by reason
    fx.lines["malformed"] = [add(4000, "too+few", "columns", image(4000, 50, 50), ncols=20)]
    bad = meta_line(len(rows) + 1, 4001, "fa1", "caf\xe9", "", image(4001, 50, 50)).replace(b"caf", b"caf\xe9\xff")
    fx.lines["non_utf8"] = [add(4001, "", "", "", raw=bad)]
    fx.lines["no_caption"] = [add(4002, "%3Cb%3E%3C%2Fb%3E", "http%3A%2F%2Fonly.url", image(4002, 50, 50))]
    fx.lines["video"] = [add(4003, "a+video", "", image(4003, 50, 50), marker="1")]
    add(4004, "not+in+subset", "", image(4004, 50, 50), in_subset=False)
    fx.lines["rejected_url"] = [add(4005, "ftp+photo", "", "ftp://127.0.0.1/x.jpg"),
                                add(4006, "file+photo", "", "file:///etc/passwd")]
    fx.lines["duplicate_photo"] = [add(1000, "Red+Bus", "again", image(1000, 80, 60), in_subset=False)]
    fx.metadata.write_bytes(b"".join(rows))
    subset += [1001, 2005, 9001, 9002]   # two duplicates, two ids the metadata lacks
    fx.subset.write_text("".join(f"{n}\t{pid}\t{pid:x}\n" for n, pid in enumerate(subset, 1)))
    return fx


@pytest.fixture(scope="session")
def image_server(tmp_path_factory):
    from demokit.http_server import ImageServer
    servers = []

    def factory(root):
        s = ImageServer(root, hang_seconds=20).start()
        servers.append(s)
        return s
    yield factory
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def yfcc_fixture(tmp_path_factory, image_server) -> Fixture:
    return make_fixture(tmp_path_factory.mktemp("yfcc"), image_server)


def fixture_config(fx: Fixture, out: Path, **overrides):
    from pipeline.build import BuildConfig
    kw = dict(metadata=fx.metadata, subset=fx.subset, out=out, name="fixture", manifest_dir=out / "manifests",
              url_template="{download_url}", processes=2, threads=4, image_size=64, shard_size=8,
              shards_per_part=1, timeout=2, max_caption_chars=1000, max_image_pixels=4_000_000, progress=False,
              allow_private_network=True)   # the fixture's images come from a loopback server
    kw.update(overrides)
    return BuildConfig(**kw)


@pytest.fixture(scope="session")
def built(yfcc_fixture, tmp_path_factory):
    """One real build of the fixture (img2dataset, 2 processes) shared by many asserts."""
    from pipeline.build import build
    out = tmp_path_factory.mktemp("build")
    cfg = fixture_config(yfcc_fixture, out)
    return cfg, build(cfg)


@pytest.fixture
def one_thread():
    """Tiny matmuls: threads only add contention (and seconds) on a shared machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
