"""Webhook URL checks and signing (service/webhooks.py); delivery against real servers: tests/integration."""

from __future__ import annotations

import pytest

from service.config import Settings
from service.webhooks import WebhookRefused, check_url, signature

ALLOWED = Settings(webhook_allowed_hosts=("hooks.example.com", ".example.org", "10.0.0.0/8", "127.0.0.1"))


def test_signature_matches_the_standard_webhooks_reference_vector() -> None:
    """The example of the Standard Webhooks specification's own libraries."""
    got = signature("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                    b'{"test": 2432232314}')
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize(("url", "expected"), [
    ("https://hooks.example.com/x", ("hooks.example.com", 443)),
    ("http://a.b.example.org:8080/", ("a.b.example.org", 8080)),
    ("http://10.2.3.4/", ("10.2.3.4", 80)), ("http://127.0.0.1:9/", ("127.0.0.1", 9))])
def test_allowed_urls(url: str, expected: tuple[str, int]) -> None:
    assert check_url(url, ALLOWED) == expected


@pytest.mark.parametrize(("url", "why"), [
    ("https://evil.hooks.example.com/", "not in this server's allow-list"),  # exact names are exact
    ("https://example.org/", "not in this server's allow-list"),  # a .suffix is for subdomains
    ("http://127.0.0.2/", "not in this server's allow-list"), ("http://[::1]/", "not in this server's allow-list"),
    ("ftp://hooks.example.com/", "http(s) URL"), ("http://u:p@hooks.example.com/", "credentials"),
    ("http://[::1/", "not a valid URL"), ("http://hooks.example.com:70000/", "not a valid URL")])
def test_refused_urls(url: str, why: str) -> None:
    with pytest.raises(WebhookRefused, match=why.replace("(", r"\(").replace(")", r"\)")):
        check_url(url, ALLOWED)


def test_no_allow_list_means_webhooks_are_off() -> None:
    with pytest.raises(WebhookRefused, match="webhooks are off"):
        check_url("https://hooks.example.com/", Settings())
