# Two commands do all set-up on a fresh clone:
#   make demo   - runs the embedded tiny demo (CPU, no downloads beyond packages)
#   make test   - runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= out/demo

.PHONY: venv demo test bench clean

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/metalora demo --out $(DEMO_OUT)

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/stage2_overhead.py

clean:
	rm -rf $(VENV) out .pytest_cache
