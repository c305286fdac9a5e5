"""Downloads under the network policy and within bounds: what img2dataset's fetches may reach and read.

img2dataset (1.47) fetches each image with `urllib.request.urlopen(request, timeout=timeout)` and
reads the whole body with `.read()`, in worker processes it starts with multiprocessing "spawn".
`urlopen` goes through the process's installed opener (`urllib.request.install_opener`), so the
guard is an opener built here, installed in each worker before it downloads a shard:

- only `http` and `https` are handled at all (no `ftp`, `file` or `data` handler is installed);
- every request, the first and each redirect, passes the policy of pipeline/netpolicy.py; the
  connection itself resolves the host, refuses it when any of its addresses is refused, and
  connects to the address it checked (a name that changes its answer between the check and the
  connection gains nothing); redirects go to `http(s)` only;
- one download reads at most `max_bytes` of a response body (a larger Content-Length is
  refused before reading) and ends after `max_seconds` in all: every read from the socket waits at
  most what is left, so a server that drips a byte every few seconds cannot keep it going.

Refusals and overruns raise `DownloadRefused` / `DownloadTooLarge` / `DownloadTooSlow`, whose
messages img2dataset records per sample; the builder counts them by reason
(pipeline/build.py FAILURE_REASONS).

How img2dataset's workers come to use it: pipeline/img2dataset_guard.py.
"""
from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urljoin

from pipeline.netpolicy import address_reason, url_reason

READ_PIECE = 1 << 16


@dataclass(frozen=True)
class DownloadPolicy:
    allow_private: bool = False        # lift the address rule (never the scheme rule)
    max_bytes: int = 50_000_000        # body bytes of one download
    max_seconds: float = 60.0          # one download in all: connecting, redirects, headers and body


class DownloadRefused(OSError):
    """A URL, redirect or address the network policy refuses."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"refused by the network policy: {reason} ({detail})")
        self.reason = reason


class DownloadTooLarge(OSError):
    def __init__(self, limit: int):
        super().__init__(f"download over the size limit of {limit} bytes")


class DownloadTooSlow(OSError):
    def __init__(self, limit: float):
        super().__init__(f"download over the time limit of {limit:g} s")


# ---------------------------------------------------------------- bounded reading

class _DeadlineReader(io.RawIOBase):
    """The socket reader of a response, each read waiting at most until the download's deadline."""

    def __init__(self, raw, sock, deadline: float, policy: DownloadPolicy):
        self.raw, self.sock, self.deadline, self.policy = raw, sock, deadline, policy
        self.timeout = sock.gettimeout()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DownloadTooSlow(self.policy.max_seconds)
        self.sock.settimeout(left if self.timeout is None else min(self.timeout, left))
        try:
            return self.raw.readinto(buffer)
        except TimeoutError:
            if time.monotonic() >= self.deadline:
                raise DownloadTooSlow(self.policy.max_seconds) from None
            raise

    def close(self) -> None:
        self.raw.close()        # releases the socket as the response's own reader would
        super().close()


class _BoundedResponse(http.client.HTTPResponse):
    """A response read against the download's deadline and byte limit."""

    def __init__(self, sock, *args, deadline: float, policy: DownloadPolicy, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline, policy))
        self.policy, self.body_read = policy, 0

    def begin(self):
        super().begin()
        if self.length is not None and self.length > self.policy.max_bytes:
            raise DownloadTooLarge(self.policy.max_bytes)

    def _count(self, data: bytes) -> bytes:
        self.body_read += len(data)
        if self.body_read > self.policy.max_bytes:
            self.close()
            raise DownloadTooLarge(self.policy.max_bytes)
        return data

    def read(self, amt=None):
        if amt is not None:
            return self._count(super().read(amt))
        pieces = []
        while piece := self._count(super().read(READ_PIECE)):
            pieces.append(piece)
        return b"".join(pieces)


# ---------------------------------------------------------------- connections that check the address

def _connect_checked(address, timeout, source_address=None, *, policy: DownloadPolicy, deadline: float,
                     check: bool):
    """socket.create_connection, but to an address of the host that the policy allows (`check`),
    within the download's deadline."""
    host, port = address
    left = deadline - time.monotonic()
    if left <= 0:
        raise DownloadTooSlow(policy.max_seconds)
    timeout = min(timeout, left) if isinstance(timeout, (int, float)) else left
    if not check:
        return socket.create_connection(address, timeout, source_address)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if (reason := address_reason(ip)) is not None:
            raise DownloadRefused(reason, f"{host} resolves to {ip}")
    error = OSError(f"{host}: no address")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error


class _GuardedConnectionMixin:
    def __init__(self, *args, policy: DownloadPolicy, deadline: float, check: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_connect_checked, policy=policy, deadline=deadline, check=check)
        self.response_class = functools.partial(_BoundedResponse, deadline=deadline, policy=policy)


class _GuardedHTTPConnection(_GuardedConnectionMixin, http.client.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnectionMixin, http.client.HTTPSConnection):
    pass


class _GuardedHandlerMixin:
    """Checks each request (scheme, credentials, a numeric host) and opens it through a guarded
    connection. Behind a proxy the proxy connects, so the target's name is resolved and checked here."""

    def __init__(self, policy: DownloadPolicy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy

    def _check(self, req):
        refused = url_reason(req.full_url, self.policy.allow_private, resolve_names=False)
        if refused is not None:
            raise DownloadRefused(*refused)
        if getattr(req, "_download_deadline", None) is None:
            req._download_deadline = time.monotonic() + self.policy.max_seconds
        return req

    def _open(self, connection_class, req, **kwargs):
        proxied = req.has_proxy() or getattr(req, "_tunnel_host", None) is not None
        if proxied and not self.policy.allow_private:
            refused = url_reason(req.full_url, allow_private=False, resolve_names=True)
            if refused is not None:
                raise DownloadRefused(*refused)
        factory = functools.partial(connection_class, policy=self.policy, deadline=req._download_deadline,
                                    check=not proxied and not self.policy.allow_private, **kwargs)
        return self.do_open(factory, req)


class _GuardedHTTPHandler(_GuardedHandlerMixin, urllib.request.HTTPHandler):
    def http_request(self, req):
        return super().http_request(self._check(req))

    def http_open(self, req):
        return self._open(_GuardedHTTPConnection, req)


class _GuardedHTTPSHandler(_GuardedHandlerMixin, urllib.request.HTTPSHandler):
    def https_request(self, req):
        return super().https_request(self._check(req))

    def https_open(self, req):
        return self._open(_GuardedHTTPSConnection, req, context=self._context)


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Redirects to http(s) only, each target checked like a first request (before urllib's own
    scheme rule, which would follow `ftp:`), within the same deadline."""

    def __init__(self, policy: DownloadPolicy):
        self.policy = policy

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            target = urljoin(req.full_url, target)
            refused = url_reason(target, self.policy.allow_private, resolve_names=False)
            if refused is not None:
                fp.close()
                raise DownloadRefused(f"redirect_{refused[0]}", f"to {target[:120]!r}: {refused[1]}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new._download_deadline = getattr(req, "_download_deadline", None)
        return new


def guarded_opener(policy: DownloadPolicy) -> urllib.request.OpenerDirector:
    """An opener with only the http(s) handlers, guarded by `policy` (proxies from the environment
    are honoured, as urllib's default opener does)."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), _GuardedHTTPHandler(policy),
                    _GuardedHTTPSHandler(policy), urllib.request.HTTPDefaultErrorHandler(),
                    _GuardedRedirectHandler(policy), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def install(policy: DownloadPolicy) -> None:
    """Make `urllib.request.urlopen` in this process go through `guarded_opener(policy)`."""
    urllib.request.install_opener(guarded_opener(policy))
