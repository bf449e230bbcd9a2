"""Controlled decoding (CD; Mudgal et al. 2024, arXiv 2310.17022): tokenwise and blockwise.

Both decoders steer a frozen base policy pi_ref with a *prefix scorer* V([x, y^t]) (spec section 2):

* Tokenwise (CD Eq. 6, the optimum of Theorem 2.1 restricted to the top-k tokens of pi_ref):
      z ~ pi_lambda(z | [x, y^t]) ∝ pi_ref(z | [x, y^t]) * exp(lambda * V([x, y^t, z])),  z in topk.
  lambda = 0 is pi_ref restricted (and renormalised) to its top-k; lambda -> inf picks the
  candidate of highest V. The top-k restriction is what makes one scorer call per candidate
  affordable (k scorer calls per token instead of |vocab|).
* Blockwise best-of-K (CD Eq. 7): draw K continuations of M tokens from pi_ref, keep the one whose
  prefix + block scores highest, repeat until EOS or the length budget.

A prefix scorer is any pure function `score(tokens_BxT, mask_BxT)` returning either a value per
position (B, T) -- read at the last real token -- or a value per row (B,). `value_head_scorer`
builds one from a model whose config has the "value" head (CD-FUDGE / CD-Q scorers), and any
hand-written function (a reward model, a token counter in tests) plugs in the same way.

Design: the tokenwise decoder recomputes the full (fixed-size, masked) buffer with teacher forcing
at each step instead of using a KV cache. It costs O(L) forward passes of length P+L, which is fine
for the small scorers this is used with and keeps it one `fori_loop` with static shapes, valid for
any `DecoderFns` (including tabular test policies). The blockwise decoder reuses the KV-cache
sampler (`sampling.sample`, one prefill per prefix, K continuations); its prefix grows by M per
block, so the block loop is a Python loop (unrolled under jit, ceil(L/M) blocks).

KL: tokenwise returns the exact sum over steps of KL(pi_lambda(.|prefix) || pi_ref(.|prefix))
along the sampled path (the Rao-Blackwellised sequence KL, unbiased for KL(pi_lambda || pi_ref));
blockwise returns the best-of-K bound log K - (K - 1) / K per block it accepted (by the chain rule
a bound on the sequence's KL, block by block). CD section 4.4 writes (L_x / M) (log K - (K - 1) / K),
which equals it when every block holds M tokens but is no bound for a shorter last block, a block
cut by EOS or M > L (one block of L tokens then counted as L / M of one).
All functions are pure and jittable (close over `fns`, `scorer` and the static ints); callers jit.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from infalign_jax.decoding import sampling
from infalign_jax.models import apply, pool_sequence
from infalign_jax.models.config import ModelConfig
from infalign_jax.decoding.sampling import SamplingConfig
from infalign_jax.core.kl import bon_kl_bound
from infalign_jax.core.types import DecoderFns
from infalign_jax.infra import validate as check
from infalign_jax.core.selection import best_of_n

Array = jax.Array
Params = Any
PrefixScorer = Callable[[Array, Array], Array]


class TokenwiseOutput(NamedTuple):
    tokens_BxL: Array     # int32 response, pad_id after EOS
    mask_BxL: Array       # bool, True up to and including EOS
    logp_BxL: Array       # float32 log pi_lambda of each sampled token (0 where masked)
    ref_logp_BxL: Array   # float32 log pi_ref of each sampled token (0 where masked)
    kl_B: Array           # exact sum_t KL(pi_lambda(.|prefix_t) || pi_ref(.|prefix_t))
    unscored_B: Array     # int32: steps at which the scorer's values left no distribution over
                          # the candidates (NaN, or lambda * V = +inf, or all -inf)


class BlockwiseOutput(NamedTuple):
    tokens_BxL: Array
    mask_BxL: Array
    ref_logp_BxL: Array   # float32 log pi_ref of each kept token (0 where masked)
    score_B: Array        # scorer value of the final prefix [x, y]
    kl_bound_B: Array     # accepted blocks x (log K - (K - 1) / K); CD section 4.4: L_x / M blocks
    unscored_B: Array     # int32: blocks at which the scorer gave every candidate NaN (the first
                          # candidate, an unguided pi_ref block, was kept)


def value_head_scorer(cfg: ModelConfig, params: Params) -> PrefixScorer:
    """The prefix scorer V_theta of a model with the "value" head (per-position values, B x T)."""
    if "value" not in cfg.heads:
        raise ValueError(f"value_head_scorer needs a ModelConfig with the 'value' head, got "
                         f"heads={cfg.heads}")

    def score(tokens_BxT: Array, mask_BxT: Array) -> Array:
        return apply(params, tokens_BxT, cfg, attention_mask_BxT=mask_BxT).values

    return score


def score_last(scorer: PrefixScorer, tokens_BxT: Array, mask_BxT: Array) -> Array:
    """Scorer value at the last real token of each row: float32 (B,)."""
    values = jnp.asarray(scorer(tokens_BxT, mask_BxT), jnp.float32)
    if values.ndim == 2:
        chex.assert_shape(values, tokens_BxT.shape)
        values = pool_sequence(values, mask_BxT, "last")
    chex.assert_shape(values, tokens_BxT.shape[:1])
    return values


def tokenwise_logits(ref_logits_BxV: Array, values_BxJ: Array, top_idx_BxJ: Array,
                     lam: float | Array) -> Array:
    """Logits over the k candidates of CD Eq. 6: log pi_ref(z) + lambda * V([x, y^t, z]).

    Not normalised; softmax gives pi_lambda restricted to the candidates `top_idx_BxJ`.
    """
    chex.assert_rank([ref_logits_BxV, values_BxJ, top_idx_BxJ], 2)
    chex.assert_equal_shape([values_BxJ, top_idx_BxJ])
    logp_BxV = jax.nn.log_softmax(ref_logits_BxV.astype(jnp.float32), axis=-1)
    lam = jnp.asarray(lam, jnp.float32)
    # lambda = 0 is pi_ref whatever the values, an infinite one included (0 * inf is NaN)
    guided = jnp.where(lam == 0, 0.0, lam * values_BxJ.astype(jnp.float32))
    return jnp.take_along_axis(logp_BxV, top_idx_BxJ, axis=1) + guided


def _check_ints(**kwargs: int) -> None:
    for name, value in kwargs.items():
        check.int_arg(name, value)


def tokenwise_decode(fns: DecoderFns, params: Params, scorer: PrefixScorer, prompt_BxP: Array,
                     prompt_mask_BxP: Array, rng: Array, *, lam: float | Array, top_k: int,
                     max_new_tokens: int, eos_id: int | None = None, pad_id: int = 0
                     ) -> TokenwiseOutput:
    """Tokenwise CD (CD Eq. 6) over the top-k candidates of pi_ref; see the module docstring."""
    _check_ints(top_k=top_k, max_new_tokens=max_new_tokens)
    # the sampler's checks: shapes, left padding, no empty prompt, max_len, ids in the vocabulary
    as_sampler = SamplingConfig(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
    sampling.check_inputs(fns, prompt_BxP, prompt_mask_BxP, as_sampler, "tokenwise_decode")
    batch, plen = prompt_BxP.shape
    eos = -1 if eos_id is None else eos_id
    tokens0 = jnp.concatenate(
        [prompt_BxP.astype(jnp.int32), jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], 1)
    mask0 = jnp.concatenate(
        [prompt_mask_BxP.astype(bool), jnp.zeros((batch, max_new_tokens), bool)], 1)
    vocab = jax.eval_shape(fns.logits, params, tokens0, mask0).shape[-1]
    sampling.check_vocab(as_sampler, vocab, prompt_BxP, prompt_mask_BxP, "tokenwise_decode")

    def step(t, carry):
        tokens, mask, done, logp, ref_logp, kl, unscored, key = carry
        key, sub = jax.random.split(key)
        logits_BxTxV = fns.logits(params, tokens, mask).astype(jnp.float32)
        ref_logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxTxV, plen - 1 + t, 1, False)
        k = min(top_k, ref_logits_BxV.shape[-1])
        _, top_idx_BxJ = jax.lax.top_k(ref_logits_BxV, k)
        # Candidate prefixes [x, y^t, z]: row b*k + j holds candidate j of prompt b.
        cand_tokens = jnp.repeat(tokens, k, axis=0).at[:, plen + t].set(top_idx_BxJ.reshape(-1))
        cand_mask = jnp.repeat(mask, k, axis=0).at[:, plen + t].set(True)
        values_BxJ = score_last(scorer, cand_tokens, cand_mask).reshape(batch, k)
        cd_logits_BxJ = tokenwise_logits(ref_logits_BxV, values_BxJ, top_idx_BxJ, lam)
        log_q_BxJ = jax.nn.log_softmax(cd_logits_BxJ, axis=-1)
        log_p_BxJ = jnp.take_along_axis(jax.nn.log_softmax(ref_logits_BxV, -1), top_idx_BxJ, 1)
        # q = 0 entries (lambda * V underflow) contribute 0, not 0 * -inf.
        q_BxJ = jnp.exp(log_q_BxJ)
        step_kl_B = jnp.sum(jnp.where(q_BxJ > 0, q_BxJ * (log_q_BxJ - log_p_BxJ), 0.0), -1)
        # no distribution over the candidates (counted in unscored_B): no KL either
        step_kl_B = jnp.where(jnp.any(jnp.isnan(log_q_BxJ), -1), jnp.nan, step_kl_B)
        choice_B = jax.random.categorical(sub, cd_logits_BxJ, axis=-1)
        valid = ~done
        token = jnp.where(valid, jnp.take_along_axis(top_idx_BxJ, choice_B[:, None], 1)[:, 0],
                          pad_id).astype(jnp.int32)
        pick = lambda a: jnp.where(valid, jnp.take_along_axis(a, choice_B[:, None], 1)[:, 0], 0.)
        tokens = tokens.at[:, plen + t].set(token)
        mask = mask.at[:, plen + t].set(valid)
        logp = logp.at[:, t].set(pick(log_q_BxJ))
        ref_logp = ref_logp.at[:, t].set(pick(log_p_BxJ))
        kl = kl + jnp.where(valid, step_kl_B, 0.0)
        # Undefined where the candidates' softmax is: a NaN value, a +inf logit or all -inf. A
        # single -inf logit is a candidate with q = 0, still a distribution.
        unscored = unscored + (valid & jnp.any(jnp.isnan(log_q_BxJ), -1))
        done = done | (token == eos)
        return tokens, mask, done, logp, ref_logp, kl, unscored, key

    zeros = jnp.zeros((batch, max_new_tokens), jnp.float32)
    carry = (tokens0, mask0, jnp.zeros((batch,), bool), zeros, zeros,
             jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32), rng)
    tokens, mask, _, logp, ref_logp, kl, unscored, _ = jax.lax.fori_loop(0, max_new_tokens, step,
                                                                         carry)
    return TokenwiseOutput(tokens[:, plen:], mask[:, plen:], logp, ref_logp, kl, unscored)


def blockwise_decode(fns: DecoderFns, params: Params, scorer: PrefixScorer, prompt_BxP: Array,
                     prompt_mask_BxP: Array, rng: Array, *, num_candidates: int, block_size: int,
                     max_new_tokens: int, eos_id: int | None = None, pad_id: int = 0,
                     temperature: float = 1.0) -> BlockwiseOutput:
    """Blockwise best-of-K CD (CD Eq. 7): K blocks of M tokens from pi_ref, keep the best-scored.

    The last block is shorter when M does not divide `max_new_tokens`. Rows that have accepted a
    block containing EOS stop (their later tokens are pad_id with mask False). The blocks are
    pi_ref's own, so `temperature` must be 1 (the KL bound holds for them only).
    """
    if temperature != 1.0:
        raise ValueError(f"blockwise_decode: temperature={temperature}: the K candidate blocks "
                         f"are pi_ref's own samples, so its best-of-K KL bound holds at "
                         f"temperature 1 only")
    chex.assert_rank([prompt_BxP, prompt_mask_BxP], 2)
    chex.assert_equal_shape([prompt_BxP, prompt_mask_BxP])
    _check_ints(num_candidates=num_candidates, block_size=block_size,
                max_new_tokens=max_new_tokens)
    batch = prompt_BxP.shape[0]
    kk = num_candidates
    eos = -1 if eos_id is None else eos_id
    resp = jnp.zeros((batch, 0), jnp.int32)
    resp_mask = jnp.zeros((batch, 0), bool)
    ref_logp = jnp.zeros((batch, 0), jnp.float32)
    done = jnp.zeros((batch,), bool)
    prefix = prompt_BxP.astype(jnp.int32)
    prefix_mask = prompt_mask_BxP.astype(bool)
    score_B = jnp.zeros((batch,), jnp.float32)
    blocks_B = jnp.zeros((batch,), jnp.float32)   # blocks accepted (each a best-of-K choice)
    unscored_B = jnp.zeros((batch,), jnp.int32)
    for start in range(0, max_new_tokens, block_size):
        m = min(block_size, max_new_tokens - start)
        rng, sub = jax.random.split(rng)
        cfg = SamplingConfig(n=kk, max_new_tokens=m, temperature=temperature, eos_id=eos_id,
                             pad_id=pad_id)
        samples = sampling.sample(fns, params, prefix, prefix_mask, sub, cfg)
        cand = jnp.concatenate([jnp.repeat(prefix, kk, 0),
                                samples.tokens_BxNxL.reshape(batch * kk, m)], 1)
        cand_mask = jnp.concatenate([jnp.repeat(prefix_mask, kk, 0),
                                     samples.mask_BxNxL.reshape(batch * kk, m)], 1)
        values_BxJ = score_last(scorer, cand, cand_mask).reshape(batch, kk)
        # best_of_n breaks ties by the first index; the K blocks are i.i.d., so that is a uniformly
        # random choice among the tied blocks.
        # A row whose K values are all NaN has no best block: its first candidate, an unguided
        # pi_ref block, is kept and counted in unscored_B.
        best = best_of_n(values_BxJ)
        best_B = jnp.where(best.has_valid_B, best.index_B, 0)
        unscored_B = unscored_B + (~done & ~best.has_valid_B)

        def pick(x_BxJxL):
            return jnp.take_along_axis(x_BxJxL, best_B[:, None, None], 1)[:, 0]

        valid_Bx1 = ~done[:, None]
        block = jnp.where(valid_Bx1, pick(samples.tokens_BxNxL), pad_id).astype(jnp.int32)
        block_mask = valid_Bx1 & pick(samples.mask_BxNxL)
        block_logp = jnp.where(block_mask, pick(samples.logp_BxNxL), 0.0)
        score_B = jnp.where(done, score_B, jnp.take_along_axis(values_BxJ, best_B[:, None], 1)[:, 0])
        blocks_B = blocks_B + jnp.any(block_mask, axis=1)
        done = done | jnp.any(block_mask & (block == eos), axis=1)
        resp = jnp.concatenate([resp, block], 1)
        resp_mask = jnp.concatenate([resp_mask, block_mask], 1)
        ref_logp = jnp.concatenate([ref_logp, block_logp], 1)
        # The next blocks' prefix: a finished row's padding is read as token 0, so the prefix
        # stays left-padded for the sampler (and a pad id outside the vocabulary never reaches
        # it); what it then samples is never accepted.
        prefix = jnp.concatenate([prefix, jnp.where(block_mask, block, 0)], 1)
        prefix_mask = jnp.concatenate([prefix_mask, block_mask | done[:, None]], 1)
    return BlockwiseOutput(resp, resp_mask, ref_logp, score_B, blocks_B * float(bon_kl_bound(kk)),
                           unscored_B)
