"""Suite mode of tools/evaluate.py: many datasets x many checkpoints and the random baseline, one
table; a missing dataset skipped; a killed run resumed from its cache; out-of-domain label maps."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_testing import write_clip_benchmark, write_image_folder
from trainer.config import load_config
from trainer.dataclass_io import ConfigError, to_dict
from trainer.evaluation import EvalConfig, Evaluator, EvalTransform, zero_shot_classifier
from trainer.evaluation.ranks import roc_auc
from trainer.evaluation.suite import DatasetSpec, LabelSpace, load_suite, open_dataset
from trainer.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
SUITE = """\
description: two datasets, one missing
batch_size: 16
datasets:
  - name: pets
    path: wds_pets
    tasks: [zeroshot, linear_probe]
    metric: mean_per_class
  - name: cars
    path: wds_cars
    tasks: [zeroshot]
  - name: sts-b
    path: glue/sts.tsv
    tasks: [sts]
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A root with one CLIP-benchmark dataset (the suite's other one is missing), a CLIP and a SLIP
    checkpoint of the tiny model (run config stored inside), and the suite file."""
    tmp = tmp_path_factory.mktemp("suite")
    write_clip_benchmark(tmp / "root" / "wds_pets", ["cat", "dog", "bird"], test=(2, 6), train=(1, 9))
    (tmp / "root" / "glue").mkdir()
    rows = [f"{i}\ta small {w} photo\ta {'small' if i % 2 else 'large'} {w} photo\t{i % 2 * 4.0}"
            for i, w in enumerate(["cat", "dog", "bird", "tree", "car", "house", "boat", "cup"])]
    (tmp / "root" / "glue" / "sts.tsv").write_text("index\tsentence1\tsentence2\tscore\n" + "\n".join(rows) + "\n")
    checkpoints = []
    for seed, objective in enumerate(("clip", "slip", "simclr")):
        cfg = load_config(None, ["model.preset=vit_tiny", f"objective.name={objective}",
                                 "data.recipe.image_size=64", "eval.batch_size=16"])
        torch.manual_seed(seed + 1)              # not the random baseline's seed 0
        model = build_model(cfg.model, objective)
        path = tmp / objective / "last.pt"
        path.parent.mkdir()
        torch.save({"model": model.state_dict(), "step": 1, "config": to_dict(cfg)}, path)
        checkpoints.append(str(path))
    (tmp / "suite.yaml").write_text(SUITE)
    return tmp, checkpoints


def run_suite(tmp: Path, checkpoints: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/evaluate.py", "--suite", str(tmp / "suite.yaml"), "--root",
                           str(tmp / "root"), "--checkpoint", *checkpoints, "--random-init", "--out", str(out),
                           "--threads", "1", "--device", "cpu", "--no-progress", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def full_run(setup):
    tmp, checkpoints = setup
    proc = run_suite(tmp, checkpoints, tmp / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


def test_a_suite_runs_every_model_on_the_datasets_present(setup, full_run):
    tmp, checkpoints = setup
    results = json.loads((full_run / "results.json").read_text())
    assert results["datasets"] == [
        {"dataset": "pets", "status": "evaluated", "path": str(tmp / "root" / "wds_pets")},
        {"dataset": "cars", "status": "skipped", "path": str(tmp / "root" / "wds_cars"),
         "reason": f"not found: {tmp / 'root' / 'wds_cars'}"},
        {"dataset": "sts-b", "status": "evaluated", "path": str(tmp / "root" / "glue" / "sts.tsv")}]
    models = [*checkpoints, "random-init"]
    assert [m["name"] for m in results["models"]] == models
    assert results["models"][3]["objective"] == "clip"       # the first checkpoint's architecture
    assert len({m["model_key"] for m in results["models"]}) == 4
    records = results["records"]
    simclr = [r for r in records if r["model"] == checkpoints[2] and r["task"] in ("zeroshot", "sts")]
    assert [(r["task"], r["status"]) for r in simclr] == [("zeroshot", "not applicable"), ("sts", "not applicable")]
    for model in models:
        if model != checkpoints[2]:
            sts = {r["metric"]: r for r in records if r["model"] == model and r["task"] == "sts"}
            assert set(sts) == {"spearman_embed", "spearman_eot"} and sts["spearman_embed"]["headline"]
            assert all(r["num_samples"] == 8 and r["ci95"][0] <= r["value"] <= r["ci95"][1] for r in sts.values())
        for task, n in (("zeroshot", 12), ("linear_probe", 12)):
            if model == checkpoints[2] and task == "zeroshot":
                continue
            mine = {r["metric"]: r for r in records if r["model"] == model and r["task"] == task}
            assert set(mine) == {"top1", "top5", "mean_per_class", "top1_top5_mean"}
            assert [m for m, r in mine.items() if r["headline"]] == ["mean_per_class"]
            assert all(r["dataset"] == "pets" and r["num_samples"] == n and r["bad_images"] == 0
                       for r in mine.values())
    table = results["tables"]["zeroshot"]
    assert table["datasets"] == ["pets"] and set(table["rows"]) == set(models)
    md = (full_run / "results.md").read_text()
    assert md.count("| *metric* | mean_per_class |") == 2 and "| *metric* | spearman_embed |" in md
    for model in models:
        rows = [line for line in md.splitlines() if line.startswith(f"| {model} |")]
        assert len(rows) == 3 and all(len(row.split("|")) == 5 for row in rows)   # model, one dataset, average
    assert f"| {checkpoints[2]} | n/a | n/a |" in md
    assert f"- cars: not found: {tmp / 'root' / 'wds_cars'}" in md
    assert (full_run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_killed_suite_run_resumes_from_its_cache(setup, full_run):
    tmp, checkpoints = setup
    out = tmp / "killed"
    proc = run_suite(tmp, checkpoints, out, "--debug-sigkill-after-cache-writes", "1")
    assert proc.returncode == -9, proc.stderr[-2000:]
    written = list((out / "cache").rglob("*.pt"))
    assert len(written) == 1 and not (out / "results.json").exists()
    before = written[0].stat().st_mtime_ns
    proc = run_suite(tmp, checkpoints, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert written[0].stat().st_mtime_ns == before          # loaded, not recomputed
    assert len(list((out / "cache").rglob("*.pt"))) > 1
    assert (out / "results.md").read_text() == (full_run / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["records"] == \
        json.loads((full_run / "results.json").read_text())["records"]


def test_suite_files_are_checked_with_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE.replace("metric: mean_per_class", "metric: top3"))
    with pytest.raises(ConfigError, match=r"bad.yaml:7: datasets\[0\].metric: expected one of"):
        load_suite(bad)
    bad.write_text(SUITE.replace("[zeroshot]", "[zeroshot, sts]"))
    with pytest.raises(ConfigError, match="text tasks and image tasks"):
        load_suite(bad)
    bad.write_text(SUITE.replace("[sts]", "[sts, text_probe]"))        # a TSV file and a folder: never runnable
    with pytest.raises(ConfigError, match=r"bad.yaml:11: datasets\[2\].tasks \['sts', 'text_probe'\]: sts \(a TSV"):
        load_suite(bad)
    for name in ("../escape", "a/b", "..", ""):                          # the name is a cache folder
        bad.write_text(SUITE.replace("name: cars", f"name: {name!r}"))
        with pytest.raises(ConfigError, match=r"bad.yaml:8: datasets\[1\].name .*: one folder name"):
            load_suite(bad)


def test_suite_options_override_the_suite_file_and_root_needs_a_suite(setup):
    """--batch-size and --probe* replace the suite's batch_size / probe (recorded, and the probe fit
    with them); --root without --suite is refused with one line."""
    tmp, checkpoints = setup
    (tmp / "probe.yaml").write_text("batch_size: 16\ndatasets:\n"
                                    "  - {name: pets, path: wds_pets, tasks: [linear_probe]}\n")
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--suite", str(tmp / "probe.yaml"), "--root",
                           str(tmp / "root"), "--checkpoint", checkpoints[0], "--out", str(tmp / "probe_out"),
                           "--batch-size", "5", "--probe", "sgd", "--probe-epochs", "3", "--probe-lr", "0.05",
                           "--threads", "1", "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp / "probe_out" / "results.json").read_text())
    assert results["batch_size"] == 5
    assert (results["probe"]["solver"], results["probe"]["epochs"], results["probe"]["lr"]) == ("sgd", 3, 0.05)
    fit = results["runs"][checkpoints[0]]["pets"]["linear_probe"]
    assert fit["solver"] == "sgd" and fit["epochs"] == 3
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--data", str(tmp / "root" / "wds_pets"),
                           "--root", str(tmp / "root"), "--checkpoint", checkpoints[0]],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        "--root: --suite only (the folder a suite's dataset paths are relative to)")


# ------------------------------------------------------------------ out-of-domain label maps

PARENT_NAMES = ["tench", "goldfish", "shark", "hen", "ostrich", "kite"]
PARENT_WNIDS = ["n01440764", "n01443537", "n01484850", "n01514859", "n01518878", "n01530575"]
SUBSET = ["n01443537", "n01514859", "n01530575"]            # goldfish, hen, kite: sorted as in the parent


def test_an_out_of_domain_set_scored_through_its_subset_map_equals_its_subset_names(tmp_path):
    """The same images as (a) folders named by WordNet ID, with one class outside the subset,
    (b) a CLIP-benchmark copy whose labels index the subset, (c) folders named by the subset's class
    names: one set of scores. The subset's classifier is the subset rows of the parent's."""
    lists = tmp_path / "lists"
    lists.mkdir()
    for name, items in (("names.txt", PARENT_NAMES), ("wnids.txt", PARENT_WNIDS), ("subset.txt", SUBSET)):
        (lists / name).write_text("# test lists\n" + "\n".join(items) + "\n")
    space = dict(parent_classnames=str(lists / "names.txt"), parent_wnids=str(lists / "wnids.txt"),
                 subset=str(lists / "subset.txt"))
    names = ["goldfish", "hen", "kite"]
    by_wnid = write_image_folder(tmp_path / "r_wnid", [*SUBSET, "n01440764"])
    by_name = write_image_folder(tmp_path / "r_names", names)
    (by_name / "classnames.json").write_text(json.dumps(names))
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(["a photo of a {}."]))

    datasets = {
        "wnid": open_dataset(DatasetSpec("r", str(by_wnid), templates=str(templates),
                                         labels=LabelSpace(**space, stored="folder_wnid"))),
        "names": open_dataset(DatasetSpec("r", str(by_name), templates=str(templates)))}
    assert datasets["wnid"].classnames == names
    assert [s.label for s in datasets["wnid"].test.samples] == [s.label for s in datasets["names"].test.samples]
    assert len(datasets["wnid"].bad.items) == 3 and "n01440764" in datasets["wnid"].bad.items[0]
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("vit_tiny"), "clip").eval()
    from pipeline.tokenizer import Tokenizer
    tokenizer = Tokenizer()
    scores = {k: Evaluator(EvalConfig(data=str(d.location), tasks=("zeroshot",), batch_size=16),
                           EvalTransform(64), tokenizer, progress=False, data=d)(model)["zeroshot"]
              for k, d in datasets.items()}
    assert scores["wnid"]["num_classes"] == 3 and scores["wnid"]["num_images"] == 9
    for key in ("top1_correct", "top1", "top5", "mean_per_class"):
        assert scores["wnid"][key] == scores["names"][key]
    parent = zero_shot_classifier(model, tokenizer, PARENT_NAMES, ["a photo of a {}."])
    subset = zero_shot_classifier(model, tokenizer, names, ["a photo of a {}."])
    assert torch.allclose(parent[[1, 3, 5]], subset, atol=1e-6)

    # a CLIP-benchmark copy (labels already index the subset) is mapped once, not twice
    cb = write_clip_benchmark(tmp_path / "wds_r", names, test=(1, 9), train=None)
    mapped = open_dataset(DatasetSpec("r", str(cb), labels=LabelSpace(**space, stored="subset_index")))
    assert mapped.classnames == names and [s.label for s in mapped.test.samples] == [k % 3 for k in range(9)]
    with pytest.raises(ValueError, match="subset_index but the dataset has 6 classes and the subset 3"):
        open_dataset(DatasetSpec("r", str(write_clip_benchmark(tmp_path / "wds_6", PARENT_NAMES, (1, 6), None)),
                                 labels=LabelSpace(**space, stored="subset_index")))
    parent_index = open_dataset(DatasetSpec("r", str(tmp_path / "wds_6"), labels=LabelSpace(**space)))
    assert [s.label for s in parent_index.test.samples] == [0, 1, 2]      # parent 1, 3, 5 of 0..5
    assert len(parent_index.bad.items) == 3

    # parent_index: the copy must have the parent's class count (a 3-class copy would be scored as 0..2)
    with pytest.raises(ValueError, match="parent_index but the dataset has 3 classes and the parent 6"):
        open_dataset(DatasetSpec("r", str(cb), labels=LabelSpace(**space)))
    # an ImageFolder's labels are sorted folder positions ("10" before "2"): index-stored maps are refused
    for stored in ("parent_index", "subset_index"):
        with pytest.raises(ValueError, match=f"sorted folder positions, not {stored} indices"):
            open_dataset(DatasetSpec("r", str(by_name), templates=str(templates),
                                     labels=LabelSpace(**space, stored=stored)))


def test_roc_auc_counts_pairs_and_half_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)
    positive = rng.random(60) < 0.4
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in scores[positive] for n in scores[~positive]]
    assert roc_auc(scores, positive) == pytest.approx(np.mean(pairs), abs=1e-12)


# ------------------------------------------------------------------ the shipped suites

EVAL_CONFIGS = ROOT / "trainer" / "configs" / "eval"


def test_the_shipped_suites_load_and_their_lists_name_their_sources():
    suites = {p.stem: load_suite(p) for p in sorted(EVAL_CONFIGS.glob("*.yaml"))}
    assert set(suites) == {"slip_zeroshot", "imagenet", "imagenet_ood", "demo"}
    for path in (EVAL_CONFIGS / "lists").rglob("*.txt"):
        assert any(line.startswith("# Source: ") for line in path.read_text().splitlines()[:4]), path
    slip = {d.name: d for d in suites["slip_zeroshot"].datasets}
    assert len(slip) == 26 and list(slip)[-1] == "imagenet"
    assert {n: d.metric for n, d in slip.items() if d.metric != "top1"} == {
        "aircraft": "mean_per_class", "pets": "mean_per_class", "caltech101": "mean_per_class",
        "flowers": "mean_per_class", "kinetics700_frames": "top1_top5_mean", "hateful_memes": "roc_auc"}
    from trainer.evaluation import imagenet_classnames, imagenet_templates
    from trainer.evaluation.data import read_list
    from trainer.evaluation.suite import subset_names
    assert read_list(slip["imagenet"].templates, "templates") == imagenet_templates()
    ood = {d.name: d for d in suites["imagenet_ood"].datasets}
    sizes = {n: len(subset_names(d.labels)[0]) for n, d in ood.items()}
    assert sizes == {"imagenet-v2": 1000, "imagenet-sketch": 1000, "imagenet-r": 200, "imagenet-a": 200}
    assert subset_names(ood["imagenet-v2"].labels)[0] == imagenet_classnames()
    assert subset_names(ood["imagenet-a"].labels)[0][:3] == ["stingray", "goldfinch", "junco"]


def test_sorted_class_folders_index_a_shipped_list(tmp_path):
    """The SLIP reference's ImageFolder copies: the i-th folder in sorted order is class i of its list."""
    names = tmp_path / "names.txt"
    names.write_text("# Source: a test\nzebra\napple\n")
    root = write_image_folder(tmp_path / "val", ["1_first", "0_second"], per_class=2)
    data = open_dataset(DatasetSpec("x", str(root), classnames=str(names), folders="sorted"))
    assert data.classnames == ["zebra", "apple"]
    assert [(Path(s.name).parent.name, s.label) for s in data.test.samples] == \
        [("0_second", 0), ("0_second", 0), ("1_first", 1), ("1_first", 1)]
    names.write_text("zebra\napple\npear\n")
    with pytest.raises(ValueError, match="2 class folders but .* has 3 class names"):
        open_dataset(DatasetSpec("x", str(root), classnames=str(names), folders="sorted"))


def test_a_damaged_dataset_fails_alone(tmp_path):
    from trainer.evaluation.cache import model_key
    from trainer.evaluation.suite import SuiteConfig
    from trainer.evaluation.suite_report import markdown
    from trainer.evaluation.suite_run import SuiteModel, run_suite
    write_clip_benchmark(tmp_path / "root" / "good", ["cat", "dog", "bird"], test=(1, 6), train=None)
    write_clip_benchmark(tmp_path / "root" / "damaged", ["cat", "dog", "bird"], test=(2, 3), train=None)
    (tmp_path / "root" / "damaged" / "test" / "1.tar").unlink()
    suite = SuiteConfig([DatasetSpec("damaged", "damaged"), DatasetSpec("good", "good", ("zeroshot", "linear_probe"))],
                        batch_size=8)
    cfg = load_config(None, ["model.preset=vit_tiny", "objective.name=clip", "data.recipe.image_size=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model, "clip").eval()
    results = run_suite(suite, tmp_path / "root", [SuiteModel("m", model, cfg, model_key(model, {}))],
                        tmp_path / "out", progress=False)
    assert [(d["dataset"], d["status"]) for d in results["datasets"]] == [("damaged", "failed"), ("good", "evaluated")]
    assert "test/1.tar: shard 1 of the 2" in results["datasets"][0]["reason"]
    assert {r["dataset"] for r in results["records"]} == {"good"}
    md = markdown(results, "t")
    assert "- damaged: FileNotFoundError:" in md
    # no train split: the probe is skipped, shown apart from what a model cannot do (n/a)
    assert "| m | — | — |" in md and "—: the dataset cannot serve the task" in md and "n/a" not in md


def test_the_shipped_out_of_domain_suite_runs_on_a_clip_benchmark_copy_of_imagenet_r(tmp_path):
    """imagenet_ood.yaml as shipped: a CLIP-benchmark ImageNet-R copy (200 names, labels 0..199) is
    scored on the 200 subset classes; the variants not on disk are skipped."""
    from trainer.evaluation.cache import model_key
    from trainer.evaluation.suite import subset_names
    from trainer.evaluation.suite_run import SuiteModel, run_suite
    suite = load_suite(EVAL_CONFIGS / "imagenet_ood.yaml")
    names = subset_names(suite.datasets[2].labels)[0]
    write_clip_benchmark(tmp_path / "root" / "wds_imagenet-r", names, test=(1, 6), train=None)
    suite.batch_size = 8
    cfg = load_config(None, ["model.preset=vit_tiny", "objective.name=clip", "data.recipe.image_size=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model, "clip").eval()
    results = run_suite(suite, tmp_path / "root", [SuiteModel("m", model, cfg, model_key(model, {}))],
                        tmp_path / "out", progress=False)
    assert [d["status"] for d in results["datasets"]] == ["skipped", "skipped", "evaluated", "skipped"]
    zs = results["runs"]["m"]["imagenet-r"]["zeroshot"]
    assert zs["num_classes"] == 200 and zs["num_images"] == 6 and zs["num_templates"] == 7


def test_sts_reports_scipys_spearman_of_the_cosine_similarities(tmp_path):
    """The STS number is scipy's Spearman correlation between the gold scores (with ties) and the
    cosine similarities of the two sentences' features; identical sentences (three pairs) tie."""
    from scipy.stats import spearmanr
    from pipeline.tokenizer import Tokenizer
    from trainer.evaluation.text import sts, text_features
    words = ["cat", "dog", "bird", "tree", "car", "house", "boat", "cup", "sun", "hat"]
    pairs = [(f"a small {w} photo", f"a {'small' if i % 3 else 'large'} {words[(i + i % 2) % 10]} photo",
              [0.0, 1.5, 1.5, 3.0, 4.2, 5.0][i % 6]) for i, w in enumerate(words)]
    path = tmp_path / "sts.tsv"
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{g}\n" for a, b, g in pairs))
    torch.manual_seed(0)
    model, tokenizer = build_model(ModelConfig.preset("vit_tiny"), "clip").eval(), Tokenizer()
    got = sts(model, tokenizer, path, batch_size=4)
    first = text_features(model, tokenizer, [a for a, _, _ in pairs], 16)
    second = text_features(model, tokenizer, [b for _, b, _ in pairs], 16)
    for name in ("embed", "eot"):
        x, y = first[name].double().numpy(), second[name].double().numpy()
        cosine = (x * y).sum(1) / np.sqrt((x * x).sum(1) * (y * y).sum(1))      # exactly 1 for identical rows
        assert (cosine[[2, 4, 8]] == 1).all()
        expected = spearmanr(cosine, [g for _, _, g in pairs]).statistic
        assert got[name]["spearman"] == pytest.approx(expected, abs=1e-6)
    assert got["num_pairs"] == 10


def test_the_cache_key_follows_the_weights_not_the_checkpoint_path(tmp_path):
    """`last.pt` is overwritten as training goes on: the same weights under two paths share one key,
    new weights under the same path get another, and the SimCLR head (not loaded) does not count."""
    import shutil
    from trainer.config import RunConfig
    from trainer.checkpoint import load_model
    from trainer.evaluation.cache import run_model_key

    def save(path: Path, seed: int):
        cfg = ModelConfig.preset("vit_tiny")
        torch.manual_seed(seed)
        run = RunConfig(model=cfg)
        run.objective.name = "slip"
        run.data.recipe.image_size = cfg.image_size
        torch.save({"model": build_model(cfg, "slip").state_dict(), "config": to_dict(run), "step": seed}, path)

    def key(path: Path) -> str:
        return run_model_key(*load_model(path))      # the key tools/evaluate.py gives a checkpoint

    save(tmp_path / "step_1.pt", 1)
    shutil.copy(tmp_path / "step_1.pt", tmp_path / "last.pt")
    first = key(tmp_path / "last.pt")
    assert key(tmp_path / "step_1.pt") == first
    save(tmp_path / "last.pt", 2)                       # training went on: same path, new weights
    assert key(tmp_path / "last.pt") != first
    model, run = load_model(tmp_path / "step_1.pt")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("ssl_head.")).add_(1.0)
    assert run_model_key(model, run) == first
