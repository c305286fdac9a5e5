"""The augmentations follow the recipe: first the parameter draws over thousands of samples, then
both real augmentation paths (the DALI graph on the CPU, and pillow-simd) on images whose pixels
encode their coordinates, so each output view shows which crop, flip, colour and blur was applied."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.dali_pipeline import dali_inputs, input_names
from pipeline.loader import SLIPLoader
from pipeline.manifest import load_manifest
from pipeline.recipe import AugmentationRecipe
from pipeline.view_params import blur_kernels, color_matrix, random_resized_crop, sample_view
from shard_testing import both_backends, chars, coordinate_image, encode, write_shards

N = 4000
RECIPE = AugmentationRecipe()


def binomial_ok(hits: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1




# ---------------------------------------------------------------- parameter draws

def torchvision_crop(rnd, h, w, scale, ratio):
    """RandomResizedCrop.get_params as torchvision writes it, one sample at a time."""
    area = h * w
    for _ in range(10):
        target = area * rnd.uniform(*scale)
        aspect = math.exp(rnd.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rnd.randint(0, h - ch), rnd.randint(0, w - cw), ch, cw
    r = w / h
    if r < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif r > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def ks_distance(a, b) -> float:
    grid = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                        - np.searchsorted(np.sort(b), grid, "right") / len(b)).max())


def test_crops_match_torchvision_distribution():
    import random
    rng, rnd = np.random.default_rng(0), random.Random(0)
    h = rng.integers(200, 400, N)
    w = rng.integers(200, 500, N)
    for scale in (RECIPE.clip_scale, RECIPE.ssl_scale):
        top, left, ch, cw = random_resized_crop(rng, h, w, scale, RECIPE.ratio).T
        assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
        ref = np.array([torchvision_crop(rnd, int(a), int(b), scale, RECIPE.ratio) for a, b in zip(h, w)])
        for ours, theirs in ((ch * cw / (h * w), ref[:, 2] * ref[:, 3] / (h * w)),
                             (np.log(cw / ch), np.log(ref[:, 3] / ref[:, 2])),
                             (top / (h - ch + 1), ref[:, 0] / (h - ref[:, 2] + 1))):
            assert ks_distance(ours, theirs) < 0.05      # two-sample KS, 4000 each: p ~ 1e-4 at 0.05
        frac = ch * cw / (h * w)
        assert frac.min() >= scale[0] - 0.01 and frac.max() <= scale[1] + 0.01


def test_crop_area_and_log_ratio_uniform_when_every_draw_fits():
    rng = np.random.default_rng(1)
    h = w = np.full(N, 1000)
    scale = (0.08, 0.5)     # on a square image every ratio in [3/4, 4/3] fits: no rejection
    _, _, ch, cw = random_resized_crop(rng, h, w, scale, RECIPE.ratio).T
    frac, log_r = ch * cw / 1e6, np.log(cw / ch)
    u_frac = (frac - scale[0]) / (scale[1] - scale[0])
    u_ratio = (log_r - math.log(3 / 4)) / (math.log(4 / 3) - math.log(3 / 4))
    uniform = np.linspace(0, 1, N)
    assert ks_distance(u_frac, uniform) < 0.04 and ks_distance(u_ratio, uniform) < 0.04


def test_crop_falls_back_to_a_centre_crop_for_extreme_images():
    rng = np.random.default_rng(1)
    h, w = np.full(200, 10), np.full(200, 1000)    # aspect 100: no window of ratio <= 4/3 can reach 8 %
    top, left, ch, cw = random_resized_crop(rng, h, w, (0.9, 1.0), RECIPE.ratio).T
    assert (ch == 10).all() and (cw == round(10 * 4 / 3)).all() and (left == (1000 - cw) // 2).all()


def test_ssl_view_probabilities_and_ranges():
    rng = np.random.default_rng(2)
    h, w = np.full(N, 300), np.full(N, 400)
    p = sample_view(rng, h, w, RECIPE, ssl=True)
    assert binomial_ok(p.flip.sum(), N, RECIPE.flip_prob)
    assert binomial_ok(p.jitter.sum(), N, RECIPE.jitter_prob)
    assert binomial_ok(p.gray.sum(), N, RECIPE.grayscale_prob)
    assert binomial_ok((p.blur_sigma > 0).sum(), N, RECIPE.blur_prob)
    s = p.blur_sigma[p.blur_sigma > 0]
    assert s.min() >= 0.1 and s.max() <= 2.0
    j = p.jitter
    assert (p.brightness[~j] == 1).all() and (p.hue[~j] == 0).all()
    assert p.brightness[j].min() >= 0.6 and p.brightness[j].max() <= 1.4
    assert p.contrast[j].min() >= 0.6 and p.contrast[j].max() <= 1.4
    assert np.abs(p.hue[j]).max() <= 36.0 + 1e-4 and np.abs(p.hue[j]).max() > 30
    assert (p.saturation[p.gray] == 0).all()
    # flipped windows are mirrored, not moved
    assert (p.roi_start[p.flip, 1] > p.roi_end[p.flip, 1]).all()
    assert (p.roi_start[~p.flip, 1] < p.roi_end[~p.flip, 1]).all()
    clip = sample_view(rng, h, w, RECIPE, ssl=False)
    assert not clip.flip.any() and (clip.crop_area_fraction() >= 0.5 - 0.01).all()


def test_color_matrix_semantics():
    rng = np.random.default_rng(3)
    p = sample_view(rng, np.full(64, 100), np.full(64, 100), RECIPE, ssl=True)
    mt = color_matrix(p).astype(np.float64)
    grey = np.array([100.0, 100.0, 100.0, 1.0])
    # without jitter, grey stays grey; a gray sample maps every colour to its luma
    for i in range(64):
        out = mt[i] @ grey
        expected = p.brightness[i] * p.contrast[i] * 100 + (1 - p.contrast[i]) * 128
        assert np.allclose(out, expected, atol=1e-3)
        if p.gray[i]:
            rgb = np.array([200.0, 50.0, 10.0, 1.0])
            assert np.ptp(mt[i] @ rgb) < 1e-3
    ident = dataclasses.replace(p, brightness=np.ones(64, np.float32), contrast=np.ones(64, np.float32),
                                saturation=np.ones(64, np.float32), hue=np.zeros(64, np.float32))
    assert np.allclose(color_matrix(ident)[:, :, :3], np.eye(3), atol=1e-6)
    assert np.allclose(color_matrix(ident)[:, :, 3], 0, atol=1e-6)
    k = blur_kernels(np.array([0.0, 0.5, 2.0], np.float32))
    assert [len(x) for x in k] == [1, 5, 13] and all(abs(x.sum() - 1) < 1e-6 for x in k)


# ---------------------------------------------------------------- the real DALI graph

W, H, S = 160, 120, 48


@pytest.fixture(scope="module")
def coord_shards(tmp_path_factory):
    img = encode(coordinate_image(W, H), "PNG")   # lossless: pixel values are exact coordinates
    samples = [{"png": img, "txt": f"sample {i}", "json": '{"title": "sample %d"}' % i} for i in range(64)]
    return load_manifest(write_shards(tmp_path_factory.mktemp("coord"), samples, per_shard=32))


def run_views(manifest, recipe, steps: int = 2, batch: int = 32, seed: int = 0, backend: str = "dali"):
    """Raw uint8-range views (un-normalised) and the parameters drawn for them, as the DALI graph takes them."""
    loader = SLIPLoader(manifest, recipe, batch, chars, seed=seed, num_threads=2, backend=backend)
    views, params = [], []
    names = input_names(recipe)
    for step, b in zip(range(steps), loader):
        fed = dict(zip(names, dali_inputs(loader.make_batch(0, step), recipe)))
        mean = torch.tensor(recipe.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(recipe.std).view(1, 3, 1, 1) * 255
        views.append({k: (b[k] * std + mean).numpy() for k in b if k.endswith("image") or k.startswith("ssl_image")})
        params.append(fed)
    return views, params


def window_from_view(view: np.ndarray) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) relative, read from the coordinate encoding at the view's edges."""
    r, g = view[0], view[1]
    x0, x1 = r[:, 0].mean() / 255, r[:, -1].mean() / 255
    y0, y1 = g[0, :].mean() / 255, g[-1, :].mean() / 255
    return y0, x0, y1, x1


@both_backends
def test_views_apply_the_drawn_crop_and_flip(coord_shards, backend):
    recipe = dataclasses.replace(RECIPE, image_size=S, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    views, params = run_views(coord_shards, recipe, backend=backend)
    flips = 0
    for v, p in zip(views, params):
        for name, prefix in (("clip_image", "clip"), ("ssl_image_1", "ssl1"), ("ssl_image_2", "ssl2")):
            start, end = p[f"{prefix}_roi_start"], p[f"{prefix}_roi_end"]
            for i in range(len(start)):
                y0, x0, y1, x1 = window_from_view(v[name][i])
                # edge pixels sample half an output pixel inside the window
                tol_x = abs(end[i, 1] - start[i, 1]) / S + 3 / W
                tol_y = abs(end[i, 0] - start[i, 0]) / S + 3 / H
                assert abs(x0 - start[i, 1]) < tol_x and abs(x1 - end[i, 1]) < tol_x, (name, i)
                assert abs(y0 - start[i, 0]) < tol_y and abs(y1 - end[i, 0]) < tol_y, (name, i)
                flips += x0 > x1
    assert flips > 0
    # the two SimCLR views of a sample differ
    assert not np.allclose(views[0]["ssl_image_1"], views[0]["ssl_image_2"])


@both_backends
def test_views_apply_grayscale_and_jitter(coord_shards, backend):
    base = dataclasses.replace(RECIPE, image_size=S, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    plain, _ = run_views(coord_shards, base, steps=1, backend=backend)
    grey, _ = run_views(coord_shards, dataclasses.replace(base, grayscale_prob=1.0), steps=1, backend=backend)
    bright, bright_params = run_views(coord_shards, dataclasses.replace(
        base, jitter_prob=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0), steps=1, backend=backend)
    v, g, br = (x[0]["ssl_image_1"] for x in (plain, grey, bright))
    # grayscale: channels equal, and equal to the luma of the plain view (same crop: same draws)
    assert np.abs(g - g.mean(axis=1, keepdims=True)).max() < 1.5
    luma = 0.299 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2]
    assert np.abs(g[:, 0] - luma).max() < 2.0
    assert np.abs(v[:, 0] - v[:, 1]).mean() > 10          # the plain views are in colour
    # brightness: each view is the plain one scaled by its drawn factor (clipped to 255)
    factors = bright_params[0]["ssl1_color"][:, 0, 0]
    assert np.ptp(factors) > 0.3
    for i in range(len(factors)):
        expected = np.clip(v[i] * factors[i], 0, 255)
        assert np.abs(br[i] - expected).mean() < 2.0, i


@pytest.fixture(scope="module")
def board_shards(tmp_path_factory):
    board = (np.indices((96, 96)).sum(0) // 4 % 2 * 255)[..., None].repeat(3, -1)
    samples = [{"png": encode(board, "PNG"), "txt": "board"} for _ in range(32)]
    return load_manifest(write_shards(tmp_path_factory.mktemp("board"), samples, per_shard=32))


BOARD_RECIPE = dataclasses.replace(RECIPE, image_size=S, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
                                   ssl_scale=(0.2, 0.3))


@both_backends
def test_blur_strength_follows_sigma(board_shards, backend):
    """On a checkerboard, blurred SimCLR views lose most of their contrast; unblurred keep it."""
    m, base = board_shards, BOARD_RECIPE
    sharp, _ = run_views(m, base, steps=1, backend=backend)
    soft, p = run_views(m, dataclasses.replace(base, blur_prob=0.5), steps=1, backend=backend)
    blurred = np.array([len(k) > 1 for k in [x.ravel() for x in p[0]["ssl1_blur_h"]]])
    assert 4 <= blurred.sum() <= 28
    std_sharp = sharp[0]["ssl_image_1"].std(axis=(1, 2, 3))
    std_soft = soft[0]["ssl_image_1"].std(axis=(1, 2, 3))
    assert np.allclose(std_soft[~blurred], std_sharp[~blurred], atol=1e-3)
    sig = np.array([x.size for x in [y.ravel() for y in p[0]["ssl1_blur_h"]]])
    strong = blurred & (sig >= 9)          # sigma >= 1.4: a 4-pixel checker (upscaled) is mostly gone
    assert strong.any() and (std_soft[strong] < 0.85 * std_sharp[strong]).all()


@both_backends
def test_jitter_probability_in_the_outputs(coord_shards, backend):
    """Brightness-only jitter on a constant-mean image: the share of changed views is p=0.8."""
    recipe = dataclasses.replace(RECIPE, image_size=16, jitter_prob=0.8, brightness=0.4, contrast=0.0,
                                 saturation=0.0, hue=0.0, grayscale_prob=0.0, blur_prob=0.0)
    plain = dataclasses.replace(recipe, jitter_prob=0.0)
    a, _ = run_views(coord_shards, recipe, steps=2, batch=32, backend=backend)
    b, _ = run_views(coord_shards, plain, steps=2, batch=32, backend=backend)
    changed = n = 0
    for x, y in zip(a, b):
        for v in ("ssl_image_1", "ssl_image_2"):
            diff = np.abs(x[v] - y[v]).mean(axis=(1, 2, 3))
            changed += int((diff > 0.5).sum())
            n += len(diff)
    assert binomial_ok(changed, n, 0.8, sigmas=4), (changed, n)


def test_pillow_and_dali_paths_give_the_same_views(coord_shards, board_shards):
    """Same draws, two implementations: crop, flip, jitter and grayscale agree to rounding; the blur
    (PIL's box-approximated Gaussian against DALI's exact kernel) to a few grey levels, with the
    same loss of contrast per view."""
    recipe = dataclasses.replace(RECIPE, image_size=S, blur_prob=0.0)
    dali, _ = run_views(coord_shards, recipe, steps=1)
    pil, _ = run_views(coord_shards, recipe, steps=1, backend="pillow")
    for k in ("clip_image", "ssl_image_1", "ssl_image_2"):
        diff = np.abs(dali[0][k] - pil[0][k])
        assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 2.01, (k, diff.mean())
    blurred = dataclasses.replace(BOARD_RECIPE, blur_prob=1.0)
    dali, _ = run_views(board_shards, blurred, steps=1)
    pil, _ = run_views(board_shards, blurred, steps=1, backend="pillow")
    d, p = dali[0]["ssl_image_1"], pil[0]["ssl_image_1"]
    assert np.abs(d - p).mean() < 4.0
    d_std, p_std = d.std(axis=(1, 2, 3)), p.std(axis=(1, 2, 3))
    assert (np.abs(d_std - p_std) < 0.1 * d_std + 3).all(), np.c_[d_std, p_std]
    # antialias off: both sample the window plainly, and a 2x downscale of the board aliases
    shrink = dataclasses.replace(BOARD_RECIPE, clip_scale=(0.8, 1.0))
    plain = dataclasses.replace(shrink, antialias=False)
    dali, _ = run_views(board_shards, plain, steps=1)
    pil, _ = run_views(board_shards, plain, steps=1, backend="pillow")
    smooth, _ = run_views(board_shards, shrink, steps=1, backend="pillow")
    assert np.abs(dali[0]["clip_image"] - pil[0]["clip_image"]).mean() < 0.5
    assert pil[0]["clip_image"].std() > 1.15 * smooth[0]["clip_image"].std()


def test_pillow_decodes_big_jpegs_at_reduced_size_without_moving_the_views(tmp_path, monkeypatch):
    """Where every view of an image shrinks by 2x or more, libjpeg decodes at 1/2, 1/4 or 1/8 size
    (Image.draft); the views still show the drawn windows, as the full-size decode of DALI does."""
    from PIL import JpegImagePlugin
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        drafts.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    big = encode(coordinate_image(640, 480), "JPEG")
    samples = [{"jpg": big, "txt": f"big {i}"} for i in range(32)]
    m = load_manifest(write_shards(tmp_path, samples, per_shard=32))
    recipe = dataclasses.replace(RECIPE, image_size=S, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    pil, _ = run_views(m, recipe, steps=1, backend="pillow")
    reduced = [size for size in drafts if size[0] < 640 and size[1] < 480]
    assert len(reduced) >= 16, drafts          # most images decoded at a fraction of their size
    dali, _ = run_views(m, recipe, steps=1)
    for k in ("clip_image", "ssl_image_1", "ssl_image_2"):
        assert np.abs(dali[0][k] - pil[0][k]).mean() < 3.0, k
