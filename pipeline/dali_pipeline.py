"""The DALI augmenter: decode each image once, then cut one CLIP view and the SimCLR views from it.

The same graph runs on the CPU (`device="cpu"`, `device_id=None`, no GPU or driver needed) and on
a GPU (`device="gpu"`: nvJPEG "mixed" decoding, where present the hardware JPEG decoder, every
operator on the GPU, outputs left in GPU memory). The mixed decoder upsamples chroma the way the CPU
decoder does (`jpeg_fancy_upsampling`), so both give the same views up to rounding
(`GPU_CPU_TOLERANCE`, checked on every batch of an epoch by `graph_agreement`).

GPU outputs are handed over stream-ordered: `run()` asks DALI for its outputs on the caller's
current torch stream, so DALI makes that stream wait for its work instead of synchronising the
host, and `torch.from_dlpack` (pipeline/loader.py) makes the consuming stream wait on the buffer's
ready event once more. The dynamic executor (`exec_dynamic=True`) hands out a fresh buffer per
output and never writes into one it has handed out; the DLPack tensor holds a reference to it, and
when torch frees the tensor DALI keeps the memory until all GPU work queued before the free has
finished. So a batch is neither read before DALI has written it nor recycled while torch uses it.

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
from typing import Callable, Iterable

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from pipeline.augment import LATE_DECODE_FAILURE, BadSampleError, PlanSource, undecodable_samples
from pipeline import dali_rand_augment
from pipeline.plan import BatchPlan
from pipeline.rand_augment import fill_colour
from pipeline.recipe import AugmentationRecipe
from pipeline.view_params import blur_kernels, color_matrix, view_names

# The external source's outputs, in order: the encoded images, then each view's parameters.
CLIP_INPUTS = ("roi_start", "roi_end")
SSL_INPUTS = ("roi_start", "roi_end", "color", "blur_h", "blur_v")


def input_names(recipe: AugmentationRecipe) -> list[str]:
    names = ["encoded"] + [f"clip_{n}" for n in CLIP_INPUTS]
    names += [f"clip_{n}" for n in dali_rand_augment.input_names(recipe.rand_augment.num_ops)]
    for v in range(1, recipe.num_ssl_views + 1):
        names += [f"ssl{v}_{n}" for n in SSL_INPUTS]
    return names


def output_names(recipe: AugmentationRecipe) -> list[str]:
    return view_names(recipe)


def dali_inputs(plan: BatchPlan, recipe: AugmentationRecipe) -> tuple:
    """What the external source hands the graph for `plan`, in the order of `input_names(recipe)`."""
    clip = plan.views["clip_image"]
    values = {"encoded": plan.encoded, "clip_roi_start": clip.roi_start, "clip_roi_end": clip.roi_end}
    if recipe.rand_augment.num_ops:
        drawn = dali_rand_augment.graph_inputs(plan.rand_augment, recipe.image_size)
        values.update({f"clip_{name}": v for name, v in drawn.items()})
    for v in range(1, recipe.num_ssl_views + 1):
        p = plan.views[f"ssl_image_{v}"]
        values[f"ssl{v}_roi_start"], values[f"ssl{v}_roi_end"] = p.roi_start, p.roi_end
        values[f"ssl{v}_color"] = color_matrix(p)
        kernels = blur_kernels(p.blur_sigma)
        values[f"ssl{v}_blur_h"] = [k.reshape(1, -1) for k in kernels]
        values[f"ssl{v}_blur_v"] = [k.reshape(-1, 1) for k in kernels]
    return tuple(values[n] for n in input_names(recipe))


INTERPOLATION = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def _view(image, p: dict, recipe: AugmentationRecipe, ssl: bool, dtype):
    size = recipe.image_size
    view = fn.resize(image, size=[size, size], roi_start=p["roi_start"], roi_end=p["roi_end"],
                     roi_relative=True, antialias=recipe.antialias, interp_type=INTERPOLATION[recipe.interpolation])
    if ssl:
        view = fn.coord_transform(view, MT=p["color"], dtype=types.UINT8)
        view = fn.filter(fn.filter(view, p["blur_h"]), p["blur_v"])
    elif recipe.rand_augment.num_ops:     # finetuning: after crop and flip, before normalising (as timm)
        view = dali_rand_augment.apply_graph(fn.cast(view, dtype=types.FLOAT), p, recipe.rand_augment.num_ops,
                                             size, fill_colour(recipe.mean))
    return fn.crop_mirror_normalize(view, dtype=dtype, output_layout="CHW",
                                    mean=[255 * m for m in recipe.mean], std=[255 * s for s in recipe.std])


def _decode(encoded, device: str, hw_decoder_load: float):
    """The graph's decoder: RGB, on the CPU or nvJPEG ("mixed", chroma upsampled as on the CPU)."""
    if device == "gpu":
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                                 jpeg_fancy_upsampling=True)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


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
        image = _decode(inputs["encoded"], device, hw_decoder_load)
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


class ImageProbe:
    """Decodes one encoded image at a time with the graph's decoder on the graph's device: the
    witness for a sample the decoder rejects although PIL reads it (nvJPEG is stricter than
    libjpeg on some files). Called as `probe(data) -> bool`; built on first use."""

    def __init__(self, device: str = "cpu", device_id: int | None = None, hw_decoder_load: float = 0.75):
        self.device, self.device_id, self.hw_decoder_load = device, device_id, hw_decoder_load
        self._pipe = None

    def _build(self):
        @pipeline_def(batch_size=1, num_threads=1, device_id=self.device_id, prefetch_queue_depth=1,
                      exec_dynamic=True)
        def probe():
            return _decode(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1), self.device,
                           self.hw_decoder_load)
        pipe = probe()
        pipe.build()
        return pipe

    def __call__(self, data: np.ndarray) -> bool:
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.run(encoded=[np.asarray(data, np.uint8)])    # host-synchronous: the answer is needed now
            return True
        except Exception:     # DALI reports a failed decode as a generic RuntimeError
            self._pipe = None     # a pipeline that failed is not reused
            return False




def rejected_samples(plan: BatchPlan, decodes: Callable[[np.ndarray], bool]) -> dict[int, str]:
    """The samples of `plan` whose image `decodes` (one image at a time) rejects."""
    return {index: LATE_DECODE_FAILURE for index, data in zip(plan.indices.tolist(), plan.encoded)
            if not decodes(data)}


class DaliAugmenter:
    """The DALI graph behind the augmenter interface (pipeline/augment.py).

    DALI pulls plans through its external source as it prefetches (from inside `run()`, in the
    calling thread); the plans wait in `in_flight` until their outputs come back, in order. DALI
    reports a failed decode for the whole batch, so the culprits are found by `find_bad`: a full
    PIL decode of each image, and when PIL reads them all, each image decoded alone by the graph's
    own decoder (`decodes`, an `ImageProbe` on the graph's device unless given). A failure no
    sample explains is not a data problem and is raised as it came.
    """

    def __init__(self, recipe: AugmentationRecipe, plans: PlanSource, batch_size: int, num_threads: int = 2,
                 device: str = "cpu", device_id: int | None = None, prefetch: int = 2, fp16: bool = False,
                 hw_decoder_load: float = 0.75, decodes: Callable[[np.ndarray], bool] | None = None):
        self.recipe, self.plans = recipe, plans
        self.device, self.device_id = device, device_id
        self.output_names = output_names(recipe)
        self.in_flight: collections.deque[BatchPlan] = collections.deque()
        self.decodes = decodes if decodes is not None else ImageProbe(device, device_id, hw_decoder_load)
        self.pipe = build_pipeline(recipe, self._feed, batch_size, num_threads=num_threads, device=device,
                                   device_id=device_id, prefetch=prefetch, fp16=fp16,
                                   hw_decoder_load=hw_decoder_load)

    def _feed(self) -> tuple:
        plan = self.plans()
        self.in_flight.append(plan)
        return dali_inputs(plan, self.recipe)

    def _consumer_stream(self) -> int | None:
        """The caller's current torch stream on the graph's GPU (its handle), None on the CPU."""
        if self.device != "gpu":
            return None
        import torch
        return torch.cuda.current_stream(self.device_id).cuda_stream

    def run(self) -> tuple[dict, BatchPlan]:
        """GPU outputs are ordered on the caller's current torch stream (no host synchronisation)."""
        try:
            outs = self.pipe.run(self._consumer_stream())
        except Exception as error:    # DALI reports a failed decode as a generic RuntimeError
            found = self.find_bad(self.in_flight[0]) if self.in_flight else {}
            if not found:
                raise
            raise BadSampleError(found) from error
        return dict(zip(self.output_names, outs)), self.in_flight.popleft()

    def find_bad(self, plan: BatchPlan) -> dict[int, str]:
        return undecodable_samples(plan) or rejected_samples(plan, self.decodes)

    def close(self) -> None:
        self.pipe = None      # DALI frees the graph's threads and memory with its last reference
        self.in_flight.clear()


# ---------------------------------------------------------------- GPU graph against CPU graph

# How far the GPU graph's views may be from the CPU graph's on the same plans, in normalised units
# (one grey level is 1 / (255 * std), about 0.017). nvJPEG and libjpeg-turbo differ by about one
# level per pixel (IDCT rounding; chroma upsampled alike), and resize, colour matrix and blur each
# round to uint8 once, on either device with its own float arithmetic: the mean stays within about
# two levels. A single pixel may differ more where a resize samples a sharp edge at a slightly
# different sub-pixel position; a wrong crop, flip, colour or blur moves whole regions and the mean
# with them.
GPU_CPU_TOLERANCE = {"mean": 0.03, "max": 0.6}


def graph_agreement(reference: Iterable[dict], other: Iterable[dict], views: list[str],
                    tolerance: dict[str, float] = GPU_CPU_TOLERANCE) -> dict:
    """Batch by batch, how far `other`'s views are from `reference`'s (two loaders over the same
    epoch). A batch whose samples differ (a sample one path replaced after a failed decode) is
    counted in `late_replaced` and not compared; for the others the captions must be identical."""
    sums = {v: 0.0 for v in views}
    counts = {v: 0 for v in views}
    peaks = {v: 0.0 for v in views}
    batches = compared = late = text_mismatch = 0
    for ref, got in zip(reference, other, strict=True):
        batches += 1
        if not np.array_equal(ref["index"].cpu().numpy(), got["index"].cpu().numpy()):
            late += 1
            continue
        compared += 1
        text_mismatch += not np.array_equal(ref["text"].cpu().numpy(), got["text"].cpu().numpy())
        for v in views:
            diff = (got[v].float().cpu() - ref[v].float().cpu()).abs()
            sums[v] += float(diff.sum())
            counts[v] += diff.numel()
            peaks[v] = max(peaks[v], float(diff.max()))
    per_view = {v: {"mean": sums[v] / counts[v] if counts[v] else None, "max": peaks[v] if counts[v] else None}
                for v in views}
    means = [p["mean"] for p in per_view.values() if p["mean"] is not None]
    maxes = [p["max"] for p in per_view.values() if p["max"] is not None]
    result = {"batches": batches, "compared": compared, "late_replaced": late, "text_mismatch": text_mismatch,
              "views": per_view, "mean": max(means) if means else None, "max": max(maxes) if maxes else None,
              "tolerance": dict(tolerance)}
    result["within_tolerance"] = bool(compared and not text_mismatch and result["mean"] <= tolerance["mean"]
                                      and result["max"] <= tolerance["max"])
    return result
