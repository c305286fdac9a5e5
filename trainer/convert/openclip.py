"""OpenCLIP (open-clip-torch 3.x): export to its local-dir / hub folder, import its CLIP ViTs.

The folder holds `open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...}) and
`open_clip_model.safetensors`; `open_clip.create_model_and_transforms("local-dir:DIR")` loads it,
and so do the tools built on OpenCLIP (clip_benchmark, its inference code).

OpenCLIP builds an image tower one of two ways, and one text tower:
- timm's ViT by registered name (`vision_cfg.timm_model_name`, token pooling, a bias-free linear
  head to the joint space). It takes no shape arguments, so only a registered shape at 224 px
  fits: our vit_b16 and vit_l16 presets (vit_base_patch16_224, vit_large_patch16_224) do; the
  12-head ViT-S/16 and the tiny demo ViT do not. timm's ViT uses GELU whatever `quick_gelu` says.
- its native (OpenAI-style) ViT: a bias-free patch embedding, an optional LayerNorm before the
  blocks (`no_ln_pre`), LayerNorm eps per tower (`norm_kwargs`), and the activation the text
  tower uses (`quick_gelu` picks QuickGELU for both towers).
- the text tower: OpenAI CLIP's, QuickGELU or GELU per `quick_gelu`, pooled at the EOT token.

So our models export exactly when their image tower is a registered timm ViT (the text tower may
then use either activation), or when it is OpenAI-style with the text tower's activation (models
imported from OpenCLIP); anything else is refused with the reason. Head counts are not in the
weights: imports take them from `model_cfg`, a folder's or one of the table `openclip_models.json`
(OpenCLIP's own configurations of those names). Preprocessing travels in `preprocess_cfg`
(OpenCLIP's default is OpenAI's CLIP mean and std, not ImageNet's).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.convert.converted import Converted
from trainer.convert.files import load_safetensors, load_weights, read_json, write_json, write_safetensors
from trainer.convert.layout import SCALAR, TRANSPOSED, Pair, openai_text, openai_vision, timm_vision
from trainer.convert.mapping import ConversionError, Drop, expected_shapes, strip_prefix, to_ours, to_theirs
from trainer.convert.timm import PLAIN_VITS, registered_vit
from trainer.models import ModelConfig

MODELS_TABLE = Path(__file__).with_name("openclip_models.json")
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# what OpenCLIP's loader looks for in a folder, in its order of preference
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                "pytorch_model.bin", "pytorch_model.pth", "model.pth")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_EPS = 1e-5      # OpenCLIP's LayerNorm without norm_kwargs


def known_models() -> dict[str, dict]:
    """OpenCLIP model name -> model_cfg, for the names whose weights we import."""
    return json.loads(MODELS_TABLE.read_text())


# ---------------------------------------------------------------- our config -> model_cfg

def _refusal(cfg: ModelConfig) -> str:
    shape = f"{cfg.vision_width} wide, {cfg.vision_layers} deep, {cfg.vision_heads} heads, {cfg.patch_size} px patches"
    return (f"OpenCLIP cannot hold this model exactly: its timm image tower must be a registered timm ViT at 224 px "
            f"(this one: {shape} at {cfg.image_size} px), and its native image tower has no patch-embedding bias and "
            f"shares the text tower's activation (this one: patch bias {cfg.vision_patch_bias}, image "
            f"{cfg.vision_act}, text {cfg.text_act}); use --to timm to export the image tower")


def _norm_kwargs(eps: float) -> dict:
    return {} if eps == DEFAULT_EPS else {"norm_kwargs": {"eps": eps}}


def model_cfg(cfg: ModelConfig) -> tuple[dict, str]:
    """(OpenCLIP model_cfg, "timm" | "native") for our model, or a ConversionError saying why not."""
    text = {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size, "width": cfg.text_width,
            "heads": cfg.text_heads, "layers": cfg.text_layers, **_norm_kwargs(cfg.text_ln_eps)}
    out = {"embed_dim": cfg.embed_dim}
    if cfg.text_act == "quick_gelu":
        out["quick_gelu"] = True
    timm_name = registered_vit(cfg)
    if timm_name:
        out["vision_cfg"] = {"timm_model_name": timm_name, "timm_model_pretrained": False, "timm_pool": "token",
                             "timm_proj": "linear", "timm_proj_bias": False, "image_size": cfg.image_size}
        return {**out, "text_cfg": text}, "timm"
    if cfg.vision_patch_bias or cfg.vision_act != cfg.text_act:
        raise ConversionError(_refusal(cfg))
    vision = {"image_size": cfg.image_size, "layers": cfg.vision_layers, "width": cfg.vision_width,
              "head_width": cfg.vision_width // cfg.vision_heads, "patch_size": cfg.patch_size,
              "mlp_ratio": cfg.mlp_ratio, **({} if cfg.vision_ln_pre else {"no_ln_pre": True}),
              **_norm_kwargs(cfg.vision_ln_eps)}
    return {**out, "vision_cfg": vision, "text_cfg": text}, "native"


def preprocess_cfg(image_size: int, mean, std) -> dict:
    """OpenCLIP's evaluation preprocessing equal to our EvalTransform at resize = image size."""
    return {"size": image_size, "mode": "RGB", "mean": list(mean), "std": list(std), "interpolation": "bicubic",
            "resize_mode": "shortest", "fill_color": 0}


def layout(cfg: ModelConfig, tower: str) -> list[Pair]:
    """Our CLIP model's parameters vs OpenCLIP's CLIP with the given image tower."""
    if tower == "timm":
        vision = timm_vision(cfg, "visual.trunk.") + [Pair("image_projection", "visual.head.proj.weight", TRANSPOSED)]
    else:
        vision = openai_vision(cfg, "visual.")
    return vision + openai_text(cfg) + [Pair("logit_scale", "logit_scale", SCALAR)]


# ---------------------------------------------------------------- export

_LEFT_OUT = [  # our parameters OpenCLIP's CLIP has no place for
    (("ssl_head.",), "the SimCLR head (ssl_head: used only by the training loss)"),
    (("image_cluster_head.", "text_cluster_head.", "prototypes."),
     "xCLIP's nCLIP heads (image_cluster_head, text_cluster_head, prototypes): OpenCLIP's CLIP has no place for them"),
]


def export_openclip(model: torch.nn.Module, run_cfg, out_dir: str | Path) -> list[str]:
    """Write `out_dir` for a CLIP / SLIP / xCLIP model; returns notes on what was left out."""
    objective = run_cfg.objective.name
    if not model.uses_text:
        raise ConversionError("a SimCLR model has no text tower, and OpenCLIP holds image-text models only; "
                              "use --to timm to export its image tower")
    if not model.uses_clip:
        raise ConversionError("an nCLIP model has no contrastive projection (its embeddings are cluster logits), "
                              "which OpenCLIP's CLIP cannot hold; use --to timm to export its image tower")
    cfg = model.cfg
    mcfg, tower = model_cfg(cfg)
    state = model.state_dict()
    left_out = tuple(p for prefixes, _ in _LEFT_OUT for p in prefixes)
    theirs = to_theirs({k: v for k, v in state.items() if not k.startswith(left_out)}, layout(cfg, tower))
    recipe = run_cfg.data.recipe
    notes = [f"{objective} model -> OpenCLIP CLIP with its {tower} image tower ({len(theirs)} tensors)"]
    notes += [f"dropped {why}" for prefixes, why in _LEFT_OUT if any(k.startswith(prefixes) for k in state)]
    if recipe.eval_resize not in (None, recipe.image_size):
        notes.append(f"note: OpenCLIP resizes to the crop size {recipe.image_size}; this run's probe resize "
                     f"{recipe.eval_resize} is not expressible in preprocess_cfg")
    out = Path(out_dir)
    write_safetensors(theirs, out / WEIGHTS_NAME)
    write_json({"model_cfg": mcfg, "preprocess_cfg": preprocess_cfg(recipe.image_size, recipe.mean, recipe.std)},
               out / CONFIG_NAME)
    return notes


# ---------------------------------------------------------------- model_cfg -> our config

# options whose value here does not change what the model computes in evaluation
_TRAINING_ONLY = {"patch_dropout", "timm_drop", "timm_drop_path", "timm_model_pretrained", "output_tokens",
                  "hf_model_pretrained", "pad_id", "attn_pooler_queries", "attn_pooler_heads", "eos_id",
                  "final_ln_after_pool"}   # a LayerNorm per token commutes with pooling one token
# options we represent only at these values
_FIXED = {"ls_init_value": None, "attentional_pool": False, "pos_embed_type": "learnable", "act_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
          "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
          "timm_pool": "token", "timm_proj": "linear", "timm_proj_bias": False, "embed_cls": False,
          "no_causal_mask": False, "proj_bias": False, "proj_type": "linear", "hf_model_name": None,
          "hf_tokenizer_name": None, "tokenizer_mode": None, "tokenizer_kwargs": None, "custom_text": False,
          "init_logit_bias": None, "cast_dtype": None, "mlp_ratio": 4.0}
_POOL = {"vision_cfg": "tok", "text_cfg": "argmax"}
_SHAPE = {"vision_cfg": {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio", "no_ln_pre",
                         "norm_kwargs", "timm_model_name"},
          "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "norm_kwargs"},
          "": {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale"}}


def _check_options(section: dict, name: str, where: str) -> None:
    for key, value in section.items():
        if key in _SHAPE[name] or key in _TRAINING_ONLY:
            continue
        want = _POOL.get(name) if key == "pool_type" else _FIXED.get(key, "?unknown")
        if want == "?unknown":
            raise ConversionError(f"{where}: OpenCLIP option {name + '.' if name else ''}{key} is not one we read")
        if value != want and not (key == "block_type" and value == "default"):
            raise ConversionError(f"{where}: OpenCLIP option {name + '.' if name else ''}{key}={value!r} has no "
                                  f"counterpart in our model (we have {want!r})")


def _eps(section: dict, where: str) -> float:
    kwargs = section.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise ConversionError(f"{where}: norm_kwargs {kwargs} (we read eps only)")
    return float(kwargs.get("eps", DEFAULT_EPS))


def our_config(mcfg: dict, name: str, where: str) -> tuple[ModelConfig, str]:
    """(our ModelConfig, "timm" | "native") for an OpenCLIP model_cfg, or a ConversionError naming
    the option we cannot represent."""
    _check_options(mcfg, "", where)
    vision, text = dict(mcfg.get("vision_cfg") or {}), dict(mcfg.get("text_cfg") or {})
    _check_options(vision, "vision_cfg", where)
    _check_options(text, "text_cfg", where)
    act = "quick_gelu" if mcfg.get("quick_gelu") else "gelu"
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConversionError(f"{where}: non-square image_size {size}")
        size = size[0]
    common = dict(name=name, embed_dim=int(mcfg["embed_dim"]), context_length=text.get("context_length", 77),
                  vocab_size=text.get("vocab_size", 49408), text_width=text.get("width", 512),
                  text_heads=text.get("heads", 8), text_layers=text.get("layers", 12),
                  text_ln_eps=_eps(text, where), text_act=act, image_size=int(size))
    if vision.get("timm_model_name"):
        timm_name = vision["timm_model_name"]
        if timm_name not in PLAIN_VITS:
            raise ConversionError(f"{where}: timm image tower {timm_name!r} is not one we read (one of "
                                  f"{sorted(PLAIN_VITS)})")
        patch, width, depth, heads = PLAIN_VITS[timm_name]
        return ModelConfig(**{**common, "image_size": 224}, patch_size=patch, vision_width=width,
                           vision_layers=depth, vision_heads=heads), "timm"
    if isinstance(vision.get("layers", 12), (list, tuple)):
        raise ConversionError(f"{where}: a ResNet image tower (layers {vision['layers']}) is not a ViT")
    width = vision.get("width", 768)
    return ModelConfig(**common, patch_size=vision.get("patch_size", 16), vision_width=width,
                       vision_layers=vision.get("layers", 12), vision_heads=width // vision.get("head_width", 64),
                       mlp_ratio=float(vision.get("mlp_ratio", 4.0)), vision_ln_pre=not vision.get("no_ln_pre", False),
                       vision_patch_bias=False, vision_ln_eps=_eps(vision, where), vision_act=act), "native"


# ---------------------------------------------------------------- import

def _find_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ConversionError(f"{folder}: no OpenCLIP weights file (looked for {', '.join(WEIGHT_FILES)})")


def _preprocess(pcfg: dict, image_size: int, where: str) -> tuple[tuple, tuple]:
    """(mean, std) of a preprocess_cfg that our EvalTransform computes exactly."""
    for key, want in (("resize_mode", "shortest"), ("interpolation", "bicubic"), ("mode", "RGB"),
                      ("size", image_size)):
        if pcfg.get(key, want) not in (want, [want, want]):
            raise ConversionError(f"{where}: preprocess_cfg.{key}={pcfg[key]!r}: our evaluation transform does "
                                  f"{want!r} (resize the shorter side, bicubic, centre crop)")
    return tuple(pcfg.get("mean", OPENAI_MEAN)), tuple(pcfg.get("std", OPENAI_STD))


def read_openclip(path: str | Path, model_name: str | None = None, mcfg: dict | None = None) -> Converted:
    """An OpenCLIP CLIP ViT as our CLIP model: from a folder (open_clip_config.json + weights) or a
    weights file (.safetensors, .bin, .pt; bare or a training checkpoint's "state_dict"). The
    architecture is `mcfg` if given, else `model_name` from the table, else the folder's config."""
    path = Path(path)
    pcfg: dict = {}
    if path.is_dir():
        weights = _find_weights(path)
        if (path / CONFIG_NAME).is_file():
            folder_cfg = read_json(path / CONFIG_NAME)
            pcfg = folder_cfg.get("preprocess_cfg") or {}
            mcfg = mcfg or (None if model_name else folder_cfg.get("model_cfg"))
    else:
        weights = path
    if mcfg is None:
        table = known_models()
        if model_name is None:
            raise ConversionError(f"{path}: OpenCLIP weights do not say their architecture (head counts, activation): "
                                  f"pass --model, one of {', '.join(sorted(table))}")
        if model_name not in table:
            raise ConversionError(f"{path}: unknown OpenCLIP model {model_name!r}; known: {', '.join(sorted(table))}")
        mcfg = table[model_name]
    cfg, tower = our_config(mcfg, f"openclip:{model_name or path.name}", str(path))
    mean, std = _preprocess(pcfg, cfg.image_size, str(path))
    state = strip_prefix(load_safetensors(weights) if weights.suffix == ".safetensors" else load_weights(weights),
                         "module.")
    drops = [Drop("attn_mask", "the causal mask (a constant, rebuilt by the model)")]
    drops += [Drop(k, "a constant of OpenAI's files (the model config has it)")
              for k in ("input_resolution", "context_length", "vocab_size")]
    mapped = to_ours(state, layout(cfg, tower), expected_shapes(cfg, "clip"), drops, where=str(weights))
    return Converted(cfg, "clip", mapped.state, mean, std, f"openclip: {path}", mapped.dropped)
