"""Model configuration: one frozen dataclass for both decoder families, validated on creation."""

from __future__ import annotations

import dataclasses
from infalign_jax.infra import validate as check

FAMILIES = ("llama", "gpt2")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
LAYER_TYPES = ("full", "sliding")
HEADS = ("lm", "reward", "value")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "save_dots")
REWARD_POOLS = ("last", "mean")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer.

    family "llama": RMSNorm, rotary positions (rotate-half, as Hugging Face), grouped-query
      attention, gated MLP. Llama / SmolLM, Mistral, Qwen2/3, Gemma 1/2/3 are switches of it:
      `qkv_bias`, `o_bias`, `mlp_bias` (projection biases); `qk_norm` (RMSNorm of each head's
      query and key before the rotation, Qwen3 / Gemma 3); `embed_scale` and
      `rmsnorm_unit_offset` (Gemma); `post_norms` (Gemma 2/3: a norm after attention and after
      the MLP as well as before); `attn_softcap` / `final_softcap` (cap * tanh(x / cap) of the
      attention scores / final logits, 0 = off); `query_pre_attn_scalar` (scores scaled by its
      inverse square root instead of head_dim's, 0 = head_dim).
      Rotary scaling: `rope_type` default | linear (positions / rope_factor) | dynamic (NTK:
      the base grows with the longest position in the call past `max_len`; only `apply` goes
      past it, the cached and shared-prompt paths refuse to, `rotary`) | llama3 (Llama 3.1
      frequency bands, `rope_low_freq_factor`, `rope_high_freq_factor`,
      `rope_original_max_len`). `rope_local_theta` > 0: sliding layers use an unscaled rotation
      of that base (Gemma 3).
      Sliding-window attention: `sliding_window` > 0 lets a token see the `sliding_window` most
      recent tokens (itself included) in the layers that `layer_types` marks "sliding" (every
      layer when `layer_types` is empty).
    family "gpt2": learned positions, LayerNorm with bias, GELU MLP, biases everywhere;
      `attn_scale_weights=False` drops the 1/sqrt(head_dim) score scale and
      `attn_scale_inverse_layer` divides layer i's scores by i + 1.
    remat: rematerialisation of each decoder layer in the backward pass: "none" (keep every
      activation), "full" (keep only the layer inputs; recompute the rest) or "save_dots" (keep
      the outputs of the weight matmuls, recompute the rest).
    heads: which outputs exist over the shared trunk: "lm" (policy logits), "reward" (a scalar
      per sequence, read where `reward_pool` says), "value" (a scalar at every position: value
      head / prefix scorer for controlled decoding).
    reward_pool: where the reward head reads a sequence: "last" (the final hidden state of its
      last real token, as transformers' sequence classifiers do) or "mean" (the mean of the
      final hidden states over its real tokens; the head is linear, so this is the mean of the
      per-token head outputs).
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
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    query_pre_attn_scalar: float = 0.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 0
    rope_local_theta: float = 0.0
    sliding_window: int = 0
    layer_types: tuple[str, ...] = ()
    attn_scale_weights: bool = True
    attn_scale_inverse_layer: bool = False
    reward_pool: str = "last"

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
        if not (check.is_number(self.init_std) and self.init_std >= 0):
            fail("init_std", "a finite number >= 0")
        check.choice(self, "activation", ACTIVATIONS)
        check.choice(self, "dtype", DTYPES)
        check.choice(self, "param_dtype", DTYPES)
        check.choice(self, "remat", REMAT)
        check.choice(self, "reward_pool", REWARD_POOLS)
        heads = tuple(self.heads)
        object.__setattr__(self, "heads", heads)
        if not heads or any(h not in HEADS for h in heads) or len(set(heads)) != len(heads):
            fail("heads", f"a non-empty tuple of distinct names from {HEADS}")
        if self.family == "gpt2" and self.n_kv_heads != self.n_heads:
            fail("n_kv_heads", "equal to n_heads (GPT-2 has no grouped-query attention)")
        check.bools(self, ("o_bias", "mlp_bias", "qk_norm", "post_norms", "attn_scale_weights",
                           "attn_scale_inverse_layer", "tie_embeddings", "qkv_bias",
                           "embed_scale", "rmsnorm_unit_offset"))
        check.numbers(self, ("attn_softcap", "final_softcap", "query_pre_attn_scalar",
                             "rope_local_theta"))
        check.numbers(self, ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"),
                      strict=True)
        check.ints(self, ("rope_original_max_len", "sliding_window"), low=0)
        check.choice(self, "rope_type", ROPE_TYPES)
        # Scaling parameters another rope_type reads would be accepted and change nothing.
        if self.rope_type == "default" and self.rope_factor != 1.0:
            fail("rope_factor", "1.0 with rope_type='default' (set rope_type to scale)")
        if self.rope_type != "llama3":
            for name in ("rope_low_freq_factor", "rope_high_freq_factor",
                         "rope_original_max_len"):
                if getattr(self, name) != ModelConfig.__dataclass_fields__[name].default:
                    fail(name, f"its default with rope_type={self.rope_type!r} (read by "
                               f"rope_type='llama3' only)")
        if self.rope_type == "llama3":
            if self.rope_original_max_len < 1:
                fail("rope_original_max_len", "a positive int for rope_type='llama3'")
            if self.rope_high_freq_factor <= self.rope_low_freq_factor:
                fail("rope_high_freq_factor", f"> rope_low_freq_factor={self.rope_low_freq_factor}")
        if self.rope_type == "dynamic" and self.head_dim < 4:
            fail("head_dim", ">= 4 for rope_type='dynamic'")
        if self.rope_type == "dynamic" and self.rope_local_theta:
            fail("rope_local_theta", "0 with rope_type='dynamic' (one base for every layer)")
        types = tuple(self.layer_types)
        object.__setattr__(self, "layer_types", types)
        if types and (len(types) != self.n_layers or any(t not in LAYER_TYPES for t in types)):
            fail("layer_types", f"empty or {self.n_layers} names from {LAYER_TYPES}")
        if "sliding" in types and self.sliding_window < 1:
            fail("sliding_window", "a positive int when layer_types has 'sliding' layers")
        if self.family == "gpt2":
            llama_only = ("o_bias", "mlp_bias", "qk_norm", "post_norms", "qkv_bias",
                          "embed_scale", "rmsnorm_unit_offset")
            for name in llama_only:
                if getattr(self, name):
                    fail(name, "False for family 'gpt2' (a llama-family switch)")
            if self.rope_type != "default" or self.rope_local_theta:
                fail("rope_type", "'default' for family 'gpt2' (learned positions)")
        elif not self.attn_scale_weights or self.attn_scale_inverse_layer:
            fail("attn_scale_weights", "True, and attn_scale_inverse_layer False, for family "
                 "'llama' (GPT-2 switches)")

    def layer_is_sliding(self, i: int) -> bool:
        """Whether decoder layer i attends over a sliding window."""
        if self.sliding_window < 1:
            return False
        return not self.layer_types or self.layer_types[i] == "sliding"

    @property
    def learned_positions(self) -> bool:
        """Whether positions come from a learned table of `max_len` rows (GPT-2), so that no
        sequence may be longer than `max_len`; rotary positions (llama) have no such limit."""
        return self.family == "gpt2"

    @property
    def n_params(self) -> int:
        """Number of parameters (trunk and lm head), for FLOP and memory estimates."""
        d, f, v = self.d_model, self.d_ff, self.vocab_size
        attn = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = (3 if self.family == "llama" else 2) * d * f
        per_layer = attn + mlp
        total = v * d + self.n_layers * per_layer + (0 if self.tie_embeddings else v * d)
        if self.learned_positions:
            total += self.max_len * d
        return total
