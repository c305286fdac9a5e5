"""The pillow augmenter: the recipe on pillow-simd, the CPU path that needs no DALI.

On a CPU, pillow-simd's SIMD resize and colour-matrix kernels do this work faster than DALI's CPU
operators (tools/bench/bench_pipeline.py measures both paths against the reference). So on a
machine without a GPU, pick this path (`backend="pillow"`, `data.backend=pillow`); on a GPU the
DALI graph is the one to use.

It takes the same batch plans as the DALI augmenter (pipeline/plan.py: the same samples, captions
and per-view draws of pipeline/view_params.py) and applies the parameters directly. Per image:
- decode once; where every view of the image is a downscale by 2x or more, let libjpeg decode at
  reduced size (`Image.draft`: DCT scaling, resolution-aware decoding);
- per view one `resize` with a `box`: crop and bilinear antialiased resize in one pass, as the
  reference's RandomResizedCrop (with `recipe.antialias=False`, plain bilinear sampling of the
  window through `transform`); a mirrored window is flipped afterwards (`transpose`);
- jitter and grayscale as one `convert("RGB", matrix)`: the same 3x4 affine matrix the DALI graph
  applies, rounded and clipped to 0-255 once;
- blur with `GaussianBlur(radius=sigma)`, the reference's own blur (an extended-box approximation
  of the Gaussian, where the DALI graph convolves the exact kernel);
- normalise into the batch's float CHW tensor in place.
Samples run in a thread pool (Pillow and numpy release the GIL in all of these); `prefetch` batches
are kept in flight ahead of the consumer, and output memory is recycled (`BufferPool`).
"""
from __future__ import annotations

import collections
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageFilter

from pipeline.augment import BadSampleError, PlanSource, undecodable_samples
from pipeline.image_open import open_image
from pipeline.plan import BatchPlan
from pipeline.rand_augment import apply_pil, fill_colour
from pipeline.recipe import AugmentationRecipe
from pipeline.view_params import color_matrix, view_names

IDENTITY = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], np.float32)


class PillowAugmenter:
    """pillow-simd behind the augmenter interface (pipeline/augment.py).

    A sample that fails to decode fails its batch, as in the DALI graph: `run()` raises
    BadSampleError with the samples `find_bad` rejects (or the sample's own exception if the scan
    finds nothing), and the augmenter is closed.
    """

    def __init__(self, recipe: AugmentationRecipe, plans: PlanSource, num_threads: int = 2, prefetch: int = 2,
                 fp16: bool = False):
        self.recipe, self.plans, self.prefetch, self.fp16 = recipe, plans, max(1, prefetch), fp16
        self.output_names = view_names(recipe)
        self.pool = ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="pillow-augment")
        self.buffers = BufferPool()
        self.in_flight: collections.deque[tuple[BatchPlan, list[torch.Tensor], list[Future]]] = collections.deque()
        mean, std = np.array(recipe.mean, np.float32) * 255, np.array(recipe.std, np.float32) * 255
        self.scale, self.shift = (1 / std)[:, None, None], (mean / std)[:, None, None]
        self.resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[recipe.interpolation]
        self.fill = fill_colour(recipe.mean)

    def run(self) -> tuple[dict[str, torch.Tensor], BatchPlan]:
        while len(self.in_flight) <= self.prefetch:    # `prefetch` batches stay in flight while this one is used
            self.in_flight.append(self._submit(self.plans()))
        plan, images, futures = self.in_flight.popleft()
        for f in futures:
            error = f.exception()     # waits for the sample
            if error is not None:
                self.close()
                found = self.find_bad(plan)
                if not found:
                    raise error
                raise BadSampleError(found) from error
        if self.fp16:
            images = [im.half() for im in images]
        return dict(zip(self.output_names, images)), plan

    def find_bad(self, plan: BatchPlan) -> dict[int, str]:
        return undecodable_samples(plan)

    def close(self) -> None:
        self.in_flight.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, plan: BatchPlan) -> tuple[BatchPlan, list[torch.Tensor], list[Future]]:
        r, b = self.recipe, len(plan)
        # per view: window, colour matrix (SimCLR views only), blur sigma
        views = [(p.roi_start, p.roi_end, None if name == "clip_image" else color_matrix(p), p.blur_sigma)
                 for name, p in ((n, plan.views[n]) for n in self.output_names)]
        images = [self.buffers.take((b, 3, r.image_size, r.image_size)) for _ in views]
        futures = [self.pool.submit(self._augment, plan.encoded[i], i, views, images, plan.rand_augment)
                   for i in range(b)]
        return plan, images, futures

    def _augment(self, encoded: np.ndarray, i: int, views: list, images: list[torch.Tensor], rand_augment) -> None:
        s = self.recipe.image_size
        img = open_image(encoded, load=False)
        w, h = img.size
        # each view's window in source pixels, (x0, y0, x1, y1); x0 > x1 is a mirrored window
        boxes = [(start[i, 1] * w, start[i, 0] * h, end[i, 1] * w, end[i, 0] * h) for start, end, _, _ in views]
        shrink = min(min(abs(x1 - x0), abs(y1 - y0)) for x0, y0, x1, y1 in boxes) / s
        if shrink >= 2 and img.format == "JPEG":
            # DCT-scaled decoding: the largest 1/2^k size that still gives every view >= s pixels
            img.draft("RGB", (int(w / shrink) + 1, int(h / shrink) + 1))
        img = img.convert("RGB")
        fx, fy = img.size[0] / w, img.size[1] / h
        for v, ((x0, y0, x1, y1), (_, _, color, sigma), out) in enumerate(zip(boxes, views, images)):
            box = (min(x0, x1) * fx, y0 * fy, max(x0, x1) * fx, y1 * fy)
            if self.recipe.antialias:
                view = img.resize((s, s), self.resample, box=box)
            else:      # plain sampling of the window, as DALI's resize with antialias off
                view = img.transform((s, s), Image.Transform.EXTENT, box, self.resample)
            if color is not None and not np.array_equal(color[i], IDENTITY):
                view = view.convert("RGB", tuple(color[i].ravel().tolist()))
            if sigma[i] > 0:
                view = view.filter(ImageFilter.GaussianBlur(float(sigma[i])))
            if x0 > x1:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if v == 0 and rand_augment is not None:     # timm: after crop and flip, before normalising
                view = apply_pil(view, rand_augment, i, self.fill)
            dst = out[i].numpy()
            np.multiply(np.asarray(view).transpose(2, 0, 1), self.scale, out=dst, casting="unsafe")
            np.subtract(dst, self.shift, out=dst)


class BufferPool:
    """Float32 arrays handed out as tensors, and reused once nothing refers to them any more.

    A fresh batch-sized view tensor is mmapped memory that faults in one page at a time on first
    write, a large share of this path's time. The memory of a handed-out tensor returns to the
    pool only when that tensor, and every view of it, is gone.
    """

    def __init__(self):
        self.free: dict[tuple, list[np.ndarray]] = collections.defaultdict(list)

    def take(self, shape: tuple) -> torch.Tensor:
        free = self.free[shape]
        memory = free.pop() if free else np.empty(shape, np.float32)
        handed = memory.view()      # the tensor's storage keeps this array alive, and only this one
        weakref.finalize(handed, free.append, memory)
        return torch.from_numpy(handed)
