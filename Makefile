# spec_torch — `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install test demo align-demo bench lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install spec_torch (editable, dev extras)

test: $(STAMP)  ## run the test suite (CPU; gpu/browser tests skip where absent)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

demo: $(STAMP)  ## run the main job offline on the built-in synthetic dataset
	HF_HUB_OFFLINE=1 $(PY) scripts/compare.py experiment=demo

align-demo: $(STAMP)  ## fine-tune a tiny student toward a teacher offline; prints held-out SPEC-diff before/after
	HF_HUB_OFFLINE=1 $(PY) scripts/align.py experiment=align_tiny

bench: $(STAMP)  ## print the benchmarks (ratios measured side by side in one run)
	$(PY) bench/bench_core.py
	$(PY) bench/bench_loss.py
	$(PY) bench/bench_cache.py
	$(PY) bench/faults.py
	$(PY) bench/bench_uncertainty.py
	$(PY) bench/uncertainty_cases.py
	$(PY) bench/bench_nystrom.py
	$(PY) bench/bench_matrix.py
	$(PY) bench/bench_rff_error.py
	$(PY) bench/bench_permutation.py
	$(PY) bench/hard_case.py
	$(PY) bench/bench_keywords.py

lint: $(STAMP)  ## ruff check and format check
	$(PY) -m ruff check spec_torch scripts tests bench
	$(PY) -m ruff format --check spec_torch scripts tests bench

format: $(STAMP)  ## ruff format in place
	$(PY) -m ruff format spec_torch scripts tests bench
	$(PY) -m ruff check --fix spec_torch scripts tests bench

clean:  ## remove run outputs and tool caches (keeps .venv and the feature cache .cache/spec_torch)
	rm -rf outputs multirun .pytest_cache .ruff_cache build *.egg-info
	@echo "kept .venv and the feature cache .cache/spec_torch (\$$SPEC_TORCH_CACHE if set): rm -rf .cache/spec_torch to drop it"
