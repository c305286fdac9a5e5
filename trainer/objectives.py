"""Training objectives across ranks: CLIP, SimCLR, SLIP, nCLIP, xCLIP.

`build_objective(ObjectiveConfig(name=...))(model_out)` returns a dict with "loss" (call backward on
it) plus every term and accuracy (detached). Losses are computed in float32 even under autocast (float64 inputs stay float64).
Which parts (CLIP, SimCLR, nCLIP) each objective combines is the table `OBJECTIVE_PARTS`; the
model's heads, the FLOP count and the recipe's SSL-view check read it too.

How ranks combine (checked by tests/test_distributed_losses.py with real 2-process gloo DDP):
each rank's loss is a mean over its LOCAL rows (or a term that has the same value on every rank);
DDP averages gradients; gathers/all-reduces that carry gradient sum it over ranks in backward. The
mean of the per-rank losses is then the one-process full-batch loss, and the DDP gradient is the
full-batch gradient exactly, for every objective here except the CLIP term with the reference's
no-grad gather (below). All ranks must use the same local batch size.

CLIP: features L2-normalised, gathered from all ranks; loss = (CE(image->text) + CE(text->image)) / 2
with logit_scale times cosine similarities. Across ranks the loss VALUE is the full-batch loss in
every mode below; the modes differ in which gradient DDP ends up with (`clip_gradient`):
- "gather_with_grad" (default): local rows x global columns, labels local_bs * rank + arange, and
  the gathers carry gradient (their backward sums the column gradients over ranks). The DDP
  gradient is the full-batch gradient exactly, at any world size, for two extra all-reduces of
  [N_global, D] in the backward pass (about 17 MB at 4,096 x 512 in fp32, against about 650 MB for
  DDP's own gradient all-reduce of a ViT-B/16 SLIP model: a few percent more communication), and
  logits of N_local x N_global per rank.
- "global_logits" (OpenCLIP's default, `local_loss=False` without gradient gather): every rank
  computes the whole N_global x N_global logits with only its own chunk differentiable; summed over
  ranks that is the full gradient, so we scale the own chunk's gradient by the world size to undo
  DDP's averaging (OpenCLIP leaves that 1/W factor in). Exact, no extra communication, but
  O(N_global^2) logits per rank (4,096^2 fp32 = 67 MB per direction; 32k: 4.3 GB) and every rank
  repeats the same N_global^2 work.
- "local_chunk" (this project's earlier default): local logits with the own chunk differentiable
  and the other ranks' chunks constant. It misses the (W-1)/W of the column terms that other
  ranks hold, so its bias grows with the world size.
- "reference" (the SLIP reference, facebookresearch/SLIP, and OpenCLIP's `local_loss=True` without
  gradient gather): every gathered chunk is detached, own one included, so only the row terms
  carry gradient (with one process the reference keeps the gradient: so do we).
tools/bench/clip_gradient_modes.py measures each mode's gradient error against the full-batch
gradient at 2, 4 and 8 ranks; the table is in docs/OBJECTIVES.md. The default is the cheapest exact
mode at reference scale.

SimCLR (SLIP reference): both views L2-normalised and gathered WITH gradient; for view a the logits
are [q_a k_b^T, q_a k_a^T] / tau with the self-similarity q_a.k_a(i) masked out, so each row has 1
positive and 2N-2 negatives over the global batch N; loss = (CE_a + CE_b) / 2; tau = 0.1.

SLIP = CLIP + ssl_scale * SimCLR (ssl_scale 1.0).

nCLIP (Zhou et al., CVPR 2023; no official code: this is OUR reading of the paper, every number
below except K is our choice). Each modality is mapped to K = 32768 cluster logits (cosine similarity
to prototypes shared by both modalities, in [-1, 1]; trainer/models.py). With
  p_m = softmax(logits_m / tau_s)                     prediction of modality m, tau_s = 0.1
  q_m = softmax(stopgrad(logits_m) / tau_t)           sharpened pseudo-label,   tau_t = 0.07
the loss is
  pred       = (H(q_text, p_image) + H(q_image, p_text)) / 2     cross-modal cross-entropy
  sharpness  = (mean_i H(p_image,i) + mean_i H(p_text,i)) / 2    low entropy per sample
  smoothness = -(H(mean_global p_image) + H(mean_global p_text)) / 2
                                                       high entropy of the batch-mean assignment;
                                                       the mean runs over the GLOBAL batch
                                                       (differentiable all-reduce)
  nclip = pred + sharpness_weight * sharpness + smoothness_weight * smoothness
with sharpness_weight 0.25 and smoothness_weight 2.0. H is the natural-log entropy (max ln K = 10.4
for K = 32768). Why these defaults: a collapse study (docs/NCLIP.md, tools/bench/nclip_collapse_study.py)
chose them by a criterion stated before it ran. The first defaults (DINO's temperatures 0.1 / 0.04,
both weights 1, the information-maximisation form of IIC-style clustering) collapsed to a few
clusters outside the project's toy and to one cluster in a real demo run; the pseudo-labels were
too sharp, so agreeing on one cluster was the cheapest way to match the other modality. A teacher
temperature of 0.07 with the smoothness weight doubled kept the clusters in use in every setup
tried. This is evidence at small scale, not a guarantee: the trainer logs the cluster usage per
modality and warns when it falls below `nclip_min_usage` of min(K, global batch), and when the
outputs go near-uniform (mean per-sample KL to uniform below `nclip_min_kl` nats), which the
usage cannot see (trainer/policies.py CollapseWatch and UniformWatch, called from trainer/loop.py).
"nclip_batch_entropy" reports (H(mean p_image) + H(mean p_text)) / 2: it stays high without collapse;
the per-modality terms and the argmax histograms are returned for that monitoring.
`nclip_targets` chooses how q is made: "sharpen" (above, the default), "centre" (DINO: the teacher
logits minus an EMA of their global batch mean; the centre is the objective's state, all-reduced so
every rank holds the same, checkpointed by the loop) or "sinkhorn" (SwAV: Sinkhorn-Knopp over the
global batch, tau_t as epsilon, so every cluster gets about B/K of the targets). Both are global
over ranks (tests/test_distributed_losses.py); docs/NCLIP.md has the study of them.

xCLIP = CLIP + nclip_weight * nCLIP (nclip_weight 1.0, an equal-weight multi-task sum as in the paper).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from trainer.distributed import (all_reduce_no_grad, all_reduce_with_grad, gather_no_grad, gather_with_grad,
                                 get_rank, get_world_size)


@dataclass(frozen=True)
class ObjectiveParts:
    """What an objective trains. The model builds these heads, the objective sums these losses, the
    FLOP count and the data recipe follow from the same entry."""
    clip: bool = False      # image/text projections + logit scale; the CLIP loss
    simclr: bool = False    # SimCLR head over two SSL views; the SimCLR loss
    nclip: bool = False     # nCLIP cluster heads + shared prototypes; the nCLIP loss
    classify: bool = False  # finetuning: a classifier on one view; cross-entropy against soft targets

    @property
    def text(self) -> bool:
        """Whether the text trunk is needed."""
        return self.clip or self.nclip

    @property
    def ssl_views(self) -> int:
        """SSL image views per sample the batch must carry (AugmentationRecipe.num_ssl_views)."""
        return 2 if self.simclr else 0

    @property
    def image_views(self) -> int:
        """Image views per sample through the trunk: the CLIP view (CLIP, nCLIP) plus the SSL views."""
        return int(self.clip or self.nclip or self.classify) + self.ssl_views


# The one table of objectives.
OBJECTIVE_PARTS: dict[str, ObjectiveParts] = {
    "clip": ObjectiveParts(clip=True),
    "simclr": ObjectiveParts(simclr=True),
    "slip": ObjectiveParts(clip=True, simclr=True),
    "nclip": ObjectiveParts(nclip=True),
    "xclip": ObjectiveParts(clip=True, nclip=True),
    "classification": ObjectiveParts(classify=True),     # finetuning (trainer/finetune.py)
}
OBJECTIVES = tuple(OBJECTIVE_PARTS)
PRETRAINING_OBJECTIVES = tuple(name for name, parts in OBJECTIVE_PARTS.items() if not parts.classify)
ObjectiveName = Literal[OBJECTIVES]  # the table's keys, as a type the config loader checks


def objective_parts(name: str) -> ObjectiveParts:
    if name not in OBJECTIVE_PARTS:
        raise ValueError(f"unknown objective {name!r}; choose from {OBJECTIVES}")
    return OBJECTIVE_PARTS[name]


# How nCLIP's pseudo-labels q are made from the detached logits (docs/NCLIP.md, second round):
# "sharpen" softmax(l / tau_t); "centre" softmax((l - c) / tau_t) with c DINO's EMA of the global
# batch-mean logits; "sinkhorn" SwAV's Sinkhorn-Knopp equipartition over the global batch (eps = tau_t).
NCLIP_TARGETS = ("sharpen", "centre", "sinkhorn")
NclipTargets = Literal[NCLIP_TARGETS]

CLIP_GRADIENTS = ("gather_with_grad", "global_logits", "local_chunk", "reference")
ClipGradient = Literal[CLIP_GRADIENTS]


@dataclass
class ObjectiveConfig:
    name: ObjectiveName = "slip"
    clip_gradient: ClipGradient = "gather_with_grad"
    clip_gather_with_grad: bool | None = None   # deprecated spelling: True = gather_with_grad, False = local_chunk
    ssl_scale: float = 1.0
    ssl_temperature: float = 0.1
    nclip_weight: float = 1.0
    nclip_student_temperature: float = 0.1
    # chosen by the collapse study of docs/NCLIP.md (the first defaults 0.04 / 1.0 / 1.0 collapsed)
    nclip_teacher_temperature: float = 0.07
    nclip_sharpness_weight: float = 0.25
    nclip_smoothness_weight: float = 2.0
    nclip_targets: NclipTargets = "sharpen"
    nclip_centre_momentum: float = 0.9        # "centre": DINO's default
    nclip_sinkhorn_iterations: int = 3        # "sinkhorn": SwAV's default
    # the trainer warns (once per fall per modality) and records an event when the clusters used in a global
    # batch fall below this fraction of min(K, global batch); 0 turns the warning off
    nclip_min_usage: float = 0.1
    # ... and when the mean per-sample KL(p || uniform) falls below this many nats: outputs so flat that
    # the clusters carry nothing (nCLIP alone from scratch on the CI demo ends there; docs/NCLIP.md); 0: off
    nclip_min_kl: float = 0.02

    def __post_init__(self):
        objective_parts(self.name)   # raises on an unknown name
        if self.clip_gather_with_grad is not None:   # configs written before clip_gradient existed
            self.clip_gradient = "gather_with_grad" if self.clip_gather_with_grad else "local_chunk"
            self.clip_gather_with_grad = None
        for f in ("ssl_temperature", "nclip_student_temperature", "nclip_teacher_temperature"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive")
        if self.nclip_targets not in NCLIP_TARGETS:
            raise ValueError(f"nclip_targets {self.nclip_targets!r}: choose one of {NCLIP_TARGETS}")
        if not 0 <= self.nclip_centre_momentum < 1:
            raise ValueError(f"nclip_centre_momentum must be in [0, 1), got {self.nclip_centre_momentum}")
        if self.nclip_sinkhorn_iterations < 1:
            raise ValueError(f"nclip_sinkhorn_iterations must be >= 1, got {self.nclip_sinkhorn_iterations}")
        if not 0 <= self.nclip_min_usage <= 1:
            raise ValueError(f"nclip_min_usage must be in [0, 1], got {self.nclip_min_usage}")
        if self.nclip_min_kl < 0:
            raise ValueError(f"nclip_min_kl must be >= 0, got {self.nclip_min_kl}")


def _gather_keep_local(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows without gradient, except our own chunk which keeps its gradient."""
    world = get_world_size()
    if world == 1:
        return x
    n, r = x.shape[0], get_rank()
    parts = list(gather_no_grad(x).split(n))
    parts[r] = x
    return torch.cat(parts)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (autocast hands us bf16; float64 stays float64 for exact tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _labels(n: int, device) -> torch.Tensor:
    return n * get_rank() + torch.arange(n, device=device)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).float().mean() * 100


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `factor`."""
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _gather_detached(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, none differentiable (one process keeps its gradient, as the reference)."""
    return x if get_world_size() == 1 else gather_no_grad(x)


def clip_loss(image_embed, text_embed, logit_scale, gradient: ClipGradient = "gather_with_grad") -> dict:
    if gradient not in CLIP_GRADIENTS:
        raise ValueError(f"clip gradient {gradient!r}: choose one of {CLIP_GRADIENTS}")
    image = F.normalize(_f32(image_embed), dim=-1)
    text = F.normalize(_f32(text_embed), dim=-1)
    scale = _f32(logit_scale)
    if gradient == "global_logits":
        world = get_world_size()
        image_all = _gather_keep_local(_ScaleGrad.apply(image, world) if world > 1 else image)
        text_all = _gather_keep_local(_ScaleGrad.apply(text, world) if world > 1 else text)
        image, text = image_all, text_all               # every rank: the whole batch as rows
        labels = torch.arange(image.shape[0], device=image.device)
    else:
        gather = {"gather_with_grad": gather_with_grad, "local_chunk": _gather_keep_local,
                  "reference": _gather_detached}[gradient]
        image_all, text_all = gather(image), gather(text)
        labels = _labels(image.shape[0], image.device)
    logits_image = scale * image @ text_all.t()
    logits_text = scale * text @ image_all.t()
    loss = (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2
    return {"clip_loss": loss, "clip_acc": _accuracy(logits_image.detach(), labels)}


def simclr_loss(embed_1, embed_2, temperature: float = 0.1) -> dict:
    q1 = F.normalize(_f32(embed_1), dim=-1)
    q2 = F.normalize(_f32(embed_2), dim=-1)
    k1, k2 = gather_with_grad(q1), gather_with_grad(q2)
    n = q1.shape[0]
    labels = _labels(n, q1.device)
    self_mask = F.one_hot(labels, k1.shape[0]).bool()
    aa = (q1 @ k1.t() / temperature).masked_fill(self_mask, float("-inf"))
    bb = (q2 @ k2.t() / temperature).masked_fill(self_mask, float("-inf"))
    logits_a = torch.cat([q1 @ k2.t() / temperature, aa], dim=1)
    logits_b = torch.cat([q2 @ k1.t() / temperature, bb], dim=1)
    loss = (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2
    acc = (_accuracy(logits_a.detach(), labels) + _accuracy(logits_b.detach(), labels)) / 2
    return {"ssl_loss": loss, "ssl_acc": acc}


def _entropy_of_mean(p: torch.Tensor) -> torch.Tensor:
    """Entropy of the global batch-mean of the rows of p (differentiable across ranks)."""
    count = torch.tensor([float(p.shape[0])], device=p.device, dtype=p.dtype)
    total = all_reduce_with_grad(torch.cat([p.sum(0), count]))
    mean = total[:-1] / total[-1]
    return -(mean * mean.clamp_min(1e-12).log()).sum()


# The objective's per-rank argmax histograms over the K clusters (int64 [K]), by modality: the
# trainer sums them over a step and a logging window and all-reduces them at log steps only.
CLUSTER_COUNTS = {"image": "nclip_image_cluster_counts", "text": "nclip_text_cluster_counts"}


class TeacherCentre:
    """DINO's teacher centring: per modality an EMA of the GLOBAL batch-mean logits (all-reduced, so
    every rank holds the same centre), subtracted from the teacher logits before sharpening. It
    updates once per objective call (each micro-batch), after the targets of that call are made.
    Its state travels in the trainer's checkpoints (Objective.state_dict) for an exact resume."""

    def __init__(self, momentum: float = 0.9):
        self.momentum = momentum
        self.centres: dict[str, torch.Tensor] = {}

    def get(self, modality: str, logits: torch.Tensor) -> torch.Tensor:
        c = self.centres.get(modality)
        return torch.zeros_like(logits[0]) if c is None else c.to(logits)

    @torch.no_grad()
    def update(self, modality: str, logits: torch.Tensor) -> None:
        count = torch.tensor([float(logits.shape[0])], device=logits.device, dtype=logits.dtype)
        total = all_reduce_no_grad(torch.cat([logits.sum(0), count]))
        mean = total[:-1] / total[-1]
        self.centres[modality] = self.momentum * self.get(modality, logits) + (1 - self.momentum) * mean

    def state_dict(self) -> dict:
        return {m: c.detach().cpu().clone() for m, c in self.centres.items()}

    def load_state_dict(self, state: dict) -> None:
        self.centres = {m: c.clone() for m, c in state.items()}


@torch.no_grad()
def sinkhorn_targets(logits: torch.Tensor, epsilon: float, iterations: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp over the GLOBAL batch (all ranks' rows, equal local batches): targets
    whose rows sum to 1 and whose clusters share the global batch about equally (each cluster's
    column sums to about B/K), so no target assignment can collapse."""
    scaled = logits / epsilon
    q = torch.exp(scaled - all_reduce_no_grad(scaled.max(), "max")).t()    # [K, B_local]; shift cancels
    k, b = q.shape[0], q.shape[1] * get_world_size()
    tiny = torch.finfo(q.dtype).tiny
    q = q / all_reduce_no_grad(q.sum()).clamp_min(tiny)
    for _ in range(iterations):
        q = q / all_reduce_no_grad(q.sum(1, keepdim=True)).clamp_min(tiny) / k    # each cluster 1/K
        q = q / q.sum(0, keepdim=True).clamp_min(tiny) / b                        # each sample 1/B
    return (q * b).t()


def nclip_targets(logits: torch.Tensor, modality: str, teacher_temperature: float,
                  targets: NclipTargets = "sharpen", centre: TeacherCentre | None = None,
                  sinkhorn_iterations: int = 3) -> torch.Tensor:
    """The pseudo-labels q of one modality from its detached logits (see NCLIP_TARGETS)."""
    logits = logits.detach()
    if targets == "sharpen":
        return F.softmax(logits / teacher_temperature, dim=-1)
    if targets == "sinkhorn":
        return sinkhorn_targets(logits, teacher_temperature, sinkhorn_iterations)
    if targets == "centre":
        if centre is None:
            raise ValueError('nclip targets "centre" need a TeacherCentre (the objective keeps one)')
        q = F.softmax((logits - centre.get(modality, logits)) / teacher_temperature, dim=-1)
        centre.update(modality, logits)
        return q
    raise ValueError(f"nclip targets {targets!r}: choose one of {NCLIP_TARGETS}")


def nclip_loss(image_logits, text_logits, student_temperature: float = 0.1,
               teacher_temperature: float = 0.07, sharpness_weight: float = 0.25,
               smoothness_weight: float = 2.0, targets: NclipTargets = "sharpen",
               centre: TeacherCentre | None = None, sinkhorn_iterations: int = 3) -> dict:
    li, lt = _f32(image_logits), _f32(text_logits)
    log_p_image = F.log_softmax(li / student_temperature, dim=-1)
    log_p_text = F.log_softmax(lt / student_temperature, dim=-1)
    q_image = nclip_targets(li, "image", teacher_temperature, targets, centre, sinkhorn_iterations)
    q_text = nclip_targets(lt, "text", teacher_temperature, targets, centre, sinkhorn_iterations)
    pred = (-(q_text * log_p_image).sum(-1).mean() - (q_image * log_p_text).sum(-1).mean()) / 2
    p_image, p_text = log_p_image.exp(), log_p_text.exp()
    sample_entropy_image = -(p_image * log_p_image).sum(-1).mean()
    sample_entropy_text = -(p_text * log_p_text).sum(-1).mean()
    sharpness = (sample_entropy_image + sample_entropy_text) / 2
    batch_entropy_image, batch_entropy_text = _entropy_of_mean(p_image), _entropy_of_mean(p_text)
    batch_entropy = (batch_entropy_image + batch_entropy_text) / 2
    smoothness = -batch_entropy
    loss = pred + sharpness_weight * sharpness + smoothness_weight * smoothness
    hard_image, hard_text = li.argmax(-1), lt.argmax(-1)
    agree = (hard_image == hard_text).float().mean() * 100
    return {"nclip_loss": loss, "nclip_pred": pred.detach(), "nclip_sharpness": sharpness.detach(),
            "nclip_smoothness": smoothness.detach(), "nclip_batch_entropy": batch_entropy.detach(),
            "nclip_acc": agree,
            # monitoring (docs/NCLIP.md): per modality; the counts are this rank's argmax histogram
            "nclip_image_batch_entropy": batch_entropy_image.detach(),
            "nclip_text_batch_entropy": batch_entropy_text.detach(),
            "nclip_image_sample_entropy": sample_entropy_image.detach(),
            "nclip_text_sample_entropy": sample_entropy_text.detach(),
            CLUSTER_COUNTS["image"]: _histogram(hard_image, li.shape[-1]),
            CLUSTER_COUNTS["text"]: _histogram(hard_text, lt.shape[-1])}


def classification_loss(logits: torch.Tensor, target: torch.Tensor) -> dict:
    """Cross-entropy against soft targets (timm's SoftTargetCrossEntropy: smoothed, mixed labels) and
    train top-1 against each target's largest class (with mixup, the class holding most of the image)."""
    logits = _f32(logits)
    loss = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return {"cls_loss": loss, "train_acc": _accuracy(logits.detach(), target.argmax(-1))}


def _histogram(index: torch.Tensor, k: int) -> torch.Tensor:
    """Counts of each of k values; scatter-add, not bincount, which reads the maximum back to the host."""
    return torch.zeros(k, dtype=torch.int64, device=index.device).index_add_(0, index, torch.ones_like(index))


class Objective:
    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        # nCLIP's teacher centre is the one piece of objective state (checkpointed by the loop)
        self.centre = TeacherCentre(cfg.nclip_centre_momentum) if cfg.nclip_targets == "centre" else None

    def state_dict(self) -> dict:
        return {"nclip_centre": self.centre.state_dict()} if self.centre is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.centre is not None and "nclip_centre" in state:
            self.centre.load_state_dict(state["nclip_centre"])

    def __call__(self, out: dict) -> dict:
        # the similarity matmuls must not be downcast by an enclosing autocast
        device_type = next(iter(out.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._compute(out)

    # model outputs each part reads
    REQUIRED = {"clip": ("image_embed", "text_embed", "logit_scale"), "simclr": ("ssl_embed_1", "ssl_embed_2"),
                "nclip": ("image_cluster_logits", "text_cluster_logits"), "classify": ("logits", "target")}

    def _compute(self, out: dict) -> dict:
        cfg, name = self.cfg, self.cfg.name
        parts = OBJECTIVE_PARTS[name]
        missing = [k for part, keys in self.REQUIRED.items() if getattr(parts, part) for k in keys if k not in out]
        if missing:
            raise KeyError(f"objective {name!r} needs model outputs {missing}: build the model with "
                           f"build_model(cfg, {name!r})")
        terms: dict[str, torch.Tensor] = {}
        loss = 0.0
        # next to CLIP the SimCLR and nCLIP terms carry their weights (SLIP's ssl_scale, xCLIP's nclip_weight)
        if parts.clip:
            terms.update(clip_loss(out["image_embed"], out["text_embed"], out["logit_scale"],
                                   cfg.clip_gradient))
            terms["logit_scale"] = out["logit_scale"].detach()
            loss = loss + terms["clip_loss"]
        if parts.simclr:
            terms.update(simclr_loss(out["ssl_embed_1"], out["ssl_embed_2"], cfg.ssl_temperature))
            loss = loss + (cfg.ssl_scale if parts.clip else 1.0) * terms["ssl_loss"]
        if parts.nclip:
            terms.update(nclip_loss(out["image_cluster_logits"], out["text_cluster_logits"],
                                    cfg.nclip_student_temperature, cfg.nclip_teacher_temperature,
                                    cfg.nclip_sharpness_weight, cfg.nclip_smoothness_weight,
                                    cfg.nclip_targets, self.centre, cfg.nclip_sinkhorn_iterations))
            loss = loss + (cfg.nclip_weight if parts.clip else 1.0) * terms["nclip_loss"]
        if parts.classify:
            terms.update(classification_loss(out["logits"], out["target"]))
            loss = loss + terms["cls_loss"]
        result = {k: v.detach() for k, v in terms.items()}
        result["loss"] = loss
        return result


def build_objective(cfg: ObjectiveConfig) -> Objective:
    return Objective(cfg)
