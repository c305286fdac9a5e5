"""The finetuning building blocks, each on its own: stochastic depth, the classifier and where its
tower comes from, layer-wise lr decay, random erasing, mixup / cutmix targets, RandAugment."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.batch_mix import (MixDraw, MixRecipe, apply_erasing, apply_mix, draw_erasing, draw_mix,
                                smooth_one_hot)
from pipeline.rand_augment import (OPS, SIGNED, RandAugmentRecipe, apply_op, draw_rand_augment, fill_colour)
from trainer.classifier import ImageClassifier, load_image_tower
from trainer.config import RunConfig, to_dict
from trainer.convert.mapping import ConversionError
from trainer.models import Block, ModelConfig, build_model, drop_path_rates
from trainer.optim import WarmupCosine, build_optimizer, OptimConfig, vit_layer_id

TINY = ModelConfig.preset("vit_tiny")


# ------------------------------------------------------------------ stochastic depth

def test_drop_path_rates_rise_linearly_and_are_off_by_default():
    assert drop_path_rates(0.1, 4) == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    model = ImageClassifier(ModelConfig.preset("vit_tiny", drop_path=0.3), 10)
    assert [b.drop_path for b in model.visual.transformer.blocks] == pytest.approx([0, 0.1, 0.2, 0.3])
    assert all(b.drop_path == 0 for b in build_model(TINY, "slip").visual.transformer.blocks)


def test_drop_path_drops_whole_samples_at_its_rate_keeps_the_mean_and_is_off_in_eval():
    torch.manual_seed(0)
    block = Block(16, 2, 4.0, torch.nn.GELU, causal=False, eps=1e-6, drop_path=0.4)
    with torch.no_grad():
        block.mlp[2].weight.zero_()        # leave only the attention branch, to see it dropped
        block.mlp[2].bias.zero_()
        x = torch.randn(4000, 5, 16)
        branch = block.attn(block.norm1(x))
        block.train()
        out = block(x)
    dropped = torch.isclose(out, x, atol=1e-6).flatten(1).all(1)
    kept = torch.isclose(out, x + branch / 0.6, atol=1e-4).flatten(1).all(1)
    assert bool((dropped | kept).all())                # each sample all dropped or all kept
    assert dropped.float().mean().item() == pytest.approx(0.4, abs=0.03)
    assert (out - x).mean().item() == pytest.approx(branch.mean().item(), abs=0.02)
    block.eval()
    with torch.no_grad():
        assert torch.allclose(block(x), x + branch, atol=1e-5)


# ------------------------------------------------------------------ the classifier and its tower

def _our_checkpoint(path, objective: str, cfg: ModelConfig = TINY, seed: int = 0) -> torch.nn.Module:
    """A checkpoint in the trainer's format (weights + the run configuration stored inside)."""
    torch.manual_seed(seed)
    model = build_model(cfg, objective)
    run = RunConfig(model=cfg)
    run.objective.name = objective
    torch.save({"model": model.state_dict(), "config": to_dict(run), "step": 1}, path)
    return model


@pytest.mark.parametrize("objective", ["clip", "simclr", "slip", "nclip", "xclip"])
def test_the_image_tower_of_any_pretraining_objective_loads_and_nothing_else(tmp_path, objective):
    source = _our_checkpoint(tmp_path / "ckpt.pt", objective)
    model = ImageClassifier(TINY, num_classes=7)
    head_before = model.head.weight.detach().clone()
    assert "checkpoint" in load_image_tower(model, tmp_path / "ckpt.pt")
    for name, value in source.visual.state_dict().items():
        assert torch.equal(model.visual.state_dict()[name], value), name
    assert torch.equal(model.head.weight, head_before)
    assert set(model.state_dict()) == {f"visual.{k}" for k in source.visual.state_dict()} | {"head.weight", "head.bias"}


def test_the_fresh_head_starts_small():
    model = ImageClassifier(TINY, num_classes=100)
    assert model.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.1)   # BEiT: std 0.02, x 1e-3
    assert model.head.weight.abs().max().item() < 0.001 * 0.2
    assert model.head.bias.abs().max().item() == 0
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 100)


def test_a_tower_of_another_architecture_is_one_line_naming_the_difference(tmp_path):
    _our_checkpoint(tmp_path / "ckpt.pt", "slip", ModelConfig.preset("vit_tiny", vision_layers=2))
    with pytest.raises(ConversionError) as e:
        load_image_tower(ImageClassifier(TINY, 5), tmp_path / "ckpt.pt")
    assert "model.vision_layers: checkpoint 2, config 4" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ layer-wise lr decay

def test_layer_wise_decay_gives_the_documented_per_layer_lr_and_beits_weight_decay_exclusions():
    layers, decay, base = TINY.vision_layers, 0.65, 4e-3
    model = ImageClassifier(TINY, 10)
    opt = build_optimizer(model, OptimConfig(lr=base, weight_decay=0.05),
                          extra_no_decay=("pos_embed", "cls_token"),
                          layer_id=lambda n: vit_layer_id(n, layers), layer_decay=decay, num_layers=layers)
    WarmupCosine(opt, base, warmup_steps=0, total_steps=10)
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected_layer = {"visual.patch_embed.weight": 0, "visual.cls_token": 0, "visual.pos_embed": 0,
                      "visual.transformer.blocks.0.attn.qkv.weight": 1,
                      "visual.transformer.blocks.3.mlp.0.weight": 4, "visual.norm.weight": 5, "head.weight": 5}
    for name, layer in expected_layer.items():
        assert where[id(named[name])]["lr"] == pytest.approx(base * decay ** (layers + 1 - layer)), name
    assert where[id(named["head.weight"])]["lr"] == pytest.approx(base)
    for name in ("visual.pos_embed", "visual.cls_token", "visual.norm.weight", "head.bias",
                 "visual.transformer.blocks.0.attn.qkv.bias"):
        assert where[id(named[name])]["weight_decay"] == 0.0, name
    for name in ("visual.patch_embed.weight", "head.weight", "visual.transformer.blocks.1.mlp.2.weight"):
        assert where[id(named[name])]["weight_decay"] == 0.05, name


# ------------------------------------------------------------------ mixup and cutmix

def test_cutmix_targets_sum_to_one_and_match_the_pasted_box_area():
    rng, recipe = np.random.default_rng(0), MixRecipe(switch_prob=1.0)
    labels = torch.tensor([0, 1, 2, 3, 4])
    for _ in range(50):
        draw = draw_mix(rng, recipe, 32, 48)
        assert draw.mode == "cutmix"
        images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 32, 48).clone()
        mixed, target = apply_mix(images, labels, draw, num_classes=6, smoothing=0.1)
        assert torch.allclose(target.sum(1), torch.ones(5))
        pasted = (mixed != torch.arange(5.0).view(5, 1, 1, 1)).float()[:, 0].mean((1, 2))
        kept_share = 1 - pasted[0].item()            # sample 0 takes its box from sample 4
        assert draw.lam == pytest.approx(kept_share)
        top, bottom, left, right = draw.box
        assert draw.lam == pytest.approx(1 - (bottom - top) * (right - left) / (32 * 48))
        y = smooth_one_hot(labels, 6, 0.1)
        assert torch.allclose(target, draw.lam * y + (1 - draw.lam) * y.flip(0))


def test_mixup_blends_pixels_and_targets_with_one_lambda_drawn_from_beta():
    rng, recipe = np.random.default_rng(1), MixRecipe(switch_prob=0.0)
    lams = []
    for _ in range(2000):
        draw = draw_mix(rng, recipe, 8, 8)
        assert draw.mode == "mixup"
        lams.append(draw.lam)
    a = recipe.mixup_alpha
    assert np.mean(lams) == pytest.approx(0.5, abs=0.02)
    assert np.var(lams) == pytest.approx(a * a / ((2 * a) ** 2 * (2 * a + 1)), abs=0.01)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([1, 0, 2, 2])
    original = images.clone()
    mixed, target = apply_mix(images, labels, MixDraw("mixup", 0.3), num_classes=3, smoothing=0.0)
    assert torch.allclose(mixed, 0.3 * original + 0.7 * original.flip(0))
    assert torch.allclose(target.sum(1), torch.ones(4))
    assert target[0].tolist() == pytest.approx([0.0, 0.3, 0.7])


def test_half_the_mixed_batches_are_cutmix_and_the_draw_stream_does_not_depend_on_the_outcome():
    rng = np.random.default_rng(2)
    modes = [draw_mix(rng, MixRecipe(), 16, 16).mode for _ in range(2000)]
    assert modes.count("cutmix") / 2000 == pytest.approx(0.5, abs=0.04)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    draw_mix(a, MixRecipe(prob=0.0), 16, 16)
    draw_mix(b, MixRecipe(), 16, 16)
    assert a.random() == b.random()


def test_smoothed_one_hot_is_timms():
    y = smooth_one_hot(torch.tensor([2]), 4, 0.1)
    assert y[0].tolist() == pytest.approx([0.025, 0.025, 0.925, 0.025])


# ------------------------------------------------------------------ random erasing

def test_random_erasing_boxes_follow_timms_distribution_and_the_noise_is_reproducible():
    recipe, rng = MixRecipe(), np.random.default_rng(4)
    draw = draw_erasing(rng, recipe, 4000, 64, 48)
    h, w = draw.boxes[:, 2], draw.boxes[:, 3]
    erased = h > 0
    assert erased.mean() == pytest.approx(0.25, abs=0.025)
    area = h[erased] * w[erased] / (64 * 48)
    assert area.min() > 0.01 and area.max() < 0.36
    assert (h[erased] < 64).all() and (w[erased] < 48).all()
    assert (draw.boxes[:, 0] + h <= 64).all() and (draw.boxes[:, 1] + w <= 48).all()
    small = draw_erasing(np.random.default_rng(5), MixRecipe(erasing_prob=1.0), 3, 64, 48)
    one, two = apply_erasing(torch.zeros(3, 3, 64, 48), small), apply_erasing(torch.zeros(3, 3, 64, 48), small)
    assert torch.equal(one, two)
    for i, (top, left, bh, bw) in enumerate(small.boxes.tolist()):
        inside = one[i, :, top:top + bh, left:left + bw]
        assert inside.std().item() == pytest.approx(1.0, abs=0.2)
        assert one[i].abs().sum().item() == pytest.approx(inside.abs().sum().item())


# ------------------------------------------------------------------ RandAugment

def test_rand_augment_draws_are_timms_rand_m9_mstd05_inc1():
    draw = draw_rand_augment(np.random.default_rng(6), RandAugmentRecipe(), 30000)
    assert draw.op.shape == (30000, 2) and len(OPS) == 15
    counts = np.bincount(draw.op.ravel(), minlength=15)
    expected = draw.op.size / 15
    assert ((counts - expected) ** 2 / expected).sum() < 40        # chi-square, 14 dof: p ~ 3e-4
    assert draw.apply.mean() == pytest.approx(0.5, abs=0.01)
    rotate = draw.argument[draw.op == OPS.index("Rotate")]
    assert (rotate > 0).mean() == pytest.approx(0.5, abs=0.03)
    # |angle| = 3 m with m ~ N(9, 0.5) clipped to [0, 10]
    assert np.abs(rotate).mean() == pytest.approx(27.0, abs=0.15)
    assert np.abs(rotate).std() == pytest.approx(1.5, abs=0.15)
    assert np.abs(rotate).max() <= 30.0
    # bits kept: 4 - int(4 m / 10): 2 below m = 7.5, 1 up to 10, 0 at 10 exactly
    assert set(np.unique(draw.argument[draw.op == OPS.index("PosterizeIncreasing")])) <= {0.0, 1.0, 2.0}
    bright = draw.argument[draw.op == OPS.index("BrightnessIncreasing")]
    assert bright.min() >= 0.1 and bright.max() <= 1.9


def _image(seed=0, size=(24, 16)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize("name, arg, expect", [
    ("Invert", 0.0, lambda x: 255 - x),
    ("SolarizeIncreasing", 30.0, lambda x: np.where(x >= 30, 255 - x, x)),
    ("SolarizeAdd", 99.0, lambda x: np.where(x < 128, np.minimum(255, x + 99), x)),
    ("PosterizeIncreasing", 1.0, lambda x: x & 0x80),
    ("BrightnessIncreasing", 0.5, lambda x: np.round(x * 0.5)),
    ("TranslateXRel", 0.25, lambda x: np.concatenate([x[:, 4:], np.broadcast_to([124, 116, 104], (24, 4, 3))], 1)),
])
def test_rand_augment_operations_do_what_their_table_says(name, arg, expect):
    img = _image()
    out = np.asarray(apply_op(img, name, arg, fill_colour((0.485, 0.456, 0.406))), dtype=np.int64)
    assert np.abs(out - expect(np.asarray(img, dtype=np.int64))).max() <= 1


def test_every_operation_runs_and_the_signed_ones_are_identities_at_zero_strength():
    img, fill = _image(1), (124, 116, 104)
    for name in OPS:
        out = apply_op(img, name, 0.0 if name in SIGNED and not name.endswith("Increasing") else 1.0, fill)
        assert out.size == img.size and out.mode == "RGB"
        if name in SIGNED:
            assert np.array_equal(np.asarray(out), np.asarray(img)), name


def test_layer_ids_through_the_finetuning_groups_include_the_openai_stem_norm():
    from trainer.finetune import ClassifierForward, group_options
    cfg = RunConfig(model=ModelConfig.preset("vit_tiny", vision_ln_pre=True))
    cfg.objective.name, cfg.data.train = "classification", "unused"
    model = ClassifierForward(ImageClassifier(cfg.model, 10))
    opt = build_optimizer(model, OptimConfig(lr=1.0, weight_decay=0.05), **group_options(cfg))
    WarmupCosine(opt, 1.0, warmup_steps=0, total_steps=10)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    decay, layers = cfg.finetune.layer_decay, cfg.model.vision_layers
    for name, layer in (("model.visual.norm_pre.weight", 0), ("model.visual.cls_token", 0),
                        ("model.visual.transformer.blocks.2.attn.proj.weight", 3), ("model.head.weight", layers + 1)):
        assert lr[id(named[name])] == pytest.approx(decay ** (layers + 1 - layer)), name


def test_the_finetuning_view_flips_half_the_images_and_crops_8_to_100_percent():
    from pipeline.recipe import AugmentationRecipe
    from pipeline.view_params import sample_view
    recipe = AugmentationRecipe(image_size=64, num_ssl_views=0, clip_scale=(0.08, 1.0), clip_flip_prob=0.5)
    n = 20000
    view = sample_view(np.random.default_rng(7), np.full(n, 300), np.full(n, 400), recipe, ssl=False)
    assert view.flip.mean() == pytest.approx(0.5, abs=0.015)
    area = view.crop_area_fraction()
    assert area.min() >= 0.079 and area.max() <= 1.0
    # area ~ U(0.08, 1) among the tries that fit: large areas at extreme aspects do not fit a 3:4 image,
    # so the whole range is reached but the mean sits below 0.54
    assert (area < 0.1).any() and (area > 0.95).any() and 0.35 < area.mean() < 0.55
    mirrored = view.roi_start[:, 1] > view.roi_end[:, 1]
    assert np.array_equal(mirrored, view.flip)


def test_cutmix_lambda_spans_the_range_and_the_clipped_box_only_raises_it():
    rng, recipe = np.random.default_rng(8), MixRecipe(switch_prob=1.0)
    draws = [draw_mix(rng, recipe, 224, 224) for _ in range(3000)]
    lams = np.array([d.lam for d in draws])
    # Beta(1, 1) before the correction; a box clipped at the border pastes less, so lambda only grows
    assert np.histogram(lams, bins=4, range=(0, 1))[0].min() > 30      # small lambdas: big boxes, mostly clipped
    assert 0.5 < lams.mean() < 0.75
