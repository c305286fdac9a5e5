"""The evaluation battery's inputs: the CLIP-benchmark webdataset layout as published (WebP and JPEG
members, nshards.txt, `{c}` templates), and models without a text tower (SimCLR)."""
import numpy as np
import pytest
import torch

from eval_testing import write_clip_benchmark
from trainer.evaluation import EvalConfig, Evaluator, EvalTransform
from trainer.evaluation.data import EvalData
from trainer.models import ModelConfig, build_model

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def benchmark_folder(tmp_path_factory):
    return write_clip_benchmark(tmp_path_factory.mktemp("wds_pets"), CLASSES)


def test_a_clip_benchmark_folder_is_read_as_published(benchmark_folder):
    data = EvalData.open(str(benchmark_folder))
    assert data.classnames == CLASSES
    assert data.templates == ["a photo of a {}.", "a blurry photo of a {}."]
    assert len(data.test.samples) == 18 and len(data.train.samples) == 12
    assert [s.label for s in data.test.samples] == [k % 3 for k in range(18)]
    assert data.captions is None and not data.bad.items


def test_templates_written_with_braces_alone_are_read_too(tmp_path):
    root = write_clip_benchmark(tmp_path / "wds", CLASSES, test=(1, 3), train=None,
                                templates=("a photo of a {}.", "itap of a {c}."))
    data = EvalData.open(str(root))
    assert data.templates == ["a photo of a {}.", "itap of a {}."] and data.train is None
    assert [t.format("cat") for t in data.templates] == ["a photo of a cat.", "itap of a cat."]


def test_webp_and_png_members_decode_to_their_exact_pixels():
    """Lossless members (the benchmark's WebP, and PNG) come back pixel for pixel, in RGB order."""
    import cv2
    from eval_testing import encoded
    from trainer.evaluation.data import _decode
    for ext in ("webp", "png"):
        data = encoded(2, 7, ext)
        source_rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        decoded = np.asarray(_decode(data, None).convert("RGB"))
        assert decoded.shape == (40, 48, 3) and np.array_equal(decoded, source_rgb), ext
        assert decoded[..., 0].mean() > decoded[..., 2].mean() + 100     # BGR channel 2 is red: bright in RGB's 0


def test_webp_and_jpeg_members_both_decode(benchmark_folder):
    model = build_model(ModelConfig.preset("vit_tiny"), "clip")
    cfg = EvalConfig(data=str(benchmark_folder), tasks=("zeroshot", "linear_probe"), batch_size=8)
    results = Evaluator(cfg, EvalTransform(64), progress=False)(model)
    assert results["bad_images"]["count"] == 0
    assert results["zeroshot"]["num_images"] == 18
    assert results["linear_probe"]["num_images"] == 18


def test_a_missing_shard_is_named(benchmark_folder, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(benchmark_folder, root)
    (root / "test" / "1.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"test/1.tar: shard 1 of the 2"):
        EvalData.open(str(root))


def test_a_simclr_model_gets_the_image_only_tasks(benchmark_folder):
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("vit_tiny"), "simclr")
    cfg = EvalConfig(data=str(benchmark_folder), tasks=("zeroshot", "linear_probe"), batch_size=8)
    results = Evaluator(cfg, EvalTransform(64), progress=False)(model)
    assert results["skipped"] == {"zeroshot": "not applicable: the model has no text tower"}
    assert results["linear_probe"]["num_images"] == 18


# ------------------------------------------------------------------ the text tower alone

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from scipy.stats import spearmanr  # noqa: E402

from trainer.evaluation.text import rankdata, spearman  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a small large red blue photo of on in with near old new bright dark".split()


def test_spearman_with_ties_equals_scipys():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)           # many ties
    y = x + rng.normal(0, 2, 200)
    y[::7] = y[3]                                        # ties in y too
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def _sentence(rng, key: str) -> str:
    words = list(rng.choice(WORDS, 6))
    words.insert(int(rng.integers(0, 7)), key)
    return " ".join(words)


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    rng = np.random.default_rng(1)
    sts_rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    for i in range(60):
        a = _sentence(rng, "cat")
        b = a if i % 3 == 0 else _sentence(rng, "dog")
        sts_rows.append(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{5.0 if i % 3 == 0 else 1.0}")
    sts_rows.append("61\tbroken row")
    (root / "sts.tsv").write_text("\n".join(sts_rows) + "\n")
    for name, shuffle in (("sst_planted", False), ("sst_shuffled", True)):
        d = root / name
        d.mkdir()
        for split, n in (("train", 240), ("dev", 120)):
            labels = rng.integers(0, 2, n)
            sentences = [_sentence(rng, "alpha" if y else "omega") for y in labels]
            if shuffle:
                labels = rng.permutation(labels)
            rows = "".join(f"{s}\t{y}\n" for s, y in zip(sentences, labels))
            if split == "dev" and not shuffle:
                rows += "alpha omega cat\t7\n"        # a label the probe never trained on: counted, not scored
            (d / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    return root


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/evaluate.py", "--random-init", "--config",
                           "trainer/configs/demo_clip.yaml", "--threads", "1", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_sts_reports_spearman_with_a_bootstrap_interval_for_both_features(glue, tmp_path):
    proc = evaluate("--data", str(glue / "sts.tsv"), "--tasks", "sts", "--out", str(tmp_path / "sts.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "sts.json").read_text())["sts"]
    assert result["num_pairs"] == 60 and result["malformed_rows"] == 1
    for feature in ("embed", "eot"):
        r = result[feature]
        assert r["ci95"][0] <= r["spearman"] <= r["ci95"][1]
        assert r["spearman"] > 0.5        # identical pairs (gold 5) have cosine 1: ranked first even untrained


def test_a_text_probe_learns_a_planted_signal_and_not_shuffled_labels(glue, tmp_path):
    top1 = {}
    for name in ("sst_planted", "sst_shuffled"):
        out = tmp_path / f"{name}.json"
        proc = evaluate("--data", str(glue / name), "--tasks", "text_probe", "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(out.read_text())["text_probe"]
        top1[name] = result["eot"]["top1"]
        assert result["dev_rows_with_unseen_label"] == (name == "sst_planted"), name
        assert result["eot"]["num_images"] == 120, result["eot"]      # the unseen-label row is not scored
    assert top1["sst_planted"] > 90
    assert 30 < top1["sst_shuffled"] < 70          # chance is 50 on 120 dev sentences


def test_text_tasks_on_a_simclr_model_are_one_line(glue, tmp_path):
    config = tmp_path / "simclr.yaml"
    config.write_text((ROOT / "trainer" / "configs" / "demo_slip.yaml").read_text().replace("name: slip", "name: simclr"))
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--random-init", "--config", str(config),
                           "--data", str(glue / "sts.tsv"), "--tasks", "sts"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "simclr: the model has no text tower" in lines[0]


def test_a_long_sentence_keeps_its_end_of_text_feature():
    """Text-task features are taken at the end-of-text token, which truncation keeps in the last slot."""
    from pipeline.tokenizer import Tokenizer
    from trainer.evaluation.text import text_features
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("vit_tiny"), "clip").eval()
    long = " ".join(WORDS * 10)                      # far more than 77 tokens
    got = text_features(model, Tokenizer(), [long], batch_size=4)
    tokens = Tokenizer()([long])
    with torch.no_grad():
        x = model.text.token_embedding(tokens) + model.text.positional_embedding
        last = model.text.ln_final(model.text.transformer(x))[0, 76]
    assert torch.allclose(got["eot"][0], last, atol=1e-5)
    assert torch.allclose(got["embed"][0], last @ model.text_projection, atol=1e-5)


def test_a_clip_benchmark_retrieval_folder_is_read_as_published(tmp_path):
    from eval_testing import write_clip_benchmark_retrieval
    root = write_clip_benchmark_retrieval(tmp_path / "wds_flickr", images=6, captions_per_image=2)
    data = EvalData.open(str(root))
    assert len(data.test.samples) == 6 and len(data.captions) == 12 and not data.bad.items
    assert data.captions[1] == (Path(data.test.samples[0].name), "picture 0 caption 1")
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("vit_tiny"), "clip")
    cfg = EvalConfig(data=str(root), tasks=("zeroshot", "retrieval"), batch_size=8)
    results = Evaluator(cfg, EvalTransform(64), progress=False)(model)
    assert results["skipped"] == {"zeroshot": "no class names (a retrieval set)"}
    assert results["retrieval"]["num_images"] == 6 and results["retrieval"]["num_captions"] == 12
    assert results["bad_images"]["count"] == 0
    (root / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(ValueError, match="dataset type 'multilabel' is not supported"):
        EvalData.open(str(root))


def test_the_text_tasks_never_build_an_image_tower(glue, tmp_path, monkeypatch):
    """Text tasks alone, from --data or from a suite of text sets only: building any image tower fails
    the run, so passing means none was built (and none of its weights loaded)."""
    import importlib.util
    import trainer.models as models

    def no_image_tower(*args, **kwargs):
        raise AssertionError("an image tower was built for a text-only evaluation")

    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(models, "VisionTransformer", no_image_tower)
    config = str(ROOT / "trainer" / "configs" / "demo_clip.yaml")
    assert tool.main(["--random-init", "--config", config, "--data", str(glue / "sts.tsv"), "--tasks", "sts",
                      "--out", str(tmp_path / "sts.json")]) == 0
    assert json.loads((tmp_path / "sts.json").read_text())["sts"]["num_pairs"] == 60
    suite = tmp_path / "text.yaml"
    suite.write_text("datasets:\n  - name: sts\n    path: sts.tsv\n    tasks: [sts]\n"
                     "  - name: sst\n    path: sst_planted\n    tasks: [text_probe]\n")
    assert tool.main(["--suite", str(suite), "--root", str(glue), "--random-init", "--config", config,
                      "--out", str(tmp_path / "suite"), "--no-progress"]) == 0
    records = json.loads((tmp_path / "suite" / "results.json").read_text())["records"]
    assert {r["dataset"] for r in records} == {"sts", "sst"}
    with pytest.raises(AssertionError, match="image tower was built"):   # the spy does catch a build
        tool.main(["--random-init", "--config", config, "--data", str(glue / "sst_planted"),
                   "--tasks", "zeroshot"])
