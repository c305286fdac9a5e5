"""Models: shapes, parameter counts, initialisation, pooling, single-pass views, gradients, FLOPs."""
import math

import pytest
import torch

from model_testing import EOT, random_batch
from trainer.flops import count_flops, flops_per_sample
from trainer.dataclass_io import from_dict
from trainer.models import ModelConfig, SyncBatchNorm1d, build_model, resolve_ssl_norm
from trainer.objectives import PRETRAINING_OBJECTIVES as OBJECTIVES, ObjectiveConfig, build_objective

TINY = ModelConfig.preset("vit_tiny")


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(preset: str, objective: str = "slip"):
    with torch.device("meta"):
        return build_model(ModelConfig.preset(preset), objective)


# Reference counts: timm VisionTransformer trunks (num_classes=0) and OpenCLIP's text tower with
# its token embedding and text projection.
@pytest.mark.parametrize("preset,reference", [("vit_s16", 21.67e6), ("vit_b16", 85.80e6), ("vit_l16", 303.3e6)])
def test_vision_trunk_parameter_count(preset, reference):
    assert abs(n_params(meta_model(preset).visual) - reference) / reference < 0.01


def test_text_model_parameter_count():
    model = meta_model("vit_b16")
    count = n_params(model.text) + model.text_projection.numel()
    assert abs(count - 63.43e6) / 63.43e6 < 0.01
    assert model.text.token_embedding.weight.shape == (49408, 512)


def test_presets_follow_the_reference():
    s16 = ModelConfig.preset("vit_s16")
    assert (s16.vision_width, s16.vision_layers, s16.vision_heads) == (384, 12, 12)  # MoCo-v3 ViT-S
    l16 = ModelConfig.preset("vit_l16")
    assert (l16.vision_width, l16.vision_layers, l16.vision_heads) == (1024, 24, 16)
    b16 = from_dict(ModelConfig, {"preset": "vit_b16", "ssl_norm": "ln"})   # a YAML `model:` section
    assert (b16.text_width, b16.text_layers, b16.text_heads, b16.context_length) == (512, 12, 8, 77)
    assert b16.ssl_norm == "ln" and b16.embed_dim == 512
    with pytest.raises(ValueError, match="widht: unknown key"):
        from_dict(ModelConfig, {"preset": "vit_b16", "widht": 3})
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("vit_h14")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ModelConfig(image_size=100)


def test_openai_style_tower_options_are_off_by_default():
    """The options OpenAI-style towers need (trainer/convert) leave the presets' models unchanged:
    same parameters, same LayerNorm eps, same activations."""
    from trainer.models import QuickGELU
    default = build_model(TINY, "clip")
    keys = set(default.state_dict())
    assert "visual.patch_embed.bias" in keys and not any("norm_pre" in k for k in keys)
    assert isinstance(default.visual.norm_pre, torch.nn.Identity)
    assert default.visual.norm.eps == 1e-6 and default.text.ln_final.eps == 1e-5
    assert isinstance(default.visual.transformer.blocks[0].mlp[1], torch.nn.GELU)
    assert isinstance(default.text.transformer.blocks[0].mlp[1], QuickGELU)

    cfg = ModelConfig.preset("vit_tiny", vision_ln_pre=True, vision_patch_bias=False, vision_ln_eps=1e-5,
                             vision_act="quick_gelu", text_ln_eps=1e-6, text_act="gelu")
    openai = build_model(cfg, "clip")
    keys = set(openai.state_dict())
    assert {"visual.norm_pre.weight", "visual.norm_pre.bias"} <= keys and "visual.patch_embed.bias" not in keys
    assert openai.visual.norm_pre.eps == openai.visual.norm.eps == 1e-5 and openai.text.ln_final.eps == 1e-6
    assert isinstance(openai.visual.transformer.blocks[0].mlp[1], QuickGELU)
    assert isinstance(openai.text.transformer.blocks[0].mlp[1], torch.nn.GELU)
    images = random_batch(2)["clip_image"]
    assert openai.encode_image(images).shape == (2, cfg.embed_dim)
    with pytest.raises(ValueError, match="vision_act must be one of"):
        ModelConfig(vision_act="relu")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_output_shapes_and_encoders(objective):
    torch.manual_seed(0)
    model = build_model(TINY, objective)
    batch = random_batch(4)
    out = model(batch)
    expected = {"clip": {"image_embed", "text_embed", "logit_scale"},
                "simclr": {"ssl_embed_1", "ssl_embed_2"},
                "nclip": {"image_cluster_logits", "text_cluster_logits"}}
    keys = {"slip": expected["clip"] | expected["simclr"], "xclip": expected["clip"] | expected["nclip"]}
    assert set(out) == keys.get(objective, expected.get(objective))
    for k, v in out.items():
        want = {"image_embed": (4, 128), "text_embed": (4, 128), "logit_scale": (),
                "ssl_embed_1": (4, 64), "ssl_embed_2": (4, 64),
                "image_cluster_logits": (4, 1024), "text_cluster_logits": (4, 1024)}[k]
        assert tuple(v.shape) == want, k
    assert model.visual_features(batch["clip_image"]).shape == (4, TINY.vision_width)
    if objective == "simclr":
        with pytest.raises(RuntimeError, match="no text encoder"):
            model.encode_text(batch["text"])
        return
    img, txt = model.encode_image(batch["clip_image"]), model.encode_text(batch["text"])
    assert img.shape == txt.shape
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    assert not torch.allclose(model.encode_text(batch["text"], normalize=False).norm(dim=-1), torch.ones(4))


def test_ssl_views_are_required_for_ssl_objectives():
    batch = random_batch(2)
    del batch["ssl_image_1"], batch["ssl_image_2"]
    build_model(TINY, "clip")(batch)  # a CLIP run does not need them
    with pytest.raises(KeyError, match="num_ssl_views"):
        build_model(TINY, "slip")(batch)


def test_initialisation_and_logit_scale_clamp():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("vit_tiny", text_width=256, text_heads=4, embed_dim=256)
    model = build_model(cfg, "clip")
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.text.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.text.positional_embedding.std().item() == pytest.approx(0.01, rel=0.05)
    assert model.text_projection.std().item() == pytest.approx(256 ** -0.5, rel=0.05)
    assert model.image_projection.std().item() == pytest.approx(128 ** -0.5, rel=0.05)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0


def test_text_feature_is_taken_at_eot_with_causal_mask():
    torch.manual_seed(0)
    model = build_model(TINY, "clip").eval()
    tokens = random_batch(3)["text"]
    eot = tokens.argmax(-1)
    with torch.no_grad():
        base = model.encode_text(tokens)
        after = tokens.clone()  # tokens after EOT are invisible to the EOT position (causal mask)
        for i in range(3):
            after[i, eot[i] + 1:] = 123
        torch.testing.assert_close(model.encode_text(after), base)
        before = tokens.clone()  # tokens before EOT matter
        before[:, 1] = 321
        assert not torch.allclose(model.encode_text(before), base)
        # pooling is at argmax, i.e. the EOT id, wherever it is
        moved = tokens.clone()
        moved[0, eot[0]] = 5
        moved[0, 1] = EOT
        assert not torch.allclose(model.encode_text(moved)[0], base[0])


@pytest.mark.parametrize("norm", ["bn", "syncbn", "ln"])
def test_single_pass_views_equal_three_passes(norm):
    """Concatenated trunk pass == three passes, with per-view BN statistics in the SimCLR head."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("vit_tiny", ssl_norm=norm)
    single = build_model(cfg, "slip").double().train()
    separate = build_model(ModelConfig.preset("vit_tiny", ssl_norm=norm, single_pass_views=False), "slip").double()
    separate.load_state_dict(single.state_dict())
    batch = random_batch(6, dtype=torch.float64)
    # make the views differ in statistics so mixing them in one BN call would show
    batch["ssl_image_2"] = batch["ssl_image_2"] * 3 + 1
    a, b = single(batch), separate(batch)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-9)
    if norm != "ln":
        # and per-view statistics are really what the reference computes: head(view) on its own
        feats = separate.visual(batch["ssl_image_2"])
        torch.testing.assert_close(a["ssl_embed_2"], separate.ssl_head(feats), rtol=1e-9, atol=1e-9)
        mixed = separate.ssl_head(separate.visual(torch.cat([batch["ssl_image_1"], batch["ssl_image_2"]])))[6:]
        assert not torch.allclose(mixed, a["ssl_embed_2"], atol=1e-4)


def test_ssl_norm_auto_picks_batch_independent_norm_for_small_batches():
    assert resolve_ssl_norm(ModelConfig(), None) == "ln"
    assert resolve_ssl_norm(ModelConfig(), 16) == "ln"
    assert resolve_ssl_norm(ModelConfig(), 4096) == "bn"  # one process; "syncbn" under DDP
    assert resolve_ssl_norm(ModelConfig(ssl_norm="syncbn"), 8) == "syncbn"
    model = build_model(TINY, "slip", global_batch_size=8)
    assert isinstance(model.ssl_head.net[1], torch.nn.LayerNorm)
    model = build_model(ModelConfig.preset("vit_tiny", ssl_norm="syncbn"), "slip")
    assert isinstance(model.ssl_head.net[1], SyncBatchNorm1d)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_parameter_learns(objective):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("vit_tiny", ssl_norm="bn")
    model = build_model(cfg, objective)
    losses = build_objective(ObjectiveConfig(name=objective))(model(random_batch(4)))
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"{objective}: no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_model(TINY, "clip").double()
    ckpt = build_model(ModelConfig.preset("vit_tiny", grad_checkpointing=True), "clip").double()
    ckpt.load_state_dict(plain.state_dict())
    batch = random_batch(3, dtype=torch.float64)
    objective = build_objective(ObjectiveConfig(name="clip"))
    for m in (plain, ckpt):
        objective(m(batch))["loss"].backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_bf16_autocast_forward_and_backward():
    torch.manual_seed(0)
    model = build_model(TINY, "slip")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(random_batch(4))
        losses = build_objective(ObjectiveConfig(name="slip"))(out)
    assert out["image_embed"].dtype == torch.bfloat16
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_flops_vit_b16_slip_match_the_published_figures():
    c = flops_per_sample(ModelConfig.preset("vit_b16"), "slip")
    assert c.image_per_view / 1e9 == pytest.approx(35.1, rel=0.01)
    assert c.text / 1e9 == pytest.approx(6.0, rel=0.01)
    assert c.image_views == 3
    assert c.forward / 1e9 == pytest.approx(111, rel=0.01)
    assert c.train == 3 * c.forward
    clip = flops_per_sample(ModelConfig.preset("vit_b16"), "clip")
    assert clip.forward / 1e9 == pytest.approx(35.1 + 6.0, rel=0.01)


def test_flops_on_meta_equal_a_real_cpu_forward():
    """The meta-device count equals FlopCounterMode on a real forward (incl. CPU attention kernel)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("vit_tiny", single_pass_views=False), "slip")
    batch = random_batch(1)
    with torch.no_grad():
        real = count_flops(model, batch)
    assert real == flops_per_sample(TINY, "slip").forward
    # attention is included: a count from the formula 2*MACs for one view of the tiny ViT
    w, n, layers = TINY.vision_width, (64 // 8) ** 2 + 1, TINY.vision_layers
    per_block = 2 * n * (3 * w * w + w * w + 2 * 4 * w * w) + 2 * 2 * n * n * w
    expected = layers * per_block + 2 * (n - 1) * 3 * 8 * 8 * w
    assert flops_per_sample(TINY, "clip").image_per_view == expected


def test_model_compiles_as_one_graph():
    """torch.compile traces the whole forward without graph breaks (CPU: aot_eager backend, since
    inductor's C++ compile takes ~30 s here; the GPU test below runs inductor)."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("vit_tiny", image_size=32, vision_layers=1, text_layers=1, ssl_norm="bn")
    model = build_model(cfg, "slip")
    batch = random_batch(2, image_size=32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    objective = build_objective(ObjectiveConfig(name="slip"))
    objective(compiled(batch))["loss"].backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    objective(model(batch))["loss"].backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_bf16_on_gpu():
    """torch.compile + bf16 autocast + flash attention on GPU (CPU covers eager bf16 above)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("vit_tiny", ssl_norm="bn"), "slip").cuda()
    batch = {k: v.cuda() for k, v in random_batch(8).items()}
    objective = build_objective(ObjectiveConfig(name="slip"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = objective(model(batch))["loss"]
        compiled = objective(torch.compile(model)(batch))["loss"]
    compiled.backward()
    assert torch.isfinite(compiled)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
