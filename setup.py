"""infalign-jax: inference-aware alignment (InfAlign / CTRL) in JAX."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6.0",
    "flax>=0.10.4",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "chex>=0.1.88",
    "ml-collections>=1.0.0",
    "transformers>=4.46.0",
    "tokenizers>=0.20.0",
    "safetensors>=0.4.5",
    "numpy>=1.26",
    "scipy>=1.11",         # t quantiles of the comparison's intervals
    "absl-py>=2.1.0",
    "gguf>=0.10.0",        # GGUF checkpoint import (llama.cpp files)
    "sentencepiece>=0.2.0",  # some GGUF/HF tokenizers need it
    "matplotlib>=3.8",     # plots written by experiments and the analytic tool
    "grain>=0.2.10",       # deterministic, checkpointable data loading
    "vaderSentiment>=3.3.2",  # offline sentiment judge for the real tasks and the demo
    "alt-profanity-check>=1.9.1",  # offline offensiveness judge (pins its scikit-learn)
    "tensorboard>=2.16",   # event files for metrics (its own writer; no TensorFlow)
]

EXTRAS_REQUIRE = {
    # Parity tests compare against Hugging Face's PyTorch models; torch 2.13.0
    # is the CPU wheel available offline on the project's machines.
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "torch==2.13.0"],
    # TFDS builder / array_record data sources (no TensorFlow needed for
    # tfds.data_source; add tensorflow yourself for as_dataset).
    "tfds": ["tensorflow-datasets>=4.9.7", "array-record>=0.5.1"],
    # Ahead-of-time compilation for TPU topologies on a machine without a TPU
    # (experiments/compile_check.py, `make test-tpu`). Install it in its own virtualenv
    # (`make venv-tpu`): with libtpu present JAX probes for a TPU at every start-up. 0.0.52 is
    # the release checked to compile with jax 0.10.2 (jax's own `[tpu]` extra names an older
    # one).
    "tpu-aot": ["libtpu==0.0.52"],
}

setup(
    name="infalign-jax",
    version="0.1.0",
    description="Inference-aware alignment of language models (calibrate-and-transform RL) in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["infalign_jax", "infalign_jax.*"]),
    package_data={"infalign_jax": ["rl/tasks/prompts/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
