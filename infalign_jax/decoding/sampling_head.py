"""The sampler's per-step head: top-k / top-p filtering and the token draw, without any sort.

At a real vocabulary (tens of thousands of tokens) a vocabulary sort per decode step costs more
than the model's step on CPU, so nothing here sorts the vocabulary, and nothing draws B x V
random numbers.

Filtering (`filter_logits`): temperature, then top-k, then top-p; removed tokens get -inf.
* Top-k keeps every token whose (tempered) logit is >= the k-th largest one. The k-th largest
  value is found exactly by a bitwise search over the order-preserving uint32 image of the
  float32 logits: 32 rounds of "count the tokens at or above a candidate threshold", each a
  fused compare + count. Ties at the boundary are all kept, so a row keeps more than k tokens
  when several logits equal the k-th largest exactly (`jax.lax.top_k` would keep k of them).
* Top-p keeps {p >= tau*}, tau* the largest tau whose set {p >= tau} holds at least `top_p` of
  the row's probability: the smallest set of most likely tokens that reaches `top_p` (Holtzman
  et al. 2020). tau* is found by the same kind of search over the float bits of the unnormalised
  probabilities p = exp(x - max) in [0, 1] (30 rounds of a masked sum). The most likely token
  has p = 1 and is always kept; ties at tau* are all kept; a token whose probability underflows
  float32 (exp(x - max) == 0, x < max - 103) is never kept.
* Candidate pruning makes the searches run on a few thousand tokens instead of the vocabulary.
  The vocabulary is cut into groups of `GROUP` tokens and the n groups with the largest maxima
  are gathered (`jax.lax.top_k` over the V / GROUP group maxima, not over the vocabulary). Every
  token above the smallest of those n maxima is in the gathered buffer, so with n = k the k-th
  largest token of the buffer is the k-th largest of the row, exactly. Top-p after such a top-k
  searches the same buffer (every kept token above the k-th largest value is in it). Top-p alone
  gathers the `TOP_P_GROUPS` groups of largest p; a row whose tokens above that buffer's floor
  already hold `top_p` of the mass (a peaked row) is searched in the buffer, any other (a flat
  row, whose nucleus is large) over the whole vocabulary, `FALLBACK_ROWS` rows at a time: same
  result, only the cost differs (~1 ms per flat row at V = 49152 on a 2-core CPU).

Top-p alone in the sampler (`draw_filtered`) skips the threshold search: it draws from the
tempered softmax and keeps the token when it is in the nucleus, which one pass over the row
decides (`in_nucleus`: y is kept iff the tokens strictly more likely than y hold less than
`top_p` of the mass), else draws again (rejection sampling: each round keeps a row with
probability >= top_p, and the kept token follows the renormalised nucleus exactly). About two
rounds at top_p = 0.9 and batch 32, for flat and peaked rows alike; rows still rejected after
`rejection_rounds(top_p)` rounds (probability <= 1e-4 each) draw by the exact filter.

The draw (`draw`): a blocked inverse-CDF draw from softmax(logits). The unnormalised
probabilities exp(x - max) (float32) are summed per block of `block_size` tokens (the vocabulary
is padded with zero mass to a multiple of it); a first uniform chooses the block by the
cumulative block sums, the chosen block alone is gathered and a second uniform chooses the token
by the cumulative sum inside it. P(block) * P(token | block) is the softmax, and each uniform
(24 random bits, from one 64-bit draw per row) only has to resolve probabilities relative to its
own level: the row's total, then the block's. The draw never returns a token of zero probability
(-inf logit, or exp underflow): where the uniform lands on a boundary, or float32 rounding of the
cumulative sums lands it on a block / token of zero mass, it moves to the next one with positive
mass (the last one at the end).

Degenerate rows (what `jax.random.categorical`'s Gumbel arg-max returns there too; the policy
log-prob `sampling._token_logprob` of any token in such a row is NaN, so the caller sees them):
* a row with a NaN logit: `filter_logits` returns the whole row as NaN (it does not become a
  valid distribution), and `draw` returns its first NaN token;
* a row with +inf logits: `draw` returns the first +inf token (filtering keeps the +inf tokens);
* a row that is all -inf: `filter_logits` returns it unchanged and `draw` returns token 0.
Every search has a fixed number of rounds and the top-p fallback loop at most
ceil(B / FALLBACK_ROWS) iterations, so no input can make the head hang.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax.core.types import Array

DRAW_BLOCK = 1024    # tokens per block of the draw (a vocabulary of 49152 is 48 blocks)
GROUP = 32           # tokens per group of the candidate pruning
TOP_P_GROUPS = 128   # groups in top-p's candidate buffer (4096 tokens)
FALLBACK_ROWS = 2    # rows per full-vocabulary top-p search, for rows the buffer does not serve
_MAX_PRUNED = 0.25   # prune only when the buffer is at most this fraction of the vocabulary
REJECTED_AFTER_ROUNDS = 1e-4  # top-p rejection: a row's chance to need the exact path
MAX_REJECTION_ROUNDS = 8      # above this many rounds (top_p < ~0.69), the exact path alone


def _first_argmax(z_BxV: Array) -> Array:
    """`jnp.argmax(z, -1)` (first maximum; first NaN if any) as two vectorisable reductions."""
    vocab = z_BxV.shape[-1]
    top = jnp.max(z_BxV, axis=-1, keepdims=True)  # NaN if the row has one
    hit = (z_BxV == top) | jnp.isnan(z_BxV)
    iota = jax.lax.broadcasted_iota(jnp.int32, z_BxV.shape, z_BxV.ndim - 1)
    return jnp.min(jnp.where(hit, iota, vocab), axis=-1)


# ------------------------------------------------------------------------------- searches

_SIGN = 0x80000000


def _ordered_key(x: Array) -> Array:
    """float32 -> uint32 with the same order (-inf < ... < -0 < +0 < ... < +inf < +NaN)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    bits = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)  # negatives: reverse
    return jax.lax.bitcast_convert_type(bits, jnp.uint32) ^ jnp.uint32(_SIGN)


def _from_ordered_key(key: Array) -> Array:
    bits = jax.lax.bitcast_convert_type(key ^ jnp.uint32(_SIGN), jnp.int32)
    bits = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _largest_passing(passes, n_bits: int, rows: int, dtype) -> Array:
    """Per row, the largest t in [0, 2**n_bits) with passes(t) (B x 1), for a `passes` that is
    true up to some t and false above: built from the top bit down, n_bits calls of `passes`,
    no data-dependent loop. 0 if only 0 passes (0 itself is never tested)."""
    def round_(i, t):
        bit = jax.lax.shift_left(jnp.ones((), dtype), (n_bits - 1 - i).astype(dtype))
        candidate = t | bit
        return jnp.where(passes(candidate), candidate, t)

    return jax.lax.fori_loop(0, n_bits, round_, jnp.zeros((rows, 1), dtype))


def _kth_largest_exact(x_BxN: Array, k: int) -> Array:
    """The k-th largest value of each row (B x 1), 1 <= k <= N (rows with NaN: some value)."""
    key = _ordered_key(x_BxN)

    def enough(t_Bx1):  # at least k values at or above t
        return jnp.sum(key >= t_Bx1, axis=-1, keepdims=True, dtype=jnp.int32) >= k

    return _from_ordered_key(_largest_passing(enough, 32, x_BxN.shape[0], jnp.uint32))


def _pruned(n_groups: int, vocab: int, group: int) -> bool:
    return n_groups * group <= _MAX_PRUNED * vocab


def _groups(x_BxV: Array, group: int, pad: float) -> Array:
    """B x ceil(V / group) x group, the vocabulary padded with `pad` (at most every token)."""
    batch, vocab = x_BxV.shape
    n_all = -(-vocab // group)
    if n_all * group != vocab:
        x_BxV = jnp.pad(x_BxV, ((0, 0), (0, n_all * group - vocab)), constant_values=pad)
    return x_BxV.reshape(batch, n_all, group)


def _gather_groups(x_BxGxS: Array, idx_BxN: Array) -> Array:
    batch, _, group = x_BxGxS.shape
    return jnp.take_along_axis(x_BxGxS, idx_BxN[:, :, None], axis=1).reshape(batch, -1)


def _candidates(x_BxV: Array, n_groups: int, group: int, pad: float = -jnp.inf
                ) -> tuple[Array, Array, Array]:
    """The `n_groups` groups of `group` consecutive tokens with the largest maxima: their indices
    (B x n_groups), their tokens gathered (B x n_groups*group) and the smallest of their maxima,
    `floor` (B x 1).

    Every token > floor is in the buffer: its group's maximum exceeds floor, and a group left out
    has a maximum <= floor. Hence for k <= n_groups the buffer's k-th largest value is the row's
    (the tokens above floor are all there, and the n_groups maxima are >= floor)."""
    x_BxGxS = _groups(x_BxV, group, pad)
    gmax_BxG = jnp.max(x_BxGxS, axis=-1)
    idx_BxN = jax.lax.top_k(gmax_BxG, n_groups)[1]                   # V / group values only
    floor_Bx1 = jnp.min(jnp.take_along_axis(gmax_BxG, idx_BxN, axis=1), axis=-1, keepdims=True)
    return idx_BxN, _gather_groups(x_BxGxS, idx_BxN), floor_Bx1


def _mass_at_or_above(p_BxN: Array, t_Bx1: Array) -> Array:
    bits = jax.lax.bitcast_convert_type(p_BxN, jnp.int32)  # p >= 0: its bits keep the order
    return jnp.sum(jnp.where(bits >= t_Bx1, p_BxN, 0.0), axis=-1, keepdims=True)


def _nucleus_threshold_exact(p_BxV: Array, target_Bx1: Array) -> Array:
    """float32 bits of tau* per row (B x 1): the largest tau with mass{p >= tau} >= target.

    bits(1.0) = 0x3F800000 < 2**30 and nothing above 1 passes (its mass is 0), so 30 rounds."""
    return _largest_passing(lambda t: _mass_at_or_above(p_BxV, t) >= target_Bx1, 30,
                            p_BxV.shape[0], jnp.int32)


def _buffer_suffices(p_BxV: Array, top_p: float, groups: int, group: int):
    """(target, buffer, floor bits, per-row bool): whether the top-p search of a row can run in
    its candidate buffer (the mass of the tokens above the buffer's floor reaches the target)."""
    target_Bx1 = top_p * jnp.sum(p_BxV, axis=-1, keepdims=True)
    _, buf_BxN, floor_Bx1 = _candidates(p_BxV, groups, group, pad=0.0)
    floor_bits = jax.lax.bitcast_convert_type(floor_Bx1, jnp.int32)
    ok_Bx1 = _mass_at_or_above(buf_BxN, floor_bits + 1) >= target_Bx1
    return target_Bx1, buf_BxN, floor_bits, ok_Bx1[:, 0]


def _nucleus_threshold(p_BxV: Array, top_p: float, groups: int, group: int,
                       fallback_rows: int) -> Array:
    """`_nucleus_threshold_exact` for target = top_p * mass, searched in the candidate buffer for
    the rows where that suffices and over the vocabulary, `fallback_rows` rows at a time, for
    the others (a flat row costs its own full search, not the batch's)."""
    rows, vocab = p_BxV.shape
    if not _pruned(groups, vocab, group):
        return _nucleus_threshold_exact(
            p_BxV, top_p * jnp.sum(p_BxV, axis=-1, keepdims=True))
    target_Bx1, buf_BxN, floor_bits, ok_B = _buffer_suffices(p_BxV, top_p, groups, group)
    # Every p > floor is in the buffer, so mass{p >= t} is the buffer's for t > floor; when the
    # mass above floor already reaches the target, every t <= floor passes and tau* > floor.
    tau_Bx1 = _largest_passing(
        lambda t: (t <= floor_bits) | (_mass_at_or_above(buf_BxN, t) >= target_Bx1), 30, rows,
        jnp.int32)
    chunk = min(fallback_rows, rows)

    def full_search_some(state):  # the first `chunk` rows still to do (index `rows`: none)
        tau_Bx1, ok_B = state
        idx = jnp.nonzero(~ok_B, size=chunk, fill_value=rows)[0]
        safe = jnp.minimum(idx, rows - 1)
        tau_c = _nucleus_threshold_exact(p_BxV[safe], target_Bx1[safe])
        return tau_Bx1.at[idx].set(tau_c, mode="drop"), ok_B.at[idx].set(True, mode="drop")

    # Each round finishes at least one row, so the loop ends (also for NaN rows).
    return jax.lax.while_loop(lambda s: jnp.any(~s[1]), full_search_some, (tau_Bx1, ok_B))[0]


def _nucleus_threshold_after_top_k(p_BxV: Array, top_p: float, idx_BxN: Array, group: int,
                                   x_buf_BxN: Array, kth_Bx1: Array) -> Array:
    """tau* bits after a pruned top-k, searched in top-k's candidate buffer, no fallback needed.

    p_BxV is 0 outside the top-k set K = {x >= kth}; x_buf_BxN are the buffer's logits (groups
    idx_BxN). p_k = p(kth) is in the buffer, and p > p_k means x > kth, i.e. in the buffer: so
    mass{p >= t} is the buffer's for t > p_k, and is all of K's mass (>= target) for t <= p_k.
    """
    target_Bx1 = top_p * jnp.sum(p_BxV, axis=-1, keepdims=True)
    p_buf_BxN = _gather_groups(_groups(p_BxV, group, 0.0), idx_BxN)   # the same float32 values
    p_k = jnp.min(jnp.where(x_buf_BxN >= kth_Bx1, p_buf_BxN, jnp.inf), axis=-1, keepdims=True)
    p_k_bits = jax.lax.bitcast_convert_type(p_k, jnp.int32)
    return _largest_passing(
        lambda t: (t <= p_k_bits) | (_mass_at_or_above(p_buf_BxN, t) >= target_Bx1), 30,
        p_BxV.shape[0], jnp.int32)


# ------------------------------------------------------------------------------- filtering

def _probs_below_max(x_BxV: Array) -> Array:
    """exp(x - max) in [0, 1] with the maximum exactly 1, also when the max is +inf (the +inf
    tokens hold all the mass) or -inf (an all -inf row keeps everything: stays all -inf): the
    unnormalised probabilities both top-p paths measure the nucleus in."""
    top_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
    return jnp.where(x_BxV == top_Bx1, 1.0, jnp.exp(x_BxV - top_Bx1))


def _tempered(x_BxV: Array, temperature: float) -> Array:
    """x / temperature, the same distribution without overflow at tiny temperatures.

    At T >= 1e-4, x / T bit for bit (it overflows only for |x| > 3.4e34). Below, x / T could
    overflow float32 (several tokens at +inf: the draw would take the first, not the arg-max), so
    it is (x - max) / T: the same softmax, the arg-max at 0, +inf, -inf and NaN rows keeping their
    meaning. A temperature below float32's smallest normal number (which would round or flush to
    0: 0 / 0 = NaN) is the greedy limit: the arg-max tokens (ties all kept) at 0, the rest -inf.
    """
    t = np.float32(temperature)
    if t >= 1e-4:
        return x_BxV / t
    top_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
    finite_top_Bx1 = jnp.isfinite(top_Bx1)
    if not t >= np.finfo(np.float32).tiny:
        return jnp.where(x_BxV == top_Bx1, jnp.where(finite_top_Bx1, 0.0, top_Bx1), -jnp.inf)
    return (x_BxV - jnp.where(finite_top_Bx1, top_Bx1, 0.0)) / t


def filter_logits(logits_BxV: Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, *, group: int = GROUP,
                  top_p_groups: int = TOP_P_GROUPS, fallback_rows: int = FALLBACK_ROWS
                  ) -> Array:
    """float32 logits of the sampling distribution: temperature, then top-k, then top-p.

    Removed tokens get -inf. `top_k` keeps every token >= the k-th largest logit (boundary ties
    all kept); `top_p` keeps the smallest set of most likely tokens whose probability reaches
    `top_p` (boundary ties all kept; the most likely token always). `top_k=0` / `top_k >= V` and
    `top_p=1` switch those off. A row holding a NaN comes back all NaN. No sort: exact threshold
    searches (module docstring; `group`, `top_p_groups` and `fallback_rows` size the candidate
    pruning, which never changes the result).
    """
    chex.assert_rank(logits_BxV, 2)
    logits = _tempered(logits_BxV.astype(jnp.float32), temperature)
    vocab = logits.shape[-1]
    top_k_buffer = None
    if 0 < top_k < vocab:
        if _pruned(top_k, vocab, group):
            idx_BxN, x_buf_BxN, _ = _candidates(logits, top_k, group)
            kth_Bx1 = _kth_largest_exact(x_buf_BxN, top_k)
            top_k_buffer = idx_BxN, x_buf_BxN, kth_Bx1
        else:
            kth_Bx1 = _kth_largest_exact(logits, top_k)
        logits = jnp.where(logits >= kth_Bx1, logits, -jnp.inf)
    if top_p < 1.0:
        p = _probs_below_max(logits)
        if top_k_buffer is not None:
            tau_bits = _nucleus_threshold_after_top_k(p, top_p, top_k_buffer[0], group,
                                                      *top_k_buffer[1:])
        else:
            tau_bits = _nucleus_threshold(p, top_p, top_p_groups, group, fallback_rows)
        # The most likely token (p = 1.0) always stays, also where a top_p below float32's
        # smallest normal (flushed to 0) would let the search pass every candidate.
        tau_bits = jnp.minimum(tau_bits, jax.lax.bitcast_convert_type(jnp.float32(1.0),
                                                                      jnp.int32))
        logits = jnp.where(jax.lax.bitcast_convert_type(p, jnp.int32) >= tau_bits, logits,
                           -jnp.inf)
    # The searches rank NaN as a number; poison the row rather than return a valid distribution.
    return jnp.where(jnp.any(jnp.isnan(logits_BxV), axis=-1, keepdims=True), jnp.nan, logits)


# ------------------------------------------------------------------------------------ draw

def _uniform24(bits_u32: Array) -> Array:
    """uint32 bits -> float32 uniform on {0, 2**-24, ..., 1 - 2**-24} (exact, never 1)."""
    return (bits_u32 >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def _pick(mass_BxN: Array, u_B: Array) -> Array:
    """The index whose cumulative-mass interval holds u * total (the first index whose inclusive
    cumulative sum exceeds it), moved to the next index of positive mass (else the last one) when
    float32 rounding lands it on an index of zero mass: an index of zero mass is never returned.
    (The cumulative sum is a parallel scan, whose prefixes need not be monotone to the last ulp.)
    Rows without positive mass (NaN) get 0."""
    n = mass_BxN.shape[-1]
    cum_BxN = jnp.cumsum(mass_BxN, axis=-1)
    target_Bx1 = u_B[:, None] * cum_BxN[:, -1:]
    first_Bx1 = jnp.sum(cum_BxN <= target_Bx1, axis=-1, keepdims=True, dtype=jnp.int32)
    iota = jax.lax.broadcasted_iota(jnp.int32, mass_BxN.shape, 1)
    positive = mass_BxN > 0
    next_positive = jnp.min(jnp.where(positive & (iota >= first_Bx1), iota, n), axis=-1)
    last_positive = jnp.max(jnp.where(positive, iota, 0), axis=-1)
    return jnp.where(next_positive < n, next_positive, last_positive)


def _blocks(p_BxV: Array, block_size: int) -> tuple[Array, Array]:
    """Unnormalised probabilities as B x blocks x size (padded with zero mass) and their block
    sums (B x blocks): what every draw from the row reads."""
    batch, vocab = p_BxV.shape
    size = min(block_size, vocab)
    blocks = -(-vocab // size)
    if blocks * size != vocab:
        p_BxV = jnp.pad(p_BxV, ((0, 0), (0, blocks * size - vocab)))  # zero mass
    p_BxNxS = p_BxV.reshape(batch, blocks, size)
    return p_BxNxS, jnp.sum(p_BxNxS, axis=-1)


def _draw_blocks(p_BxNxS: Array, sums_BxN: Array, bits_2xB: Array) -> Array:
    """The blocked inverse-CDF draw for one pair of 32-bit random words per row: the block by
    the first uniform, the token inside it by the second."""
    u_2xB = _uniform24(bits_2xB)
    block_B = _pick(sums_BxN, u_2xB[0])
    p_BxS = jnp.take_along_axis(p_BxNxS, block_B[:, None, None], axis=1)[:, 0]
    return block_B * p_BxNxS.shape[-1] + _pick(p_BxS, u_2xB[1])


def draw(key: Array, logits_BxV: Array, block_size: int = DRAW_BLOCK) -> Array:
    """One token per row from softmax(logits) (int32, B): a blocked inverse-CDF draw.

    -inf logits (filtered-out tokens) have zero mass and are never drawn. One 64-bit random draw
    per row, whatever the vocabulary. Degenerate rows (NaN, +inf, all -inf): module docstring.
    """
    chex.assert_rank(logits_BxV, 2)
    x = logits_BxV.astype(jnp.float32)
    batch, _ = x.shape
    top_B = jnp.max(x, axis=-1)
    p = jnp.exp(x - top_B[:, None])  # (0, 1], 0 for -inf; NaN only where the max is not finite
    token_B = _draw_blocks(*_blocks(p, block_size), jax.random.bits(key, (2, batch), jnp.uint32))
    finite_B = jnp.isfinite(top_B)
    return jax.lax.cond(jnp.all(finite_B), lambda: token_B,
                        lambda: jnp.where(finite_B, token_B, _first_argmax(x)))


# ------------------------------------------------------------------ top-p by rejection

def rejection_rounds(top_p: float) -> int:
    """Rounds of `draw_filtered`'s top-p rejection: the fewest after which a row is still
    rejected with probability <= REJECTED_AFTER_ROUNDS (each round accepts with probability >=
    top_p); 0 (use `filter_logits`) when that takes more than MAX_REJECTION_ROUNDS."""
    if not 0.0 < top_p < 1.0:
        return 0
    rounds = int(np.ceil(np.log(REJECTED_AFTER_ROUNDS) / np.log1p(-top_p)))
    return max(rounds, 1) if rounds <= MAX_REJECTION_ROUNDS else 0


def in_nucleus(p_BxV: Array, target_Bx1: Array, token_B: Array) -> Array:
    """Whether each row's token is in the top-p set {p >= tau*} of `filter_logits` (B bools),
    from one pass over the row: tau* is the largest tau with mass{p >= tau} >= target, so
    p_y >= tau* exactly when the tokens strictly more likely than y hold less than the target
    (float32 sums of non-negative terms are monotone in the set summed). The most likely token
    (p = 1) is always in."""
    p_y = jnp.take_along_axis(p_BxV, token_B[:, None], axis=1)
    y_bits = jax.lax.bitcast_convert_type(p_y, jnp.int32)
    return ((_mass_at_or_above(p_BxV, y_bits + 1) < target_Bx1) | (p_y == 1.0))[:, 0]


def draw_filtered(key: Array, logits_BxV: Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, block_size: int = DRAW_BLOCK) -> Array:
    """One token per row from softmax(filter_logits(logits, temperature, top_k, top_p)) (int32,
    B): the same distribution as `draw(key, filter_logits(...))`, not the same bits.

    Top-p alone (top_k = 0) draws by rejection instead of searching for the nucleus threshold:
    a token drawn from the tempered softmax is kept when it is in the nucleus (`in_nucleus`, one
    pass over the row), else the row draws again, for at most `rejection_rounds(top_p)` rounds
    (each keeps a row with probability >= top_p; the loop ends early once every row has kept
    one). The kept token follows the softmax restricted to the nucleus, renormalised: exactly
    the filtered distribution (its target mass is summed by blocks, `filter_logits`' in one
    reduction, so a token whose mass lands within float32 rounding of the boundary may be in
    one set and not the other). Rows still rejected after the last round, and degenerate rows
    (NaN, +inf, all -inf), take `draw(filter_logits(...))` with another key (a `cond`: skipped
    when there are none). A flat row whose nucleus holds most of the vocabulary costs ~2 passes
    over it instead of the 30 of the exact search. Other settings: `draw(filter_logits(...))`.
    """
    chex.assert_rank(logits_BxV, 2)
    rounds = rejection_rounds(top_p) if top_k == 0 else 0
    if not rounds:
        return draw(key, filter_logits(logits_BxV, temperature, top_k, top_p), block_size)
    x = _tempered(logits_BxV.astype(jnp.float32), temperature)
    batch, _ = x.shape
    finite_B = jnp.isfinite(jnp.max(x, axis=-1))  # False for NaN, +inf and all -inf rows
    p = _probs_below_max(x)
    p_BxNxS, sums_BxN = _blocks(p, block_size)
    target_Bx1 = top_p * jnp.sum(sums_BxN, axis=-1, keepdims=True)

    def round_(state):
        r, token_B, done_B = state
        candidate_B = _draw_blocks(p_BxNxS, sums_BxN,
                                   jax.random.bits(jax.random.fold_in(key, r), (2, batch),
                                                   jnp.uint32))
        keep_B = ~done_B & in_nucleus(p, target_Bx1, candidate_B)
        return r + 1, jnp.where(keep_B, candidate_B, token_B), done_B | keep_B

    _, token_B, done_B = jax.lax.while_loop(
        lambda s: (s[0] < rounds) & ~jnp.all(s[2]), round_,
        (jnp.int32(0), jnp.zeros((batch,), jnp.int32), ~finite_B))
    exact_B = ~done_B | ~finite_B

    def exact():
        fallback = draw(jax.random.fold_in(key, rounds),
                        filter_logits(logits_BxV, temperature, top_k, top_p), block_size)
        return jnp.where(exact_B, fallback, token_B)

    return jax.lax.cond(jnp.any(exact_B), exact, lambda: token_B)
