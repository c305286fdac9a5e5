"""tools/gpu_report.py: its CPU subset runs for real and writes both report files with the skip list;
skip rules, time boxes, the engine-load parser and the targets table are checked on their own."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU_ONLY = {"train_compiled", "agreement", "hw_decoder", "max_batch", "gpu_tests", "dead_peer"}
CPU_PARTS = {"train", "dali_graph", "end_to_end", "pipeline_bench"}


def load_tool():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "tools" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_report"] = module       # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


report_tool = load_tool()


def test_the_cpu_subset_runs_and_lists_what_it_skipped(tmp_path):
    out = tmp_path / "report"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "tools/gpu_report.py", "--out", str(out), "--cpu-only", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert report["mode"] == "cpu" and report["seconds"] < 120 and wall < 150
    parts = report["parts"]
    assert set(parts) == CPU_PARTS | GPU_ONLY
    for name in CPU_PARTS:
        assert parts[name]["status"] == "ok", (name, parts[name]["error"])
        assert parts[name]["results"], name
    assert {s["part"]: s["reason"] for s in report["skipped"]} == {n: "no CUDA device" for n in GPU_ONLY}
    # what the CPU parts found
    graph = parts["dali_graph"]["results"]
    assert graph["held_batches_unchanged"] and graph["distinct_buffers"] and graph["deterministic"]
    assert parts["end_to_end"]["results"]["images_per_s"] > 0 and parts["train"]["results"]["smoke"]
    rows = parts["pipeline_bench"]["results"]["rows"]
    assert rows["pillow"]["images_per_s"] > 0 and rows["dali-cpu"]["images_per_s"] > 0
    # no GPU: every target is "not measured", and the report says what ran and what did not
    assert all(t["measured"] is None and t["shown"] == "not measured" for t in report["targets"])
    assert "## Skipped" in md and "- max_batch: no CUDA device" in md and "not measured" in md
    assert report["environment"]["cuda_available"] in (False, True) and report["environment"]["torch"]
    # a rerun of one part joins the report: the others keep their records
    proc = subprocess.run([sys.executable, "tools/gpu_report.py", "--out", str(out), "--cpu-only", "--threads", "1",
                           "--parts", "dali_graph"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    again = json.loads((out / "report.json").read_text())
    assert again["parts"]["dali_graph"]["status"] == "ok" and "--parts dali_graph" in again["command"]
    assert {n: r["results"] for n, r in again["parts"].items() if n != "dali_graph"} == \
        {n: r["results"] for n, r in parts.items() if n != "dali_graph"}
    assert again["skipped"] == report["skipped"]


@pytest.mark.parametrize("missing, expect", [
    ("dali", {"agreement", "dali_graph", "end_to_end", "pipeline_bench", "hw_decoder", "gpu_tests"}),
    ("ftfy", {"end_to_end", "pipeline_bench"}),
    ("webdataset", set()),              # only the reference row of pipeline_bench needs it
])
def test_parts_whose_dependencies_are_missing_are_skipped_with_the_reason(missing, expect):
    deps = {name: name != missing for name in report_tool.DEPENDENCIES}
    parts = report_tool.select_parts(None, full=False)
    skipped = {p.name: report_tool.skip_reason(p, True, deps, 1000) for p in parts}
    assert {n for n, r in skipped.items() if r} == expect
    module = report_tool.DEPENDENCIES[missing]
    assert all(r == f"not installed: {module}" for r in skipped.values() if r)


def test_part_selection_time_budget_and_full_run():
    default = [p.name for p in report_tool.select_parts(None, full=False)]
    full = [p.name for p in report_tool.select_parts(None, full=True)]
    assert "train_slip_l16" not in default and {"train_slip_s16", "train_slip_l16", "train_clip_b16",
                                                "train_xclip_b16"} <= set(full)
    assert [p.name for p in report_tool.select_parts(["max_batch", "train"], False)] == ["max_batch", "train"]
    with pytest.raises(SystemExit, match="unknown part"):
        report_tool.select_parts(["nope"], False)
    deps = dict.fromkeys(report_tool.DEPENDENCIES, True)
    train = report_tool.select_parts(["train"], False)[0]
    assert report_tool.skip_reason(train, True, deps, 5).startswith("the run's time budget is spent")
    assert report_tool.skip_reason(train, False, deps, 100) is None          # the CPU smoke run
    dead_peer = report_tool.select_parts(["dead_peer"], False)[0]     # NCCL needs two devices
    assert report_tool.skip_reason(dead_peer, True, deps, 100, gpus=1) == "needs 2 CUDA devices, 1 here"
    assert report_tool.skip_reason(dead_peer, True, deps, 100, gpus=2) is None
    # the default GPU run is sized for a short window; every part is boxed inside it
    assert report_tool.GPU_BUDGET_S <= 240 and report_tool.CPU_BUDGET_S < 120
    assert all(p.seconds <= report_tool.GPU_BUDGET_S for p in report_tool.PARTS)


def test_a_part_that_overruns_its_time_box_is_recorded_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "parts").mkdir()
    part = report_tool.Part("slow", "a part that sleeps", 1)
    ctx = {"out": str(tmp_path), "gpu": False, "deps": {}}
    monkeypatch.setattr(report_tool, "__file__", str(tmp_path / "sleeper.py"))
    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(30)\n")
    rec = report_tool.run_part(part, ctx, 1.0, tmp_path)
    assert rec["status"] == "timeout" and "time box" in rec["error"] and rec["seconds"] < 10
    (tmp_path / "sleeper.py").write_text("raise RuntimeError('broken part')\n")
    rec = report_tool.run_part(part, ctx, 20.0, tmp_path)
    assert rec["status"] == "failed" and "broken part" in rec["error"]


def test_jpeg_engine_load_is_read_from_nvidia_smi_dmon():
    text = """# gpu     sm    mem    enc    dec    jpg    ofa
# Idx      %      %      %      %      %      %
    0     35     10      0      0     62      0
    0     40     12      0      0     70      -
"""
    samples = report_tool.parse_dmon(text)
    assert samples["jpg"] == [62.0, 70.0] and samples["sm"] == [35.0, 40.0] and samples["ofa"] == [0.0]
    old_driver = "# gpu   sm   mem   enc   dec\n# Idx    %     %     %     %\n    0   12     3     0     0\n"
    assert "jpg" not in report_tool.parse_dmon(old_driver)


def test_targets_use_what_was_measured():
    parts = {"pipeline_bench": {"status": "ok", "results": {"rows": {"dali-gpu": {"images_per_s": 3500.0}}}},
             "train": {"status": "ok", "results": {"mfu": 0.31}},
             "train_compiled": {"status": "timeout", "results": {"mfu": 0.43}},
             "end_to_end": {"status": "ok", "results": {"data_device": "gpu", "data_wait": 0.08}}}
    got = {t["part"]: t for t in report_tool.targets(parts)}
    assert got["pipeline_bench"]["met"] and got["pipeline_bench"]["shown"] == "3500 images/s"
    assert got["train, train_compiled"]["measured"] == 0.43 and got["train, train_compiled"]["met"]
    assert got["end_to_end"]["met"] is False and got["end_to_end"]["shown"] == "8.0%"
    parts["end_to_end"]["results"]["data_device"] = "cpu"      # a CPU smoke run measures no target
    assert report_tool.targets(parts)[2]["measured"] is None
