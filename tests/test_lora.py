"""LoRA (`models.lora`) and the CTRL step on adapters (`config.rl.lora`): the merge against numpy,
the adapter gradient against the chain rule through the full-parameter gradient, what trains and
what stays frozen, the optimiser state's size."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infalign_jax import models, rl
from infalign_jax.models import lora
from infalign_jax.rl import step as rl_step
from infalign_jax.rl.tasks import exact as et

LORA = {"rank": 4, "alpha": 8.0}


def _task():
    return et.make_task(0, vocab=4, length=3, d_model=32)


def _setup(lora_kw=LORA, learning_rate=1e-2):
    task = _task()
    cfg = rl.RLConfig(beta=0.2, transform="exp", transform_params={"t": 2.0},
                      samples_per_prompt=4, max_new_tokens=3, learning_rate=learning_rate,
                      lora=dict(lora_kw))
    # any sorted reference rewards will do here (the calibration is not under test)
    table = np.sort(np.random.default_rng(1).uniform(0, 1, (2, 64)), axis=1).astype(np.float32)
    frozen = rl.Frozen(task.ref_params, jnp.asarray(task.rewards_XxY), jnp.asarray(table),
                       jnp.full((2,), 64, jnp.int32))
    batch = {"prompt_BxP": jnp.asarray(task.prompts_XxP),
             "prompt_mask_BxP": jnp.ones(task.prompts_XxP.shape, bool),
             "prompt_idx_B": jnp.arange(2)}
    return task, cfg, frozen, batch


def _random_adapters(cfg, params, seed=0):
    """Adapters with B != 0 too (B = 0 at init would hide half of the merge and the gradient)."""
    adapters = lora.init_adapters(cfg, params, jax.random.key(seed))
    return {name: {"a": ad["a"], "b": 0.3 * jax.random.normal(jax.random.key(seed + 1 + i),
                                                                 ad["b"].shape)}
            for i, (name, ad) in enumerate(adapters.items())}


def _kernel_matrix(w: np.ndarray, n_in: int) -> np.ndarray:
    """A layer-stacked kernel as (L, d_in, d_out) in numpy."""
    return w.reshape(w.shape[0], int(np.prod(w.shape[1:1 + n_in])), -1)


def test_merge_at_init_is_the_base_exactly_and_only_targets_change():
    task = _task()
    cfg = lora.LoraConfig(**LORA)
    adapters = lora.init_adapters(cfg, task.ref_params, jax.random.key(0))
    assert set(adapters) == {"q", "k", "v", "o", "gate", "up", "down"}   # every kernel there
    for a, b in zip(jax.tree.leaves(lora.merge(task.ref_params, adapters, cfg)),
                    jax.tree.leaves(task.ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A is fan-in scaled Gaussian: std ~ 1/sqrt(d_in)
    a_q = np.asarray(adapters["q"]["a"])
    assert abs(a_q.std() * np.sqrt(a_q.shape[1]) - 1.0) < 0.15
    only_q = lora.LoraConfig(rank=2, targets=("q",))
    assert set(lora.init_adapters(only_q, task.ref_params, jax.random.key(0))) == {"q"}


def test_merge_equals_numpy_w_plus_scaled_a_b():
    task = _task()
    cfg = lora.LoraConfig(**LORA)
    adapters = _random_adapters(cfg, task.ref_params)
    merged = lora.merge(task.ref_params, adapters, cfg)
    base_layers, got_layers = task.ref_params["layers"], merged["layers"]
    for name, ((block, leaf), n_in) in lora.TARGETS.items():
        if name not in adapters:
            continue
        w = np.asarray(base_layers[block][leaf], np.float64)
        a, b = (np.asarray(adapters[name][k], np.float64) for k in ("a", "b"))
        want = _kernel_matrix(w, n_in) + (LORA["alpha"] / LORA["rank"]) * np.stack(
            [a[i] @ b[i] for i in range(w.shape[0])])
        np.testing.assert_allclose(_kernel_matrix(np.asarray(got_layers[block][leaf]), n_in),
                                   want, atol=1e-5, err_msg=name)
    # every other leaf is the base's own array
    assert merged["embed"] is task.ref_params["embed"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attached_adapters_give_the_merged_models_outputs(family):
    """`attach` (factors applied inside each layer) is the same function as `merge`: full forward,
    prefill and decode through the two-part cache, and the shared-prompt hidden states agree with
    the merged parameters', for every target of both families (gpt2: fc instead of gate/up)."""
    cfg = models.ModelConfig(family=family, vocab_size=32, d_model=16, n_layers=2, n_heads=2,
                             n_kv_heads=2 if family == "gpt2" else 1, head_dim=8, d_ff=24,
                             activation="gelu" if family == "gpt2" else "silu", max_len=32)
    params = models.init_params(cfg, jax.random.key(0))
    lcfg = lora.LoraConfig(**LORA)
    adapters = _random_adapters(lcfg, params, seed=7)
    merged, attached = lora.merge(params, adapters, lcfg), lora.attach(params, adapters, lcfg)
    assert set(attached["lora"]["layers"]["mlp"]) == (
        {"fc_kernel_a", "fc_kernel_b", "down_kernel_a", "down_kernel_b"} if family == "gpt2" else
        {f"{k}_kernel_{f}" for k in ("gate", "up", "down") for f in "ab"})
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    want = models.apply(merged, tokens, cfg).logits
    got = models.apply(attached, tokens, cfg).logits
    base = models.apply(params, tokens, cfg).logits
    assert float(jnp.abs(want - base).max()) > 1e-2   # the adapters change the function
    np.testing.assert_allclose(got, want, atol=1e-5)
    (lw, cw), (lg, cg) = (models.prefill(p, tokens[:, :5], cfg, max_new_tokens=4, n=2)
                          for p in (merged, attached))
    np.testing.assert_allclose(lg, lw, atol=1e-5)
    for t in range(5, 9):
        rows = jnp.repeat(tokens[:, t], 2)
        (lw, cw), (lg, cg) = (models.decode_step(p, rows, cfg, c)
                              for p, c in ((merged, cw), (attached, cg)))
        np.testing.assert_allclose(lg, lw, atol=1e-5)
    mask = jnp.ones((2, 5), bool)
    resp = jnp.repeat(tokens[:, 5:], 2, axis=0)
    np.testing.assert_allclose(models.shared_prompt_hidden(attached, tokens[:, :5], mask, resp, cfg),
                               models.shared_prompt_hidden(merged, tokens[:, :5], mask, resp, cfg),
                               atol=1e-5)
    with pytest.raises(ValueError, match=r"lora.attach: unknown adapter targets \['qkv'\]"):
        lora.attach(params, {"qkv": adapters["q"]}, lcfg)
    if family == "gpt2":
        with pytest.raises(ValueError, match=r"lora.attach: the base parameters have no 'gate'"):
            lora.attach(params, {"gate": adapters["fc"]}, lcfg)


def test_config_refuses_unknown_and_missing_targets():
    with pytest.raises(ValueError, match=r"config.rl.lora.targets must be a subset"):
        rl.RLConfig(lora={"rank": 2, "targets": ("qkv",)})
    with pytest.raises(ValueError, match=r"config.rl.lora: unknown keys \['rnak'\]"):
        rl.RLConfig(lora={"rnak": 2})
    with pytest.raises(ValueError, match=r"config.rl.lora.rank must be"):
        rl.RLConfig(lora={"rank": -1})
    # a string was read as its characters ("up": ['u', 'p'] unknown; "o" worked by luck)
    for targets in ("up", "o"):
        with pytest.raises(ValueError, match=r"config.rl.lora.targets must be a list of names "
                                             r".*not a string"):
            rl.RLConfig(lora={"rank": 2, "targets": targets})
    with pytest.raises(ValueError, match=r"config.rl.lora.targets must be a list without repeats"):
        rl.RLConfig(lora={"rank": 2, "targets": ("q", "q")})
    gpt2 = models.ModelConfig(family="gpt2", vocab_size=16, d_model=16, n_layers=1, n_heads=2,
                              n_kv_heads=2, head_dim=8, d_ff=32, activation="gelu")
    params = models.init_params(gpt2, jax.random.key(0))
    assert lora.target_names(lora.LoraConfig(rank=2), params) == ("q", "k", "v", "o", "fc",
                                                                  "down")
    with pytest.raises(ValueError, match=r"config.rl.lora.targets: \['gate'\] not in this model"):
        lora.target_names(lora.LoraConfig(rank=2, targets=("q", "gate")), params)


def _phases(cfg, task, fns, frozen, batch, adapters):
    """One rollout of the LoRA policy, scored, with its advantages (phases 1-4), jitted."""
    def phases(adapters):
        merged = lora.merge(frozen.ref_params, adapters, cfg.lora)
        ro = rl_step.rollout(cfg, fns, merged, batch, jax.random.key(5))
        rewards = rl_step.rollout_rewards(
            functools.partial(et.table_reward_fn, vocab=task.vocab), frozen, ro)
        sc = rl_step.score(cfg, fns, cfg.get_transform(), frozen, ro, rewards)
        state = rl.init_state(adapters, optax.sgd(1.0))
        av, _ = rl_step.advantages(cfg, state, jnp.float32(cfg.beta), ro, sc)
        return merged, ro, sc, av
    return jax.jit(phases)(adapters)


def test_adapter_gradient_is_the_full_gradient_through_the_chain_rule():
    """dL/dA = s G B^T and dL/dB = s A^T G, G = dL/dW the full-parameter gradient at the merged
    weights (computed by jax.grad of the plain, non-LoRA loss), in float64 numpy; and the step's
    own `update` (plain SGD, lr 1) moves exactly those gradients."""
    task, cfg, frozen, batch = _setup()
    adapters = _random_adapters(cfg.lora, task.ref_params, seed=3)
    fns = models.decoder_fns(task.model_cfg)
    merged, ro, sc, av = _phases(cfg, task, fns, frozen, batch, adapters)
    beta = jnp.float32(cfg.beta)
    full = jax.jit(jax.grad(lambda p: rl_step.policy_loss(cfg, fns, p, beta, ro, sc, av)[0]))(
        merged)
    lora_grad = jax.jit(jax.grad(lambda ad: rl_step.policy_loss(
        cfg, fns, rl_step.policy_params(cfg, ad, frozen), beta, ro, sc, av)[0]))(adapters)
    s = LORA["alpha"] / LORA["rank"]
    checked = 0
    for name, ((block, leaf), n_in) in lora.TARGETS.items():
        if name not in adapters:
            continue
        g = _kernel_matrix(np.asarray(full["layers"][block][leaf], np.float64), n_in)
        a, b = (np.asarray(adapters[name][k], np.float64) for k in ("a", "b"))
        want_a = s * np.einsum("lio,lro->lir", g, b)
        want_b = s * np.einsum("lir,lio->lro", a, g)
        scale = np.abs(want_a).max() + np.abs(want_b).max()
        assert scale > 1e-6, name   # not a vacuous comparison
        np.testing.assert_allclose(lora_grad[name]["a"], want_a, atol=1e-4 * scale, err_msg=name)
        np.testing.assert_allclose(lora_grad[name]["b"], want_b, atol=1e-4 * scale, err_msg=name)
        checked += 1
    assert checked == 7
    state = rl.init_state(adapters, optax.sgd(1.0))
    (new, _, _, _), _ = jax.jit(lambda st: rl_step.update(cfg, fns, optax.sgd(1.0), st, beta, ro,
                                                          sc, av, frozen))(state)
    for got, p, g in zip(jax.tree.leaves(new), jax.tree.leaves(adapters),
                         jax.tree.leaves(lora_grad)):
        np.testing.assert_allclose(got, np.asarray(p) - np.asarray(g), atol=1e-6)


def test_lora_step_trains_only_adapters_with_adapter_sized_optimizer_state():
    task, cfg, frozen, batch = _setup()
    opt = rl.make_optimizer(cfg)
    step = rl.make_rl_step(cfg, models.decoder_fns(task.model_cfg),
                           functools.partial(et.table_reward_fn, vocab=task.vocab), opt)
    adapters = lora.init_adapters(cfg.lora, task.ref_params, jax.random.key(0))
    state = rl.init_state(adapters, opt, cfg)
    n_adapter = lora.num_adapter_params(adapters)
    n_full = sum(x.size for x in jax.tree.leaves(task.ref_params))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.size > 1)
    assert moments == 2 * n_adapter < n_full        # Adam's mu and nu, nothing of the base
    frozen_before = jax.tree.map(np.array, frozen)
    jstep = jax.jit(step)
    s1, m1 = jstep(state, frozen, batch, jax.random.key(3))
    s2, m2 = jstep(s1, frozen, batch, jax.random.key(4))
    assert jax.tree.structure(s2.params) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))          # pi_ref is still the base
    assert float(m1["kl_full_vocab"]) == pytest.approx(0.0, abs=1e-6)   # B = 0: pi = pi_ref
    assert float(m2["kl_full_vocab"]) > 1e-6                              # then it moved
    for name in adapters:   # step 1 moves B only (dL/dA = s G B^T = 0 at B = 0), step 2 both
        np.testing.assert_array_equal(s1.params[name]["a"], adapters[name]["a"])
        assert np.abs(np.asarray(s1.params[name]["b"])).max() > 0
        assert not np.array_equal(s2.params[name]["a"], s1.params[name]["a"])
    # the rollout of a LoRA policy needs the base it merges into
    programs = rl.make_rl_programs(cfg, models.decoder_fns(task.model_cfg), opt)
    with pytest.raises(ValueError, match="the rollout needs `frozen`"):
        programs.roll(state, batch, jax.random.key(0))


def test_smollm2_rank8_adapter_and_optimizer_sizes():
    """The adapters of SmolLM2-135M (30 layers, d 576, 9 query / 3 kv heads of 64, MLP 1536,
    tied 49152 x 576 embedding) at rank 8 on every projection, against closed-form counts."""
    cfg = models.ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
                             n_kv_heads=3, head_dim=64, d_ff=1536, max_len=2048)
    shapes = jax.eval_shape(lambda k: models.init_params(cfg, k), jax.random.key(0))
    adapters = lora.adapter_shapes(lora.LoraConfig(rank=8), shapes)
    n = lora.num_adapter_params(adapters)
    r, d, q, kv, f = 8, 576, 9 * 64, 3 * 64, 1536
    per_layer = r * ((d + q) * 2 + (d + kv) * 2 + (d + f) * 3)   # q, o; k, v; gate, up, down
    assert n == 30 * per_layer
    full = sum(x.size for x in jax.tree.leaves(shapes))
    # SmolLM2-135M's 134,515,008 parameters: embedding, 30 x (projections + 2 norms), final norm
    assert full == 49152 * d + 30 * (d * q * 2 + d * kv * 2 + d * f * 3 + 2 * d) + d == 134_515_008
    print(f"SmolLM2-135M rank 8: {n} adapter params ({100 * n / full:.2f}% of {full}); Adam "
          f"moments {2 * n * 4 / 2**20:.1f} MiB vs {2 * full * 4 / 2**20:.1f} MiB full")


def test_runs_recorded_before_lora_resume_as_lora_off():
    """A run's config record without rl.lora.* (written before LoRA existed) is the same run as
    one with LoRA off; with LoRA on it is another run, naming the keys."""
    from infalign_jax.loops import skeleton
    old = {"rl.beta": 0.1}
    off = {**old, "rl.lora.rank": 0, "rl.lora.alpha": 16.0, "rl.lora.targets": []}
    on = {**off, "rl.lora.rank": 8}
    record = skeleton.canonical_record
    assert skeleton.differing_keys(record(old), record(off)) == []
    assert skeleton.differing_keys(record(old), record(on)) == ["rl.lora.alpha", "rl.lora.rank",
                                                                "rl.lora.targets"]
