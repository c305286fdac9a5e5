"""Checkpoints of the SLIP reference (facebookresearch/SLIP) as ours.

The reference saves `{"epoch", "state_dict", "optimizer", "scaler", "best_acc1", "args"}` with
DistributedDataParallel's `module.` prefix on every key and its training arguments as an
argparse.Namespace (`args.model`, e.g. "SLIP_VITB16"). Its models are ours in other names:
a timm ViT without classifier under `visual.`, OpenAI CLIP's text tower at the top level, bare
projection matrices, `logit_scale`; SimCLR and SLIP add `image_mlp` with (Sync)BatchNorm, whose
running statistics map onto our SimCLR head with ssl_norm "bn".

Sizes are read from the tensors. Head counts are not in them: they come from `args.model` (the
reference's ViT-S/16 is MoCo v3's, with 12 heads; B/16 12; L/16 16), else from the image tower's
width; its text tower has 8 heads. Images were normalised with ImageNet's mean and std.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path

import torch

from trainer.convert.converted import Converted
from trainer.convert.files import load_pickle
from trainer.convert.layout import Pair, openai_text, slip_ssl_head, timm_vision
from trainer.convert.mapping import ConversionError, expected_shapes, strip_prefix, to_ours
from trainer.models import PRESETS, ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MODEL_NAME = re.compile(r"^(CLIP|SIMCLR|SLIP)_VIT([SBL])16$")
_PRESET_BY_SIZE = {"S": "vit_s16", "B": "vit_b16", "L": "vit_l16"}
_PRESET_BY_WIDTH = {PRESETS[p]["vision_width"]: p for p in _PRESET_BY_SIZE.values()}


def _shape(state: dict, key: str, where: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"{where}: missing key {key}")
    return tuple(state[key].shape)


def _count(state: dict, prefix: str) -> int:
    """Number of numbered blocks `prefix<N>.` in the state dict."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _model_name(args) -> str | None:
    name = getattr(args, "model", None) if isinstance(args, argparse.Namespace) else \
        (args.get("model") if isinstance(args, dict) else None)
    return name if isinstance(name, str) else None


def read_slip_reference(path: str | Path, vision_heads: int | None = None, text_heads: int | None = None) -> Converted:
    """A SLIP-reference checkpoint (CLIP, SimCLR or SLIP; ViT-S/B/L) as our model. `vision_heads` /
    `text_heads` override the head counts (for towers the reference did not ship)."""
    where = str(path)
    obj = load_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, rest = obj["state_dict"], sorted(k for k in obj if k != "state_dict")
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, rest = obj, []
    else:
        raise ConversionError(f"{where}: not a SLIP-reference checkpoint (no state_dict)")
    state = strip_prefix(state, "module.")
    has_text, has_ssl = "token_embedding.weight" in state, any(k.startswith("image_mlp.") for k in state)
    objective = {(True, True): "slip", (True, False): "clip", (False, True): "simclr"}.get((has_text, has_ssl))
    if objective is None:
        raise ConversionError(f"{where}: neither a text tower nor image_mlp: not a SLIP-reference model")
    name = _model_name(obj.get("args")) if isinstance(obj, dict) else None
    match = _MODEL_NAME.match(name or "")
    if name and not match:
        raise ConversionError(f"{where}: args.model={name!r} is not one of the reference's models "
                              "(CLIP|SIMCLR|SLIP)_VIT(S|B|L)16")
    if match and match.group(1).lower() != objective:
        raise ConversionError(f"{where}: args.model={name} but the weights are a {objective.upper()} model")

    width = _shape(state, "visual.cls_token", where)[-1]
    patch = _shape(state, "visual.patch_embed.proj.weight", where)[-1]
    tokens = _shape(state, "visual.pos_embed", where)[1]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise ConversionError(f"{where}: visual.pos_embed has {tokens} tokens: not a square grid plus a CLS token")
    dims = dict(image_size=grid * patch, patch_size=patch, vision_width=width,
                vision_layers=_count(state, "visual.blocks."),
                mlp_ratio=_shape(state, "visual.blocks.0.mlp.fc1.weight", where)[0] / width, ssl_norm="bn")
    if has_text:
        vocab, text_width = _shape(state, "token_embedding.weight", where)
        dims.update(vocab_size=vocab, text_width=text_width, text_layers=_count(state, "transformer.resblocks."),
                    context_length=_shape(state, "positional_embedding", where)[0],
                    embed_dim=_shape(state, "image_projection", where)[1],
                    text_heads=text_heads or (8 if text_width == 512 else text_width // 64))
    if has_ssl:
        dims.update(ssl_mlp_dim=_shape(state, "image_mlp.layer1.weight", where)[0],
                    ssl_emb_dim=_shape(state, "image_mlp.layer3.weight", where)[0])
    preset = _PRESET_BY_SIZE[match.group(2)] if match else _PRESET_BY_WIDTH.get(width)
    if preset is None and vision_heads is None:
        raise ConversionError(f"{where}: cannot tell the head count of a {width}-wide image tower (the reference's "
                              f"ViT-S/B/L are {sorted(_PRESET_BY_WIDTH)} wide)")
    cfg = ModelConfig.preset(preset or "vit_b16", **dims, **({"vision_heads": vision_heads} if vision_heads else {}))
    if cfg != ModelConfig.preset(cfg.name, ssl_norm="bn"):
        cfg = dataclasses.replace(cfg, name=f"slip-reference:{name or preset or 'vit'}")

    pairs = timm_vision(cfg, "visual.")
    if has_text:
        pairs += openai_text(cfg) + [Pair("image_projection", "image_projection"), Pair("logit_scale", "logit_scale")]
    if has_ssl:
        pairs += slip_ssl_head()
    mapped = to_ours(state, pairs, expected_shapes(cfg, objective), where=where)
    dropped = mapped.dropped + ([f"{', '.join(rest)}: training state (a conversion keeps the weights)"] if rest else [])
    return Converted(cfg, objective, mapped.state, IMAGENET_MEAN, IMAGENET_STD, f"slip-reference: {path}", dropped)
