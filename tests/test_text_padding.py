"""data.text_padding "longest": a batch's token columns past its longest caption are cut before the
model sees them. The text tower is causal and pools at EOT, so features, loss and gradients are those
of the full padding up to rounding; MFU counts the text at the width that ran. The two-rank DDP
trainer run with it (MFU from both ranks' FLOPs per sample, the text at its trimmed width) is in
tests/test_trainer.py."""
from __future__ import annotations

import pytest
import torch

from model_testing import random_batch
from pipeline.tokenizer import Tokenizer
from trainer.batches import TEXT_WIDTH_MULTIPLE, to_device, trim_text_padding
from trainer.flops import count_flops, flops_per_sample
from trainer.models import ModelConfig, build_model
from trainer.objectives import ObjectiveConfig, build_objective

TINY = ModelConfig.preset("vit_tiny", vision_stem="conv", vision_ln_pre=True)   # the demo's tower

CAPTIONS = ["a red square", "IMG_1234", "", "a photo of three striped stars on a grey table at dusk, "
            "taken near the harbour with an old camera"]


def test_trim_cuts_to_the_longest_caption_rounded_up():
    text = Tokenizer()(CAPTIONS)
    longest = int(text.argmax(dim=1).max()) + 1            # EOT is the largest id: the last token
    batch = {"text": text, "clip_image": torch.zeros(len(CAPTIONS), 3, 8, 8), "index": torch.arange(4)}
    out = trim_text_padding(batch)
    width = out["text"].shape[1]
    assert width % TEXT_WIDTH_MULTIPLE == 0 and longest <= width < longest + TEXT_WIDTH_MULTIPLE
    assert torch.equal(out["text"], text[:, :width]) and not text[:, width:].any()   # only padding dropped
    assert out["clip_image"] is batch["clip_image"] and out["index"] is batch["index"]
    assert text.shape[1] == 77                              # the input batch is left as it was
    # a caption that fills the context keeps every column; "context" never trims
    full = Tokenizer()(["word " * 100, "short"])
    assert trim_text_padding({"text": full})["text"].shape[1] == 77
    assert to_device({"text": text}, torch.device("cpu"))["text"].shape[1] == 77
    assert to_device({"text": text}, torch.device("cpu"), "longest")["text"].shape[1] == width


def _rows(*lengths: int) -> torch.Tensor:
    """Token rows of the tokenizer's layout with these lengths (SOT and EOT included)."""
    text = torch.zeros(len(lengths), 77, dtype=torch.long)
    for i, n in enumerate(lengths):
        text[i, 0], text[i, 1:n - 1], text[i, n - 1] = 49406, 320, 49407
    return text


@pytest.mark.parametrize("lengths, width", [((8, 3), 8), ((9, 2), 16), ((16,), 16), ((17, 5), 24),
                                            ((72,), 72), ((73,), 77), ((77,), 77), ((2, 2), 8)])
def test_trim_keeps_the_longest_row_whole(lengths, width):
    """At and just past a multiple of 8 (an off-by-one would drop the EOT of a 9-token row)."""
    text = _rows(*lengths)
    out = trim_text_padding({"text": text})["text"]
    assert out.shape[1] == width
    assert torch.equal(out.argmax(dim=1), text.argmax(dim=1))     # every EOT kept where it was


@pytest.mark.parametrize("objective", ["clip", "slip", "xclip"])
def test_trimmed_text_gives_the_same_loss_and_gradients(objective):
    """The whole training forward and backward on the trimmed batch equals the padded one."""
    torch.manual_seed(0)
    model = build_model(TINY, objective).train()
    loss_fn = build_objective(ObjectiveConfig(name=objective))
    batch = random_batch(6, seed=1)
    batch["text"] = Tokenizer()(CAPTIONS + ["two blue discs", "checkered"])
    trimmed = trim_text_padding(batch)
    assert trimmed["text"].shape[1] < batch["text"].shape[1]

    def run(b):
        model.zero_grad()
        torch.manual_seed(3)                               # the same dropout / draws, if any
        loss = loss_fn(model(b))["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_full, grads_full = run(batch)
    loss_trim, grads_trim = run(trimmed)
    assert torch.allclose(loss_full, loss_trim, rtol=1e-5, atol=1e-6)
    assert grads_full.keys() == grads_trim.keys()
    for name, g in grads_full.items():
        # rounding only: kernels differ with the shape, so compare against the tensor's scale
        assert (g - grads_trim[name]).abs().max() <= 1e-5 * g.abs().max() + 1e-9, name
    # the positional embeddings past the width get no gradient from the trimmed batch, and none
    # from the padded one either: the EOT feature never attends to them
    width = trimmed["text"].shape[1]
    assert not grads_full["text.positional_embedding"][width:].any()


def test_text_tower_refuses_more_tokens_than_its_context():
    model = build_model(TINY, "clip")
    with pytest.raises(ValueError, match="L <= 77"):
        model.text(torch.zeros(2, 78, dtype=torch.long))


def test_flops_at_a_width_equal_a_count_at_that_width():
    count = flops_per_sample(TINY, "clip")
    assert count.train_at(77) == count.train
    with torch.device("meta"):
        text = build_model(TINY, "clip").text
    for width in (8, 16, 40):
        assert count.text_at(width) == pytest.approx(count_flops(text, torch.zeros(1, width, dtype=torch.long)),
                                                     rel=1e-9)
        assert count.train_at(width) == pytest.approx(3 * (count.forward - count.text + count.text_at(width)))
    assert count.train_at(8) < count.train


def test_config_refuses_longest_with_compile():
    from trainer.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="text_padding=longest with train.compile"):
        load_config(None, ["data.text_padding=longest", "train.compile=true"])
    load_config(None, ["data.text_padding=longest"])


class _Batches:
    """Stands in for the loader: fixed batches, one epoch per pass."""

    def __init__(self, batches):
        self.batches, self.steps_per_epoch, self.bad_samples = batches, len(batches) // 2, 0

    def __iter__(self):
        return iter(self.batches)

    def state_dict(self):
        return {}


def test_logged_mfu_counts_each_micro_batch_at_its_width(tmp_path):
    """Accumulation over micro-batches of different widths and a two-step logging window: the logged
    MFU's FLOPs per sample are the mean of train_at(width) over the four micro-batches."""
    import json

    from trainer.config import load_config
    from trainer.loop import Components, Trainer
    from trainer.optim import WarmupCosine, build_optimizer
    cfg = load_config(None, ["model.preset=vit_tiny", "data.recipe.image_size=64", "objective.name=clip",
                             "data.recipe.num_ssl_views=0", "data.batch_size=4", "optim.accum_steps=2",
                             "train.log_every=2", "checkpoint.every_steps=0", "data.text_padding=longest",
                             f"out_dir={tmp_path}"])
    lengths = [(9, 3, 4, 2), (5, 5, 5, 5), (20, 2, 2, 2), (77, 4, 4, 4)]       # widths 16, 8, 24, 77
    batches = []
    for seed, rows in enumerate(lengths):
        b = random_batch(4, seed=seed)
        b["text"] = _rows(*rows)
        batches.append(b)
    torch.manual_seed(0)
    model = build_model(cfg.model, "clip")
    opt = build_optimizer(model, cfg.optim)
    count = flops_per_sample(cfg.model, "clip")
    trainer = Trainer(Components(cfg=cfg, model=model, train_model=model, objective=build_objective(cfg.objective),
                                 optimizer=opt, scheduler=WarmupCosine(opt, cfg.optim.lr, 0, 2),
                                 loader=_Batches(batches), device=torch.device("cpu"), total_steps=2,
                                 flops_per_sample=count, peak_flops=1e12))
    trainer.fit()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rec = next(r for r in recs if r.get("step") == 2 and "mfu" in r)
    per_sample = rec["mfu"] * 1e12 / rec["images_per_s"]
    expected = sum(count.train_at(w) for w in (16, 8, 24, 77)) / 4
    assert per_sample == pytest.approx(expected, rel=1e-4)
    assert expected < count.train
