"""Which of our parameters is which foreign parameter, and how its tensor is laid out there.

A layout is a list of `Pair(ours, theirs, form)`; the same list converts in both directions, so a
round trip is exact by construction. Three foreign layouts cover every format we read or write:

- timm's VisionTransformer (`cls_token`, `pos_embed`, `patch_embed.proj`, `norm_pre`,
  `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`): our image tower with other
  block names. The SLIP reference, OpenCLIP's timm image tower and timm itself use it.
- OpenAI CLIP's towers (`transformer.resblocks.N.{ln_1,attn.in_proj_*,attn.out_proj,ln_2,mlp.c_fc,
  mlp.c_proj}`): torch's nn.MultiheadAttention stacks q, k, v in `in_proj_weight` in the same
  order as our fused `qkv`. The text tower everywhere; OpenCLIP's native image tower adds `conv1`
  (no bias), `class_embedding` [w], `positional_embedding` [n, w], `ln_pre`, `ln_post`, `proj`.
- The SLIP reference's SimCLR head `image_mlp.{layer1,bn1,layer2,bn2,layer3}`.

Projections are bare matrices used as `x @ P` in ours, the SLIP reference and OpenCLIP's towers;
only OpenCLIP's timm-tower head stores an nn.Linear weight (the transpose).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from trainer.models import ModelConfig

Tensor = torch.Tensor


@dataclass(frozen=True)
class Form:
    """How a tensor changes between our layout and theirs (`to_theirs`, `to_ours` are inverses)."""
    name: str
    to_theirs: Callable[[Tensor], Tensor]
    to_ours: Callable[[Tensor], Tensor]


SAME = Form("same", lambda t: t, lambda t: t)
TRANSPOSED = Form("transposed", lambda t: t.t().contiguous(), lambda t: t.t().contiguous())
NO_BATCH = Form("without the batch dim", lambda t: t[0].clone(), lambda t: t[None].clone())   # [1, n, w] vs [n, w]
SCALAR = Form("scalar", lambda t: t, lambda t: t.reshape(()))   # theirs may be [] or [1] (OpenCLIP loads both)
# [1, 1, w] vs [w]
NO_BATCH_2 = Form("without 2 leading dims", lambda t: t[0, 0].clone(), lambda t: t[None, None].clone())


@dataclass(frozen=True)
class Pair:
    ours: str
    theirs: str
    form: Form = SAME


def _affine(ours: str, theirs: str) -> list[Pair]:
    return [Pair(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


def timm_blocks(ours: str, theirs: str, layers: int) -> list[Pair]:
    """Our transformer blocks under `ours` vs timm's `blocks.N` under `theirs`."""
    pairs = []
    for i in range(layers):
        o, t = f"{ours}blocks.{i}", f"{theirs}blocks.{i}"
        for a, b in (("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"), ("norm2", "norm2"),
                     ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
            pairs += _affine(f"{o}.{a}", f"{t}.{b}")
    return pairs


def openai_blocks(ours: str, theirs: str, layers: int) -> list[Pair]:
    """Our transformer blocks under `ours` vs OpenAI CLIP's `resblocks.N` under `theirs`."""
    pairs = []
    for i in range(layers):
        o, t = f"{ours}blocks.{i}", f"{theirs}resblocks.{i}"
        pairs += _affine(f"{o}.norm1", f"{t}.ln_1")
        pairs += [Pair(f"{o}.attn.qkv.weight", f"{t}.attn.in_proj_weight"),
                  Pair(f"{o}.attn.qkv.bias", f"{t}.attn.in_proj_bias")]
        pairs += _affine(f"{o}.attn.proj", f"{t}.attn.out_proj")
        pairs += _affine(f"{o}.norm2", f"{t}.ln_2")
        pairs += _affine(f"{o}.mlp.0", f"{t}.mlp.c_fc")
        pairs += _affine(f"{o}.mlp.2", f"{t}.mlp.c_proj")
    return pairs


def timm_vision(cfg: ModelConfig, theirs: str = "") -> list[Pair]:
    """Our image tower (`visual.`) vs a timm VisionTransformer under `theirs`."""
    pairs = [Pair("visual.cls_token", f"{theirs}cls_token"), Pair("visual.pos_embed", f"{theirs}pos_embed"),
             Pair("visual.patch_embed.weight", f"{theirs}patch_embed.proj.weight")]
    if cfg.vision_patch_bias:
        pairs.append(Pair("visual.patch_embed.bias", f"{theirs}patch_embed.proj.bias"))
    if cfg.vision_ln_pre:
        pairs += _affine("visual.norm_pre", f"{theirs}norm_pre")
    pairs += timm_blocks("visual.transformer.", theirs, cfg.vision_layers)
    return pairs + _affine("visual.norm", f"{theirs}norm")


def openai_vision(cfg: ModelConfig, theirs: str = "visual.") -> list[Pair]:
    """Our image tower and image projection vs OpenCLIP's native (OpenAI-style) one. Its patch
    embedding has no bias: callers check `cfg.vision_patch_bias` is off."""
    pairs = [Pair("visual.patch_embed.weight", f"{theirs}conv1.weight"),
             Pair("visual.cls_token", f"{theirs}class_embedding", NO_BATCH_2),
             Pair("visual.pos_embed", f"{theirs}positional_embedding", NO_BATCH)]
    if cfg.vision_ln_pre:
        pairs += _affine("visual.norm_pre", f"{theirs}ln_pre")
    pairs += openai_blocks("visual.transformer.", f"{theirs}transformer.", cfg.vision_layers)
    return pairs + _affine("visual.norm", f"{theirs}ln_post") + [Pair("image_projection", f"{theirs}proj")]


def openai_text(cfg: ModelConfig, theirs: str = "") -> list[Pair]:
    """Our text tower and text projection vs OpenAI CLIP's (top-level names in OpenCLIP's CLIP and
    the SLIP reference)."""
    pairs = [Pair("text.token_embedding.weight", f"{theirs}token_embedding.weight"),
             Pair("text.positional_embedding", f"{theirs}positional_embedding")]
    pairs += openai_blocks("text.transformer.", f"{theirs}transformer.", cfg.text_layers)
    return pairs + _affine("text.ln_final", f"{theirs}ln_final") + [Pair("text_projection", f"{theirs}text_projection")]


def slip_ssl_head(theirs: str = "image_mlp.") -> list[Pair]:
    """Our SimCLR head with BatchNorm (ssl_norm "bn") vs the SLIP reference's `image_mlp`."""
    pairs = []
    for ours, name in ((0, "layer1"), (3, "layer2"), (6, "layer3")):
        pairs += _affine(f"ssl_head.net.{ours}", f"{theirs}{name}")
    for ours, name in ((1, "bn1"), (4, "bn2")):
        pairs += [Pair(f"ssl_head.net.{ours}.{p}", f"{theirs}{name}.{p}")
                  for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    return pairs
