"""The text tower judged on its own (the xCLIP paper's textual representation learning).

- `sts`: semantic textual similarity on GLUE's STS-B TSV (columns found by header: `sentence1`,
  `sentence2`, `score`): Spearman's rank correlation between the cosine similarity of the two
  sentences' features and the gold score, with a 95% bootstrap interval over sentence pairs so two
  models can be compared.
- `text_probe`: a linear probe on frozen text features, on a GLUE single-sentence task folder
  (`train.tsv` and `dev.tsv` with `sentence` and `label`, e.g. SST-2), the linear probe of
  trainer/evaluation/probe.py.

Both report two features: `embed`, the model's text embedding (`encode_text`, before
normalisation: the projected feature for CLIP-style models, the cluster logits for nCLIP), and
`eot`, the text trunk's final-LayerNorm feature at the end-of-text token before any projection.
Sentences are tokenised as in training: longer ones keep their first tokens and end with the
end-of-text token. Only the text tower runs; images are never touched.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.regular_files import read_regular
from trainer.evaluation.features import tokenize
from trainer.evaluation.probe import LinearProbeConfig, linear_probe
from trainer.evaluation.ranks import rankdata, spearman  # noqa: F401  (rankdata: part of this module's interface)

TEXT_TASKS = ("sts", "text_probe")
FEATURES = ("embed", "eot")
MAX_TSV_BYTES = 512 << 20
BOOTSTRAP_SAMPLES = 1000


def read_tsv(path: Path, columns: tuple[str, ...]) -> tuple[list[tuple[str, ...]], int]:
    """Rows of `columns` (found by name in the header) from a GLUE TSV, and how many rows were
    malformed (too few fields) and skipped."""
    text = read_regular(path, MAX_TSV_BYTES, "a TSV file").decode("utf-8", "replace")
    reader = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: empty file")
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} in the header {header[:8]}")
    where = [header.index(c) for c in columns]
    rows, bad = [], 0
    for fields in reader:
        if len(fields) <= max(where):
            bad += 1
            continue
        rows.append(tuple(fields[i] for i in where))
    return rows, bad


def text_features(model, tokenizer: Callable, sentences: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    """Both features of every sentence, float32 on the CPU."""
    device = next(model.parameters()).device
    out = {name: [] for name in FEATURES}
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            tokens = tokenize(model, tokenizer, sentences[i:i + batch_size]).to(device)
            out["embed"].append(model.encode_text(tokens, normalize=False).float().cpu())
            out["eot"].append(model.text(tokens).float().cpu())
    return {name: torch.cat(parts) if parts else torch.empty(0) for name, parts in out.items()}


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise cosine similarity in float64, exactly 1 for identical rows (x.x / sqrt(x.x * x.x)), so
    identical sentences tie; torch's cosine_similarity gives 1 +- 1 ulp and ranks them by rounding."""
    a, b = a.double().numpy(), b.double().numpy()
    return (a * b).sum(1) / np.sqrt(np.maximum((a * a).sum(1) * (b * b).sum(1), 1e-300))


def sts(model, tokenizer: Callable, path: Path, batch_size: int = 256, seed: int = 0) -> dict:
    rows, bad = read_tsv(path, ("sentence1", "sentence2", "score"))
    pairs = []
    for a, b, score in rows:
        try:
            pairs.append((a, b, float(score)))
        except ValueError:
            bad += 1
    if len(pairs) < 3:
        raise ValueError(f"{path}: {len(pairs)} usable sentence pairs; STS needs at least 3")
    gold = np.array([p[2] for p in pairs])
    first = text_features(model, tokenizer, [p[0] for p in pairs], batch_size)
    second = text_features(model, tokenizer, [p[1] for p in pairs], batch_size)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(pairs), (BOOTSTRAP_SAMPLES, len(pairs)))
    result: dict = {"num_pairs": len(pairs), "malformed_rows": bad}
    for name in FEATURES:
        sim = row_cosine(first[name], second[name])
        boot = np.array([spearman(sim[d], gold[d]) for d in draws])
        low, high = np.nanpercentile(boot, [2.5, 97.5])
        result[name] = {"spearman": spearman(sim, gold), "ci95": [float(low), float(high)]}
    return result


def text_probe(model, tokenizer: Callable, folder: Path, batch_size: int = 256,
               probe: LinearProbeConfig = LinearProbeConfig()) -> dict:
    splits = {}
    for split in ("train", "dev"):
        rows, bad = read_tsv(folder / f"{split}.tsv", ("sentence", "label"))
        kept = [(s, int(y)) for s, y in rows if y.strip().lstrip("-").isdigit()]
        splits[split] = (kept, bad + len(rows) - len(kept))
    labels = sorted({y for _, y in splits["train"][0]})
    index = {y: i for i, y in enumerate(labels)}
    train = [(s, index[y]) for s, y in splits["train"][0]]
    dev = [(s, index[y]) for s, y in splits["dev"][0] if y in index]
    unseen = len(splits["dev"][0]) - len(dev)     # a dev label the probe never trained on: counted, not scored
    if not train or not dev:
        raise ValueError(f"{folder}: no usable labelled sentences in train.tsv and dev.tsv")
    x_train = text_features(model, tokenizer, [s for s, _ in train], batch_size)
    x_dev = text_features(model, tokenizer, [s for s, _ in dev], batch_size)
    y_train, y_dev = torch.tensor([y for _, y in train]), torch.tensor([y for _, y in dev])
    result: dict = {"num_classes": len(labels), "malformed_rows": splits["train"][1] + splits["dev"][1],
                    "dev_rows_with_unseen_label": unseen}
    for name in FEATURES:
        result[name] = linear_probe(x_train[name], y_train, x_dev[name], y_dev, len(labels), probe)
    return result
