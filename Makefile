# Two commands do all the set-up themselves on a machine with only Python 3.10+:
#   make demo   train a diversified ViT on the embedded MNIST digits (offline) and save a plain checkpoint
#   make test   run the whole test suite (slow tests included), then the core tests again on the lowest transformers we
#               claim (test-floor); `make test-fast` runs the suite without the slow tests
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
FLOOR_TESTS := tests/test_packaging.py tests/models/test_modeling.py tests/models/test_families.py \
	tests/data/test_image_datasets.py tests/data/test_transforms.py tests/data/test_sample_seeding.py \
	tests/trainer/test_trainer.py tests/trainer/test_objective.py tests/trainer/test_training_args.py \
	tests/trainer/test_nonfinite_guard.py tests/trainer/test_checkpointing.py tests/trainer/test_checkpoint_integrity.py \
	tests/trainer/test_exact_resume.py tests/trainer/test_preemption.py tests/trainer/test_output_folder.py \
	tests/scripts/test_arguments.py tests/scripts/test_splits.py::test_missing_image_folder_is_reported \
	tests/hub/test_model_card.py::test_model_card_has_no_token_and_no_local_path tests/models/test_timm_wrapper.py

.PHONY: demo test test-fast test-floor lint install clean

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
	$(PY) tests/fixtures/fetch_hf_model_tests.py $(VENV)/hf-model-tests  # ModelTesterMixin, for tests/models/test_hf_common.py
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIVERSE_VIT_HF_MODEL_TESTS=$(VENV)/hf-model-tests \
		$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-floor

# The inner loop: the suite without the slow end-to-end runs (what a plain `pytest` runs), no floor run.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIVERSE_VIT_HF_MODEL_TESTS=$(VENV)/hf-model-tests \
		$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-floor: $(FLOOR_STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIVERSE_VIT_HF_TRANSFORMERS_FLOOR=$(TRANSFORMERS_FLOOR) \
		$(FLOOR_PY) -m pytest -q -m "not slow" $(FLOOR_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check diverse_vit_hf examples tests benchmarks
	$(VENV)/bin/ruff format --check diverse_vit_hf examples tests benchmarks

clean:
	rm -rf $(VENV) $(FLOOR_VENV) outputs .pytest_cache
