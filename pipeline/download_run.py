"""One builder run's download, fenced from every other run's, and the shard files it may accept.

img2dataset writes a shard as `NNNNN.tar` and `NNNNN.parquet`, then `NNNNN_stats.json`. A run
never lets it write into the shard directory: it downloads into a directory of its own,
`OUT/download/gen-<generation>-<token>/` (the generation and token of the run's lock,
pipeline/build_lock.py), and its `Promoter` thread moves each shard that this run's workers
finished into `OUT/shards/` while the run lives, tar and parquet first and the stats file last
(a stats file in the shard directory means a complete, accepted shard).

So a worker that outlives its run (its main process was SIGKILLed: pool workers are not killed
with it) writes only into its own run's directory, which nothing reads again: the next run
deletes it, counts the shards it had started as redone, and downloads them itself. Shards that
such a worker finished after its run died (as failures, say, because the image server died with
the run) are never accepted, whatever their counts say; img2dataset's temporary `_tmp/*.feather`
files live in the run's directory too, so runs cannot delete each other's.

img2dataset skips the shards whose stats file it finds in its output directory: the run's
directory is seeded with a placeholder stats file for every shard already accepted.

A pool worker killed on its own (the OOM killer picks the largest process) loses its task, and
multiprocessing's pool then waits for it forever. The promoter watches the pool's processes and,
when one dies by a signal (SIGKILL, SIGSEGV...; not SIGTERM, which the pool itself sends its
workers when it ends) while shards are still missing, interrupts the download (SIGINT to the
main thread, which img2dataset handles by ending the pool): the run then ends with a one-line
error, its finished shards kept, and one rerun downloads the rest.
"""
from __future__ import annotations

import json
import multiprocessing
import re
import shutil
import signal
import tarfile
import threading
from pathlib import Path

from tqdm import tqdm

from pipeline.files import write_json_atomic
from pipeline.shards import iter_tar_samples

_SHARD_FILE = re.compile(r"^(\d+)(?:\.tar|\.parquet|_stats\.json)$")
SHARD_SUFFIXES = ("_stats.json", ".tar", ".parquet", ".idx")   # removal order: the stats file first


def stats_files(shard_dir: Path) -> list[Path]:
    return sorted(p for p in shard_dir.glob("*_stats.json") if p.name.split("_")[0].isdigit())


def done_ids(shard_dir: Path) -> set[str]:
    return {p.name.split("_")[0] for p in stats_files(shard_dir)}


def tar_samples(tar: Path) -> int | None:
    """Number of samples with a .jpg in a complete tar, None if the tar is truncated or unreadable."""
    try:
        with tarfile.open(tar) as t:
            return sum(1 for _, parts in iter_tar_samples(t) if "jpg" in parts)
    except (tarfile.TarError, OSError, EOFError):
        return None


def _successes(stats: Path) -> int | None:
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (ValueError, KeyError, TypeError, OSError):
        return None


def remove_incomplete(shard_dir: Path) -> set[str]:
    """Delete every shard of `shard_dir` that is not complete, so that it is downloaded again: a tar
    without its stats file (a kill during promotion), or a stats file whose tar is truncated or
    holds another count. Returns the ids deleted."""
    redo = set()
    for stats in stats_files(shard_dir):
        sid = stats.name.split("_")[0]
        if tar_samples(shard_dir / f"{sid}.tar") != _successes(stats):
            redo.add(sid)
    done = done_ids(shard_dir)
    redo |= {p.stem for p in shard_dir.glob("*.tar") if p.stem.isdigit() and p.stem not in done}
    for sid in redo:
        for suffix in SHARD_SUFFIXES:
            (shard_dir / f"{sid}{suffix}").unlink(missing_ok=True)
    return redo


def check_shards(shard_dir: Path) -> int:
    """`remove_incomplete`, returning how many shards it deleted."""
    return len(remove_incomplete(shard_dir))


def _shard_ids_in(directory: Path) -> set[str]:
    try:
        return {m.group(1) for p in directory.iterdir() if (m := _SHARD_FILE.match(p.name))}
    except FileNotFoundError:
        return set()


class ResumeLedger:
    """`OUT/state/resume.json`: the shards that an interrupted run started (wrote any file of) but
    did not accept, and those of them downloaded again since: the manifest's
    `shards_redone_on_resume` is the count of the latter."""

    def __init__(self, path: Path):
        self.path, self._lock = path, threading.Lock()
        try:
            d = json.loads(path.read_text())
            self.started, self.redone = set(d["started"]), set(d["redone"])
        except (OSError, ValueError, KeyError, TypeError):
            self.started, self.redone = set(), set()

    def add_started(self, ids: set[str]) -> None:
        with self._lock:
            if not ids <= self.started:
                self.started |= ids
                self._save()

    def accepted(self, sid: str) -> None:
        with self._lock:
            if sid in self.started and sid not in self.redone:
                self.redone.add(sid)
                self._save()

    def _save(self):
        write_json_atomic(self.path, {"started": sorted(self.started), "redone": sorted(self.redone)})


class DownloadRun:
    """The directories of one run's download: its own, and those that earlier runs left."""

    def __init__(self, out: Path, generation: int, token: str):
        self.root = out / "download"
        self.dir = self.root / f"gen-{generation:06d}-{token}"

    def earlier(self) -> list[Path]:
        return sorted(p for p in self.root.glob("gen-*") if p != self.dir) if self.root.exists() else []

    def earlier_started(self) -> set[str]:
        """Ids of the shards that earlier runs wrote any file of in their own directories."""
        return set().union(*(_shard_ids_in(d) for d in self.earlier()))

    def remove_earlier(self) -> None:
        for d in self.earlier():     # a worker still writing there may leave a file behind: removed next time
            shutil.rmtree(d, ignore_errors=True)

    def prepare(self, done: set[str]) -> None:
        self.dir.mkdir(parents=True)
        for sid in done:      # img2dataset's incremental mode skips every shard with a *_stats.json
            (self.dir / f"{sid}_stats.json").write_text('{"accepted_earlier": true}\n')

    def started(self) -> set[str]:
        """Ids of the shards this run wrote any file of and did not promote (its seeds excluded)."""
        return {sid for sid in _shard_ids_in(self.dir) if (self.dir / f"{sid}.tar").exists()
                or (self.dir / f"{sid}.parquet").exists()}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.root.rmdir()       # only when no earlier run's directory is left
        except OSError:
            pass


class Promoter:
    """While the download runs: moves each shard this run finished into the shard directory, feeds
    a progress bar, and interrupts the download when a pool worker is killed (see the module doc)."""

    POLL_SECONDS = 0.2

    def __init__(self, run: DownloadRun, shard_dir: Path, done: set[str], expected: int, ledger: ResumeLedger,
                 total_samples: int, progress: bool, watch_workers: bool):
        self.run, self.shard_dir, self.ledger = run, shard_dir, ledger
        self.seeded, self.expected = set(done), expected
        self.promoted: set[str] = set()
        self.rejected: set[str] = set()      # complete stats, wrong tar: never accepted
        self.killed_worker: tuple[int, int] | None = None     # (pid, signal) of a pool worker that was killed
        self.interrupted = False                                # set by the caller: img2dataset was interrupted
        self.watch_workers = watch_workers
        self._workers: dict[int, multiprocessing.Process] = {}
        self._before = {p.pid for p in multiprocessing.active_children()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="promoter", daemon=True)
        self.bar = tqdm(total=total_samples, desc="download", unit="img", disable=not progress, smoothing=0.05)
        self.bar.update(sum(self._count(shard_dir / f"{sid}_stats.json") for sid in done))

    @staticmethod
    def _count(stats: Path) -> int:
        try:
            return int(json.loads(stats.read_text())["count"])
        except (ValueError, KeyError, TypeError, OSError):
            return 0

    def missing(self) -> int:
        return self.expected - len(self.seeded) - len(self.promoted)

    def promote_finished(self) -> None:
        for stats in stats_files(self.run.dir):
            sid = stats.name.split("_")[0]
            if sid in self.seeded or sid in self.promoted or sid in self.rejected:
                continue
            successes = _successes(stats)     # None while img2dataset is still writing it
            if successes is None:
                continue
            tar, parquet = self.run.dir / f"{sid}.tar", self.run.dir / f"{sid}.parquet"
            if tar_samples(tar) != successes:
                self.rejected.add(sid)
                continue
            tar.replace(self.shard_dir / tar.name)
            if parquet.exists():
                parquet.replace(self.shard_dir / parquet.name)
            stats.replace(self.shard_dir / stats.name)           # last: the shard is accepted now
            self.promoted.add(sid)
            self.ledger.accepted(sid)
            self.bar.update(self._count(self.shard_dir / stats.name))

    def _check_workers(self) -> None:
        for p in multiprocessing.active_children():
            if p.pid not in self._before and "PoolWorker" in p.name:
                self._workers.setdefault(p.pid, p)
        for pid, p in list(self._workers.items()):
            code = p.exitcode
            if code is None:
                continue
            del self._workers[pid]
            # SIGTERM is how the pool itself ends its workers (at the end, or after Ctrl-C)
            if code < 0 and code != -signal.SIGTERM and self.killed_worker is None:
                self.promote_finished()     # shards written before the pool ended its workers are not lost
                if self.missing() > 0:
                    self.killed_worker = (pid, -code)
                    # img2dataset's SIGINT handler ends the download; pthread_kill wakes a blocked main thread
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def _loop(self):
        while not self._stop.wait(self.POLL_SECONDS):
            self.promote_finished()
            if self.watch_workers:
                self._check_workers()

    def __enter__(self) -> "Promoter":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.promote_finished()
        self.bar.close()
