"""A local HTTP test server on 127.0.0.1 for the download tests."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

Respond = Callable[[http.server.BaseHTTPRequestHandler], None]


@contextlib.contextmanager
def serve(respond: Respond, lifetime_s: float = 60.0) -> Iterator[tuple[str, list[str]]]:
    """An HTTP/1.1 server on 127.0.0.1 (free port) answering every GET with
    ``respond(handler)``; yields its URL and the paths requested (without the leading
    ``/``). Stops on exit or after ``lifetime_s``."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            requests.append(self.path.lstrip("/"))
            respond(self)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    watchdog = threading.Timer(lifetime_s, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", requests
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def send(handler: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
    """A 200 response with ``body``."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def serve_folder(folder: Path) -> Respond:
    """Answers with the files of ``folder`` (404 for anything else)."""

    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        path = folder / handler.path.lstrip("/")
        if path.is_file():
            send(handler, path.read_bytes())
        else:
            handler.send_error(404)

    return respond
