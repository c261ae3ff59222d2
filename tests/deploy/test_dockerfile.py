"""The Dockerfile against what the service really is: its commands, its ports and settings (from the
settings class), its health endpoints, and the install path docs/deploy.md gives."""

from __future__ import annotations

import re
import tomllib

from tests.deploy.service_truth import ENV_NAMES, parse_ldm, rest_paths, settings_from, subcommands
from tests.deploy.sources import DOCKERFILE, ROOT, dockerfile_stages, dockerignore_excludes, stage

#: variables of the image that are not service settings, each with its reason
OTHER_ENV = {"PATH": "the venv first", "PYTHONUNBUFFERED": "logs reach `docker logs` at once",
             "HOME": "a writable home for the non-root user", "PIP_DISABLE_PIP_VERSION_CHECK": "build stage only"}


def test_multi_stage_cuda_by_default_cpu_by_build_arg() -> None:
    stages = {s.name: s for s in dockerfile_stages()}
    assert {"os-cuda", "os-cpu", "os", "build", "runtime"} <= set(stages)
    assert list(stages)[-1] == "runtime"  # `docker build` without --target gives the runtime image
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cuda$", text, re.MULTILINE)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+$", text, re.MULTILINE)
    assert stages["os"].base == "os-${VARIANT}" and stages["runtime"].base == "os" and stages["build"].base == "os"
    # the runtime takes only the built venv from the build stage: no compilers, sources or pip caches
    assert [c for c in stages["runtime"].copies() if c[2]] == [(["/opt/venv"], "/opt/venv", True)]
    build_runs = " ".join(i.args for i in stages["build"].all("RUN"))
    assert "${TORCH_SPEC}" in build_runs and "whl/${flavour}" in build_runs and "echo cpu || echo cu128" in build_runs


def test_torch_pin_matches_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.MULTILINE)
    assert pin and f'ARG TORCH_SPEC="{pin.group(1)}"' in DOCKERFILE.read_text()


def test_install_is_the_readmes_pip_install_of_the_project() -> None:
    runs = [i.args for i in stage("build").all("RUN")]
    assert any(re.match(r"python -m pip install --no-cache-dir \. ", r) for r in runs), runs
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "python -m pip install ." in deploy and "TORCH_SPEC" in deploy


def test_non_root_user_entrypoint_and_default_command() -> None:
    runtime = stage("runtime")
    user = runtime.all("USER")[-1].args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0)  # numeric: runAsNonRoot can check it
    assert runtime.all("ENTRYPOINT")[-1].exec_form() == ["ldm"]
    cmd = runtime.all("CMD")[-1].exec_form()
    assert cmd is not None and cmd[0] in subcommands() and parse_ldm(cmd) == ""
    assert {"serve", "api", "worker"} <= subcommands()


def test_env_names_are_settings_and_ports_are_exposed() -> None:
    env = stage("runtime").env()
    unknown = {k for k in env if k not in ENV_NAMES and k not in OTHER_ENV}
    assert not unknown, f"not settings of service/config.py: {unknown}"
    assert {k for k in stage("build").env() if k not in OTHER_ENV} == set()
    settings = settings_from(env)  # validates the values too (a port out of range would raise)
    assert stage("runtime").exposed() == {settings.rest_port, settings.grpc_port, settings.worker_metrics_port}
    assert settings.worker_metrics_port != 0, "a container's worker needs a fixed metrics port to be scraped"
    assert settings.rest_host == settings.grpc_host == settings.worker_metrics_host == "0.0.0.0"


def test_healthcheck_runs_our_script_against_real_endpoints() -> None:
    runtime = stage("runtime")
    check = runtime.all("HEALTHCHECK")[-1]
    form = check.exec_form()
    assert form is not None and form[0] == "python" and form[1].endswith("healthcheck.py")
    copied = {dest: sources for sources, dest, _ in runtime.copies()}
    assert copied[form[1]] == ["deploy/docker/healthcheck.py"] and (ROOT / "deploy/docker/healthcheck.py").is_file()
    source = (ROOT / "deploy/docker/healthcheck.py").read_text()
    assert "/healthz" in source and "/healthz" in rest_paths()
    start = re.search(r"--start-period=(\d+)s", check.args)
    assert start and int(start.group(1)) >= 60  # a model load comes before a worker's first answer


def test_labels_volumes_and_version() -> None:
    runtime = stage("runtime")
    labels = " ".join(i.args for i in runtime.all("LABEL"))
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"ARG VERSION={version}" in DOCKERFILE.read_text()
    volumes = " ".join(i.args for i in runtime.all("VOLUME"))
    assert '"/models"' in volumes and '"/var/lib/ldm"' in volumes
    assert settings_from(runtime.env()).data_dir.is_relative_to("/var/lib/ldm")  # embedded Redis on the volume


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    for _stage in dockerfile_stages():
        for sources, _, from_stage in _stage.copies():
            for source in [] if from_stage else sources:
                assert not dockerignore_excludes(source), f"COPY {source} but .dockerignore leaves it out"
    for left_out in (".venv/bin/python", "runs/x", "scratch/issue-5.md", ".git/HEAD", "tests/helpers.py",
                     "service/__pycache__/cli.cpython-311.pyc", ".mypy_cache/x", "service/api/_proto/ldm/v1/x.py",
                     "ldm_serve.egg-info/PKG-INFO", "bench/results/x.json"):
        assert dockerignore_excludes(left_out), left_out
    assert not dockerignore_excludes("models/zoo/tiny-shapes/model.safetensors")  # the shipped model
