"""A converted model in our terms, and our checkpoint file for it.

The file is our checkpoint format (what the trainer writes, less the training state): "model" (the
state dict in our names) and "config" (a whole run configuration as a plain dict: the model, the
objective, and the preprocessing in `data.recipe`: image size and the mean / std the weights were
trained with), so `trainer.checkpoint.load_model` and everything built on it read it unchanged,
and evaluation normalises images as the source model expects. "converted_from" records the source
and what was left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.recipe import AugmentationRecipe
from trainer.checkpoint import CheckpointError, atomic_save, check_model_state
from trainer.config import DataConfig, ObjectiveConfig, RunConfig, check_consistency
from trainer.convert.mapping import ConversionError
from trainer.dataclass_io import to_dict
from trainer.models import ModelConfig, build_model
from trainer.objectives import objective_parts

# ModelConfig fields that decide what the towers compute from their weights; the head counts and
# the options below cannot be read off the tensors' shapes
IMAGE_TOWER = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "mlp_ratio",
               "vision_ln_pre", "vision_patch_bias", "vision_ln_eps", "vision_act")
TEXT_TOWER = ("vocab_size", "context_length", "text_width", "text_layers", "text_heads", "text_ln_eps", "text_act")


@dataclass
class Converted:
    model: ModelConfig
    objective: str
    state: dict[str, torch.Tensor]                   # our parameter names
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str                                      # "<format>: <path>"
    dropped: list[str] = field(default_factory=list)  # what was left out, and why

    def run_config(self) -> RunConfig:
        """The run configuration stored in the checkpoint: the model, the objective, the
        preprocessing; every other section at its defaults."""
        recipe = AugmentationRecipe(image_size=self.model.image_size, mean=tuple(self.mean), std=tuple(self.std),
                                    num_ssl_views=objective_parts(self.objective).ssl_views)
        cfg = RunConfig(model=self.model, objective=ObjectiveConfig(name=self.objective),
                        data=DataConfig(recipe=recipe))
        check_consistency(cfg)
        return cfg

    def verify(self) -> None:
        """The state loads into our model for (model, objective) exactly: no key missing or extra."""
        with torch.device("meta"):
            model = build_model(self.model, self.objective)
        try:
            check_model_state(model, self.state, self.source)
        except CheckpointError as e:
            raise ConversionError(str(e).replace("\n", "; ")) from None

    def save(self, path: str | Path) -> Path:
        """Write our checkpoint file (atomically)."""
        self.verify()
        path = Path(path)
        atomic_save({"model": {k: v.contiguous() for k, v in self.state.items()},
                     "config": to_dict(self.run_config()),
                     "converted_from": {"source": self.source, "dropped": list(self.dropped)}}, path)
        return path


def tower_differences(a: ModelConfig, b: ModelConfig, text: bool = True) -> list[tuple[str, object, object]]:
    """(field, a's value, b's value) for every tower field (the text tower's only with `text`) on
    which a and b differ."""
    names = IMAGE_TOWER + (TEXT_TOWER if text else ())
    return [(n, getattr(a, n), getattr(b, n)) for n in names if getattr(a, n) != getattr(b, n)]
