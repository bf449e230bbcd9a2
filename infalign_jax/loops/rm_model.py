"""The reward model a `train_reward` run trains: a fresh "tiny" byte-level decoder or a pretrained
trunk with a reward head (`build_model`), and which of its parameters train (`train.trainable`:
`trainable_mask`, `freeze_optimizer`; the ensemble over one trunk: `trunk_ensemble`). See
`loops.train_reward`'s docstring for how a run uses them.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infalign_jax import models
from infalign_jax.data.byte_tokenizer import ByteTokenizer
from infalign_jax.models.config import REWARD_POOLS
from infalign_jax.infra.config_utils import dataclass_from
from infalign_jax.rewards.reward_runs import trunk_tokenizer

# With a pretrained trunk these ModelConfig keys may still be set: they change how the trunk is
# computed (rematerialisation, activation dtype) or where the reward head reads it (`reward_pool`:
# the last real token or the mean over real tokens), not the trunk's parameters. Besides them,
# `trunk_layers` (> 0) keeps only the trunk's first that many decoder layers (`models.first_layers`).
TRUNK_KEYS = ("remat", "dtype", "reward_pool")
TRUNK_LAYERS = "trunk_layers"
TRAINABLE = "'all', 'head' or 'last:<n>' (the reward head, final norm and last n layers)"


# The "tiny" model section: `source` and the ModelConfig fields the byte tokenizer and the reward
# head do not fix.
MODEL_FIXED = ("vocab_size", "heads")


def parse_trainable(value: Any) -> int | None:
    """Layers that train: None for "all", 0 for "head", n for "last:<n>"; anything else refused."""
    if value == "all":
        return None
    if value == "head":
        return 0
    if isinstance(value, str) and value.startswith("last:") and value[5:].isdigit() \
            and int(value[5:]) > 0:
        return int(value[5:])
    raise ValueError(f"config.train.trainable must be {TRAINABLE}, got {value!r}")


class RMModel(NamedTuple):
    cfg: models.ModelConfig
    tokenizer: Any
    params: Any                    # the pretrained trunk with its reward head; None for "tiny"
    tokenizer_name: str
    eos_id: int
    pad_id: int


def _load_trunk(source: str, overrides: dict[str, Any]) -> tuple[models.ModelConfig, Any]:
    from infalign_jax.models import gguf_import, hf_import
    if os.path.isfile(source):
        hf, state = gguf_import.read_gguf(source)
        cfg = hf_import.config_from_hf(hf, source=source, **overrides)
        return cfg, hf_import.params_from_hf_state_dict(cfg, state, source=source)
    return hf_import.load_hf_checkpoint(source, **overrides)


def default_pool(source: str) -> str:
    """Where the reward head of a model from `source` reads by default: "last" for the tiny byte
    model and for a sequence classifier (its score head was trained there), "mean" for a causal
    LM trunk (the mean carries a word-level judge's labels to new prompts where the last token's
    state does not: configs/reward_model.py)."""
    from infalign_jax.models import hf_import
    if source == "tiny" or (os.path.isdir(source) and hf_import.is_sequence_classifier(source)):
        return "last"
    return "mean"


def build_model(model_section: dict[str, Any]) -> RMModel:
    """The reward model of `config.model` (see the module docstring): "tiny" (fresh, byte
    tokenizer; parameters initialised by the caller) or a pretrained trunk with its tokenizer."""
    values = dict(model_section)
    source = values.pop("source", None)
    layers = values.pop(TRUNK_LAYERS, 0)
    if values.get("reward_pool", "last") not in REWARD_POOLS:
        raise ValueError(f"config.model.reward_pool must be one of {REWARD_POOLS}, "
                         f"got {values['reward_pool']!r}")
    if source == "tiny":
        if isinstance(layers, bool) or (layers is not None and layers != 0):
            raise ValueError(f"config.model.{TRUNK_LAYERS}={layers!r} cuts a pretrained trunk; "
                             f"the tiny model's depth is config.model.n_layers")
        for key in MODEL_FIXED:
            if key in values:
                raise ValueError(f"config.model.{key} is fixed by the byte tokenizer and the "
                                 f"reward head; remove it")
        tok = ByteTokenizer()
        cfg = dataclass_from(models.ModelConfig, values, "model", vocab_size=tok.vocab_size,
                             heads=("reward",))
        return RMModel(cfg, tok, None, tok.name, tok.eos_id, tok.pad_id)
    if not isinstance(source, str) or not (
            (os.path.isfile(source) and source.endswith(".gguf"))
            or os.path.isfile(os.path.join(source, "config.json"))):
        raise ValueError(f"config.model.source must be 'tiny', a transformers directory (with "
                         f"config.json) or a .gguf file, got {source!r}")
    fixed = sorted(k for k in values if k not in TRUNK_KEYS)
    if fixed:
        raise ValueError(f"config.model.{fixed[0]} is fixed by the pretrained trunk "
                         f"config.model.source={source!r}; remove it"
                         + (f" (and {', '.join(fixed[1:])})" if fixed[1:] else "")
                         + f": only {', '.join(TRUNK_KEYS + (TRUNK_LAYERS,))} may be set "
                         f"(configs/reward_model.py:trunk=<path> writes such a section)")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        raise ValueError(f"config.model.{TRUNK_LAYERS} must be an int >= 0 (0: every layer), "
                         f"got {layers!r}")
    tok, eos_id, pad_id = trunk_tokenizer(source)
    cfg, params = _load_trunk(source, dict(values, heads=("reward",)))
    if layers > cfg.n_layers:
        raise ValueError(f"config.model.{TRUNK_LAYERS}={layers}: the trunk {source!r} has only "
                         f"{cfg.n_layers} layers")
    if layers:
        cfg, params = models.first_layers(cfg, params, layers)
    name = os.path.basename(os.path.normpath(source))
    return RMModel(cfg, tok, params, name, eos_id, pad_id)


def trainable_mask(trainable: str, cfg: models.ModelConfig) -> Any:
    """None ("all") or a tree like the parameters: True / False per leaf, and for the stacked
    decoder layers a bool (n_layers,) array (`reward_models.stop_frozen_gradients`)."""
    n = parse_trainable(trainable)
    if n is None:
        return None
    if n > cfg.n_layers:
        raise ValueError(f"config.train.trainable={trainable!r}: the model has only "
                         f"{cfg.n_layers} layers")
    shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))

    def leaf(path, _):
        top = path[0].key
        if top == "layers":
            return np.arange(cfg.n_layers) >= cfg.n_layers - n
        return top.startswith("reward_head") or (top == "final_norm" and n > 0)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def freeze_optimizer(optimizer: optax.GradientTransformation, trainable: Any
                     ) -> optax.GradientTransformation:
    """`optimizer` whose updates are zero where `trainable` is False (weight decay included): a
    stateless optax mask after it, so the optimiser state keeps the parameters' structure (and
    layout). The step stops those gradients (`stop_frozen_gradients`), so clipping and the
    moments see the trainable parameters only."""
    if trainable is None:
        return optimizer

    def keep_only_trainable(updates, params=None):
        del params

        def one(u, t):
            t = np.asarray(t, bool)
            if t.all():
                return u
            return u * jnp.asarray(t.reshape(t.shape + (1,) * (u.ndim - t.ndim)), u.dtype)
        return jax.tree.map(one, updates, trainable)
    return optax.chain(optimizer, optax.stateless(keep_only_trainable))


def trunk_ensemble(cfg: models.ModelConfig, params: Any, key: jax.Array, size: int) -> Any:
    """`size` copies of the trunk stacked on a leading axis, each reward head the trunk's plus
    N(0, init_std^2) noise of its own."""
    stacked = jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x)[None], size, 0), params)
    head = stacked["reward_head_kernel"]
    noise = jax.random.normal(key, head.shape, head.dtype) * cfg.init_std
    return dict(stacked, reward_head_kernel=head + noise)
