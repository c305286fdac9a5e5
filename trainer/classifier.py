"""The finetuning model: a pretrained image tower and a fresh linear classifier on its CLS feature.

As the SLIP reference finetunes (BEiT's `run_class_finetuning.py` with `--model_prefix module.visual.`):
only the image tower is loaded; the text tower, the projections and every pretraining head are left
behind. The classifier reads the pooled CLS feature (the trunk's final LayerNorm) and starts small,
its weights and bias scaled by `head_init_scale` (BEiT: 0.001) after a truncated-normal draw, so the
first steps do not push large gradients into the pretrained trunk.

Where the tower comes from (`load_image_tower`): any checkpoint `trainer/convert/initialise.py`
reads: ours of any objective (CLIP, SimCLR, SLIP, nCLIP, xCLIP), a converted one, a SLIP-reference
file, an OpenCLIP or timm folder. No checkpoint means random initialisation, the baseline.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.models import ModelConfig, VisionTransformer


class ImageClassifier(nn.Module):
    """ViT image tower (named `visual`, as in SLIPModel, so tower weights load by name) + linear head."""

    def __init__(self, cfg: ModelConfig, num_classes: int, head_init_scale: float = 1e-3):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.cfg, self.num_classes = cfg, num_classes
        self.visual = VisionTransformer(cfg)
        self.head = nn.Linear(cfg.vision_width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def set_grad_checkpointing(self, enabled: bool = True):
        self.visual.transformer.grad_checkpointing = enabled

    def visual_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.visual(images))


def load_image_tower(model: ImageClassifier, path: str | Path) -> str:
    """Copy the image tower of the checkpoint at `path` into `model.visual`; returns where it came
    from. A tower of another architecture is a ConversionError naming the fields that differ."""
    # imported here: the converters import the run configuration, which imports this module's users
    from trainer.convert.converted import tower_differences
    from trainer.convert.initialise import read_any
    from trainer.convert.mapping import ConversionError
    src = read_any(path, model.cfg)
    diffs = tower_differences(src.model, model.cfg, text=False)
    if diffs:
        listed = "; ".join(f"model.{n}: checkpoint {theirs!r}, config {ours!r}" for n, theirs, ours in diffs)
        raise ConversionError(f"{path}: its image tower does not match the config ({listed})")
    tower = {k: v for k, v in src.state.items() if k.startswith("visual.")}
    want = {k for k in model.state_dict() if k.startswith("visual.")}
    if set(tower) != want:
        odd = sorted(set(tower) ^ want)
        raise ConversionError(f"{path}: its image tower does not fit the config's (at {odd[0]})")
    model.load_state_dict(tower, strict=False)
    return src.source
