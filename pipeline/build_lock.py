"""One builder per output directory at a time, and a generation number that fences older runs.

A builder holds `OUT/state/lock/gen-NNNNNN.lock` (JSON: host, PID, the PID's start time, a random
token, when). The file is made complete in a temporary file and then hard-linked to its name:
`link()` is atomic and fails when the name exists, on local disks and on NFS alike, so two
builders can never both hold the same number (flock would not do: it is advisory and not
honoured by every shared file system).

The lock with the highest number is the one that counts. A new builder reads it and:

- refuses with one line naming the holder's host and PID when it may still run (a live process
  on this host, or any holder on another host: its liveness cannot be checked from here);
- otherwise (released, or its process on this host is gone or is now another process) takes the
  next number; if someone else took it first, it reads that holder and decides again.

A stale lock is never deleted to take it over, so no two builders can both "break" the same lock.
The number grows with every run; the token (unique per run) names the run's download directory,
so an orphaned worker of an earlier run can only ever write into its own run's directory.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.build_errors import BuildError

_NAME = re.compile(r"^gen-(\d{6,})\.lock$")


class BuildLocked(BuildError):
    """Another builder holds the output directory."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_start: str | None      # /proc/PID/stat start time: tells a reused PID apart
    token: str
    since: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.since))
        return f"host {self.host}, PID {self.pid}, since {since}"


def _pid_start(pid: int) -> str | None:
    """The start time of `pid` (clock ticks since boot) and its state letter, or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "; comm may hold spaces
    return f"{fields[19]}:{fields[0]}"              # starttime, state


def _alive(holder: Holder) -> bool:
    """Whether the holder may still run. Only a process on this host can be checked."""
    if holder.host != socket.gethostname():
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _pid_start(holder.pid)
    if now is None or holder.pid_start is None:
        return True
    start, state = now.split(":")
    # a zombie has exited; another start time is another process that got the same PID
    return state not in ("Z", "X") and start == holder.pid_start.split(":")[0]


class BuildLock:
    """`with BuildLock(out) as lock:` ... `lock.generation`, `lock.token`. Reentrant within a process."""

    _held: dict[Path, "BuildLock"] = {}

    def __init__(self, out: str | Path):
        self.dir = Path(out) / "state" / "lock"
        self.generation, self.token, self.path, self._depth = 0, "", None, 0

    def __enter__(self) -> "BuildLock":
        key = self.dir.resolve()
        outer = BuildLock._held.get(key)
        if outer is not None and outer.path is not None:     # nested use in the holding process
            outer._depth += 1
            self.generation, self.token, self.path, self._outer = outer.generation, outer.token, outer.path, outer
            return self
        self._outer = None
        self._acquire()
        self._depth = 1
        BuildLock._held[key] = self
        return self

    def __exit__(self, *exc):
        holder = self._outer or self
        holder._depth -= 1
        if holder._depth == 0:
            BuildLock._held.pop(self.dir.resolve(), None)
            holder.path.unlink(missing_ok=True)

    def _numbers(self) -> list[int]:
        try:
            return sorted(int(m.group(1)) for p in os.listdir(self.dir) if (m := _NAME.match(p)))
        except FileNotFoundError:
            return []

    def _file(self, n: int) -> Path:
        return self.dir / f"gen-{n:06d}.lock"

    def _read(self, n: int) -> Holder | None:
        """The holder of lock n; None if that file is gone (released)."""
        for _ in range(50):
            try:
                return Holder(**json.loads(self._file(n).read_text()))
            except FileNotFoundError:
                return None
            except (ValueError, TypeError):   # written by hand or by an older version: unreadable
                time.sleep(0.01)
        raise BuildError(f"{self._file(n)}: not a lock file of this builder; if no build is running on "
                         f"{self.dir.parent.parent}, delete it and rerun")

    def _acquire(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        me = Holder(host=socket.gethostname(), pid=os.getpid(), pid_start=_pid_start(os.getpid()),
                    token=secrets.token_hex(4), since=time.time())
        tmp = self.dir / f".new-{me.host}-{me.pid}-{me.token}.tmp"
        tmp.write_text(json.dumps(asdict(me)) + "\n")
        try:
            while True:
                numbers = self._numbers()
                top = numbers[-1] if numbers else 0
                holder = self._read(top) if top else None
                if holder is not None and _alive(holder):
                    raise BuildLocked(f"{self.dir.parent.parent} is being built by another builder "
                                      f"({holder.describe()}, lock {self._file(top)}); wait for it to end, or if "
                                      f"it no longer runs, delete that lock file and rerun")
                try:
                    os.link(tmp, self._file(top + 1))
                except FileExistsError:
                    continue              # another builder took that number first: read it
                self.generation, self.token, self.path = top + 1, me.token, self._file(top + 1)
                break
        finally:
            tmp.unlink(missing_ok=True)
        for n in numbers:                 # older locks: released or stale, and superseded now
            if n < self.generation:
                self._file(n).unlink(missing_ok=True)
