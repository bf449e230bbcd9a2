"""Model configuration: one frozen dataclass for both decoder families, validated on creation."""

from __future__ import annotations

import dataclasses
from infalign_jax.infra import validate as check

FAMILIES = ("llama", "gpt2")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
HEADS = ("lm", "reward", "value")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer.

    family "llama": RMSNorm, rotary positions (rotate-half, as Hugging Face), grouped-query
      attention, gated MLP. Llama / SmolLM, Qwen2 (`qkv_bias`) and Gemma v1 (`embed_scale`,
      `rmsnorm_unit_offset`, `activation="gelu_tanh"`) are switches of it.
    family "gpt2": learned positions, LayerNorm with bias, GELU MLP, biases everywhere.
    remat: rematerialisation of each decoder layer in the backward pass: "none" (keep every
      activation), "full" (keep only the layer inputs; recompute the rest) or "save_dots" (keep
      the outputs of the weight matmuls, recompute the rest).
    heads: which outputs exist over the shared trunk: "lm" (policy logits), "reward" (a scalar
      read at the last real token), "value" (a scalar at every position: value head / prefix
      scorer for controlled decoding).
    """

    family: str = "llama"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 16
    d_ff: int = 128
    max_len: int = 512
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    activation: str = "silu"
    qkv_bias: bool = False
    embed_scale: bool = False
    rmsnorm_unit_offset: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    heads: tuple[str, ...] = ("lm",)
    init_std: float = 0.02
    remat: str = "none"

    def __post_init__(self):
        def fail(field, expected):
            check.fail(self, field, expected)

        check.choice(self, "family", FAMILIES)
        check.ints(self, ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                          "d_ff", "max_len"))
        if self.n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"a divisor of n_heads={self.n_heads}")
        if self.family == "llama" and self.head_dim % 2:
            fail("head_dim", "even for rotary embeddings")
        check.numbers(self, ("norm_eps", "rope_theta"), strict=True)
        check.choice(self, "activation", ACTIVATIONS)
        check.choice(self, "dtype", DTYPES)
        check.choice(self, "param_dtype", DTYPES)
        check.choice(self, "remat", REMAT)
        heads = tuple(self.heads)
        object.__setattr__(self, "heads", heads)
        if not heads or any(h not in HEADS for h in heads) or len(set(heads)) != len(heads):
            fail("heads", f"a non-empty tuple of distinct names from {HEADS}")
        if self.family == "gpt2" and self.n_kv_heads != self.n_heads:
            fail("n_kv_heads", "equal to n_heads (GPT-2 has no grouped-query attention)")

    @property
    def n_params(self) -> int:
        """Number of parameters (trunk and lm head), for FLOP and memory estimates."""
        d, f, v = self.d_model, self.d_ff, self.vocab_size
        attn = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = (3 if self.family == "llama" else 2) * d * f
        per_layer = attn + mlp
        total = v * d + self.n_layers * per_layer + (0 if self.tie_embeddings else v * d)
        if self.family == "gpt2":
            total += self.max_len * d
        return total
