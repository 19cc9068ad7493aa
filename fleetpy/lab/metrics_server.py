"""The lab's metrics server: `fleetpy.lab.metrics.scrape` over HTTP on a socket the lab bound for it.

Run by `fleetpy lab up --metrics` (lab/metrics.py starts it); apart from the lab's other modules
so that the lab's commands do not import an HTTP server.
"""

from __future__ import annotations

import argparse
import hmac
import http.server
import socket
from pathlib import Path

from fleetpy.lab.metrics import scrape
from fleetpy.lab.state import StateFile


class _Scrapes(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self._answer(404, b"only /metrics here\n")
        elif not hmac.compare_digest(
            self.headers.get("Authorization", "").encode(), f"Bearer {self.server.token}".encode()
        ):
            self._answer(401, b"send the lab's API token: Authorization: Bearer $(cat LAB_DIR/token)\n")
        else:
            from prometheus_client import CONTENT_TYPE_LATEST

            try:
                text = scrape(StateFile(self.server.lab_dir))
            except Exception as error:  # noqa: BLE001 - one failed scrape must not end the server
                self.log_error("scrape failed: %r", error)
                self._answer(500, f"cannot scrape the lab: {error}\n".encode())
            else:
                self._answer(200, text.encode(), CONTENT_TYPE_LATEST)

    def _answer(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        if code == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if code != 200:  # every scrape would be a line: only refusals are logged
            super().log_request(code, size)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listener: socket.socket, lab_dir: Path, token: str):
        super().__init__(listener.getsockname(), _Scrapes, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.lab_dir = lab_dir
        self.token = token


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fleetpy.lab.metrics", description="serve a lab's metrics")
    parser.add_argument("--dir", type=Path, required=True, help="the lab's directory")
    parser.add_argument("--fd", type=int, required=True, help="a listening socket to serve on")
    args = parser.parse_args(argv)
    state = StateFile(args.dir).require()
    token = Path(state.token_file).read_text().strip()
    _Server(socket.socket(fileno=args.fd), args.dir, token).serve_forever()


if __name__ == "__main__":
    main()
