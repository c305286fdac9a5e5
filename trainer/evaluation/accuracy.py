"""Classification accuracy from logits, shared by the zero-shot and linear-probe evaluators."""
from __future__ import annotations

import numpy as np
import torch

from trainer.evaluation.ranks import roc_auc


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top-1, top-5 (top-k for fewer classes) and mean per-class accuracy, in percent, and which images
    were right at top-1 ("top1_correct": one '1' or '0' per image). Two classes also get the ROC AUC
    (percent) of logit 1 minus logit 0 for class 1, as the SLIP reference scores Hateful Memes."""
    n = len(labels)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "mean_per_class": float("nan"), "num_images": 0}
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    correct1 = topk[:, 0] == labels
    correct5 = (topk == labels[:, None]).any(dim=1)
    per_class = [correct1[labels == c].float().mean().item() for c in range(num_classes) if (labels == c).any()]
    # per image, in the split's order: two models on the same images can be compared pairwise (McNemar)
    bits = "".join("1" if c else "0" for c in correct1.tolist())
    out = {"top1": 100.0 * correct1.float().mean().item(), "top5": 100.0 * correct5.float().mean().item(),
           "mean_per_class": 100.0 * float(np.mean(per_class)), "num_images": n, "top1_correct": bits}
    if num_classes == 2:
        out["roc_auc"] = 100.0 * roc_auc((logits[:, 1] - logits[:, 0]).float().numpy(), (labels == 1).numpy())
    return out
