"""The trainer's side of the data: its config section (`DataConfig`), this rank's loader from the run configuration, an endless batch
stream over epochs, and the copy of a batch to the training device."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Literal

import torch

from pipeline.augment import BACKENDS
from pipeline.loader import CAPTION_MODES
from pipeline.recipe import AugmentationRecipe
from trainer.distributed import cuda_device_index

if TYPE_CHECKING:
    from pipeline.labelled import LabelledSet
    from pipeline.loader import SLIPLoader
    from pipeline.manifest import Manifest
    from trainer.config import RunConfig


@dataclass
class DataConfig:
    # result manifest json of a shard build (pipeline/manifest.py), or a list of them to train on
    # their mixture, each with its upsampling factor in `weights` (pipeline/mixture.py)
    manifest: str | list[str] = ""
    weights: list[float] | None = None   # per manifest: 1 = each sample once an epoch, 0.5 = a fresh half
    # finetuning (objective.name=classification): labelled sets, ImageFolder or labelled shards
    train: str = ""
    val: str = ""
    batch_size: int = 64               # per rank and per micro-batch
    num_threads: int = 4               # DALI CPU threads per rank
    device: Literal["auto", "cpu", "gpu"] = "auto"   # where DALI augments; auto = gpu when CUDA is up
    # what augments: the DALI graph (CPU or GPU) or pillow-simd (CPU only: the faster CPU path,
    # tools/bench/bench_pipeline.py; its batches are copied to the GPU by the trainer)
    backend: Literal[BACKENDS] = "dali"
    caption_mode: Literal[CAPTION_MODES] = "random"   # title or description picked at random, as the reference
    # "context": every caption padded to the context length, as the reference and OpenCLIP; "longest": the
    # batch's token columns past its longest caption are cut (to a multiple of 8) before the copy to the
    # device. The text tower is causal and reads the EOT token, so losses and gradients are the same up
    # to rounding and the padding's work is saved (the demo's short captions: CLIP steps 1.25x, SLIP
    # 1.13x on 2 CPU cores). Off by default: long captions rarely leave a batch shorter, and it cannot
    # be combined with train.compile (a new width recompiles on one rank while the others wait).
    text_padding: Literal["context", "longest"] = "context"
    recipe: AugmentationRecipe = field(default_factory=AugmentationRecipe)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if isinstance(self.manifest, list) and not self.manifest:
            raise ValueError("manifest: an empty list; give one manifest or several")
        if self.weights is not None and not all(w > 0 for w in self.weights):
            raise ValueError(f"weights must all be > 0 (an upsampling factor per manifest), got {self.weights}")

    @property
    def manifests(self) -> list[str]:
        """The manifest paths, one or several."""
        return list(self.manifest) if isinstance(self.manifest, list) else [self.manifest] if self.manifest else []


def data_placement(data_device: str, backend: str, device: torch.device,
                   current: int | None = None) -> tuple[str, int | None]:
    """Where the loader augments, ("cpu", None) or ("gpu", CUDA index), for `data.device` and the
    training `device`: "auto" is the training device for DALI, the CPU for pillow. An index-less
    CUDA device is the current one (`current`, else `torch.cuda.current_device()`)."""
    if data_device == "auto":
        data_device = "gpu" if device.type == "cuda" and backend == "dali" else "cpu"
    if data_device != "gpu":
        return data_device, None
    return "gpu", cuda_device_index(device if device.type == "cuda" else torch.device("cuda"), current)


def build_loader(cfg: RunConfig, manifest: Manifest | list[Manifest] | LabelledSet, device: torch.device, rank: int = 0,
                 world: int = 1) -> SLIPLoader:
    """This rank's loader over a shard set (pretraining) or a labelled set (finetuning); DALI augments
    on the training device unless told otherwise."""
    from pipeline.loader import SLIPLoader
    from pipeline.tokenizer import Tokenizer
    data_device, device_id = data_placement(cfg.data.device, cfg.data.backend, device)
    return SLIPLoader(manifest, cfg.data.recipe, cfg.data.batch_size, Tokenizer(), rank=rank, world_size=world,
                      context_length=cfg.model.context_length,
                      seed=cfg.train.seed, num_threads=cfg.data.num_threads, device=data_device,
                      device_id=device_id, caption_mode=cfg.data.caption_mode, backend=cfg.data.backend,
                      weights=cfg.data.weights)


def endless(loader) -> Iterator[dict]:
    """Batches over epochs without end; the loader itself tracks the epoch and the position.
    The loader must yield at least one batch per epoch (the trainer checks steps_per_epoch)."""
    while True:
        yield from loader


TEXT_WIDTH_MULTIPLE = 8   # few distinct widths: fewer recompilations and kernel choices


def trim_text_padding(batch: dict, multiple: int = TEXT_WIDTH_MULTIPLE) -> dict:
    """The batch with its token columns past the longest caption dropped, the width rounded up to
    `multiple` (never past the context). Rows are [SOT, ids..., EOT, 0...] and EOT is the largest id,
    so a row's argmax is its last token."""
    text = batch.get("text")
    if text is None or text.numel() == 0:
        return batch
    context = text.shape[1]
    longest = int(text.argmax(dim=1).max()) + 1
    width = min(context, -(-longest // multiple) * multiple)
    return batch if width == context else {**batch, "text": text[:, :width].contiguous()}


def to_device(batch: dict, device: torch.device, text_padding: str = "context") -> dict:
    """The batch on the training device; with text_padding "longest" its text is trimmed first, on the
    host, so the width is known without a device sync."""
    if text_padding == "longest":
        batch = trim_text_padding(batch)
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
