"""Serve's HTTP proxy on a free loopback port for tests that talk HTTP (public Serve API only), and a raw-socket
client that can hold a request body open."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_on_free_port() -> int:
    """(Re)start Serve with its HTTP proxy on a free 127.0.0.1 port and return the port. A Serve instance left by
    an earlier test module (its address cannot be read through the public API) is shut down first."""
    from ray import serve

    if serve.status().proxies:
        serve.shutdown()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def open_post(port: int, path: str, declared: int, sent: bytes, headers: dict[str, str] | None = None,
              timeout_s: float = 60.0) -> socket.socket:
    """A POST that declares ``declared`` body bytes and sends only ``sent``; the socket is left open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {declared}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + sent)
    return s


def read_response(s: socket.socket, timeout_s: float = 60.0) -> dict:
    """Read one HTTP response: ``{"status", "headers", "body", "closed", "seconds"}`` (``closed``: the server
    closed the connection after it). Closes the socket."""
    t0 = time.monotonic()
    s.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        seconds = time.monotonic() - t0
        n = int(headers.get("content-length", "0") or 0)
        while len(body) < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        closed = False
        s.settimeout(5.0)
        try:
            closed = s.recv(1) == b""
        except socket.timeout:  # still open
            closed = False
        except ConnectionResetError:
            closed = True
        return {"status": status, "headers": headers, "body": body, "closed": closed, "seconds": seconds}
    finally:
        s.close()
