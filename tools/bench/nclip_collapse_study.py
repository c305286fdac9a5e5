#!/usr/bin/env python
"""Does nCLIP collapse? Heads-only sweeps on frozen features, then finalists through the real trainer.

    python tools/bench/nclip_collapse_study.py heads   --out DIR [--demo DEMO_DIR] [--seeds 3] [--quick]
    python tools/bench/nclip_collapse_study.py trainer --out DIR --demo DEMO_DIR --setting TS,TT,WS,WM ...
    python tools/bench/nclip_collapse_study.py prototypes RUN/checkpoints/step_N.pt ...
    python tools/bench/nclip_collapse_study.py floor [--preset vit_tiny] [--steps 300]

`heads`: trains only the nCLIP heads (trainer/models.py NCLIPHead + shared Prototypes, loss
trainer/objectives.py nclip_loss) for a fixed number of steps in two setups, for every setting of
the grid and every seed, and measures the result on held-out pairs:
- "mlp": synthetic pairs (latent classes seen through two random non-linear maps), small MLP
  encoders trained with the heads, bottleneck 32, K = 512, batch 128, Adam lr 3e-3;
- "demo": frozen features of the demo data set (its shards' images and captions): the images as
  16 x 16 RGB pixels (centred), the captions through a randomly initialised vit_tiny text trunk
  (seed 0); heads of the vit_tiny preset (hidden 256, bottleneck 64, K = 1024), batch 64, AdamW
  lr 1e-3. Skipped when no demo build is given. `--demo-images vit` takes the image features from
  a randomly initialised vit_tiny image trunk instead (setup "demo_vit"; they carry less of the
  class: 1-NN class accuracy 19% against 40% for the pixels, chance 6%).
A setting is (student temperature, teacher temperature, sharpness weight, smoothness weight); K is
varied by `--k-factors` for the best settings only (see docs/NCLIP.md for the grid and its cuts).
The gate and the ranking are those docs/NCLIP.md states; `--gate-sample-entropy 1` applies the
amendment made there (the sample-entropy clause dropped).

`trainer`: runs trainer/run.py on the demo build (vit_tiny, CPU) for nCLIP and xCLIP with each given
setting and collects the cluster-usage metrics the loop logs and the final zero-shot / linear-probe
results. `--init-from CKPT` starts every run's towers (not its cluster heads) from a checkpoint,
e.g. a CLIP run on the same build: do the heads find confident clusters when the towers already
share what an image and its caption have in common? A setting with a sixth field `fixed` runs with
model.nclip_prototypes=fixed.

`prototypes`: the spectrum of the prototypes' covariance in trained checkpoints (a zero eigenvalue
is a direction in which every cluster scores alike). `floor`: how close to uniform an adversary can
push p with learned and with fixed prototypes (the sixth round in docs/NCLIP.md).

Measures (per modality, then the worse of image and text):
- usage_batch: distinct argmax clusters in a held-out batch of the training batch size, over
  min(K, batch), averaged over the held-out batches (what the trainer logs as *_clusters_batch);
- usage_all: distinct clusters over the whole held-out set, over min(K, held-out size);
- sample_entropy, batch_entropy: mean per-sample entropy of p and entropy of the batch-mean p, over ln K;
- agree: share of held-out pairs whose image and text fall in the same cluster;
- retrieval: class-level text retrieval top-1 with the score p_image . p_text (the probability that
  both land in the same cluster), against the held-out texts.
Results go to DIR/heads.json (every run) and DIR/heads.md (the table of settings, mean and worst
case over seeds and setups), DIR/trainer.json / trainer.md for the second stage.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trainer.models import ModelConfig, NCLIPHead, Prototypes  # noqa: E402
from trainer.objectives import NCLIP_TARGETS, ObjectiveConfig, TeacherCentre, nclip_loss  # noqa: E402


@dataclass(frozen=True)
class Setting:
    student_t: float
    teacher_t: float
    sharpness: float
    smoothness: float
    targets: str = "sharpen"      # objective.nclip_targets: sharpen | centre | sinkhorn
    prototypes: str = "learned"   # model.nclip_prototypes: learned | fixed (trainer stage only)

    @property
    def label(self) -> str:
        base = f"ts={self.student_t:g} tt={self.teacher_t:g} ws={self.sharpness:g} wm={self.smoothness:g}"
        base = base if self.targets == "sharpen" else f"{base} tg={self.targets}"
        return base if self.prototypes == "learned" else f"{base} pr={self.prototypes}"

    @classmethod
    def parse(cls, text: str) -> "Setting":
        """From "TS,TT,WS,WM[,TARGETS][,fixed]" or a label "ts=.. tt=.. ws=.. wm=..[ tg=..][ pr=fixed]". """
        ts, tt, ws, wm = (float(x) for x in re.findall(r"[-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?", text))
        named = [t for t in NCLIP_TARGETS if re.search(rf"\b{t}\b", text)]
        fixed = re.search(r"\bfixed\b", text) is not None
        return cls(ts, tt, ws, wm, named[0] if named else "sharpen", "fixed" if fixed else "learned")

    def overrides(self) -> list[str]:
        """The trainer's objective.* overrides for this setting."""
        return [f"objective.nclip_student_temperature={self.student_t}",
                f"objective.nclip_teacher_temperature={self.teacher_t}",
                f"objective.nclip_sharpness_weight={self.sharpness}",
                f"objective.nclip_smoothness_weight={self.smoothness}", f"objective.nclip_targets={self.targets}",
                f"model.nclip_prototypes={self.prototypes}"]


@dataclass(frozen=True)
class Setup:
    name: str
    k: int
    batch: int
    bottleneck: int
    hidden: int
    lr: float
    steps: int


# ----------------------------------------------------------------------------- data

@dataclass
class Pairs:
    image: torch.Tensor     # [N, D_image] encoder inputs or frozen features
    text: torch.Tensor      # [N, D_text]
    label: torch.Tensor     # [N] class (for retrieval); -1 unknown
    n_train: int = -1       # rows before this train, the rest are held out (-1: the setup's default split)

    def split(self, n_train: int) -> tuple["Pairs", "Pairs"]:
        a = Pairs(self.image[:n_train], self.text[:n_train], self.label[:n_train], n_train)
        b = Pairs(self.image[n_train:], self.text[n_train:], self.label[n_train:], 0)
        return a, b


def synthetic_pairs(n: int = 5120, classes: int = 64, latent: int = 16, seed: int = 1234) -> Pairs:
    """Latent class centres plus noise, seen through two fixed random non-linear maps (image 64-d,
    text 48-d) with independent noise: paired views that share the class and some detail."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, latent, generator=g)
    label = torch.randint(0, classes, (n,), generator=g)
    z = centres[label] + 0.5 * torch.randn(n, latent, generator=g)

    def view(dim: int) -> torch.Tensor:
        w1, w2 = torch.randn(latent, 96, generator=g) / latent ** 0.5, torch.randn(96, dim, generator=g) / 96 ** 0.5
        return torch.tanh(z @ w1) @ w2 + 0.3 * torch.randn(n, dim, generator=g)
    return Pairs(view(64), view(48), label)


COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "star", "triangle")


def caption_class(caption: str) -> int:
    words = set(re.findall(r"[a-z]+", caption.lower()))
    c = [i for i, w in enumerate(COLOURS) if w in words]
    s = [i for i, w in enumerate(SHAPES) if w in words]
    return c[0] * len(SHAPES) + s[0] if len(c) == 1 and len(s) == 1 else -1


def read_demo(demo: Path) -> tuple[list[bytes], list[str]]:
    """Every (jpg, caption) of the demo's shards, in shard order (read-only)."""
    manifest = json.loads((demo / "shards" / "manifest.json").read_text())
    root = Path(manifest.get("root") or demo / "shards")
    images, captions = [], []
    for shard in manifest["shards"]:
        with tarfile.open(root / shard["path"]) as tar:
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in tar.getmembers():
                key, _, ext = m.name.rpartition(".")
                members.setdefault(key, {})[ext] = m
            for key in sorted(members):
                parts = members[key]
                if "jpg" in parts and "txt" in parts:
                    images.append(tar.extractfile(parts["jpg"]).read())
                    captions.append(tar.extractfile(parts["txt"]).read().decode("utf-8"))
    return images, captions


@torch.no_grad()
def demo_features(demo: Path, cache: Path, images_as: str = "pixels") -> Pairs:
    """Frozen features of the demo pairs: captions through a randomly initialised vit_tiny text trunk
    (seed 0); images as centred 16 x 16 pixels, or ("vit") through the random vit_tiny image trunk."""
    cache = cache.with_name(f"{cache.stem}_{images_as}{cache.suffix}")
    if cache.exists():
        return Pairs(**torch.load(cache))
    from PIL import Image

    from pipeline.tokenizer import Tokenizer
    from trainer.models import TextTransformer, VisionTransformer
    images, captions = read_demo(demo)
    labels = [caption_class(c) for c in captions]
    n_train = -1
    held = demo / "eval" / "val_captions.jsonl"
    if held.exists():
        # the structure and groups designs (pattern x shape, colour a nuisance, noisy captions): the shards train,
        # the labelled held-out split (eval/val/<class>/*.jpg with its captions) measures
        classes = json.loads((demo / "eval" / "classnames.json").read_text())
        rows = [json.loads(line) for line in held.read_text().splitlines()]
        n_train = len(images)
        labels = [-1] * n_train + [classes.index(Path(r["file"]).parent.name) for r in rows]
        images += [(demo / "eval" / r["file"]).read_bytes() for r in rows]
        captions += [r["caption"] for r in rows]
    cfg = ModelConfig.preset("vit_tiny")
    torch.manual_seed(0)
    visual, text = VisionTransformer(cfg).eval(), TextTransformer(cfg).eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def pixels(jpg: bytes, size: int = cfg.image_size) -> torch.Tensor:
        img = Image.open(io.BytesIO(jpg)).convert("RGB").resize((size, size), Image.BILINEAR)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
        return (x.permute(2, 0, 1).float() / 255 - mean) / std

    tok = Tokenizer()
    feats_i, feats_t = [], []
    for s in range(0, len(images), 256):
        if images_as == "vit":
            feats_i.append(visual(torch.stack([pixels(j) for j in images[s:s + 256]])))
        else:
            feats_i.append(torch.stack([pixels(j, 16).flatten() for j in images[s:s + 256]]))
        feats_t.append(text(tok(captions[s:s + 256], context_length=cfg.context_length)))
    # a fixed shuffle, so the held-out split is not one shard's captions (within the training rows
    # only when the demo has its own held-out split)
    n = len(images) if n_train < 0 else n_train
    order = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(0)), torch.arange(n, len(images))])
    feats_i = torch.cat(feats_i)
    if images_as != "vit":
        feats_i = feats_i - feats_i[:n].mean(0)
    pairs = Pairs(feats_i[order], torch.cat(feats_t)[order], torch.tensor(labels)[order], n_train)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(asdict(pairs), cache)
    return pairs


SETUPS = {
    "mlp": Setup("mlp", k=512, batch=128, bottleneck=32, hidden=256, lr=3e-3, steps=300),
    "demo": Setup("demo", k=1024, batch=64, bottleneck=64, hidden=256, lr=1e-3, steps=300),
}
SETUPS["demo_vit"] = Setup(**{**asdict(SETUPS["demo"]), "name": "demo_vit"})


# ----------------------------------------------------------------------------- heads-only training

class Heads(nn.Module):
    """Per-modality (optional MLP encoder +) nCLIP head, prototypes shared by both modalities."""

    def __init__(self, d_image: int, d_text: int, setup: Setup, encoders: bool):
        super().__init__()
        def encoder(d):
            return nn.Sequential(nn.Linear(d, 128), nn.GELU(), nn.Linear(128, 128)) if encoders else nn.Identity()
        width_i, width_t = (128, 128) if encoders else (d_image, d_text)
        self.enc_i, self.enc_t = encoder(d_image), encoder(d_text)
        self.head_i = NCLIPHead(width_i, setup.hidden, setup.bottleneck)
        self.head_t = NCLIPHead(width_t, setup.hidden, setup.bottleneck)
        self.protos = Prototypes(setup.bottleneck, setup.k)

    def forward(self, image, text):
        return self.protos(self.head_i(self.enc_i(image))), self.protos(self.head_t(self.enc_t(text)))


def train_heads(pairs: Pairs, setup: Setup, setting: Setting, seed: int, encoders: bool) -> Heads:
    torch.manual_seed(seed)
    model = Heads(pairs.image.shape[1], pairs.text.shape[1], setup, encoders)
    opt = (torch.optim.Adam(model.parameters(), lr=setup.lr) if encoders
           else torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=0.0))
    g = torch.Generator().manual_seed(seed)
    centre = TeacherCentre() if setting.targets == "centre" else None
    for _ in range(setup.steps):
        idx = torch.randint(0, len(pairs.label), (setup.batch,), generator=g)
        li, lt = model(pairs.image[idx], pairs.text[idx])
        loss = nclip_loss(li, lt, setting.student_t, setting.teacher_t, setting.sharpness, setting.smoothness,
                          setting.targets, centre)
        opt.zero_grad(set_to_none=True)
        loss["nclip_loss"].backward()
        opt.step()
    return model


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


@torch.no_grad()
def measure(model: Heads, held: Pairs, setup: Setup, student_t: float) -> dict[str, float]:
    """The measures of the module docstring on held-out pairs."""
    li, lt = model(held.image, held.text)
    k, b, n = setup.k, setup.batch, len(held.label)
    ln_k = math.log(k)
    out: dict[str, float] = {}
    per_mod = {}
    for mod, logits in (("image", li), ("text", lt)):
        p = torch.softmax(logits / student_t, -1)
        hard = logits.argmax(-1)
        batches = [slice(s, s + b) for s in range(0, n - b + 1, b)]
        per_mod[mod] = {
            "usage_batch": sum(hard[s].unique().numel() for s in batches) / len(batches) / min(k, b),
            "usage_all": hard.unique().numel() / min(k, n),
            "sample_entropy": float(_entropy(p).mean()) / ln_k,
            "batch_entropy": sum(float(_entropy(p[s].mean(0))) for s in batches) / len(batches) / ln_k,
        }
        out[f"{mod}_p"], out[f"{mod}_hard"] = p, hard
    pi, pt = out.pop("image_p"), out.pop("text_p")
    agree = float((out.pop("image_hard") == out.pop("text_hard")).float().mean())
    known = held.label >= 0
    score = pi[known] @ pt[known].t()
    retrieval = float((held.label[known][score.argmax(-1)] == held.label[known]).float().mean())
    result = {m: min(per_mod["image"][m], per_mod["text"][m]) for m in ("usage_batch", "usage_all")}
    result["sample_entropy"] = max(per_mod["image"]["sample_entropy"], per_mod["text"]["sample_entropy"])
    result["batch_entropy"] = min(per_mod["image"]["batch_entropy"], per_mod["text"]["batch_entropy"])
    result.update(agree=agree, retrieval=retrieval)
    return result


# ----------------------------------------------------------------------------- the grid and the criterion

TEMPERATURES = ((0.1, 0.04), (0.1, 0.07), (0.2, 0.05))
SHARPNESS = (0.0, 0.25, 0.5, 1.0)
SMOOTHNESS = (1.0, 2.0)
DEFAULT = Setting(0.1, 0.04, 1.0, 1.0)     # the defaults the first round questioned
CURRENT = Setting(0.1, 0.07, 0.25, 2.0)    # the defaults the first round chose (reference of the second)
# second round (docs/NCLIP.md, "Second round"): the new target makers without extra terms
# (DINO / SwAV), with sharpness only, with the current weights; two student and two teacher
# temperatures (for "sinkhorn" the teacher temperature is SwAV's epsilon); plus the current defaults
TARGETS_GRID = [Setting(ts, tt, ws, wm, tg) for tg in ("centre", "sinkhorn") for ts in (0.1, 0.05)
                for tt in (0.04, 0.07) for ws, wm in ((0.0, 0.0), (0.25, 0.0), (0.25, 2.0))] + [CURRENT]
GATE_USAGE = 0.30                          # worst case usage_batch (docs/NCLIP.md: the criterion)
GATE_SAMPLE_ENTROPY = 0.5                  # worst case sample_entropy / ln K
TIE = 0.02                                 # retrieval within this of the best counts as a tie


def grid() -> list[Setting]:
    return [Setting(ts, tt, ws, wm) for (ts, tt), ws, wm in itertools.product(TEMPERATURES, SHARPNESS, SMOOTHNESS)]


def changes_from_default(s: Setting, reference: Setting = DEFAULT) -> int:
    return sum(a != b for a, b in zip(asdict(s).values(), asdict(reference).values()))


def summarise(runs: list[dict], gate_sample_entropy: float = GATE_SAMPLE_ENTROPY) -> list[dict]:
    """One row per (setting, K factor): means and worst cases over seeds and setups, gate and rank key."""
    rows: dict[tuple, dict] = {}
    for r in runs:
        key = (r["setting"], r["k_factor"])
        rows.setdefault(key, {"setting": r["setting"], "k_factor": r["k_factor"], "runs": []})["runs"].append(r)
    table = []
    for row in rows.values():
        rs = row.pop("runs")
        setups = sorted({r["setup"] for r in rs})
        for m in ("usage_batch", "usage_all", "sample_entropy", "batch_entropy", "agree", "retrieval"):
            for s in setups:
                vals = [r[m] for r in rs if r["setup"] == s]
                row[f"{s}_{m}"] = sum(vals) / len(vals)
        row["worst_usage_batch"] = min(r["usage_batch"] for r in rs)
        row["worst_sample_entropy"] = max(r["sample_entropy"] for r in rs)
        row["worst_retrieval"] = min(row[f"{s}_retrieval"] for s in setups)   # min over setups of the seed mean
        row["gate_usage"] = row["worst_usage_batch"] >= GATE_USAGE
        row["gate"] = row["gate_usage"] and row["worst_sample_entropy"] <= gate_sample_entropy
        row["seeds"] = len(rs) // len(setups)
        table.append(row)
    return table


def ranked(table: list[dict], reference: Setting = DEFAULT) -> list[dict]:
    """Gated rows first, by worst-case retrieval; within TIE of the best the fewest changes from the
    defaults, then the higher worst-case usage."""
    passed = sorted((r for r in table if r["gate"]), key=lambda r: -r["worst_retrieval"])
    if not passed:
        return []
    best = passed[0]["worst_retrieval"]
    def key(r):
        tied = r["worst_retrieval"] >= best - TIE
        return (not tied, changes_from_default(Setting.parse(r["setting"]), reference) if tied else 0,
                -r["worst_retrieval"] if not tied else -r["worst_usage_batch"])
    return sorted(passed, key=key)


def markdown(table: list[dict], setups: list[str]) -> str:
    cols = ["setting", "K x", "usage gate", "gate"] + [f"{s} {m}" for s in setups
                                         for m in ("usage_batch", "usage_all", "sample_H", "batch_H", "agree", "R@1")]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in sorted(table, key=lambda r: (not r["gate"], -r["worst_retrieval"])):
        cells = [r["setting"], str(r["k_factor"]), "pass" if r["gate_usage"] else "fail",
                 "pass" if r["gate"] else "fail"]
        for s in setups:
            cells += [f"{r[f'{s}_{m}']:.2f}" for m in ("usage_batch", "usage_all", "sample_entropy",
                                                       "batch_entropy", "agree", "retrieval")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def all_runs(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def run_heads(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    data = {"mlp": (synthetic_pairs(), True)}
    if args.demo and (Path(args.demo) / "shards" / "manifest.json").exists():
        name = "demo_vit" if args.demo_images == "vit" else "demo"
        data[name] = (demo_features(Path(args.demo), out / "demo_features.pt", args.demo_images), False)
    else:
        print("no demo build given or found: the demo setup is skipped", file=sys.stderr)
    results_path = out / "heads.json"
    runs = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["setting"], r["k_factor"], r["setup"], r["seed"]) for r in runs}

    def sweep(settings: list[Setting], k_factor: int) -> None:
        for setting, seed, name in itertools.product(settings, range(args.seeds), data):
            if (setting.label, k_factor, name, seed) in done:
                continue
            pairs, encoders = data[name]
            base = SETUPS[name]
            setup = Setup(**{**asdict(base), "k": base.k * k_factor,
                             "steps": base.steps // 3 if args.quick else base.steps})
            train, held = pairs.split(len(pairs.label) - 1024 if name == "mlp" else
                                      pairs.n_train if pairs.n_train > 0 else len(pairs.label) * 3 // 4)
            t0 = time.perf_counter()
            model = train_heads(train, setup, setting, seed, encoders)
            r = {"setting": setting.label, "k_factor": k_factor, "setup": name, "seed": seed,
                 **measure(model, held, setup, setting.student_t), "seconds": time.perf_counter() - t0}
            runs.append(r)
            results_path.write_text(json.dumps(runs, indent=1))
            print(f"{name:5s} K={setup.k:5d} seed {seed} {setting.label}: usage_batch {r['usage_batch']:.2f} "
                  f"sample_H {r['sample_entropy']:.2f} R@1 {r['retrieval']:.2f} ({r['seconds']:.1f}s)", flush=True)

    settings, reference = (TARGETS_GRID, CURRENT) if args.grid == "targets" else (grid(), DEFAULT)
    sweep(settings, 1)
    gate_h = args.gate_sample_entropy
    labels = {s.label for s in settings}
    first = [r for r in runs if r["setting"] in labels and r["k_factor"] == 1]      # this grid's runs only
    top = [Setting.parse(r["setting"]) for r in ranked(summarise(first, gate_h), reference)[:args.k_top]]
    if reference not in top:
        top.append(reference)
    for factor in args.k_factors:
        sweep(top, factor)
    table = summarise([r for r in all_runs(results_path) if r["setting"] in labels], gate_h)
    (out / "heads.md").write_text(markdown(table, list(data)))
    order = ranked(table, reference)
    print("\nranked (gate passed):")
    for r in order[:10]:
        print(f"  {r['setting']} K x{r['k_factor']}: worst R@1 {r['worst_retrieval']:.3f} "
              f"worst usage {r['worst_usage_batch']:.2f} worst sample_H {r['worst_sample_entropy']:.2f}")
    (out / "heads_ranked.json").write_text(json.dumps(order, indent=1))
    return 0


# ----------------------------------------------------------------------------- the real trainer

def run_trainer(args) -> int:
    out = Path(args.out)
    # absolute: the trainer runs with cwd=ROOT, so a path relative to the caller's directory would miss
    demo = Path(args.demo).resolve()
    init_from = str(Path(args.init_from).resolve()) if args.init_from else ""
    runs = []
    results_path = out / "trainer.json"
    if results_path.exists():
        runs = json.loads(results_path.read_text())
    # records from before init_from was resolved hold it as typed (relative to the caller's directory)
    done = {(r["setting"], r["objective"], r["seed"], str(Path(r["init_from"]).resolve()) if r.get("init_from") else "")
            for r in runs}
    # seed by seed, every setting each time: a stage cut short still compares all settings on the same seeds
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed, text, objective in itertools.product(seeds, args.setting, args.objectives):
        s = Setting.parse(text)
        if (s.label, objective, seed, init_from) in done:
            continue
        start = f"_from_{Path(init_from).stem}" if init_from else ""
        run_dir = out / "runs" / f"{objective}_{text.replace(',', '_')}_s{seed}{start}"
        # the demo's SLIP config (its tower: conv stem, ln_pre) with the objective swapped, no SSL views
        cmd = [sys.executable, str(ROOT / "trainer" / "run.py"), "--config", str(ROOT / "trainer/configs" / args.config),
               "--overwrite", "--resume", "none", f"out_dir={run_dir}", f"objective.name={objective}", f"train.seed={seed}",
               *s.overrides(), "data.recipe.num_ssl_views=0",
               f"data.manifest={demo / 'shards' / 'manifest.json'}", f"eval.data={demo / 'eval'}",
               f"optim.epochs={args.epochs}", *([f"optim.lr={args.lr}"] if args.lr else []),
               f"data.batch_size={args.batch}", f"train.log_every={args.log_every}",
               f"train.torch_threads={args.threads}", "data.num_threads=1", "checkpoint.every_steps=0",
               "eval.tasks=[zeroshot,linear_probe]", *([f"model.init_from={init_from}"] if init_from else [])]
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "event" not in r and "nclip_image_clusters_batch" in r]
        last = steps[-max(1, len(steps) // 5):]        # the last fifth of the logged steps
        r = {"setting": s.label, "objective": objective, "seed": seed, "seconds": time.perf_counter() - t0,
             "steps": steps[-1]["step"], "init_from": init_from, "usage_warnings": [e["message"] for e in recs if e.get("event") == "nclip_usage"],
             "uniform_warnings": [{"step": e["step"], "modality": e.get("modality"), "kl": e.get("kl")}
                                  for e in recs if e.get("event") == "nclip_uniform"]}
        for key in ("clusters_batch", "clusters_window", "batch_entropy", "sample_entropy"):
            for mod in ("image", "text"):
                name = f"nclip_{mod}_{key}"
                r[name] = sum(x[name] for x in last) / len(last)
                r[f"{name}_min"] = min(x[name] for x in steps)
        r["usage_fraction"] = min(sum(x[f"nclip_{m}_clusters_batch"] for x in last) / len(last)
                                  for m in ("image", "text")) / min(s_k(args), args.batch)
        # the gate's second clause in the trainer: the worse modality's sample entropy over ln K
        r["sample_entropy_fraction"] = max(r[f"nclip_{m}_sample_entropy"] for m in ("image", "text")) / math.log(s_k(args))
        r["confirmed"] = r["usage_fraction"] >= GATE_USAGE and r["sample_entropy_fraction"] <= GATE_SAMPLE_ENTROPY
        evals = [x for x in recs if "event" not in x and any(k.startswith("eval/") for k in x)]
        if evals:
            r["eval"] = {k: v for k, v in evals[-1].items() if k.startswith("eval/")}
        runs.append(r)
        results_path.write_text(json.dumps(runs, indent=1))
        print(json.dumps(r), flush=True)
    (out / "trainer.md").write_text(trainer_markdown(runs) + "\n" + trainer_summary(runs))
    return 0


def s_k(args) -> int:
    return ModelConfig.preset("vit_tiny").nclip_clusters


def _top1(r: dict, task: str) -> float:
    return next((v for k, v in r.get("eval", {}).items() if task in k and "top1" in k), float("nan"))


def trainer_summary(runs: list[dict]) -> str:
    """Per setting and objective over seeds: mean usage and sample entropy fraction, whether every
    seed passes the full gate, mean zero-shot and probe top-1."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["setting"], r["objective"], r.get("init_from", "")), []).append(r)
    cols = ["setting", "objective", "towers from", "seeds", "usage (mean; min)", "sample H / ln K (mean; max)",
            "gate in every seed", "zero-shot top-1 (mean)", "probe top-1 (mean)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for (setting, objective, init_from), rs in groups.items():
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        u, h = [r["usage_fraction"] for r in rs], [r.get("sample_entropy_fraction", float("nan")) for r in rs]
        lines.append("| " + " | ".join([setting, objective, Path(init_from).name if init_from else "scratch", str(len(rs)), f"{mean(u):.2f}; {min(u):.2f}",
                                         f"{mean(h):.2f}; {max(h):.2f}", "yes" if all(r.get("confirmed") for r in rs) else "no",
                                         f"{mean([_top1(r, 'zeroshot') for r in rs]):.3f}",
                                         f"{mean([_top1(r, 'probe') for r in rs]):.3f}"]) + " |")
    return "\n".join(lines) + "\n"


def _warning_step(w) -> int:
    # rounds before the warnings were stored as dicts kept them as "step N: message"
    return w["step"] if isinstance(w, dict) else int(w.split(":")[0].split()[1])


def trainer_markdown(runs: list[dict]) -> str:
    cols = ["setting", "objective", "seed", "usage (last fifth)", "sample H / ln K", "img clusters batch", "txt clusters batch",
            "img clusters window", "img batch H", "img sample H", "txt sample H", "KL to uniform (nats)",
            "near-uniform warning", "zero-shot top-1", "probe top-1"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    ln_k = math.log(ModelConfig.preset("vit_tiny").nclip_clusters)
    for r in runs:
        # the worse modality's mean per-sample KL(p || uniform) over the last fifth: what nclip_min_kl watches
        kl = ln_k - max(r["nclip_image_sample_entropy"], r["nclip_text_sample_entropy"])
        warned = r.get("uniform_warnings")
        first = min(_warning_step(w) for w in warned) if warned else None
        zs, pr = _top1(r, "zeroshot"), _top1(r, "probe")
        lines.append("| " + " | ".join([r["setting"], r["objective"], str(r["seed"]), f"{r['usage_fraction']:.2f}",
                                         f"{r.get('sample_entropy_fraction', float('nan')):.2f}",
                                         f"{r['nclip_image_clusters_batch']:.1f}", f"{r['nclip_text_clusters_batch']:.1f}",
                                         f"{r['nclip_image_clusters_window']:.1f}", f"{r['nclip_image_batch_entropy']:.2f}",
                                         f"{r['nclip_image_sample_entropy']:.2f}", f"{r['nclip_text_sample_entropy']:.2f}",
                                         f"{kl:.4f}", "n/a" if warned is None else (f"step {first}" if warned else "no"),
                                         f"{zs:.3f}", f"{pr:.3f}"]) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the prototypes (sixth round)

def prototype_spectrum(weight: torch.Tensor) -> dict[str, float]:
    """Eigenvalues of the unit prototypes' covariance across clusters: a sample's logit spread is
    z^T C z / tau^2, so an eigenvalue at 0 is a direction where every cluster scores alike."""
    unit = F.normalize(weight.detach().float(), dim=-1)
    centred = unit - unit.mean(0)
    ev = torch.linalg.eigvalsh(centred.T @ centred / unit.shape[0])
    return {"lambda_min": ev[0].item(), "lambda_next": ev[1].item(), "lambda_max": ev[-1].item(),
            "effective_rank": (ev.sum() ** 2 / (ev ** 2).sum()).item(), "mean_norm": unit.mean(0).norm().item()}


def flattest_reachable(preset: str, prototypes: str, steps: int = 300, n: int = 64, seed: int = 0) -> dict[str, float]:
    """An adversary: n free bottleneck vectors, plus the prototypes where the model trains them
    (model.nclip_prototypes), trained with Adam only to flatten p. Returns the lowest mean KL(p || uniform)
    it reaches and the prototypes' spectrum at the end."""
    from trainer.models import build_model
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset, nclip_prototypes=prototypes)
    protos = build_model(cfg, "nclip").prototypes
    tau = ObjectiveConfig().nclip_student_temperature
    z = torch.randn(n, cfg.nclip_bottleneck_dim, requires_grad=True)
    opt = torch.optim.Adam([z, *(p for p in protos.parameters() if p.requires_grad)], lr=0.05)
    for _ in range(steps):
        kl = math.log(cfg.nclip_clusters) - _entropy(torch.softmax(protos(F.normalize(z, dim=-1)) / tau, -1)).mean()
        opt.zero_grad()
        kl.backward()
        opt.step()
    floor = (1 - math.sqrt(cfg.nclip_bottleneck_dim / cfg.nclip_clusters)) ** 2 / cfg.nclip_bottleneck_dim / (2 * tau ** 2)
    return {"kl": kl.item(), "formula_floor": floor, **prototype_spectrum(protos.weight)}


def run_prototypes(args) -> int:
    for path in args.checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        print(json.dumps({"checkpoint": path, **prototype_spectrum(state["prototypes.weight"])}), flush=True)
    return 0


def run_floor(args) -> int:
    torch.set_num_threads(args.threads)
    for mode in ("learned", "fixed"):
        print(json.dumps({"preset": args.preset, "prototypes": mode, "steps": args.steps,
                          **flattest_reachable(args.preset, mode, args.steps)}), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    h = sub.add_parser("heads", help="heads-only sweep on frozen features")
    h.add_argument("--out", required=True)
    h.add_argument("--demo", help="a demo build (tools/build_yfcc15m.py --demo): its shards give the demo setup")
    h.add_argument("--demo-images", choices=("pixels", "vit"), default="pixels",
                   help="demo image features: 16 x 16 pixels (setup demo) or a random vit_tiny trunk (demo_vit)")
    h.add_argument("--seeds", type=int, default=3)
    h.add_argument("--k-factors", type=int, nargs="*", default=[4], help="K multipliers tried on the best settings")
    h.add_argument("--k-top", type=int, default=3, help="how many of the best settings the K sweep tries")
    h.add_argument("--threads", type=int, default=1)
    h.add_argument("--quick", action="store_true", help="a third of the steps (a smoke run, not a result)")
    h.add_argument("--grid", choices=("weights", "targets"), default="weights",
                   help="weights: the first round's grid; targets: the second round's (centre / sinkhorn)")
    h.add_argument("--gate-sample-entropy", type=float, default=GATE_SAMPLE_ENTROPY,
                   help="the gate's bound on the worst sample entropy / ln K (1 turns that clause off)")
    t = sub.add_parser("trainer", help="finalists through trainer/run.py on the demo build")
    t.add_argument("--out", required=True)
    t.add_argument("--demo", required=True)
    t.add_argument("--setting", nargs="+", required=True, help="TS,TT,WS,WM (student, teacher temperature, weights)")
    t.add_argument("--objectives", nargs="+", default=["nclip", "xclip"])
    t.add_argument("--seeds", type=int, default=1, help="how many training seeds")
    t.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--lr", type=float, help="optim.lr (the CI demo preset: 1e-3); default: the config's")
    t.add_argument("--config", default="demo_slip.yaml", help="under trainer/configs (the first round: demo_clip.yaml)")
    t.add_argument("--init-from", help="model.init_from: start the towers from this checkpoint (the fourth round: "
                   "a CLIP run on the same build); the cluster heads start fresh only when the checkpoint has none")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--log-every", type=int, default=5)
    t.add_argument("--threads", type=int, default=1)
    pr = sub.add_parser("prototypes", help="the prototypes' spectrum in trained checkpoints (sixth round)")
    pr.add_argument("checkpoints", nargs="+")
    f = sub.add_parser("floor", help="how flat an adversary can make p, learned against fixed prototypes")
    f.add_argument("--preset", default="vit_tiny")
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    return {"heads": run_heads, "trainer": run_trainer, "prototypes": run_prototypes, "floor": run_floor}[a.stage](a)


if __name__ == "__main__":
    sys.exit(main())
