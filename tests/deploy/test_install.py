"""The image's install path, run here: the files the Dockerfile COPYs (as .dockerignore lets them through)
installed with the Dockerfile's own `pip install .` into a fresh venv, then `ldm serve` started from that venv
(embedded Redis, the API and a worker on the shipped tiny-shapes model, the image's settings). Then:
every metric the Grafana dashboard and the alert rules name is scraped from the running API or worker,
and the image's HEALTHCHECK script answers for both kinds of container.

Offline: the fresh venv sees this venv's packages (torch and the other dependencies) through a .pth file
and builds without an isolated build environment; the project itself is built and installed from scratch.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import sysconfig
import types
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from service.embedded import free_port
from service.metrics import AcceleratorMemoryCollector
from tests.deploy.promql import metric_names
from tests.deploy.service_truth import exported_series
from tests.deploy.sources import DASHBOARD, PROMETHEUS, ROOT, dockerfile_stages, dockerignore_excludes, stage
from tests.e2e.test_serve import children, wait_ready

pytestmark = pytest.mark.timeout(240)
#: metrics only a process with CUDA exports (checked below with a stand-in for torch.cuda)
CUDA_ONLY = {"ldm_accelerator_memory_bytes"}


@dataclass
class Served:
    venv: Path
    proc: subprocess.Popen[str]
    env: dict[str, str]
    base: str
    worker_metrics: str


def build_context(dest: Path) -> None:
    """What `docker build .` sends and the build stage copies: COPY sources minus .dockerignore's exclusions."""
    for source in (s for st in dockerfile_stages() if st.name == "build" for srcs, _, _ in st.copies() for s in srcs):
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if not dockerignore_excludes(relative):
                (dest / relative).parent.mkdir(parents=True, exist_ok=True)
                (dest / relative).write_bytes(file.read_bytes())


def dockerfile_install_command() -> list[str]:
    """The build stage's `python -m pip install ... .` of the project, with the flags that keep it offline here
    (the step before it, `--requirement requirements.lock`, is what this venv's packages stand in for)."""
    runs = [shlex.split(i.args.split("&&")[0]) for i in stage("build").all("RUN")]
    words = next(w for w in runs if w[:4] == ["python", "-m", "pip", "install"] and w[-1] == ".")
    assert words[-1] == ".", words
    return [*words[:4], "--no-index", "--no-build-isolation", *words[4:]]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("install")
    context, venv = tmp / "context", tmp / "venv"
    build_context(context)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = Path(subprocess.run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_ldm_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    cmd = dockerfile_install_command()
    done = subprocess.run([str(venv / "bin" / cmd[0]), *cmd[1:]], cwd=context, capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rest, grpc_port, metrics = free_port(), free_port(), free_port()
    image_env = {k: v for k, v in stage("runtime").env().items() if k.startswith("LDM_")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    env.update(image_env)  # the container's settings, then what this machine needs instead
    env.update(LDM_REST_HOST="127.0.0.1", LDM_GRPC_HOST="127.0.0.1", LDM_WORKER_METRICS_HOST="127.0.0.1",
               LDM_REST_PORT=str(rest), LDM_GRPC_PORT=str(grpc_port), LDM_WORKER_METRICS_PORT=str(metrics),
               LDM_DATA_DIR=str(tmp / "data"), LDM_WORKER_TORCH_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([str(venv / "bin/ldm"), "serve"], env=env, cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        yield Served(venv, proc, env, f"http://127.0.0.1:{rest}", f"http://127.0.0.1:{metrics}/metrics")
    finally:
        if proc.poll() is None:
            descendants = children(proc.pid)
            proc.kill()
            for pid in descendants:
                os.kill(pid, signal.SIGKILL)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def test_the_fresh_install_holds_the_package_the_stubs_and_the_shipped_model(served: Served) -> None:
    code = ("import models, service, service.api._proto.ldm.v1.ldm_pb2 as pb; from models.checkpoints import ZOO_DIR; "
            "print(service.__file__, pb.__file__, (ZOO_DIR / 'tiny-shapes' / 'model.safetensors').is_file())")
    out = subprocess.run([served.venv / "bin/python", "-c", code], capture_output=True, text=True, check=True,
                         cwd=served.venv).stdout.split()
    assert all(Path(p).is_relative_to(served.venv) for p in out[:2]), out  # not this checkout, not editable
    assert out[2] == "True"


def test_ldm_serve_from_the_fresh_install_answers(served: Served) -> None:
    ready = wait_ready(served.base)
    assert ready["model"] == "tiny-shapes" and ready["workers"] == 1
    r = httpx.post(f"{served.base}/v1/txt2img", json={"prompt": "a red circle on the left", "seed": 1, "steps": 2},
                   timeout=60)
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"


def test_every_metric_of_the_dashboard_and_the_alerts_is_exported(served: Served) -> None:
    wait_ready(served.base)
    exported = exported_series(scrape(f"{served.base}/metrics")) | exported_series(scrape(served.worker_metrics))
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    exprs += [rule["expr"] for g in groups for rule in g["rules"]]
    named = set().union(*(metric_names(e) for e in exprs))
    assert len(named) >= 20
    missing = named - exported
    if torch.cuda.is_available():
        assert not missing
    else:
        assert missing == CUDA_ONLY, f"named in the dashboard or alerts, exported by no process: {missing - CUDA_ONLY}"


def test_the_cuda_only_metric_is_what_the_worker_exports_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for torch.cuda with one device: the collector's series are the dashboard's GPU memory ones."""
    cuda = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 1, memory_allocated=lambda i: 1 << 20,
        memory_reserved=lambda i: 2 << 20, max_memory_allocated=lambda i: 3 << 20,
        get_device_properties=lambda i: types.SimpleNamespace(total_memory=80 << 30))
    monkeypatch.setattr(torch, "cuda", cuda)
    (family,) = list(AcceleratorMemoryCollector().collect())
    assert {s.name for s in family.samples} == CUDA_ONLY
    assert {s.labels["kind"] for s in family.samples} >= {"allocated", "reserved", "total"}


def test_the_images_healthcheck_answers_for_api_and_worker_containers(served: Served) -> None:
    wait_ready(served.base)
    script = ROOT / "deploy/docker/healthcheck.py"

    def check(**env: str) -> int:
        return subprocess.run([served.venv / "bin/python", script], env={**served.env, **env}, capture_output=True,
                              timeout=60, check=False).returncode

    assert check() == 0  # `ldm serve` / `ldm api`: /healthz on the REST port
    assert check(LDM_REST_PORT=str(free_port())) == 0  # `ldm worker`: no REST, its /metrics
    assert check(LDM_REST_PORT=str(free_port()), LDM_WORKER_METRICS_PORT=str(free_port())) == 1


def test_sigterm_stops_everything_cleanly(served: Served) -> None:
    """What `docker stop` sends: the worker finishes, Redis stops, exit 0, nothing left behind."""
    wait_ready(served.base)
    descendants = children(served.proc.pid)
    assert descendants
    served.proc.send_signal(signal.SIGTERM)
    out, _ = served.proc.communicate(timeout=120)
    assert served.proc.returncode == 0, out[-3000:]
    assert not [p for p in descendants if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except OSError:
        return "zombie"
