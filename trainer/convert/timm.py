"""timm 1.x: our image tower as a folder that `timm.create_model("local-dir:DIR", pretrained=True)` loads.

The folder holds `config.json` and `model.safetensors`. timm reads from config.json the
`architecture` (a registered model name), `model_args` (keyword arguments that override the
registered ones) and a `pretrained_cfg` block (input size, interpolation, crop fraction, mean, std,
`num_classes` 0: the model returns pooled features); timm 1.0.31 rejects a config.json without
that block.

Which of our image towers timm builds exactly: `model_args` sets the shape (image size, patch,
width, depth, heads, MLP ratio) and the activation, and `pre_norm` adds a LayerNorm before the
blocks together with a bias-free patch embedding; LayerNorm eps comes with the architecture name
only. So two families export: the SLIP reference's tower (patch bias, no LayerNorm before the
blocks, eps 1e-6: timm's plain ViT names) and OpenAI's (no patch bias, LayerNorm before the blocks,
eps 1e-5: timm's `*_clip_*` names, registered with that LayerNorm). Every preset is in the first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.convert.files import load_safetensors, load_weights, read_json, write_json, write_safetensors
from trainer.convert.layout import timm_vision
from trainer.convert.mapping import ConversionError, Drop, expected_shapes, to_ours, to_theirs
from trainer.models import ModelConfig

# registered timm ViTs: name -> (patch, width, depth, heads); all 224 px, MLP ratio 4, GELU
PLAIN_VITS = {
    "vit_tiny_patch16_224": (16, 192, 12, 3), "vit_small_patch16_224": (16, 384, 12, 6),
    "vit_small_patch32_224": (32, 384, 12, 6), "vit_base_patch16_224": (16, 768, 12, 12),
    "vit_base_patch32_224": (32, 768, 12, 12), "vit_large_patch16_224": (16, 1024, 24, 16),
    "vit_large_patch32_224": (32, 1024, 24, 16), "vit_huge_patch14_224": (14, 1280, 32, 16),
}
CLIP_VITS = {   # registered with a LayerNorm before the blocks, no patch bias, LayerNorm eps 1e-5
    "vit_base_patch32_clip_224": (32, 768, 12, 12), "vit_base_patch16_clip_224": (16, 768, 12, 12),
    "vit_large_patch14_clip_224": (14, 1024, 24, 16), "vit_huge_patch14_clip_224": (14, 1280, 32, 16),
}
ACT_LAYERS = {"gelu": "gelu", "quick_gelu": "quick_gelu"}   # our activation -> timm's act_layer name


def _family(cfg: ModelConfig) -> tuple[dict, bool]:
    """(the registered names whose LayerNorm fits, pre_norm) for our image tower, or a ConversionError."""
    if cfg.vision_patch_bias and not cfg.vision_ln_pre and cfg.vision_ln_eps == 1e-6:
        return PLAIN_VITS, False
    if not cfg.vision_patch_bias and cfg.vision_ln_pre and cfg.vision_ln_eps == 1e-5:
        return CLIP_VITS, True
    raise ConversionError(
        f"timm cannot build this image tower exactly (patch bias {cfg.vision_patch_bias}, LayerNorm before the "
        f"blocks {cfg.vision_ln_pre}, LayerNorm eps {cfg.vision_ln_eps}): its config.json sets a LayerNorm before "
        "the blocks only together with a bias-free patch embedding, and eps only through the architecture "
        "(1e-6, or 1e-5 for the *_clip_* names)")


def registered_vit(cfg: ModelConfig) -> str | None:
    """The registered timm ViT that is exactly our image tower with no `model_args` at all (what
    OpenCLIP's timm image tower can build), else None."""
    if cfg.image_size != 224 or cfg.mlp_ratio != 4.0 or cfg.vision_act != "gelu":
        return None
    try:
        names, _ = _family(cfg)
    except ConversionError:
        return None
    shape = (cfg.patch_size, cfg.vision_width, cfg.vision_layers, cfg.vision_heads)
    return next((n for n, s in names.items() if s == shape), None)


def architecture(cfg: ModelConfig) -> str:
    """The registered name nearest our tower (model_args override its shape): same shape, else
    same patch and width, else same width, else the base model of the family."""
    names, _ = _family(cfg)
    shape = (cfg.patch_size, cfg.vision_width, cfg.vision_layers, cfg.vision_heads)
    for match in (lambda s: s == shape, lambda s: s[:2] == shape[:2], lambda s: s[1] == shape[1]):
        found = [n for n, s in names.items() if match(s)]
        if found:
            return found[0]
    return "vit_base_patch16_clip_224" if names is CLIP_VITS else "vit_base_patch16_224"


def crop_fraction(image_size: int, resize: int | None) -> float:
    """timm's crop_pct for Resize(resize) + CenterCrop(image_size): timm resizes to
    floor(image_size / crop_pct), so the fraction must survive that round trip in floating point."""
    resize = resize or image_size
    pct = image_size / resize
    while math.floor(image_size / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return pct


def timm_config(cfg: ModelConfig, mean, std, eval_resize: int | None = None) -> dict:
    """config.json for our image tower."""
    _, pre_norm = _family(cfg)
    args = {"img_size": cfg.image_size, "patch_size": cfg.patch_size, "embed_dim": cfg.vision_width,
            "depth": cfg.vision_layers, "num_heads": cfg.vision_heads, "mlp_ratio": cfg.mlp_ratio,
            "class_token": True, "global_pool": "token", "num_classes": 0, "act_layer": ACT_LAYERS[cfg.vision_act]}
    if pre_norm:
        args["pre_norm"] = True
    pretrained = {"input_size": [3, cfg.image_size, cfg.image_size], "fixed_input_size": True,
                  "interpolation": "bicubic", "crop_pct": crop_fraction(cfg.image_size, eval_resize),
                  "crop_mode": "center", "mean": list(mean), "std": list(std), "num_classes": 0,
                  "first_conv": "patch_embed.proj", "classifier": "head"}
    return {"architecture": architecture(cfg), "num_classes": 0, "num_features": cfg.vision_width,
            "global_pool": "token", "model_args": args, "pretrained_cfg": pretrained}


def image_tower_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our image tower's parameters in timm's names."""
    state = {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    return to_theirs(state, timm_vision(model.cfg))


def export_timm(model: torch.nn.Module, run_cfg, out_dir: str | Path) -> list[str]:
    """Write `out_dir` (config.json + model.safetensors) for our model's image tower; returns notes
    on what stays behind."""
    recipe = run_cfg.data.recipe
    config = timm_config(model.cfg, recipe.mean, recipe.std, recipe.eval_resize)
    state = image_tower_state(model)
    out = Path(out_dir)
    write_safetensors(state, out / "model.safetensors")
    write_json(config, out / "config.json")
    rest = sorted({k.split(".")[0] for k in model.state_dict() if not k.startswith("visual.")})
    notes = [f"wrote the image tower ({len(state)} tensors) as timm {config['architecture']} with "
             f"{model.cfg.vision_heads} heads at {model.cfg.image_size} px"]
    if rest:
        notes.append(f"left out (timm holds the image tower alone): {', '.join(rest)}")
    return notes


# ---------------------------------------------------------------- reading a timm folder

@dataclass
class ImageTower:
    """A foreign image tower in our terms: config, `visual.*` state, preprocessing."""
    model: ModelConfig
    state: dict[str, torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    dropped: list[str] = field(default_factory=list)


_REQUIRED_ARGS = {"class_token": True, "global_pool": "token", "qkv_bias": True, "no_embed_class": False,
                  "fc_norm": None, "final_norm": True, "reg_tokens": 0, "init_values": None, "qk_norm": False}
_TRAINING_ARGS = ("drop_rate", "drop_path_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate",
                  "attn_drop_rate", "num_classes", "weight_init")


def read_timm(folder: str | Path) -> ImageTower:
    """A timm ViT folder (config.json + weights) that our image tower represents exactly."""
    folder = Path(folder)
    config = read_json(folder / "config.json")
    arch = config.get("architecture")
    names = {**PLAIN_VITS, **CLIP_VITS}
    if arch not in names:
        raise ConversionError(f"{folder}: timm architecture {arch!r} is not a ViT we read (one of {sorted(names)})")
    patch, width, depth, heads = names[arch]
    args = dict(config.get("model_args") or {})
    pre_norm = bool(args.pop("pre_norm", arch in CLIP_VITS))
    if pre_norm != (arch in CLIP_VITS):
        raise ConversionError(f"{folder}: model_args.pre_norm={pre_norm} with {arch} has no counterpart here")
    act = args.pop("act_layer", "gelu")
    if act not in ACT_LAYERS.values():
        raise ConversionError(f"{folder}: model_args.act_layer={act!r} (we have {sorted(ACT_LAYERS.values())})")
    for key, value in list(args.items()):
        if key in _REQUIRED_ARGS and value != _REQUIRED_ARGS[key]:
            raise ConversionError(f"{folder}: model_args.{key}={value!r} has no counterpart in our image tower")
    shape = {"img_size": 224, "patch_size": patch, "embed_dim": width, "depth": depth, "num_heads": heads,
             "mlp_ratio": 4.0}
    shape.update({k: args.pop(k) for k in list(shape) if k in args})
    unknown = [k for k in args if k not in _REQUIRED_ARGS and k not in _TRAINING_ARGS]
    if unknown:
        raise ConversionError(f"{folder}: model_args.{unknown[0]} is not an option we read")
    cfg = ModelConfig(name=f"timm:{arch}", image_size=shape["img_size"], patch_size=shape["patch_size"],
                      vision_width=shape["embed_dim"], vision_layers=shape["depth"], vision_heads=shape["num_heads"],
                      mlp_ratio=float(shape["mlp_ratio"]), vision_ln_pre=pre_norm, vision_patch_bias=not pre_norm,
                      vision_ln_eps=1e-5 if pre_norm else 1e-6, vision_act=act)
    weights = folder / "model.safetensors"
    state = load_safetensors(weights) if weights.is_file() else load_weights(folder / "pytorch_model.bin")
    expected = {k: v for k, v in expected_shapes(cfg, "simclr").items() if k.startswith("visual.")}
    mapped = to_ours(state, timm_vision(cfg), expected, [Drop("head.", "the classifier (we keep pooled features)")],
                     where=str(folder))
    pretrained = config.get("pretrained_cfg") or {}
    mean = tuple(pretrained.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(pretrained.get("std", (0.229, 0.224, 0.225)))
    return ImageTower(cfg, mapped.state, mean, std, f"timm: {folder}", mapped.dropped)
