"""Autoregressive sampling with a KV cache: one prefill per prompt, N continuations.

The sampler is written against three pure functions of a decoder (`DecoderFns`), so the same code
samples from the Flax transformer (`infalign_jax.models.decoder_fns`) and from tiny tabular
policies used in exact-enumeration tests:

  prefill(params, tokens_BxP, mask_BxP, max_len) -> (logits_BxV at the last prompt token, cache)
  decode(params, token_B, cache)                 -> (logits_BxV for the next token, cache)
  logits(params, tokens_BxT, mask_BxT)           -> logits_BxTxV (teacher forcing, no cache)

plus, optionally, `max_len`: the longest prompt + response the decoder supports (the model's
context, e.g. `ModelConfig.max_len`); `sample` refuses longer requests.

Every leaf of `cache` has the batch as its leading axis, which is what lets the prompt be
prefilled once and its cache repeated to the N continuations (B -> B*N rows) instead of running N
prefills.

Conventions (the classic RLHF bugs this avoids):
* Prompts are left-padded (`mask_BxP` marks real tokens); responses are right-padded.
* The EOS token itself is a valid response token (rewards are read there); every token after it
  has mask 0, log-prob 0 and is `pad_id`.
* `logp` is the log-probability of the sampled token under the *policy itself* (log-softmax of
  the raw logits in float32), whatever temperature / top-k / top-p shaped the sampling
  distribution: it is the quantity the trainer recomputes by teacher forcing, and the two must
  agree (`sequence_logprobs`).

Bad input fails while tracing, on static shapes and dtypes, so jitted callers pay nothing: wrong
ranks, shapes or dtypes, a prompt plus `max_new_tokens` longer than the decoder's `max_len`,
`eos_id` / `pad_id` outside the vocabulary (read from the logits' shape). A prompt row with no
real token is data-dependent: eager calls raise; under `jit` (no host sync) such a row gets an
empty response (mask all False, `pad_id` tokens, log-prob 0).

Speed (decode is per-step overhead bound on CPU, and at a real vocabulary a sort or B x V random
numbers per step cost more than the model's step): the sampling head lives in `sampling_head`.
`filter_logits` (temperature, top-k, top-p) finds its thresholds by exact searches over float32
bit patterns, on a few thousand candidate tokens whenever that suffices, instead of sorting the
vocabulary; ties at a top-k / top-p boundary are all kept. Every temperature > 0 draws by a
blocked inverse CDF (`sampling_head.draw`: one 64-bit random number per row, exp and block sums
over the vocabulary, a cumulative sum inside the chosen block), so the tokens follow
softmax(filtered logits) as `jax.random.categorical`'s do, but are not the same bits. Top-p
alone is drawn by rejection (`sampling_head.draw_filtered`: draw from the tempered softmax, keep
the token if it is in the nucleus, one pass over the row, else draw again), so no threshold is
searched. Measured at batch 32 x vocabulary 49152 on a 2-core CPU: top-k 50 ~3 ms, the draw
~1.5-2 ms, a top-p 0.9 draw 2.3-3.6 ms more than that for flat and peaked rows alike
(filtering by the threshold search, then drawing: 5-6 ms more for peaked rows, ~22 ms for flat
ones); the sort-based filters and the Gumbel draw took ~400, ~550 and ~12 ms. Greedy
(temperature 0) is `_first_argmax`, a max plus a first-index min. The log-prob of the drawn
token is read as `x_t - max - log sum exp`, the same arithmetic as gathering from `log_softmax`
without writing the B x V result.

A decoder with `decode_window` (the Flax transformer) decodes in phases whose attention reads a
doubling window of the response cache (`decode_windows`: the first 16, 32, then 63 slots for 64
tokens), one `while_loop` each, so a step reads at most twice the slots written instead of all
`max_new_tokens`; the cache is allocated once at full length (no copies, the same peak memory).
Each phase compiles one more decode step. SmolLM2 on a 2-core CPU, batch 32: 1.22-1.23x faster at
256 new tokens (two runs of 3 rounds, 1.14-1.33x by round), no resolved difference at 64
(`bench/decode_windows.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax.core import kl, vocab_chunks
from infalign_jax.core.types import Array, DecoderFns, Params
from infalign_jax.decoding.sampling_head import _first_argmax, draw, draw_filtered
from infalign_jax.infra import validate as check


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. `top_k=0` and `top_p=1` switch those filters off; `temperature=0` is greedy."""

    n: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int | None = None
    pad_id: int = 0

    def __post_init__(self):
        check.ints(self, ("n", "max_new_tokens"))
        check.numbers(self, ("temperature",))          # 0 is greedy
        check.ints(self, ("top_k", "pad_id"), low=0)   # top_k 0 is off
        check.numbers(self, ("top_p",), strict=True, high=1.0)  # 1 is off
        check.ints(self, ("eos_id",), low=0, optional=True)


class Samples(NamedTuple):
    tokens_BxNxL: Array  # int32, pad_id after EOS
    mask_BxNxL: Array    # bool, True up to and including EOS
    logp_BxNxL: Array    # float32 policy log-probs of the sampled tokens, 0 where masked


def _repeat_batch(tree: Any, n: int) -> Any:
    if n == 1:
        return tree
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


def _token_logprob(logits_BxV: Array, token_B: Array) -> Array:
    """log_softmax(logits)[token], computed like `jax.nn.log_softmax` without the B x V output;
    NaN for a token outside [0, V) (`vocab_chunks.nan_outside_vocab`)."""
    top = jax.lax.stop_gradient(jnp.max(logits_BxV, axis=-1, keepdims=True))
    shifted = logits_BxV - top
    vocab = logits_BxV.shape[-1]
    picked = jnp.take_along_axis(shifted, jnp.clip(token_B, 0, vocab - 1)[:, None], axis=1)[:, 0]
    return vocab_chunks.nan_outside_vocab(
        picked - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1)), token_B, vocab)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_inputs(fns: DecoderFns, prompt_BxP: Any, prompt_mask_BxP: Any, cfg: Any,
                 what: str = "sample") -> None:
    """Trace-time checks on static shapes and dtypes (plus a host check when not traced), for
    `sample` and the decoders that share its inputs (`what` names the caller)."""
    if not isinstance(fns, DecoderFns):
        raise ValueError(f"{what}: fns must be a DecoderFns, got {type(fns).__name__}")
    if not isinstance(cfg, SamplingConfig):
        raise ValueError(f"{what}: cfg must be a SamplingConfig, got {type(cfg).__name__}")
    shape, mask_shape = np.shape(prompt_BxP), np.shape(prompt_mask_BxP)
    if len(shape) != 2:
        raise ValueError(f"{what}: prompt_BxP must have rank 2 (batch, prompt_len), got shape "
                         f"{shape}")
    if mask_shape != shape:
        raise ValueError(f"{what}: prompt_mask_BxP must have the prompt's shape {shape}, got "
                         f"{mask_shape}")
    if 0 in shape:
        raise ValueError(f"{what}: prompt_BxP must have at least one row and one column, got "
                         f"shape {shape}")
    dtype = jnp.result_type(prompt_BxP)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{what}: prompt_BxP must hold integer token ids, got dtype {dtype}")
    mask_dtype = jnp.result_type(prompt_mask_BxP)
    if not (mask_dtype == jnp.bool_ or jnp.issubdtype(mask_dtype, jnp.integer)):
        raise ValueError(f"{what}: prompt_mask_BxP must be bool (or 0/1 integers), got dtype "
                         f"{mask_dtype}")
    total = shape[1] + cfg.max_new_tokens
    if fns.max_len is not None and total > fns.max_len:
        raise ValueError(
            f"{what}: prompt length {shape[1]} (prompt_BxP.shape[1]) + max_new_tokens "
            f"{cfg.max_new_tokens} = {total} exceeds the decoder's max_len {fns.max_len}; "
            "shorten the prompt padding or max_new_tokens")
    if _is_concrete(prompt_mask_BxP):
        empty = np.flatnonzero(~np.asarray(prompt_mask_BxP).astype(bool).any(axis=1))
        if empty.size:
            raise ValueError(f"{what}: prompt_mask_BxP rows {empty[:10].tolist()} have no real "
                             "token (all padding); every prompt needs at least one")
    check_padding(what, prompt_mask_BxP)


def check_padding(what: str, prompt_mask_BxP: Any, response_mask_RxL: Any = None) -> None:
    """Host check (concrete masks only; a traced one passes): prompts left-padded (a row's real
    tokens end at its last column, where the decoders read the prompt's end) and responses
    right-padded (real tokens from column 0 on, as the samplers produce them)."""
    def rows_with(first, then, mask):   # rows where a `first` token is followed by a `then` one
        m = np.asarray(mask).astype(bool)
        return np.flatnonzero(np.any((m[:, :-1] == first) & (m[:, 1:] == then), axis=1))

    if _is_concrete(prompt_mask_BxP):
        bad = rows_with(True, False, prompt_mask_BxP)   # padding after a real token
        if bad.size:
            raise ValueError(f"{what}: prompt_mask_BxP rows {bad[:10].tolist()} are not "
                             f"left-padded (padding after a real token): the decoder reads each "
                             f"prompt's last column as its end; pad on the left")
    if response_mask_RxL is not None and _is_concrete(response_mask_RxL):
        bad = rows_with(False, True, response_mask_RxL)   # a real token after padding
        if bad.size:
            raise ValueError(f"{what}: response mask rows {bad[:10].tolist()} are not a run of "
                             f"real tokens from the first column (right padding only)")


def check_vocab(cfg: SamplingConfig, vocab: int, prompt_BxP: Any = None,
                prompt_mask_BxP: Any = None, what: str = "sample") -> None:
    """The prompt's real ids and `cfg.eos_id` in [0, vocab). `cfg.pad_id` may lie past the
    vocabulary (a tokenizer's added pad token): it is only ever written at masked positions,
    which no decoder reads as a token."""
    if prompt_BxP is not None and _is_concrete(prompt_BxP) and _is_concrete(prompt_mask_BxP):
        # A tokenizer of another model gives ids the embedding gather would silently clamp.
        ids = np.asarray(prompt_BxP)[np.asarray(prompt_mask_BxP).astype(bool)]
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise ValueError(f"{what}: prompt_BxP holds token ids outside the decoder's vocabulary "
                             f"[0, {vocab}): {np.unique(bad)[:10].tolist()} (a tokenizer of "
                             f"another model?)")
    if cfg.eos_id is not None and cfg.eos_id >= vocab:
        raise ValueError(f"{what}: SamplingConfig.eos_id must be a token id in [0, {vocab}) (the "
                         f"decoder's vocabulary), got {cfg.eos_id}")


FIRST_WINDOW = 16


def _fed(token_R: Array, valid_R: Array) -> Array:
    """The token a finished row feeds back: 0, not its pad id (which may lie past the
    vocabulary); what the row then decodes is never kept."""
    return jnp.where(valid_R, token_R, 0)


def decode_windows(steps: int, first: int = FIRST_WINDOW) -> list[int]:
    """The attention windows (response slots read) of the decoding phases for `steps` tokens:
    `first` slots, doubled while short of the `steps - 1` that decoding writes (the last sampled
    token is never fed back), the last capped there. [16, 32, 63] for 64 tokens; one window for
    a short response."""
    need = max(steps - 1, 1)
    sizes = [min(first, need)]
    while sizes[-1] < need:
        sizes.append(min(2 * sizes[-1], need))
    return sizes


def sample(fns: DecoderFns, params: Params, prompt_BxP: Array, prompt_mask_BxP: Array,
           rng: Array, cfg: SamplingConfig) -> Samples:
    """Samples `cfg.n` responses per prompt; the prompt is prefilled once (not n times), and a
    decoder with `fns.expand` keeps its KV once for the n continuations. Decoding stops as soon
    as every row has emitted EOS (the remaining positions are padding, as they would be anyway).

    Pure and jittable (close over `fns` and `cfg`, which are static). Raises ValueError on bad
    input (see the module docstring) while tracing.
    """
    check_inputs(fns, prompt_BxP, prompt_mask_BxP, cfg)
    batch, prompt_len = np.shape(prompt_BxP)
    n, steps = cfg.n, cfg.max_new_tokens
    # Attention windows over the response cache, one decoding phase each; without
    # `fns.decode_window` a single phase over the whole cache.
    windowed = fns.decode_window is not None
    phases = decode_windows(steps, FIRST_WINDOW) if windowed else [steps]
    logits_BxV, cache = fns.prefill(params, prompt_BxP, prompt_mask_BxP, prompt_len + steps)
    chex.assert_rank(logits_BxV, 2)
    check_vocab(cfg, logits_BxV.shape[-1], prompt_BxP, prompt_mask_BxP)
    logits = _repeat_batch(logits_BxV, n)                  # (B*N, V), row b*N + j
    cache = _repeat_batch(cache, n) if fns.expand is None else fns.expand(cache, n)
    eos = -1 if cfg.eos_id is None else cfg.eos_id
    filtered = cfg.temperature > 0 and (cfg.temperature != 1 or cfg.top_k or cfg.top_p < 1)

    def pick(logits, key, done):
        """Token t of every row from its logits; pad (mask 0, log-prob 0) once the row is done."""
        logits = logits.astype(jnp.float32)
        if cfg.temperature == 0:
            token = _first_argmax(logits)
        elif filtered:
            token = draw_filtered(key, logits, cfg.temperature, cfg.top_k, cfg.top_p)
        else:
            token = draw(key, logits)
        logp = _token_logprob(logits, token)
        valid = ~done
        token = jnp.where(valid, token, cfg.pad_id).astype(jnp.int32)
        return token, valid, jnp.where(valid, logp, 0.0), done | (token == eos)

    keys = jax.random.split(rng, steps)
    # A row without any real prompt token (only detectable on device under jit) is born done.
    no_prompt_B = ~jnp.any(jnp.asarray(prompt_mask_BxP).astype(bool), axis=1)
    rows = batch * n
    token, valid, logp, done = pick(logits, keys[0], _repeat_batch(no_prompt_B, n))
    tokens_LxR = jnp.full((steps, rows), cfg.pad_id, jnp.int32).at[0].set(token)
    valid_LxR = jnp.zeros((steps, rows), bool).at[0].set(valid)
    logp_LxR = jnp.zeros((steps, rows), jnp.float32).at[0].set(logp)

    def body(carry, window):
        t, fed, done, cache, tokens_LxR, valid_LxR, logp_LxR = carry
        if windowed:
            logits, cache = fns.decode_window(params, fed, cache, window)
        else:
            logits, cache = fns.decode(params, fed, cache)
        token, valid, logp, done = pick(logits, keys[t], done)
        return (t + 1, _fed(token, valid), done, cache, tokens_LxR.at[t].set(token),
                valid_LxR.at[t].set(valid), logp_LxR.at[t].set(logp))

    carry = (jnp.int32(1), _fed(token, valid), done, cache, tokens_LxR, valid_LxR, logp_LxR)
    for window in phases:
        def more(carry, end=min(window + 1, steps)):
            # Step t writes response slot t - 1, so a window of w slots serves steps up to w.
            # Early exit: stop once every row has emitted EOS (the rest stays padding); later
            # phases then run no step.
            t, done = carry[0], carry[2]
            return (t < end) & ~jnp.all(done)

        carry = jax.lax.while_loop(more, functools.partial(body, window=window), carry)
    *_, tokens_LxR, valid_LxR, logp_LxR = carry

    def out(x_LxR):
        return jnp.moveaxis(x_LxR, 0, 1).reshape(batch, n, steps)

    return Samples(out(tokens_LxR), out(valid_LxR), out(logp_LxR))


def concat_prompt_response(prompt_BxP: Array, prompt_mask_BxP: Array, response_BxL: Array,
                           response_mask_BxL: Array) -> tuple[Array, Array]:
    """[left-padded prompt | right-padded response] and its attention mask."""
    tokens = jnp.concatenate([prompt_BxP, response_BxL.astype(prompt_BxP.dtype)], axis=1)
    mask = jnp.concatenate([prompt_mask_BxP.astype(bool), response_mask_BxL.astype(bool)], axis=1)
    return tokens, mask


def response_positions(x_BxTx: Array, prompt_len: int) -> Array:
    """The positions whose outputs predict the response tokens: position t predicts token t+1,
    so response token j (at P + j) is predicted at P - 1 + j; returns x[:, P-1:-1] (BxLx...)."""
    return x_BxTx[:, prompt_len - 1:-1]


def response_logits(fns: DecoderFns, params: Params, prompt_BxP: Array, prompt_mask_BxP: Array,
                    response_BxL: Array, response_mask_BxL: Array) -> Array:
    """float32 logits predicting each response token (teacher forcing): BxLxV."""
    tokens, mask = concat_prompt_response(prompt_BxP, prompt_mask_BxP, response_BxL,
                                          response_mask_BxL)
    logits_BxTxV = fns.logits(params, tokens, mask).astype(jnp.float32)
    return response_positions(logits_BxTxV, prompt_BxP.shape[1])


def sequence_logprobs(fns: DecoderFns, params: Params, prompt_BxP: Array, prompt_mask_BxP: Array,
                      response_BxL: Array, response_mask_BxL: Array) -> Array:
    """Teacher-forced float32 log-probs of each response token (0 where masked; NaN for an id
    outside [0, V) at an unmasked position, on both paths): logp_BxL.

    With a linear head (`fns.hidden` and `fns.lm_kernel`) the logits exist only at the response
    positions and one vocabulary chunk at a time (`core.vocab_chunks`, forward and backward);
    otherwise from `fns.logits`."""
    chex.assert_rank([prompt_BxP, response_BxL], 2)
    _check_response_mask("sequence_logprobs", response_BxL, response_mask_BxL)
    check_padding("sequence_logprobs", prompt_mask_BxP, response_mask_BxL)
    targets_BxL = response_BxL.astype(jnp.int32)
    if fns.hidden is not None and fns.lm_kernel is not None:
        hidden_BxLxD = response_hidden(fns, params, prompt_BxP, prompt_mask_BxP, response_BxL,
                                       response_mask_BxL)
        logp = vocab_chunks.token_logprobs(hidden_BxLxD, fns.lm_kernel(params), targets_BxL)
    else:
        pred = response_logits(fns, params, prompt_BxP, prompt_mask_BxP, response_BxL,
                               response_mask_BxL)
        logp = vocab_chunks.token_logprobs_from_logits(pred, targets_BxL)
    return jnp.where(response_mask_BxL.astype(bool), logp, 0.0)


def shared_sequence_logprobs(fns: DecoderFns, params: Params, prompt_BxP: Array,
                             prompt_mask_BxP: Array, response_RxL: Array,
                             response_mask_RxL: Array) -> Array:
    """`sequence_logprobs` of R = B*N responses (rows b*N + j continue prompt b) with each prompt
    run once (`fns.shared_hidden`, a linear head): logp_RxL, 0 where masked."""
    if fns.shared_hidden is None or fns.lm_kernel is None:
        raise ValueError("shared_sequence_logprobs needs a decoder with a linear lm head "
                         "(DecoderFns.shared_hidden and lm_kernel)")
    _check_response_mask("shared_sequence_logprobs", response_RxL, response_mask_RxL)
    check_padding("shared_sequence_logprobs", prompt_mask_BxP, response_mask_RxL)
    targets_RxL = response_RxL.astype(jnp.int32)
    hidden = fns.shared_hidden(params, prompt_BxP, prompt_mask_BxP,
                               _fed(targets_RxL, response_mask_RxL.astype(bool)))
    logp = vocab_chunks.token_logprobs(hidden, fns.lm_kernel(params), targets_RxL)
    return jnp.where(response_mask_RxL.astype(bool), logp, 0.0)


def _check_response_mask(what: str, response_RxL: Any, response_mask_RxL: Any) -> None:
    if np.shape(response_mask_RxL) != np.shape(response_RxL):
        raise ValueError(f"{what}: the response mask must have the responses' shape "
                         f"{np.shape(response_RxL)}, got {np.shape(response_mask_RxL)}")


def response_hidden(fns: DecoderFns, params: Params, prompt_BxP: Array, prompt_mask_BxP: Array,
                    response_BxL: Array, response_mask_BxL: Array) -> Array:
    """Hidden states at the positions predicting each response token (teacher forcing), for a
    decoder with a linear head (`fns.hidden`): BxLxD."""
    tokens, mask = concat_prompt_response(prompt_BxP, prompt_mask_BxP, response_BxL,
                                          response_mask_BxL)
    return response_positions(fns.hidden(params, tokens, mask), prompt_BxP.shape[1])


def flatten_samples(prompt_BxP: Array, prompt_mask_BxP: Array, samples: Samples
                    ) -> tuple[Array, Array, Array, Array]:
    """Repeats the prompts to match the B*N flattened samples, for scoring and training."""
    batch, n, length = samples.tokens_BxNxL.shape
    return (jnp.repeat(prompt_BxP, n, axis=0), jnp.repeat(prompt_mask_BxP, n, axis=0),
            samples.tokens_BxNxL.reshape(batch * n, length),
            samples.mask_BxNxL.reshape(batch * n, length))


def response_kl_entropy(fns: DecoderFns, params: Params, ref_fns: DecoderFns, ref_params: Params,
                        prompt_BxP: Array, prompt_mask_BxP: Array, response_BxL: Array,
                        response_mask_BxL: Array) -> tuple[Array, Array]:
    """Exact per-position KL(pi(.|prefix) || pi_ref(.|prefix)) and entropy of pi along the given
    responses, summed over the whole vocabulary (0 where masked): (kl_BxL, entropy_BxL).

    With linear heads on both decoders, over vocabulary chunks from the response positions'
    hidden states (`core.vocab_chunks`); otherwise from the full response logits."""
    args = (prompt_BxP, prompt_mask_BxP, response_BxL, response_mask_BxL)
    mask_BxL = response_mask_BxL.astype(bool)
    if all(f.hidden is not None and f.lm_kernel is not None for f in (fns, ref_fns)):
        kl_BxL, ent_BxL = vocab_chunks.kl_and_entropy(
            response_hidden(fns, params, *args), fns.lm_kernel(params),
            response_hidden(ref_fns, ref_params, *args), ref_fns.lm_kernel(ref_params))
        return jnp.where(mask_BxL, kl_BxL, 0.0), jnp.where(mask_BxL, ent_BxL, 0.0)
    logits = response_logits(fns, params, *args)
    ref_logits = response_logits(ref_fns, ref_params, *args)
    return kl.kl_from_logits(logits, ref_logits, mask_BxL), kl.entropy_from_logits(logits, mask_BxL)


class PathTerms(NamedTuple):
    """Per-position terms along given responses (0 where masked), rows b*N + j."""
    kl_RxL: Array           # KL(pi(.|prefix) || pi_ref(.|prefix)) over the whole vocabulary
    entropy_RxL: Array      # H(pi(.|prefix))
    ref_logp_RxL: Array     # log pi_ref(token | prefix)


def shared_prompt_path_terms(fns: DecoderFns, params: Params, ref_fns: DecoderFns,
                             ref_params: Params, prompt_BxP: Array, prompt_mask_BxP: Array,
                             samples: Samples) -> PathTerms:
    """`response_kl_entropy` (and pi_ref's log-probs) of N responses per prompt, teacher-forced
    through the KV cache: each model prefills each prompt once and decodes the N responses over
    the shared prompt KV (as `sample` does), instead of a forward pass over prompt and response
    for every one of the N rows -- the prompt's cost is paid once, not N times. Decoders with
    `shared_hidden` and a linear head run the responses as one chunk over the prompt's KV and
    compute the terms over vocabulary chunks; others go token by token through `decode`."""
    batch, n, length = samples.tokens_BxNxL.shape
    mask_RxL = samples.mask_BxNxL.reshape(batch * n, length).astype(bool)
    # padding read as token 0: a pad id past the vocabulary would put NaN in the responses' keys
    tokens_RxL = _fed(samples.tokens_BxNxL.reshape(batch * n, length).astype(jnp.int32),
                      mask_RxL)
    if all(f.shared_hidden is not None and f.lm_kernel is not None for f in (fns, ref_fns)):
        hidden = fns.shared_hidden(params, prompt_BxP, prompt_mask_BxP, tokens_RxL)
        ref_hidden = ref_fns.shared_hidden(ref_params, prompt_BxP, prompt_mask_BxP, tokens_RxL)
        ref_kernel = ref_fns.lm_kernel(ref_params)
        kl_RxL, ent_RxL = vocab_chunks.kl_and_entropy(hidden, fns.lm_kernel(params), ref_hidden,
                                                      ref_kernel)
        ref_logp = vocab_chunks.token_logprobs(ref_hidden, ref_kernel, tokens_RxL)
        return PathTerms(*(jnp.where(mask_RxL, x, 0.0) for x in (kl_RxL, ent_RxL, ref_logp)))
    max_len = prompt_BxP.shape[1] + length
    tokens_LxR, mask_LxR = jnp.moveaxis(tokens_RxL, 0, 1), jnp.moveaxis(mask_RxL, 0, 1)

    def start(f: DecoderFns, p: Params) -> tuple[Array, Any]:
        logits_BxV, cache = f.prefill(p, prompt_BxP, prompt_mask_BxP, max_len)
        return _repeat_batch(logits_BxV, n), (
            _repeat_batch(cache, n) if f.expand is None else f.expand(cache, n))

    def terms(logits_RxV: Array, ref_logits_RxV: Array, token_R: Array, valid_R: Array):
        lg, ref = logits_RxV.astype(jnp.float32)[:, None], ref_logits_RxV[:, None]
        ref_logp = _token_logprob(ref_logits_RxV.astype(jnp.float32), token_R)
        return (kl.kl_from_logits(lg, ref, valid_R[:, None])[:, 0],
                kl.entropy_from_logits(lg, valid_R[:, None])[:, 0],
                jnp.where(valid_R, ref_logp, 0.0))

    def body(carry, x):
        logits, cache, ref_logits, ref_cache = carry
        token_R, valid_R = x
        out = terms(logits, ref_logits, token_R, valid_R)
        logits, cache = fns.decode(params, token_R, cache)
        ref_logits, ref_cache = ref_fns.decode(ref_params, token_R, ref_cache)
        return (logits, cache, ref_logits, ref_cache), out

    carry = (*start(fns, params), *start(ref_fns, ref_params))
    carry, per_step = jax.lax.scan(body, carry, (tokens_LxR[:-1], mask_LxR[:-1]))
    last = terms(carry[0], carry[2], tokens_LxR[-1], mask_LxR[-1])   # needs no decode
    return PathTerms(*(jnp.moveaxis(jnp.concatenate([a, b[None]]), 0, 1)
                       for a, b in zip(per_step, last)))
