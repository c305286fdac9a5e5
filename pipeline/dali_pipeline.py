"""The DALI augmenter: decode each image once, then cut one CLIP view and the SimCLR views from it.

The same graph runs on the CPU (`device="cpu"`, `device_id=None`, no GPU or driver needed) and on
a GPU (`device="gpu"`: nvJPEG "mixed" decoding, where present the hardware JPEG decoder, every
operator on the GPU, outputs left in GPU memory).

Its inputs come from one external source, fed from the loader's batch plans (pipeline/plan.py):
the encoded images and each view's parameters in the form the graph's operators take
(`dali_inputs`: crop windows, colour matrices, blur kernels). DALI therefore draws no random
numbers of its own, which makes the views reproducible and resumable.

Per view the graph runs as few full-image passes as the recipe allows (tools/bench/bench_pipeline.py
compares it with the straightforward graph of DALI's own random, `color_twist`, `hsv` and
`gaussian_blur` operators, which cost more on the CPU):
- `resize` with a relative ROI is crop + resize + (mirrored ROI) horizontal flip in one pass;
- `coord_transform` applies jitter and grayscale as one affine colour matrix, clipped to uint8;
- two `filter` passes with 1-D kernels are the separable Gaussian blur (a 1-tap identity kernel
  for samples that drew no blur: no conditional, no split and merge);
- `crop_mirror_normalize` normalises into float CHW, in DALI's thread pool.
"""
from __future__ import annotations

import collections
from typing import Callable

from nvidia.dali import fn, pipeline_def, types

from pipeline.augment import BadSampleError, PlanSource, undecodable_samples
from pipeline.plan import BatchPlan
from pipeline.recipe import AugmentationRecipe
from pipeline.view_params import blur_kernels, color_matrix, view_names

# The external source's outputs, in order: the encoded images, then each view's parameters.
CLIP_INPUTS = ("roi_start", "roi_end")
SSL_INPUTS = ("roi_start", "roi_end", "color", "blur_h", "blur_v")


def input_names(recipe: AugmentationRecipe) -> list[str]:
    names = ["encoded"] + [f"clip_{n}" for n in CLIP_INPUTS]
    for v in range(1, recipe.num_ssl_views + 1):
        names += [f"ssl{v}_{n}" for n in SSL_INPUTS]
    return names


def output_names(recipe: AugmentationRecipe) -> list[str]:
    return view_names(recipe)


def dali_inputs(plan: BatchPlan, recipe: AugmentationRecipe) -> tuple:
    """What the external source hands the graph for `plan`, in the order of `input_names(recipe)`."""
    clip = plan.views["clip_image"]
    values = {"encoded": plan.encoded, "clip_roi_start": clip.roi_start, "clip_roi_end": clip.roi_end}
    for v in range(1, recipe.num_ssl_views + 1):
        p = plan.views[f"ssl_image_{v}"]
        values[f"ssl{v}_roi_start"], values[f"ssl{v}_roi_end"] = p.roi_start, p.roi_end
        values[f"ssl{v}_color"] = color_matrix(p)
        kernels = blur_kernels(p.blur_sigma)
        values[f"ssl{v}_blur_h"] = [k.reshape(1, -1) for k in kernels]
        values[f"ssl{v}_blur_v"] = [k.reshape(-1, 1) for k in kernels]
    return tuple(values[n] for n in input_names(recipe))


def _view(image, p: dict, recipe: AugmentationRecipe, ssl: bool, dtype):
    size = recipe.image_size
    view = fn.resize(image, size=[size, size], roi_start=p["roi_start"], roi_end=p["roi_end"],
                     roi_relative=True, antialias=recipe.antialias, interp_type=types.INTERP_LINEAR)
    if ssl:
        view = fn.coord_transform(view, MT=p["color"], dtype=types.UINT8)
        view = fn.filter(fn.filter(view, p["blur_h"]), p["blur_v"])
    return fn.crop_mirror_normalize(view, dtype=dtype, output_layout="CHW",
                                    mean=[255 * m for m in recipe.mean], std=[255 * s for s in recipe.std])


def build_pipeline(recipe: AugmentationRecipe, source: Callable, batch_size: int, num_threads: int = 2,
                   device: str = "cpu", device_id: int | None = None, prefetch: int = 2,
                   fp16: bool = False, hw_decoder_load: float = 0.75):
    """A built DALI pipeline whose outputs are `output_names(recipe)`.

    `source()` returns one batch: a tuple in the order of `input_names(recipe)` (see `dali_inputs`).
    """
    if device == "gpu" and device_id is None:
        raise ValueError("device='gpu' needs a device_id")
    names = input_names(recipe)
    dtype = types.FLOAT16 if fp16 else types.FLOAT

    @pipeline_def
    def graph():
        inputs = dict(zip(names, fn.external_source(source=source, num_outputs=len(names), batch=True)))
        if device == "gpu":
            image = fn.decoders.image(inputs["encoded"], device="mixed", output_type=types.RGB,
                                      hw_decoder_load=hw_decoder_load)
        else:
            image = fn.decoders.image(inputs["encoded"], device="cpu", output_type=types.RGB)
        views = [_view(image, {n[5:]: inputs[n] for n in names if n.startswith("clip_")}, recipe, False, dtype)]
        for v in range(1, recipe.num_ssl_views + 1):
            prefix = f"ssl{v}_"
            params = {n[len(prefix):]: inputs[n] for n in names if n.startswith(prefix)}
            views.append(_view(image, params, recipe, True, dtype))
        return tuple(views)

    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                 prefetch_queue_depth=prefetch, exec_dynamic=True)
    pipe.build()
    return pipe


class DaliAugmenter:
    """The DALI graph behind the augmenter interface (pipeline/augment.py).

    DALI pulls plans through its external source as it prefetches (from inside `run()`, in the
    calling thread); the plans wait in `in_flight` until their outputs come back, in order. DALI
    reports a failed decode for the whole batch, so the culprits are found by `find_bad`.
    """

    def __init__(self, recipe: AugmentationRecipe, plans: PlanSource, batch_size: int, num_threads: int = 2,
                 device: str = "cpu", device_id: int | None = None, prefetch: int = 2, fp16: bool = False):
        self.recipe, self.plans = recipe, plans
        self.output_names = output_names(recipe)
        self.in_flight: collections.deque[BatchPlan] = collections.deque()
        self.pipe = build_pipeline(recipe, self._feed, batch_size, num_threads=num_threads, device=device,
                                   device_id=device_id, prefetch=prefetch, fp16=fp16)

    def _feed(self) -> tuple:
        plan = self.plans()
        self.in_flight.append(plan)
        return dali_inputs(plan, self.recipe)

    def run(self) -> tuple[dict, BatchPlan]:
        try:
            outs = self.pipe.run()
        except Exception as error:    # DALI reports a failed decode as a generic RuntimeError
            found = self.find_bad(self.in_flight[0]) if self.in_flight else {}
            if not found:
                raise
            raise BadSampleError(found) from error
        return dict(zip(self.output_names, outs)), self.in_flight.popleft()

    def find_bad(self, plan: BatchPlan) -> dict[int, str]:
        return undecodable_samples(plan)

    def close(self) -> None:
        self.pipe = None      # DALI frees the graph's threads and memory with its last reference
        self.in_flight.clear()
