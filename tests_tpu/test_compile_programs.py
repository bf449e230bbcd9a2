"""The calibration pass, reward-model scoring and the serving layout against the TPU compiler:
a tiny model compiled for v5e:2x2 (4 chips, mesh data=1 x fsdp=4 x tensor=1).

Per-chip argument bytes are checked against closed forms from the shapes (full bytes / 4 for
what FSDP splits, full bytes for what is replicated), not only against `aot.sharded_bytes`.
Collective bytes are read from the compiled HLO (`aot.collective_bytes`), whose counting is
checked on a hand-written module first. Run by `make test-tpu` (.venv-tpu, libtpu).
"""

import dataclasses
import importlib.util
import math
import os
import sys

import jax
import numpy as np
import pytest

if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError("tests_tpu needs libtpu (the tpu-aot extra): run `make test-tpu`, which "
                       "builds .venv-tpu, not the main virtualenv")

from infalign_jax import models  # noqa: E402
from infalign_jax.infra import aot, sharding  # noqa: E402
from infalign_jax.workflows import compile_check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE_SLACK = 32 * 1024   # TPU tiling pads small replicated arrays (the batch, tables, scalars)


def _pod_config(arg, **check):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    try:
        import pod
    finally:
        sys.path.pop(0)
    config = pod.get_config(arg)
    for key, value in check.items():
        setattr(config.check, key, value)
    return config


TINY = "model=tiny,topology=v5e:2x2"


def _param_bytes(cfg, itemsize=2):
    """(bytes of every parameter, bytes of those with an "embed" dimension: the ones FSDP splits),
    from the shapes alone."""
    shapes = jax.eval_shape(lambda r: models.init_params(cfg, r), jax.random.key(0))
    specs = models.param_logical_axes(cfg)
    leaves = jax.tree.leaves(shapes)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, tuple) or x is None)
    assert len(leaves) == len(spec_leaves)
    total = sum(math.prod(x.shape) * itemsize for x in leaves)
    split = sum(math.prod(x.shape) * itemsize for x, s in zip(leaves, spec_leaves)
                if s is not None and "embed" in tuple(s))
    return total, split


def _per_chip(cfg, layout):
    """Closed form of one model's per-chip bf16 parameter bytes on fsdp=4: train splits the
    "embed"-dimensioned weights 4 ways; serve (tensor=1) replicates everything."""
    total, split = _param_bytes(cfg)
    return total - split * 3 / 4 if layout == "train" else total


@pytest.fixture(scope="module")
def checks():
    config = _pod_config(TINY, programs="rl,calibration,reward", layouts="train,serve")
    return {(c.program, c.layout): c for c in compile_check.run(config)}


def test_collective_bytes_counts_loops_at_their_trip_counts():
    """A module with an all-gather (f32[4,256] = 4 KiB) at top level, one in a loop of 18
    iterations, and one in a loop that also stops early (bound 8): 4 + 18 x 4 + 8 x 4 KiB."""
    hlo = """HloModule m

%body (p: (s32[], f32[1,256])) -> (s32[], f32[1,256]) {
  %p = (s32[], f32[1,256]) parameter(0)
  %g = f32[1,256]{1,0} get-tuple-element(%p), index=1
  %ag = f32[4,256]{1,0} all-gather(%g), channel_id=1, dimensions={0}
  ROOT %t = (s32[], f32[1,256]) tuple(%i, %g)
}

%cond (p: (s32[], f32[1,256])) -> pred[] {
  %p = (s32[], f32[1,256]) parameter(0)
  %c = s32[]{:T(128)} constant(18)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%cond2 (p: (s32[], f32[1,256])) -> pred[] {
  %p = (s32[], f32[1,256]) parameter(0)
  %c = s32[] constant(8)
  %i = s32[] get-tuple-element(%p), index=0
  %lt = pred[] compare(%i, %c), direction=LT
  %d = pred[] constant(true)
  ROOT %a = pred[] and(%lt, %d)
}

ENTRY %main (x: f32[1,256]) -> f32[4,256] {
  %x = f32[1,256]{1,0} parameter(0)
  %w = (s32[], f32[1,256]) while(%t0), condition=%cond, body=%body
  %w2 = (s32[], f32[1,256]) while(%t0), condition=%cond2, body=%body
  ROOT %ag = f32[4,256]{1,0} all-gather(%x), channel_id=2, dimensions={0}
}
"""
    c = aot.collective_bytes(hlo)
    kib4 = 4 * 256 * 4
    assert c.total == kib4 * (1 + 18 + 8)
    assert c.decode == 8 * kib4 and c.decode_per_token == kib4
    assert c.ops == 3


def test_calibration_arguments_are_what_the_shardings_imply(checks):
    """pi_ref and the reward model (bf16) split as the layout says, the prompt table (int32 +
    bool, X x P) replicated, the prompt batch (B rows) split 4 ways, a key."""
    config = _pod_config(TINY)
    model_cfg, _, _, work = compile_check.configs(config)
    cc = compile_check.check_config(config)
    rm_cfg = dataclasses.replace(model_cfg, heads=("reward",))
    table = work.num_prompts * work.prompt_len * (4 + 1)
    batch = cc.calibration_prompts * (work.prompt_len * (4 + 1) + 4) / 4
    for layout in ("train", "serve"):
        check = checks[("calibration", layout)]
        closed = _per_chip(model_cfg, layout) + _per_chip(rm_cfg, "train") + table + batch + 8
        assert check.expected_argument_bytes == pytest.approx(closed, abs=64), layout
        reported = check.report.argument_bytes
        assert check.expected_argument_bytes <= reported <= closed + TILE_SLACK, (layout, reported)
    assert "a pass over X=16 prompts x K=8 = 8 calls" in checks[("calibration", "train")].workload


def test_calibration_output_is_the_sorted_rewards_of_each_prompt(checks):
    """The program's result is [prompts, chunk] float32, split over the batch shards."""
    r = checks[("calibration", "train")].report
    cc = compile_check.check_config(_pod_config(TINY))
    assert r.output_bytes >= cc.calibration_prompts * cc.calibration_chunk * 4 / 4
    assert r.output_bytes <= 4 * 1024   # one tile


def test_reward_scoring_arguments_are_what_the_shardings_imply(checks):
    config = _pod_config(TINY)
    model_cfg, _, _, work = compile_check.configs(config)
    cc = compile_check.check_config(config)
    rm_cfg = dataclasses.replace(model_cfg, heads=("reward",))
    tokens = cc.reward_batch * cc.reward_len * (4 + 1) / 4
    closed = _per_chip(rm_cfg, "train") + tokens
    check = checks[("reward", "train")]
    assert check.expected_argument_bytes == pytest.approx(closed, abs=64)
    assert closed <= check.report.argument_bytes <= closed + TILE_SLACK
    assert ("reward", "serve") not in checks   # no decode: compiled once
    assert 0 < check.report.flops < check.flops_estimate < 20 * check.report.flops


def test_serving_layout_gathers_once_not_per_token(checks):
    """The rl step's state stays FSDP-split in both layouts (same arguments); decoding from the
    training layout all-gathers the policy's split weights at every decode step, the serving
    layout only once before the loop: its decode loop moves no weights (a few bytes of the
    all-rows-done test)."""
    model_cfg = compile_check.configs(_pod_config(TINY))[0]
    total, split = _param_bytes(model_cfg)
    train, serve = checks[("rl", "train")], checks[("rl", "serve")]
    assert train.expected_argument_bytes == serve.expected_argument_bytes
    assert abs(train.report.argument_bytes - serve.report.argument_bytes) <= TILE_SLACK
    # train: every split weight is gathered for each decode step (the layer loop inside it).
    assert train.report.collectives.decode_per_token >= split
    assert serve.report.collectives.decode_per_token < 1024
    assert serve.report.collectives.total < train.report.collectives.total
    for check in (train, serve):
        assert check.report.fits(0.9)


def test_serving_layout_rules():
    """SERVE_RULES: nothing over "fsdp" or "data", the rest as in training."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
    for name, axes in sharding.SERVE_PARAM_RULES:
        assert not set(sharding._as_axes(axes)) & {"fsdp", "data"}, name
        assert dict(sharding.PARAM_RULES)[name] == axes or name == "embed"
    assert sharding.rollout_rules("serve") == sharding.SERVE_RULES
    with pytest.raises(ValueError, match="rollout layout 'decode' is not one of"):
        sharding.rollout_resharder("decode", {}, mesh)


@pytest.mark.parametrize("key,value,match", [
    ("programs", "rl,decode", r"config.check.programs: \['decode'\] not among"),
    ("programs", "rl,rl", "names one twice"),
    ("layouts", "serving", r"config.check.layouts: \['serving'\] not among"),
    ("reward_batch", -1, "reward_batch must be an integer >= 0"),
])
def test_unknown_or_bad_check_options_are_refused(key, value, match):
    with pytest.raises(ValueError, match=match):
        compile_check.plan(_pod_config(TINY, **{key: value}))


def test_plan_compiles_reward_once():
    plan = compile_check.plan(_pod_config(TINY, programs="reward,rl", layouts="serve,train"))
    assert plan == [("reward", "train"), ("rl", "serve"), ("rl", "train")]


def test_a_program_the_compiler_cannot_print_is_reported_without_collectives(checks):
    """libtpu 0.0.52 fails to print some large v5p programs (a RET_CHECK in `as_text`); the
    report then keeps the compiler's memory and FLOPs and says the collectives were not
    counted, instead of failing the check."""
    real = checks[("reward", "train")]

    class Unprintable:
        def __init__(self, compiled):
            self._compiled = compiled

        def memory_analysis(self):
            return self._compiled.memory_analysis()

        def cost_analysis(self):
            return self._compiled.cost_analysis()

        def as_text(self):
            raise jax.errors.JaxRuntimeError("INTERNAL: RET_CHECK failure")

    config = _pod_config(TINY)
    model_cfg, _, mesh_cfg, work = compile_check.configs(config)
    mesh = aot.topology_mesh("v5e:2x2", mesh_cfg)
    compiled, _, _ = compile_check.compile_reward(model_cfg, work,
                                                  compile_check.check_config(config), mesh,
                                                  jax.numpy.bfloat16)
    report = aot.compile_report(Unprintable(compiled), "v5e:2x2", 4)
    assert report.collectives is None
    assert report.argument_bytes == real.report.argument_bytes
    assert report.temp_bytes == real.report.temp_bytes
    text = compile_check.summary(dataclasses.replace(real, report=report))
    assert "collectives / device" in text and "not counted" in text


def test_a_v4_slice_compiles_with_two_devices_per_chip():
    """libtpu shows a v4 chip as 2 devices; the mesh spans all 8 devices of v4:2x2x1 and the
    report gives each device half a chip's HBM. The reward model's FSDP split is 8-way."""
    config = _pod_config("model=tiny,topology=v4:2x2x1", programs="reward")
    check = compile_check.check_one(config, "reward")
    r = check.report
    assert (r.num_chips, r.num_devices) == (4, 8) and check.mesh_shape["fsdp"] == 8
    assert r.hbm_bytes == aot.CHIPS["v4"].hbm_bytes / 2
    model_cfg, _, _, work = compile_check.configs(config)
    cc = compile_check.check_config(config)
    total, split = _param_bytes(dataclasses.replace(model_cfg, heads=("reward",)))
    closed = total - split * 7 / 8 + cc.reward_batch * cc.reward_len * (4 + 1) / 8
    assert check.expected_argument_bytes == pytest.approx(closed, abs=64)
    assert closed <= r.argument_bytes <= closed + TILE_SLACK
