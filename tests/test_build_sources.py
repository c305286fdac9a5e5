"""tools/build_shards.py on the published formats, for real: a CC3M-format headerless TSV whose
images come from a loopback HTTP server (img2dataset through the preset), and COCO-format captions
with local images (packed without any download), whose five captions all get drawn in training."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import jpeg

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
SMALL = ["--processes", "1", "--threads", "4", "--image-size", "64", "--shard-size", "8", "--timeout", "2",
         "--no-progress"]


def build_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "build_shards.py"), *args, *SMALL],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


def tar_samples(shard_dir: Path) -> dict[str, dict]:
    from pipeline.shards import iter_tar_samples
    out = {}
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as t:
            for key, parts in iter_tar_samples(t):
                out[key] = {ext: t.extractfile(m).read() for ext, m in parts.items()}
    return out


@pytest.fixture(scope="session")
def cc3m(image_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("cc3m")
    images = root / "images"
    images.mkdir()
    server = image_server(images)
    rows, want = [], {}
    for i in range(10):
        (images / f"{i}.jpg").write_bytes(jpeg(90 + 7 * i, 70, i))
        caption = f'a "quoted" photo & number {i}'       # quotes and ampersands as the published file has them
        rows.append(f"{caption}\t{server.url(f'{i}.jpg')}")
        want[server.url(f"{i}.jpg")] = caption
    rows += [f"gone\t{server.url('missing.jpg')}",        # http_404: links die
             f"   \t{server.url('0.jpg')}",               # no_caption
             f"ftp photo\tftp://127.0.0.1/x.jpg",          # not http(s): refused before any download
             "a row without a url"]                        # malformed (one column)
    tsv = root / "Train_GCC-training.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    out = root / "out"
    proc = build_cli("--preset", "cc3m", "--url-list", str(tsv), "--out", str(out), "--manifest-dir", str(out / "m"),
                     "--allow-private-network")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, want


def test_cc3m_tsv_builds_through_the_preset(cc3m):
    from pipeline.manifest import load_manifest
    out, want = cc3m
    m = load_manifest(out / "m" / "cc3m.json")
    assert m.total_samples == 10 and m.caption_fields == ["txt"]
    samples = tar_samples(out / "shards")
    got = {json.loads(s["json"])["url"]: s["txt"].decode() for s in samples.values()}
    assert got == want                                     # every caption exactly as published
    counts = m.stats["select"]["counts"]
    assert counts["rows_read"] == 13 and counts["no_caption"] == 1 and counts["malformed"] == 1
    assert sum(v for k, v in counts.items() if "url" in k or "scheme" in k) == 1, counts
    assert m.stats["download"]["failures"] == {"http_404": 1}
    assert m.stats["download"]["attempted"] == 11 and m.stats["download"]["downloaded"] == 10


@pytest.fixture(scope="session")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "train2017").mkdir()
    images, annotations = [], []
    for i in range(1, 8):
        name = f"{i:012d}.jpg"
        if i != 6:                                         # image 6 is listed but its file is missing
            (root / "train2017" / name).write_bytes(jpeg(200 + 10 * i, 150, i))
        images.append({"id": i, "file_name": name, "width": 200, "height": 150})
        if i != 7:                                         # image 7 has no caption
            annotations += [{"id": 100 * i + c, "image_id": i, "caption": f"image {i} caption {c}\n"} for c in range(5)]
    images.append({"id": 8, "file_name": "../captions_train2017.json"})       # a name outside the folder: refused
    annotations += [{"id": 800 + c, "image_id": 8, "caption": f"image 8 caption {c}"} for c in range(5)]
    captions = root / "captions_train2017.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations[::-1]}))
    out = root / "out"
    env_proxy = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}   # no network needed
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_shards.py"), "--preset", "coco", "--images",
                           str(root / "train2017"), "--captions", str(captions), "--out", str(out),
                           "--manifest-dir", str(out / "m"), *SMALL, "--shard-size", "4"],
                          capture_output=True, text=True, cwd=ROOT, env={**ENV, **env_proxy}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_coco_builds_from_local_files_with_every_caption(coco):
    from pipeline.manifest import load_manifest
    m = load_manifest(coco / "m" / "coco.json")
    assert m.total_samples == 5 and [s.samples for s in m.shards] == [4, 1]
    assert m.caption_fields == ["captions", "txt"]
    assert not (coco / "download").exists() and not (coco / "parquet").exists()      # nothing downloaded
    assert m.stats["select"]["counts"]["no_caption"] == 1
    dl = m.stats["download"]
    assert (dl["attempted"], dl["downloaded"], dl["failed_to_download"]) == (7, 5, 2)
    assert dl["failures"] == {"unreadable_local_image": 2}
    for s in tar_samples(coco / "shards").values():
        meta = json.loads(s["json"])
        i = meta["image_id"]
        assert meta["captions"] == [f"image {i} caption {c}" for c in range(5)]     # all kept, tidied
        assert s["txt"].decode() == meta["captions"][0]
        assert min(meta["width"], meta["height"]) == 64                              # the builder's stored size


def test_coco_rerun_is_a_noop_and_all_five_captions_get_drawn(coco):
    from pipeline.build import BuildConfig, build
    from pipeline.loader import SLIPLoader
    from pipeline.manifest import load_manifest
    from pipeline.recipe import AugmentationRecipe
    from pipeline.sources import CocoSource
    from shard_testing import chars
    before = {p.name: p.stat().st_mtime_ns for p in (coco / "shards").glob("*.tar")}
    root = coco.parent
    build(BuildConfig(out=coco, source=CocoSource(root / "train2017", root / "captions_train2017.json"), name="coco",
                      manifest_dir=coco / "m", image_size=64, shard_size=4, processes=1, progress=False))
    assert {p.name: p.stat().st_mtime_ns for p in (coco / "shards").glob("*.tar")} == before
    m = load_manifest(coco / "m" / "coco.json")
    loader = SLIPLoader(m, AugmentationRecipe(image_size=32, num_ssl_views=0), 5, chars, backend="pillow")
    drawn: dict[int, set] = {}
    for epoch in range(40):                # seeded: the same draws every run
        plan = loader.make_batch(epoch, 0)
        for index, tokens in zip(plan.indices, plan.tokens):
            text = "".join(map(chr, tokens[tokens > 0]))
            drawn.setdefault(json.loads(loader.reader.meta(int(index)))["image_id"], set()).add(text)
    assert {i: len(t) for i, t in drawn.items()} == {i: 5 for i in (1, 2, 3, 4, 5)}
    assert all(t == {f"image {i} caption {c}" for c in range(5)} for i, t in drawn.items())
    assert np.unique([plan.indices for plan in [loader.make_batch(0, 0)]]).size == 5


@pytest.mark.parametrize("mode", ["random", "reference", "title", "description"])
def test_a_source_without_the_choice_uses_its_caption(cc3m, mode):
    """caption_mode keeps its meaning where a source has title and description; CC3M has one
    caption, which every mode uses: no error, never an empty caption."""
    from pipeline.loader import SLIPLoader
    from pipeline.manifest import load_manifest
    from pipeline.recipe import AugmentationRecipe
    from shard_testing import chars
    out, want = cc3m
    loader = SLIPLoader(load_manifest(out / "m" / "cc3m.json"), AugmentationRecipe(image_size=32, num_ssl_views=0),
                        10, chars, backend="pillow", caption_mode=mode)
    plan = loader.make_batch(0, 0)
    texts = {"".join(map(chr, t[t > 0])) for t in plan.tokens}
    assert texts == set(want.values())


def test_redcaps_and_headerless_lists_select_their_rows(tmp_path):
    """The select stage alone (no download): RedCaps keeps each sample's subreddit; a headerless
    csv names its columns; a list without the caption column is one line naming the columns."""
    import pyarrow.parquet as pq
    from pipeline.build import BuildConfig, select_stage
    from pipeline.metadata import InputError
    from pipeline.sources import PRESETS, UrlListSource
    ann = tmp_path / "annotations"
    ann.mkdir()
    for sub in ("pics", "cats"):
        (ann / f"{sub}_2019.json").write_text(json.dumps({"info": {}, "annotations": [
            {"image_id": f"{sub}{i}", "url": f"https://i.redd.it/{sub}{i}.jpg", "caption": f"my {sub} {i}",
             "raw_caption": f"My {sub.upper()} {i}!!", "subreddit": sub} for i in range(3)] + [
            {"image_id": "x", "url": "https://i.redd.it/x.jpg", "caption": "", "subreddit": sub}]}))
    cfg = BuildConfig(out=tmp_path / "rc", source=UrlListSource(ann, **PRESETS["redcaps"]), progress=False)
    stats = select_stage(cfg)
    assert stats["selected"] == 6 and stats["counts"]["no_caption"] == 2 and stats["counts"]["rows_read"] == 8
    rows = pq.read_table(cfg.parquet_dir).to_pylist()
    assert {(r["subreddit"], r["caption"]) for r in rows} == {(s, f"my {s} {i}") for s in ("pics", "cats")
                                                              for i in range(3)}
    lst = tmp_path / "list.csv"
    lst.write_text('https://example.com/a.jpg,"a, quoted caption",cc-by\nhttps://example.com/b.jpg,plain,cc0\n')
    cfg = BuildConfig(out=tmp_path / "csv", source=UrlListSource(lst, "csv", columns=("url", "caption", "license"),
                                                                  extra_columns=("license",)), progress=False)
    assert select_stage(cfg)["selected"] == 2
    assert pq.read_table(cfg.parquet_dir).to_pylist()[0] == {"url": "https://example.com/a.jpg",
                                                             "caption": "a, quoted caption", "license": "cc-by"}
    with pytest.raises(InputError, match="no column 'url'.*needs --columns"):
        select_stage(BuildConfig(out=tmp_path / "bad", source=UrlListSource(lst, "csv"), progress=False))


def test_a_missing_list_is_one_line(tmp_path):
    proc = build_cli("--preset", "cc12m", "--url-list", str(tmp_path / "cc12m.tsv"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'cc12m.tsv'}: no such file"


def test_coco_rerun_with_other_settings_is_refused(coco):
    """Shards resume by id, so a rerun that would pack differently must not mix with the old shards."""
    root = coco.parent
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_shards.py"), "--preset", "coco", "--images",
                           str(root / "train2017"), "--captions", str(root / "captions_train2017.json"), "--out",
                           str(coco), "--manifest-dir", str(coco / "m"), *SMALL, "--shard-size", "3"],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode != 0 and "already holds shards built with other settings" in proc.stderr, proc.stderr
    assert sorted(p.name for p in (coco / "shards").glob("*.tar")) == ["00000.tar", "00001.tar"]
