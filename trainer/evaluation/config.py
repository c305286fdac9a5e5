"""The evaluation configuration: which evaluators run, on which data, how often during training.

It is the `eval:` section of the run configuration and also what `tools/evaluate.py` fills from its
flags. Preprocessing is not part of it: evaluation images are prepared like the run's training
images (the recipe's image size, resize and normalisation; see `data.EvalTransform.from_recipe`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TASKS = ("zeroshot", "linear_probe", "retrieval")   # the evaluators (runner.EVALUATORS), in run order


@dataclass
class LinearProbeConfig:
    solver: Literal["lbfgs", "sgd"] = "lbfgs"   # lbfgs for small sets; sgd is SLIP's probe recipe
    # lbfgs: L2 penalties tried on a validation fold of the training features; the best is refit on all
    l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    val_fraction: float = 0.2
    max_iter: int = 100
    # sgd: cosine decay to 0 over `epochs`
    epochs: int = 90
    lr: float = 0.1                    # for batch_size 256; scaled linearly with the batch size
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0


@dataclass
class EvalConfig:
    data: str | None = None            # eval dir (demo layout or ImageFolder) or a shard dir/glob; None = none
    every_steps: int = 0               # training: steps between evaluations; 0 = only at the end of the run
    # The linear probe fits a classifier at every call, so training runs the cheap tasks by default;
    # tools/evaluate.py runs all of them. Tasks whose data is absent are skipped (and say so).
    tasks: tuple[Literal[TASKS], ...] = ("zeroshot", "retrieval")
    batch_size: int = 64
    classnames: str | None = None      # json list; None = classnames.json in the data dir, else dir names
    templates: str | None = None       # json list with "{}"; None = templates.json in the data dir, else ImageNet's
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)

    def __post_init__(self):
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown evaluation tasks {sorted(unknown)}; choose from {TASKS}")
