"""`aot.collective_bytes` on HLO the CPU compiler writes (the TPU cases are in tests_tpu/)."""

import jax
import jax.numpy as jnp
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
