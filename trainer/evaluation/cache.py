"""Computed encodings of one model on one dataset, kept as files so a killed suite run resumes.

A suite run (trainer/evaluation/suite_run.py) spends its time encoding images; each encoding it
computes (a split's image features, a zero-shot classifier) is written here as soon as it exists,
atomically, under `<folder>/<name>.pt`. A rerun loads it instead of recomputing. The folder is
named by the model's content key (`model_key`: a hash of its weights and architecture, never the
checkpoint's path, since `last.pt` is overwritten as training goes on) and the dataset; each file
also stores the full key of what it was computed from (dataset spec, image transform), and a file
whose key differs is recomputed. Files hold only tensors and plain containers (loaded with
`weights_only`).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.files import atomic_output
from trainer.checkpoint import TRAINING_ONLY
from trainer.dataclass_io import to_dict
from trainer.evaluation.data import BadImages
from trainer.evaluation.features import ImageFeatures

_writes = 0     # cache files written by this process (the kill hook counts them)


def model_key(model: torch.nn.Module, architecture: dict) -> str:
    """A hex digest of the model's weights (every state-dict tensor, in name order, but the
    training-only ones a loaded checkpoint leaves at random: checkpoint.TRAINING_ONLY) and of its
    architecture (`architecture`: JSON-ready, e.g. the model config and objective)."""
    h = hashlib.sha256(json.dumps(architecture, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(TRAINING_ONLY):
            continue
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_model_key(model: torch.nn.Module, run_cfg) -> str:
    """`model_key` of a loaded run's model: its weights, model config and objective."""
    return model_key(model, {"model": to_dict(run_cfg.model), "objective": run_cfg.objective.name})


class FeatureCache:
    """Values computed for one (model, dataset): `get(name, compute)` returns the stored value when
    its key matches, else computes, stores and returns it. `sigkill_after_writes`: a test hook that
    SIGKILLs this process once that many cache files have been written (resume tests)."""

    def __init__(self, folder: str | Path, key: dict, sigkill_after_writes: int | None = None):
        self.folder, self.key = Path(folder), json.loads(json.dumps(key, default=str))
        self.sigkill_after_writes = sigkill_after_writes
        self.hits: list[str] = []
        self.computed: list[str] = []

    def path(self, name: str) -> Path:
        return self.folder / f"{name.replace(' ', '_')}.pt"

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        global _writes
        path = self.path(name)
        if path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:       # a damaged file (a foreign write): recompute it
                stored = None
            if isinstance(stored, dict) and stored.get("key") == self.key:
                self.hits.append(name)
                return stored["value"]
        value = compute()
        with atomic_output(path) as tmp:
            torch.save({"key": self.key, "value": value}, tmp)
        self.computed.append(name)
        _writes += 1
        if self.sigkill_after_writes is not None and _writes >= self.sigkill_after_writes:
            os.kill(os.getpid(), signal.SIGKILL)
        return value


def cached_image_features(cache: FeatureCache | None, name: str, compute: Callable[[], ImageFeatures],
                          bad: BadImages) -> ImageFeatures:
    """`compute()` through `cache` (None: no cache); the unreadable images it reported to `bad` are
    stored with the features and reported again when they are loaded."""
    if cache is None:
        return compute()

    def run() -> dict:
        before = len(bad.items)
        f = compute()
        return {"image_embed": f.image_embed, "features": f.features, "labels": f.labels, "index": f.index,
                "bad": bad.items[before:]}

    before = len(bad.items)
    v = cache.get(name, run)
    if len(bad.items) == before:        # loaded, not computed: report its unreadable images again
        bad.items.extend(v["bad"])
    return ImageFeatures(v["image_embed"], v["features"], v["labels"], list(v["index"]))
