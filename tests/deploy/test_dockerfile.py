"""The Dockerfile against what the service really is: its commands, its ports and settings (from the
settings class), its health endpoints, and the install path docs/deploy.md gives."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.service_truth import ENV_NAMES, parse_ldm, rest_paths, settings_from, subcommands
from tests.deploy.sources import DOCKERFILE, ROOT, dockerfile_stages, dockerignore_excludes, stage

#: variables of the image that are not service settings, each with its reason
OTHER_ENV = {"PATH": "the venv first", "PYTHONUNBUFFERED": "logs reach `docker logs` at once",
             "HOME": "a writable home for the non-root user", "PIP_DISABLE_PIP_VERSION_CHECK": "build stage only",
             "TORCHINDUCTOR_CACHE_DIR": "LDM_WORKER_GPU_MODE=compile's kernels, in the /var/lib/ldm volume"}


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
    assert any(re.match(r"python -m pip install --no-cache-dir --no-deps \. ", r) for r in runs), runs
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
    # compiled kernels (LDM_WORKER_GPU_MODE=compile) outlive a restart: on the volume, writable by the ldm user
    assert Path(runtime.env()["TORCHINDUCTOR_CACHE_DIR"]).is_relative_to("/var/lib/ldm")


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


# ------------------------------------------------------------------------------------------------ dependencies

#: the floor each dependency must keep, and why (docs/security.md "Dependencies")
CVE_FLOORS = {
    "torch": ("2.6", "CVE-2025-32434: torch.load(weights_only=True) could run code"),
    "pillow": ("10.3", "CVE-2023-4863 (bundled libwebp), CVE-2024-28219"),
    "python-multipart": ("0.0.18", "CVE-2024-24762, CVE-2024-53981"),
    "starlette": ("0.49.1", "CVE-2024-47874, CVE-2025-54121, CVE-2025-62727"),
    "fastapi": ("0.115", "CVE-2024-24762 (through python-multipart) and a Starlette past the above"),
    "h11": ("0.16", "CVE-2025-43859"),
    "grpcio": ("1.65.4", "CVE-2023-33953, CVE-2024-7246"),
    "protobuf": ("5.29.5", "CVE-2024-7254, CVE-2025-4565"),
}


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}


def lock() -> dict[str, str]:
    lines = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if not line.startswith("#")]
    pins = dict(line.split("==") for line in lines)
    assert all(canonicalize_name(name) == name for name in pins) and len(pins) == len(lines)
    return pins


def test_floors_are_past_the_known_vulnerabilities() -> None:
    required = requirements()
    for name, (floor, why) in CVE_FLOORS.items():
        assert name in required, name
        release = Version(floor).release
        below = ".".join(map(str, (*release[:-1], release[-1] - 1)))  # the release just before the fix
        assert required[name].specifier.contains(floor), f"{name} refuses its own floor {floor}"
        assert not required[name].specifier.contains(below), f"{name} still allows {below}: {why}"


def test_the_image_installs_the_lock_then_the_project_without_resolving_again() -> None:
    runs = [i.args for i in stage("build").all("RUN")]
    install_lock = next(i for i, r in enumerate(runs) if "--requirement requirements.lock" in r)
    install_project = next(i for i, r in enumerate(runs) if "--no-deps ." in r)
    torch = next(i for i, r in enumerate(runs) if "${TORCH_SPEC}" in r)
    assert torch < install_lock < install_project and "pip check" in runs[install_project]
    assert (["requirements.lock"], "./", False) in stage("build").copies()
    assert not dockerignore_excludes("requirements.lock")


def test_the_lock_pins_every_runtime_dependency_within_its_floor_and_leaves_torch_to_its_build() -> None:
    pins = lock()
    assert not [name for name in pins if re.match(r"^(torch|triton|nvidia-.*|cuda-.*)$", name)]
    for name, requirement in requirements().items():
        if name == "torch":
            continue
        assert name in pins, f"{name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(requirement))


def test_make_audit_and_make_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    audit = makefile[makefile.index("\naudit:"):].split("\n\n")[0]
    assert "pip-audit --skip-editable" in audit and "pip-audit --requirement requirements.lock" in audit
    assert "--strict" in audit.split("--requirement requirements.lock")[1]  # unchecked is not passed
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(canonicalize_name(Requirement(r).name) == "pip-audit" for r in test_extra)
    target = makefile[makefile.index("\nlock:"):].split("\n\n")[0]
    assert "deploy/lock.py" in target and "> requirements.lock.tmp" in target and "$(firstword $(TORCH_SPEC))" in target
