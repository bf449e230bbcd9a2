"""Tests for infalign_jax.infra.sharding on the 8 fake CPU devices set up in conftest.py."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from infalign_jax.infra import sharding as sh


@pytest.fixture(scope="module")
def mesh222():
    return sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))


def _shard_shapes(x: jax.Array) -> set[tuple[int, ...]]:
    return {s.data.shape for s in x.addressable_shards}


# ---------------------------------------------------------------- mesh building and errors


def test_mesh_config_validation_names_the_field():
    with pytest.raises(ValueError, match="MeshConfig.fsdp"):
        sh.MeshConfig(data=1, fsdp=0, tensor=1)
    with pytest.raises(ValueError, match="MeshConfig.tensor"):
        sh.MeshConfig(tensor=-2)
    with pytest.raises(ValueError, match="MeshConfig.data"):
        sh.MeshConfig(data=True)
    with pytest.raises(ValueError, match="MeshConfig.data"):
        sh.MeshConfig(data="2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most one axis"):
        sh.MeshConfig(data=-1, fsdp=-1)


def test_make_mesh_shapes_names_and_auto_axes(mesh222):
    assert mesh222.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh222.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh222.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh222.devices.flat) == list(range(8))
    # -1 fills with whatever devices are left.
    assert dict(sh.make_mesh(sh.MeshConfig(data=-1, fsdp=1, tensor=2)).shape) == {
        "data": 4, "fsdp": 1, "tensor": 2}
    assert dict(sh.make_mesh(sh.MeshConfig(data=1, fsdp=-1, tensor=1)).shape)["fsdp"] == 8
    sub = sh.make_mesh(sh.MeshConfig(data=1, fsdp=2, tensor=2), devices=jax.devices()[:4])
    assert sorted(d.id for d in sub.devices.flat) == [0, 1, 2, 3]


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="multiply to 12 but there are 8 devices"):
        sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=3))
    with pytest.raises(ValueError, match="cannot fill axis 'data'"):
        sh.make_mesh(sh.MeshConfig(data=-1, fsdp=3, tensor=1))
    with pytest.raises(ValueError, match="devices. is empty"):
        sh.make_mesh(sh.MeshConfig(), devices=[])


def test_mesh_config_from_dict_and_config_dict():
    cfg = sh.mesh_config_from_dict(ml_collections.ConfigDict({"data": 2, "fsdp": -1, "tensor": 2}))
    assert cfg == sh.MeshConfig(data=2, fsdp=-1, tensor=2)
    assert dict(sh.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}).shape)["fsdp"] == 4
    with pytest.raises(ValueError, match=r"unknown keys \['model'\]"):
        sh.mesh_config_from_dict({"data": 2, "model": 4})
    with pytest.raises(ValueError, match="MeshConfig.tensor"):
        sh.mesh_config_from_dict({"tensor": 0})


# ---------------------------------------------------------------- logical -> mesh rules


@pytest.mark.parametrize(
    "names, shape, expected",
    [
        (("embed", "mlp"), (64, 32), P("fsdp", "tensor")),
        (("mlp", "embed"), (32, 64), P("tensor", "fsdp")),
        (("vocab", "embed"), (100, 16), P("tensor", "fsdp")),
        (("embed", "q_heads", "head_dim"), (16, 4, 8), P("fsdp", "tensor", None)),
        # One KV head cannot be split over tensor=2: replicated instead.
        (("embed", "kv_heads", "head_dim"), (16, 1, 8), P("fsdp", None, None)),
        # Odd vocabulary and odd embed: both replicated.
        (("vocab", "embed"), (101, 15), P(None, None)),
        (("norm",), (16,), P(None)),
        ((None, "mlp"), (3, 8), P(None, "tensor")),
        ((), (), P()),
        (None, (4, 4), P()),
        # Batch over data*fsdp = 4; a batch of 2 falls back to the prefix ("data",), 3 to none.
        (("batch", "length", "act_embed"), (8, 5, 16), P(("data", "fsdp"), None, None)),
        (("batch", "length"), (2, 5), P("data", None)),
        (("batch", "length"), (3, 5), P(None, None)),
        (("batch", "length", "act_vocab"), (4, 5, 100), P(("data", "fsdp"), None, "tensor")),
    ],
)
def test_default_rules_mapping(mesh222, names, shape, expected):
    assert sh.logical_to_mesh_spec(names, shape, mesh222) == expected


def test_no_mesh_axis_used_twice(mesh222):
    # "embed" and "mlp" both ask for fsdp: the earlier rule wins, the other dim is replicated.
    rules = (("embed", "fsdp"), ("mlp", "fsdp"), ("batch", ("data", "fsdp")))
    assert sh.logical_to_mesh_spec(("mlp", "embed"), (8, 8), mesh222, rules) == P(None, "fsdp")
    # A multi-axis rule whose tail is taken falls back to its free prefix.
    rules = (("embed", "fsdp"), ("batch", ("data", "fsdp")))
    assert sh.logical_to_mesh_spec(("batch", "embed"), (8, 8), mesh222, rules) == P("data", "fsdp")
    # A later alternative rule for the same name applies when the first cannot.
    rules = (("embed", "tensor"), ("mlp", "tensor"), ("mlp", "fsdp"))
    assert sh.logical_to_mesh_spec(("embed", "mlp"), (8, 8), mesh222, rules) == P("tensor", "fsdp")


def test_mapping_properties_by_enumeration():
    """Over all small shapes on a (1, 2, 4) mesh: axes used once, every split divides its dim."""
    mesh = sh.make_mesh(sh.MeshConfig(data=1, fsdp=2, tensor=4))
    names_list = [("vocab", "embed"), ("embed", "mlp"), ("batch", "length", "act_heads"),
                  ("embed", "kv_heads", "head_dim")]
    for names in names_list:
        for shape in itertools.product(range(1, 9), repeat=len(names)):
            spec = sh.logical_to_mesh_spec(names, shape, mesh)
            used = []
            for dim, entry in zip(shape, spec):
                axes = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
                used += list(axes)
                assert dim % int(np.prod([mesh.shape[a] for a in axes])) == 0
            assert len(used) == len(set(used)), (names, shape, spec)
            # Each split must actually be honoured by device_put-style validation.
            NamedSharding(mesh, spec).shard_shape(shape)


def test_mapping_errors(mesh222):
    with pytest.raises(ValueError, match="'embd' .* has no rule"):
        sh.logical_to_mesh_spec(("embd", "mlp"), (4, 4), mesh222)
    with pytest.raises(ValueError, match="has 2 names but the array has shape \\(4,\\)"):
        sh.logical_to_mesh_spec(("embed", "mlp"), (4,), mesh222)
    with pytest.raises(ValueError, match="occurs twice"):
        sh.logical_to_mesh_spec(("embed", "embed"), (4, 4), mesh222)
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        sh.logical_to_shardings({"w": P("embed")}, {"w": jnp.zeros(4)}, mesh222,
                                (("embed", "model"),))
    with pytest.raises(ValueError, match=r"parameter \['b'\]\['w'\]: .*'bogus'"):
        sh.logical_to_shardings({"a": P("embed"), "b": {"w": P("bogus")}},
                                {"a": jnp.zeros(4), "b": {"w": jnp.zeros(4)}}, mesh222)
    with pytest.raises(ValueError, match=r"only in specs: \[\], only in shapes: \[.\['b'\].\]"):
        sh.logical_to_shardings({"a": P("embed")}, {"a": jnp.zeros(4), "b": jnp.zeros(4)},
                                mesh222)


def test_logical_to_shardings_tree(mesh222):
    specs = {"emb": P("vocab", "embed"), "ln": P("norm"), "kv": ("embed", "kv_heads"), "s": None}
    shapes = {"emb": jax.ShapeDtypeStruct((10, 8), jnp.float32),
              "ln": jax.ShapeDtypeStruct((8,), jnp.float32),
              "kv": jnp.zeros((8, 1)), "s": jax.ShapeDtypeStruct((), jnp.float32)}
    out = sh.logical_to_shardings(specs, shapes, mesh222)
    assert out["emb"] == NamedSharding(mesh222, P("tensor", "fsdp"))
    assert out["ln"].spec == P(None)
    assert out["kv"].spec == P("fsdp", None)
    assert out["s"].spec == P()


# ---------------------------------------------------------------- sharded init


def _init_fn(rng):
    k1, k2, k3 = jax.random.split(rng, 3)
    return {"w_in": jax.random.normal(k1, (64, 32)),
            "w_kv": jax.random.normal(k2, (64, 1, 8)),
            "emb": jax.random.normal(k3, (96, 64)),
            "scale": jnp.ones((64,))}


_INIT_SPECS = {"w_in": P("embed", "mlp"), "w_kv": P("embed", "kv_heads", "head_dim"),
               "emb": P("vocab", "embed"), "scale": P("norm")}


def test_sharded_init_shard_shapes_and_values(mesh222):
    params = sh.sharded_init(_init_fn, jax.random.key(0), mesh222, _INIT_SPECS)
    assert params["w_in"].sharding.spec == P("fsdp", "tensor")
    assert _shard_shapes(params["w_in"]) == {(32, 16)}
    assert _shard_shapes(params["w_kv"]) == {(32, 1, 8)}
    assert _shard_shapes(params["emb"]) == {(48, 32)}
    assert _shard_shapes(params["scale"]) == {(64,)}
    assert len(params["w_in"].addressable_shards) == 8
    abstract = sh.sharded_abstract(_init_fn, jax.random.key(0), mesh222, _INIT_SPECS)
    for name, leaf in params.items():
        assert abstract[name].shape == leaf.shape and abstract[name].sharding == leaf.sharding
    reference = jax.jit(_init_fn)(jax.random.key(0))
    for name in reference:
        np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(reference[name]))


def test_sharded_init_reads_flax_boxes(mesh222):
    model = _MLP()
    x = jnp.zeros((4, 16))
    params = sh.sharded_init(lambda r: model.init(r, x), jax.random.key(1), mesh222)
    kernel_in = params["params"]["Dense_0"]["kernel"]
    assert not isinstance(kernel_in, nn.Partitioned)
    assert kernel_in.sharding.spec == P("fsdp", "tensor")
    assert _shard_shapes(kernel_in) == {(8, 16)}
    assert params["params"]["Dense_1"]["kernel"].sharding.spec == P("tensor", "fsdp")


# ---------------------------------------------------------------- data helpers and axis rules


def test_shard_batch(mesh222):
    tokens = np.arange(8 * 5).reshape(8, 5)
    batch = {"tokens": tokens, "mask": np.ones((8, 5), bool), "temp": np.float32(0.5)}
    out = sh.shard_batch(batch, mesh222)
    assert out["tokens"].sharding == sh.batch_sharding(mesh222, 2)
    assert out["tokens"].sharding.spec == P(("data", "fsdp"), None)
    assert _shard_shapes(out["tokens"]) == {(2, 5)}
    np.testing.assert_array_equal(np.asarray(out["tokens"]), tokens)
    assert out["temp"].sharding == sh.replicated(mesh222)
    with pytest.raises(ValueError, match=r"\['tokens'\] has 6 global rows.*pad the batch"):
        sh.shard_batch({"tokens": np.zeros((6, 5))}, mesh222)
    with pytest.raises(ValueError, match="ndim must be >= 1"):
        sh.batch_sharding(mesh222, 0)


def test_axis_rules_makes_logical_constraints_take_effect(mesh222):
    def f(x_BxF):
        return nn.with_logical_constraint(x_BxF * 2.0, ("batch", "act_mlp"))

    x = jnp.ones((8, 4))
    with sh.axis_rules(mesh222):
        y = jax.jit(f)(x)
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")
    # Without the context the constraint is a no-op and nothing is split.
    assert jax.jit(f)(x).sharding.is_fully_replicated


# ---------------------------------------------------------------- sharded step == single device


class _MLP(nn.Module):
    hidden: int = 32
    out: int = 8

    @nn.compact
    def __call__(self, x_BxD):
        h_BxH = nn.Dense(self.hidden, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")))(x_BxD)
        h_BxH = nn.with_logical_constraint(nn.gelu(h_BxH), ("batch", "act_mlp"))
        y_BxO = nn.Dense(self.out, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("mlp", "embed")))(h_BxH)
        return nn.with_logical_constraint(y_BxO, ("batch", "act_embed"))


def test_sharded_mlp_forward_and_sgd_step_match_single_device(mesh222):
    model = _MLP()
    tx = optax.sgd(0.1)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, 16)).astype(np.float32),
             "y": rng.normal(size=(8, 8)).astype(np.float32)}

    def init(key):
        return model.init(key, jnp.zeros((1, 16)))

    def train_step(params, batch):
        def loss_fn(p):
            pred_BxO = model.apply(p, batch["x"])
            return jnp.mean((pred_BxO - batch["y"]) ** 2), pred_BxO

        (loss, pred), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), loss, pred

    # Single device: no mesh, no rules, everything on device 0.
    ref_params = jax.jit(lambda k: nn.unbox(init(k)))(jax.random.key(0))
    ref_new, ref_loss, ref_pred = jax.jit(train_step)(ref_params, batch)

    params = sh.sharded_init(init, jax.random.key(0), mesh222)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    data = sh.shard_batch(batch, mesh222)
    data_shardings = jax.tree.map(lambda a: a.sharding, data)
    with sh.axis_rules(mesh222):
        step = jax.jit(
            train_step,
            in_shardings=(param_shardings, data_shardings),
            out_shardings=(param_shardings, sh.replicated(mesh222), sh.batch_sharding(mesh222, 2)),
        )
        new, loss, pred = step(params, data)

    assert pred.sharding.spec == P(("data", "fsdp"), None)
    kernel = new["params"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor") and _shard_shapes(kernel) == {(8, 16)}
    np.testing.assert_allclose(np.asarray(pred), np.asarray(ref_pred), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref_new)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # The step must have moved the parameters, or the comparison above says little.
    kernel_before = ref_params["params"]["Dense_0"]["kernel"]
    assert not np.allclose(np.asarray(kernel), np.asarray(kernel_before))


def test_sharded_optimizer_init_follows_params(mesh222):
    params = sh.sharded_init(_init_fn, jax.random.key(0), mesh222, _INIT_SPECS)
    tx = optax.adamw(1e-3)
    state = sh.sharded_optimizer_init(tx, params, mesh222)
    adam = state[0]
    for name, p in params.items():
        assert adam.mu[name].sharding == p.sharding and adam.nu[name].sharding == p.sharding
        np.testing.assert_array_equal(np.asarray(adam.mu[name]), np.zeros(p.shape))
    assert adam.count.sharding == sh.replicated(mesh222)


@pytest.mark.parametrize("make_tx", [
    lambda mask: optax.masked(optax.adam(1e-2), mask),
    lambda mask: optax.adamw(1e-2, weight_decay=0.1, mask=mask),
    lambda mask: optax.multi_transform(
        {"adam": optax.adam(1e-2), "sgd": optax.sgd(1e-1)},
        jax.tree.map(lambda m: "adam" if m else "sgd", mask)),
], ids=["masked", "adamw-mask", "multi_transform"])
def test_sharded_optimizer_init_takes_masked_states(mesh222, make_tx):
    """Optimizers whose state holds a masked copy of the parameters (`MaskedNode` where the mask
    is False: `masked`, `multi_transform`) failed with a pytree structure error; their moments
    take the parameters' shardings, and a jitted update on the mesh equals the unsharded one.
    (`adamw(mask=)` masks only the decay, which has no state: it worked before too.)"""
    params = sh.sharded_init(_init_fn, jax.random.key(0), mesh222, _INIT_SPECS)
    names = sorted(params)
    mask = {name: i % 2 == 0 for i, name in enumerate(names)}
    assert any(mask.values()) and not all(mask.values())
    tx = make_tx(mask)
    state = sh.sharded_optimizer_init(tx, params, mesh222)
    host = jax.tree.map(np.asarray, params)
    want = tx.init(host)
    assert jax.tree.structure(state) == jax.tree.structure(want)
    # every moment of a parameter lies like the parameter; the rest is replicated
    leaves = jax.tree_util.tree_leaves_with_path(state)
    moments = [(path, leaf) for path, leaf in leaves
               if any(getattr(k, "key", None) in params for k in path)]
    assert moments and len(moments) < len(leaves)   # Adam's count is not a moment
    for path, leaf in leaves:
        name = next((k.key for k in path if getattr(k, "key", None) in params), None)
        wanted = params[name].sharding if name is not None else sh.replicated(mesh222)
        assert leaf.sharding == wanted, jax.tree_util.keystr(path)
    grads = jax.tree.map(lambda p: jnp.cos(p) * 0.3, params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    updates_host, _ = tx.update(jax.tree.map(np.asarray, grads), want, host)
    for name in names:
        np.testing.assert_allclose(np.asarray(updates[name]), np.asarray(updates_host[name]),
                                   rtol=1e-6, atol=1e-7)


def test_divisibility_fallbacks_are_reported_once(mesh222, caplog):
    """A dimension the mesh cannot split is held whole on each device: logged, with its arrays
    and their size; a dimension skipped because its axes are taken, or split by a later rule for
    its name, is not."""
    sh._REPORTED.clear()
    specs = {"k": P("embed", "kv_heads", "head_dim"), "q": P("embed", "q_heads", "head_dim"),
             "v": P("embed", "kv_heads", "head_dim")}
    shapes = {"k": jax.ShapeDtypeStruct((16, 1, 8), jnp.float32),
              "q": jax.ShapeDtypeStruct((16, 4, 8), jnp.float32),
              "v": jax.ShapeDtypeStruct((16, 1, 8), jnp.bfloat16)}
    with caplog.at_level("WARNING", logger=sh.__name__):
        sh.logical_to_shardings(specs, shapes, mesh222)
        sh.logical_to_shardings(specs, shapes, mesh222)  # the same report is not repeated
    reports = [r.getMessage() for r in caplog.records]
    assert len(reports) == 1, reports
    (line,) = [ln for ln in reports[0].splitlines() if "kv_heads" in ln]
    assert "size 1 is not divisible by tensor=2: 2 arrays" in line
    assert f"({(16 * 8 * 4 + 16 * 8 * 2) / 2**20:.1f} MiB)" in line
    assert "['k']" in line and "['v']" in line and "q_heads" not in reports[0]
    # a batch-like dimension "split" over data=1 only (fsdp=4 does not divide it) is whole too
    caplog.clear()
    mesh14 = sh.make_mesh(sh.MeshConfig(data=1, fsdp=4, tensor=2))
    with caplog.at_level("WARNING", logger=sh.__name__):
        out = sh.ensemble_shardings({"e": jax.ShapeDtypeStruct((2, 3), jnp.float32)}, mesh14)
    assert out["e"].spec == P("data", None)
    assert "'ensemble' of size 2 is not divisible by fsdp=4: 1 arrays" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=sh.__name__):
        # taken axes (the by-design skip) and a later rule that splits: no report
        rules = (("embed", "fsdp"), ("mlp", "fsdp"), ("mlp", "tensor"), ("batch", "data"))
        out = sh.logical_to_shardings({"w": P("embed", "mlp")},
                                      {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32)},
                                      mesh222, rules)
        assert out["w"].spec == P("fsdp", "tensor")
        rules = (("embed", "fsdp"), ("mlp", "fsdp"), ("batch", "data"))
        sh.logical_to_shardings({"w": P("embed", "mlp")},
                                {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32)}, mesh222, rules)
    assert not caplog.records


# ---------------------------------------------------------------- checks, reports and layouts


def test_mesh_config_rollout_layout_is_checked_and_read_from_a_dict():
    layouts = r"\['serve', 'train'\]"
    with pytest.raises(ValueError, match=r"config.mesh.rollout must be one of " + layouts):
        sh.MeshConfig(rollout="decode")
    assert sh.mesh_config_from_dict({"data": 2, "fsdp": 4, "rollout": "serve"}) == \
        sh.MeshConfig(data=2, fsdp=4, tensor=1, rollout="serve")
    with pytest.raises(ValueError, match="mesh config must be a mapping or ConfigDict, got list"):
        sh.mesh_config_from_dict([("data", 2)])
    with pytest.raises(ValueError, match=r"rollout layout 'decode' is not one of " + layouts):
        sh.rollout_rules("decode")


def test_malformed_rules_are_refused_by_name(mesh222):
    for rules in ((("embed",),), ((3, "fsdp"),), (("embed", "fsdp", "tensor"),)):
        with pytest.raises(ValueError, match=r"each rule must be \(logical_name, mesh_axes\)"):
            sh.logical_to_shardings({"w": P("embed")}, {"w": jnp.zeros(4)}, mesh222, rules)
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        with sh.axis_rules(mesh222, (("embed", "model"),)):
            pass


def test_the_first_rule_that_splits_a_name_wins_over_later_ones(mesh222):
    rules = (("mlp", "tensor"), ("mlp", "fsdp"))
    assert sh.logical_to_mesh_spec(("mlp",), (8,), mesh222, rules) == P("tensor")
    assert sh.logical_to_mesh_spec(("embed", "mlp"), (8, 8), mesh222,
                                   (("embed", "fsdp"),) + rules) == P("fsdp", "tensor")


def test_ensemble_shardings_split_the_member_axis_and_replicate_scalars(mesh222):
    tree = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
    out = sh.ensemble_shardings(tree, mesh222)
    assert out["w"].spec == P(("data", "fsdp"), None)
    assert out["step"].spec == P() and out["step"].mesh == mesh222


def test_fallback_report_sizes_the_arrays_by_dtype_and_lists_three_paths(mesh222, caplog):
    sh._REPORTED.clear()
    shape = (16, 1, 65536)   # 1 KV head over tensor=2: held whole
    specs = {k: P("embed", "kv_heads", "head_dim") for k in "abcd"}
    shapes = {"a": jax.ShapeDtypeStruct(shape, jnp.float32),
              "b": jax.ShapeDtypeStruct(shape, jnp.float32),
              "c": jax.ShapeDtypeStruct(shape, jnp.bfloat16),
              "d": jax.ShapeDtypeStruct(shape, jnp.bfloat16)}
    with caplog.at_level("WARNING", logger=sh.__name__):
        sh.logical_to_shardings(specs, shapes, mesh222)
    (line,) = [ln for ln in caplog.text.splitlines() if "kv_heads" in ln]
    # 2 x 4 MiB (f32) + 2 x 2 MiB (bf16)
    assert "4 arrays (12.0 MiB) replicated along that dimension (['a'], ['b'], ['c'], ...)" in line


def test_no_mesh_leaves_the_mesh_inside_axis_rules(mesh222):
    def f(x_BxF):
        return nn.with_logical_constraint(x_BxF * 2.0, ("batch", "act_mlp"))

    with sh.axis_rules(mesh222):
        with sh.no_mesh():
            y = jax.jit(f)(jnp.ones((8, 4)))
        inside = jax.jit(f)(jnp.ones((8, 4)))
    assert len(y.sharding.device_set) == 1
    assert inside.sharding.spec == P(("data", "fsdp"), "tensor")


def test_rollout_resharder_serve_splits_over_tensor_only_and_train_is_the_identity(mesh222):
    specs = {"w": P("embed", "mlp"), "emb": P("vocab", "embed"), "ln": P("norm")}
    shapes = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32),
              "emb": jax.ShapeDtypeStruct((32, 8), jnp.float32),
              "ln": jax.ShapeDtypeStruct((8,), jnp.float32)}
    params = sh.sharded_init(lambda _: {k: jnp.ones(s.shape) for k, s in shapes.items()},
                             jax.random.key(0), mesh222, specs)
    assert params["w"].sharding.spec == P("fsdp", "tensor")   # the training layout
    train = sh.rollout_resharder("train", specs, mesh222)
    assert train(params) is params
    served = jax.jit(sh.rollout_resharder("serve", specs, mesh222))(params)
    for name, spec in (("w", P(None, "tensor")), ("emb", P("tensor", None)), ("ln", P(None))):
        ndim = len(shapes[name].shape)
        assert served[name].sharding.is_equivalent_to(NamedSharding(mesh222, spec), ndim), \
            (name, served[name].sharding)
        np.testing.assert_array_equal(np.asarray(served[name]), np.ones(shapes[name].shape))
