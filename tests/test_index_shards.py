"""tools/index_shards.py over img2dataset-layout tars written here: every sample checked and
counted by kind, nothing written near the shards with --index-dir, reruns reuse unchanged tars and
read a changed one, and the loader reads exactly the usable samples (with or without the indexes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataset_testing import good, image_of, img2dataset_shard

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def index_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "index_shards.py"), "--no-progress", *args],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)


def write_lab_shards(folder: Path) -> None:
    """Two img2dataset shards of 16: 13 + 14 usable; one sample without a caption, one corrupt
    JPEG (cut short), one image that is not an image, and a key of shard 0 repeated in shard 1;
    images as jpg, png and webp."""
    first = [good(i) for i in range(16)]
    first[3]["caption"] = None                                   # missing_caption
    first[5]["image"] = ("jpg", image_of(5)[:-200])               # corrupt_image (header parses, data cut)
    first[7]["image"] = ("jpg", b"<html>not found</html>")        # not_an_image
    first[9] = good(9, fmt=("png", "PNG"))
    second = [good(i, shard=1) for i in range(16, 32)]
    second[4] = dict(good(20, shard=1), key=first[2]["key"])       # duplicate_key
    second[6] = good(22, shard=1, fmt=("webp", "WEBP"))
    img2dataset_shard(folder, 0, first)
    img2dataset_shard(folder, 1, second)


def listing(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()} | {
        ".": folder.stat().st_mtime_ns}


@pytest.fixture(scope="session")
def lab_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lab") / "cc"
    write_lab_shards(folder)
    return folder


@pytest.fixture(scope="session")
def indexed(lab_shards, tmp_path_factory) -> dict:
    """One run of the tool with --index-dir; the shard folder's listing before and after."""
    work = tmp_path_factory.mktemp("index")
    before = listing(lab_shards)
    proc = index_cli(str(lab_shards / "{00000..00001}.tar"), "--name", "lab", "--index-dir", str(work / "idx"),
                     "--manifest", str(work / "lab.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"manifest": work / "lab.json", "index_dir": work / "idx", "before": before, "after": listing(lab_shards),
            "out": json.loads(proc.stdout.splitlines()[-1])}


def test_counts_by_kind_and_nothing_near_the_shards(indexed, lab_shards):
    from pipeline.manifest import load_manifest
    from pipeline.shards import build_sample_table
    m = load_manifest(indexed["manifest"])
    assert indexed["before"] == indexed["after"]                       # listing and mtimes unchanged
    assert indexed["out"]["excluded"] == {"missing_caption": 1, "corrupt_image": 1, "not_an_image": 1,
                                          "duplicate_key": 1}
    assert [e.samples for e in m.shards] == [13, 15] and m.total_samples == 28
    assert m.stats["index"]["samples_in_tars"] == 32 and m.stats["index"]["excluded"] == 4
    assert m.index_root == str(indexed["index_dir"].resolve()) and m.caption_fields == ["caption", "txt"]
    assert sorted(p.name for p in indexed["index_dir"].iterdir()) == ["00000.idx", "00001.idx", "lab.index_state.json"]
    reasons = {(r["key"], r["reason"]) for e in m.shards for r in e.excluded}
    assert ("000000003", "missing_caption") in reasons and ("000000002", "duplicate_key") in reasons
    # the index and the manifest agree: the loader reads exactly the usable samples, never a left-out one
    table = build_sample_table(m)
    assert len(table) == 28 and not table.recorded_bad
    assert m.index_paths()[0].parent == indexed["index_dir"].resolve()
    # every tar was hashed by the run: recorded as verified, and a full check agrees
    from pipeline.integrity import last_verification, verify_shards
    assert last_verification(indexed["manifest"]).ok
    assert verify_shards(indexed["manifest"], progress=False).ok


def test_without_the_indexes_the_loader_leaves_out_the_same_samples(indexed, tmp_path):
    from pipeline.manifest import load_manifest
    from pipeline.shards import build_sample_table
    m = load_manifest(indexed["manifest"])
    with_index = build_sample_table(m)
    m.index_root = str(tmp_path / "gone")             # indexes not found: the tars are scanned
    without = build_sample_table(m)
    assert (without.image == with_index.image).all() and (without.text == with_index.text).all()


def test_rerun_reuses_unchanged_tars_and_reads_a_changed_one(indexed, lab_shards, tmp_path, capsys):
    import shutil
    from tools.index_shards import main
    folder = tmp_path / "cc"
    shutil.copytree(lab_shards, folder)           # the session's shards stay as they are
    args = [str(folder), "--name", "lab", "--index-dir", str(tmp_path / "idx"), "--manifest", str(tmp_path / "m.json"),
            "--no-progress"]

    def index(*extra) -> dict:       # in this process: the tool's start-up is paid once, by the fixture
        assert main([*args, *extra]) == 0
        return json.loads(capsys.readouterr().out.splitlines()[-1])
    index()
    again = index()
    assert (again["read"], again["reused"], again["samples"]) == (0, 2, 28)
    # shard 1 rewritten: its duplicate gone, two samples more
    img2dataset_shard(folder, 1, [good(i, shard=1) for i in range(16, 34)])
    changed = index()
    assert (changed["read"], changed["reused"], changed["samples"]) == (1, 1, 13 + 18)
    assert changed["excluded"] == {"missing_caption": 1, "corrupt_image": 1, "not_an_image": 1}
    assert index("--verify", "decode")["excluded"] == changed["excluded"]
    # shard 0 now holds a key of the unchanged shard 1: shard 1's copy becomes a duplicate, and is read again
    img2dataset_shard(folder, 0, [good(i) for i in range(16)] + [dict(good(40), key="000010020")])
    moved = index()
    assert (moved["read"], moved["reused"], moved["excluded"]) == (2, 0, {"duplicate_key": 1})
    assert moved["samples"] == 17 + 17
    verified = index("--verify")
    assert (verified["read"], verified["reused"]) == (2, 0)


def test_trains_on_the_result(indexed, tmp_path):
    from test_resume_safety import BASE, run
    from test_trainer import step_records
    out = tmp_path / "run"
    proc = run([*BASE, f"data.manifest={indexed['manifest']}", f"out_dir={out}", "optim.max_steps=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(step_records(out)) == [1, 2] and "resumed" not in proc.stdout


def test_bad_input_is_one_line(tmp_path):
    proc = index_cli(str(tmp_path / "{00000..00002}.tar"), "--name", "x", "--manifest", str(tmp_path / "m.json"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and len(proc.stderr.splitlines()) == 1
    assert "3 tar(s) named are missing" in proc.stderr


def test_every_usable_sample_decodes_webp_included(indexed):
    """One batch of the whole indexed set through the DALI CPU graph: nothing is replaced, the
    WebP image included (this Pillow cannot open it; its size comes from its header)."""
    from pipeline.loader import SLIPLoader
    from pipeline.manifest import load_manifest
    from pipeline.recipe import AugmentationRecipe
    from shard_testing import chars
    loader = SLIPLoader(load_manifest(indexed["manifest"]), AugmentationRecipe(image_size=32, num_ssl_views=0), 28,
                        chars, num_threads=1)
    webp = [i for i in range(28) if loader.reader.image(i)[:4] == b"RIFF"]
    assert len(webp) == 1 and loader._check_image(webp[0])[1] == (96, 96)
    (batch,) = list(loader)
    assert batch["bad_samples"] == 0 and batch["clip_image"].shape == (28, 3, 32, 32)


def test_a_member_twice_in_a_sample_is_a_duplicate(tmp_path):
    """webdataset refuses a sample holding one extension twice: left out, as a repeated key."""
    import tarfile
    from dataset_testing import add_member
    from pipeline.indexing import scan_tar
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        for name, data in (("a.jpg", image_of(0)), ("a.txt", "one"), ("a.txt", "two"), ("b.jpg", image_of(1)),
                           ("b.txt", "fine"), ("c.JPG", image_of(2)), ("c.TXT", "upper case ext")):
            add_member(tar, name, data)
    scan, lines = scan_tar(tmp_path / "t.tar", "t.tar", decode=False, max_pixels=10 ** 8)
    assert len(scan.digests) == 3 and scan.bad[0][::2] == ("duplicate_key", "a") and list(scan.bad) == [0]
    assert scan.listed == [1, 2] and [line.split()[3] for line in lines] == ["b.jpg", "c.JPG"]


def test_keys_split_as_webdataset_splits_them():
    """The key/extension split is webdataset's own function; the restated rule used where webdataset
    is not installed gives the same answers."""
    from webdataset.tariterators import base_plus_ext
    from pipeline.shards import _base_plus_ext, split_member_name
    names = ["a/0001.seg.png", "0001.JPG", ".hidden", "nodot", "a.b/c.jpg", "a/b.c.d", "dir/.x.jpg", "k.", "x/y/z.txt"]
    for name in names:
        assert _base_plus_ext(name) == base_plus_ext(name), name
        assert split_member_name(name) == (None if base_plus_ext(name)[0] is None else base_plus_ext(name)), name
