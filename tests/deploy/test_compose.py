"""docker-compose.yml and its CPU override: valid against the Compose specification's JSON schema (the copy
check-jsonschema vendors, `vendor.compose-spec`), and true to the service: its commands, settings, ports and
health endpoints, with Prometheus and Grafana wired to what the containers really serve."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from typing import Any

import jsonschema
import pytest
import yaml

from service.serve import WORKER_STOP_TIMEOUT_S
from tests.deploy.service_truth import ENV_NAMES, parse_ldm, settings_from
from tests.deploy.sources import (
    COMPOSE,
    COMPOSE_CPU,
    GRAFANA,
    PROMETHEUS,
    ROOT,
    MissingVariable,
    interpolate,
    load_compose,
    merge,
    plain,
    stage,
)

LDM_IMAGES = ("ldm-serve:cuda", "ldm-serve:cpu")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return dict(json.loads(vendored.read_text()))


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return plain(load_compose(COMPOSE))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return merge(load_compose(COMPOSE), load_compose(COMPOSE_CPU))  # type: ignore[no-any-return]


def schema_errors(schema: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def container_env(service: dict[str, Any]) -> dict[str, str]:
    """Image ENV (for our image) overlaid by the service's `environment`, as the process sees it."""
    env = stage("runtime").env() if service.get("image") in LDM_IMAGES else {}
    return {**env, **{k: str(v) for k, v in (service.get("environment") or {}).items()}}


def test_files_validate_against_the_compose_spec(schema: dict[str, Any], gpu: dict[str, Any],
                                                 cpu: dict[str, Any]) -> None:
    assert schema["title"] == "Compose Specification"
    for name, doc in (("docker-compose.yml", gpu), ("docker-compose.cpu.yml", plain(load_compose(COMPOSE_CPU))),
                      ("merged", cpu)):
        assert schema_errors(schema, doc) == [], name


def test_the_schema_catches_a_planted_mistake(schema: dict[str, Any], gpu: dict[str, Any]) -> None:
    bad = copy.deepcopy(gpu)
    bad["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilites"] = ["gpu"]
    bad["services"]["api"]["restart"] = ["always"]
    assert len(schema_errors(schema, bad)) == 2


def test_commands_and_environment_are_the_services(gpu: dict[str, Any]) -> None:
    for name in ("api", "worker"):
        service = gpu["services"][name]
        assert service["image"] in LDM_IMAGES and service["build"]["context"] == "."
        assert parse_ldm(service["command"]) == "", (name, service["command"])
        env = container_env(service)
        assert not {k for k in env if k.startswith("LDM_")} - ENV_NAMES
        settings = settings_from(env)
        redis = re.fullmatch(r"redis://(\w+):(\d+)/\d+", settings.redis_url or "")
        assert redis and redis.group(1) in gpu["services"] and redis.group(2) == "6379"
    worker = gpu["services"]["worker"]
    assert worker["command"][:3] == ["worker", "--model", settings_from(container_env(worker)).default_model]


def test_redis_keeps_the_queue(gpu: dict[str, Any]) -> None:
    redis = gpu["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert any(v.split(":")[1] == "/data" and v.split(":")[0] in gpu["volumes"] for v in redis["volumes"])


def test_api_publishes_the_settings_ports(gpu: dict[str, Any]) -> None:
    api = gpu["services"]["api"]
    settings = settings_from(container_env(api))
    published = {int(p.split(":")[-1]) for p in api["ports"]}
    assert published == {settings.rest_port, settings.grpc_port}


def test_worker_scales_and_reserves_a_gpu(gpu: dict[str, Any]) -> None:
    worker = gpu["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker  # `--scale worker=N` would clash
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert seconds(worker["stop_grace_period"]) > WORKER_STOP_TIMEOUT_S  # the batch in hand finishes
    assert any(v.endswith(":/models:ro") for v in worker["volumes"])


def test_depends_on_waits_for_health(gpu: dict[str, Any]) -> None:
    services = gpu["services"]
    edges = [(name, dep, cond) for name, s in services.items() for dep, cond in (s.get("depends_on") or {}).items()]
    assert {(n, d) for n, d, _ in edges} >= {("api", "redis"), ("worker", "redis"), ("prometheus", "api"),
                                             ("grafana", "prometheus")}
    for name, dep, cond in edges:
        assert cond == {"condition": "service_healthy"}, (name, dep)
        assert "healthcheck" in services[dep] or services[dep].get("image") in LDM_IMAGES, dep


def test_prometheus_scrapes_the_ports_the_containers_serve(gpu: dict[str, Any]) -> None:
    services = gpu["services"]
    prometheus = services["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api = settings_from(container_env(services["api"]))
    assert jobs["ldm-api"]["static_configs"][0]["targets"] == [f"api:{api.rest_port}"]
    worker = settings_from(container_env(services["worker"]))
    dns = jobs["ldm-worker"]["dns_sd_configs"][0]
    assert dns["names"] == ["worker"] and dns["port"] == worker.worker_metrics_port != 0
    assert all((PROMETHEUS / f).is_file() for f in config["rule_files"])


def test_grafana_is_provisioned_with_the_prometheus_and_the_dashboard(gpu: dict[str, Any]) -> None:
    grafana = gpu["services"]["grafana"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    host, port = re.fullmatch(r"http://(\w+):(\d+)", datasource["url"]).groups()  # type: ignore[union-attr]
    ports = interpolate(gpu["services"][host]["ports"], {})
    assert host in gpu["services"] and any(p.endswith(f":{port}:{port}") for p in ports)
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/ldm-serve.yml").read_text())["providers"][0]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "deploy/grafana/dashboards" / home.removeprefix(provider["options"]["path"] + "/")).is_file()


def test_cpu_override_builds_the_cpu_image_and_drops_the_gpu(cpu: dict[str, Any]) -> None:
    override = load_compose(COMPOSE_CPU)["services"]
    assert not any(key in s for s in override.values() for key in ("ports", "volumes", "command"))  # see merge()
    for name in ("api", "worker"):
        service = cpu["services"][name]
        assert service["image"] == "ldm-serve:cpu" and service["build"]["args"]["VARIANT"] == "cpu"
        assert service["build"]["context"] == "."  # merged into the base's build, not replacing it
    worker = cpu["services"]["worker"]
    assert "devices" not in worker["deploy"]["resources"]["reservations"]
    assert settings_from(container_env(worker)).worker_device == "cpu"
    assert worker["environment"]["LDM_REDIS_URL"] == "redis://redis:6379/0"  # the base's variables stay



# ------------------------------------------------------------------------------------------------ safe defaults

def test_grafana_does_not_start_without_an_admin_password(gpu: dict[str, Any]) -> None:
    """No admin/admin: without GRAFANA_ADMIN_PASSWORD (unset or empty) compose stops with a message naming it."""
    for env in ({}, {"GRAFANA_ADMIN_PASSWORD": ""}):
        with pytest.raises(MissingVariable, match="GRAFANA_ADMIN_PASSWORD"):
            interpolate(gpu, env)
    doc = interpolate(gpu, {"GRAFANA_ADMIN_PASSWORD": "s3cret-from-the-operator"})
    assert doc["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret-from-the-operator"


def test_prometheus_and_grafana_listen_on_loopback_unless_told(gpu: dict[str, Any]) -> None:
    env = {"GRAFANA_ADMIN_PASSWORD": "x"}
    ports = {name: interpolate(gpu, env)["services"][name]["ports"] for name in ("prometheus", "grafana")}
    assert ports == {"prometheus": ["127.0.0.1:9090:9090"], "grafana": ["127.0.0.1:3000:3000"]}
    told = interpolate(gpu, {**env, "PROMETHEUS_BIND": "0.0.0.0", "GRAFANA_BIND": "10.0.0.5"})["services"]
    assert told["prometheus"]["ports"] == ["0.0.0.0:9090:9090"] and told["grafana"]["ports"] == ["10.0.0.5:3000:3000"]
    redis = interpolate(gpu, env)["services"]["redis"]
    assert "ports" not in redis  # the queue (prompts, images) is reached on the compose network only


def test_interpolation_follows_compose(gpu: dict[str, Any]) -> None:
    """The stand-in for `docker compose config` substitutes as compose does (its documented forms)."""
    env = {"SET": "v", "EMPTY": ""}
    cases = {"${SET}": "v", "${UNSET:-d}": "d", "${EMPTY:-d}": "d", "${EMPTY-d}": "", "${UNSET-d}": "d",
             "$$HOME": "$HOME", "${SET:?e}": "v", "a${SET}b": "avb"}
    assert {k: interpolate(k, env) for k in cases} == cases
    with pytest.raises(MissingVariable, match="NOPE is missing a value: say why"):
        interpolate("${NOPE?say why}", env)
