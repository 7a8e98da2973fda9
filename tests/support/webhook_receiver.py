"""A real HTTP receiver for webhook tests: http.server in a thread on 127.0.0.1.

Paths choose the behaviour: `/ok/...` answers 200; `/flaky/<n>/...` answers 500 to the first n
attempts of each webhook-id, then 200; `/down/...` always 500; `/gone/...` 410; `/busy/...` 503 with
`Retry-After: 7`; `/moved/...` a 302 redirect.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    def __init__(self):
        self.deliveries: list[Delivery] = []
        self._seen: Counter = Counter()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.deliveries.append(Delivery(self.path, dict(self.headers.items()), body, time.time()))
                    receiver._seen[(self.path, self.headers.get("webhook-id"))] += 1
                    seen = receiver._seen[(self.path, self.headers.get("webhook-id"))]
                parts = self.path.strip("/").split("/")
                if parts[0] == "flaky":
                    status = 500 if seen <= int(parts[1]) else 200
                else:
                    status = {"ok": 200, "down": 500, "gone": 410, "busy": 503, "moved": 302}.get(parts[0], 404)
                self.send_response(status)
                if status == 503:
                    self.send_header("Retry-After", "7")
                if status == 302:
                    self.send_header("Location", "http://169.254.169.254/")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)

    def at(self, path: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.path == path]

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
