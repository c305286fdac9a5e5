"""Bad input ends every tool with one line that says what to do and a nonzero exit status; the
traceback shows only under the one debug switch (SLIP_DEBUG=1 or --debug), the same for every tool
(pipeline/cli.py). Real runs: the trainer on a shard set whose shard was truncated after the build,
in one process and under torchrun with 2 gloo ranks; the builder and the verifier on missing input."""
from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_resume_safety import BASE, make_data
from test_trainer import RUN, _free_port

from pipeline import cli
from pipeline.manifest import ShardError

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted((ROOT / "tools").glob("*.py")) + [ROOT / "trainer" / "run.py"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop(cli.DEBUG_ENV, None)


@pytest.fixture(scope="module")
def resized(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-shard set whose second tar lost its last 512 bytes after the build: (manifest, that tar)."""
    manifest = make_data(tmp_path_factory.mktemp("resized") / "shards")
    tar = manifest.parent / "00001.tar"
    os.truncate(tar, tar.stat().st_size - 512)
    return manifest, tar


def train(manifest: Path, out: Path, *extra: str, env=ENV, torchrun: bool = False) -> subprocess.CompletedProcess:
    args = [*BASE, f"data.manifest={manifest}", f"out_dir={out}", *extra]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), *RUN[1:], *args] if torchrun else [*RUN, *args])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def assert_the_shard_line(line: str, manifest: Path, tar: Path) -> None:
    assert line.startswith("data error: ") and str(tar) in line and "bytes, the manifest says" in line
    assert "restore the shard from a good copy or rerun the build" in line
    assert f"python tools/verify_shards.py {manifest}" in line


def test_a_resized_shard_ends_training_with_one_line(resized, tmp_path):
    manifest, tar = resized
    proc = train(manifest, tmp_path / "run")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert_the_shard_line(lines[0], manifest, tar)


def test_the_debug_switch_shows_the_traceback(resized, tmp_path):
    """SLIP_DEBUG=1 here; --debug is the same switch (run_main sets it; tested on the tools below)."""
    manifest, tar = resized
    proc = train(manifest, tmp_path / "run", env={**ENV, "SLIP_DEBUG": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):", proc.stderr[-3000:]
    assert any(l.startswith("pipeline.manifest.ShardError: ") for l in lines)
    assert any("build_sample_table" in l for l in lines)          # where it was raised
    assert_the_shard_line(lines[-1], manifest, tar)


def test_under_torchrun_rank_0_says_it_once(resized, tmp_path):
    """Both ranks meet the shard; rank 0's line is printed (before, rank 0 could be ended by
    torchrun before printing it, leaving only torchrun's own traceback). torchrun's summary of the
    failed workers follows it: that is the launcher's, and names rank 0's exit status 2."""
    manifest, tar = resized
    proc = train(manifest, tmp_path / "run", torchrun=True)
    assert proc.returncode != 0
    ours = [l for l in proc.stderr.splitlines() if l.startswith("data error")]
    assert len(ours) == 1, proc.stderr[-4000:]
    assert_the_shard_line(ours[0], manifest, tar)
    assert "exitcode  : 2" in proc.stderr
    assert "pipeline.manifest.ShardError" not in proc.stderr      # no worker traceback


@pytest.mark.parametrize("tool", ["build_yfcc15m", "verify_shards"])
def test_tools_say_a_missing_input_in_one_line(tmp_path, tool):
    missing = tmp_path / "nothing_here"
    args = {"build_yfcc15m": ["--metadata", str(missing), "--out", str(tmp_path / "out")],
            "verify_shards": [str(missing)]}[tool]
    cmd = [sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    errors = [l for l in plain.stderr.splitlines() if l.startswith("error:")]
    assert plain.returncode == debug.returncode == 2
    assert len(errors) == 1 and str(missing) in errors[0] and "Traceback" not in plain.stderr, plain.stderr
    assert "Traceback (most recent call last):" in debug.stderr and debug.stderr.splitlines()[-1] == errors[0]


def test_every_entry_point_ends_through_the_shared_wrapper():
    """Each tools/*.py and trainer/run.py ends with `sys.exit(run_main(main))` from pipeline.cli, and
    none prints an `error:` line of its own (report() does, honouring the debug switch)."""
    for path in ENTRY_POINTS:
        tree = ast.parse(path.read_text())
        imported = {a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "pipeline.cli"
                    for a in n.names}
        main_blocks = [n for n in tree.body if isinstance(n, ast.If) and "__name__" in ast.unparse(n.test)]
        assert "run_main" in imported, f"{path.name}: does not import pipeline.cli.run_main"
        assert len(main_blocks) == 1 and ast.unparse(main_blocks[0].body[-1]) == "sys.exit(run_main(main))", path.name
        own = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "print"
               and "'error: " in ast.unparse(n) and "sys.stderr" in ast.unparse(n) and "{e}" in ast.unparse(n)]
        assert not own, f"{path.name} prints an exception itself: {own}"


def test_run_main_takes_the_flag_and_keeps_a_bug_traceback(monkeypatch, capsys):
    monkeypatch.setenv(cli.DEBUG_ENV, "0")      # off, and restored after the test (run_main sets it)
    seen = []

    def bad_input(argv):
        seen.append(argv)
        raise ShardError("x.tar: missing\nsecond line")

    assert cli.run_main(bad_input, ["a", "b"]) == 2
    assert capsys.readouterr().err == "error: x.tar: missing second line\n"      # always one line
    assert cli.run_main(bad_input, ["a", "--debug", "b"]) == 2
    assert seen[-1] == ["a", "b"] and os.environ[cli.DEBUG_ENV] == "1"      # passed on to child processes
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv(cli.DEBUG_ENV, "0")

    def bug(argv):
        raise KeyError("a bug, not an input error")
    with pytest.raises(KeyError):
        cli.run_main(bug, [])


def test_another_rank_reports_its_own_failure_after_the_grace(monkeypatch, capsys):
    monkeypatch.setenv(cli.DEBUG_ENV, "0")
    monkeypatch.setattr(cli, "OTHER_RANK_GRACE_S", 0.01)
    handler = signal.getsignal(signal.SIGTERM)      # report() puts SIGTERM back to its default on rank > 0
    try:
        assert cli.report(ShardError("y.tar: missing"), 2, "data error", rank=1) == 2
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert capsys.readouterr().err == "data error (rank 1): y.tar: missing\n"
