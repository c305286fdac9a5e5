"""Linear probe on the frozen pooled trunk feature (`model.visual_features`), train split -> test split.

Two solvers:
- "lbfgs" (default; for small sets): full-batch multinomial logistic regression with an L2 penalty
  picked on a validation fold of the training features, as in the CLIP paper's probe;
- "sgd": SLIP's probe recipe (SGD with momentum, cosine schedule) on cached features; SLIP's
  RandomResizedCrop + flip feature augmentation is not applied.
Features are standardised with the training set's statistics first.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.evaluation.accuracy import classification_metrics
from trainer.evaluation.config import LinearProbeConfig
from trainer.evaluation.data import EvalData
from trainer.evaluation.task import EvalContext, Task


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _fit_lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int,
               init: torch.nn.Linear | None = None) -> torch.nn.Linear:
    """Multinomial logistic regression, full batch: mean cross-entropy + l2/2 * ||W||^2.
    `init` warm-starts from a neighbouring penalty's solution (the grid is walked strong -> weak)."""
    clf = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        clf.weight.copy_(init.weight if init is not None else torch.zeros_like(clf.weight))
        clf.bias.copy_(init.bias if init is not None else torch.zeros_like(clf.bias))
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=max_iter, history_size=10,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + 0.5 * l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def _fit_sgd(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: LinearProbeConfig) -> torch.nn.Linear:
    """SLIP's probe recipe on cached features: SGD momentum, weight decay, per-iteration cosine."""
    g = torch.Generator().manual_seed(cfg.seed)
    clf = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.normal_(clf.weight, std=0.01, generator=g)
    torch.nn.init.zeros_(clf.bias)
    lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return clf


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, cfg: LinearProbeConfig = LinearProbeConfig()) -> dict:
    """Train a linear classifier on frozen train features, report accuracy on test features."""
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("linear probe needs readable images in both the train and the test split")
    train_x, test_x = _standardise(train_x.float(), test_x.float())
    result: dict = {"solver": cfg.solver, "num_train": len(train_x)}
    with torch.enable_grad(), torch.autocast(train_x.device.type, enabled=False):
        if cfg.solver == "lbfgs":
            g = torch.Generator().manual_seed(cfg.seed)
            perm = torch.randperm(len(train_x), generator=g)
            n_val = int(len(train_x) * cfg.val_fraction)
            best_l2, fits = cfg.l2_grid[0], {}
            if n_val > 0 and len(cfg.l2_grid) > 1:
                va, tr = perm[:n_val], perm[n_val:]
                scores, prev = {}, None
                for l2 in sorted(cfg.l2_grid, reverse=True):
                    prev = fits[l2] = _fit_lbfgs(train_x[tr], train_y[tr], num_classes, l2, cfg.max_iter, prev)
                    with torch.no_grad():
                        scores[l2] = (prev(train_x[va]).argmax(1) == train_y[va]).float().mean().item()
                best_l2 = max(cfg.l2_grid, key=lambda l2: (scores[l2], l2))  # ties: stronger penalty
                result["l2_val_accuracy"] = {str(k): 100.0 * v for k, v in sorted(scores.items())}
            clf = _fit_lbfgs(train_x, train_y, num_classes, best_l2, cfg.max_iter, fits.get(best_l2))
            result["l2"] = best_l2
        elif cfg.solver == "sgd":
            clf = _fit_sgd(train_x, train_y, num_classes, cfg)
            result["epochs"] = cfg.epochs
        else:
            raise ValueError(f"unknown linear probe solver {cfg.solver!r}; choose lbfgs or sgd")
    with torch.no_grad():
        logits = clf(test_x.to(clf.weight.dtype)).float()
        train_acc = (clf(train_x.to(clf.weight.dtype)).argmax(1) == train_y).float().mean().item()
    result.update(classification_metrics(logits, test_y, num_classes))
    result["train_top1"] = 100.0 * train_acc
    return result


def _no_train_split(data: EvalData) -> str | None:
    return None if data.train is not None else "no train/ split next to val/"


def evaluate(ctx: EvalContext) -> dict:
    train = ctx.features(ctx.data.train.samples, "probe train images", trunk=True)
    # the fit is deterministic given the features: a resumed suite run keeps it too
    return ctx.cached("linear probe", lambda: linear_probe(train.features, train.labels, ctx.test.features,
                                                           ctx.test.labels, len(ctx.data.classnames), ctx.cfg.probe))


TASK = Task("linear_probe", evaluate, trunk_features=True, unavailable=_no_train_split)
