"""Frozen-model encodings: image embeddings and trunk features of a labelled set, text embeddings.

Evaluation follows the model: inputs go to the device of its parameters; outputs come back to the
CPU as float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from trainer.evaluation.data import BadImages, EvalTransform, Sample, iterate_images


@dataclass
class ImageFeatures:
    image_embed: torch.Tensor | None   # [N, D] encode_image, L2-normalised; None when not asked for
    features: torch.Tensor | None      # [N, W] visual_features (pooled trunk); None when not asked for
    labels: torch.Tensor               # [N]
    index: list[int]                   # positions in the samples of the N readable images


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(model, samples: Sequence[Sample], transform: EvalTransform, batch_size: int,
                     bad: BadImages, embeddings: bool = True, trunk: bool = False,
                     desc: str = "features", progress: bool = True) -> ImageFeatures:
    """Run the frozen model over the readable `samples` (unreadable ones go to `bad`)."""
    device = model_device(model)
    embeds, feats, labels, index = [], [], [], []
    for images, batch_labels, idx in iterate_images(samples, transform, batch_size, bad, desc, progress):
        images = images.to(device)
        if embeddings:
            embeds.append(model.encode_image(images, normalize=True).float().cpu())
        if trunk:
            feats.append(model.visual_features(images).float().cpu())
        labels.append(batch_labels)
        index += idx
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return ImageFeatures(cat(embeds), cat(feats), cat(labels) if labels else torch.zeros(0, dtype=torch.long),
                         index)


def tokenize(model, tokenizer: Callable, texts: Sequence[str]) -> torch.Tensor:
    """Token rows as long as the model's text context (a tokenizer's default otherwise); a longer
    text keeps its first tokens and ends with the end-of-text token, as in training."""
    text = getattr(model, "text", None)
    pos = getattr(text, "positional_embedding", None)
    return tokenizer(list(texts)) if pos is None else tokenizer(list(texts), context_length=pos.shape[0])


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """[N, D] L2-normalised text embeddings."""
    device = model_device(model)
    parts = [model.encode_text(tokenize(model, tokenizer, texts[i:i + batch_size]).to(device),
                               normalize=True).float().cpu() for i in range(0, len(texts), batch_size)]
    return torch.cat(parts)
