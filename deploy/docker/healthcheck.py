"""The image's HEALTHCHECK: healthy when this container's own endpoint answers.

One image runs three commands: `ldm serve` and `ldm api` answer `/healthz` on the REST port, `ldm worker`
answers `/metrics` on its metrics port (it serves them only once its model is loaded and Redis answered).
The ports come from the service's own settings (`LDM_*`, as the process itself reads them), never from a
copy here. With TLS configured (`LDM_TLS_CERT_FILE`) the REST port speaks https: the probe asks over TLS without
checking the certificate, which names the public host, not 127.0.0.1 (it asks whether this process answers, not
who it is). Exit 0 = healthy, 1 = not (Docker's convention).
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request

from service.config import Settings, load_settings

TIMEOUT_S = 4.0


def _local(host: str) -> str:
    """The address to reach a server listening on `host` from inside its own container."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def endpoints(settings: Settings) -> list[str]:
    """URLs to try, in order: the API's liveness, then a worker's metrics (when its port is fixed)."""
    scheme = "https" if settings.tls_cert_file else "http"
    urls = [f"{scheme}://{_local(settings.rest_host)}:{settings.rest_port}/healthz"]
    if settings.worker_metrics_port:
        urls.append(f"http://{_local(settings.worker_metrics_host)}:{settings.worker_metrics_port}/metrics")
    return urls


def _own_server() -> ssl.SSLContext:
    """TLS to this container's own server: encrypted, certificate not checked (see the module's docstring)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def answers(url: str) -> bool:
    try:
        context = _own_server() if url.startswith("https:") else None
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    urls = endpoints(load_settings())
    for url in urls:
        if answers(url):
            print(f"healthy: {url}")
            return 0
    print(f"unhealthy: none of {', '.join(urls)} answered", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
