"""LoRA (Hu et al. 2021, arXiv 2106.09685) on the decoder's projection kernels, as pure functions.

    init_adapters(cfg, base_params, rng) -> adapters     the trainable tree, adapter-sized
    merge(base_params, adapters, cfg)    -> params       W + (alpha / rank) * A @ B per target
    attach(base_params, adapters, cfg)   -> params       the same function, the factors applied
                                                         inside each layer (no merged kernel)

A target kernel W of the layer-stacked tree (`layers/attn/q_kernel` of shape (L, D, H, Dh), ...)
is read as L matrices (d_in x d_out): q, k, v, gate, up, fc and down keep their first axis after
the layer axis as the input, o (L, H, Dh, D) takes the two head axes. Its adapter is
{"a": (L, d_in, r), "b": (L, r, d_out)}: A ~ normal(0, 1/d_in) (fan-in scaled, as the LoRA paper's
Gaussian A), B = 0, so the merged parameters at initialisation are the base parameters exactly.

The base parameters are never trained: a caller differentiates a function of `attach(base,
adapters)` (or `merge`) with respect to `adapters` only, so gradients and optimiser state are
adapter-sized. With bfloat16 parameters the two differ by rounding: `merge` rounds W + s·A·B to
W's dtype, `attach` adds the update in the activation dtype.
Everything the base holds besides the target kernels (embeddings, norms, biases, heads) is the
base's, unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from infalign_jax.infra import validate as check
from infalign_jax.models.transformer import LORA

Params = Any

# target name -> (path under params["layers"], axes after the layer axis that are the input)
TARGETS = {"q": (("attn", "q_kernel"), 1), "k": (("attn", "k_kernel"), 1),
           "v": (("attn", "v_kernel"), 1), "o": (("attn", "o_kernel"), 2),
           "gate": (("mlp", "gate_kernel"), 1), "up": (("mlp", "up_kernel"), 1),
           "fc": (("mlp", "fc_kernel"), 1), "down": (("mlp", "down_kernel"), 1)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`rank` 0: off (the whole policy trains). `targets` () = every projection kernel the model
    has (q, k, v, o and its MLP kernels); a named target the model lacks is refused."""

    _config_owner = "config.rl.lora"
    rank: int = 0
    alpha: float = 16.0            # the update is (alpha / rank) * A @ B
    targets: tuple = ()            # names of TARGETS

    def __post_init__(self):
        check.ints(self, ("rank",), low=0)
        check.numbers(self, ("alpha",), strict=True)
        if isinstance(self.targets, str):   # "up" was read as ('u', 'p'), "o" as ('o',)
            check.fail(self, "targets", f"a list of names from {tuple(TARGETS)}, not a string")
        object.__setattr__(self, "targets", tuple(self.targets or ()))
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            check.fail(self, "targets", f"a subset of {tuple(TARGETS)} (unknown: {unknown})")
        if len(set(self.targets)) != len(self.targets):
            check.fail(self, "targets", "a list without repeats")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _kernel(params: Params, name: str) -> Any:
    node = params.get("layers", {})
    for key in TARGETS[name][0]:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None
    return node


def target_names(cfg: LoraConfig, params: Params) -> tuple[str, ...]:
    """The targets `cfg` adapts in `params` (validated against what the model has)."""
    present = tuple(t for t in TARGETS if _kernel(params, t) is not None)
    if not cfg.targets:
        if not present:
            raise ValueError("config.rl.lora: the policy has no layer-stacked projection kernels "
                             "(params['layers']) to adapt")
        return present
    missing = [t for t in cfg.targets if t not in present]
    if missing:
        raise ValueError(f"config.rl.lora.targets: {missing} not in this model (it has "
                         f"{list(present)})")
    return cfg.targets


def _matrix_dims(shape: tuple[int, ...], n_in: int) -> tuple[int, int, int]:
    """(layers, d_in, d_out) of a layer-stacked kernel."""
    layers, rest = shape[0], shape[1:]
    return layers, math.prod(rest[:n_in]), math.prod(rest[n_in:])


def init_adapters(cfg: LoraConfig, base_params: Params, rng: jax.Array) -> dict[str, Any]:
    """{target: {"a": (L, d_in, r), "b": (L, r, d_out)}} in float32, B = 0."""
    if cfg.rank <= 0:
        raise ValueError("config.rl.lora.rank must be > 0 to build adapters")
    adapters = {}
    for i, name in enumerate(target_names(cfg, base_params)):
        layers, d_in, d_out = _matrix_dims(_kernel(base_params, name).shape, TARGETS[name][1])
        a = jax.random.normal(jax.random.fold_in(rng, i), (layers, d_in, cfg.rank), jnp.float32)
        adapters[name] = {"a": a / jnp.sqrt(jnp.float32(d_in)),
                          "b": jnp.zeros((layers, cfg.rank, d_out), jnp.float32)}
    return adapters


def delta(adapter: dict[str, Any], shape: tuple[int, ...], scale: float) -> jax.Array:
    """scale * A @ B of one target, in the kernel's layer-stacked shape (float32)."""
    return (scale * jnp.einsum("lir,lro->lio", adapter["a"], adapter["b"])).reshape(shape)


def _refuse_unknown(adapters: dict[str, Any], caller: str) -> None:
    unknown = sorted(set(adapters) - set(TARGETS))
    if unknown:
        raise ValueError(f"lora.{caller}: unknown adapter targets {unknown}")


def merge(base_params: Params, adapters: dict[str, Any], cfg: LoraConfig) -> Params:
    """The base parameters with each adapted kernel replaced by W + scale * A @ B (in W's dtype);
    every other leaf is the base's own array."""
    _refuse_unknown(adapters, "merge")
    layers = dict(base_params["layers"])
    for name, adapter in adapters.items():
        (block, leaf), _ = TARGETS[name]
        w = layers[block][leaf]
        layers[block] = {**layers[block],
                         leaf: (w + delta(adapter, w.shape, cfg.scale).astype(w.dtype))}
    return {**base_params, "layers": layers}


def attach(base_params: Params, adapters: dict[str, Any], cfg: LoraConfig) -> Params:
    """The base parameters with the adapters attached as factors (a top-level "lora" entry, read
    by `models.variables`): the model then computes x @ W + (x @ A) @ (scale * B) inside each
    layer. The same function as `merge`, without forming any W + scale * A @ B or, under `grad`
    with respect to the adapters, its full-size gradient: what training and decoding use."""
    _refuse_unknown(adapters, "attach")
    factors: dict[str, dict[str, Any]] = {}
    for name, adapter in adapters.items():
        if _kernel(base_params, name) is None:
            raise ValueError(f"lora.attach: the base parameters have no {name!r} kernel")
        (block, leaf), _ = TARGETS[name]
        factors.setdefault(block, {}).update({f"{leaf}_a": adapter["a"],
                                              f"{leaf}_b": cfg.scale * adapter["b"]})
    return {**base_params, LORA: {"layers": factors}}


def num_adapter_params(adapters: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(adapters)))


def adapter_shapes(cfg: LoraConfig, base_params: Params) -> Any:
    """The adapters' ShapeDtypeStructs (a checkpoint's restore target) without allocating them."""
    return jax.eval_shape(lambda p: init_adapters(cfg, p, jax.random.key(0)), base_params)
