"""Training never runs on silently wrong data: damaged JPEGs are rejected by one rule before either
augmentation path sees them, index files are verified against their tars, shards are found in
exactly one place, and unusable inputs end in one clear line. Each fault is caused for real."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.jpeg_check import MAX_SCANS, jpeg_problem
from pipeline.loader import SLIPLoader
from pipeline.manifest import ShardError, load_manifest
from pipeline.recipe import AugmentationRecipe
from pipeline.verify import image_problem
from shard_testing import caption_sample, chars, encode, write_shards

ROOT = Path(__file__).resolve().parent.parent
RECIPE = AugmentationRecipe(image_size=32)


def photo(seed: int, w: int = 64, h: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3)) + rng.integers(0, 255, 3)
    img[8:30, 10:40] = rng.integers(0, 255, 3)
    return img + rng.integers(-20, 20, (h, w, 3))


def jpeg(seed: int, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(photo(seed), 0, 255).astype(np.uint8)).save(buf, "JPEG", **save)
    return buf.getvalue()


def scan_data_start(data: bytes) -> int:
    """Where the first scan's entropy-coded data begins (after the SOS header)."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + (data[sos + 2] << 8 | data[sos + 3])


def header_and_garbage(seed: int) -> bytes:
    """A valid JPEG header, then random bytes where the entropy-coded data should be."""
    good = jpeg(seed, quality=90)
    start = scan_data_start(good)
    return good[:start] + np.random.default_rng(seed).integers(0, 256, len(good) - start, np.uint8).tobytes()


def too_many_scans(seed: int, scans: int = 3 * MAX_SCANS) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has `scans` scans: every segment is
    well formed, but decoding it makes a pass over the image per scan."""
    good = jpeg(seed, progressive=True)
    last = good.rindex(b"\xff\xda")
    count = good.count(b"\xff\xda")
    return good[:last] + good[last:-2] * (scans - count + 1) + good[-2:]


def quant_table_missing(seed: int) -> bytes:
    """Structurally complete, but a component names a quantisation table that is never defined:
    the header opens, the decode fails. Only a decoder can find this."""
    data = bytearray(jpeg(seed))
    sof = data.index(b"\xff\xc0")
    data[sof + 2 + 8 + 2] = 3         # first component's table selector
    return bytes(data)


def damaged() -> dict[str, bytes]:
    files = {f"garbage_{s}": header_and_garbage(100 + s) for s in range(20)}
    good = jpeg(7)
    files["truncated"] = good[:len(good) * 2 // 3]
    files["no_eoi"] = good[:-2]
    for s in range(3):
        files[f"scans_{s}"] = too_many_scans(200 + s)
    return files


def dali_decodes(data: bytes) -> bool:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True, prefetch_queue_depth=1)
    def decode():
        encoded = fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
    pipe = decode()
    pipe.build()
    try:
        pipe.run()
        return True
    except Exception:
        return False


def pil_decodes(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).convert("RGB")
        return True
    except Exception:
        return False


def loader(m, backend: str, **kw) -> SLIPLoader:
    return SLIPLoader(m, RECIPE, kw.pop("batch_size", 8), chars, num_threads=1, backend=backend, **kw)


def run_epochs(ld: SLIPLoader, epochs: int = 2) -> list[list[int]]:
    return [b["index"].tolist() for _ in range(epochs) for b in ld]


# ---------------------------------------------------------------- the structural JPEG check

def test_the_check_passes_what_encoders_write():
    big = Image.new("RGB", (64, 48))
    exif = big.getexif()
    exif[0x010F] = "camera"
    with_app = io.BytesIO()
    big.save(with_app, "JPEG", exif=exif.tobytes(), icc_profile=b"\xff\xd9" * 2000)   # 0xFF inside segments
    grey = io.BytesIO()
    Image.fromarray(np.clip(photo(1)[..., 0], 0, 255).astype(np.uint8)).save(grey, "JPEG")
    files = [jpeg(1), jpeg(2, quality=100, subsampling=0), jpeg(3, progressive=True), jpeg(4, optimize=True),
             jpeg(5, restart_marker_blocks=2), with_app.getvalue(), grey.getvalue(),
             jpeg(6) + b"trailing bytes after the end-of-image marker"]
    for data in files:
        assert jpeg_problem(data) is None
        assert image_problem(data, 10 ** 8) is None


def test_the_check_rejects_damaged_files_without_decoding():
    for name, data in damaged().items():
        reason = jpeg_problem(data)
        assert reason is not None, name
        assert reason[0] == ("too_many_scans" if name.startswith("scans") else "corrupt_image"), (name, reason)
    good = jpeg(9)
    assert jpeg_problem(good[:2] + b"\xff\xc4\xff\xff" + good[2:])[0] == "corrupt_image"    # length past the end
    assert jpeg_problem(b"\x89PNG" + good)[0] == "corrupt_image"
    assert jpeg_problem(too_many_scans(9, MAX_SCANS)) is None                            # the limit itself passes
    # what only a decoder can see passes the structure check; the build's verification finds it
    broken = quant_table_missing(9)
    assert jpeg_problem(broken) is None and not pil_decodes(broken)
    assert image_problem(broken, 10 ** 8)[0] == "corrupt_image"


def test_the_decoders_disagree_on_these_files():
    """The fault is real: DALI's decoder returns an image for files PIL's full decode rejects."""
    files = damaged()
    garbage = [d for k, d in files.items() if k.startswith("garbage")]
    assert sum(dali_decodes(d) and not pil_decodes(d) for d in garbage) >= 5


# ---------------------------------------------------------------- both paths, the same damaged files

@pytest.fixture(scope="module")
def damaged_set(tmp_path_factory):
    files = damaged()
    good = [caption_sample(photo(i), f"good {i}") for i in range(64 - len(files))]
    bad = [{"jpg": data, "txt": name} for name, data in files.items()]
    samples = good[:20] + bad + good[20:]
    m = load_manifest(write_shards(tmp_path_factory.mktemp("damaged"), samples, per_shard=16))
    return m, set(range(20, 20 + len(bad)))


def test_both_paths_reject_the_same_files_and_give_identical_batches(damaged_set):
    m, bad = damaged_set
    dali, pillow = loader(m, "dali"), loader(m, "pillow")
    d_batches, p_batches = run_epochs(dali), run_epochs(pillow)
    assert d_batches == p_batches
    assert not bad & {i for b in d_batches for i in b}
    assert dali.bad_samples == pillow.bad_samples and dali.bad_reasons == pillow.bad_reasons
    # every sample of an epoch is visited (64 samples, 8 batches of 8): each bad one counted each epoch
    assert dali.bad_reasons["too_many_scans"] >= 2 * 3 and dali.bad_reasons["corrupt_image"] >= 2 * 22
    assert "late_decode_failure" not in dali.bad_reasons


@pytest.mark.parametrize("backend", ["dali", "pillow"])
def test_a_late_decoder_failure_is_counted_and_replaced(tmp_path, backend):
    """An image that passes every check before augmentation and still fails in the decoder."""
    samples = [caption_sample(photo(i), f"good {i}") for i in range(16)]
    samples[5] = {"jpg": quant_table_missing(5), "txt": "breaks the decoder"}
    m = load_manifest(write_shards(tmp_path, samples, per_shard=16))
    ld = loader(m, backend)
    batches = run_epochs(ld)
    assert 5 not in {i for b in batches for i in b} and len(batches) == 4
    assert set(ld.bad_reasons) == {"late_decode_failure"} and ld.bad_reasons["late_decode_failure"] >= 2
    # the same batches on the other path
    other = loader(m, "pillow" if backend == "dali" else "dali")
    assert run_epochs(other) == batches and other.bad_reasons == ld.bad_reasons


@pytest.mark.parametrize("backend", ["dali", "pillow"])
def test_a_failure_the_augmenter_cannot_attribute_is_traced_by_the_loader(tmp_path, monkeypatch, backend):
    """When the augmenter cannot say which sample broke a batch (a decoder that rejects what PIL
    accepts), the loader finds it by augmenting parts of the batch, and replaces it. The DALI
    augmenter's own per-image decode is switched off too, so the loader's fallback is what runs."""
    import pipeline.dali_pipeline
    import pipeline.pillow_pipeline
    for module in (pipeline.dali_pipeline, pipeline.pillow_pipeline):
        monkeypatch.setattr(module, "undecodable_samples", lambda plan: {})
    monkeypatch.setattr(pipeline.dali_pipeline, "rejected_samples", lambda plan, decodes: {})
    samples = [caption_sample(photo(i), f"good {i}") for i in range(16)]
    samples[9] = {"jpg": quant_table_missing(9), "txt": "breaks the decoder"}
    m = load_manifest(write_shards(tmp_path, samples, per_shard=16))
    ld = loader(m, backend)
    with pytest.warns(UserWarning, match=r"traced to samples \[9\]"):
        batches = run_epochs(ld, 1)
    assert 9 not in {i for b in batches for i in b}
    assert set(ld.bad_reasons) == {"late_decode_failure"} and ld.bad_reasons["late_decode_failure"] >= 1


def test_bad_samples_recorded_at_build_time_are_skipped_unread(tmp_path, monkeypatch):
    samples = [caption_sample(photo(i), f"good {i}") for i in range(16)]
    samples[3] = {"jpg": quant_table_missing(3), "txt": "fails the build's decode"}
    samples[11] = {"jpg": header_and_garbage(11), "txt": "fails the structure check"}
    m = load_manifest(write_shards(tmp_path, samples, per_shard=8, verify=True))
    assert [(b["position"], b["key"], b["reason"]) for s in m.shards for b in s.bad_samples] == \
        [(3, "000003", "corrupt_image"), (3, "000011", "corrupt_image")]
    read = []
    dali, pillow = loader(m, "dali"), loader(m, "pillow")
    original = dali.reader.image

    def spy(i):
        read.append(i)
        return original(i)
    monkeypatch.setattr(dali.reader, "image", spy)
    batches = run_epochs(dali)
    assert read and not {3, 11} & set(read)
    assert not {3, 11} & {i for b in batches for i in b}
    assert set(dali.bad_reasons) == {"corrupt_image"} and dali.bad_reasons["corrupt_image"] >= 4
    assert run_epochs(pillow) == batches and pillow.bad_reasons == dali.bad_reasons


# ---------------------------------------------------------------- index files

@pytest.fixture
def two_shards(tmp_path):
    samples = [caption_sample(photo(i), f"caption {i}") for i in range(40)]
    return write_shards(tmp_path / "set", samples, per_shard=20)


def strip_new_fields(manifest_path: Path) -> None:
    """Make the manifest look like one written before index checksums and bad samples were recorded."""
    d = json.loads(manifest_path.read_text())
    for s in d["shards"]:
        for k in ("index_sha256", "index_tar_bytes", "bad_samples"):
            s.pop(k)
    manifest_path.write_text(json.dumps(d))


def swap(a: Path, b: Path) -> None:
    tmp = a.with_suffix(".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def test_swapped_index_files_are_refused(two_shards):
    d = two_shards.parent
    clean = [b["index"].tolist() for b in loader(load_manifest(two_shards), "pillow")]
    swap(d / "00000.idx", d / "00001.idx")
    # same tar sizes, same sample counts: only the index checks can tell
    with pytest.raises(ShardError, match=r"00000\.idx: not the index the manifest recorded for 00000\.tar"):
        loader(load_manifest(two_shards), "pillow")
    # a manifest from before the checksums were recorded: the members at the first and last offsets
    strip_new_fields(two_shards)
    with pytest.raises(ShardError, match=r"00000\.idx: does not belong to 00000\.tar: at offset \d+ the index "
                                         r"has '000020\.\w+'"):
        loader(load_manifest(two_shards), "pillow")
    swap(d / "00000.idx", d / "00001.idx")
    old = loader(load_manifest(two_shards), "pillow")    # the old format still loads, with the same batches
    assert [b["index"].tolist() for b in old] == clean


def test_a_stale_index_is_refused(two_shards):
    """An index made for an earlier version of the tar: same name, other content."""
    d = two_shards.parent
    m = load_manifest(two_shards)
    samples = [caption_sample(photo(i), f"other caption {i}") for i in range(20, 40)]
    write_shards(d / "other", samples, per_shard=20)
    shutil.copy(d / "other" / "00000.idx", d / "00001.idx")
    strip_new_fields(two_shards)
    with pytest.raises(ShardError, match=r"00001\.idx: does not belong to 00001\.tar"):
        loader(load_manifest(two_shards), "pillow")
    assert load_manifest(two_shards).total_samples == m.total_samples


# ---------------------------------------------------------------- where the shards are

def test_a_copy_with_a_missing_shard_fails_instead_of_reading_the_original(two_shards, tmp_path):
    original = two_shards.parent
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    (copy / "00000.tar").unlink()
    with pytest.raises(ShardError) as e:
        loader(load_manifest(copy / "manifest.json"), "pillow")
    message = str(e.value)
    assert "\n" not in message and "1 of 2 shards missing beside it" in message
    assert str(copy / "00000.tar") in message and f"never from its root {original}" in message
    # the complete copy is read from the copy, not from the root
    shutil.copy(original / "00000.tar", copy / "00000.tar")
    assert load_manifest(copy / "manifest.json").shard_dir() == copy


def test_a_manifest_away_from_its_shards_uses_its_root(two_shards, tmp_path):
    kept = tmp_path / "manifests" / "set.json"
    kept.parent.mkdir()
    shutil.copy(two_shards, kept)
    assert load_manifest(kept).shard_dir() == two_shards.parent
    assert len(loader(load_manifest(kept), "pillow")) == 5
    (two_shards.parent / "00001.tar").unlink()
    with pytest.raises(ShardError, match=r"none of its shards is beside it and 1 of 2 shards are missing under "
                                         r"its root .*00001\.tar$"):
        load_manifest(kept).shard_paths()


# ---------------------------------------------------------------- evaluation data

def test_evaluate_on_a_nonexistent_path_says_so(tmp_path):
    missing = tmp_path / "no_such_dir"
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--random-init", "--config",
                           "trainer/configs/demo_slip.yaml", "--data", str(missing)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --data {missing}: no such file or directory"
    from trainer.evaluation.data import EvalData, shard_paths
    with pytest.raises(FileNotFoundError, match="no such evaluation data"):
        EvalData.open(str(missing))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        shard_paths(missing)
    with pytest.raises(FileNotFoundError, match="no .tar shards found"):
        shard_paths(tmp_path / "*.tar")
