"""CI-sized demo: the real orchestrator (builder, previews, trainer with DALI CPU, evaluation, plots)
on a small generated data set; it must learn, so a regression that breaks learning fails here."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _demo_tool():
    spec = importlib.util.spec_from_file_location("demo_tool", ROOT / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_each_preset_applies_its_own_targets():
    demo = _demo_tool()
    stats = {"chance_top1": 6.25, "num_eval_images": 256,                   # R@10 chance 3.9%
             "slip_probe_margin_over_random": 4.0, "slip_probe_margin_z": 3.0,
             "finetune_clip_vs_random": {"n_images": 256, "only_a_right": 35, "only_b_right": 16, "p_two_sided": 0.011}}
    rows = {"slip": {"zeroshot_top1": 20.0, "text_to_image_R@10": 10.0},
            "clip": {"zeroshot_top1": 13.0, "text_to_image_R@10": 9.0},
            "random": {"zeroshot_top1": 6.0, "text_to_image_R@10": 4.0}}
    full = demo.check_targets(demo.PRESETS["full"].targets, rows, stats)
    assert [(c["target"], c["met"]) for c in full] == [
        ("SLIP zero-shot top-1 >= 3x chance", True), ("CLIP zero-shot top-1 >= 3x chance", False),
        ("SLIP linear probe over the random encoder (points)", False),      # needs 5 points
        ("SLIP linear probe over the random encoder (one-sided z)", True)]
    ci = demo.check_targets(demo.PRESETS["ci"].targets, rows, stats)
    assert [c["target"] for c in ci] == [
        "CLIP zero-shot top-1 >= 2x chance", "random encoder zero-shot top-1 < 2x chance",
        "SLIP text->image R@10 >= 2x chance", "CLIP text->image R@10 >= 2x chance",
        "random encoder text->image R@10 < 2x chance",
        "finetuned CLIP tower ahead of finetuned random init (exact McNemar p)"]
    assert all(c["met"] for c in ci)
    rows["random"]["zeroshot_top1"] = 12.5                                  # the control reaching the bar fails
    assert [c["met"] for c in demo.check_targets(demo.PRESETS["ci"].targets, rows, stats)][1] is False
    rows["random"]["text_to_image_R@10"] = 8.0                              # so does the retrieval control
    assert [c["met"] for c in demo.check_targets(demo.PRESETS["ci"].targets, rows, stats)][4] is False
    tuned = stats["finetune_clip_vs_random"]
    tuned["p_two_sided"] = 0.08                                              # a lead that may be chance fails
    assert demo.check_targets(demo.PRESETS["ci"].targets, rows, stats)[5]["met"] is False
    tuned.update(only_a_right=16, only_b_right=35, p_two_sided=0.011)       # so does random init ahead
    assert demo.check_targets(demo.PRESETS["ci"].targets, rows, stats)[5]["met"] is False
    del stats["finetune_clip_vs_random"]                                     # and no finetuning record at all
    assert demo.check_targets(demo.PRESETS["ci"].targets, rows, stats)[5]["met"] is False


def test_slip_vs_clip_is_a_paired_exact_mcnemar_test():
    demo = _demo_tool()
    # 20 images both get right, 9 only SLIP, 1 only CLIP, 10 neither: only the 10 discordant ones count,
    # p = 2 * P(X <= 1), X ~ Binomial(10, 1/2) = 2 * 11 / 1024
    slip = "1" * 20 + "1" * 9 + "0" * 1 + "0" * 10
    clip = "1" * 20 + "0" * 9 + "1" * 1 + "0" * 10
    m = demo.mcnemar(slip, clip)
    assert (m["only_a_right"], m["only_b_right"], m["n_images"]) == (9, 1, 40)
    assert m["p_two_sided"] == pytest.approx(22 / 1024)
    assert demo.mcnemar(clip, slip)["p_two_sided"] == m["p_two_sided"]           # symmetric
    assert demo.mcnemar(slip, slip) == {"n_images": 40, "only_a_right": 0, "only_b_right": 0, "p_two_sided": 1.0}
    assert demo.mcnemar(slip, clip[:-1]) is None and demo.mcnemar(None, clip) is None   # not the same images
    # same accuracies, different images: the unpaired test cannot see this; the paired one does
    even = demo.mcnemar("1" * 15 + "0" * 15, "0" * 15 + "1" * 15)
    assert even["p_two_sided"] > 0.5
    verdict = demo.slip_vs_clip_verdict({"slip_vs_clip_zeroshot": m, "slip_vs_clip_probe": even})
    assert verdict == ("In this run: on zero-shot SLIP is ahead by more than chance on these images; "
                       "on linear probe no difference beyond chance.")


@pytest.mark.timeout(1200)   # the whole demo, several minutes on 2 cores; more on a loaded machine
def test_ci_demo_learns(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "tools/demo.py", "--out", str(out), "--size", "ci", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows, t, files = report["rows"], report["targets"], report["files"]
    # the report says which targets applied: the CI preset's own, all met
    assert t["preset"] == "ci" and t["met"], t
    applied = {c["target"] for c in t["checks"] if c["met"]}
    assert applied == {"CLIP zero-shot top-1 >= 2x chance", "random encoder zero-shot top-1 < 2x chance",
                       "SLIP text->image R@10 >= 2x chance", "CLIP text->image R@10 >= 2x chance",
                       "random encoder text->image R@10 < 2x chance",
                       "finetuned CLIP tower ahead of finetuned random init (exact McNemar p)"}, t["checks"]
    assert "Targets applied (preset 'ci'): all met" in (out / "report.md").read_text()
    chance = t["chance_top1"]
    # learning, not luck: both trained models beat chance clearly on held-out retrieval and CLIP on
    # zero-shot, while the random encoder (the control) does not. (SLIP's zero-shot and the linear-probe
    # margin need the full demo's budget on this data.)
    assert rows["clip"]["zeroshot_top1"] >= 2 * chance, report
    assert rows["random"]["zeroshot_top1"] < 2 * chance, report
    retrieval_chance = 100 * 10 / t["num_eval_images"]
    for name in ("slip", "clip"):
        assert rows[name]["text_to_image_R@10"] >= 2 * retrieval_chance, report
    assert rows["random"]["text_to_image_R@10"] < 2 * retrieval_chance, report
    for name in ("slip", "clip"):
        assert rows[name]["train_steps"] > 0
    # finetuning, the paper's third setting: all three towers finetuned for the same budget, scored on the
    # same validation images, compared pairwise. The pretrained CLIP tower beats random init by a paired
    # exact McNemar test (p < 0.05, one of the targets above); SLIP's comparison is reported
    clip_tuned, slip_tuned = t["finetune_clip_vs_random"], t["finetune_slip_vs_random"]
    assert clip_tuned["only_a_right"] > clip_tuned["only_b_right"] and clip_tuned["p_two_sided"] < 0.05, clip_tuned
    assert rows["clip"]["finetune_top1"] > rows["random"]["finetune_top1"], rows
    for tuned in (clip_tuned, slip_tuned):
        assert tuned["n_images"] == t["num_eval_images"] and 0 <= tuned["p_two_sided"] <= 1, tuned
    assert all(0 <= rows[name]["finetune_top1"] <= 100 for name in ("slip", "clip", "random")), rows
    for name in ("slip", "clip", "random"):
        assert list((Path(files["run_finetune_" + name]) / "eval").glob("val_step_*.json"))
    # the demo suite (trainer/configs/eval/demo.yaml), one evaluation process: every model, the random
    # baseline included, also on the out-of-domain drawings (zero-shot) and the text set (STS, text probe)
    assert t["ood_num_images"] == 16 * 16 and t["sts_num_pairs"] > 100 and t["text_probe_num_sentences"] > 100, t
    for name in ("slip", "clip", "random"):
        r = rows[name]
        assert 0 <= r["ood_zeroshot_top1"] <= 100 and 0 <= r["text_probe_top1"] <= 100, r
        low, high = r["sts_spearman_ci95"]
        assert -1 <= low <= r["sts_spearman"] <= high <= 1, r
    ood = t["slip_vs_clip_ood_zeroshot"]      # paired on the same drawings
    assert ood["n_images"] == t["ood_num_images"] and 0 <= ood["p_two_sided"] <= 1, ood
    assert rows["slip"]["text_probe_top1"] > 2 * chance, rows        # the sentences name their class
    suite = json.loads(Path(files["eval_results"]).read_text())
    assert [d["status"] for d in suite["datasets"]] == ["evaluated"] * 4, suite["datasets"]
    assert len(list((out / "logs").glob("eval*.log"))) == 1            # one evaluation process
    assert "| drawings zero-shot top-1 | STS Spearman [95% CI]" in (out / "report.md").read_text()
    # every promised artefact exists
    assert (out / "report.md").read_text().startswith("# Demo report")
    assert list(Path(files["previews"]).glob("*.png")), "no augmentation previews"
    assert list(Path(files["plots_slip"]).glob("*.png")), "no metric plots"
    assert list((Path(files["shards"])).glob("*.tar"))
    assert report["bad_eval_images"] == {"slip": 0, "clip": 0, "random": 0}
    # the pattern/shape breakdown (docs/DEMO.md) from this run's evaluation cache, each model named
    proc = subprocess.run([sys.executable, "tools/bench/demo_pattern_shape.py", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[2:5]]
             for line in proc.stdout.splitlines()[2:]}
    names = {"slip": "train_slip", "clip": "train_clip", "random": "random-init"}
    assert len(table) == 3 and all(any(tag in name for name in table) for tag in names.values()), table
    for row, tag in names.items():
        top1, pattern, shape = next(v for name, v in table.items() if tag in name)
        assert abs(top1 - rows[row]["zeroshot_top1"]) < 0.06 and min(pattern, shape) >= top1, (row, table)
