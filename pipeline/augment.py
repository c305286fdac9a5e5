"""The seam between planning a batch and augmenting it.

A loader hands an augmenter batch plans (pipeline/plan.py) through a callable it pulls from; the
augmenter turns each plan into image tensors, keeping as many plans in flight as its prefetch
allows, and gives them back in order with the plan they came from. Two augmenters implement it:

- `DaliAugmenter` (pipeline/dali_pipeline.py): the DALI graph, on the CPU or a GPU;
- `PillowAugmenter` (pipeline/pillow_pipeline.py): pillow-simd in a thread pool, CPU only.

Both draw nothing themselves: every random choice is in the plan, so both give the same views
from the same plans (up to each library's rounding). They also get the same samples: the loader
rejects damaged images while planning, by one rule (pipeline/jpeg_check.py, and what the build
recorded as bad), so a decoder failing later is rare. When it happens, both raise
`BadSampleError` naming the culprits, found by `find_bad`, with the reason `LATE_DECODE_FAILURE`;
the loader then replaces those samples and starts a fresh augmenter at the same batch. A failure
`find_bad` cannot attribute is raised as it is, and the loader finds its culprits itself by
augmenting parts of the batch.

Batch-level operations that mix samples (mixup, cutmix, random erasing) do not belong here: they
run on the finished batch, on the training device (`SLIPLoader(batch_transform=...)`).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from pipeline.image_open import open_image
from pipeline.plan import BatchPlan
from pipeline.recipe import AugmentationRecipe

BACKENDS = ("dali", "pillow")
LATE_DECODE_FAILURE = "late_decode_failure"   # a decoder rejected an image that passed the plan's checks
PlanSource = Callable[[], BatchPlan]      # the next plan to augment, in the order they are wanted


class BadSampleError(RuntimeError):
    """A batch failed because of some of its samples: `samples` maps their global index to a reason."""

    def __init__(self, samples: dict[int, str]):
        super().__init__(f"unusable samples {sorted(samples)}: {sorted(set(samples.values()))}")
        self.samples = samples


class Augmenter(Protocol):
    output_names: list[str]     # the view names of `run()`'s outputs, in order

    def run(self) -> tuple[dict[str, Any], BatchPlan]:
        """The next plan's views by output name (torch tensors or DALI tensor lists), and that plan.
        Raises BadSampleError when the batch failed because of some of its samples."""

    def find_bad(self, plan: BatchPlan) -> dict[int, str]:
        """The samples of `plan` this augmenter cannot decode: global index -> reason."""

    def close(self) -> None:
        """Stop; plans in flight are dropped. A failed augmenter is not reusable."""


def undecodable_samples(plan: BatchPlan) -> dict[int, str]:
    """The samples of `plan` whose image a full PIL decode rejects. A decoder that fails a whole
    batch without saying which sample (DALI) is answered by this scan, after the fact."""
    found = {}
    for index, data in zip(plan.indices.tolist(), plan.encoded):
        try:
            open_image(data).convert("RGB")
        except Exception:   # PIL raises many types for a corrupt image; all mean the same here
            found[index] = LATE_DECODE_FAILURE
    return found


def check_backend(backend: str, device: str) -> None:
    """Raise ValueError unless `backend` exists and runs on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "pillow" and device != "cpu":
        raise ValueError("the pillow backend runs on the CPU; use backend='dali' for device='gpu'")


def make_augmenter(backend: str, recipe: AugmentationRecipe, plans: PlanSource, batch_size: int, *,
                   num_threads: int = 2, device: str = "cpu", device_id: int | None = None, prefetch: int = 2,
                   fp16: bool = False) -> Augmenter:
    """The augmenter of `backend` ("dali" or "pillow"), pulling its plans from `plans`."""
    check_backend(backend, device)
    if backend == "pillow":
        from pipeline.pillow_pipeline import PillowAugmenter
        return PillowAugmenter(recipe, plans, num_threads=num_threads, prefetch=prefetch, fp16=fp16)
    from pipeline.dali_pipeline import DaliAugmenter
    return DaliAugmenter(recipe, plans, batch_size, num_threads=num_threads, device=device, device_id=device_id,
                         prefetch=prefetch, fp16=fp16)
