"""A fault-injecting HTTP proxy in front of a real S3 server, for object-storage fault tests.

Usage::

    with FaultProxy(s3server.endpoint_url) as proxy:
        proxy.set(status=503, first=3)          # the first 3 requests get 503 SlowDown
        opts = proxy.storage_options(s3server.storage_options)   # the same server, through the proxy

Requests are forwarded byte for byte (the Host header included, so SigV4 signatures made for
the proxy's address still verify upstream).  A request selected for a fault — one of the first
``first`` requests counted from the last ``set``, or any request with probability ``rate``
(seeded), optionally only those whose path contains ``match`` — gets, instead of the upstream
answer:

* ``status=503`` (or any code): an S3 XML error body (``code``: SlowDown, InternalError, ...);
* ``delay=S``: the request is held for S seconds before it is forwarded (a client read timeout
  shorter than S sees a timeout);
* ``reset=True``: the connection is closed without an answer.

``requests`` counts every request seen, ``faults`` those that got a fault; ``seen`` lists the
(method, path) of every request, ``log`` the faulted ones with their outcome.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_STATUS_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout"}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client that gave up: not our business
        pass


class FaultProxy:
    """A threaded HTTP proxy to ``upstream`` that injects errors, delays and resets."""

    def __init__(self, upstream: str, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.requests = 0
        self.faults = 0
        self.log: list[tuple[str, str, str]] = []  # (method, path, outcome)
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request
        self.set()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # configuration ---------------------------------------------------------------------------
    def set(self, *, first: int = 0, rate: float = 0.0, status: int | None = None, code: str | None = None,
            delay: float = 0.0, reset: bool = False, match: str | None = None) -> "FaultProxy":
        """Choose the fault and which requests get it (counted from now); no arguments: no faults."""
        with self._lock:
            self._first, self._rate, self._status = first, rate, status
            self._code = code or _STATUS_CODES.get(status or 0, "InternalError")
            self._delay, self._reset, self._match = delay, reset, match
            self._seen_since_set = 0
        return self

    def _pick(self, path: str) -> bool:
        with self._lock:
            self.requests += 1
            if self._match is not None and self._match not in path:
                return False
            self._seen_since_set += 1
            hit = self._seen_since_set <= self._first or (self._rate > 0 and self._rng.random() < self._rate)
            if hit and (self._status or self._delay or self._reset):
                self.faults += 1
                return True
            return False

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def storage_options(self, options: dict, **extra) -> dict:
        """fsspec ``options`` for the upstream server, sent through this proxy instead (plus ``extra``)."""
        client = {**options.get("client_kwargs", {}), "endpoint_url": self.endpoint_url}
        return {**options, "client_kwargs": client, **extra}

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # the handler -----------------------------------------------------------------------------
    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        line = self.rfile.readline()
                        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _fault(self) -> bool:
                if proxy._reset:
                    proxy.log.append((self.command, self.path, "reset"))
                    self.close_connection = True
                    try:
                        import socket

                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return True
                if proxy._delay:
                    proxy.log.append((self.command, self.path, f"delay {proxy._delay}"))
                    time.sleep(proxy._delay)
                    return False  # forwarded late
                body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{proxy._code}</Code>'
                        f"<Message>injected fault</Message><Resource>{escape(self.path)}</Resource>"
                        "<RequestId>faultproxy</RequestId></Error>").encode()
                proxy.log.append((self.command, self.path, str(proxy._status)))
                self.send_response(proxy._status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return True

            def _forward(self) -> None:
                body = self._body()
                proxy.seen.append((self.command, self.path))
                if proxy._pick(self.path) and self._fault():
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in _HOP_BY_HOP:
                            conn.putheader(k, v)
                    if "Content-Length" not in self.headers and body:
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body or None)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler
