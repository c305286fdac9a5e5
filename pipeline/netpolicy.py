"""Which URLs the builder may fetch: the network policy, as pure functions of a URL or an address.

URL lists come from strangers, and a URL can point the build machine at itself or at its network
(a cloud metadata service at 169.254.169.254, an admin page on a private address, a database on
loopback). The rules, each a refusal counted under its reason:

- the scheme is `http` or `https` (`rejected_url`), never `file:`, `ftp:`, `data:`...; this rule
  holds in every mode, for the URL and for every redirect;
- the URL carries no user name or password (`url_credentials`), in every mode;
- the host is not, and does not resolve to, an address that is unspecified, loopback, link-local,
  multicast, private or reserved (`unspecified_address`, `loopback_address`,
  `link_local_address`, `multicast_address`, `private_address`, `reserved_address`): IPv4 and
  IPv6, an IPv4 address inside an IPv6 one (mapped, 6to4, Teredo, NAT64) included, whatever the
  spelling (`0x7f000001`, `2130706433`, `0177.1` and `127.1` are all 127.0.0.1, as the C
  resolver reads them). A name is refused when any of its addresses is. `allow_private=True`
  (the builder's `--allow-private-network`, and the demo, whose images come from a loopback
  server) lifts this rule only.

The builder applies the rules when it selects URLs (names resolved once per host) and again at
download time (pipeline/fetch.py) on the address actually connected to and on every redirect.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")
REJECTED_URL = "rejected_url"
URL_CREDENTIALS = "url_credentials"
ADDRESS_REASONS = ("unspecified_address", "loopback_address", "link_local_address", "multicast_address",
                   "private_address", "reserved_address")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_PLAIN_ORIGIN = re.compile(r"https?://[a-z0-9.-]+(?=[/?#]|$)")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _ipv4_part(text: str) -> int | None:
    """One dotted part as inet_aton reads it: 0x hex, 0 octal, else decimal; None if not a number."""
    try:
        if text[:2].lower() == "0x":
            return int(text[2:], 16) if text[2:] else 0
        if len(text) > 1 and text[0] == "0":
            return int(text[1:], 8)
        return int(text, 10) if text.isdigit() else None
    except ValueError:
        return None


def parse_numeric_host(host: str) -> IPAddress | None:
    """The address a numeric host names, in any spelling the C resolver accepts (IPv4: one to four
    dot-separated parts, each decimal, octal or hex, the last filling the remaining bytes; IPv6,
    with or without brackets and a zone); None for a name."""
    host = host.strip("[]").rstrip(".")
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return None
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(parts):
        return None
    values = [_ipv4_part(p) for p in parts]
    if any(v is None for v in values):
        return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (5 - len(values))):
        return None
    value = 0
    for v in head:
        value = value << 8 | v
    return ipaddress.IPv4Address(value << (8 * (5 - len(values))) | last)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]        # the client's address
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_reason(ip: IPAddress) -> str | None:
    """Why the builder may not connect to `ip` (one of ADDRESS_REASONS), or None for a global address."""
    if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_ipv4(ip)) is not None:
        if (reason := address_reason(inner)) is not None:
            return reason
    if ip.is_unspecified:
        return "unspecified_address"
    if ip.is_loopback:
        return "loopback_address"
    if ip.is_link_local:
        return "link_local_address"
    if ip.is_multicast:
        return "multicast_address"
    if ip.is_reserved:          # before private: Python counts 240.0.0.0/4 as both
        return "reserved_address"
    if ip.is_private:
        return "private_address"
    if not ip.is_global:        # shared address space (100.64.0.0/10) and the like
        return "reserved_address"
    return None


def resolve(host: str, port: int | None = None) -> list[IPAddress]:
    """Every address `host` resolves to (socket.getaddrinfo); OSError when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as e:
        raise OSError(f"{host!r}: not a valid host name ({e})") from None
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


def host_reason(host: str, port: int | None = None, resolve_names: bool = True) -> str | None:
    """Why `host` may not be fetched from: its numeric address, or any address its name resolves
    to, is refused. A name that does not resolve (or is not resolved) passes here; the download
    fails on it later, or is checked then."""
    ip = parse_numeric_host(host)
    if ip is not None:
        return address_reason(ip)
    if not resolve_names:
        return None
    try:
        addresses = resolve(host, port)
    except OSError:
        return None
    return next((r for r in map(address_reason, addresses) if r is not None), None)


def url_reason(url: str, allow_private: bool = False, resolve_names: bool = True) -> tuple[str, str] | None:
    """None when the policy allows fetching `url`, else (reason, what is wrong) with reason
    `rejected_url`, `url_credentials` or one of ADDRESS_REASONS."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return REJECTED_URL, f"unparsable URL ({e})"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return REJECTED_URL, f"scheme {parts.scheme!r} is not http or https"
    if parts.username is not None or parts.password is not None:
        return URL_CREDENTIALS, "the URL carries a user name or password"
    host = parts.hostname
    if not host:
        return REJECTED_URL, "no host"
    if allow_private:
        return None
    reason = host_reason(host, port, resolve_names)
    return (reason, f"host {host!r}") if reason is not None else None


class UrlChecker:
    """`url_reason` for many URLs of few hosts: each host name is resolved once (up to `max_hosts`
    names; beyond that a name is left to the check at download time, so a hostile list of
    millions of distinct names costs no million lookups)."""

    def __init__(self, allow_private: bool = False, max_hosts: int = 4096):
        self.allow_private, self.max_hosts = allow_private, max_hosts
        self._hosts: dict[str, str | None] = {}
        self._origins: dict[str, tuple[str, str] | None] = {}

    def __call__(self, url: str) -> tuple[str, str] | None:
        # A URL starting `http(s)://host` with a plain lower-case host, then /, ?, # or the end, gets
        # the answer of the first URL with that start: scheme, credentials, host and port all lie in it.
        m = _PLAIN_ORIGIN.match(url)
        if m is None:
            return self._check(url)
        origin = m.group()
        if origin in self._origins:
            return self._origins[origin]
        answer = self._check(url)
        if len(self._origins) < self.max_hosts:
            self._origins[origin] = answer
        return answer

    def _check(self, url: str) -> tuple[str, str] | None:
        refused = url_reason(url, self.allow_private, resolve_names=False)
        if refused is not None or self.allow_private:
            return refused
        host = urlsplit(url).hostname or ""
        if host not in self._hosts:
            if len(self._hosts) >= self.max_hosts:
                return None
            self._hosts[host] = host_reason(host, resolve_names=True)
        reason = self._hosts[host]
        return (reason, f"host {host!r} resolves to a refused address") if reason is not None else None
