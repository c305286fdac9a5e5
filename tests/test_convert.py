"""Checkpoint conversion (trainer/convert, tools/convert_checkpoint.py): exact round trips, equality
with what OpenCLIP, timm, torchvision and the SLIP reference compute, refusals, safe loading.

The reference numbers come from tests/fixtures/convert_*.json, made once with the real libraries by
tools/fixtures/make_conversion_fixtures.py; weights are not stored but regenerated here from each
case's seed with that tool's own `seeded_state_dict`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from trainer.checkpoint import load_model
from trainer.convert import (ConversionError, Converted, export_openclip, export_timm, init_from, known_models,
                             read_openclip, read_slip_reference, read_timm, tower_differences)
from trainer.convert.files import load_safetensors, write_json, write_safetensors
from trainer.convert.layout import Pair
from trainer.convert.openclip import OPENAI_MEAN, OPENAI_STD, layout, model_cfg, our_config
from trainer.convert.timm import image_tower_state, timm_config
from trainer.evaluation import EvalTransform
from trainer.models import ModelConfig, VisionTransformer, build_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TOL = 1e-4     # fp32, max abs difference of embeddings / features


def _load_maker():
    spec = importlib.util.spec_from_file_location("make_conversion_fixtures",
                                                  ROOT / "tools" / "fixtures" / "make_conversion_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _load_maker()


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"convert_{name}.json").read_text())


def cases(name: str) -> dict[str, dict]:
    return {c["name"]: c for c in fixture(name)["cases"]}


def padded(rows: list[list[int]], context_length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), context_length, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/convert_checkpoint.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def assert_close(ours: torch.Tensor, reference, what: str) -> None:
    diff = (ours.detach().float() - torch.tensor(reference)).abs().max().item()
    assert diff <= TOL, f"{what}: max abs difference {diff}"


def openai_style(**overrides) -> ModelConfig:
    """A tiny model with OpenAI-style towers (what OpenCLIP imports give), QuickGELU in both."""
    return ModelConfig.preset("vit_tiny", vision_ln_pre=True, vision_patch_bias=False, vision_ln_eps=1e-5,
                              vision_act="quick_gelu", **overrides)


def our_checkpoint(path: Path, cfg: ModelConfig, objective: str, seed: int = 0, mean=None, std=None):
    """One of our checkpoints with random weights (norms and biases moved off 1 and 0)."""
    torch.manual_seed(seed)
    model = build_model(cfg, objective).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    Converted(cfg, objective, model.state_dict(), mean or (0.485, 0.456, 0.406), std or (0.229, 0.224, 0.225),
              "test").save(path)
    return model


def openclip_folder(folder: Path, case: dict) -> dict[str, torch.Tensor]:
    """The fixture case as an OpenCLIP folder, its weights regenerated from the seed."""
    weights = MAKER.seeded_state_dict(case["state_shapes"], case["weight_seed"])
    write_safetensors(weights, folder / "open_clip_model.safetensors")
    write_json(case["open_clip_config"], folder / "open_clip_config.json")
    return weights


def assert_same_state(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(reference)
    for k in reference:
        assert torch.equal(ours[k], reference[k]), k


# ============================================================================ OpenCLIP

@pytest.mark.parametrize("name", ["tiny_native_quickgelu", "tiny_native_gelu_eps", "vit_b16_timm_tower"])
def test_openclip_import_equals_openclip_and_export_is_its_inverse(tmp_path, name):
    """OpenCLIP folder -> ours: the embeddings OpenCLIP computed; ours -> OpenCLIP: the same folder
    (config, key layout, every tensor bit for bit), so OpenCLIP loading our export computes them too."""
    case = cases("openclip")[name]
    weights = openclip_folder(tmp_path / "openclip", case)
    if name.startswith("tiny"):     # through the command line
        proc = run_tool("--from", "openclip", tmp_path / "openclip", tmp_path / "ours.pt")
        assert proc.returncode == 0, proc.stderr
        model, run_cfg = load_model(tmp_path / "ours.pt")
    else:                           # 150M parameters: once through the API
        converted = read_openclip(tmp_path / "openclip")
        model = build_model(converted.model, "clip").eval()
        model.load_state_dict(converted.state)
        run_cfg = converted.run_config()
    del weights["logit_scale"]      # compared below as a value
    size = case["open_clip_config"]["preprocess_cfg"]["size"]
    images = MAKER.seeded_images(case["num_images"], size, case["input_seed"])
    with torch.no_grad():
        assert_close(model.encode_image(images), case["image_embed"], "image embeddings")
        assert_close(model.encode_text(padded(case["tokens"], model.cfg.context_length)), case["text_embed"],
                     "text embeddings")
        if case["image_features"] is not None:
            assert_close(model.visual_features(images), case["image_features"], "pooled image features")
    assert model.logit_scale.item() == case["logit_scale"]
    assert list(run_cfg.data.recipe.mean) == case["open_clip_config"]["preprocess_cfg"]["mean"]

    export_openclip(model, run_cfg, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "open_clip_config.json").read_text())
    assert config == case["open_clip_config"]
    back = load_safetensors(tmp_path / "back" / "open_clip_model.safetensors")
    assert {k: list(v.shape) for k, v in back.items()} == case["state_shapes"]
    back.pop("logit_scale")
    assert_same_state(back, weights)


@pytest.mark.parametrize("preset,name", [("vit_b16", "vit_b16_timm_tower"), ("vit_l16", "vit_l16_timm_tower")])
def test_openclip_export_of_b16_and_l16_presets_has_openclips_layout(preset, name):
    """Our ViT-B/16 and ViT-L/16 presets export as OpenCLIP's timm-tower CLIP: the configuration and
    every parameter name and shape the real OpenCLIP model has (checked on the meta device)."""
    case = cases("openclip")[name]
    cfg = ModelConfig.preset(preset)
    assert model_cfg(cfg) == (case["open_clip_config"]["model_cfg"], "timm")
    with torch.device("meta"):
        state = build_model(cfg, "clip").state_dict()
    theirs = {p.theirs: list(p.form.to_theirs(state[p.ours]).shape) for p in layout(cfg, "timm")}
    assert theirs == case["state_shapes"]
    assert "Resize(size=224, interpolation=bicubic" in case["preprocess"]


@pytest.mark.parametrize("objective", ["clip", "slip", "xclip"])
def test_openclip_round_trip_is_exact_and_heads_are_dropped_with_a_note(tmp_path, objective):
    model = our_checkpoint(tmp_path / "ours.pt", openai_style(), objective, mean=OPENAI_MEAN, std=OPENAI_STD)
    proc = run_tool("--to", "openclip", tmp_path / "ours.pt", tmp_path / "oc")
    assert proc.returncode == 0, proc.stderr
    assert ("nCLIP heads" in proc.stdout) == (objective == "xclip")
    assert ("SimCLR head" in proc.stdout) == (objective == "slip")
    back = read_openclip(tmp_path / "oc")
    kept = {k: v for k, v in model.state_dict().items()
            if not k.startswith(("ssl_head.", "image_cluster_head.", "text_cluster_head.", "prototypes."))}
    assert_same_state(back.state, kept)
    assert tower_differences(back.model, model.cfg) == [] and back.model.embed_dim == model.cfg.embed_dim
    assert (back.mean, back.std) == (OPENAI_MEAN, OPENAI_STD)


@pytest.mark.parametrize("objective,expect", [("simclr", "no text tower"), ("nclip", "no contrastive projection"),
                                               ("clip", "OpenCLIP cannot hold this model exactly")])
def test_openclip_export_refuses_with_one_line_pointing_to_timm(tmp_path, objective, expect):
    our_checkpoint(tmp_path / "ours.pt", ModelConfig.preset("vit_tiny"), objective)
    proc = run_tool("--to", "openclip", tmp_path / "ours.pt", tmp_path / "oc")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "--to timm" in lines[0], proc.stderr
    assert not (tmp_path / "oc").exists()


def test_openclip_refuses_the_12_head_vit_s16():
    """timm's registered ViT-S/16 has 6 heads, and OpenCLIP's native tower would need the text
    tower's QuickGELU in the image tower: no exact OpenCLIP form."""
    with pytest.raises(ConversionError, match="12 heads.*--to timm"):
        model_cfg(ModelConfig.preset("vit_s16"))


def test_openclip_model_table_gives_head_counts_activation_and_openai_preprocessing(tmp_path):
    table = known_models()
    assert {"ViT-B-32", "ViT-B-16", "ViT-L-14"} <= set(table)
    l14, _ = our_config(table["ViT-L-14"], "l14", "table")
    assert (l14.vision_heads, l14.text_heads, l14.patch_size, l14.embed_dim, l14.text_width) == (16, 12, 14, 768, 768)
    b16, tower = our_config(table["ViT-B-16"], "b16", "table")
    assert tower == "native" and (b16.vision_act, b16.text_act) == ("gelu", "gelu")     # LAION's ViT-B-16
    openai, _ = our_config(table["ViT-B-32-quickgelu"], "b32", "table")
    assert (openai.vision_act, openai.text_act) == ("quick_gelu", "quick_gelu")
    assert (openai.vision_heads, openai.patch_size) == (12, 32)
    assert openai.vision_ln_pre and not openai.vision_patch_bias and openai.vision_ln_eps == openai.text_ln_eps == 1e-5

    # a bare weights file (an OpenAI-style tiny CLIP here): --model names the architecture, the
    # preprocessing defaults to OpenCLIP's (OpenAI's mean and std)
    cfg = openai_style()
    model = our_checkpoint(tmp_path / "ours.pt", cfg, "clip")
    export_openclip(model, load_model(tmp_path / "ours.pt")[1], tmp_path / "oc")
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in
                                           load_safetensors(tmp_path / "oc" / "open_clip_model.safetensors").items()}},
               weights)
    proc = run_tool("--from", "openclip", weights, tmp_path / "x.pt")
    assert proc.returncode == 2 and "pass --model" in proc.stderr and "ViT-B-16" in proc.stderr
    proc = run_tool("--from", "openclip", weights, "--model", "ViT-B-32", tmp_path / "x.pt")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "has shape" in proc.stderr
    converted = read_openclip(weights, mcfg=model_cfg(cfg)[0])
    assert (converted.mean, converted.std) == (OPENAI_MEAN, OPENAI_STD)
    assert_same_state(converted.state, model.state_dict())


def test_openclip_options_we_cannot_represent_are_refused(tmp_path):
    base = cases("openclip")["tiny_native_quickgelu"]["open_clip_config"]["model_cfg"]
    for section, key, value in (("vision_cfg", "attentional_pool", True), ("text_cfg", "hf_model_name", "bert"),
                                ("vision_cfg", "pool_type", "avg"), ("text_cfg", "mlp_ratio", 2.0),
                                ("vision_cfg", "act_kwargs", {"approximate": "tanh"}), ("", "init_logit_bias", -10)):
        mcfg = json.loads(json.dumps(base))
        (mcfg[section] if section else mcfg)[key] = value
        with pytest.raises(ConversionError, match=key):
            our_config(mcfg, "x", "cfg")


# ============================================================================ timm

@pytest.mark.parametrize("name", ["vit_tiny", "vit_s16_12_heads", "tiny_openai_style"])
def test_timm_import_equals_timm_and_export_is_its_inverse(tmp_path, name):
    case = cases("timm")[name]
    folder = tmp_path / "timm"
    weights = MAKER.seeded_state_dict(case["state_shapes"], case["weight_seed"])
    write_safetensors(weights, folder / "model.safetensors")
    write_json(case["config"], folder / "config.json")
    tower = read_timm(folder)
    trunk = VisionTransformer(tower.model).eval()
    trunk.load_state_dict({k[len("visual."):]: v for k, v in tower.state.items()})
    images = MAKER.seeded_images(case["num_images"], case["config"]["model_args"]["img_size"], case["input_seed"])
    with torch.no_grad():
        assert_close(trunk(images), case["features"], "pooled features")

    model = build_model(tower.model, "simclr")
    model.load_state_dict(tower.state, strict=False)
    pretrained = case["config"]["pretrained_cfg"]
    assert timm_config(tower.model, pretrained["mean"], pretrained["std"]) == case["config"]
    assert_same_state(image_tower_state(model), weights)


@pytest.mark.parametrize("preset,architecture,heads", [("vit_tiny", "vit_base_patch16_224", 4),
                                                       ("vit_s16", "vit_small_patch16_224", 12),
                                                       ("vit_b16", "vit_base_patch16_224", 12),
                                                       ("vit_l16", "vit_large_patch16_224", 16)])
def test_timm_export_covers_every_preset(preset, architecture, heads):
    cfg = ModelConfig.preset(preset)
    config = timm_config(cfg, (0.5,) * 3, (0.25,) * 3)
    assert config["architecture"] == architecture and config["model_args"]["num_heads"] == heads
    assert config["model_args"]["img_size"] == cfg.image_size and config["pretrained_cfg"]["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [3, cfg.image_size, cfg.image_size]
    # timm resizes to floor(image size / crop_pct) before the centre crop: our eval_resize
    pct = timm_config(cfg, (0.5,) * 3, (0.25,) * 3, eval_resize=cfg.image_size * 8 // 7)["pretrained_cfg"]["crop_pct"]
    assert math.floor(cfg.image_size / pct) == cfg.image_size * 8 // 7


@pytest.mark.parametrize("objective", ["slip", "nclip", "simclr"])
def test_timm_round_trip_is_exact(tmp_path, objective):
    model = our_checkpoint(tmp_path / "ours.pt", ModelConfig.preset("vit_tiny"), objective)
    proc = run_tool("--to", "timm", tmp_path / "ours.pt", tmp_path / "timm")
    assert proc.returncode == 0, proc.stderr
    tower = read_timm(tmp_path / "timm")
    assert_same_state(tower.state, {k: v for k, v in model.state_dict().items() if k.startswith("visual.")})
    assert tower.model.vision_heads == 4 and tower.mean == (0.485, 0.456, 0.406)


def test_timm_export_refuses_towers_timm_cannot_build(tmp_path):
    model = build_model(ModelConfig.preset("vit_tiny", vision_ln_pre=True), "simclr")
    run_cfg = Converted(model.cfg, "simclr", model.state_dict(), (0.5,) * 3, (0.5,) * 3, "t").run_config()
    with pytest.raises(ConversionError, match="timm cannot build this image tower exactly"):
        export_timm(model, run_cfg, tmp_path / "timm")


# ============================================================================ SLIP reference

def slip_checkpoint(path: Path, case: dict, args: argparse.Namespace | None = None, edit=None) -> dict:
    """A checkpoint as the SLIP reference writes it: DDP's `module.` keys, BatchNorm statistics in
    the SimCLR head, optimizer and scaler state, and the arguments as an argparse.Namespace."""
    # drawn under the model's own names, as the fixture maker did; saved under DDP's
    shapes = {k[len("module."):]: v for k, v in case["state_shapes"].items()}
    state = {f"module.{k}": v for k, v in MAKER.seeded_state_dict(shapes, case["weight_seed"]).items()}
    if edit:
        edit(state)
    args = args or argparse.Namespace(model=case["model"], ssl_mlp_dim=case["ssl_mlp_dim"],
                                      ssl_emb_dim=case["ssl_emb_dim"], lr=3e-3, betas=(0.9, 0.98),
                                      output_dir="/checkpoint/slip", resume="")
    torch.save({"epoch": 25, "state_dict": state, "best_acc1": 42.5, "args": args,
                "optimizer": {"state": {0: {"step": torch.tensor(10.0)}},
                              "param_groups": [{"lr": 3e-3, "params": [0]}]},
                "scaler": {"scale": 65536.0, "growth_factor": 2.0}}, path)
    return state


@pytest.mark.parametrize("name", ["slip", "clip", "simclr"])
def test_slip_reference_import_equals_the_reference(tmp_path, name):
    case = cases("slip_reference")[name]
    slip_checkpoint(tmp_path / "ref.pt", case)
    proc = run_tool("--from", "slip-reference", tmp_path / "ref.pt", tmp_path / "ours.pt")
    assert proc.returncode == 0, proc.stderr
    assert "args, best_acc1, epoch, optimizer, scaler" in proc.stdout
    model, run_cfg = load_model(tmp_path / "ours.pt")
    assert run_cfg.objective.name == name and model.cfg.vision_heads == 12 and list(run_cfg.data.recipe.mean) == \
        [0.485, 0.456, 0.406]
    images = MAKER.seeded_images(2, case["vision"]["img_size"], case["input_seed"])
    with torch.no_grad():
        assert_close(model.visual_features(images), case["image_features"], "image features")
        if name != "simclr":
            tokens = torch.tensor(case["tokens"])
            assert_close(model.encode_image(images, normalize=False), case["image_embed"], "image embeddings")
            assert_close(model.encode_text(tokens, normalize=False), case["text_embed"], "text embeddings")
            assert model.logit_scale.item() == case["logit_scale"]
        if name != "clip":   # the SimCLR head with the reference's BatchNorm statistics (evaluation mode)
            full = build_model(run_cfg.model, name).eval()
            full.load_state_dict(torch.load(tmp_path / "ours.pt", weights_only=True)["model"])
            assert full.ssl_norm == "bn"
            assert_close(full.ssl_head(full.visual(images)), case["ssl_embed"], "SimCLR head")


@pytest.mark.parametrize("edit,expect", [
    (lambda s: s.pop("module.visual.norm.weight"), "missing key visual.norm.weight"),
    (lambda s: s.__setitem__("module.text_projection", torch.zeros(512, 3)), "text_projection has shape (512, 3)"),
    (lambda s: s.__setitem__("module.visual.head.weight", torch.zeros(10, 384)), "unexpected key visual.head.weight"),
    (lambda s: s.__setitem__("module.image_mlp.bn1.running_var", torch.ones(7)), "image_mlp.bn1.running_var has shape"),
])
def test_slip_reference_missing_misshaped_or_unknown_key_fails_with_one_line(tmp_path, edit, expect):
    slip_checkpoint(tmp_path / "ref.pt", cases("slip_reference")["slip"], edit=edit)
    proc = run_tool("--from", "slip-reference", tmp_path / "ref.pt", tmp_path / "ours.pt")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert expect in proc.stderr
    assert not (tmp_path / "ours.pt").exists()


class RunsCode:
    """Unpickling this runs a command: what `weights_only` loading exists to refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["top", "inside_args"])
def test_a_pickle_that_needs_code_is_refused(tmp_path, where):
    marker = tmp_path / "ran"
    case = cases("slip_reference")["clip"]
    if where == "top":
        torch.save({"state_dict": {}, "hook": RunsCode(marker)}, tmp_path / "ref.pt")
    else:
        slip_checkpoint(tmp_path / "ref.pt", case, args=argparse.Namespace(model="CLIP_VITS16", cb=RunsCode(marker)))
    proc = run_tool("--from", "slip-reference", tmp_path / "ref.pt", tmp_path / "ours.pt")
    assert proc.returncode == 2 and "refused to load" in proc.stderr and "system" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()


# ============================================================================ init_from

def test_init_from_a_converted_checkpoint_loads_what_fits_and_says_what_not(tmp_path):
    case = cases("slip_reference")["slip"]
    slip_checkpoint(tmp_path / "ref.pt", case)
    converted = read_slip_reference(tmp_path / "ref.pt")
    converted.save(tmp_path / "ours.pt")
    reference = converted.state

    for source in (tmp_path / "ref.pt", tmp_path / "ours.pt"):    # foreign, or converted
        model = build_model(converted.model, "slip")
        lines = init_from(model, source)
        assert "loaded: SimCLR head (16 tensors)" in lines
        assert_same_state(model.state_dict(), reference)

    run_cfg = converted.run_config()
    run_cfg.data.recipe.mean, run_cfg.data.recipe.std = OPENAI_MEAN, OPENAI_STD
    ln_head = build_model(ModelConfig(**{**vars(converted.model), "ssl_norm": "ln"}), "slip")
    lines = init_from(ln_head, tmp_path / "ours.pt", run_cfg)
    assert any(line.startswith("kept at initialisation: SimCLR head") for line in lines)
    assert any(line.startswith("warning: the checkpoint's images were normalised") for line in lines)

    clip = build_model(converted.model, "clip")
    assert "not used: the checkpoint's SimCLR head (this run's model has none)" in init_from(clip, tmp_path / "ours.pt")
    assert torch.equal(clip.text_projection, reference["text_projection"])

    with pytest.raises(ConversionError, match="model.vision_heads: checkpoint 12, run 6"):
        init_from(build_model(ModelConfig(**{**vars(converted.model), "vision_heads": 6}), "slip"), tmp_path / "ref.pt")


def test_init_from_openclip_and_timm_folders(tmp_path):
    case = cases("openclip")["tiny_native_quickgelu"]
    openclip_folder(tmp_path / "oc", case)
    converted = read_openclip(tmp_path / "oc")
    model = build_model(converted.model, "xclip")
    lines = init_from(model, tmp_path / "oc")
    assert "kept at initialisation: nCLIP heads (the checkpoint has none)" in lines
    assert_same_state({k: v for k, v in model.state_dict().items() if k in converted.state}, converted.state)

    timm_case = cases("timm")["vit_tiny"]
    write_safetensors(MAKER.seeded_state_dict(timm_case["state_shapes"], timm_case["weight_seed"]),
                      tmp_path / "timm" / "model.safetensors")
    write_json(timm_case["config"], tmp_path / "timm" / "config.json")
    model = build_model(ModelConfig.preset("vit_tiny"), "slip")
    lines = init_from(model, tmp_path / "timm")
    assert "kept at initialisation: text tower (the checkpoint has none)" in lines
    assert_same_state({k: v for k, v in model.state_dict().items() if k.startswith("visual.")},
                      read_timm(tmp_path / "timm").state)


# ============================================================================ preprocessing

PILLOW_SIMD = ".post" in PIL.__version__   # pillow-simd's versions; its resampler rounds differently


def test_eval_transform_geometry_is_torchvisions():
    """Resize of the shorter side (long side truncated) and CenterCrop (offset rounded, zero padding
    when the crop is larger) give torchvision's sizes and offsets for every size in the fixture."""
    for w, h, resize, crop, nw, nh, left, top in fixture("preprocess")["geometry"]:
        assert EvalTransform.resized_size(w, h, resize) == (nw, nh), (w, h, resize)
        assert (EvalTransform.crop_offset(nw, crop), EvalTransform.crop_offset(nh, crop)) == (left, top), (w, h, resize)


def test_eval_transform_pixels_are_openclips():
    """The pixels OpenCLIP's (and timm's) evaluation transform computes, RGB / L / P / RGBA, cropped
    and padded: bit for bit with Pillow. pillow-simd's bicubic resampler rounds some pixels a few
    levels apart from Pillow's: there, images that need no resampling must be exact, the rest close."""
    fx = fixture("preprocess")
    for p in fx["pictures"]:
        img = MAKER.seeded_picture(p["seed"], p["width"], p["height"], p["mode"])
        transform = EvalTransform(p["crop"], p["resize"], fx["mean"], fx["std"])
        ours = np.asarray(transform.crop(img).convert("RGB")).transpose(2, 0, 1).astype(int)
        reference = np.frombuffer(bytes.fromhex(p["pixels_hex"]), np.uint8).reshape(ours.shape).astype(int)
        diff = np.abs(ours - reference)
        resampled = EvalTransform.resized_size(p["width"], p["height"], p["resize"]) != (p["width"], p["height"])
        if PILLOW_SIMD and resampled:
            assert diff.mean() < 0.5 and diff.max() <= 8, (p["seed"], diff.mean(), diff.max())
        else:
            assert diff.max() == 0, p["seed"]
        # normalisation: ToTensor + Normalize of the reference pixels, to float precision
        ref_img = Image.fromarray(reference.transpose(1, 2, 0).astype(np.uint8), "RGB")
        first_row = transform.to_tensor(ref_img)[:, 0, :]
        assert (first_row - torch.tensor(p["first_row"])).abs().max() < 1e-6


# ============================================================================ evaluation of an import

def test_imported_openclip_checkpoint_evaluates_with_its_own_preprocessing(tmp_path):
    """--from openclip -> tools/evaluate.py: the checkpoint loads through load_model, and evaluation
    normalises with the source's mean / std (OpenAI's here), as an in-process evaluation does."""
    from pipeline.tokenizer import Tokenizer
    from trainer.evaluation import EvalConfig, Evaluator
    cfg = openai_style(image_size=32, text_layers=1, vision_layers=1)
    model = our_checkpoint(tmp_path / "src.pt", cfg, "clip")
    export_openclip(model, load_model(tmp_path / "src.pt")[1], tmp_path / "oc")
    config = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    config["preprocess_cfg"].update(mean=list(OPENAI_MEAN), std=list(OPENAI_STD))
    write_json(config, tmp_path / "oc" / "open_clip_config.json")
    proc = run_tool("--from", "openclip", tmp_path / "oc", tmp_path / "ours.pt")
    assert proc.returncode == 0, proc.stderr

    data = tmp_path / "eval"
    rng = np.random.RandomState(0)
    for c, name in enumerate(["cat", "dog", "car"]):
        for k in range(3):
            (data / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.randint(0, 256, (40 + k, 37, 3)).astype(np.uint8)).save(data / name / f"{k}.png")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--checkpoint", str(tmp_path / "ours.pt"),
                           "--data", str(data), "--tasks", "zeroshot", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    loaded, run_cfg = load_model(tmp_path / "ours.pt")
    assert tuple(run_cfg.data.recipe.mean) == OPENAI_MEAN and tuple(run_cfg.data.recipe.std) == OPENAI_STD
    here = Evaluator(EvalConfig(data=str(data), tasks=("zeroshot",)), EvalTransform(32, mean=OPENAI_MEAN,
                     std=OPENAI_STD), Tokenizer(), progress=False)(loaded)
    tool = json.loads(out.read_text())
    assert tool["zeroshot"]["top1"] == pytest.approx(here["zeroshot"]["top1"], abs=1e-6)


def test_layout_pairs_are_unique():
    """No foreign or own name is used twice in a layout (a mapping would silently overwrite)."""
    cfg = openai_style()
    for tower in ("timm", "native"):
        pairs: list[Pair] = layout(cfg if tower == "native" else ModelConfig.preset("vit_tiny"), tower)
        assert len({p.ours for p in pairs}) == len(pairs) == len({p.theirs for p in pairs})


def test_finetuning_starts_from_a_converted_or_foreign_image_tower(tmp_path):
    """The finetuning classifier takes the image tower of a SLIP reference checkpoint, of its conversion,
    and of an OpenCLIP folder, tensor for tensor; its fresh head is not touched."""
    from trainer.classifier import ImageClassifier, load_image_tower
    case = cases("slip_reference")["slip"]
    slip_checkpoint(tmp_path / "ref.pt", case)
    converted = read_slip_reference(tmp_path / "ref.pt")
    converted.save(tmp_path / "ours.pt")
    openclip_folder(tmp_path / "oc", cases("openclip")["tiny_native_quickgelu"])
    for source, state, cfg in ((tmp_path / "ref.pt", converted.state, converted.model),
                               (tmp_path / "ours.pt", converted.state, converted.model),
                               (tmp_path / "oc", read_openclip(tmp_path / "oc").state, read_openclip(tmp_path / "oc").model)):
        torch.manual_seed(0)
        model = ImageClassifier(cfg, num_classes=5)
        head = {k: v.clone() for k, v in model.head.state_dict().items()}
        load_image_tower(model, source)
        assert_same_state({k: v for k, v in model.state_dict().items() if k.startswith("visual.")},
                          {k: v for k, v in state.items() if k.startswith("visual.")})
        assert all(torch.equal(v, model.head.state_dict()[k]) for k, v in head.items()), source
