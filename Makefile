# Set-up and checks. `make run` and `make test` install first; nothing else is needed on a fresh machine.
# TORCH_SPEC picks the PyTorch build: the CPU wheel by default; a GPU user passes e.g.
#   make install TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow lint typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

# Until the service and a trained model land (issues 3 and 4), `make run` generates one image offline
# with the random-weight tiny-sd config and prints where it wrote it.
run: install
	$(VENV)/bin/ldm generate "a red circle on the left" --model random:tiny-sd --steps 20 -o out.png

lint: install
	$(VENV)/bin/ruff check models service tests bench
	$(VENV)/bin/mypy models service

test: install lint
	$(VENV)/bin/pytest -q

test-slow: install
	$(VENV)/bin/pytest -q -m slow

bench: install
	$(PY) bench/model_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
