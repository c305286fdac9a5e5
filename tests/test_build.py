"""End-to-end builder tests: real img2dataset through a loopback HTTP server with injected faults."""
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.build import build, check_shards, format_url, select_stage
from pipeline.files import write_json_atomic
from pipeline.manifest import load_manifest
from pipeline.metadata import InputError
from pipeline.shards import iter_tar_samples

from conftest import fixture_config

ROOT = Path(__file__).resolve().parent.parent


def read_samples(manifest):
    """Every sample of every shard: key -> {jpg, txt, json}."""
    samples = {}
    for tar in manifest.shard_paths():
        with tarfile.open(tar) as t:
            for key, parts in iter_tar_samples(t):
                samples[key] = {ext: t.extractfile(m).read() for ext, m in parts.items()}
    return samples


def test_every_sample_exact(built, yfcc_fixture):
    cfg, m = built
    fx = yfcc_fixture
    samples = read_samples(m)
    by_photo = {}
    for key, s in samples.items():
        assert set(s) == {"jpg", "txt", "json"}, key
        meta = json.loads(s["json"])
        assert meta["key"] == key and meta["status"] == "success"
        assert meta["photoid"] not in by_photo, "duplicate sample"
        by_photo[meta["photoid"]] = (s, meta)
        img = Image.open(io.BytesIO(s["jpg"]))
        img.load()
        assert min(img.size) <= 64 and img.mode == "RGB"          # keep_ratio, shorter side <= image_size
        original = (fx.root / "images" / f"{meta['photoid']}.jpg").read_bytes()   # img2dataset hashes the download
        assert meta["sha256"] == hashlib.sha256(original).hexdigest()
        assert (meta["original_width"], meta["original_height"]) == Image.open(io.BytesIO(original)).size
    # exactly the good photos, each with its cleaned title / description / default caption
    assert set(by_photo) == set(fx.expected)
    for pid, (title, desc) in fx.expected.items():
        s, meta = by_photo[pid]
        assert (meta["title"], meta["description"]) == (title, desc)
        assert meta["license"] == "Attribution-NonCommercial License"
        want = title if not desc or desc == title else desc if not title else f"{title}. {desc}"
        assert s["txt"].decode() == want
    # keys are img2dataset's shard-prefixed row numbers, in photo order
    assert sorted(by_photo[p][1]["key"] for p in fx.expected) == sorted(samples)


def test_manifest_files_and_checksums(built):
    cfg, m = built
    assert load_manifest(cfg.manifest_dir / "fixture.json").to_dict() == m.to_dict()
    beside = load_manifest(cfg.shard_dir / "manifest.json")
    assert beside.total_samples == m.total_samples == 28
    assert [p.name for p in beside.shard_paths()] == [s.path for s in m.shards]
    per_shard = {}
    for s in read_samples(m):
        per_shard[s[:5]] = per_shard.get(s[:5], 0) + 1
    for entry, tar, idx in zip(m.shards, m.shard_paths(), m.index_paths()):
        data = tar.read_bytes()
        assert entry.bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
        assert entry.samples == per_shard[tar.stem]
        lines = idx.read_text().split("\n")
        assert lines[0].startswith("v1.2") and int(lines[0].split()[1]) == entry.samples   # DALI index
        # what the loader verifies the index with, and the images verified (img2dataset re-encodes: none bad)
        assert entry.index_sha256 == hashlib.sha256(idx.read_bytes()).hexdigest() and entry.index_tar_bytes == len(data)
        assert entry.bad_samples == []
    assert m.stats["verify"] == {"bad_samples": 0, "reasons": {}}


def test_every_bad_input_counted_with_reason(built, yfcc_fixture):
    cfg, m = built
    fx = yfcc_fixture
    c = m.stats["select"]["counts"]
    ex = m.stats["select"]["examples"]
    for reason, lines in fx.lines.items():
        assert c[reason] == len(lines), reason
        assert [int(e.split(":")[1]) for e in ex[reason]] == lines, reason
    assert c["not_in_subset"] == 1 and c["duplicate_subset_id"] == 2
    assert c["missing_from_metadata"] == 3        # 9001, 9002 and the malformed row's 4000
    assert m.stats["select"]["selected"] == len(fx.expected) + len(fx.faults)
    dl = m.stats["download"]
    assert dl["attempted"] == len(fx.expected) + len(fx.faults) and dl["downloaded"] == len(fx.expected)
    assert dl["failures"] == {"http_404": 1, "http_500": 1, "timeout": 1, "image_decode_error": 2,
                              "image_too_large": 1}
    # the non-http URLs never reached the downloader
    urls = [u for p in sorted(cfg.shard_dir.glob("*.parquet")) for u in
            pq.read_table(p, columns=["url"])["url"].to_pylist()]
    assert urls and all(u.startswith("http://127.0.0.1:") for u in urls)


def test_rerun_is_a_noop(built, yfcc_fixture):
    cfg, m = built
    before = sum(yfcc_fixture.server.requests.values())
    again = build(cfg)
    assert again.shards == m.shards
    assert sum(yfcc_fixture.server.requests.values()) == before    # nothing downloaded again


def test_truncated_shard_is_detected_and_redone(built, yfcc_fixture, tmp_path):
    cfg, m = built
    out = tmp_path / "copy"
    shutil.copytree(cfg.out, out)
    cfg2 = fixture_config(yfcc_fixture, out)
    tar = cfg2.shard_dir / m.shards[1].path
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])     # a kill mid-write
    assert check_shards(cfg2.shard_dir) == 1 and not tar.exists()
    m2 = build(cfg2)
    assert m2.stats["download"]["shards_redone_on_resume"] == 0       # check_shards already removed it
    assert [(s.path, s.samples) for s in m2.shards] == [(s.path, s.samples) for s in m.shards]
    assert {json.loads(s["json"])["photoid"] for s in read_samples(m2).values()} == \
        {json.loads(s["json"])["photoid"] for s in read_samples(m).values()}


def test_resume_after_sigkill(built, yfcc_fixture, tmp_path):
    """Kill the CLI (whole process group, as Ctrl-C / a scheduler would) mid-download, rerun it."""
    cfg, m = built
    fx = yfcc_fixture
    out = tmp_path / "killed"
    cmd = [sys.executable, "tools/build_yfcc15m.py", "--metadata", str(fx.metadata), "--subset", str(fx.subset),
           "--out", str(out), "--name", "killed", "--manifest-dir", str(out), "--url-template", "{download_url}",
           "--processes", "1", "--threads", "1", "--image-size", "64", "--shard-size", "8", "--timeout", "2",
           "--max-image-pixels", "4000000", "--allow-private-network", "--no-progress"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    fx.server.delay_seconds = 0.15
    fx.server.requests.clear()
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not list((out / "shards").glob("*_stats.json")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)                      # into the next shard: a tar half written
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        fx.server.delay_seconds = 0.0
    done_at_kill = {p.name.split("_")[0] for p in (out / "shards").glob("*_stats.json")}
    assert done_at_kill and not (out / "killed.json").exists()
    fetched_before = set(fx.server.requests)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = load_manifest(out / "killed.json")
    # no duplicate, no missing sample: the same photos and captions as the uninterrupted build
    def content(man):
        return sorted((json.loads(s["json"])["photoid"], k, s["txt"]) for k, s in read_samples(man).items())
    assert content(resumed) == content(m)
    assert [(s.path, s.samples) for s in resumed.shards] == [(s.path, s.samples) for s in m.shards]
    # finished shards were not downloaded again: each of their URLs was fetched exactly once
    done_urls = set()
    for sid in done_at_kill:
        done_urls |= {u.split(":", 2)[2].split("/", 1)[1] for u in pq.read_table(
            out / "shards" / f"{sid}.parquet", columns=["url"])["url"].to_pylist()}
    assert done_urls
    for path in done_urls:
        assert fx.server.requests["/" + path] == 1 and "/" + path in fetched_before, path


def test_limit_and_sample_fraction(yfcc_fixture, tmp_path):
    full = select_stage(fixture_config(yfcc_fixture, tmp_path / "a"))["selected"]
    assert select_stage(fixture_config(yfcc_fixture, tmp_path / "b", limit=5))["selected"] == 5
    half = select_stage(fixture_config(yfcc_fixture, tmp_path / "c", sample_fraction=0.5))
    assert 0 < half["selected"] < full and half["counts"]["sampled_out"] == full - half["selected"]
    again = select_stage(fixture_config(yfcc_fixture, tmp_path / "d", sample_fraction=0.5))
    assert again["selected"] == half["selected"]                      # deterministic


def test_url_template_and_config_errors(yfcc_fixture, tmp_path):
    assert format_url("{hash[0:3]}/{hash[3:6]}/{hash}.jpg", hash="abcdef99") == "abc/def/abcdef99.jpg"
    with pytest.raises(ValueError, match="unknown field 'nope'"):
        fixture_config(yfcc_fixture, tmp_path, url_template="http://x/{nope}")
    with pytest.raises(ValueError, match="sample_fraction"):
        fixture_config(yfcc_fixture, tmp_path, sample_fraction=0)
    # changing the selection under existing shards is refused, not silently mixed
    cfg = fixture_config(yfcc_fixture, tmp_path / "x", limit=3)
    select_stage(cfg)
    (cfg.shard_dir).mkdir(parents=True)
    (cfg.shard_dir / "00000.tar").write_bytes(b"")
    with pytest.raises(InputError, match="other selection settings"):
        select_stage(fixture_config(yfcc_fixture, tmp_path / "x", limit=4))


def test_wrong_metadata_file_is_a_clear_cli_error(yfcc_fixture, tmp_path):
    fx = yfcc_fixture
    proc = subprocess.run([sys.executable, "tools/build_yfcc15m.py", "--metadata", str(fx.subset), "--subset",
                           str(fx.subset), "--out", str(tmp_path / "o"), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{fx.subset}:1: expected 25 tab-separated columns, found 3" in proc.stderr


def test_json_writes_are_atomic(tmp_path):
    path = tmp_path / "state" / "marker.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]}, indent=1, sort_keys=True)
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=1, sort_keys=True) + "\n"
    with pytest.raises(TypeError):      # a failed write leaves the old content and no temp file
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["marker.json"]


def rewrite_member(tar: Path, member_suffix: str, data: bytes) -> str:
    """Replace the content of the first member whose name ends with `member_suffix`; returns its name."""
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t if m.isfile()]
    name = next(m.name for m, _ in members if m.name.endswith(member_suffix))
    with tarfile.open(tar, "w") as t:
        for m, content in members:
            content = data if m.name == name else content
            m.size = len(content)
            t.addfile(m, io.BytesIO(content))
    return name


def test_finalize_verifies_images_and_indexes(built, yfcc_fixture, tmp_path):
    """Images that fail to decode are recorded in the manifest (and skipped unread by the loader);
    an index left over from another tar is made again, not trusted."""
    from pipeline.loader import SLIPLoader
    from pipeline.recipe import AugmentationRecipe
    from test_data_safety import header_and_garbage, quant_table_missing
    from shard_testing import chars
    cfg, m = built
    out = tmp_path / "copy"
    shutil.copytree(cfg.out, out)
    cfg2 = fixture_config(yfcc_fixture, out)
    sd = cfg2.shard_dir
    broken = rewrite_member(sd / m.shards[1].path, ".jpg", quant_table_missing(1))
    garbled = rewrite_member(sd / m.shards[2].path, ".jpg", header_and_garbage(2))
    # swapped indexes, newer than their tars: the builder would keep them by their dates alone
    a, b = sd / m.shards[0].index, sd / m.shards[3].index
    a_text, b_text = a.read_text(), b.read_text()
    a.write_text(b_text)
    b.write_text(a_text)
    m2 = build(cfg2)
    assert [s.bad_samples for s in m2.shards] == [
        [], [{"position": 0, "key": broken[:-4], "reason": "corrupt_image",
              "detail": "OSError: broken data stream when reading image file"}],
        [{"position": 0, "key": garbled[:-4], "reason": "corrupt_image",
          "detail": m2.shards[2].bad_samples[0]["detail"]}], []]
    assert m2.stats["verify"] == {"bad_samples": 2, "reasons": {"corrupt_image": 2}}
    assert (a.read_text(), b.read_text()) == (a_text, b_text)
    for entry in m2.shards:
        assert entry.index_sha256 == hashlib.sha256((sd / entry.index).read_bytes()).hexdigest()
    loader = SLIPLoader(load_manifest(sd / "manifest.json"), AugmentationRecipe(image_size=32), 4, chars,
                        num_threads=1, backend="pillow")
    bad = {m2.shards[0].samples, m2.shards[0].samples + m2.shards[1].samples}     # first samples of shards 1, 2
    assert set(loader.table.recorded_bad) == bad
    seen = {i for batch in loader for i in batch["index"].tolist()}
    assert not seen & bad and loader.bad_reasons["corrupt_image"] >= 2


def run_cli(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/build_yfcc15m.py", *map(str, args), "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_unusable_inputs_end_in_one_clear_line(yfcc_fixture, tmp_path):
    fx = yfcc_fixture
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    elsewhere = tmp_path / "subset_elsewhere.tsv"
    elsewhere.write_text("1\t999999\tabc\n")
    cases = {
        "missing metadata": (["--metadata", tmp_path / "nope.tsv", "--subset", fx.subset],
                             f"error: {tmp_path / 'nope.tsv'}: no such file"),
        "missing subset": (["--metadata", fx.metadata, "--subset", tmp_path / "nope.tsv"],
                           f"error: {tmp_path / 'nope.tsv'}: no such file"),
        "empty metadata": (["--metadata", empty, "--subset", fx.subset], f"error: {empty}: no rows at all"),
        "empty subset": (["--metadata", fx.metadata, "--subset", empty], f"error: {empty}: no rows at all"),
        "nothing selected": (["--metadata", fx.metadata, "--subset", elsewhere], "error: no photo selected from"),
    }
    for case, (args, start) in cases.items():
        proc = run_cli(*args, "--out", tmp_path / case.replace(" ", "_"))
        assert proc.returncode == 2, (case, proc.stderr[-2000:])
        assert proc.stderr.startswith(start) and proc.stderr.count("\n") == 1, (case, proc.stderr[-2000:])
    assert not (tmp_path / "manifests").exists()


def test_a_build_where_every_download_fails_is_an_error(yfcc_fixture, tmp_path):
    from pipeline.build import BuildError
    cfg = fixture_config(yfcc_fixture, tmp_path / "o", limit=3, processes=1, threads=2,
                         url_template=yfcc_fixture.server.url("missing/{photoid}.jpg"))
    with pytest.raises(BuildError, match=r"none of the 3 downloads succeeded \(failures: \{'http_404': 3\}\)"):
        build(cfg)
    assert load_manifest(cfg.manifest_dir / "fixture.json").total_samples == 0     # kept, for its error list
