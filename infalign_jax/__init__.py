"""infalign-jax: inference-aware alignment of language models in JAX.

The data path is one straight line:
prompts -> samples -> rewards -> calibration -> transform -> RL step -> evaluation.
"""

__version__ = "0.1.0"
