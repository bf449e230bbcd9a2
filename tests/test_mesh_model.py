"""Acceptance test of the foundation: the real decoder sharded over 8 CPU devices.

On a (data=2, fsdp=2, tensor=2) mesh, with parameters built by `sharding.sharded_init` and a
right-padded batch placed by `sharding.shard_batch`, the forward pass and one optimiser step of
a small model (AdamW for the Llama family, SGD with momentum for GPT-2) must equal the same
computation on a single device to 1e-5: loss, all outputs, gradients, new parameters and new
optimiser state. The reference is the unsharded code path (no mesh, no rules), so the test
checks that sharding changes layout only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from infalign_jax import models
from infalign_jax.infra import sharding as sh

TOL = 1e-5


def _config(family: str) -> models.ModelConfig:
    # n_kv_heads=1 exercises the divisibility fallback (1 KV head cannot split over tensor=2);
    # both scalar heads exercise the "scalar" rule.
    return models.ModelConfig(
        family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4,
        n_kv_heads=1 if family == "llama" else 4, head_dim=8, d_ff=64, max_len=16,
        heads=("lm", "reward", "value"),
    )


def _padded_batch(vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = np.array([12, 9, 5, 12, 3, 7, 12, 1])
    mask_BxT = np.arange(12)[None, :] < lengths[:, None]
    tokens_BxT = np.where(mask_BxT, rng.integers(1, vocab, size=mask_BxT.shape), 0)
    return {"tokens": tokens_BxT.astype(np.int32), "mask": mask_BxT}


def _make_step(cfg: models.ModelConfig, tx: optax.GradientTransformation):
    def loss_fn(params, batch):
        out = models.apply(params, batch["tokens"], cfg, attention_mask_BxT=batch["mask"])
        logp_BxT1 = models.token_logprobs(out.logits[:, :-1], batch["tokens"][:, 1:])
        weights_BxT1 = batch["mask"][:, 1:].astype(jnp.float32)
        nll = -jnp.sum(logp_BxT1 * weights_BxT1) / jnp.sum(weights_BxT1)
        # Regression terms on the (zero-initialised) scalar heads so that they get gradients too.
        aux = (0.1 * jnp.mean((out.reward - 1.0) ** 2)
               + 0.1 * jnp.sum(batch["mask"] * (out.values - 0.5) ** 2) / jnp.sum(batch["mask"]))
        return nll + aux, out

    def train_step(params, opt_state, batch):
        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, out, grads

    return train_step


def _mesh_axes_used(spec: P) -> set[str]:
    used: set[str] = set()
    for entry in spec:
        if entry is not None:
            used.update((entry,) if isinstance(entry, str) else entry)
    return used


# AdamW's first update is lr * g / (|g| + eps): for a gradient entry of size ~eps it turns a
# difference in summation order of ~1e-11 into ~lr / (4 eps) times that in the parameter. With
# lr=1e-2 and the default eps=1e-8 one entry in 2048 differed by 1.2e-5 although every gradient
# agreed to 2e-8; lr=1e-3, eps=1e-6 keeps the comparison about sharding, not that amplification.
OPTIMIZERS = {
    "adamw": optax.adamw(1e-3, eps=1e-6, weight_decay=0.1),
    "sgd": optax.sgd(0.1, momentum=0.9),
}


@pytest.mark.parametrize("family, optimizer", [("llama", "adamw"), ("gpt2", "sgd")])
def test_sharded_forward_and_train_step_match_single_device(family, optimizer):
    cfg = _config(family)
    tx = OPTIMIZERS[optimizer]
    batch = _padded_batch(cfg.vocab_size)
    init_fn = functools.partial(models.init_params, cfg)
    train_step = _make_step(cfg, tx)

    # Single device: the plain code path, no mesh and no logical-axis rules.
    ref_params = jax.jit(init_fn)(jax.random.key(0))
    ref_step = jax.jit(train_step)(ref_params, tx.init(ref_params), batch)

    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    params = sh.sharded_init(init_fn, jax.random.key(0), mesh, models.param_logical_axes(cfg))
    p_shardings = jax.tree.map(lambda a: a.sharding, params)
    opt_state = sh.sharded_optimizer_init(tx, params, mesh)
    o_shardings = jax.tree.map(lambda a: a.sharding, opt_state)
    data = sh.shard_batch(batch, mesh)
    d_shardings = jax.tree.map(lambda a: a.sharding, data)
    out_shardings = models.ModelOutput(
        logits=sh.batch_sharding(mesh, 3), hidden=sh.batch_sharding(mesh, 3),
        reward=sh.batch_sharding(mesh, 1), values=sh.batch_sharding(mesh, 2))
    with sh.axis_rules(mesh):
        step = jax.jit(
            train_step,
            in_shardings=(p_shardings, o_shardings, d_shardings),
            out_shardings=(p_shardings, o_shardings, sh.replicated(mesh), out_shardings,
                           p_shardings),
        )
        new_params, new_opt_state, loss, out, grads = step(params, opt_state, data)

    # The layout is really split: some parameter over "tensor", some over "fsdp".
    specs = {jax.tree_util.keystr(k): a.sharding.spec
             for k, a in jax.tree_util.tree_flatten_with_path(new_params)[0]}
    assert any("tensor" in _mesh_axes_used(s) for s in specs.values()), specs
    assert any("fsdp" in _mesh_axes_used(s) for s in specs.values()), specs
    q = new_params["layers"]["attn"]["q_kernel"]   # stacked: (layers, d, heads, head_dim)
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert {s.data.shape for s in q.addressable_shards} == {(q.shape[0], 16, 2, 8)}
    if family == "llama":
        k = new_params["layers"]["attn"]["k_kernel"]  # one KV head: replicated on that dim
        assert k.sharding.spec == P(None, "fsdp", None, None)
    assert out.logits.sharding.spec == P(("data", "fsdp"), None, None)

    ref_new_params, ref_opt_state, ref_loss, ref_out, ref_grads = ref_step
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=TOL, atol=TOL)
    for name in ("logits", "hidden", "reward", "values"):
        np.testing.assert_allclose(np.asarray(getattr(out, name)),
                                   np.asarray(getattr(ref_out, name)), rtol=TOL, atol=TOL,
                                   err_msg=name)
    for tree, ref_tree in ((grads, ref_grads), (new_params, ref_new_params),
                           (new_opt_state, ref_opt_state)):
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                                jax.tree.leaves(ref_tree)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL,
                                       err_msg=jax.tree_util.keystr(path))
    # The step moved every parameter, so equal results are not equal by inaction. Except the key
    # bias: q.(k + b) shifts all of a query's scores by q.b, which softmax ignores, so its
    # gradient is zero in exact arithmetic (~1e-13 here).
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(new_params)[0],
                            jax.tree.leaves(ref_params)):
        name = jax.tree_util.keystr(path)
        if "k_bias" not in name:
            assert not np.allclose(np.asarray(a), np.asarray(b)), name
