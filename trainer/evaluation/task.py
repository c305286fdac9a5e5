"""The interface between the runner and the evaluators.

An evaluator is a `Task`: a name (the key of its results and of the `tasks` config list), a
function `run(ctx) -> metrics` (a JSON-ready dict; its numbers also go to metrics.jsonl), what it
needs of the test split's features (computed once and shared), and why it cannot run on a given
data set (then it is skipped, with that reason in the results).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from trainer.evaluation.cache import FeatureCache, cached_image_features
from trainer.evaluation.config import EvalConfig
from trainer.evaluation.data import BadImages, EvalData, EvalTransform, Sample
from trainer.evaluation.features import ImageFeatures, extract_features


@dataclass
class EvalContext:
    """What every evaluator receives for one evaluation of one model."""
    model: torch.nn.Module             # in eval mode
    data: EvalData
    test: ImageFeatures                # of data.test, with what the selected tasks need
    cfg: EvalConfig
    transform: EvalTransform
    bad: BadImages                     # unreadable images of this evaluation (listing problems included)
    progress: bool
    tokenizer: Callable[[], Callable]  # returns the text tokenizer (made on first use)
    cache: FeatureCache | None = None  # suite runs: computed encodings kept on disk (cache.py)
    label: str = ""                    # progress-bar prefix (the suite's dataset and model)

    def features(self, samples: Sequence[Sample], desc: str, embeddings: bool = False,
                 trunk: bool = False) -> ImageFeatures:
        """Encodings of more images (another split, extra captioned images)."""
        return cached_image_features(
            self.cache, desc,
            lambda: extract_features(self.model, samples, self.transform, self.cfg.batch_size, self.bad,
                                     embeddings=embeddings, trunk=trunk, desc=f"{self.label}{desc}",
                                     progress=self.progress), self.bad)

    def cached(self, name: str, compute: Callable[[], Any]) -> Any:
        """`compute()`, kept in the suite's cache when there is one."""
        return compute() if self.cache is None else self.cache.get(name, compute)


def _always_available(data: EvalData) -> str | None:
    return None


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[[EvalContext], dict]
    image_embed: bool = False          # needs the test split's image embeddings
    trunk_features: bool = False       # needs the test split's pooled trunk features
    text: bool = False                 # needs the model's text tower (not applicable to SimCLR)
    unavailable: Callable[[EvalData], str | None] = _always_available   # why it cannot run on this data; None = it can
