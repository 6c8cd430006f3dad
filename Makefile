# Two commands do all the set-up themselves on a machine with only Python 3.10+:
#   make demo   train a diversified ViT on the embedded MNIST digits (offline) and save a plain checkpoint
#   make test   run the whole test suite
# Dev/CI pin torch==2.14.1 torchvision==0.29.1; the package itself accepts a loose range.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 examples/run_diverse.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check diverse_vit_hf examples tests benchmarks
	$(PY) tests/fetch_hf_model_tests.py $(VENV)/hf-model-tests  # transformers' ModelTesterMixin, for test_hf_common.py
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIVERSE_VIT_HF_MODEL_TESTS=$(VENV)/hf-model-tests $(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check diverse_vit_hf examples tests benchmarks
	$(VENV)/bin/ruff format --check diverse_vit_hf examples tests benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
