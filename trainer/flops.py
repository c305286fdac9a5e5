"""FLOPs per training sample, counted by torch.utils.flop_counter.FlopCounterMode, and the peak
FLOP/s of the device: the two halves of MFU.

The model is built on the meta device and run forward once on one sample of each input, so even
ViT-L costs no memory or compute. FLOPs = 2 x multiply-accumulates of matrix products and
convolutions (attention included, the causal text mask counted as dense, as in the published
figures); element-wise work is not counted. For ViT-B/16 this gives 35.1 GFLOPs forward per image
view and 6.0 per caption, so SLIP = 3 x 35.1 + 6.0 = 111 GFLOPs forward. Training = 3 x forward
(backward costs two forwards; recomputation for gradient checkpointing is not counted, as usual for MFU).
With `data.text_padding: longest` a batch's text is cut past its longest caption, and the trainer counts
the text at the width it really ran (`FlopCount.train_at`), not at the context length.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from trainer.models import ModelConfig, build_model
from trainer.objectives import objective_parts

aten = torch.ops.aten

# Dense (not 2:4 sparse) bf16 tensor-core peak per device (FLOP/s), by a substring of the CUDA
# device name. The first match wins, so a more specific name comes before its family: the H200's
# compute is the H100 SXM's (it differs in memory), the PCIe and NVL boards run lower clocks.
PEAK_BF16_FLOPS = {"H200 NVL": 835e12, "H200": 989e12, "GH200": 989e12, "H100 PCIe": 756e12,
                   "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
                   "A10": 125e12, "L4": 121e12, "RTX 4090": 165e12, "V100": 125e12}


def peak_for_name(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the CUDA device called `name`; None when unknown."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Per-device peak FLOP/s: `override_tflops` (train.peak_tflops) if set, else looked up for a
    known CUDA device; None when unknown (no MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def _sdpa_cpu_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
    # the CPU kernel of F.scaled_dot_product_attention is missing from torch's flop registry
    return sdpa_flop_count(query.shape, key.shape, value.shape)


if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:   # registering twice raises
    register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(_sdpa_cpu_flop)


@dataclass
class FlopCount:
    image_per_view: int      # image trunk, one view, per sample
    text: int                # text trunk, per sample, at the full context length
    forward: int             # whole training forward per sample (all views, text, heads)
    image_views: int         # image views per sample in the forward (1 CLIP, 2 SimCLR, 3 SLIP)
    context_length: int = 77
    # the text trunk's count at L tokens is text_linear * L + text_quadratic * L^2 exactly: matrix
    # products grow with L, attention with L^2 (fitted from counts at two lengths)
    text_linear: float = 0.0
    text_quadratic: float = 0.0

    @property
    def train(self) -> int:
        return 3 * self.forward

    def text_at(self, length: int) -> float:
        """The text trunk's forward FLOPs per sample for captions cut to `length` tokens."""
        if length == self.context_length or not (self.text_linear or self.text_quadratic):
            return float(self.text)
        return self.text_linear * length + self.text_quadratic * length ** 2

    def train_at(self, length: int) -> float:
        """Training FLOPs per sample when the batch's text is `length` tokens wide (data.text_padding)."""
        return 3 * (self.forward - self.text + self.text_at(length))


def count_flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def flops_per_sample(model_cfg: ModelConfig, objective: str) -> FlopCount:
    if objective_parts(objective).classify:
        return _classifier_flops(model_cfg)
    with torch.device("meta"):
        # single_pass_views off so the count does not depend on the concatenation
        model = build_model(replace(model_cfg, single_pass_views=False), objective, global_batch_size=None)
        image = torch.empty(1, 3, model_cfg.image_size, model_cfg.image_size)
        text = torch.zeros(1, model_cfg.context_length, dtype=torch.long)
        text[:, -1] = 1  # EOT position for argmax pooling (value irrelevant on meta)
    batch = {"clip_image": image, "ssl_image_1": image, "ssl_image_2": image, "text": text}
    with torch.no_grad():
        forward = count_flops(model, batch)
        image_flops = count_flops(model.visual, image)
        text_flops = count_flops(model.text, text) if model.uses_text else 0
        linear = quadratic = 0.0
        if model.uses_text and model_cfg.context_length > 1:
            half = model_cfg.context_length // 2
            a = (model_cfg.context_length, text_flops)
            b = (half, count_flops(model.text, text[:, -half:]))
            # solve f(L) = p L + q L^2 through both points
            quadratic = (a[1] / a[0] - b[1] / b[0]) / (a[0] - b[0])
            linear = a[1] / a[0] - quadratic * a[0]
    return FlopCount(image_per_view=image_flops, text=text_flops, forward=forward,
                     image_views=objective_parts(objective).image_views, context_length=model_cfg.context_length,
                     text_linear=linear, text_quadratic=quadratic)


def _classifier_flops(model_cfg: ModelConfig, num_classes: int = 1000) -> FlopCount:
    from trainer.classifier import ImageClassifier
    with torch.device("meta"):
        model = ImageClassifier(model_cfg, num_classes)
        image = torch.empty(1, 3, model_cfg.image_size, model_cfg.image_size)
    with torch.no_grad():
        forward, image_flops = count_flops(model, image), count_flops(model.visual, image)
    return FlopCount(image_per_view=image_flops, text=0, forward=forward, image_views=1)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b16")
    parser.add_argument("--objective", default="slip")
    a = parser.parse_args()
    c = flops_per_sample(ModelConfig.preset(a.model), a.objective)
    print(f"{a.model} {a.objective}: image trunk {c.image_per_view / 1e9:.2f} GFLOPs/view, "
          f"text trunk {c.text / 1e9:.2f}, forward {c.forward / 1e9:.2f}, train {c.train / 1e9:.1f} GFLOPs/sample")
