"""Evaluation: exact zero-shot / probe / retrieval numbers on hand-built models, bad images reported."""
import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.evaluation import (TASKS, EvalConfig, EvalHook, Evaluator, EvalTransform, LinearProbeConfig,
                                flat_metrics, imagenet_classnames, imagenet_templates, linear_probe,
                                retrieval_recall, zero_shot_classifier)

CLASSES = ["red", "green", "blue", "cyan", "magenta", "yellow"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 16


def grey(c: int) -> int:
    """Class c's images are solid grey at this level."""
    return 20 + 40 * c


class WordTokenizer:
    """Maps each class word to id 1 + class index, "also" to 99, everything else to 0."""

    def __call__(self, texts, context_length=8):
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            for j, w in enumerate(t.replace(".", " ").split()[:context_length]):
                out[i, j] = 1 + CLASSES.index(w) if w in CLASSES else 99 if w == "also" else 0
        return out


class KnownModel(torch.nn.Module):
    """Image of grey level g -> index i = round((g - 20) / 40); encode_image = normalised
    exp(-(|j - i| + 0.1 [j < i])) (so rankings of classes are known, without ties); encode_text =
    one-hot of the class word, plus one-hot of the next class for templates that start with "also";
    visual_features = one-hot of i."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def _index(self, images):
        pixel = images[:, 0].mean(dim=(1, 2)) * STD[0] + MEAN[0]
        return ((pixel * 255 - 20) / 40).round().long().clamp(0, len(CLASSES) - 1)

    def visual_features(self, images):
        return F.one_hot(self._index(images), len(CLASSES)).float()

    def encode_image(self, images, normalize=True):
        i = self._index(images)[:, None].float()
        j = torch.arange(len(CLASSES)).float()[None]
        e = torch.exp(-((j - i).abs() + 0.1 * (j < i).float()))
        return F.normalize(e, dim=-1) if normalize else e

    def encode_text(self, tokens, normalize=True):
        ids = tokens.masked_fill(tokens > len(CLASSES), 0)
        cls = ids.max(dim=1).values - 1
        e = F.one_hot(cls, len(CLASSES)).float()
        shifted = (tokens == 99).any(dim=1)
        e[shifted] += F.one_hot((cls[shifted] + 1) % len(CLASSES), len(CLASSES)).float()
        return F.normalize(e, dim=-1) if normalize else e


def save_grey(path: Path, level: int, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (level, level, level)).save(path, quality=95)


def make_eval_dir(root: Path) -> Path:
    """Demo layout. val/red holds 3 red images, one green-looking (top-5 hit) and one yellow-looking
    (top-5 miss); every other val class holds 3 correct images; train/ holds 4 correct per class."""
    for split, n in (("train", 4), ("val", 3)):
        for c, name in enumerate(CLASSES):
            for k in range(n):
                save_grey(root / split / name / f"{k}.jpg", grey(c), size=(40 + 7 * k, 30 + 3 * c))
    save_grey(root / "val" / "red" / "looks_green.jpg", grey(1))
    save_grey(root / "val" / "red" / "looks_yellow.jpg", grey(5))
    (root / "classnames.json").write_text(json.dumps(CLASSES))
    (root / "templates.json").write_text(json.dumps(["a photo of {}.", "{} thing"]))
    caps = [{"file": f"val/{name}/0.jpg", "caption": f"a {name} square"} for name in CLASSES]
    (root / "val_captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps))
    return root


def evaluator(data, tasks=TASKS) -> Evaluator:
    cfg = EvalConfig(data=str(data), tasks=tasks, batch_size=7)
    return Evaluator(cfg, EvalTransform(SIZE, mean=MEAN, std=STD), WordTokenizer(), progress=False)


def test_zero_shot_probe_retrieval_exact(tmp_path):
    root = make_eval_dir(tmp_path / "eval")
    results = evaluator(root)(KnownModel(), step=3)
    zs = results["zeroshot"]
    assert zs["num_images"] == 20 and zs["num_classes"] == 6 and zs["num_templates"] == 2
    assert zs["top1"] == pytest.approx(100 * 18 / 20)
    assert zs["top5"] == pytest.approx(100 * 19 / 20)
    assert zs["mean_per_class"] == pytest.approx(100 * (3 / 5 + 5) / 6)
    assert zs["chance_top1"] == pytest.approx(100 / 6)
    # per image, in the split's order: what a paired (McNemar) comparison of two models needs
    assert len(zs["top1_correct"]) == 20 and zs["top1_correct"].count("1") == 18
    lp = results["linear_probe"]
    assert lp["num_train"] == 24 and lp["train_top1"] == 100.0
    assert lp["top1"] == pytest.approx(100 * 18 / 20)     # the two mislabelled images follow their looks
    assert lp["top1_correct"] == zs["top1_correct"]       # the same two images are wrong
    r = results["retrieval"]
    assert r["num_images"] == 6 and r["num_captions"] == 6
    assert all(r[f"{d}_R@{k}"] == 100.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))
    assert results["bad_images"]["count"] == 0
    flat = flat_metrics(results)
    assert flat["zeroshot_top1"] == pytest.approx(90.0) and flat["retrieval_text_to_image_R@1"] == 100.0


def test_zero_shot_classifier_averages_normalised_templates():
    clf = zero_shot_classifier(KnownModel(), WordTokenizer(), CLASSES, ["{} thing", "also {}"])
    eye = torch.eye(len(CLASSES))
    # "{} thing" -> e_c ; "also {}" -> (e_c + e_{c+1}) / sqrt 2 ; mean of the two, renormalised
    expected = F.normalize(eye + (eye + eye.roll(1, dims=1)) / math.sqrt(2), dim=-1)
    assert torch.allclose(clf, expected, atol=1e-6)
    with pytest.raises(ValueError, match="contain"):
        zero_shot_classifier(KnownModel(), WordTokenizer(), CLASSES, ["no placeholder"])


def test_bad_images_are_reported_and_evaluation_continues(tmp_path):
    root = make_eval_dir(tmp_path / "eval")
    good = (root / "val" / "green" / "0.jpg").read_bytes()
    (root / "val" / "green" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "val" / "blue" / "notes.jpg").write_text("not an image")
    with open(root / "val_captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "val/red/deleted.jpg", "caption": "a red square"}) + "\n")
        f.write("{broken json\n")
    results = evaluator(root)(KnownModel())
    bad = results["bad_images"]
    assert bad["count"] == 4
    text = "\n".join(bad["files"])
    for name in ("truncated.jpg", "notes.jpg", "deleted.jpg", "val_captions.jsonl:8"):
        assert name in text
    # the readable images are still all evaluated, with the same exact numbers
    assert results["zeroshot"]["num_images"] == 20
    assert results["zeroshot"]["top1"] == pytest.approx(90.0)
    assert results["retrieval"]["num_captions"] == 6


def write_shard(path: Path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def jpeg(level: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), (level,) * 3).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_webdataset_shards_with_labels(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", [(f"{c:04d}", {"jpg": jpeg(grey(c)), "cls": str(c).encode()})
                                       for c in range(6)])
    write_shard(shards / "00001.tar", [
        ("0100", {"jpg": jpeg(grey(5)), "cls": b"0"}),          # looks yellow, labelled red
        ("0101", {"jpg": b"\xff\xd8garbage", "cls": b"1"}),     # corrupt
        ("0102", {"jpg": jpeg(grey(2))}),                       # no label
    ])
    (shards / "classnames.json").write_text(json.dumps(CLASSES))
    results = evaluator(shards, tasks=("zeroshot", "linear_probe", "retrieval"))(KnownModel())
    assert results["zeroshot"]["num_images"] == 7
    assert results["zeroshot"]["top1"] == pytest.approx(100 * 6 / 7)
    assert results["zeroshot"]["num_templates"] == 7        # ImageNet ensemble by default
    assert results["bad_images"]["count"] == 2
    assert any("00001.tar:0101" in f for f in results["bad_images"]["files"])
    assert any("no cls label" in f for f in results["bad_images"]["files"])
    assert set(results["skipped"]) == {"linear_probe", "retrieval"}


@pytest.mark.parametrize("solver", ["lbfgs", "sgd"])
def test_linear_probe_separable(solver):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) * 4
    def draw(n):
        y = torch.arange(5).repeat(n)
        return centres[y] + torch.randn(len(y), 32, generator=g), y
    (xtr, ytr), (xte, yte) = draw(30), draw(20)
    res = linear_probe(xtr, ytr, xte, yte, 5, LinearProbeConfig(solver=solver, epochs=30, batch_size=32))
    assert res["top1"] == 100.0 and res["train_top1"] == 100.0
    # labels with no relation to the features: near chance on the test set
    shuffled = yte[torch.randperm(len(yte), generator=g)]
    res = linear_probe(xtr, ytr[torch.randperm(len(ytr), generator=g)], xte, shuffled, 5,
                       LinearProbeConfig(solver=solver, epochs=30, batch_size=32))
    assert res["top1"] < 50.0


def test_retrieval_recall_exact():
    img = torch.eye(6)
    # captions 0-3 point at their own image; caption 4 (image 4) is closer to image 5;
    # captions 5 and 6 both belong to image 5, caption 5 prefers image 0, caption 6 is exact.
    txt = torch.stack([img[0], img[1], img[2], img[3], F.normalize(0.5 * img[4] + 0.9 * img[5], dim=0),
                       F.normalize(0.9 * img[0] + 0.5 * img[5], dim=0), img[5]])
    r = retrieval_recall(img, txt, [0, 1, 2, 3, 4, 5, 5], ks=(1, 2, 10))
    assert r["text_to_image_R@1"] == pytest.approx(100 * 5 / 7)   # captions 4 and 5 miss at rank 1
    assert r["text_to_image_R@2"] == 100.0
    # image -> text: every image's best own caption beats all foreign ones (image 0: 1.0 vs 0.87)
    assert r["image_to_text_R@1"] == 100.0
    # a collapsed model (all embeddings equal) must not score: ties count against it
    same = F.normalize(torch.ones(6, 4), dim=1)
    r = retrieval_recall(same, same[:6], list(range(6)), ks=(1, 5, 10))
    assert r["text_to_image_R@1"] == 0.0 and r["image_to_text_R@5"] == 0.0 and r["text_to_image_R@10"] == 100.0


def test_shipped_imagenet_metadata():
    names = imagenet_classnames()
    assert len(names) == 1000 and len(set(names)) >= 998 and names[0] == "tench" and names[-1] == "toilet paper"
    t = imagenet_templates()
    assert t == ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                 "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


def test_train_hook_logs_flat_metrics(tmp_path):
    root = make_eval_dir(tmp_path / "eval")
    model = KnownModel()
    hook = EvalHook(EvalConfig(data=str(root), batch_size=16), EvalTransform(SIZE), WordTokenizer(),
                    out_dir=tmp_path / "run" / "eval")
    model.train()
    metrics = hook(model, 7)
    assert model.training                              # mode restored
    assert metrics["zeroshot_top1"] == pytest.approx(90.0)
    assert metrics["retrieval_text_to_image_R@1"] == 100.0
    assert "linear_probe_top1" not in metrics          # the cheap tasks only during training
    assert all(isinstance(v, float) for v in metrics.values())
    saved = json.loads((tmp_path / "run" / "eval" / "step_00000007.json").read_text())
    assert saved["step"] == 7 and flat_metrics(saved) == metrics


def test_train_hook_follows_the_run_config(tmp_path):
    """The run's `eval:` section and recipe: no data, no hook; the recipe's image size and
    normalisation prepare the images; results land in <out_dir>/eval/."""
    from trainer.config import load_config
    from trainer.evaluation import make_train_hook
    root = make_eval_dir(tmp_path / "eval")
    assert make_train_hook(load_config(None)) is None
    cfg = load_config(None, [f"eval.data={root}", "eval.tasks=[zeroshot]", "eval.batch_size=5",
                             f"data.recipe.image_size={SIZE}", f"model.image_size={SIZE}",
                             f"out_dir={tmp_path / 'run'}"])
    hook = make_train_hook(cfg, tokenizer=WordTokenizer())
    assert hook.transform.size == SIZE and hook.cfg.batch_size == 5
    metrics = hook(KnownModel(), 3)
    assert metrics["zeroshot_top1"] == pytest.approx(90.0) and "retrieval_text_to_image_R@1" not in metrics
    assert (tmp_path / "run" / "eval" / "step_00000003.json").is_file()


def test_eval_config_tasks_are_checked():
    from trainer.config import ConfigError, load_config
    with pytest.raises(ValueError, match="unknown evaluation tasks"):
        EvalConfig(tasks=("zeroshot", "sts"))
    with pytest.raises(ConfigError, match=r"eval\.tasks\[1\]: expected one of .*'retrieval'\], got 'sts'"):
        load_config(None, ["eval.tasks=[zeroshot, sts]"])
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(None, ["eval.probe.solver=adam"])


def test_evaluate_tool_on_a_real_checkpoint(tmp_path):
    """tools/evaluate.py rebuilds the run's model from config.yaml + checkpoint and gives the same
    numbers as evaluating the in-memory model; a checkpoint of another architecture is a clear error."""
    from pipeline.tokenizer import Tokenizer
    from trainer.config import load_config, save_config
    from trainer.models import build_model
    root = make_eval_dir(tmp_path / "eval")
    (tmp_path / "run.yaml").write_text("model: {preset: vit_tiny}\nobjective: {name: slip}\n"
                                       "data: {recipe: {image_size: 64}}\n")
    cfg = load_config(tmp_path / "run.yaml", [f"out_dir={tmp_path / 'run'}"])
    torch.manual_seed(3)
    model = build_model(cfg.model, cfg.objective.name).eval()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000005.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "step": 5}, ckpt)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--checkpoint", str(ckpt), "--data", str(root),
                           "--out", str(out)], cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    tool = json.loads(out.read_text())
    here = Evaluator(EvalConfig(data=str(root), tasks=TASKS), EvalTransform.from_recipe(cfg.data.recipe),
                     Tokenizer(), progress=False)(model)
    for task, key in (("zeroshot", "top1"), ("zeroshot", "top5"), ("linear_probe", "top1"),
                      ("retrieval", "text_to_image_R@1")):
        assert tool[task][key] == pytest.approx(here[task][key], abs=1e-4)
    assert tool["checkpoint"] == str(ckpt) and tool["objective"] == "slip"

    (tmp_path / "wide.yaml").write_text("model: {preset: vit_tiny, vision_width: 64}\nobjective: {name: slip}\n"
                                        "data: {recipe: {image_size: 64}}\n")
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--checkpoint", str(ckpt), "--config",
                           str(tmp_path / "wide.yaml"), "--data", str(root)],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    assert proc.returncode != 0 and "does not match the model" in proc.stderr
