# Set-up and checks. `make run` and `make test` install first; nothing else is needed on a fresh machine.
# TORCH_SPEC picks the PyTorch build: the CPU wheel by default; a GPU user passes e.g.
#   make install TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install stubs run test test-slow lint bench clean

install: $(STAMP)

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
	$(VENV)/bin/ruff check models service tests bench
	$(VENV)/bin/mypy models service

test: stubs lint
	$(VENV)/bin/pytest -q

test-slow: install
	$(VENV)/bin/pytest -q -m slow

bench: install
	$(PY) bench/model_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache service/api/_proto build
