# Set-up and checks. `make run` and `make test` install first; nothing else is needed on a fresh machine.
# TORCH_SPEC picks the PyTorch build: the CPU wheel by default; a GPU user passes e.g.
#   make install TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install promtool chromium stubs run test test-slow lint audit lock bench clean

install: $(STAMP) promtool chromium

# promtool (Debian's `prometheus` package) checks deploy/prometheus and the dashboard's queries in tests/deploy.
# Installed as root where apt-get works; elsewhere those checks skip and say why. Cheap when already there.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        prometheus >/dev/null; } || echo "note: apt-get could not install prometheus (promtool)"; \
	  else echo "note: promtool not installed (Debian package prometheus, needs root and apt-get)"; fi; }

# Chromium and its WebDriver (Debian's `chromium`, `chromium-driver`) run the playground's browser tests
# (tests/integration/test_playground.py). Installed as root where apt-get works; elsewhere those tests skip and
# say why. Cheap when already there.
chromium:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        chromium chromium-driver >/dev/null; } || echo "note: apt-get could not install chromium"; \
	  else echo "note: chromium not installed (Debian packages chromium, chromium-driver; need root and apt-get)"; fi; }

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[test]'
	$(PY) -m service.api.proto_build --force   # gRPC stubs from proto/ with the venv's own grpcio-tools
	touch $(STAMP)

# Regenerates the gRPC stubs when proto/ changed (cheap otherwise).
stubs: install
	$(PY) -m service.api.proto_build

# One box: embedded Redis, REST on 127.0.0.1:8000, gRPC on 127.0.0.1:50051, one worker (see README).
run: stubs
	$(VENV)/bin/ldm serve

lint: stubs
	$(VENV)/bin/ruff check models service tests bench deploy
	$(VENV)/bin/mypy models service

test: stubs lint
	$(VENV)/bin/pytest -q

# Known vulnerabilities (PyPI's advisory database; needs the package index, nothing else): the installed environment
# (the project itself, an editable install, is skipped; so is a local torch build such as 2.13.0+cpu, which PyPI
# does not know: the output says so) and the image's requirements.lock, strictly (a package that could not be
# checked fails the audit: offline, it fails instead of passing unchecked).
audit: install
	$(VENV)/bin/pip-audit --skip-editable --progress-spinner off
	$(VENV)/bin/pip-audit --requirement requirements.lock --no-deps --disable-pip --strict --progress-spinner off

# requirements.lock: the image's exact runtime packages, resolved by pip for the image's Python with the torch pin
# (deploy/lock.py); commit it, then `make audit`.
lock: install
	$(PY) deploy/lock.py "$(firstword $(TORCH_SPEC))" > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock

test-slow: install
	$(VENV)/bin/pytest -q -m slow

bench: install
	$(PY) bench/model_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache service/api/_proto build
