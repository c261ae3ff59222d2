"""Prometheus config and alert rules (promtool: check config, check rules, and unit tests of every alert in
alerts_test.yml), and the Grafana dashboard: well formed, every query valid PromQL (promtool again), every
metric and label one that service/metrics.py defines. (That a running API and worker really export each
metric is checked by test_install.py, which scrapes them.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.metrics import METRICS, MetricSpec
from tests.deploy.promql import grouping_labels, matcher_labels, metric_names
from tests.deploy.service_truth import settings_from
from tests.deploy.sources import DASHBOARD, PROMETHEUS, ROOT

HERE = Path(__file__).resolve().parent
#: labels Prometheus or the operator attach to every scraped series (never the service's own)
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
SEVERITIES = {"warning", "critical"}


def promtool() -> str:
    """promtool, from Debian's prometheus package (`make install` installs it where apt-get works)."""
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; `make install` installs it as root "
                    "where apt-get works); the Python checks of the rules and the dashboard still run")
    return found


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False, cwd=cwd)


def series_specs() -> dict[str, MetricSpec]:
    """Series name -> its metric's spec: `x_bucket`, `x_sum`, `x_count` for histograms, the name otherwise."""
    out = {}
    for spec in METRICS:
        out[spec.name] = spec
        if spec.type == "histogram":
            out.update({spec.name + s: spec for s in ("_bucket", "_sum", "_count")})
    return out


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query, the template variables' ones included."""
    board = dashboard()
    out = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
            assert match, var
            out.append((f"variable {var['name']}", f"{match.group(1)}{{{match.group(2)}!=\"\"}}"))
    return out


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by what they stand for."""
    return expr.replace("$__rate_interval", "5m").replace("$model", ".*")


# ------------------------------------------------------------------------------------------------ promtool

def test_promtool_accepts_the_config_and_its_rules() -> None:
    tool = promtool()
    done = run(tool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    done = run(tool, "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert done.returncode == 0 and f"SUCCESS: {len(alert_rules())} rules found" in done.stdout, done.stdout


def test_every_alert_fires_when_it_should_and_not_otherwise() -> None:
    tool = promtool()
    cases = yaml.safe_load((HERE / "alerts_test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in cases for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {rule["alert"] for rule in alert_rules()}  # each alert has a case where it fires
    done = run(tool, "test", "rules", "alerts_test.yml", cwd=HERE)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_promtool_rule_tests_can_fail(tmp_path: Path) -> None:
    tool = promtool()
    text = (HERE / "alerts_test.yml").read_text().replace("../../deploy/prometheus/", str(PROMETHEUS) + "/")
    (tmp_path / "t.yml").write_text(text.replace("model: tiny-shapes", "model: sd15", 1))
    assert run(tool, "test", "rules", "t.yml", cwd=tmp_path).returncode != 0


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, written as a recording rule (a dashboard has no checker of its own)."""
    tool = promtool()
    rules = [{"record": f"dashboard:query_{i}", "expr": as_promql(e)} for i, (_, e) in enumerate(dashboard_queries())]
    (tmp_path / "q.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run(tool, "check", "rules", str(tmp_path / "q.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    rules[0]["expr"] = "sum by (route (rate(ldm_http_requests_total[5m]))"  # and a broken one is refused
    (tmp_path / "q.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert run(tool, "check", "rules", str(tmp_path / "q.yml")).returncode != 0


# ------------------------------------------------------------------------------------------------ our own checks

def test_alert_rules_are_complete() -> None:
    """Each rule is named, has a severity routing can use and a summary; the set covers the issue's alerts."""
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES and rule["annotations"]["summary"], rule["alert"]
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
    used = set().union(*(metric_names(rule["expr"]) for rule in rules))
    assert {"ldm_queue_oldest_job_age_seconds", "ldm_workers", "ldm_http_requests_total",
            "ldm_worker_heartbeats_total"} <= used  # oldest job, no worker, error ratio, worker restarts


def test_oldest_job_alert_fires_well_before_jobs_expire() -> None:
    rule = next(r for r in alert_rules() if r["alert"] == "LdmQueueOldestJobTooOld")
    threshold = float(rule["expr"].rsplit(">", 1)[1])
    assert threshold < settings_from({}).job_deadline_s / 2  # unstarted jobs fail at the deadline


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_use_only_metrics_and_labels_the_service_defines(source: str) -> None:
    queries = dashboard_queries() if source == "dashboard" else [(r["alert"], r["expr"]) for r in alert_rules()]
    specs = series_specs()
    for title, expr in queries:
        names = metric_names(expr)
        assert names and names <= set(specs), (title, names - set(specs))
        known = set().union(*(specs[n].labels for n in names)) | TARGET_LABELS | {"le"}
        for metric, labels in matcher_labels(expr).items():
            allowed = set(specs[metric].labels) | TARGET_LABELS | ({"le"} if metric.endswith("_bucket") else set())
            assert labels <= allowed, (title, metric, labels - allowed)
        assert grouping_labels(expr) <= known, (title, grouping_labels(expr) - known)


def test_dashboard_shows_what_the_issue_asks() -> None:
    board = dashboard()
    panels = [p for p in board["panels"] if p["type"] != "row"]
    used = {title: set().union(*(metric_names(t["expr"]) for t in p["targets"])) for p in panels
            for title in [p["title"]]}
    everything = set().union(*used.values())
    for needed in ("ldm_http_requests_total", "ldm_http_request_duration_seconds_bucket", "ldm_queue_depth",
                   "ldm_queue_oldest_job_age_seconds", "ldm_job_wait_seconds_bucket", "ldm_job_run_seconds_bucket",
                   "ldm_batch_size_bucket", "ldm_sampler_step_seconds_bucket", "ldm_images_generated_total",
                   "ldm_worker_busy_ratio", "ldm_accelerator_memory_bytes"):
        assert needed in everything, needed
    latency = next(p for p in panels if "ldm_http_request_duration_seconds_bucket" in used[p["title"]])
    quantiles = {re.match(r"histogram_quantile\(([\d.]+)", t["expr"]).group(1) for t in latency["targets"]}  # type: ignore
    assert quantiles == {"0.5", "0.95", "0.99"}


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "ldm-serve" and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        box = panel["gridPos"]
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]
