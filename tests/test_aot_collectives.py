"""`aot.collective_bytes` on HLO the CPU compiler writes (the TPU cases are in tests_tpu/)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from infalign_jax.infra import aot


def test_a_layer_scan_counts_its_gathers_once_per_layer():
    """A 6-step scan all-gathering one 256 x 256 f32 layer a step: XLA fuses the loop's compare
    (`fusion(...)`, no bare `compare ... direction=LT` in the condition), so the count fell
    back to 1 trip: 262144 bytes for 1572864. The while's known_trip_count is read first."""
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,))

    def f(w, x):
        def body(h, wi):
            wi = jax.lax.with_sharding_constraint(wi, NamedSharding(mesh, P()))   # gather it
            return jnp.tanh(h @ wi), None
        return jax.lax.scan(body, x, w)[0]

    w = jax.ShapeDtypeStruct((6, 256, 256), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, "x", None)))
    x = jax.ShapeDtypeStruct((8, 256), jnp.float32, sharding=NamedSharding(mesh, P()))
    hlo = jax.jit(f).lower(w, x).compile().as_text()
    assert '"known_trip_count":{"n":"6"}' in hlo
    c = aot.collective_bytes(hlo)
    assert c.total == 6 * 256 * 256 * 4
    assert c.decode == 0 and c.ops >= 1


def test_an_async_collective_permute_counts_its_output():
    """collective-permute-start's result is (input, output, u32[], u32[]): the last array is a
    context word, so it counted 4 bytes for a 1 MiB permute; the output operand is counted."""
    hlo = """HloModule m

ENTRY %main (x: f32[1024,256]) -> f32[1024,256] {
  %x = f32[1024,256]{1,0} parameter(0)
  %s = (f32[1024,256]{1,0}, f32[1024,256]{1,0}, u32[], u32[]) collective-permute-start(%x), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %g = (f32[512,256]{1,0}, f32[2048,256]{1,0}) all-gather-start(%x), channel_id=2, dimensions={0}
  ROOT %d = f32[1024,256]{1,0} collective-permute-done(%s)
}
"""
    c = aot.collective_bytes(hlo)
    assert c.total == 1024 * 256 * 4 + 2048 * 256 * 4
    assert c.ops == 2


def _phase_loops_hlo(bounds: list[int]) -> str:
    """A module whose ENTRY runs early-exit loops (`counter < bound` and-ed with another term,
    as the sampler's phases) one after another on one carry; the body of loop i all-gathers
    (i + 1) x 4 KiB."""
    comps, calls, carry = [], [], "%t0"
    for i, bound in enumerate(bounds):
        comps.append(f"""
%body{i} (p: (s32[], f32[1,256])) -> (s32[], f32[1,256]) {{
  %p = (s32[], f32[1,256]) parameter(0)
  %g = f32[1,256]{{1,0}} get-tuple-element(%p), index=1
  %ag = f32[{4 * (i + 1)},256]{{1,0}} all-gather(%g), channel_id={i + 1}, dimensions={{0}}
  ROOT %t = (s32[], f32[1,256]) tuple(%i, %g)
}}

%cond{i} (p: (s32[], f32[1,256])) -> pred[] {{
  %p = (s32[], f32[1,256]) parameter(0)
  %c = s32[]{{:T(128)}} constant({bound})
  %i = s32[] get-tuple-element(%p), index=0
  %lt = pred[] compare(%i, %c), direction=LT
  %d = pred[] constant(true)
  ROOT %a = pred[] and(%lt, %d)
}}
""")
        calls.append(f"  %w{i} = (s32[], f32[1,256]) while({carry}), condition=%cond{i}, "
                     f"body=%body{i}")
        carry = f"%w{i}"
    return ("HloModule m\n" + "".join(comps) + "\nENTRY %main (x: f32[1,256]) -> f32[1,256] {\n"
            "  %x = f32[1,256]{1,0} parameter(0)\n" + "\n".join(calls)
            + "\n  ROOT %r = f32[1,256]{1,0} copy(%x)\n}\n")


def test_the_samplers_decode_phases_count_as_one_run_of_steps():
    """The sampler decodes 40 tokens in three loops (attention windows 16, 32, 39) over one step
    counter, bounded 17, 33 and 40 on TPU: each loop counted at its own bound made 90 steps of
    40, and the per-token figure summed one step of each phase (3x). A loop whose bound exceeds
    the previous one's counts from there; a smaller bound starts another run (a second
    sampler); the per-token figure is the mean over the steps."""
    kib4 = 4 * 256 * 4
    c = aot.collective_bytes(_phase_loops_hlo([17, 33, 40]))
    steps = [17, 33 - 17, 40 - 33]                  # loop i gathers (i + 1) x 4 KiB a step
    assert c.decode == c.total == kib4 * (1 * 17 + 2 * 16 + 3 * 7)
    assert c.decode_per_token == pytest.approx(c.decode / sum(steps))
    assert c.ops == 3
    two = aot.collective_bytes(_phase_loops_hlo([17, 33, 17, 33]))   # two samplers, one each
    assert two.decode == kib4 * (1 * 17 + 2 * 16 + 3 * 17 + 4 * 16)
    assert two.decode_per_token == pytest.approx(two.decode / 66)
