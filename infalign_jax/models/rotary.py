"""Rotary position embeddings (Su et al. 2021) in Hugging Face's rotate-half layout, with the
scalings checkpoints use: linear (positions / factor), dynamic NTK (the base grows with the
longest position in the call once it passes `max_len`) and Llama 3.1's frequency bands.

The per-layer inverse frequencies are static numpy data computed from the config (float32, in
the same operation order as `transformers`), stacked over layers so the scanned decoder body
reads its own row; only the dynamic scaling depends on the positions of the call.

Dynamic NTK past `max_len`: a full forward (`models.apply`) equals transformers' full forward
(one base from the longest position of the batch). Transformers recomputes the base as the
sequence grows, so its own cached decoding (`generate`: keys cached under the bases of earlier
steps) and its full forward disagree there; no cached path can equal the full forward. So the
cached and shared-prompt paths (`models.prefill`, `decode_step`, `shared_prompt_hidden`, and the
sampler through `decoder_fns(cfg).max_len`) refuse sequences longer than `max_len` with dynamic
rope; within `max_len` the base is `rope_theta` in every path and they all agree.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax.models.config import ModelConfig

Array = jax.Array


def inv_freq(cfg: ModelConfig, theta: float, rope_type: str) -> np.ndarray:
    """(head_dim / 2,) float32 inverse frequencies for base `theta` and a static scaling."""
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    if rope_type == "linear":
        return (freq / np.float32(cfg.rope_factor)).astype(np.float32)
    if rope_type == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_len
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = np.float32(2 * math.pi) / freq
        scaled = np.where(wavelen > low_wavelen, freq / np.float32(factor), freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return freq   # default; dynamic is applied per call in `apply`


def layer_inv_freqs(cfg: ModelConfig) -> np.ndarray:
    """(n_layers, head_dim / 2): each layer's inverse frequencies (sliding layers use the
    unscaled `rope_local_theta` base when it is set)."""
    rows = []
    for i in range(cfg.n_layers):
        if cfg.rope_local_theta and cfg.layer_is_sliding(i):
            rows.append(inv_freq(cfg, cfg.rope_local_theta, "default"))
        else:
            rows.append(inv_freq(cfg, cfg.rope_theta, cfg.rope_type))
    return np.stack(rows)


def _dynamic(cfg: ModelConfig, positions_BxS: Array) -> Array:
    """Dynamic NTK: base * s^(dim / (dim - 2)) with s = factor * seq_len / max_len - (factor - 1),
    seq_len the longest position in the call + 1 (never below max_len): the inverse frequency
    of pair i is multiplied by s^(-2i / (dim - 2))."""
    dim = cfg.head_dim
    seq_len = jnp.maximum(positions_BxS.max() + 1, cfg.max_len).astype(jnp.float32)
    s = cfg.rope_factor * seq_len / cfg.max_len - (cfg.rope_factor - 1)
    # The same float32 arithmetic as transformers: a new base, then its powers.
    base = jnp.float32(cfg.rope_theta) * s ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base ** exponents)


def apply(x_BxSxHxD: Array, positions_BxS: Array, freq_D2: Array, cfg: ModelConfig) -> Array:
    """Rotates the query or key heads `x` at `positions` with this layer's inverse frequencies."""
    if cfg.rope_type == "dynamic":
        freq_D2 = _dynamic(cfg, positions_BxS)
    freqs = positions_BxS.astype(jnp.float32)[..., None] * freq_D2   # (B, S, D/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x_BxSxHxD.dtype), jnp.sin(emb).astype(x_BxSxHxD.dtype)
    x1, x2 = jnp.split(x_BxSxHxD, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BxSxHxD * cos + rotated * sin
