"""The trainer's side of the data: this rank's loader from the run configuration, an endless batch
stream over epochs, and the copy of a batch to the training device."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from pipeline.loader import SLIPLoader
    from pipeline.manifest import Manifest
    from trainer.config import RunConfig


def build_loader(cfg: RunConfig, manifest: Manifest, device: torch.device, rank: int = 0,
                 world: int = 1) -> SLIPLoader:
    """This rank's loader; DALI augments on the training device unless told otherwise."""
    from pipeline.loader import SLIPLoader
    from pipeline.tokenizer import Tokenizer
    data_device = cfg.data.device
    if data_device == "auto":
        data_device = "gpu" if device.type == "cuda" and cfg.data.backend == "dali" else "cpu"
    return SLIPLoader(manifest, cfg.data.recipe, cfg.data.batch_size, Tokenizer(), rank=rank, world_size=world,
                      seed=cfg.train.seed, num_threads=cfg.data.num_threads, device=data_device,
                      device_id=device.index if data_device == "gpu" else None,
                      caption_mode=cfg.data.caption_mode, backend=cfg.data.backend)


def endless(loader) -> Iterator[dict]:
    """Batches over epochs without end; the loader itself tracks the epoch and the position.
    The loader must yield at least one batch per epoch (the trainer checks steps_per_epoch)."""
    while True:
        yield from loader


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
