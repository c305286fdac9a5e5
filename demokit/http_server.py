"""A loopback image server (127.0.0.1, free port) for the demo and the tests, with fault injection.

Files under `root` are served at their relative path. Paths under `/fault/<kind>/...` misbehave:

| kind      | response |
| --------- | -------- |
| 404, 500  | that HTTP status |
| hang      | headers never come: sleeps `hang_seconds` (past the downloader's timeout) |
| corrupt   | a JPEG cut in half with garbage after the header |
| not_image | an HTML page served as 200 |
| bomb      | a tiny JPEG whose header claims 50000 x 50000 pixels (decompression bomb) |
| redirect  | `302` to the URL in the `to` query parameter (`redirect_url(target)`) |
| drip      | a JPEG whose bytes come one every `drip_seconds` (a server that never quite stalls) |
| huge      | a body of `huge_bytes` zeros without a Content-Length, sent as fast as it is read |
| huge_length | a Content-Length of 10 GB, then a few bytes |

Every request path is recorded in `requests` (a Counter), so tests can prove that a resumed build
does not fetch finished shards again, or that a refused URL was never requested; `sent` counts the
bytes of the `huge` and `drip` bodies that were written.
"""
from __future__ import annotations

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from PIL import Image


def bomb_jpeg(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid small JPEG with its frame header (SOF0) rewritten to claim width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG", quality=80)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def corrupt_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(buf, "JPEG", quality=80)
    data = buf.getvalue()
    return data[:200] + b"\x00garbage" * 8


class ImageServer:
    """`with ImageServer(root) as srv: srv.url("a/b.jpg")`."""

    def __init__(self, root: str | Path, port: int = 0, hang_seconds: float = 60.0):
        self.root = Path(root).resolve()
        self.hang_seconds = hang_seconds
        self.delay_seconds = 0.0           # added before every file response (slow network, kill tests)
        self.drip_seconds = 0.5            # between the bytes of a `drip` body
        self.huge_bytes = 1 << 30          # the size of a `huge` body
        self.requests: Counter = Counter()
        self.sent: Counter = Counter()     # body bytes written by `huge` and `drip`, by path
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True     # hung handlers must not block shutdown
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, rel: str) -> str:
        return f"{self.base_url}/{rel.lstrip('/')}"

    def fault_url(self, kind: str, name: str = "x.jpg") -> str:
        return self.url(f"fault/{kind}/{name}")

    def redirect_url(self, target: str, name: str = "x.jpg") -> str:
        """A URL answered by a 302 to `target`."""
        return self.fault_url("redirect", name) + "?to=" + quote(target, safe="")

    def start(self) -> "ImageServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):     # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "image/jpeg"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                with server._lock:
                    server.requests[path] += 1
                parts = path.strip("/").split("/")
                try:
                    if parts[0] == "fault" and len(parts) >= 2:
                        return self._fault(parts[1], path)
                    file = (server.root / "/".join(parts)).resolve()
                    if server.root not in file.parents or not file.is_file():
                        return self._send(404, b"not found", "text/plain")
                    time.sleep(server.delay_seconds)
                    self._send(200, file.read_bytes())
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _stream(self, path: str, pieces, pause: float = 0.0):
                for piece in pieces:
                    self.wfile.write(piece)
                    self.wfile.flush()
                    with server._lock:
                        server.sent[path] += len(piece)
                    if pause:
                        time.sleep(pause)

            def _fault(self, kind: str, path: str):
                if kind in ("404", "500"):
                    self._send(int(kind), b"fault", "text/plain")
                elif kind == "hang":
                    time.sleep(server.hang_seconds)
                elif kind == "corrupt":
                    self._send(200, corrupt_jpeg())
                elif kind == "not_image":
                    self._send(200, b"<html><body>Sorry, this photo is no longer available</body></html>",
                               "text/html")
                elif kind == "bomb":
                    self._send(200, bomb_jpeg())
                elif kind == "redirect":
                    target = parse_qs(urlsplit(self.path).query).get("to", [""])[0]
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif kind == "drip":
                    body = corrupt_jpeg()
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self._stream(path, (body[i:i + 1] for i in range(len(body))), server.drip_seconds)
                elif kind == "huge":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.end_headers()        # no Content-Length: the body ends when the connection does
                    piece = bytes(1 << 16)
                    self._stream(path, (piece for _ in range(server.huge_bytes // len(piece))))
                elif kind == "huge_length":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(10 ** 10))
                    self.end_headers()
                    self._stream(path, [bytes(1 << 10)])
                else:
                    self._send(400, b"unknown fault", "text/plain")

        return Handler
