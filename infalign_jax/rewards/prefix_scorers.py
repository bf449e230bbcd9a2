"""Training prefix scorers for controlled decoding: CD-FUDGE and CD-Q (Mudgal et al. 2024, arXiv
2310.17022, section 3.1; spec section 2).

The prefix scorer V_theta([x, y^t]) estimates V*([x, y^t]) = E_{z ~ pi_ref}[r([x, y^t, z])] (CD
Eq. 1, reward only at the end). It is a `models` decoder with the "value" head: the value at
sequence position i scores the prefix ending at i, so for [prompt (P) | response (L)] the
response-aligned values are `values_BxT[:, P:]` and entry t scores [x, y_0..y_t].

Losses (all on response-aligned B x T arrays; T = response positions, `mask_BxT` right-padded):
* CD-FUDGE (CD Eq. 4): 1/2 (V([x, y^t]) - r([x, y]))^2 at every valid t, y ~ pi_ref. Its
  minimiser over a free table is E[r | prefix] = V* (CD Thm 3.1 / C.2).
* CD-Q (CD Eq. 5): 1/2 (V([x, y^t]) - sg(v_t))^2 with
      v_t = r([x, y])                                  if t is the last valid token,
      v_t = sum_z pi_ref(z | [x, y^t]) V([x, y^t, z])  otherwise,
  sg = stop-gradient (the spec's v-dot; no target network: the spec names none). "Last valid
  token" is the EOS token or, for a response cut at the length budget, its last token: both are
  where the sampler's reward is read. V* is the unique fixed point of this backup.

How the expectation over z is computed: over J candidate next tokens per position, with pi_ref
renormalised over them (softmax of their log-probs). J = |vocab| (`top_k=None`) is the exact
expectation; J < |vocab| (pi_ref's top-k) is the approximation for large vocabularies, matching
the top-k tokenwise decoder. All L*J candidate values of a batch come from ONE extra forward
pass: the candidates are appended after the response and each attends only to its own prefix
(tree attention, `next_token_values`), so the cost is one sequence of P + L + L*J tokens per row
instead of L*J sequences of length P + L.

Pure functions; no `jit` inside. `make_scorer_step` returns a step for the caller to jit.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import optax

from infalign_jax.core import losses, vocab_chunks
from infalign_jax import models
from infalign_jax.decoding.controlled_decoding import PrefixScorer, value_head_scorer
from infalign_jax.models.config import ModelConfig
from infalign_jax.models.transformer import Transformer
from infalign_jax.core.types import TrainState
from infalign_jax.decoding.sampling import concat_prompt_response
from infalign_jax.core.types import DecoderFns
from infalign_jax.infra import validate as check

Array = jax.Array
Params = Any

SCORER_METHODS = ("fudge", "cdq")
BATCH_KEYS = ("prompt_BxP", "prompt_mask_BxP", "response_BxL", "response_mask_BxL",
              "final_reward_B")
CDQ_BATCH_KEYS = ("next_ids_BxLxJ", "ref_next_logprobs_BxLxJ")

__all__ = ["SCORER_METHODS", "terminal_mask", "fudge_targets",
           "fudge_loss", "cdq_targets", "cdq_loss", "ref_next_token_logprobs",
           "next_token_values", "make_scorer_step", "scorer_from_params"]


def _rewards(final_reward_B: Array, mask_BxT: Array) -> tuple[Array, Array]:
    final_reward_B = losses.check_rank(final_reward_B, 1, "final_reward_B")
    mask_BxT = jnp.asarray(mask_BxT)
    chex.assert_rank(mask_BxT, 2, custom_message="mask_BxT", exception_type=ValueError)
    if final_reward_B.shape[0] != mask_BxT.shape[0]:
        raise ValueError(f"final_reward_B has {final_reward_B.shape[0]} rows, mask_BxT has "
                         f"{mask_BxT.shape[0]}")
    return final_reward_B, mask_BxT.astype(bool)


def terminal_mask(mask_BxT: Array) -> Array:
    """True at the last valid token of each row (EOS, or the last token within the budget)."""
    mask_BxT = jnp.asarray(mask_BxT).astype(bool)
    chex.assert_rank(mask_BxT, 2, custom_message="mask_BxT", exception_type=ValueError)
    next_valid_BxT = jnp.concatenate([mask_BxT[:, 1:], jnp.zeros_like(mask_BxT[:, :1])], axis=1)
    return mask_BxT & ~next_valid_BxT


def fudge_targets(final_reward_B: Array, mask_BxT: Array) -> Array:
    """CD-FUDGE targets (CD Eq. 4): the sample's final reward at every valid position, else 0."""
    final_reward_B, mask_BxT = _rewards(final_reward_B, mask_BxT)
    return jnp.where(mask_BxT, final_reward_B[:, None], 0.0)


def fudge_loss(values_BxT: Array, final_reward_B: Array, mask_BxT: Array,
               reduction: str = "token") -> Array:
    """CD-FUDGE (CD Eq. 4): reduce_t 1/2 (V([x, y^t]) - r([x, y]))^2 over valid positions.

    `values_BxT` are response-aligned; `reduction` as in `losses.reduce_tokens`. For y ~ pi_ref
    the minimiser over free per-prefix values is E[r | prefix] = V* (CD Thm 3.1).
    """
    values_BxT = losses.check_rank(values_BxT, 2, "values_BxT")
    targets_BxT = fudge_targets(final_reward_B, mask_BxT)
    losses.check_same_shape([values_BxT, targets_BxT], "values_BxT vs mask_BxT")
    return losses.reduce_tokens(0.5 * jnp.square(values_BxT - targets_BxT), mask_BxT, reduction)


def cdq_targets(next_values_BxTxJ: Array, ref_next_logprobs_BxTxJ: Array, mask_BxT: Array,
                final_reward_B: Array) -> Array:
    """CD-Q Bellman targets v_t (CD Eq. 5), stop-gradient, 0 on masked positions.

    next_values_BxTxJ[b, t, k]: V([x, y^t, z_k]) for candidate next token z_k after prefix y^t.
    ref_next_logprobs_BxTxJ[b, t, k]: log pi_ref(z_k | [x, y^t]) (need not be normalised over the
      K candidates: the weights are their softmax, i.e. pi_ref renormalised to the candidates;
      exact when the K candidates are the whole vocabulary).
    At the last valid token the target is the final reward (the only nonzero tokenwise reward).
    """
    next_values_BxTxJ = losses.check_rank(next_values_BxTxJ, 3, "next_values_BxTxJ")
    ref_next_logprobs_BxTxJ = losses.check_rank(ref_next_logprobs_BxTxJ, 3,
                                                "ref_next_logprobs_BxTxJ")
    losses.check_same_shape([next_values_BxTxJ, ref_next_logprobs_BxTxJ],
                            "next_values_BxTxJ vs ref_next_logprobs_BxTxJ")
    final_reward_B, mask_BxT = _rewards(final_reward_B, mask_BxT)
    losses.check_same_shape([next_values_BxTxJ[..., 0], mask_BxT], "next_values_BxTxJ vs mask_BxT")
    weights_BxTxJ = jax.nn.softmax(ref_next_logprobs_BxTxJ, axis=-1)
    # Candidates of zero weight (log-prob -inf) count 0 whatever their value (no 0 * inf).
    expected_BxT = jnp.sum(jnp.where(weights_BxTxJ > 0, weights_BxTxJ * next_values_BxTxJ, 0.0),
                           axis=-1)
    targets_BxT = jnp.where(terminal_mask(mask_BxT), final_reward_B[:, None], expected_BxT)
    return jax.lax.stop_gradient(jnp.where(mask_BxT, targets_BxT, 0.0))


def cdq_loss(values_BxT: Array, next_values_BxTxJ: Array, ref_next_logprobs_BxTxJ: Array,
             mask_BxT: Array, final_reward_B: Array, reduction: str = "token") -> Array:
    """CD-Q (CD Eq. 5): reduce_t 1/2 (V([x, y^t]) - sg(v_t))^2; off-policy data is allowed."""
    values_BxT = losses.check_rank(values_BxT, 2, "values_BxT")
    targets_BxT = cdq_targets(next_values_BxTxJ, ref_next_logprobs_BxTxJ, mask_BxT,
                              final_reward_B)
    losses.check_same_shape([values_BxT, targets_BxT], "values_BxT vs mask_BxT")
    return losses.reduce_tokens(0.5 * jnp.square(values_BxT - targets_BxT), mask_BxT, reduction)


def ref_next_token_logprobs(fns: DecoderFns, ref_params: Params, prompt_BxP: Array,
                            prompt_mask_BxP: Array, response_BxL: Array,
                            response_mask_BxL: Array, top_k: int | None = None
                            ) -> tuple[Array, Array]:
    """(next_ids_BxLxJ, log pi_ref(next | [x, y^t])_BxLxK) from one teacher-forced forward.

    Entry t is the distribution after response token t (logits at sequence position P + t).
    `top_k=None` gives the whole vocabulary (K = V, exact CD-Q expectation); otherwise pi_ref's
    top-k tokens at each position with their (unrenormalised) log-probs. float32.
    With a linear lm head (`fns.hidden`, `fns.lm_kernel`) no logits exist at the prompt
    positions, and the top-k comes from one pass over vocabulary chunks
    (`vocab_chunks.top_k_logprobs`): B x L x K, never B x L x V.
    """
    check.int_arg("top_k", top_k, optional=True)
    chex.assert_rank([prompt_BxP, response_BxL], 2)
    tokens, mask = concat_prompt_response(prompt_BxP, prompt_mask_BxP, response_BxL,
                                          response_mask_BxL)
    plen = prompt_BxP.shape[1]
    if fns.hidden is not None and fns.lm_kernel is not None:
        hidden_BxLxD = fns.hidden(ref_params, tokens, mask)[:, plen:]
        kernel_DxV = fns.lm_kernel(ref_params)
        if top_k is not None and top_k < kernel_DxV.shape[1]:
            return vocab_chunks.top_k_logprobs(hidden_BxLxD, kernel_DxV, top_k)
        logits_BxLxV = jnp.einsum("bld,dv->blv", hidden_BxLxD,
                                  kernel_DxV.astype(hidden_BxLxD.dtype),
                                  preferred_element_type=jnp.float32)
    else:
        logits_BxLxV = fns.logits(ref_params, tokens, mask)[:, plen:]
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    batch, length, vocab = logp_BxLxV.shape
    if top_k is None or top_k >= vocab:
        ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), (batch, length, vocab))
        return ids, logp_BxLxV
    logp_BxLxJ, ids = jax.lax.top_k(logp_BxLxV, top_k)
    return ids.astype(jnp.int32), logp_BxLxJ


def _tree_forward(cfg: ModelConfig, params: Params, prompt_BxP: Array, prompt_mask_BxP: Array,
                  response_BxL: Array, response_mask_BxL: Array, next_ids_BxLxJ: Array
                  ) -> tuple[Array, Array]:
    """(values_BxL of the response, values_BxLxJ of every candidate [x, y^t, z_k]), one forward."""
    chex.assert_rank(next_ids_BxLxJ, 3, custom_message="next_ids_BxLxJ", exception_type=ValueError)
    batch, plen = prompt_BxP.shape
    length, k = response_BxL.shape[1], next_ids_BxLxJ.shape[2]
    losses.check_same_shape([next_ids_BxLxJ[..., 0], response_BxL],
                            "next_ids_BxLxJ vs response_BxL")
    tokens, mask = concat_prompt_response(prompt_BxP, prompt_mask_BxP, response_BxL,
                                          response_mask_BxL)
    tokens = models._real_tokens(tokens, mask)   # a pad id past the vocabulary would embed NaN
    n = plen + length
    base_pos_BxT = models.default_positions(mask)
    # Candidate (t, k) sits right after response token t: position of y_t plus one.
    cand_pos = jnp.repeat(base_pos_BxT[:, plen:] + 1, k, axis=1)
    all_tokens = jnp.concatenate([tokens.astype(jnp.int32),
                                  next_ids_BxLxJ.reshape(batch, length * k).astype(jnp.int32)], 1)
    positions = jnp.concatenate([base_pos_BxT, cand_pos], axis=1)
    # Base rows: causal over real tokens (exactly `models.apply`). Candidate row (t, k): the real
    # tokens up to y_t, and itself; never another candidate.
    q_idx = jnp.concatenate([jnp.arange(n), plen + jnp.repeat(jnp.arange(length), k)])
    base_keys_BxSxT = (jnp.arange(n)[None, :] <= q_idx[:, None])[None] & mask[:, None, :]
    cand_keys = jnp.concatenate([jnp.zeros((n, length * k), bool),
                                     jnp.eye(length * k, dtype=bool)], axis=0)
    attn_BxSxS = jnp.concatenate(
        [base_keys_BxSxT, jnp.broadcast_to(cand_keys, (batch,) + cand_keys.shape)], 2)
    out = Transformer(cfg).apply(models.variables(params), all_tokens, positions, attn_BxSxS)
    values = out["value"].astype(jnp.float32)
    return values[:, plen:n], values[:, n:].reshape(batch, length, k)


def next_token_values(cfg: ModelConfig, params: Params, prompt_BxP: Array,
                      prompt_mask_BxP: Array, response_BxL: Array, response_mask_BxL: Array,
                      next_ids_BxLxJ: Array) -> Array:
    """V([x, y^t, z_k]) for every response position t and candidate k: float32 BxLxK.

    One forward over [prompt | response | L*K candidates] with a tree attention mask; equal to
    running the value model on each sequence [x, y^t, z_k] separately.
    """
    _check_value_cfg(cfg)
    return _tree_forward(cfg, params, prompt_BxP, prompt_mask_BxP, response_BxL,
                         response_mask_BxL, next_ids_BxLxJ)[1]


def _check_value_cfg(cfg: ModelConfig) -> None:
    if not isinstance(cfg, ModelConfig) or "value" not in cfg.heads:
        raise ValueError("model_cfg must be a ModelConfig with the 'value' head, got "
                         f"{getattr(cfg, 'heads', cfg)!r}")


def make_scorer_step(model_cfg: ModelConfig, method: str,
                     optimizer: optax.GradientTransformation, reduction: str = "token"
                     ) -> Callable[[TrainState, Mapping[str, Array]],
                                   tuple[TrainState, dict[str, Array]]]:
    """step(state, batch) -> (state, metrics) training a value-head model by CD-FUDGE or CD-Q.

    batch: prompt_BxP (left-padded), prompt_mask_BxP, response_BxL (right-padded),
    response_mask_BxL, final_reward_B (r([x, y]), read at the last valid token); for "cdq" also
    next_ids_BxLxJ and ref_next_logprobs_BxLxJ (`ref_next_token_logprobs` of pi_ref, so the step
    needs no reference model). CD-FUDGE data must be pi_ref samples; CD-Q data may be any.
    `state` is `core.types.TrainState` (`init_train_state(params, optimizer)`).
    """
    _check_value_cfg(model_cfg)
    if method not in SCORER_METHODS:
        raise ValueError(f"unknown prefix-scorer method {method!r}; known: {SCORER_METHODS}")
    if reduction not in losses.REDUCTIONS:
        raise ValueError(f"reduction must be one of {losses.REDUCTIONS}, got {reduction!r}")
    needed = BATCH_KEYS + (CDQ_BATCH_KEYS if method == "cdq" else ())

    def loss_fn(params: Params, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
        prompt, pmask = batch["prompt_BxP"], batch["prompt_mask_BxP"]
        resp, rmask = batch["response_BxL"], batch["response_mask_BxL"]
        reward_B = batch["final_reward_B"]
        if method == "fudge":
            tokens, mask = concat_prompt_response(prompt, pmask, resp, rmask)
            values_BxL = models.apply(params, tokens, model_cfg,
                                      attention_mask_BxT=mask).values[:, prompt.shape[1]:]
            targets_BxL = fudge_targets(reward_B, rmask)
            loss = fudge_loss(values_BxL, reward_B, rmask, reduction)
        else:
            # Candidate rows never feed the response rows (tree mask), so one forward gives both
            # V (with gradient) and the bootstrapped next values (stop-gradient, CD Eq. 5).
            values_BxL, next_BxLxJ = _tree_forward(model_cfg, params, prompt, pmask, resp, rmask,
                                                   batch["next_ids_BxLxJ"])
            next_BxLxJ = jax.lax.stop_gradient(next_BxLxJ)
            logp_BxLxJ = batch["ref_next_logprobs_BxLxJ"]
            targets_BxL = cdq_targets(next_BxLxJ, logp_BxLxJ, rmask, reward_B)
            loss = cdq_loss(values_BxL, next_BxLxJ, logp_BxLxJ, rmask, reward_B, reduction)
        aux = {"value_mean": losses.masked_mean(values_BxL, rmask),
               "target_mean": losses.masked_mean(targets_BxL, rmask),
               "terminal_abs_error": losses.masked_mean(
                   jnp.abs(values_BxL - reward_B[:, None]), terminal_mask(rmask))}
        return loss, jax.lax.stop_gradient(aux)

    def step(state: TrainState, batch: Mapping[str, Array]
             ) -> tuple[TrainState, dict[str, Array]]:
        missing = [key for key in needed if key not in batch]
        if missing:
            raise ValueError(f"{method} scorer batch is missing {missing}; needs {list(needed)}")
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return TrainState(params, opt_state, state.step + 1), metrics

    return step


def scorer_from_params(model_cfg: ModelConfig, params: Params) -> PrefixScorer:
    """The trained value model as the `PrefixScorer` the controlled decoders consume."""
    _check_value_cfg(model_cfg)
    return value_head_scorer(model_cfg, params)
