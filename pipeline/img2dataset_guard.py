"""The seam through which img2dataset's downloads go through pipeline/fetch.py's guarded opener.

img2dataset's `download()` makes one `Downloader` (the name it imported into `img2dataset.main`)
and pickles it to every worker process it spawns. `guarded_img2dataset(policy)` replaces that name,
for the duration of the call, with `GuardedDownloader`, a subclass that carries the policy and
installs the guarded opener (`pipeline.fetch.install`) in the worker before each shard. The
subclass lives in this module, so a worker unpickling it imports this module whatever the main
program was; the same holds for the pyspark and ray distributors, given this package installed
on the executors. Patching `urlopen` in the parent would not reach spawned workers.

Orphans: a SIGKILLed main process leaves img2dataset's processes behind (the builder fences what
they write, pipeline/download_run.py). So that they do not also run on for ever, its logger
process (which waits to be told to stop) exits once its parent is gone, and with
`exit_orphans=True` (the multiprocessing distributor, whose workers are the main process's
children) a pool worker finishes the shard it is on, then exits instead of starting another.

Imported only when a build downloads: importing img2dataset takes seconds.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import time

from img2dataset.downloader import Downloader
from img2dataset.logger import LoggerProcess

from pipeline.fetch import DownloadPolicy, install

_policy_for_new_downloaders: DownloadPolicy | None = None
_parent_for_new_downloaders: int | None = None
_lock = threading.Lock()
_busy = threading.Event()          # in a worker: a shard is being downloaded
_watching = False


def _exit_when_orphaned(parent: int, busy: threading.Event | None = None) -> None:
    """Start (once per process) a thread that exits the process when `parent` is no longer its
    parent and, if `busy` is given, no shard is in progress."""
    global _watching
    if _watching:
        return
    _watching = True

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent and (busy is None or not busy.is_set()):
                os._exit(0)
    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


class GuardedDownloader(Downloader):
    """img2dataset's Downloader, carrying a DownloadPolicy to the worker that runs it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = _policy_for_new_downloaders or DownloadPolicy()
        self.parent = _parent_for_new_downloaders

    def __call__(self, row):
        if self.parent is not None:
            if os.getppid() != self.parent:        # orphaned: this shard would never be accepted
                os._exit(0)
            _exit_when_orphaned(self.parent, _busy)
        install(self.policy)
        _busy.set()
        try:
            return super().__call__(row)
        finally:
            _busy.clear()


class GuardedLoggerProcess(LoggerProcess):
    """img2dataset's logger process, which exits when the process that started it is gone."""

    def run(self):
        _exit_when_orphaned(os.getppid())
        super().run()


@contextlib.contextmanager
def guarded_img2dataset(policy: DownloadPolicy, exit_orphans: bool = False):
    """Within this block, `img2dataset.download` fetches under `policy`; with `exit_orphans`, its
    pool workers exit after their shard once this process is gone (multiprocessing only)."""
    global _policy_for_new_downloaders, _parent_for_new_downloaders
    # the module, not the function of the same name that img2dataset's __init__ exports
    i2d_main = importlib.import_module("img2dataset.main")
    with _lock:
        original = i2d_main.Downloader, i2d_main.LoggerProcess
        i2d_main.Downloader, i2d_main.LoggerProcess = GuardedDownloader, GuardedLoggerProcess
        _policy_for_new_downloaders = policy
        _parent_for_new_downloaders = os.getpid() if exit_orphans else None
        try:
            yield
        finally:
            i2d_main.Downloader, i2d_main.LoggerProcess = original
            _policy_for_new_downloaders = _parent_for_new_downloaders = None
