"""The loader on real shards: rank sharding, seeded epochs, bit-exact resume, bad samples, the
augmenter seam, and how tar members are grouped into samples."""
from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from pipeline.augment import BadSampleError, make_augmenter
from pipeline.loader import SLIPLoader
from pipeline.manifest import load_manifest
from pipeline.recipe import AugmentationRecipe
from pipeline.shards import ShardError, build_sample_table, iter_tar_samples, split_member_name
from shard_testing import both_backends, caption_sample, chars, encode, write_shards

RECIPE = AugmentationRecipe(image_size=32)
COUNT = 48




def untokenize(row: torch.Tensor) -> str:
    return "".join(chr(i) for i in row.tolist() if i)


def image(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = np.zeros((40 + i % 7 * 5, 50 + i % 5 * 6, 3))
    img[...] = rng.integers(0, 255, 3)
    img[5:20, 10:30] = rng.integers(0, 255, 3)
    return img


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    samples = [caption_sample(image(i), f"title {i}", f"description {i}") for i in range(COUNT)]
    return load_manifest(write_shards(tmp_path_factory.mktemp("loader"), samples, per_shard=10))


def loader(m, **kw):
    kw = {"batch_size": 4, "rank": 0, "world_size": 1, "seed": 0, "num_threads": 1, **kw}
    return SLIPLoader(m, kw.pop("recipe", RECIPE), kw.pop("batch_size"), chars, **kw)


def epoch_batches(ld) -> list[dict]:
    return list(ld)


@both_backends
def test_two_ranks_see_every_sample_once_with_equal_batches(manifest, backend):
    ranks = [loader(manifest, rank=r, world_size=2, backend=backend) for r in range(2)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == COUNT // 2 // 4
    seen = []
    for ld in ranks:
        batches = epoch_batches(ld)
        assert len(batches) == ld.steps_per_epoch
        for b in batches:
            assert b["clip_image"].shape == (4, 3, 32, 32) and b["text"].shape == (4, 77)
            # the text that came through the pipeline belongs to the image index that came with it
            for idx, row in zip(b["index"].tolist(), b["text"]):
                assert untokenize(row) in (f"title {idx}", f"description {idx}")
            seen += b["index"].tolist()
    assert sorted(seen) == list(range(COUNT))
    # the next epoch is a different order
    again = [i for b in epoch_batches(ranks[0]) for i in b["index"].tolist()]
    first = [i for b in epoch_batches(loader(manifest, rank=0, world_size=2, backend=backend))
             for i in b["index"].tolist()]
    assert again != first and ranks[0].epoch == 2


def test_uneven_split_drops_the_remainder_differently_each_epoch(manifest):
    ld = loader(manifest, batch_size=5, rank=1, world_size=3)     # 48 // 3 = 16 per rank -> 3 batches
    assert ld.steps_per_epoch == 3
    e0 = {i for b in epoch_batches(ld) for i in b["index"].tolist()}
    e1 = {i for b in epoch_batches(ld) for i in b["index"].tolist()}
    assert len(e0) == len(e1) == 15 and e0 != e1


@both_backends
def test_fixed_seed_reproduces_a_batch_bit_for_bit(manifest, backend):
    a, b = next(iter(loader(manifest, backend=backend))), next(iter(loader(manifest, backend=backend, num_threads=2)))
    for k in ("clip_image", "ssl_image_1", "ssl_image_2", "text", "index"):
        assert torch.equal(a[k], b[k]), k
    c = next(iter(loader(manifest, seed=1, backend=backend)))
    assert not torch.equal(a["clip_image"], c["clip_image"])
    assert not torch.equal(a["ssl_image_1"], a["ssl_image_2"])


@both_backends
def test_resume_continues_the_stream_exactly(manifest, backend):
    k = 5    # crosses the epoch boundary: 12 batches an epoch
    ref = loader(manifest, backend=backend)
    stream = [b for _ in range(2) for b in ref]
    stopped = loader(manifest, backend=backend)
    it = iter(stopped)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(stopped.state_dict()))    # survives a checkpoint round trip
    resumed = loader(manifest, backend=backend)
    resumed.load_state_dict(state)
    rest = [b for b in resumed] + [b for b in resumed]
    assert len(rest) == len(stream) - k
    for got, want in zip(rest, stream[k:]):
        for key in ("clip_image", "ssl_image_1", "ssl_image_2", "text", "index"):
            assert torch.equal(got[key], want[key]), key


def test_captions_follow_the_mode(manifest):
    texts = lambda mode: [untokenize(r) for b in epoch_batches(loader(manifest, caption_mode=mode))  # noqa: E731
                          for r in b["text"]]
    assert all(t.startswith("title") for t in texts("title"))
    assert all(t.startswith("description") for t in texts("description"))
    rand = texts("random")
    titles = sum(t.startswith("title") for t in rand)
    assert 0.25 * len(rand) < titles < 0.75 * len(rand)
    with pytest.raises(ValueError, match="caption_mode"):
        loader(manifest, caption_mode="sometimes")


@both_backends
def test_bad_samples_are_skipped_counted_and_training_goes_on(tmp_path, backend):
    good = [caption_sample(image(i), f"title {i}") for i in range(20)]
    jpeg = encode(image(99))
    noise = encode(np.random.default_rng(0).integers(0, 255, (200, 200, 3)))
    bad = [
        {"jpg": b"<html>not found</html>", "txt": "html body"},                # not an image
        {"jpg": jpeg[:40], "txt": "cut in the header"},                        # truncated header
        {"jpg": noise[:len(noise) // 2], "txt": "cut mid-scan"},                # header fine, decoding fails
        {"jpg": encode(image(5)), "txt": "", "json": "{}"},                    # no caption anywhere
        {"txt": "image missing"},                                              # no image at all
        {"jpg": jpeg[:2] + bytes(200) + jpeg[202:], "txt": "zeroed header"},   # header garbage
    ]
    samples = good[:10] + bad + good[10:]
    m = load_manifest(write_shards(tmp_path, samples, per_shard=13))
    ld = loader(m, batch_size=13, backend=backend)
    batches = epoch_batches(ld)
    assert len(batches) == 2 and all(b["clip_image"].shape[0] == 13 for b in batches)
    used = [i for b in batches for i in b["index"].tolist()]
    bad_idx = set(range(10, 16))
    assert not bad_idx & set(used)
    assert all(torch.isfinite(b["clip_image"]).all() for b in batches)
    assert ld.bad_samples >= 5 and sum(b["bad_samples"] for b in batches) == ld.bad_samples
    assert {"not_an_image", "no_caption", "missing_image", "corrupt_image"} <= set(ld.bad_reasons)
    assert ld.state_dict()["bad_samples"] == ld.bad_samples


def test_manifest_and_shards_must_agree(tmp_path, manifest):
    table = build_sample_table(manifest)
    assert len(table) == COUNT and (table.image[:, 0] > 0).all()
    # without index files the tars are scanned, with the same result
    samples = [caption_sample(image(i), f"t{i}") for i in range(12)]
    with_idx = build_sample_table(load_manifest(write_shards(tmp_path / "a", samples, per_shard=5)))
    no_idx = build_sample_table(load_manifest(write_shards(tmp_path / "b", samples, per_shard=5, index=False)))
    assert np.array_equal(with_idx.image, no_idx.image) and np.array_equal(with_idx.meta, no_idx.meta)
    # a truncated shard is a clear error naming it
    path = tmp_path / "b" / "00001.tar"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ShardError, match="00001.tar"):
        build_sample_table(load_manifest(tmp_path / "b" / "manifest.json"))


@both_backends
def test_fp16_views_are_the_fp32_views_rounded(manifest, backend):
    full = next(iter(loader(manifest, backend=backend)))
    half = next(iter(loader(manifest, backend=backend, fp16=True)))
    for k in ("clip_image", "ssl_image_1", "ssl_image_2"):
        assert half[k].dtype == torch.float16
        assert torch.allclose(half[k].float(), full[k], atol=2e-3, rtol=1e-3), k


@both_backends
def test_clip_only_recipe_has_no_ssl_views(manifest, backend):
    b = next(iter(loader(manifest, recipe=dataclasses.replace(RECIPE, num_ssl_views=0), backend=backend)))
    assert "ssl_image_1" not in b and b["clip_image"].shape == (4, 3, 32, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_matches_the_cpu_graph_on_every_batch(manifest):
    """nvJPEG ("mixed", chroma upsampled as on the CPU) and the GPU operators give the CPU graph's
    views on every batch of an epoch, within GPU_CPU_TOLERANCE (pipeline/dali_pipeline.py says why);
    a batch with a late replacement on one side would be counted, not compared. The CPU tests above
    cover the same graph definition and the same parameter draws."""
    from pipeline.dali_pipeline import GPU_CPU_TOLERANCE, graph_agreement
    first = next(iter(loader(manifest, device="gpu", device_id=0)))
    assert first["clip_image"].is_cuda and first["clip_image"].dtype == torch.float32
    gpu = loader(manifest, device="gpu", device_id=0)
    r = graph_agreement(loader(manifest), gpu, ["clip_image", "ssl_image_1", "ssl_image_2"])
    print(f"GPU vs CPU graph, {r['compared']}/{r['batches']} batches: mean |diff| {r['mean']:.4f}, "
          f"max {r['max']:.3f} (tolerance {GPU_CPU_TOLERANCE}); per view {r['views']}")
    assert r["batches"] == gpu.steps_per_epoch == 12
    assert r["late_replaced"] == 0 and r["text_mismatch"] == 0      # the fixture has no bad sample
    assert r["mean"] <= GPU_CPU_TOLERANCE["mean"] and r["max"] <= GPU_CPU_TOLERANCE["max"], r


def test_pillow_backend_is_cpu_only_and_backends_are_checked(manifest):
    with pytest.raises(ValueError, match="pillow backend runs on the CPU"):
        loader(manifest, backend="pillow", device="gpu", device_id=0)
    with pytest.raises(ValueError, match="backend"):
        loader(manifest, backend="opencv")


def test_pillow_output_memory_is_reused_only_after_release(manifest):
    """Recycled output buffers never overwrite a batch the consumer still holds."""
    ld = loader(manifest, backend="pillow", prefetch=1)
    held = [b["clip_image"][:2] for b in ld]          # views of every batch, kept
    kept = [h.clone() for h in held]
    fresh = [b["clip_image"] for b in loader(manifest, backend="pillow", prefetch=1)]
    assert all(torch.equal(h, k) and torch.equal(h, f[:2]) for h, k, f in zip(held, kept, fresh))
    assert len({h.data_ptr() for h in held}) == len(held)
    # once released, memory is reused: a long epoch needs only a few buffers
    ptrs = {b["clip_image"].data_ptr() for b in loader(manifest, backend="pillow", prefetch=1)}
    assert len(ptrs) < len(held)


def test_resume_with_another_run_shape_keeps_the_epoch_fraction_and_warns(manifest):
    a = loader(manifest, batch_size=4)            # 12 batches an epoch
    it = iter(a)
    for _ in range(6):
        next(it)
    b = loader(manifest, batch_size=8)            # 6 batches an epoch
    with pytest.warns(UserWarning, match="does not continue exactly"):
        b.load_state_dict(a.state_dict())
    assert (b.epoch, b.step) == (0, 3)
    assert len(list(b)) == 3


# ---------------------------------------------------------------- the augmenter seam

@both_backends
def test_augmenters_name_the_sample_that_broke_a_batch(manifest, backend):
    """A plan with one undecodable image (one the loader's own checks would have rejected, put into
    the plan by hand) fails in either augmenter with the one shared error, naming that sample as a
    late decode failure; the loader relies on this to replace it."""
    plan = loader(manifest).make_batch(0, 0)
    noise = encode(np.random.default_rng(0).integers(0, 255, (200, 200, 3)))
    encoded = list(plan.encoded)
    encoded[2] = np.frombuffer(noise[:len(noise) // 2], np.uint8)     # header fine, decoding fails
    broken = dataclasses.replace(plan, encoded=encoded)
    aug = make_augmenter(backend, RECIPE, lambda: broken, len(plan), num_threads=1, prefetch=1)
    with pytest.raises(BadSampleError) as e:
        aug.run()
    aug.close()
    assert e.value.samples == {int(plan.indices[2]): "late_decode_failure"}
    aug = make_augmenter(backend, RECIPE, lambda: plan, len(plan), num_threads=1, prefetch=1)
    views, got = aug.run()
    aug.close()
    assert got is plan and list(views) == ["clip_image", "ssl_image_1", "ssl_image_2"]


class LabelledLoader(SLIPLoader):
    """A loader whose plans carry class labels, as a classification loader's would."""

    def make_batch(self, epoch, step):
        plan = super().make_batch(epoch, step)
        return dataclasses.replace(plan, labels=plan.indices % 7)


def test_labels_and_the_batch_transform_pass_the_seam(manifest):
    seen = []

    def transform(batch):      # a batch-level operation after the augmenter, e.g. mixup
        seen.append(batch["index"].clone())
        return {**batch, "clip_image": batch["clip_image"].flip(0), "mixed": True}

    plain = next(iter(loader(manifest)))
    assert "label" not in plain
    ld = LabelledLoader(manifest, RECIPE, 4, chars, num_threads=1, batch_transform=transform)
    got = next(iter(ld))
    assert got["mixed"] and len(seen) == 1 and torch.equal(seen[0], got["index"])
    assert torch.equal(got["label"], got["index"] % 7)
    assert torch.equal(got["clip_image"], plain["clip_image"].flip(0))
    assert torch.equal(got["text"], plain["text"]) and torch.equal(got["index"], plain["index"])


# ---------------------------------------------------------------- tar members -> samples

def test_member_names_split_as_webdataset_splits_them():
    from webdataset.tariterators import base_plus_ext
    names = ["000001.jpg", "000001.seg.png", "a/b/000002.JSON", "dir.v2/000003.txt", "dir.v2/noext",
             ".hidden", "a/.hidden.jpg", "noext", "x.", "a.b.c/d.e.f", "a/b.c/d", "./k.jpg", "k..jpg", "/k.jpg",
             "a\nb/c.jpg", "k.jpg\n", "", ".", "a/", "a/.b"]
    for name in names:
        want = base_plus_ext(name)
        assert split_member_name(name) == (None if want == (None, None) else want), name


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    return buf.getvalue()


def test_tar_members_group_into_consecutive_samples():
    data = tar_bytes([("a/01.jpg", b"1"), ("a/01.JSON", b"{}"), ("a/01.txt", b"t"), ("README", b"r"),
                      ("a/02.jpg", b"22" * 400), ("a/02.txt", b"u"), ("a/01.cls", b"3")])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        samples = [(key, {ext: tar.extractfile(m).read() for ext, m in parts.items()})
                   for key, parts in iter_tar_samples(tar)]
    # consecutive runs, as webdataset and DALI's indexer group: a key that comes back is a new sample
    assert samples == [("a/01", {"jpg": b"1", "json": b"{}", "txt": b"t"}),
                       ("a/02", {"jpg": b"22" * 400, "txt": b"u"}), ("a/01", {"cls": b"3"})]
    # a damaged tar gives what was read before the damage, then the read error
    cut = data[:data.index(b"22" * 400) + 100]
    got = []
    with pytest.raises((tarfile.TarError, OSError, EOFError)):
        with tarfile.open(fileobj=io.BytesIO(cut)) as tar:
            for key, parts in iter_tar_samples(tar):
                got.append((key, sorted(parts)))
    assert got[0] == ("a/01", ["jpg", "json", "txt"]) and got[-1][0] == "a/02"
