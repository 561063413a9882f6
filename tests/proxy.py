"""A loopback TCP proxy in front of PostgreSQL that can delay, refuse, cut and stall.

It runs on ``threading`` and ``socket``, so it is made of greenlets when the
test process is monkey-patched and of OS threads otherwise.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

from psycopg2.extensions import parse_dsn


class Proxy:
    """Forward 127.0.0.1:<port> to the server of ``dsn`` (TCP host or Unix socket dir)."""

    def __init__(self, dsn: str) -> None:
        params = parse_dsn(dsn)
        host = params.get("host") or "/var/run/postgresql"
        port = int(params.get("port") or 5432)
        self._upstream: Any
        if host.startswith("/"):
            self._family = socket.AF_UNIX
            self._upstream = f"{host}/.s.PGSQL.{port}"
        else:
            self._family = socket.AF_INET
            self._upstream = (host, port)
        self._params = params
        self.connect_delay = 0.0
        self.accepted = 0
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener: socket.socket | None = None
        self.port = 0
        self._closed = False
        self._listen()

    # ------------------------------------------------------------ control

    def dsn(self, **extra: Any) -> str:
        """A DSN that goes through the proxy, with ``extra`` libpq parameters."""
        params = {**self._params, "host": "127.0.0.1", "port": str(self.port), **extra}
        return " ".join(f"{k}={v}" for k, v in params.items())

    def refuse(self) -> None:
        """Stop listening: new connections are refused (ECONNREFUSED)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes a thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def accept_again(self) -> None:
        """Listen again on the same port after :meth:`refuse`."""
        if self._listener is None:
            self._listen(self.port)

    def cut(self) -> None:
        """Close every forwarded connection at once, both ends (a lost network)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def stall(self) -> None:
        """Stop forwarding bytes in both directions (a silent network) until :meth:`resume`."""
        self._forwarding.clear()

    def resume(self) -> None:
        self._forwarding.set()

    def close(self) -> None:
        self._closed = True
        self.resume()
        self.refuse()
        self.cut()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _listen(self, port: int = 0) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(512)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # refused or closed
            self.accepted += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.connect_delay:
            time.sleep(self.connect_delay)
        upstream = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            upstream.connect(self._upstream)
        except OSError:
            client.close()
            upstream.close()
            return
        with self._lock:
            self._pairs.append((client, upstream))
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._forwarding.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
