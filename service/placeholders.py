"""Refuse to start on a secret that was never set: the placeholder Redis password of deploy/k8s/base (and the
usual stand-ins), which `kubectl apply -k deploy/k8s/base` would otherwise deploy unnoticed. Checked by
`ldm api`, `ldm serve` and `ldm worker` before they start; the error says how to set a real one.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from service.config import Settings

#: the base's placeholder (deploy/k8s/base/config.yaml, Secret ldm-secrets, REDIS_PASSWORD; tests/deploy/test_k8s.py
#: keeps the two equal) and stand-ins nobody should run with
PLACEHOLDER_PASSWORDS = frozenset({"change-me", "changeme", "change_me", "password", "redis", "secret", "admin"})


class PlaceholderSecret(ValueError):
    """A setting still holds a known placeholder."""


def refuse_placeholder_secrets(settings: Settings) -> None:
    """Raise PlaceholderSecret when LDM_REDIS_URL's password is a known placeholder (the message never echoes a
    password that is not one)."""
    if not settings.redis_url:
        return
    password = urlsplit(settings.redis_url).password
    if password is not None and unquote(password).strip().lower() in PLACEHOLDER_PASSWORDS:
        raise PlaceholderSecret(
            f"LDM_REDIS_URL carries the placeholder Redis password {unquote(password)!r}: set a real one before "
            "starting. On Kubernetes, replace the REDIS_PASSWORD entry of the ldm-secrets Secret from an overlay of "
            "your own (a secretGenerator with behavior: replace, e.g. REDIS_PASSWORD=$(openssl rand -hex 32); "
            "README \"Kubernetes\"); elsewhere, put the Redis's real password in LDM_REDIS_URL")
