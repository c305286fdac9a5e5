"""Coordination through the rendezvous store: a fresh key namespace per group, and waits for work
that only some ranks do, each with its own limit.

Why a fresh namespace: torchrun's agent keeps ONE TCPStore for the whole job (static rendezvous,
and c10d rendezvous since the store became shared), and a restarted worker group writes the same
keys as the group before it. Gloo publishes each rank's listening address under such a key; a new
rank that reads its peer's key before the restarted peer has rewritten it connects to the dead
process's port, gets "Connection refused" four times in about two seconds and gives up (the
restart fails), or waits for a peer that is not there. `fresh_namespace` gives every group a
prefix no earlier group used, agreed by a handshake that stale keys cannot satisfy.

Why the waits: collectives run under the short `dist.timeout_s`, so a dead peer ends the group
quickly. Work that only rank 0 does (writing a checkpoint, evaluating, verifying the checkpoint
to resume from) can take far longer; the other ranks wait for it here, through the store, for up
to `dist.rank0_wait_s`, while rank 0's heartbeat shows it is alive. A rank 0 that dies is noticed
after `dist.timeout_s` without a heartbeat, not after the long limit.
"""
from __future__ import annotations

import pickle
import threading
import time
import uuid
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist

HEARTBEAT_S = 1.0      # how often a working rank shows it is alive
POLL_S = 0.2           # how often a waiting rank looks at the store


class PeerLost(RuntimeError):
    """A peer stopped responding, or did not finish its part in time."""


def fresh_namespace(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> str:
    """A key prefix that no earlier group on `store` used, the same on every rank of this group.

    Rank 0 draws it; every other rank posts a fresh random token and waits for rank 0's answer
    addressed to that token, then acknowledges. Keys an earlier group left behind can neither answer
    a new token nor acknowledge a new prefix, so only this group's ranks agree. A peer that starts
    late is waited for until `timeout_s`."""
    hs = dist.PrefixStore("slip/handshake/", store)
    deadline = time.monotonic() + timeout_s
    if rank != 0:
        token = uuid.uuid4().hex
        hs.set(f"hello/{rank}", token)
        try:
            hs.wait([f"answer/{token}"], timedelta(seconds=timeout_s))
        except RuntimeError as e:
            raise PeerLost(f"rank {rank}: rank 0 did not answer within dist.timeout_s={timeout_s:g} s ({e})") from None
        prefix = hs.get(f"answer/{token}").decode()
        hs.set(f"ack/{prefix}/{rank}", "1")
        return f"slip/{prefix}/"
    prefix = uuid.uuid4().hex
    answered: dict[int, str] = {}
    pending = set(range(1, world_size))
    while pending:
        for r in sorted(pending):
            if hs.check([f"ack/{prefix}/{r}"]):
                pending.discard(r)
            elif hs.check([f"hello/{r}"]):
                token = hs.get(f"hello/{r}").decode()    # possibly a dead group's: its answer goes unread
                if answered.get(r) != token:
                    hs.set(f"answer/{token}", prefix)
                    answered[r] = token
        if pending and time.monotonic() > deadline:
            raise PeerLost(f"rank(s) {sorted(pending)} did not join within dist.timeout_s={timeout_s:g} s")
        if pending:
            time.sleep(0.05)
    return f"slip/{prefix}/"


class _Heartbeat:
    """Adds 1 to `key` every HEARTBEAT_S seconds from a thread, on its own store connection."""

    def __init__(self, store: dist.Store, key: str):
        self.store, self.key = store, key
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="slip-heartbeat")

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.store.add(self.key, 1)
            except RuntimeError:
                return      # the store is gone: the waiters notice the silence

    def __enter__(self):
        self.store.add(self.key, 1)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class Coordinator:
    """Waits for ranks' work through the store (see the module docstring). Every rank calls the
    same methods in the same order; each call gets its own keys."""

    def __init__(self, store: dist.Store, clone: Callable[[], dist.Store], rank: int, world_size: int,
                 timeout_s: float, rank0_wait_s: float):
        self.store, self.clone, self.rank, self.world_size = store, clone, rank, world_size
        self.timeout_s, self.rank0_wait_s = timeout_s, rank0_wait_s
        self.seq = 0

    def rank0_only(self, what: str, fn: Callable[[], Any]) -> Any:
        """`fn()` run on rank 0 only; its result (picklable) on every rank. An exception of rank 0
        is re-raised there and becomes a PeerLost naming it on the others."""
        self.seq += 1
        key = f"phase/{self.seq}"
        if self.rank == 0:
            with _Heartbeat(self.clone(), f"{key}/beat/0"):
                try:
                    result = ("ok", fn())
                except BaseException as e:
                    self.store.set(f"{key}/done/0", pickle.dumps(("error", f"{type(e).__name__}: {e}")))
                    raise
            self.store.set(f"{key}/done/0", pickle.dumps(result))
            return result[1]
        self._wait(what, key, [0])
        status, value = pickle.loads(self.store.get(f"{key}/done/0"))
        if self.store.add(f"{key}/read", 1) == self.world_size - 1:     # the last reader cleans up
            for k in (f"{key}/done/0", f"{key}/read", f"{key}/beat/0"):
                self.store.delete_key(k)
        if status == "error":
            raise PeerLost(f"rank 0 failed during {what}: {value}")
        return value

    def all_ranks(self, what: str, fn: Callable[[], Any]) -> Any:
        """`fn()` on every rank, then wait (with the long limit) until every rank has finished:
        for work whose length differs between ranks, such as loading a large checkpoint."""
        self.seq += 1
        key = f"phase/{self.seq}"
        with _Heartbeat(self.clone(), f"{key}/beat/{self.rank}"):
            result = fn()
        self.store.set(f"{key}/done/{self.rank}", "1")
        self._wait(what, key, range(self.world_size))
        return result

    def _wait(self, what: str, key: str, workers) -> None:
        """Until every rank in `workers` has set `<key>/done/<rank>`, while each unfinished one keeps
        its heartbeat `<key>/beat/<rank>` going: silence for `timeout_s` or a wait past
        `rank0_wait_s` is a PeerLost."""
        start = time.monotonic()
        seen = {r: (-1, start) for r in workers}
        while True:
            # check-and-sleep rather than a timed store.wait: a timed-out wait logs a C++ warning each time
            if self.store.check([f"{key}/done/{r}" for r in workers]):
                return
            time.sleep(POLL_S)
            now = time.monotonic()
            for r, (beat, since) in seen.items():
                if self.store.check([f"{key}/done/{r}"]):
                    seen[r] = (beat, now)
                    continue
                value = int(self.store.add(f"{key}/beat/{r}", 0))
                if value != beat:
                    seen[r] = (value, now)
                elif now - since > self.timeout_s:
                    raise PeerLost(f"rank {r} stopped responding during {what} (no sign of life for "
                                   f"{now - since:.0f} s, dist.timeout_s={self.timeout_s:g})")
            if now - start > self.rank0_wait_s:
                raise PeerLost(f"{what} did not finish on every rank within dist.rank0_wait_s={self.rank0_wait_s:g} s")
