"""The download on a real Ray cluster: a head node and a worker node started with `ray start` on
this machine, as the README's SLURM recipe starts them on several, and the builder CLI run with
`--distributor ray` against it. Its result must equal the multiprocessing build of the same data."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.build import BuildConfig, BuildError, build
from pipeline.manifest import load_manifest

from conftest import jpeg, meta_line
from test_build import read_samples

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")

ROWS, SHARD = 200, 50                 # 4 shards
FAULTS = {3: "404", 57: "500", 111: "corrupt", 170: "not_image"}     # row -> fault, spread over the shards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> list[int]:
    """Processes still in process group pgid."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.fixture(scope="module")
def data(image_server, tmp_path_factory):
    """200 YFCC-format rows with tiny images on the loopback server, 4 of them failing downloads."""
    root = tmp_path_factory.mktemp("dist_data")
    (root / "images").mkdir()
    server = image_server(root / "images")
    rows, subset = [], []
    for i in range(ROWS):
        pid = 10_000 + i
        if i in FAULTS:
            url = server.fault_url(FAULTS[i], f"{pid}.jpg")
        else:
            (root / "images" / f"{pid}.jpg").write_bytes(jpeg(40 + i % 23, 30 + i % 17, pid))
            url = server.url(f"{pid}.jpg")
        rows.append(meta_line(i + 1, pid, f"{pid:x}", f"photo+{i}", f"row+{i}+of+the+distributed+test", url))
        subset.append(pid)
    (root / "meta.tsv").write_bytes(b"".join(rows))
    (root / "subset.tsv").write_text("".join(f"{n}\t{pid}\t{pid:x}\n" for n, pid in enumerate(subset, 1)))
    return root, server


SETTINGS = dict(name="dist", url_template="{download_url}", threads=4, image_size=32, shard_size=SHARD,
                timeout=5, max_image_pixels=4_000_000)


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node without CPUs and a worker node with 2: every download task must run on the worker
    node, in processes the head's `ray start` did not make. Both process groups are killed at the end."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))    # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    procs = []

    def start(args, log):
        # the ports Ray would otherwise fix: each node its own, free now (a second run may be going on)
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}"]
        procs.append(subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", *args, *ports,
                                       "--object-store-memory=80000000", "--include-log-monitor=false"],
                                      start_new_session=True, env=env, stdout=open(temp / log, "wb"),
                                      stderr=subprocess.STDOUT))

    try:
        start(["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
               f"--dashboard-port={free_port()}", f"--temp-dir={temp}"],
              "head.log")
        deadline = time.monotonic() + 180                      # generous: the machine may be loaded
        while not (temp / "ray_current_cluster").exists():    # written once the head is up
            assert procs[0].poll() is None and time.monotonic() < deadline, (temp / "head.log").read_text()[-3000:]
            time.sleep(0.2)
        start([f"--address=127.0.0.1:{port}", "--num-cpus=2"], "worker.log")   # the build waits for its CPUs
        yield f"127.0.0.1:{port}"
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:        # that `ray start` already failed and took its group with it
                pass
            p.wait()
        deadline = time.monotonic() + 30
        while any(group_alive(p.pid) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for p in procs for pid in group_alive(p.pid)]
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


def test_ray_build_equals_the_multiprocessing_build(data, ray_cluster, tmp_path):
    root, server = data
    server.requests.clear()
    ref = build(BuildConfig(metadata=root / "meta.tsv", subset=root / "subset.tsv", out=tmp_path / "mp",
                            manifest_dir=tmp_path / "mp", processes=1, progress=False, allow_private_network=True,
                            **SETTINGS))
    assert sorted(server.requests.values()) == [1] * ROWS
    server.requests.clear()
    out = tmp_path / "ray"
    cmd = [sys.executable, "tools/build_yfcc15m.py", "--metadata", root / "meta.tsv", "--subset", root / "subset.tsv",
           "--out", out, "--manifest-dir", out, "--distributor", "ray", "--ray-address", ray_cluster,
           "--allow-private-network", "--no-progress"]
    cmd += [a for k, v in SETTINGS.items() for a in ("--" + k.replace("_", "-"), v)]
    proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.splitlines()[-1])["samples"] == ROWS - len(FAULTS)
    # every image fetched once: one task per shard, none run twice
    assert sorted(server.requests.values()) == [1] * ROWS
    got = load_manifest(out / "dist.json")
    # the same samples, byte for byte: keys, images, captions and metadata (only the tars' headers differ)
    assert read_samples(got) == read_samples(ref)
    assert len(read_samples(got)) == ROWS - len(FAULTS)
    assert [(s.path, s.samples, s.bad_samples) for s in got.shards] == \
        [(s.path, s.samples, s.bad_samples) for s in ref.shards] and len(got.shards) == ROWS // SHARD
    for part in ("download", "verify"):
        assert got.stats[part] == ref.stats[part], part
    assert got.stats["download"]["failures"] == {"http_404": 1, "http_500": 1, "image_decode_error": 2}
    select = {k: v for k, v in got.stats["select"].items() if k != "select_seconds"}
    assert select == {k: v for k, v in ref.stats["select"].items() if k != "select_seconds"}
    assert got.stats["config"]["distributor"] == "ray"


def test_ray_without_a_cluster_is_one_line(data, tmp_path):
    root, _ = data
    port = free_port()             # closed again: nothing listens there
    cfg = BuildConfig(metadata=root / "meta.tsv", subset=None, out=tmp_path / "o", manifest_dir=tmp_path / "o",
                      limit=5, url_template="{download_url}", allow_private_network=True, progress=False,
                      distributor="ray", ray_address=f"127.0.0.1:{port}")
    with pytest.raises(BuildError) as e:      # at once: ray.init alone would wait many minutes
        build(cfg)
    assert str(e.value).startswith(f"distributor ray: no Ray head answers at 127.0.0.1:{port}")
    assert "\n" not in str(e.value) and not list((tmp_path / "o" / "shards").glob("*.tar"))
    with pytest.raises(ValueError, match="pyspark is not supported"):
        BuildConfig(metadata=root / "meta.tsv", subset=None, out=tmp_path / "p", distributor="pyspark")
