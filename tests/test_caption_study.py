"""tools/bench/demo_caption_study.py without training: the pairing, its table, and the guard that
keeps a rerun from mixing studies of different data."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("demo_caption_study", ROOT / "tools" / "bench" / "demo_caption_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(top1: float, correct: str) -> dict:
    return {"zeroshot": {"top1": top1, "top1_correct": correct},
            "linear_probe": {"top1": top1 + 1, "top1_correct": correct}, "train_steps": 840}


def test_pairs_compare_slip_and_clip_on_the_same_images():
    study = _tool()
    demo = study._demo_tool()
    # 10 images: SLIP alone right on image 0, CLIP alone on 1-3, both on 4
    runs = {"noisy/seed0/slip": _run(20.0, "1000100000"), "noisy/seed0/clip": _run(40.0, "0111100000"),
            "clean/seed0/slip": _run(30.0, "1000100000")}          # clean arm half done: no pair yet
    rows = study.pairs(demo, runs, [0])
    assert [(r["captions"], r["seed"]) for r in rows] == [("noisy", 0)]
    z = rows[0]["zeroshot"]
    assert z["delta"] == -20.0 and z["mcnemar"]["only_a_right"] == 1 and z["mcnemar"]["only_b_right"] == 3
    assert z["mcnemar"]["p_two_sided"] == pytest.approx(0.625)     # exact binomial: 2 * P(X <= 1 | n=4)
    md = study.study_markdown({"settings": {"samples": 4000, "epochs": 7, "eval_per_class": 40, "seeds": [0],
                                            "design": "groups"}, "pairs": rows})
    assert "groups design" in md and "| noisy | 0 | 840 | 20.0 | 40.0 | -20.0 | 0.62 |" in md


def test_a_rerun_with_other_data_settings_is_refused(tmp_path):
    study = _tool()
    (tmp_path / "settings.json").write_text(json.dumps({"epochs": 7, "samples": 4000, "eval_per_class": 40,
                                                        "data_seed": 0, "design": "structure", "overrides": []}))
    with pytest.raises(SystemExit) as e:
        study.main(["--out", str(tmp_path), "--design", "groups"])
    assert "other settings" in str(e.value) and "Use another --out" in str(e.value)
    assert not (tmp_path / "noisy").exists()                          # nothing built or trained
