"""A self-signed certificate for localhost and 127.0.0.1, made in the test with the `openssl` command (nothing is
downloaded, no key ships with the repository), and a TLS-terminating proxy for a server that speaks no TLS."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificate:
    cert: Path  # PEM; also the root a client trusts (it signs itself)
    key: Path


def self_signed(folder: Path) -> Certificate:
    """An EC P-256 certificate valid a day, for DNS localhost and IP 127.0.0.1 (what the tests dial)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return Certificate(cert, key)


@contextlib.contextmanager
def tls_proxy(certificate: Certificate, unix_socket: Path) -> Iterator[int]:
    """TLS on a free 127.0.0.1 port, forwarded in plain to `unix_socket`, in a thread; yields the port. Stands in
    for a managed Redis that wants `rediss://` (the embedded redis-server is built without TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert, certificate.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    ready, stopping = threading.Event(), threading.Event()
    connections: set[asyncio.StreamWriter] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(str(unix_socket))
        connections.update((writer, upstream_writer))
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, _context: None)  # a refused handshake is the untrusted test's point
        server = await asyncio.start_server(serve, sock=listener, ssl=context)
        ready.set()
        while not stopping.is_set():
            await asyncio.sleep(0.02)
        server.close()
        for writer in connections:
            writer.close()
        await server.wait_closed()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield port
    finally:
        stopping.set()
        thread.join(timeout=10)
