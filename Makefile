# Two commands do all the set-up themselves on a machine with only Python 3.10+:
#   make demo   train a diversified ViT on the embedded MNIST digits (offline) and save a plain checkpoint
#   make test   run the whole test suite, then the core tests again on the lowest transformers we claim (test-floor)
# Dev/CI pin torch==2.14.1 torchvision==0.29.1; the package itself accepts a loose range.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The lowest transformers release the package claims: read from setup.cfg's `transformers>=X` bound, so the two
# never disagree. test-floor runs the library's own tests (not transformers' ModelTesterMixin suite) on it.
TRANSFORMERS_FLOOR := $(shell sed -n 's/^[[:space:]]*transformers>=\([0-9][0-9.]*\).*/\1/p' setup.cfg)
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_STAMP := $(FLOOR_VENV)/.installed-transformers-$(TRANSFORMERS_FLOOR)
FLOOR_TESTS := tests/test_packaging.py tests/test_modeling.py tests/test_trainer.py tests/test_reliability.py \
	tests/test_data.py tests/test_families.py tests/test_exact_resume.py tests/test_preemption.py \
	tests/test_checkpoint_integrity.py tests/test_output_folder.py

.PHONY: demo test test-floor lint install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

$(FLOOR_STAMP): setup.cfg pyproject.toml
	@test -n "$(TRANSFORMERS_FLOOR)" || { echo "setup.cfg has no 'transformers>=X' bound in install_requires" >&2; exit 1; }
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install --quiet --upgrade pip
	$(FLOOR_PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(FLOOR_PY) -m pip install --quiet -e ".[dev]" transformers==$(TRANSFORMERS_FLOOR)
	rm -f $(FLOOR_VENV)/.installed-transformers-*
	touch $(FLOOR_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 examples/run_diverse.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check diverse_vit_hf examples tests benchmarks
	$(PY) tests/fetch_hf_model_tests.py $(VENV)/hf-model-tests  # transformers' ModelTesterMixin, for test_hf_common.py
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIVERSE_VIT_HF_MODEL_TESTS=$(VENV)/hf-model-tests $(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-floor

test-floor: $(FLOOR_STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIVERSE_VIT_HF_TRANSFORMERS_FLOOR=$(TRANSFORMERS_FLOOR) \
		$(FLOOR_PY) -m pytest -q -m "not slow" $(FLOOR_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check diverse_vit_hf examples tests benchmarks
	$(VENV)/bin/ruff format --check diverse_vit_hf examples tests benchmarks

clean:
	rm -rf $(VENV) $(FLOOR_VENV) outputs .pytest_cache
