"""API keys: who may call the front ends, decided the same way for REST and gRPC.

Keys are configured as SHA-256 digests only (`api_key_hashes`, `api_key_file`), so a leaked config, Secret or
log holds nothing that opens the door: a key is 256 random bits, its digest cannot be reversed, and a fast hash
is enough for that (slow password hashes exist for guessable passwords). A presented key is hashed and compared
with every configured digest by `hmac.compare_digest`, without stopping at the first match, so the time taken
says nothing about how close a guess came.

Answers (`AuthError.status`): 401 for a missing, malformed or unknown key, 403 for a revoked one (the client
learns its key was withdrawn, not mistyped); gRPC: UNAUTHENTICATED and PERMISSION_DENIED. Plain keys never reach
a log, a metric label or Redis: the identity used for quotas and logs is `Principal.key_id`, a digest prefix.

Ownership: every job records the `key_id` of the key that submitted it (`Job.owner`); `Principal.sees` says who
may read or cancel it: its owner, a key with the `admin` role (`<digest> label role=admin` in the key file: operators),
and everyone when authentication is off. Another key's job answers exactly as an unknown one (404 / NOT_FOUND), so a
job id that leaks (logs, URLs, tickets) opens nothing and its existence is not confirmed.

Priorities: a key may submit jobs up to its `max_priority` (`<digest> label max_priority=high` in the key file;
`normal` when not said, so high priority is granted, never assumed); a request above it is refused
(`PriorityNotAllowed`: 403 / PERMISSION_DENIED, naming the key's limit). Without authentication every priority is
allowed.

Exposure (`check_exposure`): with no key configured, authentication is off, which is allowed on loopback (the
one-box `ldm serve`) or where `auth_disabled` says so explicitly; anything else refuses to start.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from service.config import SHA256_HEX, Settings
from service.schemas import PRIORITIES, Priority

log = logging.getLogger(__name__)

KEY_PREFIX = "ldm_"  # plain keys look like ldm_<43 url-safe characters>: easy to spot in a secret scanner
MAX_KEY_CHARS = 256  # a longer bearer token is malformed: no hashing of arbitrary amounts of header
KEY_ID_CHARS = 12  # digest prefix that names a key in quotas, logs and Redis (48 bits: unique among any key set)
FILE_CHECK_S = 1.0  # the key file is looked at (stat) at most this often
REALM = "ldm-serve"
Reason = Literal["missing", "malformed", "unknown", "revoked"]
ROLES: frozenset[str] = frozenset({"admin"})  # admin: sees and cancels every key's jobs
DEFAULT_MAX_PRIORITY: Priority = "normal"  # a key's highest priority unless its key-file line says max_priority=


def new_key() -> str:
    """A fresh API key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The digest to configure for `key` (SHA-256, lowercase hex)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: `key_id` (a digest prefix; "" when authentication is off), the key file's label and whether
    the key has the `admin` role."""

    key_id: str
    label: str | None = None
    admin: bool = False
    max_priority: Priority = "high"  # anonymous (authentication off): every priority

    @property
    def anonymous(self) -> bool:
        return not self.key_id

    def check_priority(self, priority: Priority) -> None:
        """Raises PriorityNotAllowed when `priority` is above this key's `max_priority`."""
        if PRIORITIES.index(priority) < PRIORITIES.index(self.max_priority):
            raise PriorityNotAllowed(priority, self.max_priority)

    def sees(self, owner: str) -> bool:
        """Whether this caller may read and cancel a job submitted by key `owner` ("" = submitted without
        authentication): its own, every job for an admin, and every job when authentication is off (anonymous).
        A job submitted while authentication was off belongs to no key, so only admins see it once keys are on."""
        return self.anonymous or self.admin or owner == self.key_id


ANONYMOUS = Principal("")
#: the caller of the gRPC call being served (set by the interceptor, read where the call submits or reads a job)
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("ldm_principal", default=ANONYMOUS)

_MESSAGES: dict[Reason, str] = {
    "missing": "authentication required: send 'Authorization: Bearer <API key>' (an HTTP header; gRPC metadata "
               "'authorization')",
    "malformed": "malformed authorization: expected 'Bearer <API key>'",
    "unknown": "invalid API key",
    "revoked": "this API key has been revoked; ask for a new one",
}


class AuthError(Exception):
    """A call without a valid key (-> 401 / UNAUTHENTICATED; a revoked key -> 403 / PERMISSION_DENIED)."""

    def __init__(self, reason: Reason, message: str | None = None) -> None:
        super().__init__(message or _MESSAGES[reason])
        self.reason = reason

    @property
    def status(self) -> int:
        return 403 if self.reason == "revoked" else 401

    @property
    def challenge(self) -> str:
        """The WWW-Authenticate header of the answer (RFC 6750)."""
        return f'Bearer realm="{REALM}"' + ("" if self.reason == "missing" else ', error="invalid_token"')


class PriorityNotAllowed(Exception):
    """A submission above its key's `max_priority` (-> 403 / PERMISSION_DENIED)."""

    def __init__(self, asked: Priority, allowed: Priority) -> None:
        super().__init__(f"priority {asked!r} is above this API key's max_priority {allowed!r}; submit with priority "
                         f"{allowed!r} or lower, or ask the operator for max_priority={asked} in the key file")
        self.asked, self.allowed = asked, allowed


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` value (REST header or gRPC metadata). Raises AuthError."""
    if not authorization or not authorization.strip():
        raise AuthError("missing")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_KEY_CHARS or any(c.isspace() for c in token):
        raise AuthError("malformed")
    return token


# ------------------------------------------------------------------------------------------------ the key ring

@dataclass(frozen=True)
class KeyRing:
    """The configured digests: active keys (digest -> label), revoked ones, and the active ones with the admin role."""

    active: dict[bytes, str | None] = field(default_factory=dict)
    revoked: frozenset[bytes] = frozenset()
    admins: frozenset[bytes] = frozenset()
    max_priority: dict[bytes, Priority] = field(default_factory=dict)  # keys whose line says max_priority=

    def merged(self, other: KeyRing) -> KeyRing:
        """Both rings; a digest `other` lists again takes its label, role and max_priority from `other`."""
        admins = (self.admins - other.active.keys()) | other.admins
        limits = {d: p for d, p in self.max_priority.items() if d not in other.active} | other.max_priority
        return KeyRing({**self.active, **other.active}, self.revoked | other.revoked, admins, limits)

    def __len__(self) -> int:
        return len(self.active)

    def check(self, token: str) -> Principal:
        """The principal of `token`. Every digest is compared (constant time each, no early exit). Raises AuthError."""
        digest = hashlib.sha256(token.encode()).digest()
        found: bytes | None = None
        for candidate in self.active:
            if hmac.compare_digest(digest, candidate):
                found = candidate
        revoked = False
        for candidate in self.revoked:
            revoked |= hmac.compare_digest(digest, candidate)
        if revoked:  # revocation wins over a digest still listed as active: removing a key is the slower step
            raise AuthError("revoked")
        if found is None:
            raise AuthError("unknown")
        return Principal(found.hex()[:KEY_ID_CHARS], self.active[found], found in self.admins,
                         self.max_priority.get(found, DEFAULT_MAX_PRIORITY))


def ring_of(active: Iterable[str], revoked: Iterable[str] = ()) -> KeyRing:
    """A key ring from hex digests (already validated by the settings)."""
    return KeyRing({bytes.fromhex(d): None for d in active}, frozenset(bytes.fromhex(d) for d in revoked))


def parse_key_file(text: str, source: str) -> KeyRing:
    """Lines `<digest> [label] [role=admin] [max_priority=high|normal|low]` or `revoked <digest> [label]`; blank
    lines and `#` comments are skipped. A `role=` word anywhere after the digest sets the key's role (only `admin`
    exists: it sees every key's jobs), a `max_priority=` word the highest priority its jobs may ask for (default
    normal); an unknown role or priority is refused, not ignored, so a typo cannot quietly leave an operator without
    access or read as something it is not. Raises ValueError naming the line (never echoing it: a pasted plain key
    must not reach a log)."""
    active: dict[bytes, str | None] = {}
    revoked: set[bytes] = set()
    admins: set[bytes] = set()
    limits: dict[bytes, Priority] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        is_revoked = words[0].lower() == "revoked"
        if is_revoked:
            words = words[1:]
        digest = words[0].lower() if words else ""
        if not SHA256_HEX.match(digest):
            raise ValueError(f"{source}, line {number}: expected '<sha256 hex digest> [label]' or 'revoked <digest> "
                             "[label]' (configure digests from `ldm keys hash`, never keys)")
        roles = {w.split("=", 1)[1].lower() for w in words[1:] if w.lower().startswith("role=")}
        if roles - ROLES:
            raise ValueError(f"{source}, line {number}: unknown role (known: role={', role='.join(sorted(ROLES))})")
        asked = [w.split("=", 1)[1].lower() for w in words[1:] if w.lower().startswith("max_priority=")]
        limit = next((p for p in PRIORITIES if asked and asked[-1] == p), None)
        if asked and (limit is None or len(set(asked)) > 1):
            raise ValueError(f"{source}, line {number}: max_priority must be one of {', '.join(PRIORITIES)} (once)")
        label = " ".join(w for w in words[1:] if not w.lower().startswith(("role=", "max_priority="))) or None
        if is_revoked:
            revoked.add(bytes.fromhex(digest))
        else:
            active[bytes.fromhex(digest)] = label
            if "admin" in roles:
                admins.add(bytes.fromhex(digest))
            if limit is not None:
                limits[bytes.fromhex(digest)] = limit
    return KeyRing(active, frozenset(revoked), frozenset(admins), limits)


class Authenticator:
    """Authenticates callers for one front-end process: the settings' digests plus the key file, re-read when the
    file changes (checked at most once a second). A key file that cannot be read or parsed fails closed: the
    settings' keys keep working, none of the file's does, and the error is logged until it is fixed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = not settings.auth_disabled and bool(
            settings.api_key_hashes or settings.revoked_key_hashes or settings.api_key_file is not None)
        self._base = ring_of(settings.api_key_hashes, settings.revoked_key_hashes)
        self._metrics = bytes.fromhex(settings.metrics_token_hash) if settings.metrics_token_hash else None
        self._lock = threading.Lock()
        self._ring = self._base
        self._signature: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        if self.enabled and settings.api_key_file is not None:  # at start, an unusable file is an error
            path = settings.api_key_file
            self._signature = _signature(path.stat())
            self._ring = self._base.merged(parse_key_file(path.read_text(), str(path)))
            self._checked = time.monotonic()

    @property
    def metrics_protected(self) -> bool:
        return self._metrics is not None

    def keys(self) -> int:
        """Active keys now (for the startup message)."""
        return len(self._current())

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of a request with this `Authorization` value; ANONYMOUS when authentication is off.
        Raises AuthError."""
        if not self.enabled:
            return ANONYMOUS
        return self._current().check(bearer_token(authorization))

    def check_metrics(self, authorization: str | None) -> None:
        """Raises AuthError unless /metrics is open or `authorization` carries the metrics token."""
        if self._metrics is None:
            return
        digest = hashlib.sha256(bearer_token(authorization).encode()).digest()
        if not hmac.compare_digest(digest, self._metrics):
            raise AuthError("unknown", "invalid metrics token")

    # -- the key file

    def _current(self) -> KeyRing:
        path = self.settings.api_key_file
        if path is None or time.monotonic() - self._checked < FILE_CHECK_S:
            return self._ring
        with self._lock:
            self._checked = time.monotonic()
            try:
                signature = _signature(path.stat())
            except OSError as exc:
                if self._signature is not None:  # log the change, not every second of it
                    log.error("event=api_key_file_unusable file=%s error=%s (its keys are refused until it is back)",
                              path, exc)
                self._ring, self._signature = self._base, None
                return self._ring
            if signature == self._signature:
                return self._ring
            self._signature = signature
            try:
                self._ring = self._base.merged(parse_key_file(path.read_text(), str(path)))
                log.info("event=api_keys_reloaded file=%s keys=%d revoked=%d", path, len(self._ring),
                         len(self._ring.revoked))
            except (OSError, ValueError) as exc:
                self._ring = self._base
                log.error("event=api_key_file_unusable file=%s error=%s (its keys are refused until it is fixed)",
                          path, exc)
        return self._ring


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    """What changes when the file is rewritten or replaced (a Kubernetes Secret volume swaps a symlink)."""
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


# ------------------------------------------------------------------------------------------------ exposure

class ExposureError(ValueError):
    """The front ends would serve a non-loopback address without authentication."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_exposure(settings: Settings) -> str:
    """How the front ends will authenticate, in a line for the startup output; raises ExposureError when no key is
    configured, `auth_disabled` is not set and a front end would listen beyond loopback."""
    auth = Authenticator(settings)
    metrics = "; /metrics needs its token" if auth.metrics_protected else ""
    if auth.enabled:
        return f"authentication: API keys ({auth.keys()} active){metrics}"
    keys_ignored = settings.api_key_hashes or settings.api_key_file or settings.revoked_key_hashes
    if settings.auth_disabled:
        note = " (the configured keys are ignored)" if keys_ignored else ""
        return f"authentication: OFF (LDM_AUTH_DISABLED){note}: anyone who reaches these ports may call{metrics}"
    exposed = [f"{name} {host}" for name, host in (("LDM_REST_HOST", settings.rest_host),
                                                   ("LDM_GRPC_HOST", settings.grpc_host)) if not is_loopback(host)]
    if exposed:
        raise ExposureError(
            f"refusing to serve {' and '.join(exposed)} without authentication: configure API keys "
            "(LDM_API_KEY_HASHES or LDM_API_KEY_FILE; `ldm keys new` makes one) or set LDM_AUTH_DISABLED=true "
            "to serve without them on purpose")
    return f"authentication: OFF (no API keys configured): serving loopback only{metrics}"
