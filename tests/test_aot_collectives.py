"""`aot.collective_bytes` on HLO the CPU compiler writes (the TPU cases are in tests_tpu/)."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from infalign_jax.infra import aot, sharding


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


# ---- hand-written HLO: loops by their condition, decode loops, branches, calls ----------------

_ADD = """%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}
"""

# a decode loop's body and condition (`counter < 7 and not done`, a 128-byte all-gather an
# iteration), NAME their prefix: XLA writes each loop its own copy
_DECODE_LOOP = """%NAMEbody (q: (s32[], f32[16], pred[])) -> (s32[], f32[16], pred[]) {
  %q = (s32[], f32[16]{0}, pred[]) parameter(0)
  %i = s32[] get-tuple-element(%q), index=0
  %x = f32[16]{0} get-tuple-element(%q), index=1
  %g = f32[32]{0} all-gather(%x), channel_id=2, replica_groups={{0,1}}, dimensions={0}
  %h = f32[16]{0} slice(%g), slice={[0:16]}
  %d = pred[] get-tuple-element(%q), index=2
  ROOT %t = (s32[], f32[16]{0}, pred[]) tuple(%i, %h, %d)
}

%NAMEcond (q: (s32[], f32[16], pred[])) -> pred[] {
  %q = (s32[], f32[16]{0}, pred[]) parameter(0)
  %i = s32[] get-tuple-element(%q), index=0
  %m = s32[] constant(7)
  %lt = pred[] compare(%i, %m), direction=LT
  %go = pred[] get-tuple-element(%q), index=2
  ROOT %both = pred[] and(%lt, %go)
}

"""

# a counted loop (5 trips of a 256-byte all-reduce) and a decode loop (an upper bound of 7
# iterations), the second also run with a count XLA proved (3: no early exit)
_LOOPS = _ADD + """
%body (p: (s32[], f32[64])) -> (s32[], f32[64]) {
  %p = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[64]{0} get-tuple-element(%p), index=1
  %r = f32[64]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[64]{0}) tuple(%j, %r)
}

%cond (p: (s32[], f32[64])) -> pred[] {
  %p = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

""" + _DECODE_LOOP.replace("NAME", "d") + _DECODE_LOOP.replace("NAME", "k") + """ENTRY %main (x: f32[64], y: f32[16], go: pred[], s: f32[], b: bf16[4,4]) -> f32[] {
  %x = f32[64]{0} parameter(0)
  %y = f32[16]{0} parameter(1)
  %go = pred[] parameter(2)
  %s = f32[] parameter(3)
  %b = bf16[4,4]{1,0} parameter(4)
  %zero = s32[] constant(0)
  %init = (s32[], f32[64]{0}) tuple(%zero, %x)
  %w = (s32[], f32[64]{0}) while(%init), condition=%cond, body=%body
  %dinit = (s32[], f32[16]{0}, pred[]) tuple(%zero, %y, %go)
  %dw = (s32[], f32[16]{0}, pred[]) while(%dinit), condition=%dcond, body=%dbody
  %kw = (s32[], f32[16]{0}, pred[]) while(%dinit), condition=%kcond, body=%kbody, backend_config={"known_trip_count":{"n":"3"}}
  %bg = bf16[8,4]{1,0} all-gather(%b), channel_id=3, replica_groups={{0,1}}, dimensions={0}
  ROOT %sum = f32[] all-reduce(%s), channel_id=4, replica_groups={{0,1}}, to_apply=%add
}
"""


def test_loops_count_by_their_condition_and_decode_loops_apart():
    c = aot.collective_bytes(_LOOPS)
    counted, decode, proved = 5 * 64 * 4, 7 * 32 * 4, 3 * 32 * 4
    scalar, bf16 = 4, 8 * 4 * 2
    assert c.total == counted + decode + proved + bf16 + scalar
    assert c.decode == decode and c.decode_per_token == 32 * 4
    assert c.ops == 5


def test_a_decode_loop_inside_a_counted_loop_counts_each_outer_trip():
    """Two outer trips around the decode loop: twice its bytes and its iterations."""
    inner = _LOOPS.split("ENTRY")[0]
    hlo = inner + """
%obody (o: (s32[], f32[16], pred[])) -> (s32[], f32[16], pred[]) {
  %o = (s32[], f32[16]{0}, pred[]) parameter(0)
  ROOT %dw = (s32[], f32[16]{0}, pred[]) while(%o), condition=%dcond, body=%dbody
}

%ocond (o: (s32[], f32[16], pred[])) -> pred[] {
  %o = (s32[], f32[16]{0}, pred[]) parameter(0)
  %i = s32[] get-tuple-element(%o), index=0
  %two = s32[] constant(2)
  ROOT %lt = pred[] compare(%i, %two), direction=LT
}

ENTRY %main (y: f32[16], go: pred[]) -> (s32[], f32[16], pred[]) {
  %y = f32[16]{0} parameter(0)
  %go = pred[] parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[16]{0}, pred[]) tuple(%zero, %y, %go)
  ROOT %ow = (s32[], f32[16]{0}, pred[]) while(%init), condition=%ocond, body=%obody
}
"""
    c = aot.collective_bytes(hlo)
    assert c.total == c.decode == 2 * 7 * 32 * 4
    assert c.decode_per_token == 32 * 4   # the mean over the 2 x 7 iterations


def test_a_conditional_counts_its_largest_branch_and_a_call_its_callee():
    """The entry computation need not come last; an HLO text without one is refused."""
    hlo = """HloModule m

ENTRY %main (k: s32[], x: f32[100], y: f32[10], z: f32[64]) -> f32[64] {
  %k = s32[] parameter(0)
  %x = f32[100]{0} parameter(1)
  %y = f32[10]{0} parameter(2)
  %z = f32[64]{0} parameter(3)
  %c = f32[100]{0} conditional(%k, %x, %y), branch_computations={%big, %small}
  ROOT %r = f32[64]{0} call(%z), to_apply=%sub
}

""" + _ADD + """
%big (a: f32[100]) -> f32[100] {
  %a = f32[100]{0} parameter(0)
  ROOT %r = f32[100]{0} all-reduce(%a), channel_id=1, replica_groups={{0,1}}, to_apply=%add
}

%small (b: f32[10]) -> f32[100] {
  %b = f32[10]{0} parameter(0)
  %r = f32[10]{0} all-reduce(%b), channel_id=2, replica_groups={{0,1}}, to_apply=%add
  ROOT %p = f32[100]{0} pad(%r, %b), padding=0_90
}

%sub (z: f32[64]) -> f32[64] {
  %z = f32[64]{0} parameter(0)
  ROOT %r = f32[64]{0} all-reduce(%z), channel_id=3, replica_groups={{0,1}}, to_apply=%add
}
"""
    c = aot.collective_bytes(hlo)
    assert c.total == 100 * 4 + 64 * 4 and c.decode == 0
    with pytest.raises(ValueError, match="no ENTRY computation"):
        aot.collective_bytes(hlo.replace("ENTRY %main", "%main"))


# ---- topology names, meshes, shard bytes -----------------------------------------------------

def test_topology_names_give_the_chip_and_the_chip_count():
    assert aot.chip_of("v5e:16x16") is aot.CHIPS["v5e"]
    assert aot.chip_of(" V5P:2x2x1") is aot.CHIPS["v5p"]
    assert aot.chips_in("v5e:16x16") == 256 and aot.chips_in("v5p:2x2x4") == 16
    with pytest.raises(ValueError, match=r"unknown TPU generation 'v9'; known: \['v4', 'v5e'"):
        aot.chip_of("v9:2x2")
    with pytest.raises(ValueError, match=r"'v5e:4xfour' is not '<generation>:<A>x<B>\[x<C>\]'"):
        aot.chips_in("v5e:4xfour")
    # the generation is checked before libtpu is asked (absent here: "cannot build" otherwise)
    with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
        aot.topology_devices("v9:2x2")


def test_topology_mesh_is_one_device_a_chip_or_libtpus_order_for_cores(monkeypatch):
    """A slice with a device per chip goes through `make_mesh`; a v4 slice, whose libtpu shows
    2 devices a chip, is reshaped in the order libtpu lists them (jax.make_mesh refuses it)."""
    devices = jax.devices()[:8][::-1]
    monkeypatch.setattr(aot, "topology_devices", lambda topology: devices)
    made = []
    monkeypatch.setattr(aot, "make_mesh", lambda cfg, devs: made.append(cfg) or
                        sharding.make_mesh(cfg, devs))
    cfg = sharding.MeshConfig(data=-1, fsdp=2, tensor=2)
    mesh = aot.topology_mesh("v5e:2x4", cfg)
    assert made == [cfg] and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    v4 = aot.topology_mesh("v4:2x2x1", cfg)   # 4 chips, 8 devices
    assert len(made) == 1
    assert dict(v4.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert list(v4.devices.flat) == devices
    assert v4.axis_types == (AxisType.Auto,) * 3


def test_abstract_arrays_carry_their_shardings_and_bytes_per_device():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    key = jax.random.key(0, impl="threefry2x32")   # 2 uint32 words a key
    tree = {"w": np.zeros((8, 6), np.float32), "b": jnp.zeros((4,), jnp.bfloat16),
            "keys": jax.ShapeDtypeStruct((4,), key.dtype)}
    shardings = {"w": NamedSharding(mesh, P("fsdp", "tensor")), "b": NamedSharding(mesh, P()),
                 "keys": NamedSharding(mesh, P("data"))}
    out = aot.abstract(tree, shardings)
    for name in tree:
        assert isinstance(out[name], jax.ShapeDtypeStruct) and out[name].shape == tree[name].shape
        assert out[name].sharding == shardings[name]
    assert aot.shard_bytes(out["w"]) == 4 * 3 * 4
    assert aot.shard_bytes(out["keys"]) == 2 * 2 * 4
    assert aot.sharded_bytes(out) == 4 * 3 * 4 + 4 * 2 + 2 * 2 * 4


# ---- compile reports -------------------------------------------------------------------------

class _Compiled:
    """What `compile_report` reads of a compiled program, with numbers chosen by hand."""

    def __init__(self, cost, text=_ADD + "\nENTRY %main (s: f32[8]) -> f32[8] {\n"
                 "  %s = f32[8]{0} parameter(0)\n  ROOT %r = f32[8]{0} all-reduce(%s), "
                 "to_apply=%add\n}\n"):
        self.cost, self.text = cost, text

    def memory_analysis(self):
        return types.SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=50,
                                     temp_size_in_bytes=30, alias_size_in_bytes=20,
                                     generated_code_size_in_bytes=10)

    def cost_analysis(self):
        return self.cost

    def as_text(self):
        return self.text


def test_compile_report_of_a_v4_slice_shown_as_two_devices_a_chip():
    # older jax: one cost dict per partition, the first is the program's
    report = aot.compile_report(
        _Compiled([{"flops": 2.75e12, "bytes accessed": 64.0}, {"flops": 1.0}]), "v4:2x2x1", 8,
        compile_s=1.5)
    assert (report.num_chips, report.num_devices) == (4, 8)
    assert (report.argument_bytes, report.output_bytes, report.temp_bytes, report.alias_bytes,
            report.code_bytes) == (100, 50, 30, 20, 10)
    assert report.total_bytes == 100 + 50 + 30 - 20 + 10
    assert report.flops == 2.75e12 and report.bytes_accessed == 64.0
    assert report.collectives == aot.CollectiveBytes(8 * 4, 0, 0, 1)
    assert report.hbm_bytes == 16 * aot.GIB                  # half of a v4 chip's 32 GiB
    assert report.peak_flops == 275e12 / 2
    assert report.headroom == 1 - 170 / (16 * aot.GIB)
    assert report.step_time_s(mfu=0.5) == pytest.approx(2.75e12 / (0.5 * 137.5e12))
    assert report.step_time_s(flops=1.375e12) == pytest.approx(0.01)
    full = dataclasses.replace(report, argument_bytes=16 * aot.GIB - 70)   # exactly the HBM
    assert full.headroom == 0.0 and full.fits() and not full.fits(0.01)
    assert not dataclasses.replace(full, temp_bytes=31).fits()
    half = dataclasses.replace(report, argument_bytes=8 * aot.GIB - 70)
    text = aot.format_report(half, [("extra row", "x")])
    assert "total / device                    8.00 GiB of 16.00 GiB (50.0% headroom)" in text
    assert "4 x TPU v4, 32.00 GiB HBM each, 8 devices" in text
    assert text.splitlines()[-1] == "extra row                         x"
    assert aot.compile_report(_Compiled({"flops": 1.0}, text=""), "v5e:2x2", 4).collectives is None


def test_gib_switches_units_at_each_boundary():
    assert aot.gib(aot.GIB) == "1.00 GiB" and aot.gib(aot.GIB - 2 ** 20) == "1023.00 MiB"
    assert aot.gib(2 ** 20) == "1.00 MiB" and aot.gib(512) == "0.5 KiB"
    assert aot.gib(-3 * aot.GIB) == "-3.00 GiB"


# XLA's memory-usage report, as XLA:CPU writes it (with a GiB row added)
_REPORT = """Memory Space: default (color=0)
Total bytes: 2622476 (2.50MiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
    2.00MiB(100%);    2.00MiB;            0;                1; f32[1024,512]

  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
   512.0KiB(100%);   512.0KiB;            0;                1; f32[512,256]

  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
     1.50GiB(100%);     1.50GiB;            0;                2; bf16[3,512,512,1024], f32[2]

  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
         4B(100%);         4B;            0;                1; f32[]
"""


def test_largest_buffers_reads_the_newest_report_of_the_module(tmp_path):
    assert "--xla_dump_to=" + str(tmp_path) in aot.dump_flags(str(tmp_path), "bigfn")
    assert aot.largest_buffers(str(tmp_path), "bigfn") == []
    name = "module_{:04d}.jit_bigfn.cpu_after_optimizations-memory-usage-report.txt"
    (tmp_path / name.format(0)).write_text(_REPORT.replace("f32[1024,512]", "old"))
    (tmp_path / name.format(1)).write_text(_REPORT)
    assert aot.largest_buffers(str(tmp_path), "bigfn", n=3) == [
        (3 * 2 ** 29, "bf16[3,512,512,1024], f32[2]"), (2 * 2 ** 20, "f32[1024,512]"),
        (512 * 1024, "f32[512,256]")]
    assert aot.largest_buffers(str(tmp_path), "bigfn", n=5)[-1] == (4, "f32[]")
