"""Evaluation of an image/text model: zero-shot classification, linear probe, image-text retrieval.

One module per job:
- `config`: `EvalConfig` (the run config's `eval:` section: data, tasks, how often) and `LinearProbeConfig`;
- `data`: the evaluation data sets (ImageFolder, labelled webdataset shards, the demo's held-out
  layout) and the evaluation transform;
- `features`: frozen-model image and text encodings, computed once per evaluation and shared;
- `task`: the evaluator interface (`Task`, `EvalContext`);
- `zeroshot`, `probe` (linear probe), `retrieval`: one evaluator each;
- `runner`: `Evaluator`, which runs the configured evaluators, and the results' JSON;
- `hook`: the training loop's evaluation hook;
- `text`: the text tower alone (STS, text probe); `ranks`: Spearman, ROC AUC;
- suites (tools/evaluate.py --suite, docs/EVALUATION.md): `suite` (the suite file, out-of-domain
  label spaces), `suite_run` (every dataset x every model), `cache` (encodings kept on disk, keyed
  by the weights' content), `suite_report` (results.json, results.md, results.png).
A model is loaded from a checkpoint by `trainer.checkpoint.load_model`.
"""
from trainer.evaluation.accuracy import classification_metrics
from trainer.evaluation.config import TASKS, EvalConfig, LinearProbeConfig
from trainer.evaluation.data import (BadImages, EvalData, EvalTransform, LabelledSplit, Sample, image_folder,
                                     imagenet_classnames, imagenet_templates, webdataset_samples)
from trainer.evaluation.features import ImageFeatures, encode_texts, extract_features
from trainer.evaluation.hook import EvalHook, make_train_hook
from trainer.evaluation.probe import linear_probe
from trainer.evaluation.retrieval import retrieval_recall
from trainer.evaluation.runner import EVALUATORS, Evaluator, flat_metrics, save_results
from trainer.evaluation.task import EvalContext, Task
from trainer.evaluation.zeroshot import zero_shot_accuracy, zero_shot_classifier

__all__ = [
    "TASKS", "EVALUATORS", "EvalConfig", "LinearProbeConfig", "Evaluator", "EvalHook", "make_train_hook",
    "flat_metrics", "save_results", "EvalData", "LabelledSplit", "EvalTransform", "BadImages", "Sample",
    "image_folder", "webdataset_samples", "imagenet_classnames", "imagenet_templates", "ImageFeatures",
    "extract_features", "encode_texts", "EvalContext", "Task", "classification_metrics", "zero_shot_classifier",
    "zero_shot_accuracy", "linear_probe", "retrieval_recall",
]
