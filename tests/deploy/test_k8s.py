"""deploy/k8s rendered as kustomize renders it, validated offline against the Kubernetes API schemas
(kubernetes-validate, strict) and the KEDA / Prometheus-operator CRD schemas (tests/deploy/crd_schemas.py),
then checked against the service: commands, settings, ports, probes, selectors, the queue KEDA watches."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.placeholders import PLACEHOLDER_PASSWORDS, PlaceholderSecret, refuse_placeholder_secrets
from service.queue import Keys
from service.schemas import PRIORITIES
from service.serve import WORKER_STOP_TIMEOUT_S
from service.worker.runner import served_name
from tests.deploy import crd_schemas
from tests.deploy.kustomize import render
from tests.deploy.service_truth import ENV_NAMES, parse_ldm, rest_paths, settings_from
from tests.deploy.sources import K8S, PROMETHEUS, k8s_container_env, stage

Doc = dict[str, Any]
NAMESPACE = "ldm-serve"
#: the oldest Kubernetes we promise to work on, and the newest schemas kubernetes-validate ships
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
#: variables of our containers that are not service settings, each with its reason
OTHER_ENV = {"REDIS_PASSWORD": "from the Secret, spliced into LDM_REDIS_URL by the kubelet"}
FOLDERS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {name: render(folder) for name, folder in FOLDERS.items()}


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def pod_templates(docs: list[Doc]) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels / matchExpressions) or a Service's plain map, against `labels`."""
    plain = {k: v for k, v in selector.items() if k not in ("matchLabels", "matchExpressions")}
    wanted = {**plain, **selector.get("matchLabels", {})}
    if any(labels.get(k) != v for k, v in wanted.items()):
        return False
    for e in selector.get("matchExpressions", []):
        ok = {"In": labels.get(e["key"]) in e.get("values", []),
              "NotIn": labels.get(e["key"]) not in e.get("values", []),
              "Exists": e["key"] in labels, "DoesNotExist": e["key"] not in labels}[e["operator"]]
        if not ok:
            return False
    return True


def selected_pods(docs: list[Doc], selector: Doc) -> set[str]:
    return {name for name, t in pod_templates(docs).items() if selects(selector, t["metadata"]["labels"])}


def ldm_containers(docs: list[Doc]) -> dict[str, tuple[Doc, Doc]]:
    """workload name -> (its pod spec, its ldm-serve container)."""
    out = {}
    for name, template in pod_templates(docs).items():
        for c in template["spec"]["containers"]:
            if c["image"].split(":")[0] == "ldm-serve":
                out[name] = (template["spec"], c)
    return out


def env_of(docs: list[Doc], container: Doc) -> dict[str, str]:
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    return k8s_container_env(container, config_maps, stage("runtime").env())


# ------------------------------------------------------------------------------------------------ render, validate

@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_our_render_is_kustomizes(name: str, rendered: dict[str, list[Doc]]) -> None:
    """Where kubectl (built-in kustomize) or kustomize is installed, it renders exactly what we validate."""
    tool = shutil.which("kustomize") or shutil.which("kubectl")
    if tool is None:
        pytest.skip("no kustomize or kubectl here: the manifests are still rendered by tests/deploy/kustomize.py")
    cmd = [tool, "build" if tool.endswith("kustomize") else "kustomize", str(FOLDERS[name])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    theirs = [d for d in yaml.safe_load_all(out) if d]

    def key(d: Doc) -> tuple[str, str, str]:
        return d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]

    assert {key(d): d for d in rendered[name]} == {key(d): d for d in theirs}


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_manifests_validate_against_kubernetes_and_crd_schemas(name: str, rendered: dict[str, list[Doc]]) -> None:
    docs = rendered[name]
    custom = [d for d in docs if crd_schemas.is_custom(d)]
    for doc in docs:
        if doc in custom:
            assert crd_schemas.errors(doc) == [], (doc["kind"], doc["metadata"]["name"])
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {'.'.join(map(str, err.path))}: "
                            f"{err.message}")
    kinds = {d["kind"] for d in custom}
    assert kinds == (set() if name == "base" else {"ScaledObject", "TriggerAuthentication", "ServiceMonitor",
                                                   "PodMonitor", "PrometheusRule"})


def test_the_validators_catch_planted_mistakes(rendered: dict[str, list[Doc]]) -> None:
    worker = copy.deepcopy(one(rendered["gpu"], "Deployment", "worker"))
    worker["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/metrics"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(worker, K8S_VERSIONS[0], strict=True)
    scaled = copy.deepcopy(one(rendered["gpu"], "ScaledObject", "worker"))
    scaled["spec"]["minReplicaCout"] = 1
    assert any("minReplicaCout" in e for e in crd_schemas.errors(scaled))


def test_everything_is_in_one_namespace(rendered: dict[str, list[Doc]]) -> None:
    for docs in rendered.values():
        assert one(docs, "Namespace", NAMESPACE)
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {NAMESPACE}
        assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ldm-serve" for d in docs)


# ------------------------------------------------------------------------------------------------ against the service

@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_containers_run_real_commands_with_real_settings(name: str, rendered: dict[str, list[Doc]]) -> None:
    docs = rendered[name]
    containers = ldm_containers(docs)
    assert set(containers) == {"api", "worker"}
    for data in (d["data"] for d in docs if d["kind"] == "ConfigMap"):
        assert not set(data) - ENV_NAMES, "ConfigMap keys must be LDM_* settings of service/config.py"
    for workload, (_, container) in containers.items():
        assert parse_ldm(container["args"]) == "", (workload, container["args"])
        assert container["args"][0] == workload  # `ldm api`, `ldm worker`
        declared = {e["name"] for e in container.get("env", [])}
        assert not {n for n in declared if n not in ENV_NAMES and n not in OTHER_ENV}, workload
        settings = settings_from(env_of(docs, container))  # raises on an invalid value
        redis = re.fullmatch(r"redis://:[^@]+@([\w.-]+):(\d+)/\d+", settings.redis_url or "")
        service = one(docs, "Service", redis.group(1)) if redis else None
        assert service and int(redis.group(2)) in {p["port"] for p in service["spec"]["ports"]}  # type: ignore
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if workload == "api":
            assert ports == {"http": settings.rest_port, "grpc": settings.grpc_port}
        else:
            assert ports == {"metrics": settings.worker_metrics_port} and settings.worker_metrics_port != 0
            assert container["args"][1:3] == ["--model", settings.default_model]


def test_probes_use_the_real_endpoints(rendered: dict[str, list[Doc]]) -> None:
    containers = ldm_containers(rendered["gpu"])
    api, worker = containers["api"][1], containers["worker"][1]
    probes = {(w, kind): c[kind]["httpGet"] for w, c in (("api", api), ("worker", worker))
              for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes[("api", "readinessProbe")]["path"] == "/readyz"
    assert probes[("api", "livenessProbe")]["path"] == "/healthz"
    assert {p["path"] for (w, _), p in probes.items() if w == "worker"} == {"/metrics"}
    assert {p["path"] for (w, _), p in probes.items() if w == "api"} <= rest_paths()
    for (w, _), probe in probes.items():
        assert probe["port"] in {p["name"] for p in containers[w][1]["ports"]}


def test_workers_drain_and_outlive_their_batch(rendered: dict[str, list[Doc]]) -> None:
    containers = ldm_containers(rendered["gpu"])
    pod, worker = containers["worker"]
    assert pod["terminationGracePeriodSeconds"] > WORKER_STOP_TIMEOUT_S
    drain = " ".join(worker["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in drain and "while kill -0 1" in drain  # SIGTERM to `ldm worker`, wait for its exit
    api_pod, api = containers["api"]
    sleep = int(api["lifecycle"]["preStop"]["exec"]["command"][1])
    grace = settings_from(env_of(rendered["gpu"], api)).grpc_shutdown_grace_s
    assert api_pod["terminationGracePeriodSeconds"] > sleep + grace


def test_selectors_pick_exactly_their_pods(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["gpu"]
    for name in ("api", "redis"):
        service = one(docs, "Service", name)
        assert selected_pods(docs, service["spec"]["selector"]) == {name}
        pod = next(c for c in pod_templates(docs)[name]["spec"]["containers"])
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in pod["ports"]}
    for name in ("api", "worker"):
        assert selected_pods(docs, one(docs, "PodDisruptionBudget", name)["spec"]["selector"]) == {name}
        workload = one(docs, "Deployment", name)
        assert selected_pods(docs, workload["spec"]["selector"]) == {name}
    hpa = one(docs, "HorizontalPodAutoscaler", "api")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"}
    assert hpa["minReplicas"] >= 2 and "replicas" not in one(docs, "Deployment", "api")["spec"]
    assert ldm_containers(docs)["api"][1]["resources"]["requests"]["cpu"]  # a CPU target needs a request


def test_monitors_find_the_metrics_ports(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["gpu"]
    monitor = one(docs, "ServiceMonitor", "api")["spec"]
    service = one(docs, "Service", "api")
    assert selects(monitor["selector"], service["metadata"]["labels"])  # a ServiceMonitor selects Services
    assert [e["port"] for e in monitor["endpoints"]] == ["http"]
    assert any(p["name"] == "http" and p["targetPort"] == "http" for p in service["spec"]["ports"])
    assert all(e["path"] == "/metrics" for e in monitor["endpoints"]) and "/metrics" in rest_paths()
    pods = one(docs, "PodMonitor", "worker")["spec"]
    assert selected_pods(docs, pods["selector"]) == {"worker"}
    assert [e["port"] for e in pods["podMetricsEndpoints"]] == ["metrics"]


def test_only_api_and_workers_reach_redis(rendered: dict[str, list[Doc]]) -> None:
    for name, docs in rendered.items():
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        assert all(selected_pods(docs, p["spec"]["podSelector"]) == {"redis"} for p in policies)
        in_namespace = [peer for p in policies for rule in p["spec"]["ingress"] for peer in rule["from"]
                        if "namespaceSelector" not in peer]
        assert set().union(*(selected_pods(docs, peer["podSelector"]) for peer in in_namespace)) == {"api", "worker"}
        others = [peer for p in policies for rule in p["spec"]["ingress"] for peer in rule["from"]
                  if "namespaceSelector" in peer]
        expected = [] if name == "base" else [{"kubernetes.io/metadata.name": "keda"}]
        assert [peer["namespaceSelector"]["matchLabels"] for peer in others] == expected  # KEDA reads the queue


def test_redis_persists_and_authenticates(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["base"]
    redis = one(docs, "StatefulSet", "redis")["spec"]
    container = redis["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    assert "--requirepass $(REDIS_PASSWORD)" in args
    secret = one(docs, "Secret", "ldm-secrets")
    assert all(e["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"] for e in container["env"])
    claims = {c["metadata"]["name"] for c in redis["volumeClaimTemplates"]}
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]} == {"data": "/data"} and claims == {"data"}


# ------------------------------------------------------------------------------------------------ the GPU overlay

def test_gpu_overlay_puts_one_worker_on_each_gpu(rendered: dict[str, list[Doc]]) -> None:
    base_pod, base_worker = ldm_containers(rendered["base"])["worker"]
    pod, worker = ldm_containers(rendered["gpu"])["worker"]
    assert "nvidia.com/gpu" not in str(base_pod) and one(rendered["base"], "Deployment", "worker")["spec"][
        "replicas"] == 1
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert settings_from(env_of(rendered["gpu"], worker)).worker_device == "cuda"
    assert settings_from(env_of(rendered["base"], base_worker)).worker_device is None
    assert "replicas" not in one(rendered["gpu"], "Deployment", "worker")["spec"]  # KEDA's to set
    assert {c["image"] for _, c in ldm_containers(rendered["gpu"]).values()} == {"ldm-serve:cuda"}
    assert {c["image"] for _, c in ldm_containers(rendered["base"]).values()} == {"ldm-serve:cpu"}


def test_keda_scales_workers_on_their_models_queue(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["gpu"]
    scaled = one(docs, "ScaledObject", "worker")["spec"]
    assert scaled["scaleTargetRef"] == {"name": "worker"} and one(docs, "Deployment", "worker")
    assert scaled["minReplicaCount"] >= 1  # /readyz needs a live worker for the default model
    worker = ldm_containers(docs)["worker"][1]
    settings = settings_from(env_of(docs, worker))
    triggers = scaled["triggers"]
    keys = Keys(settings.key_prefix)
    model = served_name(worker["args"][2])
    # every priority's stream counts, added up (separate triggers alone would scale on the largest)
    assert {t["name"]: t["metadata"]["stream"] for t in triggers} == {p: keys.stream(model, p) for p in PRIORITIES}
    modifiers = scaled["advanced"]["scalingModifiers"]
    assert sorted(modifiers["formula"].replace(" ", "").split("+")) == sorted(PRIORITIES)
    assert modifiers["target"] == str(settings.max_batch)  # one full batch per worker
    for trigger in triggers:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["streamLength"] == str(settings.max_batch)
        host, port = meta["address"].rsplit(":", 1)
        assert host == f"redis.{NAMESPACE}.svc.cluster.local"
        assert int(port) in {p["port"] for p in one(docs, "Service", "redis")["spec"]["ports"]}
        auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])["spec"]["secretTargetRef"]
        secret = one(docs, "Secret", auth[0]["name"])
        assert auth[0]["parameter"] == "password" and auth[0]["key"] in secret["stringData"]


def test_prometheus_rule_is_the_alerts_file(rendered: dict[str, list[Doc]]) -> None:
    rule = one(rendered["gpu"], "PrometheusRule", "ldm-serve")
    assert rule["spec"] == yaml.safe_load(Path(PROMETHEUS / "alerts.yml").read_text())


def test_the_placeholder_redis_password_stops_the_api_and_says_how_to_set_it(rendered: dict[str, list[Doc]]) -> None:
    """`kubectl apply -k deploy/k8s/base` as shipped: the API and the workers refuse the Secret's placeholder."""
    docs = rendered["base"]
    placeholder = one(docs, "Secret", "ldm-secrets")["stringData"]["REDIS_PASSWORD"]
    assert placeholder in PLACEHOLDER_PASSWORDS  # the service knows the base's placeholder
    for workload, (_, container) in ldm_containers(docs).items():
        env = {**env_of(docs, container), "REDIS_PASSWORD": placeholder}
        env["LDM_REDIS_URL"] = next(e["value"] for e in container["env"] if e["name"] == "LDM_REDIS_URL").replace(
            "$(REDIS_PASSWORD)", placeholder)  # what the kubelet splices in
        with pytest.raises(PlaceholderSecret, match="REDIS_PASSWORD entry of the ldm-secrets Secret") as err:
            refuse_placeholder_secrets(settings_from(env))
        assert "secretGenerator" in str(err.value), workload
        env["LDM_REDIS_URL"] = env["LDM_REDIS_URL"].replace(placeholder, "a8f3c1d2e4b5968778695a4b3c2d1e0f")
        refuse_placeholder_secrets(settings_from(env))  # a real password passes
