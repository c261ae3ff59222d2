"""The one-box's embedded Redis is private to the user who runs it (issue 16, item 6): a unix socket in a 0700
folder that another local user cannot open, no TCP port, commands that reconfigure or stop the server renamed
away, and a password when TCP is asked for. The queue still works over every kind of external URL: unix://,
redis:// with a password, rediss:// (through a TLS proxy, since the shipped redis-server has no TLS)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
import redis

from service.config import Settings
from service.embedded import CONF_FILE, DISABLED_COMMANDS, EmbeddedRedis
from service.queue import SyncJobQueue
from service.schemas import GenerationRequest
from tests.tls import self_signed, tls_proxy

NOBODY = 65534
REQUEST = GenerationRequest(model="tiny", prompt="a red circle", width=64, height=64, steps=2, seed=1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def connect_as(uid: int, path: Path) -> str:
    """Try to open the unix socket `path` from a forked child that dropped to `uid`; what happened, in a word."""
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit (no pytest machinery runs here)
        code = 3
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
                code = 0
        except PermissionError:
            code = 1
        except OSError:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "connected", 1: "permission denied", 2: "other error"}.get(os.waitstatus_to_exitcode(status), "?")


def round_trip(url: str, prefix: str) -> None:
    """Submit and read back a job through the service's own queue client on `url`."""
    with SyncJobQueue(Settings(redis_url=url, key_prefix=prefix, redis_retries=0)) as queue:
        job = queue.submit(REQUEST)
        got = queue.get(job.id)
        assert got is not None and got.request.prompt == "a red circle"


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedRedis:
    folder = tmp_path_factory.mktemp("private") / "redis"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)  # as an earlier version left it: start() must tighten it
    with EmbeddedRedis(folder) as server:
        yield server


def test_the_default_is_a_unix_socket_only_its_user_can_open(private: EmbeddedRedis) -> None:
    sock = private.unix_socket
    assert sock is not None and private.url == f"unix://{sock}?db=0"
    assert mode(private.data_dir) == 0o700 and mode(sock) == 0o700 and mode(private.data_dir / CONF_FILE) == 0o600
    client = redis.Redis.from_url(private.url)
    assert client.info("server")["tcp_port"] == 0  # no TCP listener at all
    client.close()
    if os.geteuid() == 0:  # root passes every permission check: ask as another user
        assert connect_as(NOBODY, sock) == "permission denied"
        assert connect_as(0, sock) == "connected"  # the same call as the owner works: the test can fail
    round_trip(private.url, "unix-trip")


@pytest.mark.parametrize("command", [("CONFIG", "GET", "*"), ("CONFIG", "SET", "dir", "/tmp"), ("MODULE", "LIST"),
                                     ("DEBUG", "SLEEP", "0"), ("SHUTDOWN", "NOSAVE"), ("REPLICAOF", "NO", "ONE"),
                                     ("SLAVEOF", "NO", "ONE")])
def test_commands_that_reconfigure_or_stop_the_server_are_refused(private: EmbeddedRedis,
                                                                   command: tuple[str, ...]) -> None:
    assert command[0] in DISABLED_COMMANDS
    client = redis.Redis.from_url(private.url)
    with pytest.raises(redis.ResponseError, match="unknown command"):
        client.execute_command(*command)
    assert client.ping() and private.running  # still up after SHUTDOWN
    client.close()


def test_tcp_mode_wants_its_random_password_which_no_command_line_shows(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis", port=0) as server:
        assert server.password and len(server.password) >= 32 and server.password in server.url
        assert server.password not in server.url_without_password
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert server.password.encode() not in cmdline  # every local user can read a command line
        anonymous = redis.Redis(host="127.0.0.1", port=server.port)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        wrong = redis.Redis(host="127.0.0.1", port=server.port, password="guess")
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
        wrong.close()
        round_trip(server.url, "password-trip")
        with pytest.raises(redis.ResponseError, match="unknown command"):
            redis.Redis.from_url(server.url).config_get("requirepass")


def test_the_queue_works_over_rediss(private: EmbeddedRedis, tmp_path: Path) -> None:
    certificate = self_signed(tmp_path / "tls")
    assert private.unix_socket is not None
    with tls_proxy(certificate, private.unix_socket) as port:
        url = f"rediss://localhost:{port}/0?ssl_ca_certs={certificate.cert}"
        round_trip(url, "tls-trip")
        untrusted = f"rediss://localhost:{port}/0"  # the system roots do not know the test's certificate
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(untrusted, socket_connect_timeout=2).ping()


def test_a_data_path_too_long_for_a_socket_gets_a_private_short_one(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e #?%" * 15)  # too long, and characters a URL must quote
    with EmbeddedRedis(deep) as server:
        assert server.unix_socket is not None and server.unix_socket.parent != deep
        assert mode(server.unix_socket.parent) == 0o700 and mode(deep) == 0o700
        assert redis.Redis.from_url(server.url).ping()


def test_a_folder_name_a_url_must_quote_still_works(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "my data #1?") as server:
        assert server.unix_socket is not None and server.unix_socket.parent == tmp_path / "my data #1?"
        assert redis.Redis.from_url(server.url).ping()
