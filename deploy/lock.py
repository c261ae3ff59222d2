"""`make lock`: requirements.lock, the exact versions the image installs (Dockerfile, build stage).

The project's runtime dependencies (pyproject.toml) and the Makefile's torch pin are resolved by pip for the
image's Python (Ubuntu 24.04: 3.12, manylinux wheels only) against the package index pip is configured with;
nothing is installed. PyTorch itself and the CUDA/Triton wheels it brings are left out: the image installs the
build TORCH_SPEC names (CPU or CUDA) from PyTorch's own index first, and the lock pins everything else, so a
rebuild gets the same packages until `make lock` is run again (and `make audit` checks them).

    python deploy/lock.py torch==2.13.0 > requirements.lock
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSION = "3.12"  # the image's python3 (Dockerfile: Ubuntu 24.04)
#: installed with TORCH_SPEC's build, whose CUDA flavour decides them: never pinned here
FROM_TORCH_BUILD = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(requirements: list[str]) -> list[tuple[str, str]]:
    """(name, version) of everything pip would install for `requirements` on the image's Python."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-",
         "--only-binary=:all:", "--python-version", PYTHON_VERSION, *requirements],
        capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"pip could not resolve the dependencies:\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout)
    return sorted((canonical(i["metadata"]["name"]), i["metadata"]["version"]) for i in report["install"])


def main(argv: list[str]) -> int:
    torch_pin = argv[0] if argv else "torch"
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = [torch_pin if canonical(re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0]) == "torch" else d
                    for d in dependencies]
    pins = [(name, version) for name, version in resolve(requirements) if not FROM_TORCH_BUILD.match(name)]
    print("# requirements.lock: the image's exact runtime packages; regenerate with `make lock` (deploy/lock.py).")
    print(f"# Resolved for Python {PYTHON_VERSION} with {torch_pin}; torch, triton, nvidia-* and cuda-* come from "
          "TORCH_SPEC's build.")
    for name, version in pins:
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
