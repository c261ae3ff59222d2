"""The service as the service benchmarks run it: `ldm api` and one `ldm worker` as processes, ready."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def api_and_worker(env: dict[str, str], model: str, base_url: str,
                   timeout_s: float = 120.0) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start the API and a worker for `model` with `env` (LDM_* settings), yield them once `base_url`/readyz
    answers 200 (the worker registered); stop them after. RuntimeError if either exits or readiness never comes."""
    cli = [sys.executable, "-m", "service.cli", "--log-level", "WARNING"]
    procs = [subprocess.Popen([*cli, "api"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL),
             subprocess.Popen([*cli, "worker", "--model", model], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("the API or the worker exited during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not become ready")
            try:
                if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
