"""No single input can crash, hang, exhaust memory, or reach where it should not. Each test feeds one
small hostile input for real (files made here, servers on 127.0.0.1 started here) and checks that it
becomes a counted bad sample, a one-line error, or a refusal. No test sends traffic anywhere else:
where a refusal is tested, the test checks that no request was made."""
from __future__ import annotations

import bz2
import hashlib
import importlib.util
import io
import json
import os
import resource
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import jpeg, meta_line
from demokit.http_server import ImageServer, bomb_jpeg
from pipeline.manifest import ShardError, load_manifest, save_manifest
from pipeline.metadata import MAX_LINE_BYTES, ScanStats, SubsetIds, read_metadata
from pipeline.recipe import AugmentationRecipe
from pipeline.shards import MAX_INDEX_BYTES, build_sample_table, file_sha256
from shard_testing import caption_sample, chars, write_shards

ROOT = Path(__file__).resolve().parent.parent
RECIPE = AugmentationRecipe(image_size=32)
pytestmark = pytest.mark.timeout(120)


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (40, 48, 3))


def tool(name: str):
    """A tools/ script as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loader_of(manifest_path, **kw):
    from pipeline.loader import SLIPLoader
    return SLIPLoader(load_manifest(manifest_path), RECIPE, kw.pop("batch_size", 4), chars, num_threads=1,
                      backend="pillow", **kw)


# ============================================================ one sample never stops training

def test_a_json_nested_too_deep_is_that_samples_failure(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    samples = [caption_sample(image(i), f"photo {i}") for i in range(8)]
    samples[2]["json"] = deep                       # falls back to its txt caption
    samples[5] = {"jpg": samples[5]["jpg"], "json": deep}    # no caption left at all
    ld = loader_of(write_shards(tmp_path / "s", samples, per_shard=8))
    batches = [b for b in ld]
    seen = {i for b in batches for i in b["index"].tolist()}
    assert 2 in seen and 5 not in seen and ld.bad_reasons["no_caption"] >= 1


def test_a_read_failure_of_one_sample_is_counted_by_kind_and_replaced(tmp_path):
    ld = loader_of(write_shards(tmp_path / "s", [caption_sample(image(i), f"p{i}") for i in range(8)], per_shard=8))
    meta = ld.reader.meta

    def failing(i):
        if i == 3:
            raise OSError(5, "Input/output error")
        return meta(i)
    ld.reader.meta = failing
    with pytest.warns(UserWarning, match="sample 3: OSError"):
        seen = {i for b in ld for i in b["index"].tolist()}
    assert 3 not in seen and ld.bad_reasons["sample_error:OSError"] >= 1


def forge_index_line(manifest_path: Path, line: int, text: str) -> None:
    """Rewrite one line of the first shard's index, and the manifest's record of it, as someone who
    controls both files would."""
    m = load_manifest(manifest_path)
    idx = manifest_path.parent / m.shards[0].index
    lines = idx.read_text().splitlines()
    lines[line] = text
    idx.write_text("\n".join(lines) + "\n")
    m.shards[0].index_sha256 = file_sha256(idx)
    save_manifest(m, manifest_path)


@pytest.mark.parametrize("offset, size", [(1536, 10 ** 15), (1536, -5), (2 ** 64, 10), ("0x10", 5)])
def test_index_entries_outside_the_tar_are_refused_at_start(tmp_path, offset, size):
    path = write_shards(tmp_path / "s", [caption_sample(image(i), f"p{i}") for i in range(4)], per_shard=4)
    first = (path.parent / load_manifest(path).shards[0].index).read_text().splitlines()[1].split()
    first[1:3] = [str(offset), str(size)]
    forge_index_line(path, 1, " ".join(first))
    with pytest.raises(ShardError, match=r"\.idx:2: "):
        build_sample_table(load_manifest(path))


def test_a_huge_sparse_index_is_refused_before_it_is_read(tmp_path):
    path = write_shards(tmp_path / "s", [caption_sample(image(i), f"p{i}") for i in range(4)], per_shard=4)
    m = load_manifest(path)
    idx = path.parent / m.shards[0].index
    os.truncate(idx, 2 << 30)            # 2 GiB that take no disk
    m.shards[0].index_sha256 = None
    save_manifest(m, path)
    before, start = peak_rss_mb(), time.time()
    with pytest.raises(ShardError, match="allowed for the index"):
        build_sample_table(load_manifest(path))
    assert time.time() - start < 2 and peak_rss_mb() - before < 200
    assert MAX_INDEX_BYTES < 2 << 30


def test_oversized_components_are_never_read(tmp_path, monkeypatch):
    import pipeline.loader as loader_module
    import pipeline.shards as shards
    samples = [caption_sample(image(i), f"p{i}") for i in range(8)]
    samples[4]["jpg"] = jpeg(400, 300, 4)
    ld = loader_of(write_shards(tmp_path / "s", samples, per_shard=8))
    monkeypatch.setattr(loader_module, "MAX_IMAGE_BYTES", int(ld.table.image[4, 1]) - 1)   # sample 4's image is over
    monkeypatch.setattr(shards, "MAX_TEXT_BYTES", 1)                                      # every caption is over
    assert ld._sample(4, 0.0) == "too_large" and ld._sample(5, 0.0) == "no_caption"


# ============================================================ metadata rows

def test_an_overflowing_photo_id_is_a_malformed_row(tmp_path):
    rows = [meta_line(1, 99999999999999999999, "ab", "big+id", "", "http://x/1.jpg"),
            meta_line(2, 42, "cd", "fine", "", "http://x/2.jpg")]
    meta = tmp_path / "m.tsv"
    meta.write_bytes(b"".join(rows))
    subset = tmp_path / "s.tsv"
    subset.write_text("1\t99999999999999999999\tab\n2\t42\tcd\n")
    stats = ScanStats()
    ids = SubsetIds.from_file(subset, stats, progress=False)
    assert ids.ids.tolist() == [42] and stats.counts["subset_malformed"] == 1
    rows = list(read_metadata(meta, ids, stats, progress=False))
    assert [r.photoid for r in rows] == [42] and stats.counts["malformed"] == 1
    assert "64-bit range" in stats.examples["malformed"][0]


# ============================================================ manifests: paths and checksums

@pytest.mark.parametrize("field, value, message", [
    ("path", "/etc/passwd", "must be relative"), ("path", "../../outside.tar", "must be relative"),
    ("index", "../x.idx", "must be relative"), ("sha256", "x", "64 lowercase hex"),
    ("index_sha256", "A" * 64, "64 lowercase hex"), ("samples", -1, "integer >= 0"),
    ("bad_samples", [{"position": "0"}], "integer >= 0"),
])
def test_a_forged_manifest_entry_is_refused_on_load(tmp_path, field, value, message):
    path = write_shards(tmp_path / "s", [caption_sample(image(i), f"p{i}") for i in range(4)], per_shard=4)
    d = json.loads(path.read_text())
    d["shards"][0][field] = value
    path.write_text(json.dumps(d))
    with pytest.raises(ShardError, match=rf"shard 0: .*{message}"):
        load_manifest(path)


def test_verify_shards_finds_a_same_size_tampered_caption_and_records_when(tmp_path, capsys):
    from pipeline.integrity import last_verification, verification_path
    main = tool("verify_shards").main
    path = write_shards(tmp_path / "s", [caption_sample(image(i), f"cat {i}") for i in range(6)], per_shard=3)
    manifest_bytes = path.read_bytes()
    assert last_verification(path) is None
    assert main([str(path), "--workers", "2", "--no-progress"]) == 0
    first = last_verification(path)
    assert first is not None and first.ok and first.shards == 2
    assert "never verified" in capsys.readouterr().err
    tar = path.parent / "00001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data.replace(b"cat 4", b"dog 4"))          # same size, so only a checksum sees it
    assert main([str(path), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert f"{tar}: sha256 differs" in out and f"last verified {first.verified_at} (passed)" in err
    assert not last_verification(path).ok
    assert path.read_bytes() == manifest_bytes                 # the manifest itself is never rewritten
    assert json.loads(verification_path(path).read_text())["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()


# ============================================================ evaluation data

def labelled_tar(path: Path, samples: list[tuple[bytes, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, (img, cls) in enumerate(samples):
            for ext, data in (("jpg", img), ("cls", cls)):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_out_of_range_labels_are_bad_samples(tmp_path):
    from trainer.evaluation.data import EvalData
    d = tmp_path / "eval"
    d.mkdir()
    (d / "classnames.json").write_text(json.dumps([f"c{i}" for i in range(16)]))
    labels = [b"3", b"99", b"-1", str(10 ** 30).encode(), b"15"]
    labelled_tar(d / "0.tar", [(jpeg(20, 20, i), c) for i, c in enumerate(labels)])
    data = EvalData.open(str(d))
    assert sorted(s.label for s in data.test.samples) == [3, 15]
    assert sum("is not one of the 16 classes" in b for b in data.bad.items) == 3


def test_a_sparse_huge_tar_member_is_not_read(tmp_path):
    from trainer.evaluation.data import EvalData
    d = tmp_path / "eval"
    d.mkdir()
    (d / "classnames.json").write_text(json.dumps(["a", "b"]))
    tar_path = d / "0.tar"
    labelled_tar(tar_path, [(jpeg(20, 20, 1), b"0")])
    with tarfile.open(tar_path) as t:
        end = max(m.offset_data + m.size for m in t)
    end = -(-end // 512) * 512
    huge = tarfile.TarInfo("0001.jpg")
    huge.size = 4 << 30
    with open(tar_path, "r+b") as f:          # a member of 4 GiB of zeros that takes no disk
        f.seek(end)
        f.write(huge.tobuf(format=tarfile.GNU_FORMAT))
    os.truncate(tar_path, end + 512 + huge.size + 1024)
    before, start = peak_rss_mb(), time.time()
    data = EvalData.open(str(d))
    assert [s.label for s in data.test.samples] == [0]
    assert any("0001" in b and "not read" in b for b in data.bad.items)
    assert time.time() - start < 10 and peak_rss_mb() - before < 500


# ============================================================ memory and hangs

def test_a_bz2_of_newlines_and_an_overlong_line_keep_memory_bounded(tmp_path):
    rows = b"".join(meta_line(n, 100 + n, "ab", f"row+{n}", "", f"http://x/{n}.jpg") for n in range(1, 51))
    newlines = bz2.compress(b"\n" * (16 << 20), 9)     # 16 MiB of newlines in ~50 bytes
    long_row = meta_line(51, 999, "ab", "x" * (3 * MAX_LINE_BYTES), "", "http://x/long.jpg")
    path = tmp_path / "m.bz2"
    path.write_bytes(bz2.compress(rows) + newlines * 16 + bz2.compress(long_row + rows))
    assert path.stat().st_size < 64 << 10
    before, start = peak_rss_mb(), time.time()
    stats = ScanStats()
    found = list(read_metadata(path, None, stats, progress=False))
    assert len(found) == 100 and stats.counts["malformed"] == 1          # 256 MiB of newlines read through
    assert f"{path}:{50 + 16 * (16 << 20) + 1}: line longer than" in stats.examples["malformed"][0]
    assert peak_rss_mb() - before < 300 and time.time() - start < 60


def test_a_failing_reader_thread_hands_its_error_over(tmp_path, monkeypatch):
    import pipeline.metadata as metadata

    class Exhausted:
        def decompress(self, *a, **k):
            raise MemoryError("simulated")
    path = tmp_path / "m.bz2"
    path.write_bytes(bz2.compress(meta_line(1, 1, "ab", "t", "", "http://x/1.jpg")))
    monkeypatch.setattr(metadata.bz2, "BZ2Decompressor", Exhausted)
    with pytest.raises(MemoryError, match="simulated"):    # threads=1: the standard library's reader thread
        list(read_metadata(path, None, ScanStats(), progress=False, threads=1))


@pytest.mark.timeout(30)
def test_fifos_named_like_images_checkpoints_and_configs_are_refused(tmp_path, capsys):
    from trainer.config import ConfigError, load_config
    from trainer.evaluation.data import EvalData
    d = tmp_path / "eval"
    for c in ("a", "b"):
        (d / c).mkdir(parents=True)
        (d / c / "good.jpg").write_bytes(jpeg(16, 16, ord(c)))
    os.mkfifo(d / "a" / "stall.jpg")
    data = EvalData.open(str(d))
    assert sorted(Path(s.name).name for s in data.test.samples) == ["good.jpg", "good.jpg"]
    os.mkfifo(tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="FIFO, not a regular file"):
        load_config(tmp_path / "config.yaml")
    os.mkfifo(tmp_path / "step_00000010.pt")
    main = tool("evaluate").main
    assert main(["--checkpoint", str(tmp_path / "step_00000010.pt"), "--data", str(d), "--device", "cpu"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    os.mkfifo(tmp_path / "manifest.json")
    with pytest.raises(ShardError, match="FIFO"):
        load_manifest(tmp_path / "manifest.json")


def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path):
    from trainer.config import ConfigError, load_config
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    bomb += [f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdefgh", "bcdefghi")]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(bomb) + "\n")
    assert path.stat().st_size < 600
    start = time.time()
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert time.time() - start < 1 and "\n" not in str(e.value)
    assert str(e.value) == f"{path}:1: YAML anchors and aliases (&name, *name) are not allowed in a config"
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(None, ["optim.betas=[*a]"])


def test_a_jpeg_with_twenty_thousand_scans_is_refused_without_decoding():
    from pipeline.jpeg_check import jpeg_problem
    from test_data_safety import too_many_scans
    data = too_many_scans(3, 20_000)
    start = time.time()
    assert jpeg_problem(data)[0] == "too_many_scans" and time.time() - start < 0.5


# ============================================================ clearer errors

@pytest.mark.parametrize("override, message", [
    ("train.seed=-1", "train.seed must be an integer in [0, 2**63), got -1"),
    ("data.recipe.clip_scale=[0.9, 0.2]", "data.recipe.clip_scale must be [low, high] with 0 < low <= high <= 1"),
    ("data.recipe.grayscale_prob=.nan", "data.recipe.grayscale_prob must be a finite number, got nan"),
    ("optim.lr=1e999", "optim.lr must be a number > 0, got inf"),
    ("optim.epochs=.nan", "optim.epochs must be a number > 0, got nan"),
])
def test_values_no_type_rules_out_are_one_line_errors(override, message):
    from trainer.config import ConfigError, load_config
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_60000_pixel_square_is_too_large_and_an_invisible_caption_is_empty(tmp_path):
    from pipeline.verify import image_problem
    bomb = bomb_jpeg(60_000, 60_000)
    assert image_problem(bomb, 89_478_485)[0] == "too_large"
    samples = [caption_sample(image(i), f"p{i}") for i in range(8)]
    samples[1]["jpg"] = bomb
    samples[2] = {"jpg": samples[2]["jpg"], "txt": "\u200b\u200c\u200d\u2060\ufeff",
                  "json": json.dumps({"title": "\u200b", "description": "\u200b \u3164"})}
    samples[3]["json"] = json.dumps({"title": "\u200b\u200b", "description": "a real description"})
    ld = loader_of(write_shards(tmp_path / "s", samples, per_shard=8))
    assert ld._sample(1, 0.0) == "too_large" and ld._sample(2, 0.0) == "no_caption"
    assert ld._sample(3, 0.0)[2] == "a real description"


# ============================================================ the builder's network policy

def tiny_metadata(tmp_path: Path, urls: list[str]) -> tuple[Path, Path]:
    meta, subset = tmp_path / "m.tsv", tmp_path / "s.tsv"
    meta.write_bytes(b"".join(meta_line(n, 500 + n, f"{500 + n:x}", f"photo+{n}", "", u)
                              for n, u in enumerate(urls, 1)))
    subset.write_text("".join(f"{n}\t{500 + n}\t{500 + n:x}\n" for n in range(1, len(urls) + 1)))
    return meta, subset


def build_config(meta, subset, out, **kw):
    from pipeline.build import BuildConfig
    return BuildConfig(metadata=meta, subset=subset, out=out, name="t", manifest_dir=out / "manifests",
                       url_template="{download_url}", processes=1, threads=4, image_size=32, shard_size=8,
                       shards_per_part=1, timeout=2, progress=False, **kw)


def test_local_addresses_and_credentials_are_refused_at_selection_without_a_request(tmp_path):
    from pipeline.build import select_stage
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg(16, 16, 1))
    with ImageServer(tmp_path / "img") as srv:
        port = srv.port
        urls = {f"http://127.0.0.1:{port}/a.jpg": "loopback_address",
                f"http://0x7f000001:{port}/a.jpg": "loopback_address",
                f"http://2130706433:{port}/a.jpg": "loopback_address",
                f"http://127.1:{port}/a.jpg": "loopback_address",
                f"http://localhost:{port}/a.jpg": "loopback_address",
                f"http://[::1]:{port}/a.jpg": "loopback_address",
                f"http://[::ffff:127.0.0.1]:{port}/a.jpg": "loopback_address",
                "http://169.254.169.254/latest/meta-data/": "link_local_address",
                "http://10.0.0.1/a.jpg": "private_address", "http://[fd00::1]/a.jpg": "private_address",
                "http://0.0.0.0/a.jpg": "unspecified_address", "http://224.0.0.1/a.jpg": "multicast_address",
                "http://240.0.0.1/a.jpg": "reserved_address",
                f"http://user:secret@127.0.0.1:{port}/a.jpg": "url_credentials",
                f"ftp://127.0.0.1:{port}/a.jpg": "rejected_url"}
        meta, subset = tiny_metadata(tmp_path, list(urls))
        stats = select_stage(build_config(meta, subset, tmp_path / "out"))
        assert stats["selected"] == 0
        want = {}
        for reason in urls.values():
            want[reason] = want.get(reason, 0) + 1
        assert {k: stats["counts"][k] for k in want} == want
        allowed = select_stage(build_config(meta, subset, tmp_path / "out2", allow_private_network=True))
        assert allowed["selected"] == 13            # the address rule lifted; never the scheme or credentials
        assert allowed["counts"]["url_credentials"] == 1 and allowed["counts"]["rejected_url"] == 1
        assert not srv.requests


def test_redirects_and_unbounded_downloads_in_a_real_build(tmp_path):
    """img2dataset through the guard: a redirect to ftp:// is refused, an endless body and a huge
    Content-Length are cut at the size limit, a dripping server at the time limit; all counted."""
    from pipeline.build import build
    from pipeline.integrity import last_verification
    (tmp_path / "img").mkdir()
    for n in range(3):
        (tmp_path / "img" / f"{n}.jpg").write_bytes(jpeg(40, 30, n))
    with ImageServer(tmp_path / "img") as srv:
        srv.drip_seconds = 0.4
        urls = [srv.url(f"{n}.jpg") for n in range(3)] + [
            srv.redirect_url(f"ftp://127.0.0.1:{srv.port}/0.jpg"), srv.redirect_url(srv.url("1.jpg"), "ok.jpg"),
            srv.fault_url("huge"), srv.fault_url("huge_length"), srv.fault_url("drip")]
        meta, subset = tiny_metadata(tmp_path, urls)
        cfg = build_config(meta, subset, tmp_path / "out", allow_private_network=True, max_download_bytes=1 << 20,
                           max_download_seconds=3.0)
        start = time.time()
        m = build(cfg)
        assert time.time() - start < 60
        dl = m.stats["download"]
        assert dl["downloaded"] == 4 and dl["failures"] == {"redirect_rejected_url": 1, "download_too_large": 2,
                                                            "download_too_slow": 1}
        assert srv.sent["/fault/huge/x.jpg"] < 64 << 20        # not the whole GiB
        assert last_verification(cfg.manifest_dir / "t.json").ok and last_verification(cfg.shard_dir / "manifest.json")


def test_the_guard_checks_every_hop_and_the_address_it_connects_to(tmp_path, monkeypatch):
    """In the default mode too: 127.0.0.1 stands in for a public server here (the only one a test may
    use), and a redirect from it to ftp:// or to a private address is refused without a connection."""
    import pipeline.fetch as fetch
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg(16, 16, 1))
    with ImageServer(tmp_path / "img") as srv:
        fetch.install(fetch.DownloadPolicy())
        try:
            # the real policy: a name resolving to loopback is refused at connection time, unrequested
            with pytest.raises(urllib.error.URLError, match="loopback_address"):
                urllib.request.urlopen(srv.url("a.jpg").replace("127.0.0.1", "localhost"), timeout=2)
            assert not srv.requests
            real_reason = fetch.address_reason
            monkeypatch.setattr(fetch, "address_reason", lambda ip: None if str(ip) == "127.0.0.1" else real_reason(ip))
            real_url_reason = fetch.url_reason

            def url_reason(url, allow_private=False, resolve_names=True):
                return real_url_reason(url, allow_private or "//127.0.0.1:" in url, resolve_names)
            monkeypatch.setattr(fetch, "url_reason", url_reason)
            assert urllib.request.urlopen(srv.url("a.jpg"), timeout=2).read() == (tmp_path / "img" / "a.jpg").read_bytes()
            for target, reason in ((f"ftp://127.0.0.1:{srv.port}/a.jpg", "redirect_rejected_url"),
                                   ("file:///etc/passwd", "redirect_rejected_url"),
                                   ("http://10.1.2.3/a.jpg", "redirect_private_address"),
                                   ("http://[::1]/a.jpg", "redirect_loopback_address")):
                with pytest.raises(fetch.DownloadRefused, match=reason):
                    urllib.request.urlopen(srv.redirect_url(target), timeout=2)
            assert set(srv.requests) == {"/a.jpg", "/fault/redirect/x.jpg"}
        finally:
            urllib.request.install_opener(None)


def test_a_fifo_named_like_a_checkpoint_never_blocks(tmp_path):
    """Auto-resume lists only regular files, and loading a FIFO is refused at once: nothing opens it
    for reading (which would wait forever for a writer)."""
    import signal as _signal

    from trainer import checkpoint as ckpt
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    fifo = ckpt.checkpoint_path(ckpt_dir, 7)
    os.mkfifo(fifo)
    _signal.alarm(20)               # a blocking open would hang the test: fail it instead
    try:
        assert ckpt.list_checkpoints(ckpt_dir) == []
        assert ckpt.latest_checkpoint(ckpt_dir) is None
        with pytest.raises(ckpt.CheckpointError, match="FIFO"):
            ckpt.load_checkpoint(fifo)
    finally:
        _signal.alarm(0)
