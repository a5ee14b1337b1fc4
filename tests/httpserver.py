"""A real HTTP server on 127.0.0.1 for download tests (never any other address).

``with LocalServer() as server: server.files["/a/b.pt"] = data; url = server.url("/a/b.pt")`` serves the bytes;
``server.requests`` records ``(method, path, headers)`` of every request so tests can count them.
"""
import http.server
import threading
from typing import Dict, List, Tuple


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):
        server: "LocalServer" = self.server.owner
        server.requests.append(("GET", self.path, dict(self.headers)))
        body = server.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class LocalServer:
    def __init__(self, handler=_Handler):
        self.files: Dict[str, bytes] = {}
        self.requests: List[Tuple[str, str, dict]] = []
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "LocalServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
