"""The loader on labelled sets (finetuning): ImageFolder and labelled shards, labels through the
plan, bad samples counted, RandAugment / erasing / mixing drawn from the seeded stream, exact resume."""
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.batch_mix import MixRecipe
from pipeline.labelled import open_labelled
from pipeline.loader import SLIPLoader
from pipeline.rand_augment import RandAugmentRecipe
from pipeline.recipe import AugmentationRecipe
from shard_testing import encode


def _jpeg(label: int, seed: int, size=(40, 56)) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.zeros((*size, 3), np.uint8)
    img[..., label % 3] = 200                      # a class you can see: its colour channel
    img += rng.integers(0, 40, img.shape, dtype=np.uint8)
    return encode(img)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    for c, name in enumerate(["red", "green", "blue"]):
        (root / name).mkdir()
        for k in range(12):
            (root / name / f"{k:03d}.jpg").write_bytes(_jpeg(c, 100 * c + k))
    (root / "green" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "blue" / "notes.txt").write_text("not an image")
    return root


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled_shards")
    with tarfile.open(root / "0.tar", "w") as tar:
        for k in range(20):
            _add(tar, f"s{k:03d}.jpg", _jpeg(k % 3, k))
            _add(tar, f"s{k:03d}.cls", str(k % 3).encode())
        _add(tar, "nolabel.jpg", _jpeg(0, 99))
        _add(tar, "noimage.cls", b"1")
        _add(tar, "badlabel.jpg", _jpeg(0, 98))
        _add(tar, "badlabel.cls", b"cat")
        _add(tar, "outside.jpg", _jpeg(0, 97))
        _add(tar, "outside.cls", b"7")
    return root


def test_an_image_folder_lists_labels_by_class_folder_and_skips_non_images(folder):
    found = open_labelled(folder)
    assert found.classnames == ["blue", "green", "red"]
    assert len(found) == 37                        # 36 images + the broken one; notes.txt is not listed
    counts = np.bincount(found.labels)
    assert counts.tolist() == [12, 13, 12]


def test_labelled_shards_count_what_they_leave_out(shards):
    found = open_labelled(shards, classnames=["a", "b", "c"])
    assert len(found) == 20
    assert dict(found.skipped) == {"no_label": 1, "no_image": 1, "label_unreadable": 1, "label_not_a_class": 1}
    assert found.labels.tolist() == [k % 3 for k in range(20)]


def _recipe(**kw) -> AugmentationRecipe:
    return AugmentationRecipe(image_size=32, num_ssl_views=0, clip_scale=(0.08, 1.0), clip_flip_prob=0.5,
                              interpolation="bicubic", **kw)


def test_the_loader_yields_each_samples_label_and_replaces_the_corrupt_image(folder):
    data = open_labelled(folder)
    loader = SLIPLoader(data, _recipe(), 8, None, backend="pillow", seed=1)
    seen = []
    for _ in range(4):                             # 32 of the 37 samples an epoch: the broken one comes up
        for batch in loader:
            assert "text" not in batch and batch["clip_image"].shape == (8, 3, 32, 32)
            assert torch.equal(batch["label"], torch.from_numpy(data.labels[batch["index"].numpy()]))
            seen += batch["index"].tolist()
    broken = next(i for i, n in enumerate(data.names) if n.endswith("broken.jpg"))
    assert broken not in seen
    assert loader.bad_samples >= 1 and sum(loader.bad_reasons.values()) == loader.bad_samples


def test_finetuning_draws_and_resume_continues_bit_for_bit(folder):
    recipe = _recipe(rand_augment=RandAugmentRecipe(), mix=MixRecipe())
    data = open_labelled(folder)

    def batches(loader, n):
        out = []
        while len(out) < n:
            for b in loader:
                out.append(b)
                if len(out) == n:
                    break
        return out

    full = batches(SLIPLoader(data, recipe, 8, None, backend="pillow", seed=3), 6)
    first = SLIPLoader(data, recipe, 8, None, backend="pillow", seed=3)
    batches(first, 2)
    state = first.state_dict()
    resumed = SLIPLoader(data, recipe, 8, None, backend="pillow", seed=3)
    resumed.load_state_dict(state)
    rest = batches(resumed, 4)
    for a, b in zip(full[2:], rest):
        assert torch.equal(a["clip_image"], b["clip_image"]) and torch.equal(a["label"], b["label"])
        assert a["mix"] == b["mix"]
        assert np.array_equal(a["erasing"].boxes, b["erasing"].boxes)
    plan = resumed.make_batch(0, 1)
    assert plan.rand_augment is not None and plan.rand_augment.op.shape == (8, 2)


def test_pretraining_draws_are_unchanged_by_the_finetuning_fields(folder):
    data = open_labelled(folder)
    plain = SLIPLoader(data, AugmentationRecipe(image_size=32, num_ssl_views=0), 8, None, backend="pillow")
    plan = plain.make_batch(0, 0)
    assert plan.rand_augment is None and plan.mix is None and plan.erasing is None
    assert not plan.views["clip_image"].flip.any()


def test_rand_augment_changes_the_pixels_the_model_sees(folder):
    data = open_labelled(folder)
    off = SLIPLoader(data, _recipe(), 8, None, backend="pillow", seed=5)
    on = SLIPLoader(data, _recipe(rand_augment=RandAugmentRecipe(prob=1.0)), 8, None, backend="pillow", seed=5)
    a, b = next(iter(off)), next(iter(on))
    assert torch.equal(a["index"], b["index"])
    differs = (a["clip_image"] - b["clip_image"]).abs().flatten(1).amax(1) > 0.05
    assert differs.float().mean().item() > 0.7     # two operations on every image; a few are near-identities


def test_both_augmenters_give_the_same_finetuning_batches(folder):
    """Same samples, labels and draws; pixels within the two libraries' resampling differences."""
    data = open_labelled(folder)
    recipe = _recipe(rand_augment=RandAugmentRecipe(prob=1.0), mix=MixRecipe())
    pillow = next(iter(SLIPLoader(data, recipe, 8, None, backend="pillow", seed=9)))
    dali = next(iter(SLIPLoader(data, recipe, 8, None, backend="dali", seed=9)))
    for key in ("index", "label"):
        assert torch.equal(pillow[key], dali[key])
    assert pillow["mix"] == dali["mix"]
    gap = (pillow["clip_image"] - dali["clip_image"]).abs().mean().item()
    no_ra = next(iter(SLIPLoader(data, _recipe(), 8, None, backend="pillow", seed=9)))["clip_image"]
    effect = (pillow["clip_image"] - no_ra).abs().mean().item()
    assert gap < 0.1 * effect, (gap, effect)


def test_labelled_shards_take_class_names_from_a_classnames_txt_beside_them(shards, tmp_path):
    import shutil
    root = tmp_path / "dataset"
    shutil.copytree(shards, root / "train")
    (root / "classnames.txt").write_text("a\nb\nc\n")
    found = open_labelled(root / "train")
    assert found.classnames == ["a", "b", "c"] and found.skipped["label_not_a_class"] == 1
    assert open_labelled(shards, num_classes=2).labels.max() == 1      # no names: the range given


def _lossless_twins(tmp_path, n: int = 12):
    """The same noisy pixels as lossless WebP members (as the CLIP benchmark publishes) and as PNG."""
    import cv2
    roots = {ext: tmp_path / ext for ext in ("webp", "png")}
    rng = np.random.default_rng(5)
    tars = {}
    for ext, root in roots.items():
        root.mkdir()
        tars[ext] = tarfile.open(root / "0.tar", "w")
    for k in range(n):
        rgb = rng.integers(0, 256, (36 + k % 3, 44, 3), dtype=np.uint8)
        rgb[..., k % 3] //= 4                       # a class you can see: a darker channel
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        members = {"webp": cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes(),   # >100: lossless
                   "png": cv2.imencode(".png", bgr)[1].tobytes()}
        for ext, tar in tars.items():
            _add(tar, f"s{k:03d}.{ext}", members[ext])
            _add(tar, f"s{k:03d}.cls", str(k % 3).encode())
    for tar in tars.values():
        tar.close()
    assert members["webp"][:4] == b"RIFF"
    return {ext: open_labelled(root, classnames=["a", "b", "c"]) for ext, root in roots.items()}


def test_webp_shards_train_and_validate_exactly_like_their_png_twins(tmp_path, monkeypatch):
    """pillow-simd here cannot decode WebP: the pillow augmenter, the bad-sample scan and the validation
    hook open it through OpenCV, so WebP members give the very pixels of the same images in PNG."""
    from pipeline.augment import undecodable_samples
    from trainer.evaluation.data import EvalTransform
    from trainer.finetune import ValidationHook
    import pipeline.image_open
    monkeypatch.setattr(pipeline.image_open, "WEBP_IN_PIL", False)   # the OpenCV path, also under a Pillow with WebP
    sets = _lossless_twins(tmp_path)
    recipe = _recipe(rand_augment=RandAugmentRecipe())
    batches = {}
    for ext, data in sets.items():
        loader = SLIPLoader(data, recipe, 6, None, backend="pillow", seed=4)
        batches[ext] = [b for _, b in zip(range(2), loader)]
        assert loader.bad_samples == 0, (ext, loader.bad_reasons)
    for webp, png in zip(batches["webp"], batches["png"]):
        assert torch.equal(webp["label"], png["label"]) and torch.equal(webp["clip_image"], png["clip_image"])
    # a failed batch's scan names only the broken sample, never a good WebP
    plan = SLIPLoader(sets["webp"], recipe, 6, None, backend="pillow", seed=4).make_batch(0, 0)
    plan.encoded[1] = plan.encoded[1][:40]
    assert list(undecodable_samples(plan)) == [int(plan.indices[1])]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    results = {ext: ValidationHook(data, EvalTransform(32, 36), 5, torch.device("cpu"))(model, step=0)
               for ext, data in sets.items()}
    assert results["webp"]["val_bad_images"] == 0 and results["webp"]["val_images"] == 12
    assert results["webp"] == results["png"]
