"""Evaluation of an image/text model: zero-shot classification, linear probe, image-text retrieval.

Protocols (SPEC section 1, as in the SLIP reference and OpenCLIP):
- Zero-shot: per class, encode every prompt template, L2-normalise each, average, renormalise; an
  image is classified by cosine similarity with these class embeddings. Top-1, top-5 and mean
  per-class accuracy.
- Linear probe on the frozen pooled trunk feature (`model.visual_features`). Two solvers:
  "lbfgs" (default; full-batch multinomial logistic regression with an L2 penalty picked on a
  validation fold of the training features, as the CLIP paper's probe) for small sets, and "sgd"
  (the reference recipe: SGD momentum 0.9, weight decay 0, cosine schedule, `epochs` epochs) on
  cached features (the reference's RandomResizedCrop+flip feature augmentation is not applied).
- Retrieval: recall@1/5/10 image->text and text->image on held-out (image, caption) pairs; an image
  counts as retrieved for a caption if it is the caption's own image, and vice versa (an image may
  have several captions).

Data: an ImageFolder-style directory (`<root>/<class name>/*.jpg`; class order from a
`classnames.json` in the root or its parent, else sorted directory names), or webdataset tar shards
whose samples carry an image (`jpg`/`jpeg`/`png`/`webp`) and an integer label (`cls`). The demo's
held-out split (docs/ARCHITECTURE.md "Demo data") is `<dir>/{train,val}/...` plus `classnames.json`,
`templates.json` and `val_captions.jsonl`; `Evaluator` understands that layout directly.

Images that cannot be read (missing, truncated, not an image) are counted, named in the results
(`bad_images`) and skipped; evaluation continues on the rest.
"""
from __future__ import annotations

import glob
import io
import json
import math
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

DATA_DIR = Path(__file__).resolve().parent / "data"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TASKS = ("zeroshot", "linear_probe", "retrieval")


def imagenet_classnames() -> list[str]:
    """The 1000 CLIP ImageNet class names (OpenAI CLIP / OpenCLIP list)."""
    return json.loads((DATA_DIR / "imagenet_classnames.json").read_text())


def imagenet_templates() -> list[str]:
    """The 7-template ImageNet prompt ensemble used by SLIP (SPEC section 1)."""
    return json.loads((DATA_DIR / "imagenet_templates.json").read_text())


# ============================================================================ configuration

@dataclass
class LinearProbeConfig:
    solver: str = "lbfgs"              # "lbfgs" (small sets, fast) | "sgd" (reference recipe)
    # lbfgs: L2 penalties tried on a validation fold of the training features; the best is refit on all
    l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    val_fraction: float = 0.2
    max_iter: int = 100
    # sgd (reference): momentum 0.9, weight decay 0, cosine to 0 over `epochs`
    epochs: int = 90
    lr: float = 0.1                    # for batch_size 256; scaled linearly with the batch size
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0


@dataclass
class EvaluationConfig:
    data: str = ""                     # eval dir (demo layout or ImageFolder) or a shard glob/dir
    tasks: tuple[str, ...] = TASKS     # tasks whose data is absent are skipped (and say so)
    batch_size: int = 64
    image_size: int = 224
    resize: int | None = None          # short side before the centre crop; None = image_size
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    classnames: str | None = None      # json list; None = classnames.json in the data dir, else dirs
    templates: str | None = None       # json list with "{}"; None = templates.json in the data dir, else ImageNet 7
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    progress: bool = True

    def __post_init__(self):
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown evaluation tasks {sorted(unknown)}; choose from {TASKS}")


# ============================================================================ images

class EvalTransform:
    """Resize(short side) + CenterCrop + normalise, with PIL (the reference's evaluation transform)."""

    def __init__(self, image_size: int, resize: int | None, mean: Sequence[float], std: Sequence[float]):
        self.size, self.resize = image_size, resize or image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        w, h = img.size
        scale = self.resize / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std


@dataclass
class BadImages:
    """Images that could not be read: counted and named, never fatal."""
    items: list[str] = field(default_factory=list)

    def add(self, name: str, err: BaseException) -> None:
        self.items.append(f"{name}: {type(err).__name__}: {err}")

    def as_dict(self) -> dict:
        return {"count": len(self.items), "files": self.items}


def _decode(data: bytes | None, path: str | Path | None) -> Image.Image:
    img = Image.open(io.BytesIO(data) if data is not None else path)
    img.load()  # force the full decode here so truncated files fail now
    return img


# ============================================================================ data sets

@dataclass
class Sample:
    name: str                          # file path or shard:key, for reports
    label: int
    path: Path | None = None
    data: bytes | None = None


def _read_json_list(path: Path, what: str) -> list[str]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from e
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path}: {what} must be a JSON list of strings")
    return value


def find_classnames(root: Path, explicit: str | None = None) -> list[str] | None:
    """classnames.json given explicitly, or in `root` or its parent (demo layout), else None."""
    if explicit:
        return _read_json_list(Path(explicit), "class names")
    for cand in (root / "classnames.json", root.parent / "classnames.json"):
        if cand.is_file():
            return _read_json_list(cand, "class names")
    return None


def image_folder(root: str | Path, classnames: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Samples of `<root>/<class dir>/<image>`; labels index `classnames` (default: sorted dir names)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such evaluation directory")
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classnames is None:
        classnames = dirs
    index = {c: i for i, c in enumerate(classnames)}
    unknown = [d for d in dirs if d not in index]
    if unknown:
        raise ValueError(f"{root}: class directories not in classnames.json: {unknown[:5]}")
    samples = [Sample(str(p), index[d], path=p) for d in dirs for p in sorted((root / d).iterdir())
               if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise ValueError(f"{root}: no images found (expected <root>/<class name>/*.jpg)")
    return samples, classnames


def shard_paths(spec: str | Path) -> list[Path]:
    """A directory of .tar shards, a glob, or a single tar."""
    p = Path(spec)
    if p.is_dir():
        paths = sorted(p.glob("*.tar"))
    else:
        paths = sorted(Path(x) for x in glob.glob(str(spec)))
    if not paths:
        raise FileNotFoundError(f"{spec}: no .tar shards found")
    return paths


def webdataset_samples(paths: Sequence[Path], bad: BadImages) -> list[Sample]:
    """Labelled samples (image bytes + `cls`) from webdataset tars. Samples without a readable label
    or image are reported in `bad` and skipped; a truncated tar keeps the samples read before the damage."""
    samples: list[Sample] = []
    for path in paths:
        groups: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    prefix = m.name[: len(m.name) - len(base)]
                    groups.setdefault(prefix + key, {})[ext.lower()] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            bad.add(str(path), e)
        for key, parts in groups.items():
            name = f"{path}:{key}"
            img = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
            try:
                if img is None:
                    raise ValueError("sample has no image")
                if "cls" not in parts:
                    raise ValueError("sample has no cls label")
                label = int(parts["cls"].decode().strip())
            except (ValueError, UnicodeDecodeError) as e:
                bad.add(name, e)
                continue
            samples.append(Sample(name, label, data=img))
    return samples


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, samples: Sequence[Sample], transform: EvalTransform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        try:
            return self.transform(_decode(s.data, s.path)), s.label, i, None
        except Exception as e:  # any decoding failure: report, skip, continue
            return None, s.label, i, f"{s.name}: {type(e).__name__}: {e}"


def _collate(items):
    return items


def iterate_images(samples: Sequence[Sample], transform: EvalTransform, batch_size: int, bad: BadImages,
                   desc: str = "images", progress: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Batches (images, labels, sample indices) of the readable samples; unreadable ones go to `bad`."""
    loader = torch.utils.data.DataLoader(_ImageDataset(samples, transform), batch_size=batch_size,
                                         shuffle=False, collate_fn=_collate)
    with tqdm(total=len(samples), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for items in loader:
            good = [it for it in items if it[0] is not None]
            for it in items:
                if it[0] is None:
                    bad.items.append(it[3])
            bar.update(len(items))
            if good:
                yield (torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]),
                       [g[2] for g in good])


# ============================================================================ features

def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(model, samples: Sequence[Sample], transform: EvalTransform, batch_size: int,
                     bad: BadImages, embeddings: bool = True, trunk: bool = False,
                     desc: str = "features", progress: bool = True) -> dict:
    """Run the frozen model over `samples`: `image_embed` (encode_image, normalised), `features`
    (visual_features), `labels`, `index` (positions in `samples` of the readable images)."""
    device = _model_device(model)
    out: dict[str, list] = {"image_embed": [], "features": [], "labels": [], "index": []}
    for images, labels, idx in iterate_images(samples, transform, batch_size, bad, desc, progress):
        images = images.to(device)
        if embeddings:
            out["image_embed"].append(model.encode_image(images, normalize=True).float().cpu())
        if trunk:
            out["features"].append(model.visual_features(images).float().cpu())
        out["labels"].append(labels)
        out["index"] += idx
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return {"image_embed": cat(out["image_embed"]), "features": cat(out["features"]),
            "labels": cat(out["labels"]) if out["labels"] else torch.zeros(0, dtype=torch.long),
            "index": out["index"]}


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    device = _model_device(model)
    parts = [model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device), normalize=True).float().cpu()
             for i in range(0, len(texts), batch_size)]
    return torch.cat(parts)


# ============================================================================ zero-shot

@torch.no_grad()
def zero_shot_classifier(model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C, D] class embeddings: per class, every template encoded and normalised, averaged, renormalised."""
    if not templates or not all("{}" in t for t in templates):
        raise ValueError("zero-shot templates must be a non-empty list of strings containing '{}'")
    texts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, texts).view(len(classnames), len(templates), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top-1, top-5 (top-k for fewer classes) and mean per-class accuracy, in percent."""
    n = len(labels)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "mean_per_class": float("nan"), "num_images": 0}
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    correct1 = topk[:, 0] == labels
    correct5 = (topk == labels[:, None]).any(dim=1)
    per_class = [correct1[labels == c].float().mean().item() for c in range(num_classes) if (labels == c).any()]
    return {"top1": 100.0 * correct1.float().mean().item(), "top5": 100.0 * correct5.float().mean().item(),
            "mean_per_class": 100.0 * float(np.mean(per_class)), "num_images": n}


def zero_shot_accuracy(image_embed: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> dict:
    logits = image_embed @ classifier.T
    m = classification_metrics(logits, labels, classifier.shape[0])
    m["num_classes"] = classifier.shape[0]
    m["chance_top1"] = 100.0 / classifier.shape[0]
    return m


# ============================================================================ linear probe

def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _fit_lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int,
               init: torch.nn.Linear | None = None) -> torch.nn.Linear:
    """Multinomial logistic regression, full batch: mean cross-entropy + l2/2 * ||W||^2.
    `init` warm-starts from a neighbouring penalty's solution (the grid is walked strong -> weak)."""
    clf = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        clf.weight.copy_(init.weight if init is not None else torch.zeros_like(clf.weight))
        clf.bias.copy_(init.bias if init is not None else torch.zeros_like(clf.bias))
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=max_iter, history_size=10,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + 0.5 * l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def _fit_sgd(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: LinearProbeConfig) -> torch.nn.Linear:
    """The reference probe recipe on cached features: SGD momentum, wd, per-iteration cosine."""
    g = torch.Generator().manual_seed(cfg.seed)
    clf = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.normal_(clf.weight, std=0.01, generator=g)
    torch.nn.init.zeros_(clf.bias)
    lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return clf


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, cfg: LinearProbeConfig = LinearProbeConfig()) -> dict:
    """Train a linear classifier on frozen train features, report accuracy on test features."""
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("linear probe needs readable images in both the train and the test split")
    train_x, test_x = _standardise(train_x.float(), test_x.float())
    result: dict = {"solver": cfg.solver, "num_train": len(train_x)}
    with torch.enable_grad(), torch.autocast(train_x.device.type, enabled=False):
        if cfg.solver == "lbfgs":
            g = torch.Generator().manual_seed(cfg.seed)
            perm = torch.randperm(len(train_x), generator=g)
            n_val = int(len(train_x) * cfg.val_fraction)
            best_l2, fits = cfg.l2_grid[0], {}
            if n_val > 0 and len(cfg.l2_grid) > 1:
                va, tr = perm[:n_val], perm[n_val:]
                scores, prev = {}, None
                for l2 in sorted(cfg.l2_grid, reverse=True):
                    prev = fits[l2] = _fit_lbfgs(train_x[tr], train_y[tr], num_classes, l2, cfg.max_iter, prev)
                    with torch.no_grad():
                        scores[l2] = (prev(train_x[va]).argmax(1) == train_y[va]).float().mean().item()
                best_l2 = max(cfg.l2_grid, key=lambda l2: (scores[l2], l2))  # ties: stronger penalty
                result["l2_val_accuracy"] = {str(k): 100.0 * v for k, v in sorted(scores.items())}
            clf = _fit_lbfgs(train_x, train_y, num_classes, best_l2, cfg.max_iter, fits.get(best_l2))
            result["l2"] = best_l2
        elif cfg.solver == "sgd":
            clf = _fit_sgd(train_x, train_y, num_classes, cfg)
            result["epochs"] = cfg.epochs
        else:
            raise ValueError(f"unknown linear probe solver {cfg.solver!r}; choose lbfgs or sgd")
    with torch.no_grad():
        logits = clf(test_x.to(clf.weight.dtype)).float()
        train_acc = (clf(train_x.to(clf.weight.dtype)).argmax(1) == train_y).float().mean().item()
    result.update(classification_metrics(logits, test_y, num_classes))
    result["train_top1"] = 100.0 * train_acc
    return result


# ============================================================================ retrieval

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


# ============================================================================ the evaluator

def read_captions(path: Path, root: Path, bad: BadImages) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a jsonl of {"file": path relative to root (or root/val), "caption": str}.
    Malformed lines are reported with file:line and skipped."""
    pairs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            file, caption = rec["file"], rec["caption"]
            if not isinstance(file, str) or not isinstance(caption, str):
                raise ValueError("file and caption must be strings")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            bad.items.append(f"{path}:{lineno}: malformed caption record ({type(e).__name__}: {e})")
            continue
        image = root / file
        if not image.exists() and (root / "val" / file).exists():  # paths relative to the val split
            image = root / "val" / file
        pairs.append((image, caption))
    return pairs


class EvalSplit:
    """One labelled split: an ImageFolder directory or webdataset shards."""

    def __init__(self, location: Path, classnames: list[str] | None, bad: BadImages):
        tars = sorted(location.glob("*.tar")) if location.is_dir() else shard_paths(location)
        if tars:
            self.samples = webdataset_samples(tars, bad)
            self.classnames = classnames
        else:
            self.samples, self.classnames = image_folder(location, classnames)
        self.location = location


class Evaluator:
    """Evaluates any model with the ARCHITECTURE.md encoder interface on one evaluation directory.

    Layouts of `cfg.data`:
    - the demo layout: `train/` and `val/` (ImageFolder dirs or shard dirs), `classnames.json`,
      `templates.json`, `val_captions.jsonl`: zero-shot on val, probe train -> val, retrieval on val;
    - a single ImageFolder directory or shard dir/glob: zero-shot only (no probe training split).
    Data listings are made once; each call encodes with the current weights.
    """

    def __init__(self, cfg: EvaluationConfig, tokenizer: Callable | None = None):
        if not cfg.data:
            raise ValueError("evaluation needs a data directory (EvaluationConfig.data)")
        self.cfg = cfg
        self.tokenizer = tokenizer
        root = Path(cfg.data)
        self.root = root if root.is_dir() else root.parent
        self.listing_bad = BadImages()
        classnames = find_classnames(self.root, cfg.classnames)
        has_splits = (self.root / "val").is_dir() and root.is_dir()
        self.test = EvalSplit(root / "val" if has_splits else root, classnames, self.listing_bad)
        self.train = EvalSplit(root / "train", self.test.classnames, self.listing_bad) \
            if has_splits and (root / "train").is_dir() else None
        self.classnames = self.test.classnames
        if self.classnames is None:
            labels = {s.label for s in self.test.samples}
            raise ValueError(f"{cfg.data}: shards carry labels 0..{max(labels, default=-1)} but no "
                             "classnames.json was found (pass EvaluationConfig.classnames)")
        tpl = Path(cfg.templates) if cfg.templates else self.root / "templates.json"
        self.templates = _read_json_list(tpl, "templates") if (cfg.templates or tpl.is_file()) \
            else imagenet_templates()
        cap = self.root / "val_captions.jsonl"
        self.captions = read_captions(cap, self.root, self.listing_bad) if cap.is_file() else None
        self.transform = EvalTransform(cfg.image_size, cfg.resize, cfg.mean, cfg.std)

    def _tokenizer(self) -> Callable:
        if self.tokenizer is None:
            from pipeline.tokenizer import Tokenizer
            self.tokenizer = Tokenizer()
        return self.tokenizer

    def __call__(self, model, step: int | None = None) -> dict:
        """Full results (nested dict, JSON-ready). Leaves the model's train/eval mode as it was."""
        cfg, tasks = self.cfg, set(self.cfg.tasks)
        was_training = model.training
        model.eval()
        bad = BadImages(list(self.listing_bad.items))
        results: dict = {"data": str(cfg.data), "step": step, "skipped": {}}
        try:
            test = extract_features(model, self.test.samples, self.transform, cfg.batch_size, bad,
                                    embeddings=bool(tasks & {"zeroshot", "retrieval"}),
                                    trunk="linear_probe" in tasks and self.train is not None,
                                    desc="eval images", progress=cfg.progress)
            if "zeroshot" in tasks:
                clf = zero_shot_classifier(model, self._tokenizer(), self.classnames, self.templates)
                results["zeroshot"] = zero_shot_accuracy(test["image_embed"], test["labels"], clf)
                results["zeroshot"]["num_templates"] = len(self.templates)
            if "linear_probe" in tasks:
                if self.train is None:
                    results["skipped"]["linear_probe"] = "no train/ split next to val/"
                else:
                    train = extract_features(model, self.train.samples, self.transform, cfg.batch_size, bad,
                                             embeddings=False, trunk=True, desc="probe train images",
                                             progress=cfg.progress)
                    results["linear_probe"] = linear_probe(train["features"], train["labels"], test["features"],
                                                           test["labels"], len(self.classnames), cfg.probe)
            if "retrieval" in tasks:
                if not self.captions:
                    results["skipped"]["retrieval"] = "no val_captions.jsonl"
                else:
                    results["retrieval"] = self._retrieval(model, test, bad)
        finally:
            model.train(was_training)
        results["bad_images"] = bad.as_dict()
        results["skipped"] = results["skipped"] or None
        return results

    def _retrieval(self, model, test: dict, bad: BadImages) -> dict:
        # reuse the embeddings of val images; encode any caption image that is not among them
        row_of = {str(self.test.samples[i].path): r for r, i in enumerate(test["index"])
                  if self.test.samples[i].path is not None}
        listed = {str(s.path) for s in self.test.samples}
        files = sorted({str(p) for p, _ in self.captions})
        extra = [Sample(f, -1, path=Path(f)) for f in files if f not in row_of and f not in listed]
        embeds = [test["image_embed"]]
        if extra:
            ex = extract_features(model, extra, self.transform, self.cfg.batch_size, bad, embeddings=True,
                                  desc="retrieval images", progress=self.cfg.progress)
            base = len(test["image_embed"])
            row_of.update({extra[i].name: base + r for r, i in enumerate(ex["index"])})
            if ex["image_embed"] is not None:
                embeds.append(ex["image_embed"])
        pairs = [(row_of[str(p)], c) for p, c in self.captions if str(p) in row_of]
        if not pairs:
            raise ValueError(f"{self.root / 'val_captions.jsonl'}: none of the captioned images could be read")
        rows = sorted({r for r, _ in pairs})
        remap = {r: i for i, r in enumerate(rows)}
        image_embed = torch.cat(embeds)[rows]
        text_embed = encode_texts(model, self._tokenizer(), [c for _, c in pairs])
        return retrieval_recall(image_embed, text_embed, [remap[r] for r, _ in pairs])


def flat_metrics(results: dict) -> dict[str, float]:
    """Scalar metrics for metrics.jsonl: {"zeroshot_top1": ..., "linear_probe_top1": ..., ...}."""
    flat = {}
    for task in TASKS:
        for k, v in (results.get(task) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[f"{task}_{k}"] = float(v)
    flat["bad_images"] = float(results["bad_images"]["count"])
    return flat


# ============================================================================ trainer hook / checkpoints

def config_for_run(run_cfg, data: str | None = None, tasks: Sequence[str] = TASKS, **overrides) -> EvaluationConfig:
    """An EvaluationConfig matching a RunConfig: eval data and batch size, the recipe's normalisation and
    image size (evaluation Resize = recipe.eval_resize or image size)."""
    r = run_cfg.data.recipe
    return EvaluationConfig(data=data or run_cfg.eval.data, tasks=tuple(tasks), batch_size=run_cfg.eval.batch_size,
                            image_size=r.image_size, resize=r.eval_resize, mean=tuple(r.mean), std=tuple(r.std),
                            **overrides)


class EvalHook:
    """`Components.evaluate` for trainer/loop.py: `hook(model, step) -> flat metrics` (metrics.jsonl);
    full results go to `<out_dir>/eval/step_XXXXXXXX.json` when `out_dir` is given. The data listing
    is made at the first call, with the image size of the recipe or else of the model's config."""

    def __init__(self, cfg: EvaluationConfig, tokenizer: Callable | None = None, out_dir: str | Path | None = None,
                 image_size_from_model: bool = False):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.out_dir = Path(out_dir) / "eval" if out_dir else None
        self.image_size_from_model = image_size_from_model
        self.evaluator: Evaluator | None = None

    def __call__(self, model, step: int) -> dict:
        if self.evaluator is None:
            cfg = self.cfg
            model_cfg = getattr(model, "cfg", None)
            if self.image_size_from_model and model_cfg is not None:
                cfg = replace(cfg, image_size=model_cfg.image_size)
            self.evaluator = Evaluator(cfg, self.tokenizer)
        results = self.evaluator(model, step)
        if self.out_dir is not None:
            write_json(results, self.out_dir / f"step_{step:08d}.json")
        return flat_metrics(results)


def make_train_hook(data: str, device=None, batch_size: int = 64, run_cfg=None,
                    tasks: Sequence[str] = ("zeroshot", "retrieval"), tokenizer: Callable | None = None) -> EvalHook:
    """The trainer's evaluation hook on `data` (cheap tasks by default). With `run_cfg` the recipe's
    normalisation and eval resize are used and results are written under its out_dir; `device` is
    where the model already lives (evaluation follows the model's parameters)."""
    if run_cfg is not None:
        cfg = replace(config_for_run(run_cfg, data=data, tasks=tasks), batch_size=batch_size, progress=False)
        return EvalHook(cfg, tokenizer, out_dir=run_cfg.out_dir)
    cfg = EvaluationConfig(data=data, tasks=tuple(tasks), batch_size=batch_size, progress=False)
    return EvalHook(cfg, tokenizer, image_size_from_model=True)


def write_json(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    tmp.replace(path)


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_run_config(checkpoint: str | Path, config: str | Path | None = None):
    """The RunConfig of a checkpoint: `config` if given, else `<run dir>/config.yaml` saved by the trainer
    (checkpoints live in `<run dir>/checkpoints/`)."""
    from trainer.config import load_config
    ckpt = Path(checkpoint)
    if config is None:
        for cand in (ckpt.parent.parent / "config.yaml", ckpt.parent / "config.yaml"):
            if cand.is_file():
                config = cand
                break
        else:
            raise FileNotFoundError(f"{ckpt}: no config.yaml in the run directory; pass --config")
    return load_config(config)


def build_eval_model(run_cfg, checkpoint: str | Path | None = None, seed: int = 0):
    """The run's model on CPU, with the checkpoint's weights (or a random initialisation when None).
    The SimCLR head is not used by evaluation and is not required to match."""
    from trainer.checkpoint import check_model_state, load_checkpoint
    from trainer.models import build_model
    torch.manual_seed(seed)
    model = build_model(run_cfg.model, run_cfg.objective.name)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        state = _strip_prefixes(state.get("model", state))
        keep = lambda k: not k.startswith("ssl_head.")  # noqa: E731  (its norm kind depends on the batch size)
        own = model.state_dict()

        class _View(torch.nn.Module):  # check_model_state on the evaluated part only
            def state_dict(self):
                return {k: v for k, v in own.items() if keep(k)}

        check_model_state(_View(), {k: v for k, v in state.items() if keep(k)}, str(checkpoint))
        model.load_state_dict({k: v for k, v in state.items() if keep(k)}, strict=False)
    return model.eval()
