"""Zero-shot classification, CLIP's protocol with a prompt ensemble.

Per class, every prompt template is encoded and L2-normalised; the class embedding is their mean,
renormalised. An image is classified by cosine similarity with the class embeddings. Top-1, top-5
and mean per-class accuracy on the test split.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from trainer.evaluation.accuracy import classification_metrics
from trainer.evaluation.features import encode_texts
from trainer.evaluation.task import EvalContext, Task


@torch.no_grad()
def zero_shot_classifier(model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C, D] class embeddings: per class, every template encoded and normalised, averaged, renormalised."""
    if not templates or not all("{}" in t for t in templates):
        raise ValueError("zero-shot templates must be a non-empty list of strings containing '{}'")
    texts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, texts).view(len(classnames), len(templates), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


def zero_shot_accuracy(image_embed: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> dict:
    logits = image_embed @ classifier.T
    m = classification_metrics(logits, labels, classifier.shape[0])
    m["num_classes"] = classifier.shape[0]
    m["chance_top1"] = 100.0 / classifier.shape[0]
    return m


def evaluate(ctx: EvalContext) -> dict:
    clf = ctx.cached("zeroshot classifier", lambda: zero_shot_classifier(ctx.model, ctx.tokenizer(),
                                                                        ctx.data.classnames, ctx.data.templates))
    result = zero_shot_accuracy(ctx.test.image_embed, ctx.test.labels, clf)
    result["num_templates"] = len(ctx.data.templates)
    return result


def _no_classes(data) -> str | None:
    return None if data.classnames else "no class names (a retrieval set)"


TASK = Task("zeroshot", evaluate, image_embed=True, text=True, unavailable=_no_classes)
