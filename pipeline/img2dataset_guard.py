"""The seam through which img2dataset's downloads go through pipeline/fetch.py's guarded opener.

img2dataset's `download()` makes one `Downloader` (the name it imported into `img2dataset.main`)
and pickles it to every worker process it spawns. `guarded_img2dataset(policy)` replaces that name,
for the duration of the call, with `GuardedDownloader`, a subclass that carries the policy and
installs the guarded opener (`pipeline.fetch.install`) in the worker before each shard. The
subclass lives in this module, so a worker unpickling it imports this module whatever the main
program was; the same holds for the pyspark and ray distributors, given this package installed
on the executors. Patching `urlopen` in the parent would not reach spawned workers.

Imported only when a build downloads: importing img2dataset takes seconds.
"""
from __future__ import annotations

import contextlib
import importlib
import threading

from img2dataset.downloader import Downloader

from pipeline.fetch import DownloadPolicy, install

_policy_for_new_downloaders: DownloadPolicy | None = None
_lock = threading.Lock()


class GuardedDownloader(Downloader):
    """img2dataset's Downloader, carrying a DownloadPolicy to the worker that runs it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = _policy_for_new_downloaders or DownloadPolicy()

    def __call__(self, row):
        install(self.policy)
        return super().__call__(row)


@contextlib.contextmanager
def guarded_img2dataset(policy: DownloadPolicy):
    """Within this block, `img2dataset.download` fetches under `policy`."""
    global _policy_for_new_downloaders
    # the module, not the function of the same name that img2dataset's __init__ exports
    i2d_main = importlib.import_module("img2dataset.main")
    with _lock:
        original = i2d_main.Downloader
        i2d_main.Downloader, _policy_for_new_downloaders = GuardedDownloader, policy
        try:
            yield
        finally:
            i2d_main.Downloader, _policy_for_new_downloaders = original, None
