"""The DALI graph: decode each image once, then cut one CLIP view and two SimCLR views from it.

The same definition runs on the CPU (`device="cpu"`, `device_id=None`, no GPU or driver needed)
and on a GPU (`device="gpu"`: nvJPEG "mixed" decoding, on A100/H100 the hardware JPEG decoder,
every operator on the GPU, outputs left in GPU memory).

Inputs come from one external source fed by pipeline/loader.py: the encoded image, the tokens,
the sample index and each view's random parameters (pipeline/view_params.py). DALI therefore
draws no random numbers of its own, which makes the views reproducible and resumable.

Per view the graph runs as few full-image passes as the recipe allows (measured by
tools/bench/bench_pipeline.py; `gaussian_blur` and `color_twist` cost several times more on the CPU):
- `resize` with a relative ROI is crop + resize + (mirrored ROI) horizontal flip in one pass;
- `coord_transform` applies jitter and grayscale as one affine colour matrix, clipped to uint8;
- two `filter` passes with 1-D kernels are the separable Gaussian blur (a 1-tap identity kernel
  for samples that drew no blur: no conditional, no split and merge);
- `crop_mirror_normalize` normalises into float CHW (on the CPU three times cheaper than the same
  arithmetic in PyTorch, and it runs in DALI's thread pool).
"""
from __future__ import annotations

from typing import Callable

from nvidia.dali import fn, pipeline_def, types

from pipeline.recipe import AugmentationRecipe
from pipeline.view_params import input_names

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

    `source()` returns one batch: a tuple of lists/arrays in the order of `input_names(recipe)`.
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
        return (*views, inputs["text"], inputs["index"])

    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                 prefetch_queue_depth=prefetch, exec_dynamic=True)
    pipe.build()
    return pipe
