"""Runs a suite: every dataset x every model, encodings cached, one record per number.

Datasets run in the suite's order; each is listed once and evaluated by every model in turn (one
progress bar per model and split, with rate and ETA). A dataset missing on disk is skipped with the
path looked for, one that cannot be read is recorded as failed with its error (the rest run), and a
task a model cannot do (SimCLR has no text tower) is recorded as not applicable.
Image encodings, zero-shot classifiers and linear-probe fits go through a `FeatureCache` under
`<out>/cache/<model key>/<dataset>/`, so a rerun after a kill recomputes nothing already written.
The text tasks read small files and are recomputed.

Results (`run_suite`): {"datasets": [status per dataset], "models": [...], "records": [one per
model x dataset x task x metric], "runs": {model: {dataset: full task results}}}; a record holds the
value, whether it is the dataset's headline metric (the one its table shows), sample counts and
unreadable images.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.dataclass_io import to_dict
from trainer.evaluation.cache import FeatureCache
from trainer.evaluation.config import EvalConfig
from trainer.evaluation.data import EvalData, EvalTransform
from trainer.evaluation.runner import Evaluator
from trainer.evaluation.suite import DatasetSpec, SuiteConfig, open_dataset
from trainer.evaluation.text import sts, text_probe


@dataclass
class SuiteModel:
    """One row of the table: a loaded model and what it came from."""
    name: str                  # the checkpoint path as given, or "random-init"
    model: torch.nn.Module
    run_cfg: object            # its RunConfig (recipe: image transform; eval.batch_size)
    key: str                   # cache.model_key: its weights' and architecture's hash


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_key(spec: DatasetSpec, data: EvalData, transform: EvalTransform, suite: SuiteConfig) -> dict:
    """What a cached value of this dataset depends on besides the model's weights."""
    listing = [(s.name, s.label) for split in (data.test, data.train) if split is not None for s in split.samples]
    return {"dataset": to_dict(spec), "transform": [transform.size, transform.resize, transform.mean.flatten().tolist(),
                                                    transform.std.flatten().tolist()],
            "classnames": _sha(data.classnames), "templates": _sha(data.templates), "samples": _sha(listing),
            "captions": _sha([(str(p), c) for p, c in data.captions or ()]), "probe": to_dict(suite.probe)}


def _headline(task: str, metric: str) -> str:
    return {"zeroshot": metric, "linear_probe": metric, "retrieval": "mean_R@1",
            "sts": "spearman_embed", "text_probe": "top1_embed"}[task]


def task_metrics(task: str, result: dict) -> dict[str, float]:
    """The scalar metrics of one task's results, as recorded (percent; Spearman as a correlation)."""
    if task in ("zeroshot", "linear_probe"):
        m = {k: result[k] for k in ("top1", "top5", "mean_per_class", "roc_auc") if k in result}
        m["top1_top5_mean"] = (result["top1"] + result["top5"]) / 2
        return m
    if task == "retrieval":
        m = {k: v for k, v in result.items() if "_R@" in k}
        m["mean_R@1"] = (result["image_to_text_R@1"] + result["text_to_image_R@1"]) / 2
        return m
    if task == "sts":
        return {f"spearman_{f}": result[f]["spearman"] for f in ("embed", "eot")}
    return {f"top1_{f}": result[f]["top1"] for f in ("embed", "eot")}


def _samples(task: str, result: dict) -> int | None:
    for k in ("num_images", "num_pairs", "num_captions"):
        if k in result:
            return result[k]
    if task == "text_probe":
        return result["embed"].get("num_images")
    return None


def _records(model: SuiteModel, spec: DatasetSpec, results: dict) -> list[dict]:
    out = []
    bad = results.get("bad_images", {}).get("count", 0)
    for task in spec.tasks:
        base = {"model": model.name, "model_key": model.key, "dataset": spec.name, "task": task}
        if task not in results:
            reason = (results.get("skipped") or {}).get(task, "not run")
            out.append({**base, "metric": None, "value": None, "status": "not applicable"
                        if reason.startswith("not applicable") else "skipped", "reason": reason})
            continue
        headline = _headline(task, spec.metric)
        for metric, value in task_metrics(task, results[task]).items():
            rec = {**base, "metric": metric, "value": value, "headline": metric == headline,
                   "num_samples": _samples(task, results[task]), "bad_images": bad}
            if task == "sts":
                rec["ci95"] = results[task][metric.split("_", 1)[1]]["ci95"]
            out.append(rec)
    return out


def _text_results(model: SuiteModel, spec: DatasetSpec, batch: int, suite: SuiteConfig) -> dict:
    if not getattr(model.model, "uses_text", False):
        return {"skipped": {t: "not applicable: the model has no text tower" for t in spec.tasks}}
    from pipeline.tokenizer import Tokenizer
    tokenizer, path = Tokenizer(), Path(spec.path)
    results: dict = {"data": spec.path, "skipped": None}
    if "sts" in spec.tasks:
        results["sts"] = sts(model.model, tokenizer, path, batch)
    if "text_probe" in spec.tasks:
        results["text_probe"] = text_probe(model.model, tokenizer, path, batch, suite.probe)
    return results


def _evaluate(m: SuiteModel, spec: DatasetSpec, data: EvalData | None, suite: SuiteConfig, out: Path,
              progress: bool, sigkill_after_writes: int | None) -> dict:
    batch = suite.batch_size or m.run_cfg.eval.batch_size
    if spec.text:
        return _text_results(m, spec, batch, suite)
    transform = EvalTransform.from_recipe(m.run_cfg.data.recipe)
    cache = FeatureCache(out / "cache" / m.key[:20] / spec.name, _data_key(spec, data, transform, suite),
                         sigkill_after_writes)
    cfg = EvalConfig(data=spec.path, tasks=spec.tasks, batch_size=batch, probe=suite.probe)
    return Evaluator(cfg, transform, progress=progress, data=data)(m.model, cache=cache,
                                                                   label=f"{spec.name} [{m.name}] ")


def run_suite(suite: SuiteConfig, root: str | Path, models: list[SuiteModel], out: str | Path,
              progress: bool = True, sigkill_after_writes: int | None = None) -> dict:
    """Evaluate `models` on the suite's datasets found under `root`; encodings cached under `out`."""
    out = Path(out)
    statuses, records, runs = [], [], {m.name: {} for m in models}
    for spec in suite.datasets:
        location = Path(root) / spec.path
        if not location.exists():
            statuses.append({"dataset": spec.name, "status": "skipped", "path": str(location),
                             "reason": f"not found: {location}"})
            print(f"skipped {spec.name}: not found: {location}", flush=True)
            continue
        spec = dataclasses.replace(spec, path=str(location))
        try:        # a damaged dataset fails alone (its error recorded, none of its numbers); the rest run
            data = None if spec.text else open_dataset(spec)
            done = {m.name: _evaluate(m, spec, data, suite, out, progress, sigkill_after_writes) for m in models}
        except (ValueError, OSError) as e:
            statuses.append({"dataset": spec.name, "status": "failed", "path": str(location),
                             "reason": f"{type(e).__name__}: {e}"})
            print(f"failed {spec.name}: {type(e).__name__}: {e}", flush=True)
            continue
        statuses.append({"dataset": spec.name, "status": "evaluated", "path": str(location)})
        for m in models:
            runs[m.name][spec.name] = done[m.name]
            records += _records(m, spec, done[m.name])
    return {"datasets": statuses, "models": [{"name": m.name, "model_key": m.key,
                                              "objective": m.run_cfg.objective.name, "model": m.run_cfg.model.name}
                                             for m in models],
            "records": records, "runs": runs}
