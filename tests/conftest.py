"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

from xla_env import DEVICE_COUNT

_FLAG = f"{DEVICE_COUNT}=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The persistent compilation cache roughly halves compile time across runs (jax is imported
# here, after XLA_FLAGS). Set in the environment, so that the commands the tests start share it
# (they wrote to the user's ~/.cache/infalign_jax, whose state then decided their compile times).
from infalign_jax.infra.cli import CACHE_ENV, enable_compilation_cache  # noqa: E402

os.environ.setdefault(CACHE_ENV, os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".jax_cache")))
enable_compilation_cache(os.environ[CACHE_ENV], min_compile_s=0.5)

# `dirs`: the tiny policy / reward-model / prompt files of the workflow tests (module scope).
from workflow_files import dirs  # noqa: E402, F401

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Every compiled XLA:CPU program keeps memory mappings while JAX caches it: a test worker
    that kept every program of the suite passed 35,000 mappings and, near the kernel's 65,530
    (vm.max_map_count), crashed inside a compile (SIGSEGV / SIGABRT). The caches are dropped
    after each module (the persistent compilation cache on disk stays)."""
    yield
    jax.clear_caches()
    gc.collect()
