"""Runs the configured evaluators on one model: results as a nested, JSON-ready dict.

The data listing is made once (`EvalData.open`); each call decodes the images and encodes them with
the model's current weights. The test split is encoded once per call, with what the selected
evaluators need, and shared by them; an evaluator whose data is absent is skipped with the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.files import write_json_atomic
from trainer.evaluation import probe, retrieval, zeroshot
from trainer.evaluation.cache import FeatureCache, cached_image_features
from trainer.evaluation.config import TASKS, EvalConfig
from trainer.evaluation.data import BadImages, EvalData, EvalTransform
from trainer.evaluation.features import extract_features
from trainer.evaluation.task import EvalContext, Task

# In the order they run and appear in the results.
EVALUATORS: dict[str, Task] = {t.name: t for t in (zeroshot.TASK, probe.TASK, retrieval.TASK)}
assert tuple(EVALUATORS) == TASKS, "config.TASKS names the registered evaluators"


class Evaluator:
    """Evaluates any model with the encoder interface of docs/ARCHITECTURE.md (`encode_image`,
    `encode_text`, `visual_features`) on `cfg.data`, images prepared by `transform`. The text
    tokenizer defaults to pipeline.tokenizer.Tokenizer, made on first use."""

    def __init__(self, cfg: EvalConfig, transform: EvalTransform, tokenizer: Callable | None = None,
                 progress: bool = True, data: EvalData | None = None):
        self.cfg, self.transform, self.progress = cfg, transform, progress
        self.tokenizer = tokenizer
        self.data = data if data is not None else EvalData.open(cfg.data, cfg.classnames, cfg.templates)

    def _tokenizer(self) -> Callable:
        if self.tokenizer is None:
            from pipeline.tokenizer import Tokenizer
            self.tokenizer = Tokenizer()
        return self.tokenizer

    def __call__(self, model, step: int | None = None, cache: FeatureCache | None = None, label: str = "") -> dict:
        """Full results (nested dict, JSON-ready). Leaves the model's train/eval mode as it was.
        `cache`: where computed encodings are kept (suite runs); `label` prefixes the progress bars."""
        selected = [t for name, t in EVALUATORS.items() if name in self.cfg.tasks]
        skipped = {t.name: reason for t in selected if (reason := t.unavailable(self.data)) is not None}
        if not getattr(model, "uses_text", True):     # SimCLR: image-only tasks; the others do not apply
            skipped.update({t.name: "not applicable: the model has no text tower" for t in selected
                            if t.text and t.name not in skipped})
        runnable = [t for t in selected if t.name not in skipped]
        was_training = model.training
        model.eval()
        bad = BadImages(list(self.data.bad.items))
        results: dict = {"data": str(self.cfg.data), "step": step, "skipped": None}
        try:
            test = cached_image_features(
                cache, "test images",
                lambda: extract_features(model, self.data.test.samples, self.transform, self.cfg.batch_size, bad,
                                         embeddings=any(t.image_embed for t in runnable),
                                         trunk=any(t.trunk_features for t in runnable),
                                         desc=f"{label}eval images", progress=self.progress), bad)
            ctx = EvalContext(model, self.data, test, self.cfg, self.transform, bad, self.progress,
                              self._tokenizer, cache, label)
            for task in runnable:
                results[task.name] = task.run(ctx)
        finally:
            model.train(was_training)
        results["bad_images"] = bad.as_dict()
        results["skipped"] = skipped or None
        return results


def flat_metrics(results: dict) -> dict[str, float]:
    """Scalar metrics for metrics.jsonl: {"zeroshot_top1": ..., "linear_probe_top1": ..., ...}."""
    flat = {}
    for task in EVALUATORS:
        for k, v in (results.get(task) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[f"{task}_{k}"] = float(v)
    flat["bad_images"] = float(results["bad_images"]["count"])
    return flat


def save_results(results: dict, path: str | Path) -> None:
    """Write `results` as indented JSON; readers never see a partial file."""
    write_json_atomic(path, results, indent=2, default=float)


