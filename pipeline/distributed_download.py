"""Where img2dataset's download runs: worker processes on this machine, or a Ray cluster.

img2dataset takes the engine by name (`distributor=`) but leaves connecting to it to its caller:
its Ray distributor submits one task per shard to whatever cluster this process is connected to
(and, connected to none, would quietly start a private one-machine cluster). `download_engine`
connects to the cluster the build names (`BuildConfig.ray_address`: "auto" = the one `ray start`
began on this machine, or HOST:PORT of its head) for the length of the download, and disconnects
after; the cluster stays up.

Ray, not PySpark: Ray is one self-contained wheel per Python version on PyPI (no Java, nothing
outside pip), released every few weeks; PySpark needs a Java runtime that pip cannot install and
the project's set-up would have to bring in from the system's packages on every node. Only the
engines that the test suite runs are accepted (tests/test_build_distributed.py).

What the workers need (docs/DISTRIBUTED_BUILD.md): the same Python environment with this package
importable (a worker unpickles pipeline.img2dataset_guard's downloader; Ray puts the driver's
working directory first on the workers' sys.path, so a shared checkout works as it is), the same
paths for the parquet parts and the run's download folder with its `_tmp` (a shared POSIX file system), and
network access to the image hosts. Workers do not inherit this process's environment; the
variables the download relies on (`worker_env`: OpenCV's pixel limit is read once, when cv2 is
imported) reach them through the job's `runtime_env`.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import sys
import time

DISTRIBUTORS = ("multiprocessing", "ray")


def check_distributor(name: str) -> None:
    if name not in DISTRIBUTORS:
        why = " (pyspark is not supported: it needs a Java runtime; use ray)" if name == "pyspark" else ""
        raise ValueError(f"distributor must be one of {', '.join(DISTRIBUTORS)}, got {name!r}{why}")


def worker_env(max_image_pixels: int) -> dict[str, str]:
    """Environment the download workers need (multiprocessing workers inherit it from this process)."""
    return {"OPENCV_IO_MAX_IMAGE_PIXELS": str(max_image_pixels), "NO_ALBUMENTATIONS_UPDATE": "1"}


def _probe(address: str, error) -> None:
    """Fail fast when nothing listens at HOST:PORT: ray.init waits many minutes for a dead address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise error(f"distributor ray: ray_address must be 'auto' or HOST:PORT of the head node, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise error(f"distributor ray: no Ray head answers at {address} ({e.strerror or e}); start one with "
                    f"`ray start --head` (README, 'Many machines')") from None


@contextlib.contextmanager
def download_engine(distributor: str, ray_address: str, env: dict[str, str], announce: bool = True,
                    wait_for_cpu_seconds: float = 120.0):
    """Around img2dataset's `download(distributor=...)`: connected to the Ray cluster for "ray",
    nothing to do for "multiprocessing". Connection and task failures become one-line BuildErrors.
    `announce`: say where the download runs and pass the workers' output on (the build's progress)."""
    check_distributor(distributor)
    if distributor != "ray":
        yield
        return
    from pipeline.build import BuildError    # here, not at the top: pipeline.build imports this module
    try:
        import ray
    except ImportError:
        raise BuildError("distributor ray: the `ray` package is not installed (tools/setup_env.sh installs it; "
                         "or pip install 'ray>=2.9')") from None
    if ray.is_initialized():
        raise BuildError("distributor ray: this process is already connected to Ray; let the build connect "
                         "(BuildConfig.ray_address), so that its workers get the download limits")
    if ray_address != "auto":
        _probe(ray_address, BuildError)
    try:
        ray.init(address=ray_address, runtime_env={"env_vars": env}, log_to_driver=announce,
                 logging_level=logging.INFO if announce else logging.WARNING)
    except ConnectionError as e:
        raise BuildError(f"distributor ray: {str(e).splitlines()[0]} (start one with `ray start --head`; "
                         f"README, 'Many machines')") from None
    try:
        # worker nodes join on their own time (srun starts them beside the build): wait for the first CPU
        deadline = time.monotonic() + wait_for_cpu_seconds
        while (cpus := int(ray.cluster_resources().get("CPU", 0))) < 1 and time.monotonic() < deadline:
            time.sleep(1.0)
        if cpus < 1:
            raise BuildError(f"distributor ray: no node of the cluster at {ray_address} offers a CPU to run "
                             f"downloads on after {wait_for_cpu_seconds:.0f} s (did the workers' `ray start` fail?)")
        if announce:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            print(f"download on Ray: {nodes} node(s), {cpus} CPU(s), one shard per CPU at a time", file=sys.stderr)
        try:
            yield
        except ray.exceptions.RayError as e:     # a task that could not run at all (not a failed image)
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise BuildError(f"distributor ray: a download task failed on the cluster: {first[:300]} "
                             f"(is this package installed, and the output folder visible, on every node?)") from None
    finally:
        ray.shutdown()
