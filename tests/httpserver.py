"""A real HTTP server on 127.0.0.1 for download tests (never any other address).

``with LocalServer() as server: server.files["/a/b.pt"] = data; url = server.url("/a/b.pt")`` serves the bytes;
``server.requests`` records ``(method, path, headers)`` of every request so tests can count them, and
``server.responses`` records ``(path, status, body bytes sent)`` of every answer.

Faults, for the download tests: ``server.add_fault(path, kind, value, seconds=..., times=...)`` makes the next
``times`` requests for ``path`` (every one if ``times`` is None) misbehave, the earliest added fault first:

- ``"status"``: answer with HTTP status ``value`` (503, 404, ...) and no file.
- ``"redirect"``: answer with status ``code`` (302 unless given) and ``Location: value``.
- ``"truncate"``: promise the whole body, send its first ``value`` bytes, then close the connection.
- ``"pause"``: send ``value`` bytes, wait ``seconds`` (cut short when the server stops), then send the rest.
- ``"drop"``: close the connection without answering.
- ``"stall"``: wait ``seconds`` (cut short when the server stops) before answering, then answer normally.
- ``"bad_range"``: answer a ``Range`` request with 206 but the bytes (and ``Content-Range``) from offset 0.
- ``"drip"``: send the body ``value`` bytes at a time, waiting ``seconds`` before each piece (a slow link).

Server-wide switches: ``server.ranges = False`` ignores ``Range`` headers (always the whole file, 200);
``server.content_length = False`` sends no ``Content-Length`` (the body ends when the connection closes).
Requests may name an absolute URL (``GET http://host/path``), as clients do through an HTTP proxy: the file is then
looked up by its path, and ``requests`` keeps the absolute URL. ``LocalServer(tls=context)`` serves HTTPS.
"""
import dataclasses
import http.server
import re
import ssl
import threading
import urllib.parse
from typing import Dict, List, Optional, Tuple

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclasses.dataclass
class Fault:
    kind: str
    value: object = None
    seconds: float = 0.0
    code: int = 302
    times: Optional[int] = 1  # requests it still applies to; None: all of them


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):
        server: "LocalServer" = self.server.owner
        server.requests.append(("GET", self.path, dict(self.headers)))
        path = urllib.parse.urlsplit(self.path).path if "://" in self.path else self.path
        fault = server._take_fault(path)
        if fault is not None and fault.kind == "stall":
            server.stopping.wait(fault.seconds)
        try:
            self._answer(server, path, fault)
        except (BrokenPipeError, ConnectionResetError):  # the client went away (killed, timed out): fine
            self.close_connection = True

    def _answer(self, server: "LocalServer", path: str, fault: Optional[Fault]) -> None:
        if fault is not None and fault.kind == "status":
            return self._empty(path, int(fault.value))
        if fault is not None and fault.kind == "redirect":
            return self._empty(path, fault.code, Location=str(fault.value))
        if fault is not None and fault.kind == "drop":
            self.close_connection = True
            server.responses.append((path, 0, 0))
            return None
        body = server.files.get(path)
        if body is None:
            return self._empty(path, 404)
        status, start, end = 200, 0, len(body)
        match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if server.ranges and match:
            start = 0 if fault is not None and fault.kind == "bad_range" else int(match[1])
            end = min(int(match[2]) + 1, len(body)) if match[2] else len(body)
            if start >= len(body):
                return self._empty(path, 416, **{"Content-Range": f"bytes */{len(body)}"})
            status = 206
        payload = body[start:end]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        if server.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if server.content_length:
            self.send_header("Content-Length", str(len(payload)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        sent = len(payload)
        if fault is not None and fault.kind == "drip":
            step = max(1, int(fault.value))
            for start in range(0, len(payload), step):
                if server.stopping.wait(fault.seconds):
                    self.close_connection = True
                    sent = start
                    break
                self.wfile.write(payload[start:start + step])
                self.wfile.flush()
        elif fault is not None and fault.kind in ("truncate", "pause"):
            sent = min(int(fault.value), len(payload))
            self.wfile.write(payload[:sent])
            self.wfile.flush()
            if fault.kind == "truncate":
                self.close_connection = True
                server.responses.append((path, status, sent))
                return None
            server.stopping.wait(fault.seconds)
            self.wfile.write(payload[sent:])
            sent = len(payload)
        else:
            self.wfile.write(payload)
        server.responses.append((path, status, sent))
        return None

    def _empty(self, path: str, status: int, **headers: str) -> None:
        # Recorded before it is sent: a client that retries at once could otherwise have its next request answered
        # and recorded first (each request has its own thread).
        self.server.owner.responses.append((path, status, 0))
        body = f"{status}\n".encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class LocalServer:
    def __init__(self, handler=_Handler, *, tls: Optional[ssl.SSLContext] = None):
        self.files: Dict[str, bytes] = {}
        self.requests: List[Tuple[str, str, dict]] = []
        self.responses: List[Tuple[str, int, int]] = []
        self.faults: Dict[str, List[Fault]] = {}
        self.ranges = True
        self.content_length = True
        self.stopping = threading.Event()
        self._faults_lock = threading.Lock()
        self._scheme = "https" if tls is not None else "http"
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # a handler stuck on a vanished client must not hang the test's exit
        self._httpd.owner = self
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        # A short poll interval: shutdown() waits up to one interval, and tests start and stop many servers.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}{path}"

    def add_fault(self, path: str, kind: str, value: object = None, *, seconds: float = 0.0, code: int = 302,
                  times: Optional[int] = 1) -> None:
        """Make the next ``times`` requests for ``path`` (all if None) misbehave as ``kind`` says (see above).

        ``"redirect"`` answers with status ``code`` (302 unless given) and ``Location: value``.
        """
        if kind not in ("status", "redirect", "truncate", "pause", "drop", "bad_range", "stall", "drip"):
            raise ValueError(f"unknown fault {kind!r}")
        with self._faults_lock:
            self.faults.setdefault(path, []).append(Fault(kind, value, seconds, code, times))

    def _take_fault(self, path: str) -> Optional[Fault]:
        with self._faults_lock:
            queue = self.faults.get(path, [])
            while queue and queue[0].times == 0:
                queue.pop(0)
            if not queue:
                return None
            fault = queue[0]
            if fault.times is not None:
                fault.times -= 1
            return fault

    def __enter__(self) -> "LocalServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
