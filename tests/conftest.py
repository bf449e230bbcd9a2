"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

from xla_env import DEVICE_COUNT

_FLAG = f"{DEVICE_COUNT}=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The persistent compilation cache roughly halves compile time across runs (jax is imported
# here, after XLA_FLAGS).
from infalign_jax.infra.cli import enable_compilation_cache  # noqa: E402

enable_compilation_cache(os.environ.get("INFALIGN_JAX_CACHE",
                                        os.path.join(os.path.dirname(__file__), "..", ".jax_cache")),
                         min_compile_s=0.5)

# `dirs`: the tiny policy / reward-model / prompt files of the workflow tests (module scope).
from workflow_files import dirs  # noqa: E402, F401
