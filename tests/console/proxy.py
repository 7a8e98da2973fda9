"""A TCP proxy between the browser and the API that can drop every open connection at once (a
network drop, as a browser sees it) and keeps what clients sent (to see the requests it resumed with)."""
from __future__ import annotations

import socket
import threading

from tests.support.service import free_port


class DroppingProxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sent: list[bytes] = []          # every chunk a client sent, in order
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="test-proxy", daemon=True)

    def __enter__(self) -> "DroppingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped = True
        self._listener.close()
        self.drop()
        self._thread.join(timeout=5)

    def drop(self) -> int:
        """Close every connection open now (both sides); returns how many there were."""
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        return len(sockets) // 2

    def requests_sent(self) -> str:
        with self._lock:
            return b"".join(self.sent).decode("latin-1")

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if from_client:
                    with self._lock:
                        self.sent.append(chunk)
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open = [sock for sock in self._open if sock not in (source, target)]
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
