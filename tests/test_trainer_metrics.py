"""metrics.jsonl writing, truncation on resume, and the PNG plots of tools/plot_metrics.py."""
import json
import subprocess
import sys
from pathlib import Path

from trainer.metrics import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]


def _write_run(out: Path, steps: int) -> None:
    m = MetricsLogger(out, rank=0, total_steps=steps)
    for s in range(1, steps + 1):
        m.log(s, {"loss": 5.0 / s, "clip_loss": 3.0 / s, "ssl_loss": 2.0 / s, "lr": 1e-3 * s / steps,
                  "images_per_s": 100.0 + s, "step_time": 0.5, "data_wait": 0.02, "logit_scale": 14.3})
        m.advance()
    m.event(3, "nonfinite", "step skipped")
    m.close("done: summary")


def test_resume_truncates_later_steps(tmp_path):
    _write_run(tmp_path, 6)
    MetricsLogger(tmp_path, rank=0, total_steps=6, start_step=4).close()
    steps = [json.loads(l).get("step") for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 3]     # step records 1..4 and the step-3 event; 5, 6, summary gone
    assert MetricsLogger(tmp_path, rank=1, total_steps=6).enabled is False


def test_kill_during_the_resume_trim_keeps_the_history(tmp_path):
    """A process SIGKILLed while trimming metrics.jsonl for a resume (the trimmed copy written, not
    yet renamed): the file is the whole old history, never empty or half-written."""
    import textwrap
    _write_run(tmp_path, 6)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    code = textwrap.dedent(f"""
        import os, signal
        from trainer.metrics import MetricsLogger
        os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)
        MetricsLogger({str(tmp_path)!r}, rank=0, total_steps=6, start_step=4)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    MetricsLogger(tmp_path, rank=0, total_steps=6, start_step=4).close()     # the rerun trims it
    steps = [json.loads(l).get("step") for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 3]


def test_plot_metrics_writes_pngs(tmp_path):
    _write_run(tmp_path, 5)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": \n')   # a line cut by a kill: warned about, skipped
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"{tmp_path / 'metrics.jsonl'}:" in proc.stderr and "not JSON" in proc.stderr
    for name in ("losses", "lr", "throughput", "data_wait", "logit_scale"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_meters_and_cadences():
    import time

    import pytest

    from trainer.metrics import RunningMean, ThroughputMeter, model_flops_utilisation
    from trainer.policies import Every, NonFiniteLossError, NonFinitePolicy
    meter = ThroughputMeter(samples_per_step=8)
    with meter.waiting_for_data():
        time.sleep(0.01)
    meter.step(3e9)
    meter.step(1e9)
    w = meter.window()
    assert w["images_per_s"] == pytest.approx(16 / (2 * w["step_time"]))
    assert w["flops_per_sample"] == pytest.approx(2e9)      # the mean of the steps' FLOPs per sample
    assert 0 < w["data_wait"] <= 1 and meter.total_wait >= 0.01
    meter.restart()
    assert meter.window_steps == 0 and meter.window_wait == 0.0 and meter.total_wait >= 0.01
    assert meter.window_flops == 0.0
    assert model_flops_utilisation(100.0, 1e12, 1e15, 2) == pytest.approx(0.05)
    mean = RunningMean()
    assert mean.mean is None
    mean.add(1.0)
    mean.add(2.0)
    assert mean.mean == 1.5
    assert [s for s in range(1, 13) if Every(4)(s)] == [4, 8, 12] and not any(Every(0)(s) for s in range(9))
    NonFinitePolicy(2).check(1, 5, Path("ck"))
    with pytest.raises(NonFiniteLossError, match="2 non-finite steps in a row \\(last at step 6\\)"):
        NonFinitePolicy(2).check(2, 6, Path("ck"))
    with pytest.raises(NonFiniteLossError, match="The last good checkpoint is ck/step_00000004.pt"):
        NonFinitePolicy(2).check(2, 6, Path("ck/step_00000004.pt"))
    with pytest.raises(NonFiniteLossError, match="No checkpoint was written or resumed from"):
        NonFinitePolicy(2).check(2, 6, None)
