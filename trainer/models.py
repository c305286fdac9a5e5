"""Models for SLIP / CLIP / SimCLR / nCLIP / xCLIP pretraining.

One `SLIPModel` holds what an objective needs and nothing else, so every parameter it owns learns:
the image trunk always; per `OBJECTIVE_PARTS` (trainer/objectives.py) the CLIP part adds the text
trunk, both projections and the logit scale, the SimCLR part the SimCLR head, the nCLIP part the
text trunk, both cluster heads and the shared prototypes.

Architecture (as the SLIP reference):
- Image trunk: ViT (timm layout: conv patch embedding, CLS token, learned position embedding, pre-LN
  blocks with GELU MLP and qkv bias, final LayerNorm); the pooled feature is the normalised CLS token.
  ViT-S/16 uses 12 heads like the reference (MoCo-v3 variant).
- Text trunk: the CLIP text transformer (vocab 49408, context 77, width 512, 12 layers, 8 heads,
  causal mask, QuickGELU, pre-LN, final LayerNorm, feature at the EOT token = argmax of ids).
- Bias-free projections to the joint space (std width^-0.5), token embedding std 0.02, position
  embedding std 0.01, logit scale init ln(1/0.07) clamped to [0, ln 100] by `clamp_logit_scale()`.
- Attention through F.scaled_dot_product_attention; `grad_checkpointing` recomputes each block.
- OpenAI-style towers (OpenCLIP's native ones, see trainer/convert/) need a few options, all off by
  default: a LayerNorm before the image blocks, a bias-free patch embedding, LayerNorm eps and
  GELU / QuickGELU per tower.

SimCLR head Linear(w, 4096)-Norm-ReLU-Linear(4096, 4096)-Norm-ReLU-Linear(4096, 256). `ssl_norm`:
- "bn": BatchNorm1d over the local batch (each view normalised in its own call, as the reference);
- "syncbn": batch statistics over the global batch of all ranks (our own all-reduce, so it also runs
  on CPU/gloo; equals "bn" on one process);
- "ln": LayerNorm, independent of the batch size;
- "auto" (default): "syncbn" (or "bn" on one process) when the global batch per view is at least
  `ssl_bn_min_batch` (256), else "ln". The reference recipe (4096 global) therefore gets SyncBN as
  in the paper, while the demo and small-batch runs (where BN statistics collapse: a 2-GPU batch-8
  run of the reference stayed at chance) get LayerNorm. Pass `global_batch_size` to `build_model`;
  when it is unknown "auto" picks "ln", which is safe at any batch size.

The three image views (CLIP, SSL 1, SSL 2) go through the trunk in one concatenated pass when their
shapes agree (`single_pass_views`); the trunk has only per-sample LayerNorms, so this equals three
passes, and the SimCLR head is then applied to each view separately so BN keeps per-view statistics.

nCLIP head (our design, the paper's code is not public): per modality an MLP
Linear(w, 2048)-GELU-Linear(2048, 256) to a bottleneck, L2-normalised, then a weight-normalised,
bias-free Linear(256, K) of prototypes SHARED by both modalities (so cluster k means the same
thing for images and texts), K = 32768. Its outputs are cosine logits in [-1, 1]; the objective
divides them by its temperatures. For a pure nCLIP model `encode_image/encode_text` return these
cluster logits (comparable across modalities through the shared prototypes), so zero-shot and
retrieval still work.

Weight decay groups (position embeddings and the CLS token decay in pretraining): trainer/optim.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.distributed import all_reduce_with_grad, get_world_size
from trainer.objectives import objective_parts

SSL_NORMS = ("auto", "bn", "syncbn", "ln")
SSLNorm = Literal[SSL_NORMS]
ACTIVATIONS = ("gelu", "quick_gelu")
Activation = Literal[ACTIVATIONS]
STEMS = ("patch", "conv")
Stem = Literal[STEMS]
PROTOTYPE_MODES = ("learned", "fixed")
PrototypeMode = Literal[PROTOTYPE_MODES]


@dataclass
class ModelConfig:
    name: str = "vit_b16"
    # image trunk
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    mlp_ratio: float = 4.0
    # text trunk
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    # joint space
    embed_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100)
    # SimCLR head
    ssl_mlp_dim: int = 4096
    ssl_emb_dim: int = 256
    ssl_norm: SSLNorm = "auto"
    ssl_bn_min_batch: int = 256
    # nCLIP heads
    nclip_clusters: int = 32768
    nclip_hidden_dim: int = 2048
    nclip_bottleneck_dim: int = 256
    # "learned": the prototypes train with the heads. "fixed": they stay at their starting values, the
    # random initialisation or, under init_from, the checkpoint's (excluded from the optimizer).
    # Learned prototypes can make one bottleneck direction identical for every prototype, and a head
    # that maps every sample onto it gets uniform outputs (docs/NCLIP.md, sixth round); fixed ones
    # keep the logit spread of any sample bounded below.
    nclip_prototypes: PrototypeMode = "learned"
    # Tower details in which OpenAI-style CLIP towers (OpenCLIP's native ones) differ from the SLIP
    # reference; the defaults are the reference's, so presets and older checkpoints are unchanged.
    vision_ln_pre: bool = False        # LayerNorm on the tokens before the first block
    vision_patch_bias: bool = True     # bias in the conv patch embedding
    vision_ln_eps: float = 1e-6        # every LayerNorm of the image tower (timm's ViT value)
    vision_act: Activation = "gelu"    # MLP activation of the image tower
    # "patch": one strided conv per patch (ViT, the reference). "conv": 3x3 stride-2 convs with
    # BatchNorm and ReLU down to the patch grid, then a 1x1 conv to the width (Xiao et al. 2021,
    # "Early convolutions help transformers see better"): the same tokens, but a tiny ViT trained
    # for minutes picks up edges and shapes, which a single linear patch embedding learns slowly
    vision_stem: Stem = "patch"
    text_ln_eps: float = 1e-5          # every LayerNorm of the text tower (CLIP's value)
    text_act: Activation = "quick_gelu"
    # weights to start a new run from (weights only: optimizer, schedule and data position start
    # fresh): one of our checkpoints, a converted one, or a foreign one (trainer/convert/)
    init_from: str = ""
    # stochastic depth of the image blocks (finetuning; the SLIP reference pretrains without it):
    # block i of L drops its residual branches per sample with rate drop_path * i / (L - 1)
    drop_path: float = 0.0
    # execution
    grad_checkpointing: bool = False
    single_pass_views: bool = True

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("width must be divisible by the number of heads")
        if self.ssl_norm not in SSL_NORMS:
            raise ValueError(f"ssl_norm must be one of {SSL_NORMS}, got {self.ssl_norm!r}")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path must lie in [0, 1), got {self.drop_path}")
        if self.nclip_prototypes not in PROTOTYPE_MODES:
            raise ValueError(f"nclip_prototypes must be one of {PROTOTYPE_MODES}, got {self.nclip_prototypes!r}")
        if self.vision_stem not in STEMS:
            raise ValueError(f"vision_stem must be one of {STEMS}, got {self.vision_stem!r}")
        if self.vision_stem == "conv" and (self.patch_size & (self.patch_size - 1) or self.patch_size < 2):
            raise ValueError(f"vision_stem 'conv' needs a power-of-two patch_size, got {self.patch_size}")
        for name in ("vision_act", "text_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {getattr(self, name)!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (see PRESETS) with optional field overrides. The config loader calls this
        for a `preset:` key (`model: {preset: vit_b16, ssl_norm: ln}`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(name=name, **{**PRESETS[name], **overrides})


_CLIP_TEXT = dict(text_width=512, text_layers=12, text_heads=8)
_TINY_TEXT = dict(text_width=128, text_layers=2, text_heads=2)
_TINY_HEADS = dict(embed_dim=128, ssl_mlp_dim=256, ssl_emb_dim=64,
                   nclip_clusters=1024, nclip_hidden_dim=256, nclip_bottleneck_dim=64)
PRESETS: dict[str, dict] = {
    # CPU tests and the demo: 64 px images, 8 px patches (64 tokens), 4 blocks; tiny text tower.
    "vit_tiny": dict(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                     **_TINY_TEXT, **_TINY_HEADS),
    "vit_s16": dict(vision_width=384, vision_layers=12, vision_heads=12, **_CLIP_TEXT),
    "vit_b16": dict(vision_width=768, vision_layers=12, vision_heads=12, **_CLIP_TEXT),
    "vit_l16": dict(vision_width=1024, vision_layers=24, vision_heads=16, **_CLIP_TEXT),
}


# ----------------------------------------------------------------------------- building blocks

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> type[nn.Module]:
    return {"gelu": nn.GELU, "quick_gelu": QuickGELU}[name]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random subset of the samples, rescaling the
    kept ones by 1 / (1 - rate) so the expectation is unchanged; the identity in evaluation."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: type[nn.Module], causal: bool,
                 eps: float, drop_path: float = 0.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, causal)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), act(), nn.Linear(hidden, width))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def drop_path_rates(rate: float, layers: int) -> list[float]:
    """timm / BEiT: rates rising linearly from 0 at the first block to `rate` at the last."""
    # plain floats: models are also built under torch.device("meta") (FLOP counts, conversion)
    return [rate * i / (layers - 1) for i in range(layers)] if layers > 1 else [0.0] * layers


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, act, causal=False, eps=1e-5, drop_path=0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act, causal, eps, rate)
                                    for rate in drop_path_rates(drop_path, layers))
        self.grad_checkpointing = False

    def forward(self, x):
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """log2(patch_size) 3x3 stride-2 convs (BatchNorm, ReLU), channels doubling up to `width` at the
    patch grid, then a 1x1 conv to `width`: one token per patch, as the patch embedding gives."""
    n = patch_size.bit_length() - 1
    chans = [3] + [max(8, width >> (n - 1 - i)) for i in range(n)]
    layers: list[nn.Module] = []
    for cin, cout in zip(chans, chans[1:]):
        layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Conv2d(chans[-1], width, 1))


class VisionTransformer(nn.Module):
    """ViT trunk; returns the pooled (final-LayerNorm) CLS feature [B, width]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.vision_width
        self.width = w
        eps = cfg.vision_ln_eps
        self.patch_embed = (conv_stem(w, cfg.patch_size) if cfg.vision_stem == "conv" else
                            nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=cfg.vision_patch_bias))
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, w))
        # Identity (no parameters) unless asked for, so the reference layout keeps its state dict
        self.norm_pre = nn.LayerNorm(w, eps=eps) if cfg.vision_ln_pre else nn.Identity()
        self.transformer = Transformer(w, cfg.vision_layers, cfg.vision_heads, cfg.mlp_ratio,
                                       activation(cfg.vision_act), eps=eps, drop_path=cfg.drop_path)
        self.norm = nn.LayerNorm(w, eps=eps)
        # timm-style init
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.transformer.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.transformer(self.norm_pre(x))
        return self.norm(x[:, 0])


class TextTransformer(nn.Module):
    """CLIP text trunk; returns the final-LayerNorm feature at the EOT token [B, width]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.text_width
        self.width = w
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, w))
        self.transformer = Transformer(w, cfg.text_layers, cfg.text_heads, 4.0, activation(cfg.text_act),
                                       causal=True, eps=cfg.text_ln_eps)
        self.ln_final = nn.LayerNorm(w, eps=cfg.text_ln_eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        # OpenAI CLIP init of the residual blocks
        proj_std = w ** -0.5 * (2 * cfg.text_layers) ** -0.5
        for block in self.transformer.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=w ** -0.5)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp[0].weight, std=(2 * w) ** -0.5)
            nn.init.normal_(block.mlp[2].weight, std=proj_std)

    def forward(self, tokens):
        # fewer columns than the context is the batch cut past its longest caption (data.text_padding):
        # causal attention and EOT pooling make the result the same as with the full padding
        n = tokens.shape[-1]
        if tokens.ndim != 2 or not 1 <= n <= self.positional_embedding.shape[0]:
            raise ValueError(f"text must be [B, L] with L <= {self.positional_embedding.shape[0]}, "
                             f"got {list(tokens.shape)}")
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        x = self.ln_final(self.transformer(x))
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d with statistics over the global batch of all ranks.

    Written on our differentiable all-reduce so it runs on gloo/CPU as well as NCCL; with one process
    it is exactly BatchNorm1d.
    """

    def forward(self, x):
        if not (self.training and get_world_size() > 1):
            return super().forward(x)
        xf = x if x.dtype == torch.float64 else x.float()
        n = torch.tensor([float(x.shape[0])], device=x.device, dtype=xf.dtype)
        stats = all_reduce_with_grad(torch.cat([xf.sum(0), (xf * xf).sum(0), n]))
        c = x.shape[1]
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            unbiased = var.detach() * count / (count - 1).clamp_min(1)
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return y.to(x.dtype)


def resolve_ssl_norm(cfg: ModelConfig, global_batch_size: int | None) -> str:
    """The concrete SimCLR-head norm for "auto" (see module docstring)."""
    if cfg.ssl_norm != "auto":
        return cfg.ssl_norm
    if global_batch_size is None or global_batch_size < cfg.ssl_bn_min_batch:
        return "ln"
    return "syncbn" if get_world_size() > 1 else "bn"


def _norm_layer(kind: str, dim: int) -> nn.Module:
    return {"bn": nn.BatchNorm1d, "syncbn": SyncBatchNorm1d, "ln": nn.LayerNorm}[kind](dim)


class SimCLRHead(nn.Module):
    def __init__(self, in_dim: int, mlp_dim: int, out_dim: int, norm: str):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, mlp_dim), _norm_layer(norm, mlp_dim), nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, mlp_dim), _norm_layer(norm, mlp_dim), nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, out_dim))

    def forward(self, x):
        return self.net(x)


class NCLIPHead(nn.Module):
    """Per-modality MLP to an L2-normalised bottleneck (the prototypes are shared, see SLIPModel)."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return F.normalize(self.mlp(x), dim=-1)


class Prototypes(nn.Module):
    """Bias-free linear layer with unit-norm rows: outputs cosine similarities in [-1, 1]."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, dim))
        nn.init.normal_(self.weight, std=dim ** -0.5)

    def forward(self, z):
        return z @ F.normalize(self.weight, dim=-1).t()


# ----------------------------------------------------------------------------- the model

# parameter names of the image side; a text-only model (text_only=True) has none of them
IMAGE_SIDE = ("visual.", "image_projection", "ssl_head.", "image_cluster_head.")


class SLIPModel(nn.Module):
    def __init__(self, cfg: ModelConfig, objective: str, ssl_norm: str = "ln", text_only: bool = False):
        """`text_only`: build the text side alone where the objective has one (evaluating the text tower by
        itself never builds, loads or runs the image tower; see IMAGE_SIDE)."""
        super().__init__()
        parts = objective_parts(objective)
        if parts.classify:
            raise ValueError(f"objective {objective!r} is finetuning: its model is trainer/classifier.py's "
                             "ImageClassifier (trainer/finetune.py builds it)")
        text_only = text_only and parts.text      # a model without a text tower is built whole
        self.cfg, self.objective, self.text_only = cfg, objective, text_only
        self.uses_clip, self.uses_ssl, self.uses_nclip = parts.clip, parts.simclr, parts.nclip
        self.uses_text = parts.text
        image = not text_only

        self.visual = VisionTransformer(cfg) if image else None
        if self.uses_text:
            self.text = TextTransformer(cfg)
        if self.uses_clip:
            if image:
                self.image_projection = nn.Parameter(torch.randn(cfg.vision_width, cfg.embed_dim)
                                                     * cfg.vision_width ** -0.5)
            self.text_projection = nn.Parameter(torch.randn(cfg.text_width, cfg.embed_dim) * cfg.text_width ** -0.5)
            self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        if self.uses_ssl and image:
            self.ssl_norm = ssl_norm
            self.ssl_head = SimCLRHead(cfg.vision_width, cfg.ssl_mlp_dim, cfg.ssl_emb_dim, ssl_norm)
        if self.uses_nclip:
            if image:
                self.image_cluster_head = NCLIPHead(cfg.vision_width, cfg.nclip_hidden_dim, cfg.nclip_bottleneck_dim)
            self.text_cluster_head = NCLIPHead(cfg.text_width, cfg.nclip_hidden_dim, cfg.nclip_bottleneck_dim)
            self.prototypes = Prototypes(cfg.nclip_bottleneck_dim, cfg.nclip_clusters)
            # a parameter still (saved, loaded, broadcast by DDP like the rest), just never updated
            self.prototypes.weight.requires_grad_(cfg.nclip_prototypes == "learned")
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def set_grad_checkpointing(self, enabled: bool = True):
        if self.visual is not None:
            self.visual.transformer.grad_checkpointing = enabled
        if self.uses_text:
            self.text.transformer.grad_checkpointing = enabled

    # --- public encoders (evaluation)
    def visual_features(self, images):
        """Pooled CLS trunk feature [B, vision_width] (linear probe)."""
        return self.visual(images)

    def encode_image(self, images, normalize: bool = True):
        x = self.visual(images)
        x = x @ self.image_projection if self.uses_clip else self._cluster_logits(x, self.image_cluster_head)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize: bool = True):
        if not self.uses_text:
            raise RuntimeError("a SimCLR model has no text encoder")
        x = self.text(tokens)
        x = x @ self.text_projection if self.uses_clip else self._cluster_logits(x, self.text_cluster_head)
        return F.normalize(x, dim=-1) if normalize else x

    @torch.no_grad()
    def clamp_logit_scale(self):
        if self.uses_clip:
            self.logit_scale.clamp_(0, self.cfg.logit_scale_max)

    def _cluster_logits(self, feats, head):
        return self.prototypes(head(feats))

    # --- training forward
    def _image_trunk(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        same_shape = all(v.shape[1:] == views[0].shape[1:] for v in views)
        if self.cfg.single_pass_views and len(views) > 1 and same_shape:
            return list(self.visual(torch.cat(views)).split([v.shape[0] for v in views]))
        return [self.visual(v) for v in views]

    def forward(self, batch: dict) -> dict:
        views = []
        if self.uses_clip or self.uses_nclip:
            views.append(batch["clip_image"])
        if self.uses_ssl:
            if "ssl_image_1" not in batch:
                raise KeyError(f"objective {self.objective!r} needs ssl_image_1/ssl_image_2 in the batch "
                               "(AugmentationRecipe.num_ssl_views = 2)")
            views += [batch["ssl_image_1"], batch["ssl_image_2"]]
        feats = self._image_trunk(views)
        out = {}
        if self.uses_text:
            text_feats = self.text(batch["text"])
        if self.uses_clip:
            out["image_embed"] = feats[0] @ self.image_projection
            out["text_embed"] = text_feats @ self.text_projection
            out["logit_scale"] = self.logit_scale.exp()
        if self.uses_ssl:
            # one head call per view: BatchNorm statistics stay per view
            out["ssl_embed_1"] = self.ssl_head(feats[-2])
            out["ssl_embed_2"] = self.ssl_head(feats[-1])
        if self.uses_nclip:
            out["image_cluster_logits"] = self._cluster_logits(feats[0], self.image_cluster_head)
            out["text_cluster_logits"] = self._cluster_logits(text_feats, self.text_cluster_head)
        return out


def build_model(cfg: ModelConfig, objective: str, global_batch_size: int | None = None,
                text_only: bool = False) -> SLIPModel:
    """The model for `objective`; `global_batch_size` (per view, all ranks) resolves ssl_norm="auto";
    `text_only`: the text side alone (SLIPModel).

    Call after `init_distributed()`: "auto" looks at the world size.
    """
    if text_only:
        return SLIPModel(cfg, objective, text_only=True)
    return SLIPModel(cfg, objective, ssl_norm=resolve_ssl_norm(cfg, global_batch_size))

