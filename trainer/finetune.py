"""End-to-end finetuning on the pretraining trainer: what differs from pretraining, and nothing else.

A run is a finetuning run when `objective.name` is `classification`. The loop, checkpoints, resume,
DDP, precision and metrics are the pretraining ones (trainer/loop.py); this module supplies the
parts that differ (`build_finetune_parts`):

- the model: `ImageClassifier` (trainer/classifier.py), its tower from `finetune.checkpoint`
  (any checkpoint we read; empty = random initialisation, the baseline), drop path from
  `model.drop_path`;
- the data: a labelled set (`data.train`: ImageFolder or labelled shards, pipeline/labelled.py)
  through the same loader, with the finetuning view (bicubic crop + flip + RandAugment) and the
  batch draws (erasing, mixup / cutmix) of `data.recipe`;
- on the training device, after the copy (`MixOnDevice`): random erasing, then mixup / cutmix with
  label smoothing, giving soft targets;
- the objective `classification` (trainer/objectives.py): cross-entropy against the soft targets,
  plus train top-1 against the targets' largest class;
- the optimizer: BEiT's weight-decay exclusions (`finetune.no_weight_decay`) and layer-wise lr
  decay (`finetune.layer_decay`: layer l of L gets decay^(L + 1 - l), the head 1);
- the evaluation: top-1 / top-5 on `data.val` every `finetune.eval_every_epochs` epochs and at
  the end, with the evaluation transform (bicubic resize to `data.recipe.eval_resize`, centre crop).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.batch_mix import MixDraw, apply_erasing, apply_mix
from pipeline.files import write_json_atomic
from pipeline.image_open import open_image
from pipeline.labelled import LabelledSet, open_labelled
from trainer.classifier import ImageClassifier, load_image_tower
from trainer.evaluation.accuracy import classification_metrics
from trainer.evaluation.data import EvalTransform
from trainer.optim import vit_layer_id

if TYPE_CHECKING:
    from trainer.config import RunConfig

CLASSIFICATION = "classification"
_NO_MIX = MixDraw("none", 1.0)


@dataclass
class FinetuneConfig:
    checkpoint: str = ""               # the pretrained image tower; "" = random initialisation
    layer_decay: float = 0.65          # ViT-S/B 0.65, ViT-L 0.75 (BEiT, as the SLIP reference runs it)
    head_init_scale: float = 0.001
    no_weight_decay: tuple[str, ...] = ("pos_embed", "cls_token")   # besides biases and norms
    eval_every_epochs: int = 1

    def __post_init__(self):
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must lie in (0, 1], got {self.layer_decay}")
        if self.eval_every_epochs < 0:
            raise ValueError(f"eval_every_epochs must be >= 0 (0 = at the end only), got {self.eval_every_epochs}")


class ClassifierForward(torch.nn.Module):
    """The classifier as the loop calls models: batch dict in, dict out (logits and the batch's targets)."""

    def __init__(self, model: ImageClassifier):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict:
        return {"logits": self.model(batch["clip_image"]), "target": batch["target"]}


class MixOnDevice:
    """Erasing, then mixup / cutmix, on the batch already on the training device: adds `target`."""

    def __init__(self, num_classes: int, smoothing: float):
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, batch: dict) -> dict:
        images = batch["clip_image"]
        if batch.get("erasing") is not None:
            images = apply_erasing(images, batch["erasing"])
        if batch.get("mix") is not None:
            images, target = apply_mix(images, batch["label"], batch["mix"], self.num_classes, self.smoothing)
        else:
            target = apply_mix(images, batch["label"], _NO_MIX, self.num_classes, self.smoothing)[1]
        return {**batch, "clip_image": images, "target": target}


class ValidationHook:
    """top-1 / top-5 of the classifier on the validation set (`Components.evaluate`). With `out_dir`,
    each evaluation also writes `val_step_XXXXXXXX.json` there: the metrics and every image's top-1
    outcome by name, so two models can be compared on the same images (a paired test)."""

    def __init__(self, data: LabelledSet, transform: EvalTransform, batch_size: int, device: torch.device,
                 threads: int = 2, out_dir: Path | None = None):
        self.data, self.transform, self.batch_size, self.device = data, transform, batch_size, device
        self.threads, self.bad, self.out_dir = threads, 0, out_dir

    def _load(self, i: int) -> torch.Tensor | None:
        try:
            return self.transform(open_image(self.data.image(i)))
        except Exception:   # an unreadable validation image (or none at all) is counted, never fatal
            return None

    def _images(self):
        """Batches of (images, labels), decoded in threads (PIL releases the GIL)."""
        with ThreadPoolExecutor(self.threads) as pool:
            for start in range(0, len(self.data), self.batch_size):
                ids = range(start, min(start + self.batch_size, len(self.data)))
                loaded = list(zip(ids, pool.map(self._load, ids)))
                self.bad += sum(x is None for _, x in loaded)
                good = [(i, x) for i, x in loaded if x is not None]
                if good:
                    yield (torch.stack([x for _, x in good]), torch.tensor([int(self.data.labels[i]) for i, _ in good]),
                           [i for i, _ in good])

    def __call__(self, model, step: int) -> dict:
        classifier = model.model if isinstance(model, ClassifierForward) else model
        self.bad = 0
        logits, labels, seen = [], [], []
        for images, y, ids in self._images():
            logits.append(classifier(images.to(self.device)).float().cpu())
            labels.append(y)
            seen += ids
        logits, labels = torch.cat(logits), torch.cat(labels)
        found = classification_metrics(logits, labels, self.data.num_classes)
        metrics = {"val_top1": found["top1"], "val_top5": found["top5"], "val_images": found["num_images"],
                   "val_bad_images": self.bad}
        if self.out_dir is not None:
            correct = (logits.argmax(1) == labels).tolist()
            write_json_atomic(self.out_dir / f"val_step_{step:08d}.json",
                              {"step": step, **metrics, "top1_by_image": dict(zip((self.data.names[i] for i in seen),
                                                                                 map(int, correct)))}, indent=1)
        return metrics


@dataclass
class FinetuneParts:
    model: ClassifierForward
    train: LabelledSet
    group_options: dict
    evaluate: ValidationHook | None
    on_device: MixOnDevice
    eval_every_epochs: int
    source: str                 # where the tower came from


def reference_parts_off(cfg: RunConfig) -> list[str]:
    """The parts of the reference recipe a finetuning config leaves at their pretraining defaults."""
    r, o = cfg.data.recipe, cfg.optim
    off = {"RandAugment": not r.rand_augment.num_ops, "mixup/cutmix": not r.mix.mixes,
           "random erasing": not r.mix.erasing_prob, "label smoothing": not r.mix.label_smoothing,
           "the flip": not r.clip_flip_prob, "bicubic resizing": r.interpolation != "bicubic",
           "lr scaling with the batch": o.lr_reference_batch is None}
    return [name for name, missing in off.items() if missing]


def group_options(cfg: RunConfig) -> dict:
    """`build_optimizer` options for a ClassifierForward: BEiT's exclusions and layer-wise decay."""
    layers = cfg.model.vision_layers
    return dict(extra_no_decay=tuple(cfg.finetune.no_weight_decay), layer_decay=cfg.finetune.layer_decay,
                num_layers=layers, layer_id=lambda name: vit_layer_id(name.removeprefix("model."), layers))


def build_finetune_parts(cfg: RunConfig, device: torch.device, rank: int = 0) -> FinetuneParts:
    """The model (tower loaded), the training set, the optimizer's group options, the validation
    hook and the on-device batch step of a finetuning run."""
    from trainer.config import ConfigError
    from trainer.convert.mapping import ConversionError
    if not cfg.data.train:
        raise ConfigError("a finetuning run needs data.train (an ImageFolder directory or labelled shards)")
    try:
        train = open_labelled(cfg.data.train)
        val = open_labelled(cfg.data.val, train.classnames, train.num_classes) if cfg.data.val else None
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.train / data.val: {e}") from None
    classifier = ImageClassifier(cfg.model, train.num_classes, cfg.finetune.head_init_scale)
    source = "random initialisation"
    if cfg.finetune.checkpoint:
        try:
            source = load_image_tower(classifier, cfg.finetune.checkpoint)
        except ConversionError as e:
            raise ConfigError(f"finetune.checkpoint: {e}") from None
    if rank == 0:
        print(f"finetuning {train.num_classes} classes from {source}; train {len(train)} images"
              + (f", skipped {dict(train.skipped)}" if train.skipped else ""), flush=True)
        if off := reference_parts_off(cfg):
            print(f"warning: finetuning without {', '.join(off)} (the reference recipe has them: "
                  "trainer/configs/finetune_vit_*.yaml)", flush=True)
    groups = group_options(cfg)
    recipe = cfg.data.recipe
    hook = None
    if val is not None:
        hook = ValidationHook(val, EvalTransform.from_recipe(recipe), cfg.eval.batch_size, device,
                              cfg.data.num_threads, Path(cfg.out_dir) / "eval")
    return FinetuneParts(ClassifierForward(classifier), train, groups, hook,
                         MixOnDevice(train.num_classes, recipe.mix.label_smoothing),
                         cfg.finetune.eval_every_epochs, source)


def is_finetuning(cfg: RunConfig) -> bool:
    return cfg.objective.name == CLASSIFICATION

