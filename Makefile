# Two commands do all set-up on a fresh clone:
#   make demo   - runs the embedded tiny demo (CPU, no downloads beyond packages)
#   make test   - runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= out/demo

.PHONY: venv demo test test-comfyui bench clean artefacts reproduce

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

# The ComfyUI tier: tests/test_comfyui_*.py with ComfyUI's own Python (it needs a torch
# with torchvision/torchaudio). COMFYUI_PATH: a ComfyUI checkout; COMFYUI_PYTHON: its Python.
COMFYUI_PYTHON ?= python3
test-comfyui:
	@test -d "$(COMFYUI_PATH)/comfy" || { echo "set COMFYUI_PATH to a ComfyUI checkout (the folder with main.py)"; exit 2; }
	$(COMFYUI_PYTHON) -m pip install -q -r requirements.txt pytest
	PYTHONPATH=$(CURDIR) COMFYUI_PATH=$(COMFYUI_PATH) $(COMFYUI_PYTHON) -m pytest -q tests/test_comfyui_*.py

# The small-scale reproduction (experiments/README.md): rebuild the small domain's artefacts
# (~20-30 CPU minutes), then compare Meta-LoRA, LoRA and LoRA + augmentation (~30-40 CPU minutes).
artefacts: venv
	OMP_NUM_THREADS=1 $(PY) experiments/build_artefacts.py --out experiments/artefacts

reproduce: venv
	OMP_NUM_THREADS=1 $(PY) experiments/reproduce.py --out experiments/results

bench: venv
	$(PY) bench/stage2_overhead.py

clean:
	rm -rf $(VENV) out .pytest_cache
