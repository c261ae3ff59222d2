"""Optional TLS for the front ends (`LDM_TLS_CERT_FILE`, `LDM_TLS_KEY_FILE`): what uvicorn and grpc need.

API keys are bearer secrets: without TLS anyone on the path reads them. Loopback needs none, and behind a
proxy or ingress that ends TLS neither does the service; anything else should set these (docs/security.md).
The files are read when the front ends start, so a missing or unreadable one stops the start with its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import grpc

from service.config import Settings


def tls_files(settings: Settings) -> tuple[Path, Path] | None:
    """(certificate, key) when TLS is configured, checked readable; None for plain HTTP/gRPC."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None  # both or neither: Settings refuses one alone
    for name, path in (("LDM_TLS_CERT_FILE", settings.tls_cert_file), ("LDM_TLS_KEY_FILE", settings.tls_key_file)):
        if not path.is_file():
            raise ValueError(f"{name} {path}: no such file")
    return settings.tls_cert_file, settings.tls_key_file


class UvicornTls(TypedDict, total=False):
    ssl_certfile: str
    ssl_keyfile: str


def uvicorn_tls(settings: Settings) -> UvicornTls:
    """Keyword arguments of `uvicorn.Config`: the certificate and key, or nothing."""
    files = tls_files(settings)
    return {} if files is None else {"ssl_certfile": str(files[0]), "ssl_keyfile": str(files[1])}


def grpc_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for `add_secure_port`, or None for an insecure port."""
    files = tls_files(settings)
    if files is None:
        return None
    cert, key = files
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


def rest_scheme(settings: Settings) -> str:
    return "https" if tls_files(settings) else "http"
