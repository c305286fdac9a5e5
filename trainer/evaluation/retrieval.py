"""Image-text retrieval: recall@1/5/10 image->text and text->image on held-out (image, caption) pairs.

An image counts as retrieved for a caption if it is the caption's own image, and vice versa (an
image may have several captions). Ties count against the model.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from trainer.evaluation.data import EvalData, Sample
from trainer.evaluation.features import encode_texts
from trainer.evaluation.task import EvalContext, Task


def retrieval_recall(image_embed: torch.Tensor, text_embed: torch.Tensor, text_to_image: Sequence[int],
                     ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k both ways, in percent. `text_to_image[j]` is the row of caption j's image in
    `image_embed`. Ties count against the model (a collapsed model must not score 100%)."""
    t2i = torch.as_tensor(list(text_to_image), dtype=torch.long)
    sim = image_embed.float() @ text_embed.float().T               # [N_img, N_txt]
    n_img, n_txt = sim.shape
    cols = torch.arange(n_txt)
    own = torch.zeros(n_img, n_txt, dtype=torch.bool)
    own[t2i, cols] = True
    # text -> image: how many other images score at least as high as the caption's own image
    true = sim[t2i, cols]
    t2i_rank = ((sim >= true[None, :]) & ~own).sum(0)
    # image -> text: how many foreign captions score at least as high as the image's best own caption
    has_caption = own.any(1)
    best_own = sim.masked_fill(~own, -math.inf).max(1).values
    i2t_rank = ((sim >= best_own[:, None]) & ~own).sum(1)[has_caption]
    out = {"num_images": int(has_caption.sum()), "num_captions": n_txt}
    for k in ks:
        out[f"image_to_text_R@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        out[f"text_to_image_R@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    return out


def _no_captions(data: EvalData) -> str | None:
    return None if data.captions else "no captions (val_captions.jsonl, or a CLIP-benchmark retrieval set)"


def evaluate(ctx: EvalContext) -> dict:
    # reuse the embeddings of test images (captions name them by sample name: a file path, or
    # shard:key in the CLIP benchmark's retrieval shards); encode any captioned file not among them
    samples, captions = ctx.data.test.samples, ctx.data.captions
    row_of = {samples[i].name: r for r, i in enumerate(ctx.test.index)}
    listed = {s.name for s in samples}
    files = sorted({str(p) for p, _ in captions})
    extra = [Sample(f, -1, path=Path(f)) for f in files if f not in listed]
    embeds = [ctx.test.image_embed]
    if extra:
        ex = ctx.features(extra, "retrieval images", embeddings=True)
        base = len(ctx.test.image_embed)
        row_of.update({extra[i].name: base + r for r, i in enumerate(ex.index)})
        if ex.image_embed is not None:
            embeds.append(ex.image_embed)
    pairs = [(row_of[str(p)], c) for p, c in captions if str(p) in row_of]
    if not pairs:
        raise ValueError(f"{ctx.data.root}: none of the captioned images could be read")
    rows = sorted({r for r, _ in pairs})
    remap = {r: i for i, r in enumerate(rows)}
    image_embed = torch.cat(embeds)[rows]
    text_embed = ctx.cached("retrieval captions", lambda: encode_texts(ctx.model, ctx.tokenizer(),
                                                                        [c for _, c in pairs]))
    return retrieval_recall(image_embed, text_embed, [remap[r] for r, _ in pairs])


TASK = Task("retrieval", evaluate, image_embed=True, text=True, unavailable=_no_captions)
