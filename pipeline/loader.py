"""Plans -> augmenter (DALI or pillow) -> PyTorch: rank sharding, seeded epochs, exact resume, bad samples skipped.

What is guaranteed (same manifest, batch size, world size and seed):
- An epoch is a seeded permutation of every sample in the manifest, new each epoch; of several
  manifests with upsampling factors, a seeded permutation of their weighted union
  (pipeline/mixture.py), with every guarantee below, and `samples_by_source` counts what each
  rank was handed from each source. Rank r takes
  the r-th of `world_size` equal slices, so the ranks together see each sample at most once per
  epoch (exactly once when the sample count divides evenly), and every rank yields the same
  number of batches: `steps_per_epoch = (N // world_size) // batch_size`, N from the manifest.
  The few samples left over are different ones each epoch.
- Every random choice (sample order, crops, colour, blur, flip, title or description) is a pure
  function of (seed, epoch, rank, batch index). `state_dict()` records the position of the last
  batch handed out; `load_state_dict()` continues with exactly the batches an uninterrupted run
  would have produced next, bit for bit: nothing replayed, nothing skipped.
- A sample whose image is missing, not an image, corrupt, or too large, or that has no usable
  caption, is replaced by another sample of the same rank's epoch (drawn from its own seeded
  stream) and counted in `bad_samples` / `bad_reasons`. Training never stops for bad data: any
  other failure while reading one sample (a metadata json nested too deep to parse, say) is that
  sample's failure, counted as `sample_error:<exception type>` and replaced the same way. A caption
  that shows nothing (only spaces or zero-width characters) counts as no caption.
- Which images are bad is decided while planning, by one rule, so both augmentation paths get
  the same batches: the samples the build's decode-verification recorded in the manifest (never
  read), and a structural JPEG check of each image as it is read (pipeline/jpeg_check.py:
  markers, complete entropy-coded data, the end-of-image marker, a sane number of scans; a
  small fraction of the per-image augmentation cost, reported by tools/bench/bench_pipeline.py).
  An image that passes both and still fails inside a decoder is rare; it is counted as
  `late_decode_failure` and replaced in the same way, on either path, from then on.

With a different world size or batch size the order cannot continue exactly; `load_state_dict`
then restarts at the same epoch and the same fraction of it, and says so.

The loader plans, retries and converts; it never touches pixels. `make_batch(epoch, step)` is the
plan of a batch (pipeline/plan.py: samples, encoded images, tokens, every view's draws), a pure
function. An augmenter chosen by `backend` (pipeline/augment.py: the DALI graph on CPU or GPU, or
pillow-simd on the CPU, the faster of the two there) turns plans into views; when it reports
samples it cannot decode (`BadSampleError`), the loader replaces them and restarts it at the same
batch; when it fails without naming the samples, the loader finds them by augmenting parts of
the batch, and raises the original error if no sample is to blame. Views arrive normalised, float
[B, 3, S, S] (float16 with `fp16=True`), on the GPU for `device="gpu"`; either path gives the same
batches and draws, so everything above holds for both.

GPU views are DALI's own buffers, handed over without a copy and without a host synchronisation:
they are ready for any work queued on the torch stream that was current when the batch was taken
(another stream must `wait_stream` that one first). A batch's memory lives as long as its tensors
and is never written again by later batches; once they are freed, DALI takes the memory back only
after the GPU work queued before has finished. A batch may therefore be kept across later ones.

Finetuning reads a labelled set (pipeline/labelled.py) instead of a shard set: the same order,
resume and bad-sample rules, a label instead of a caption, and, when the recipe asks for them,
RandAugment draws for the first view and erasing / mixing draws for the batch, made after the
views' draws so that pretraining's stream is unchanged.

Each yielded batch is a dict: the views by name ("clip_image", "ssl_image_1", ...), "text" (int64
[B, context_length]), "index" (int64 [B] global sample indices), "bad_samples" (samples replaced
in it), "label" (int64 [B]) when the plans carry labels, and "erasing" / "mix" (the batch's draws,
pipeline/batch_mix.py) when the recipe asks for them. `batch_transform`, if given, is applied
to that dict last, on the training device: the place for batch-level operations that mix samples
(mixup, cutmix, random erasing in finetuning).
"""
from __future__ import annotations

import collections
import io
import json
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from pipeline.augment import LATE_DECODE_FAILURE, Augmenter, BadSampleError, check_backend, make_augmenter
from pipeline.batch_mix import draw_erasing, draw_mix
from pipeline.captions import has_visible_text
from pipeline.jpeg_check import jpeg_problem
from pipeline.labelled import LabelledSet
from pipeline.manifest import Manifest
from pipeline.mixture import Mixture, concat_tables
from pipeline.plan import BatchPlan
from pipeline.rand_augment import draw_rand_augment
from pipeline.recipe import AugmentationRecipe
from pipeline.shards import MAX_IMAGE_BYTES, SampleReader, build_sample_table
from pipeline.view_params import sample_views
from pipeline.webp_header import webp_size

CAPTION_MODES = ("random", "reference", "title", "description", "txt")
DECODABLE = {"JPEG", "PNG", "WEBP", "BMP", "TIFF"}
MAX_REPLACEMENT_TRIES = 64


class SLIPLoader:
    def __init__(self, manifest: Manifest | list[Manifest] | LabelledSet, recipe: AugmentationRecipe, batch_size: int,
                 tokenizer: Callable | None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_threads: int = 2, device: str = "cpu",
                 device_id: int | None = None, caption_mode: str = "random", prefetch: int = 2,
                 context_length: int = 77, max_image_pixels: int = 40_000_000, fp16: bool = False,
                 backend: str = "dali", batch_transform: Callable[[dict], dict] | None = None,
                 weights: list[float] | None = None):
        check_backend(backend, device)
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode {caption_mode!r}: choose one of {', '.join(CAPTION_MODES)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.manifest, self.recipe, self.batch_size = manifest, recipe, batch_size
        self.tokenizer, self.rank, self.world_size, self.seed = tokenizer, rank, world_size, seed
        self.num_threads, self.device, self.device_id = num_threads, device, device_id
        self.caption_mode, self.prefetch, self.context_length = caption_mode, prefetch, context_length
        self.max_image_pixels, self.fp16, self.backend = max_image_pixels, fp16, backend
        self.batch_transform = batch_transform
        # pretraining reads a built shard set (image + caption); finetuning a labelled set (image + label)
        self.labelled = manifest if isinstance(manifest, LabelledSet) else None
        self.sources = [] if self.labelled is not None else manifest if isinstance(manifest, list) else [manifest]
        if self.labelled is None:
            tables = [build_sample_table(m) for m in self.sources]
            self.table = concat_tables(tables)
            self.reader = SampleReader(self.table)
            self.mixture = Mixture(tuple(len(t) for t in tables), tuple(weights or [1.0] * len(tables)))
        else:
            self.mixture = Mixture((len(self.labelled),), (1.0,))
        self.samples_by_source = np.zeros(len(self.mixture.sizes), np.int64)
        self.num_samples = len(self.mixture)
        self.per_rank = self.num_samples // world_size
        self.steps_per_epoch = self.per_rank // batch_size
        # consumer position: the next batch handed out is (epoch, step)
        self.epoch, self.step = 0, 0
        self.bad_samples = 0
        self.bad_reasons: collections.Counter = collections.Counter()
        self._known_bad: dict[int, str] = {}     # found only by a failed decode in the augmenter (late)
        self._warned: set[str] = set()             # sample error kinds already reported
        self._orders: dict[int, np.ndarray] = {}
        self._augmenter: Augmenter | None = None

    @property
    def source_names(self) -> list[str]:
        """One name per source (its manifest's; repeated names numbered), for per-source metrics."""
        names = [m.name for m in self.sources] or ["train"]
        return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]

    # ------------------------------------------------------------------ sample order

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's samples of `epoch`, in order (global sample indices)."""
        order = self._orders.get(epoch)
        if order is None:
            rng = np.random.default_rng([self.seed, epoch, 0x5EED])
            perm = rng.permutation(self.num_samples) if self.mixture.trivial else \
                rng.permutation(self.mixture.epoch_samples(self.seed, epoch))
            order = perm[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return order

    # ------------------------------------------------------------------ planning

    def _check_image(self, i: int) -> tuple[bytes | None, tuple[int, int] | str]:
        """Encoded bytes and (height, width), or None and the reason it is unusable."""
        if self.labelled is not None:
            data = self.labelled.image(i) if i not in self._known_bad else None
            if data is None:
                return None, self._known_bad.get(i, "missing_image")
        else:
            if i in self.table.recorded_bad:
                return None, self.table.recorded_bad[i]
            if i in self._known_bad:
                return None, self._known_bad[i]
            if self.table.image[i, 0] >= 0 and self.table.image[i, 1] > MAX_IMAGE_BYTES:
                return None, "too_large"       # never read
            data = self.reader.image(i)
        if data is None:
            return None, "missing_image"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                warnings.filterwarnings("ignore", "image file could not be identified because WEBP")   # read below
                img = Image.open(io.BytesIO(data))
                w, h = img.size
                fmt = img.format
        except Image.DecompressionBombError:    # a header claiming far more pixels than PIL allows
            return None, "too_large"
        except Exception:   # PIL raises many types for garbage; all mean "not an image"
            size = webp_size(data)      # unless it is a WebP, which this Pillow cannot open but DALI decodes
            if size is None:
                return None, "not_an_image"
            (w, h), fmt = size, "WEBP"
        if fmt not in DECODABLE:
            return None, "unsupported_format"
        if w * h > self.max_image_pixels:
            return None, "too_large"
        if w < 1 or h < 1:
            return None, "empty_image"
        if fmt == "JPEG" and (problem := jpeg_problem(data)) is not None:
            return None, problem[0]
        return data, (h, w)

    def _caption(self, i: int, u: float) -> str | None:
        """The sample's caption from what its source has; u ~ U[0, 1) makes the draw. YFCC (title and
        description): `caption_mode` picks; COCO (`captions`, five to seven): one drawn per step in
        every mode but "txt"; others: their one caption (txt, else the json's `caption`)."""
        meta = self.reader.meta(i)
        title = desc = caption = ""
        captions: list[str] = []
        if meta is not None:
            try:
                d = json.loads(meta)
                title, desc = (d.get("title") or "").strip(), (d.get("description") or "").strip()
                caption = d.get("caption") if isinstance(d.get("caption"), str) else ""
                if isinstance(d.get("captions"), list):
                    captions = [c.strip() for c in d["captions"] if isinstance(c, str) and has_visible_text(c)]
            except (ValueError, AttributeError, TypeError, RecursionError):   # not usable metadata
                pass
            title = title if has_visible_text(title) else ""
            desc = desc if has_visible_text(desc) else ""
        mode = self.caption_mode
        if captions and mode != "txt":
            return captions[min(int(u * len(captions)), len(captions) - 1)]
        if mode in ("random", "reference") and (title or desc):
            if mode == "reference":        # the SLIP reference: a coin flip, even onto an empty field
                return title if u < 0.5 else desc
            options = [t for t in (title, desc) if t]
            return options[int(u * len(options))]
        if mode == "title" and title:
            return title
        if mode == "description" and desc:
            return desc
        text = self.reader.text(i)
        text = text.decode("utf-8", "replace").strip() if text is not None else ""
        caption = caption.strip() if has_visible_text(caption) else ""
        return (text if has_visible_text(text) else "") or title or desc or caption or None

    def _sample(self, i: int, u: float) -> tuple[bytes, tuple[int, int], str | int] | str:
        """The sample's image, its size and caption (its label in a labelled set), or the reason it is unusable."""
        try:
            data, info = self._check_image(i)
            if data is None:
                return info
            if self.labelled is not None:
                return data, info, int(self.labelled.labels[i])
            caption = self._caption(i, u)
        except Exception as e:     # one sample's data never stops training; the kind is counted
            reason = f"sample_error:{type(e).__name__}"
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"sample {i}: {type(e).__name__}: {str(e)[:200]}; counted as {reason} and replaced")
            return reason
        if caption is None:
            return "no_caption"
        return data, info, caption

    def make_batch(self, epoch: int, step: int) -> BatchPlan:
        """The plan of batch `step` of `epoch` for this rank: a pure function of its arguments and the data."""
        b, order = self.batch_size, self.epoch_order(epoch)
        rng = np.random.default_rng([self.seed, epoch, self.rank, step])
        caption_u = rng.random(b)
        indices = order[step * b:(step + 1) * b].copy()
        encoded, sizes, captions = [], np.empty((b, 2), np.int64), []
        bad: collections.Counter = collections.Counter()
        for slot in range(b):
            got = self._sample(int(indices[slot]), caption_u[slot])
            tries = 0
            while isinstance(got, str):
                bad[got] += 1
                tries += 1
                if tries > MAX_REPLACEMENT_TRIES:
                    raise RuntimeError(f"{MAX_REPLACEMENT_TRIES} unusable samples in a row around epoch {epoch} "
                                       f"batch {step} (last: {got}); is the shard set corrupt? "
                                       f"{dict(bad)}")
                sub = np.random.default_rng([self.seed, epoch, self.rank, step, slot, tries])
                indices[slot] = order[sub.integers(len(order))]
                got = self._sample(int(indices[slot]), caption_u[slot])
            data, sizes[slot], caption = got
            encoded.append(np.frombuffer(data, np.uint8))
            captions.append(caption)
        tokens = labels = None
        if self.labelled is not None:
            labels = np.asarray(captions, np.int64)
        else:
            tokens = self.tokenizer(captions, context_length=self.context_length)
            tokens = np.asarray(tokens.numpy() if torch.is_tensor(tokens) else tokens, dtype=np.int64)
        views = sample_views(rng, sizes[:, 0], sizes[:, 1], self.recipe)
        # finetuning's draws come after the views' and only when asked for: pretraining's stream is unchanged
        r, size = self.recipe, self.recipe.image_size
        rand_augment = draw_rand_augment(rng, r.rand_augment, b) if r.rand_augment.num_ops else None
        erasing = draw_erasing(rng, r.mix, b, size, size) if r.mix.erasing_prob > 0 else None
        mix = draw_mix(rng, r.mix, size, size) if r.mix.mixes else None
        return BatchPlan(epoch, step, indices, encoded, sizes, tokens, views, labels, bad=bad,
                         rand_augment=rand_augment, erasing=erasing, mix=mix)

    def _next_position(self, epoch: int, step: int) -> tuple[int, int]:
        step += 1
        return (epoch + 1, 0) if step >= self.steps_per_epoch else (epoch, step)

    # ------------------------------------------------------------------ augmentation

    def _plans(self) -> Callable[[], BatchPlan]:
        """The plans from the consumer's position on, one per call, for the augmenter to pull."""
        position = (self.epoch, self.step)

        def next_plan() -> BatchPlan:
            nonlocal position
            plan = self.make_batch(*position)
            position = self._next_position(*position)
            return plan
        return next_plan

    def _stop(self) -> None:
        if self._augmenter is not None:
            self._augmenter.close()
            self._augmenter = None

    def _new_augmenter(self, plans: Callable[[], BatchPlan], batch_size: int) -> Augmenter:
        return make_augmenter(self.backend, self.recipe, plans, batch_size, num_threads=self.num_threads,
                              device=self.device, device_id=self.device_id, prefetch=self.prefetch, fp16=self.fp16)

    def _run(self) -> tuple[dict, BatchPlan]:
        for _ in range(MAX_REPLACEMENT_TRIES):
            if self._augmenter is None:
                self._augmenter = self._new_augmenter(self._plans(), self.batch_size)
            try:
                return self._augmenter.run()
            except BadSampleError as e:
                self._known_bad.update(e.samples)
                self._stop()      # a failed augmenter is not reusable; restart at this batch
            except Exception as error:     # a decoder failed without naming the sample (or not on data)
                self._stop()
                found = self._probe(self.make_batch(self.epoch, self.step))
                if not found:
                    raise
                warnings.warn(f"{error.__class__.__name__} in the augmenter traced to samples {sorted(found)}; "
                              "they are replaced")
                self._known_bad.update(found)
        raise RuntimeError("the augmenter kept failing on the same batch")

    def _probe(self, plan: BatchPlan) -> dict[int, str]:
        """The samples of `plan` that make an augmenter fail, found by bisection (parts of the batch
        augmented by fresh augmenters): the culprits of a failure the augmenter could not attribute.
        Rare, so its cost hardly matters. Nothing found, or every sample failing alone (the
        augmenter itself is broken), is an empty answer."""
        def fails(slots: list[int]) -> bool:
            part = plan.subset(slots)
            augmenter = self._new_augmenter(lambda: part, len(slots))
            try:
                augmenter.run()
                return False
            except Exception:      # whatever the decoder raises, these samples trigger it
                return True
            finally:
                augmenter.close()

        culprits: list[int] = []

        def search(slots: list[int]) -> None:
            if len(slots) == 1:
                culprits.append(slots[0])
                return
            for half in (slots[:len(slots) // 2], slots[len(slots) // 2:]):
                if fails(half):
                    search(half)

        search(list(range(len(plan))))
        if not culprits or len(culprits) == len(plan) > 1:
            return {}
        return {int(plan.indices[slot]): LATE_DECODE_FAILURE for slot in culprits}

    @staticmethod
    def _to_torch(view) -> torch.Tensor:
        """DALI outputs without a copy (the dynamic executor hands out fresh buffers that live as long
        as the tensor, on the device they were made on): `from_dlpack` passes DALI the current torch
        stream, which DALI makes wait until the buffer is written. The pillow path's outputs are
        tensors already."""
        if isinstance(view, torch.Tensor):
            return view
        return torch.from_dlpack(view.as_tensor())    # dense: every view has the same size

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        """The remaining batches of the current epoch; afterwards the loader is at the next epoch."""
        if self.steps_per_epoch == 0:
            name = self.labelled.location if self.labelled is not None else \
                " + ".join(str(m.source or m.name) for m in self.sources)
            raise ValueError(f"{name}: {self.num_samples} samples make no "
                             f"batch of {self.batch_size} on each of {self.world_size} ranks")
        epoch = self.epoch
        while self.epoch == epoch:
            views, plan = self._run()
            assert (plan.epoch, plan.step) == (self.epoch, self.step), "planner and consumer out of step"
            out = {name: self._to_torch(views[name]) for name in self._augmenter.output_names}
            if plan.tokens is not None:
                out["text"] = torch.from_numpy(plan.tokens)
            out["index"] = torch.from_numpy(plan.indices.copy())
            if plan.labels is not None:
                out["label"] = torch.from_numpy(plan.labels)
            for draw in ("erasing", "mix"):      # applied on the training device (pipeline/batch_mix.py)
                if getattr(plan, draw) is not None:
                    out[draw] = getattr(plan, draw)
            bad = sum(plan.bad.values())
            out["bad_samples"] = bad
            self.bad_samples += bad
            self.bad_reasons.update(plan.bad)
            self.samples_by_source += np.bincount(self.mixture.source_of(plan.indices),
                                                  minlength=len(self.samples_by_source))
            self.epoch, self.step = self._next_position(self.epoch, self.step)
            yield self.batch_transform(out) if self.batch_transform is not None else out

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_samples": self.num_samples,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank,
                "bad_samples": self.bad_samples, "bad_reasons": dict(self.bad_reasons),
                "samples_by_source": self.samples_by_source.tolist()}

    def load_state_dict(self, state: dict) -> None:
        same = all(state.get(k) == getattr(self, k) for k in ("seed", "num_samples", "batch_size", "world_size"))
        epoch, step = int(state["epoch"]), int(state["step"])
        if not same:
            old_steps = max(1, (state["num_samples"] // state["world_size"]) // state["batch_size"])
            step = min(self.steps_per_epoch - 1, step * self.steps_per_epoch // old_steps) if self.steps_per_epoch else 0
            shape = {k: state.get(k) for k in ("seed", "num_samples", "batch_size", "world_size")}
            warnings.warn(f"loader state from a different run shape {shape}; restarting at epoch {epoch}, batch "
                          f"{step} of {self.steps_per_epoch}: the data order does not continue exactly")
        self.epoch, self.step = epoch, step
        self.bad_samples = int(state.get("bad_samples", 0))
        self.bad_reasons = collections.Counter(state.get("bad_reasons", {}))
        by_source = state.get("samples_by_source")
        if isinstance(by_source, list) and len(by_source) == len(self.samples_by_source):
            self.samples_by_source = np.asarray(by_source, np.int64)
        self._stop()    # restart the plans at the restored position
