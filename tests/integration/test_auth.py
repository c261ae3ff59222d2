"""API keys over REST and gRPC, against a real uvicorn, a real grpc.aio server and the test Redis.

The contract (docs/operations.md): 401 / UNAUTHENTICATED for a missing, malformed or unknown key,
403 / PERMISSION_DENIED for a revoked one, nothing queued for either; /healthz, /readyz and the docs open;
/metrics open or behind its own token; keys configured as SHA-256 digests, in settings or a file re-read when it
changes; off only on loopback or when explicitly disabled.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import cli
from service.auth import FILE_CHECK_S, ExposureError, check_exposure, hash_key
from service.config import Settings
from tests.integration.secure import TXT, Keys, bearer, grpc_auth, grpc_serving, metric, params, pb, queued, redis_keys
from tests.integration.test_rest import Api, serving

pytestmark = pytest.mark.timeout(60)
MODEL = "tiny-shapes"  # the default model: submissions need no live worker to be accepted
JOB = "0" * 32


@pytest.fixture
def keys() -> Keys:
    return Keys.fresh()


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Api]]:
    """start(**settings) -> an API under uvicorn on this test's Redis prefix."""
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(serving(make_settings(**overrides)))


def refusals(keys: Keys) -> list[tuple[dict[str, str], int, str]]:
    """(headers, status, message start) of every kind of refused credentials."""
    return [
        ({}, 401, "authentication required"),
        (bearer(keys.stranger), 401, "invalid API key"),
        ({"Authorization": f"Basic {keys.alice}"}, 401, "malformed authorization"),
        ({"Authorization": "Bearer"}, 401, "malformed authorization"),
        ({"Authorization": f"Bearer {keys.alice} extra"}, 401, "malformed authorization"),
        (bearer(keys.alice.upper()), 401, "invalid API key"),  # keys are case-sensitive
        (bearer(keys.revoked), 403, "this API key has been revoked"),
    ]


CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/jobs", TXT), ("POST", "/v1/txt2img", TXT), ("POST", "/v1/inpaint", TXT),
    ("GET", f"/v1/jobs/{JOB}", None), ("DELETE", f"/v1/jobs/{JOB}", None), ("GET", f"/v1/jobs/{JOB}/events", None),
    ("GET", f"/v1/jobs/{JOB}/images/0", None), ("GET", "/v1/models", None), ("GET", "/v1/nothing-here", None)]


# ------------------------------------------------------------------------------------------------ REST

def test_every_route_but_the_open_ones_refuses_bad_credentials_and_queues_nothing(
        api: Callable[..., Api], keys: Keys) -> None:
    app = api(**keys.settings())
    for headers, status, message in refusals(keys):
        for method, path, body in CALLS:
            resp = app.client.request(method, path, json=body, headers=headers)
            assert resp.status_code == status, (headers, method, path, resp.text)
            assert resp.json()["detail"].startswith(message)
            assert resp.headers["www-authenticate"].startswith('Bearer realm="ldm-serve"')
        error = app.client.post("/v1/images/generations", json={"prompt": "x"}, headers=headers).json()["error"]
        assert error["message"].startswith(message)
        assert error["type"] == ("permission_error" if status == 403 else "authentication_error")
    assert queued(app.settings, MODEL) == 0
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json", "/metrics"):
        assert app.client.get(path).status_code in (200, 503), path  # /readyz: 503 without a worker, not 401


def test_the_right_key_gets_in_and_two_keys_are_told_apart(api: Callable[..., Api], keys: Keys) -> None:
    app = api(**keys.settings())
    job = app.client.post("/v1/jobs", json=TXT, headers=bearer(keys.alice))
    assert job.status_code == 202, job.text
    assert app.client.get(f"/v1/jobs/{job.json()['id']}", headers=bearer(keys.alice)).status_code == 200
    assert app.client.get(f"/v1/jobs/{job.json()['id']}", headers=bearer(keys.bob)).status_code == 404  # not bob's
    assert app.client.post("/v1/jobs", json=TXT, headers={"authorization": f"bearer {keys.bob}"}).status_code == 202
    assert queued(app.settings, MODEL) == 2


def test_two_authorization_headers_are_malformed(api: Callable[..., Api], keys: Keys) -> None:
    app = api(**keys.settings())
    resp = app.client.post("/v1/jobs", json=TXT, headers=[("Authorization", f"Bearer {keys.alice}"),
                                                          ("Authorization", f"Bearer {keys.stranger}")])
    assert resp.status_code == 401 and "not several" in resp.json()["detail"]


def test_an_unauthenticated_body_is_refused_before_it_is_read(api: Callable[..., Api], keys: Keys) -> None:
    app = api(**keys.settings(), max_body_bytes=1000)
    resp = app.client.post("/v1/jobs", content=b"{" * 50_000, headers={"content-type": "application/json"})
    assert resp.status_code == 401  # not 413 and not 422: neither the size nor the JSON were looked at
    ok = app.client.post("/v1/jobs", content=b"{" * 50_000, headers={"content-type": "application/json",
                                                                     **bearer(keys.alice)})
    assert ok.status_code == 413


def test_openai_client_raises_its_authentication_and_permission_errors(api: Callable[..., Api], keys: Keys) -> None:
    app = api(**keys.settings())

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0)

    with pytest.raises(openai.AuthenticationError):
        client(keys.stranger).images.generate(prompt="x", size="64x64")
    with pytest.raises(openai.PermissionDeniedError):
        client(keys.revoked).images.generate(prompt="x", size="64x64")
    assert [m.id for m in client(keys.alice).models.list().data] == [MODEL]


def test_refusals_are_counted_by_reason_and_route_template(api: Callable[..., Api], keys: Keys) -> None:
    app = api(**keys.settings())
    app.client.post("/v1/jobs", json=TXT)
    app.client.get(f"/v1/jobs/{JOB}", headers=bearer(keys.revoked))
    app.client.get(f"/v1/jobs/{JOB}", headers=bearer(keys.stranger))
    assert metric(app.client, 'ldm_auth_failures_total{front_end="rest",reason="missing"}') == 1
    assert metric(app.client, 'ldm_auth_failures_total{front_end="rest",reason="revoked"}') == 1
    assert metric(app.client, 'ldm_auth_failures_total{front_end="rest",reason="unknown"}') == 1
    text = app.client.get("/metrics").text
    assert 'ldm_http_requests_total{method="POST",route="/v1/jobs",status="401"} 1.0' in text
    assert 'ldm_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="403"} 1.0' in text
    assert keys.stranger not in text and keys.revoked not in text


def test_metrics_behind_their_own_token(api: Callable[..., Api], keys: Keys) -> None:
    token = "metrics-token-" + keys.bob
    app = api(**keys.settings(), metrics_token_hash=hash_key(token))
    assert app.client.get("/metrics").status_code == 401
    assert app.client.get("/metrics", headers=bearer(keys.alice)).status_code == 401  # an API key is not the token
    scraped = app.client.get("/metrics", headers=bearer(token))
    assert scraped.status_code == 200 and "ldm_http_requests_total" in scraped.text
    assert app.client.get("/healthz").status_code == 200


def test_openapi_declares_the_bearer_schemes(api: Callable[..., Api], keys: Keys) -> None:
    schema = api(**keys.settings()).client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {"type": "http", "scheme": "bearer", "bearerFormat": "ldm_...",
                                 "description": schemes["ApiKey"]["description"]}
    assert schemes["MetricsToken"]["scheme"] == "bearer"
    paths = schema["paths"]
    for path, method in (("/v1/jobs", "post"), ("/v1/jobs/{job_id}", "get"), ("/v1/txt2img", "post"),
                         ("/v1/images/generations", "post"), ("/v1/models", "get")):
        operation = paths[path][method]
        assert {"ApiKey": []} in operation["security"] and {"401", "403"} <= set(operation["responses"]), path
    assert "security" not in paths["/healthz"]["get"] and "security" not in paths["/readyz"]["get"]
    assert paths["/metrics"]["get"]["security"] == [{"MetricsToken": []}]


def test_key_file_rotates_keys_without_a_restart_and_fails_closed(
        api: Callable[..., Api], keys: Keys, tmp_path: Path) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_text(f"# clients\n{hash_key(keys.alice)} alice\n\n")
    app = api(api_key_file=key_file)

    def status(key: str) -> int:
        return app.client.get("/v1/models", headers=bearer(key)).status_code

    def becomes(key: str, code: int) -> None:
        deadline = time.monotonic() + 3 * FILE_CHECK_S + 2
        while status(key) != code:
            assert time.monotonic() < deadline, f"{key[:8]}... never answered {code}"
            time.sleep(0.1)

    assert (status(keys.alice), status(keys.bob)) == (200, 401)
    key_file.write_text(f"revoked {hash_key(keys.alice)} alice, rotated\n{hash_key(keys.bob)} bob\n")
    becomes(keys.bob, 200)
    assert status(keys.alice) == 403
    key_file.write_text(f"{hash_key(keys.bob)} bob\n{keys.alice}\n")  # a plain key pasted by mistake
    becomes(keys.bob, 401)  # the file is unusable: none of its keys works until it is fixed
    key_file.unlink()
    key_file.write_text(f"{hash_key(keys.bob)} bob\n")
    becomes(keys.bob, 200)


def test_a_key_file_that_does_not_parse_stops_the_start(make_settings: Callable[..., Settings],
                                                        tmp_path: Path) -> None:
    from service.api.rest import create_app

    key_file = tmp_path / "keys"
    key_file.write_text("ldm_this-is-a-plain-key\n")
    with pytest.raises(ValueError, match="line 1: expected") as err:
        create_app(make_settings(api_key_file=key_file))
    assert "ldm_this-is-a-plain-key" not in str(err.value)


def test_settings_take_digests_only_and_never_echo_a_value(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match="not SHA-256 hex digests") as err:
        make_settings(api_key_hashes="ldm_a-plain-key-pasted-here")
    assert "ldm_a-plain-key-pasted-here" not in str(err.value)
    digest = hash_key("x")
    assert make_settings(api_key_hashes=f"{digest.upper()}, {hash_key('y')}").api_key_hashes == (
        digest, hash_key("y"))


# ------------------------------------------------------------------------------------------------ gRPC

@pytest.mark.anyio
async def test_grpc_refuses_bad_credentials_with_their_codes_and_queues_nothing(
        make_settings: Callable[..., Settings], keys: Keys) -> None:
    settings = make_settings(**keys.settings())
    async with grpc_serving(settings) as env:
        cases = [((), grpc.StatusCode.UNAUTHENTICATED, "authentication required"),
                 (grpc_auth(keys.stranger), grpc.StatusCode.UNAUTHENTICATED, "invalid API key"),
                 ((("authorization", keys.alice),), grpc.StatusCode.UNAUTHENTICATED, "malformed"),
                 (grpc_auth(keys.revoked), grpc.StatusCode.PERMISSION_DENIED, "this API key has been revoked")]
        for metadata, code, message in cases:
            calls = [env.stub.Generate(pb.GenerateRequest(parameters=params()), metadata=metadata, timeout=5),
                     env.stub.Inpaint(pb.InpaintRequest(parameters=params()), metadata=metadata, timeout=5),
                     env.stub.GetJob(pb.GetJobRequest(job_id=JOB), metadata=metadata, timeout=5),
                     env.stub.CancelJob(pb.CancelJobRequest(job_id=JOB), metadata=metadata, timeout=5)]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == code and (err.value.details() or "").startswith(message)
            for stream in (env.stub.GenerateStream(pb.GenerateRequest(parameters=params()), metadata=metadata,
                                                   timeout=5),
                           env.stub.WatchJob(pb.WatchJobRequest(job_id=JOB), metadata=metadata, timeout=5)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stream.read()
                assert err.value.code() == code
        assert queued(settings, MODEL) == 0
        health = health_pb2_grpc.HealthStub(env.channel)  # health checking stays open
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the right key passes: the job id is what is unknown
            await env.stub.GetJob(pb.GetJobRequest(job_id=JOB), metadata=grpc_auth(keys.alice), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        sample = env.metrics.registry.get_sample_value
        assert sample("ldm_auth_failures_total", {"front_end": "grpc", "reason": "revoked"}) == 6
        assert sample("ldm_grpc_requests_total", {"method": "GetJob", "code": "UNAUTHENTICATED"}) == 3


@pytest.mark.anyio
async def test_grpc_with_the_right_key_queues_the_job(make_settings: Callable[..., Settings], keys: Keys) -> None:
    settings = make_settings(**keys.settings())
    async with grpc_serving(settings) as env:
        call = env.stub.Generate(pb.GenerateRequest(parameters=params(), idempotency_key="kept"),
                                 metadata=grpc_auth(keys.bob), timeout=1)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # no worker: the call's deadline passes
            await call
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert queued(settings, MODEL) == 1


# ------------------------------------------------------------------------------------------------ exposure

@pytest.mark.parametrize(("overrides", "outcome"), [
    ({}, "authentication: OFF (no API keys configured): serving loopback only"),
    ({"rest_host": "::1", "grpc_host": "localhost"}, "serving loopback only"),
    ({"rest_host": "0.0.0.0"}, "refusing to serve LDM_REST_HOST 0.0.0.0 without authentication"),
    ({"grpc_host": "10.1.2.3"}, "refusing to serve LDM_GRPC_HOST 10.1.2.3 without authentication"),
    ({"rest_host": "api.example.com"}, "refusing to serve LDM_REST_HOST api.example.com"),
    ({"rest_host": "0.0.0.0", "auth_disabled": True}, "authentication: OFF (LDM_AUTH_DISABLED)"),
    ({"rest_host": "0.0.0.0", "api_key_hashes": (hash_key("k"),)}, "authentication: API keys (1 active)"),
    ({"rest_host": "0.0.0.0", "api_key_hashes": (hash_key("k"),), "metrics_token_hash": hash_key("t")},
     "/metrics needs its token"),
])
def test_exposure_without_keys_is_loopback_or_explicit(overrides: dict[str, Any], outcome: str) -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", **overrides)
    if outcome.startswith("refusing"):
        with pytest.raises(ExposureError, match="LDM_API_KEY_HASHES or LDM_API_KEY_FILE") as err:
            check_exposure(settings)
        assert str(err.value).startswith(outcome)
    else:
        assert outcome in check_exposure(settings)


def test_ldm_api_refuses_to_start_on_a_public_address_without_keys(redis_url: str) -> None:
    env = {"LDM_REDIS_URL": redis_url, "LDM_REST_HOST": "0.0.0.0", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "service.cli", "api"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2
    assert "ldm api: error: refusing to serve LDM_REST_HOST 0.0.0.0 without authentication" in done.stderr


def test_ldm_keys_new_and_hash_agree(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.main(["keys", "new", "--label", "alice"]) == 0
    out = capsys.readouterr().out.splitlines()
    key, digest_line = out[0].split()[1], out[1].split()
    assert key.startswith("ldm_") and len(key) > 40 and digest_line[1:] == [hash_key(key), "alice"]
    monkeypatch.setattr("sys.stdin", io.StringIO(key + "\n"))
    assert cli.main(["keys", "hash"]) == 0
    assert capsys.readouterr().out.strip() == hash_key(key)


def test_a_refused_call_leaves_no_trace_of_its_key_in_redis(api: Callable[..., Api], keys: Keys) -> None:
    app = api(**keys.settings())
    with httpx.Client(base_url=app.url) as client:
        client.post("/v1/jobs", json=TXT, headers=bearer(keys.stranger))
        client.post("/v1/jobs", json=TXT, headers=bearer(keys.alice))
    names = " ".join(redis_keys(app.settings))
    assert keys.alice not in names and keys.stranger not in names
    assert f"quota:rate:{hash_key(keys.alice)[:12]}" in names  # quotas know the key by a digest prefix
