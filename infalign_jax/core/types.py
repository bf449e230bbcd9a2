"""Types shared by every layer: arrays, parameters, decoders, reward functions, judges, states.

Defined once here, at the bottom of the house, so that models, decoding, rewards and the RL step
can all speak of them without importing one another.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
Params = Any     # a pytree of parameter arrays
PyTree = Any


@dataclasses.dataclass(frozen=True)
class HostReward:
    """A `RewardFn` computed on the host (a text judge). Called like any `RewardFn` it runs inside
    jitted code through a host callback (`in_graph`); `host(prompt_idx_R, response_RxL, mask_RxL)`
    takes and returns numpy arrays, for loops that run it between jitted programs instead
    (a program with a host callback is never stored in JAX's persistent compilation cache).
    `cut()`, when given, is the judge's running count of texts it cut at its length limit (a
    reward model's `max_len`): the training loop counts the cuts of each step."""

    host: Callable[..., Any]
    in_graph: Callable[..., Any]
    cut: Callable[[], int] | None = None

    def __call__(self, reward_params: Any, prompt_idx_R: Any, response_RxL: Any,
                 response_mask_RxL: Any) -> Any:
        return self.in_graph(reward_params, prompt_idx_R, response_RxL, response_mask_RxL)


class DecoderFns(NamedTuple):
    """The pure functions a sampler needs from a decoder (see `decoding.sampling`):

      prefill(params, tokens_BxP, mask_BxP, max_len) -> (logits_BxV at the last prompt token, cache)
      decode(params, token_R, cache)                 -> (logits_RxV for the next token, cache)
      logits(params, tokens_BxT, mask_BxT)           -> logits_BxTxV (teacher forcing, no cache)

    and `max_len`, the longest prompt + response the decoder supports (None: no limit known).
    Optional:
      expand(cache, n) -> the prefill's cache continued by n rows per prompt (rows b*n + j); by
        default every cache leaf is repeated along its leading (batch) axis. A decoder that keeps
        the prompt's KV once per prompt gives its own.
      hidden(params, tokens_BxT, mask_BxT) -> BxTxD and lm_kernel(params) -> DxV: a linear lm
        head, logits = hidden @ kernel; with them the trainer computes log-probs at the response
        positions only and over vocabulary chunks, never the B x T x V logits.
      shared_hidden(params, prompt_BxP, mask_BxP, response_RxL) -> RxLxD: with a linear head,
        the hidden states predicting each token of R = B*N responses (rows b*N + j continue
        prompt b), each prompt run once (`models.shared_prompt_hidden`).
      decode_window(params, token_R, cache, slots) -> decode attending over the first `slots`
        response slots only (static; those written are below it): the sampler then decodes in
        phases of doubling windows, so a step reads at most twice the slots written instead of
        all `max_new_tokens` (`decoding.sampling.sample`).
    """

    prefill: Callable[..., tuple[Array, Any]]
    decode: Callable[..., tuple[Array, Any]]
    logits: Callable[..., Array]
    max_len: int | None = None
    expand: Callable[..., Any] | None = None
    hidden: Callable[..., Array] | None = None
    lm_kernel: Callable[..., Array] | None = None
    shared_hidden: Callable[..., Array] | None = None
    decode_window: Callable[..., tuple[Array, Any]] | None = None


# reward_fn(reward_params, prompt_idx_R, response_RxL, response_mask_RxL) -> rewards_R: the raw
# reward r(x, y) of R responses to the prompts `prompt_idx_R` (row indices of the task's prompts).
RewardFn = Callable[[Any, Array, Array, Array], Array]


class SplitStep(NamedTuple):
    """A train step as its two halves, for a guard that checks the update before it lands:

      prepare(state, *args) -> (pending, metrics)   everything up to the gradients
      apply(state, pending) -> new state            the optimisers' update (and what follows it)

    `apply(state, prepare(state, *args)[0])` is the step's new state. `apply` costs little next
    to `prepare` (elementwise, with a global-norm reduction), so a guard can compute it once to
    check it and again inside a `lax.cond` that keeps the old state, and the old and the new
    state are never both held (`loops.train.guard_nonfinite`)."""

    prepare: Callable[..., tuple[Any, dict[str, Array]]]
    apply: Callable[[Any, Any], Any]


class Judge(Protocol):
    """A text judge: one score per (prompt, response) pair, higher is better (numpy, host side);
    `name` identifies it in reference tables."""

    name: str

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


# A judge of token arrays: (prompt_BxP, prompt_mask_BxP, response_BxL, response_mask_BxL) -> B
# scores (e.g. a reward model, or the exact task's table lookup).
TokenJudge = Callable[[Array, Array, Array, Array], Array]


class TrainState(NamedTuple):
    """Parameters, optimiser state and step of a supervised step `(state, batch) -> (state,
    metrics)` (reward models, prefix scorers). The RL step extends it (`rl.step.RLState`)."""

    params: Params
    opt_state: Any
    step: Array


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    """Step-0 `TrainState`."""
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
