"""Webhooks: a job's terminal event POSTed to the `webhook_url` it was submitted with, signed, retried, and never to a
host the operator did not allow.

- Allow-list (`webhook_allowed_hosts`): a URL's host must be listed exactly, or end in a listed `.suffix`, or be an
  address inside a listed IP or CIDR. Checked when the job is submitted (422 naming webhook_url) and again before
  every attempt, when the host is resolved: every address it resolves to must be public, unless it is inside a
  listed IP or CIDR. A listed *name* never makes a private, loopback, link-local or otherwise reserved address
  acceptable, so a public name whose DNS answer is changed to 127.0.0.1 or 169.254.169.254 is refused (and
  dead-lettered). Redirects are not followed. What remains: DNS may change between our check and the connection
  (rebinding within the resolver's cache time); listing the receivers' IPs or CIDRs closes that too.
- Signing, per the Standard Webhooks convention: headers `webhook-id` (the same on every retry of one event:
  the receiver's idempotency key), `webhook-timestamp` (Unix seconds of the attempt) and `webhook-signature`
  (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body` keyed by `webhook_secret`: `whsec_` + base64, or raw text).
- Delivery is at least once, from a loop outside the request path (`Webhooks.run`, a task in each API process):
  registrations wait in a Redis sorted set scored by when to look next; a loop takes the due ones (a short lock per
  job, so two API replicas do not send the same attempt at once), waits for the job to end, then POSTs. A 2xx ends
  it; anything else is retried with exponential backoff, up to `webhook_max_attempts`, then the event goes to the
  dead-letter stream (`dead_letters`). Body: `{"type": "job.succeeded" | "job.failed" | "job.cancelled",
  "timestamp", "data": <the job as GET /v1/jobs/{id} answers it, with its image links>}`; no image bytes.
- Metrics: `ldm_webhook_deliveries_total{outcome}`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from service.api.bodies import JobView
from service.config import Settings
from service.metrics import ApiMetrics
from service.queue import JobQueue, QueueUnavailable

log = logging.getLogger(__name__)
DEAD_MAXLEN = 10_000
MAX_BACKOFF_S = 600.0
MAX_URL_CHARS = 2048
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _text(value: Any) -> str:
    """A Redis reply (bytes: the client does not decode) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


class WebhookRefused(ValueError):
    """A URL or an address the allow-list does not allow."""


def _networks(allowed: tuple[str, ...]) -> list[Network]:
    nets = []
    for entry in allowed:
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(entry, strict=False))
    return nets


def _name_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    return any(host == entry or (entry.startswith(".") and host.endswith(entry)) for entry in allowed)


def check_url(url: str, settings: Settings) -> tuple[str, int]:
    """(host, port) of an allowed webhook URL; raises WebhookRefused saying why not. No DNS here."""
    if not settings.webhook_allowed_hosts:
        raise WebhookRefused("webhooks are off on this server (LDM_WEBHOOK_ALLOWED_HOSTS is empty)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a malformed IPv6 literal or port
        raise WebhookRefused(f"webhook_url is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > MAX_URL_CHARS:
        raise WebhookRefused(f"webhook_url must be an http(s) URL with a host, at most {MAX_URL_CHARS} characters")
    if parts.username or parts.password:
        raise WebhookRefused("webhook_url must not carry credentials: verify deliveries by their signature")
    host = parts.hostname.lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    allowed = settings.webhook_allowed_hosts
    ok = (any(address in net for net in _networks(allowed)) if address is not None else _name_allowed(host, allowed))
    if not ok:
        raise WebhookRefused(f"webhook host {host!r} is not in this server's allow-list (LDM_WEBHOOK_ALLOWED_HOSTS)")
    return host, port or (443 if parts.scheme == "https" else 80)


async def check_addresses(host: str, port: int, settings: Settings) -> None:
    """Every address `host` resolves to must be public, or inside a listed IP/CIDR; raises WebhookRefused."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WebhookRefused(f"webhook host {host!r} does not resolve: {exc}") from exc
    nets = _networks(settings.webhook_allowed_hosts)
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global and not any(address in net for net in nets):
            raise WebhookRefused(f"webhook host {host!r} resolves to {address}, a non-public address that is not "
                                 "allowed by IP or CIDR in LDM_WEBHOOK_ALLOWED_HOSTS")


def signing_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(signing_key(secret), signed, hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class WebhookKeys:
    """The Redis key names of the webhooks, under the service's prefix."""

    prefix: str

    @property
    def due(self) -> str:
        return f"{self.prefix}:webhooks:due"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:webhooks:dead"

    def hook(self, job_id: str) -> str:
        return f"{self.prefix}:webhook:{job_id}"

    def lock(self, job_id: str) -> str:
        return f"{self.prefix}:webhook:{job_id}:lock"


def checked(url: str | None, settings: Settings) -> str | None:
    """`url` if the allow-list allows it (None stays None); raises a ValidationError naming webhook_url (422)."""
    if url is None:
        return None
    try:
        check_url(url, settings)
    except WebhookRefused as exc:
        raise ValidationError.from_exception_data("webhook", [InitErrorDetails(
            type=PydanticCustomError("webhook_refused", str(exc)), loc=("webhook_url",), input=None)]) from exc
    return url


async def register(queue: JobQueue, job_id: str, url: str) -> None:
    """Deliver job `job_id`'s terminal event to `url` (already `checked`): the delivery loop picks it up."""
    keys, settings = WebhookKeys(queue.settings.key_prefix), queue.settings
    ttl = int(settings.job_deadline_s + settings.result_ttl_s)
    async with queue.redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.hook(job_id), mapping={"url": url, "attempts": 0})
        pipe.expire(keys.hook(job_id), ttl)
        pipe.zadd(keys.due, {job_id: time.time()})
        await pipe.execute()


class Webhooks:
    """The delivery loop over one API process's queue (its Redis client)."""

    def __init__(self, queue: JobQueue, metrics: ApiMetrics, *, poll_s: float = 0.25) -> None:
        self.queue, self.settings, self.metrics, self.poll_s = queue, queue.settings, metrics, poll_s
        self.keys = WebhookKeys(self.settings.key_prefix)
        self.redis = queue.redis

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver due events until `stop` is set; Redis outages are waited out."""
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout_s, follow_redirects=False) as client:
            while not stop.is_set():
                try:
                    due = await self.redis.zrangebyscore(self.keys.due, "-inf", time.time(), start=0, num=32)
                    for raw in due:
                        await self._take(_text(raw), client)
                except (QueueUnavailable, OSError, ConnectionError) as exc:  # redis errors are ConnectionError
                    log.warning("webhook loop: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_s)

    async def _take(self, job_id: str, client: httpx.AsyncClient) -> None:
        """One due registration, under a lock that outlives an attempt (another replica skips it meanwhile)."""
        lease_ms = int((self.settings.webhook_timeout_s + 5) * 1000)
        if not await self.redis.set(self.keys.lock(job_id), b"1", nx=True, px=lease_ms):
            return
        try:
            await self._handle(job_id, client)
        finally:
            await self.redis.delete(self.keys.lock(job_id))

    async def _handle(self, job_id: str, client: httpx.AsyncClient) -> None:
        raw: dict[Any, Any] = await self.redis.hgetall(self.keys.hook(job_id))
        hook = {_text(k): _text(v) for k, v in raw.items()}
        job = await self.queue.get(job_id)
        if not hook or job is None:
            await self._dead(job_id, hook.get("url", ""), "", int(hook.get("attempts", 0)), "the job or its webhook "
                             "registration expired before the job ended")
            return
        if not job.status.terminal:
            await self.redis.zadd(self.keys.due, {job_id: time.time() + self.poll_s}, xx=True)
            return
        event = f"job.{job.status.value}"
        attempts = int(hook["attempts"]) + 1
        try:
            host, port = check_url(hook["url"], self.settings)
            await check_addresses(host, port, self.settings)
        except WebhookRefused as exc:
            self.metrics.webhook_deliveries.labels("refused").inc()
            await self._dead(job_id, hook["url"], event, attempts, str(exc))
            return
        error = await self._post(client, hook["url"], f"{job_id}.{job.status.value}", event, JobView.of(job))
        if error is None:
            self.metrics.webhook_deliveries.labels("delivered").inc()
            await self._forget(job_id)
        elif attempts >= self.settings.webhook_max_attempts:
            await self._dead(job_id, hook["url"], event, attempts, error)
        else:
            self.metrics.webhook_deliveries.labels("failed").inc()
            wait = min(MAX_BACKOFF_S, self.settings.webhook_backoff_s * 2 ** (attempts - 1))
            await self.redis.hset(self.keys.hook(job_id), "attempts", attempts)
            await self.redis.zadd(self.keys.due, {job_id: time.time() + wait})

    async def _post(self, client: httpx.AsyncClient, url: str, message_id: str, event: str,
                    view: JobView) -> str | None:
        """One attempt; None when the receiver answered 2xx, else why not."""
        now = int(time.time())
        body = json.dumps({"type": event, "timestamp": datetime.fromtimestamp(now, UTC).isoformat(),
                           "data": json.loads(view.model_dump_json())}).encode()
        headers = {"content-type": "application/json", "user-agent": "ldm-serve-webhooks",
                   "webhook-id": message_id, "webhook-timestamp": str(now)}
        if self.settings.webhook_secret:
            secret = self.settings.webhook_secret.get_secret_value()
            headers["webhook-signature"] = signature(secret, message_id, now, body)
        try:
            response = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"

    async def _forget(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.due, job_id)
            pipe.delete(self.keys.hook(job_id))
            await pipe.execute()

    async def _dead(self, job_id: str, url: str, event: str, attempts: int, error: str) -> None:
        self.metrics.webhook_deliveries.labels("dead").inc()
        log.warning("webhook of job %s dead-lettered after %d attempt(s): %s", job_id, attempts, error)
        await self.redis.xadd(self.keys.dead, {"job_id": job_id, "url": url, "event": event, "attempts": attempts,
                                               "error": error[:500], "at": time.time()},
                              maxlen=DEAD_MAXLEN, approximate=True)
        await self._forget(job_id)

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead-lettered deliveries, newest first."""
        entries = await self.redis.xrevrange(self.keys.dead, count=count) or []
        return [{_text(k): _text(v) for k, v in (fields or {}).items()} for _, fields in entries]
