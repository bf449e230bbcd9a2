"""Ahead-of-time compilation for TPU topologies from a machine with no TPU: meshes, reports.

With `libtpu` installed (the `tpu-aot` extra, in its own virtualenv: with it present JAX probes
for a TPU at start-up), `jax.experimental.topologies.get_topology_desc` gives the abstract
devices of a named slice ("v5e:16x16" = 256 v5e chips). A program traced on
`jax.ShapeDtypeStruct`s sharded over a `Mesh` of those devices is compiled by the real TPU
compiler, which reports what one chip would hold (`compiled.memory_analysis()`) and the
partitioned program's cost (`compiled.cost_analysis()`). Nothing is allocated.

  CHIPS                                  per-chip HBM, peak bf16 FLOP/s, HBM bandwidth (published)
  topology_devices(name)                 the abstract devices of a slice (needs libtpu)
  topology_mesh(name, mesh_cfg)          the ("data", "fsdp", "tensor") mesh over them
  abstract(tree, shardings)              ShapeDtypeStructs carrying their shardings
  sharded_bytes(tree)                    bytes per chip that a tree's shardings imply
  compile_report(compiled, chip)         a `CompileReport` (bytes, FLOPs, roofline step time)
  collective_bytes(hlo_text)             bytes the collectives of a compiled program move per device,
                                         loops counted at their trip counts, decode loops apart

The layout rules are those of `infra.sharding` (the one home of mesh axes and logical rules).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from infalign_jax.infra.sharding import MESH_AXES, MeshConfig, make_mesh

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip numbers of a TPU generation."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float    # FLOP/s, dense
    hbm_bytes_per_s: float
    source: str


# Google Cloud's per-chip specifications (the "System architecture" table of each page), read
# 2026-12. HBM: Google writes "16 GB", "95 GB", ...; taken as GiB, which is what the chips have
# (the compiler's own limit is a little lower, see `CompileReport.fits`).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1228e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
}

# Slices a user can rent, by generation (libtpu's topology names). From Google Cloud's TPU pages
# (v5e, v6e: the 2D slice shapes up to a 256-chip pod; v5p: the accelerator types v5p-8 ..
# the largest single slice 16x16x24; v4: AxBxC with A <= B <= C each <= 4 or a multiple of 4,
# the common shapes up to the 4096-chip pod), read 2026-12. libtpu itself accepts any shape its
# hosts (2x2x1 chips) tile, e.g. "v5e:32x32" or "v5p:2x2x3", which Google does not rent.
TOPOLOGIES: dict[str, tuple[str, ...]] = {
    "v5e": ("v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:8x16",
            "v5e:16x16"),
    "v6e": ("v6e:1x1", "v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8", "v6e:8x8", "v6e:8x16",
            "v6e:16x16"),
    "v5p": ("v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8",
            "v5p:4x8x8", "v5p:8x8x8", "v5p:8x8x16", "v5p:8x16x16", "v5p:16x16x16",
            "v5p:16x16x24"),
    "v4": ("v4:2x2x1", "v4:2x2x2", "v4:2x2x4", "v4:2x4x4", "v4:4x4x4", "v4:4x4x8", "v4:4x8x8",
           "v4:8x8x8", "v4:8x8x12", "v4:8x8x16", "v4:8x16x16", "v4:16x16x16"),
}


def chip_of(topology: str) -> Chip:
    """The `Chip` of a topology name such as "v5e:16x16"."""
    generation = topology.split(":", 1)[0].strip().lower()
    if generation not in CHIPS:
        raise ValueError(f"topology {topology!r}: unknown TPU generation {generation!r}; known: "
                         f"{sorted(CHIPS)}")
    return CHIPS[generation]


def chips_in(topology: str) -> int:
    """The number of chips a topology name describes ("v5e:16x16" -> 256)."""
    _, _, dims = topology.partition(":")
    try:
        return math.prod(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise ValueError(f"topology {topology!r} is not '<generation>:<A>x<B>[x<C>]'") from None


def topology_devices(topology: str) -> list[Any]:
    """The abstract devices of a TPU slice, for compiling without a TPU (needs `libtpu`)."""
    chip_of(topology)
    try:
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu absent or the name refused: one message for both
        raise ValueError(f"cannot build TPU topology {topology!r} ({type(e).__name__}: {e}); "
                         f"the compile check needs libtpu: `make venv-tpu` and run it with "
                         f".venv-tpu/bin/python") from None
    return list(desc.devices)


def topology_mesh(topology: str, mesh_cfg: MeshConfig) -> Mesh:
    """The ("data", "fsdp", "tensor") mesh of `mesh_cfg` over a slice's abstract devices.

    libtpu shows a v4 chip as 2 devices (its TensorCores), which `jax.make_mesh` refuses for
    TPUs after v3 (it lays out one device per chip); such a slice's devices are reshaped in
    libtpu's order instead, which changes collective placement, not per-device bytes."""
    devices = topology_devices(topology)
    if len(devices) == chips_in(topology):
        return make_mesh(mesh_cfg, devices)
    shape = mesh_cfg.resolve(len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def abstract(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `tree`'s leaves (anything with shape and dtype) carrying the
    matching leaves of `shardings`: jit arguments that are never materialised."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def shard_bytes(x: Any) -> int:
    """Bytes of one device's shard of an abstract array (its sharding's shard shape)."""
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    dtype, per_item = x.dtype, 1
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):   # a typed key: its raw uint32 data
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
        dtype, per_item = data.dtype, int(np.prod(data.shape))
    return int(np.prod(shape, dtype=np.int64)) * per_item * np.dtype(dtype).itemsize


def sharded_bytes(tree: Any) -> int:
    """Bytes per device the shardings of a tree of abstract arrays imply (the largest shard;
    with even splits every device holds the same)."""
    return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # older jax: one dict per partition
        cost = cost[0] if cost else {}
    return dict(cost or {})


@dataclasses.dataclass(frozen=True)
class CollectiveBytes:
    """Bytes produced by the collectives (all-gather, all-reduce, reduce-scatter, all-to-all,
    collective-permute) of one device's partitioned program, read from the optimised HLO.

    Each collective counts the bytes of its result (an async start: its output operand); a loop
    counts its body (and condition) times its trip count: the `known_trip_count` XLA records on
    the while, else the condition's `counter < constant` compare (a count XLA proved has no early
    exit; a compare fused out of sight counted the body once: 6x too few bytes for a 6-layer
    scan). A loop whose
    condition has other terms stops early (the sampler's decode loop stops when every row has
    emitted EOS) and counts at its bound: `total` and `decode` are upper bounds. The sampler
    decodes in phases, one loop per attention window, over one step counter: consecutive
    early-exit loops of one computation whose bounds grow count from the previous bound (the
    phases of 256 tokens, bounds 17, 33, 65, 129, 256, are 256 steps, not 500). `decode` is the
    part inside early-exit loops, `decode_per_token` its mean over their iterations."""

    total: float
    decode: float
    decode_per_token: float
    ops: int          # collective instructions in the program text


_COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                   "collective-permute", "all-gather-start", "all-reduce-start",
                   "collective-permute-start", "all-to-all-start", "reduce-scatter-start")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)="
                    r"%([\w.\-]+)")


def _array_bytes(type_text: str, last_only: bool = False, second: bool = False) -> float:
    arrays = [(t, d) for t, d in _ARRAY.findall(type_text) if t in _DTYPE_BYTES]
    if second and len(arrays) > 1:   # (input, output, context...): a permute-start's output
        arrays = arrays[1:2]
    elif last_only and arrays:
        arrays = arrays[-1:]
    return sum(_DTYPE_BYTES[t] * math.prod(int(x) for x in d.split(",") if x) for t, d in arrays)


def collective_bytes(hlo_text: str) -> CollectiveBytes:
    """`CollectiveBytes` of an optimised HLO module (`compiled.as_text()`)."""
    comps: dict[str, list[tuple[str, str, str, str]]] = {}   # name -> [(name, type, op, rest)]
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            head = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
            current = head.group(2) if head else None
            if head:
                comps[current] = []
                entry = current if head.group(1) else entry
            continue
        m = _INSTR.match(line) if current else None
        if m:
            comps[current].append(m.groups())

    def trips(cond: str) -> tuple[int, bool]:
        """(trip count, early exit?) of a while loop from its condition: the constant the
        counter is compared with (`counter < N`); early exit when other terms are and-ed in."""
        instrs = comps.get(cond, [])
        values = {name: int(v.group(1)) for name, _, op, rest in instrs
                  if op == "constant" and (v := re.match(r"(-?\d+)\)", rest))}
        bound = 1
        for _, _, op, rest in instrs:
            if op == "compare" and "direction=LT" in rest:
                operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
                bound = max([values[o] for o in operands if o in values] or [1])
        return bound, any(op in ("and", "or", "not") for _, _, op, _ in instrs)

    memo: dict[str, tuple[float, float, float, int]] = {}

    def walk(name: str) -> tuple[float, float, float, int]:
        """(bytes, bytes in early-exit loops, their iterations, collective ops)."""
        if name in memo:
            return memo[name]
        memo[name] = (0.0, 0.0, 0.0, 0)   # recursion guard
        total = decode = tokens = 0.0
        ops = 0
        chain = 0   # the bound of the last early-exit loop here, while bounds keep growing
        for _, type_text, op, rest in comps.get(name, []):
            if op in _COLLECTIVE_OPS:
                total += _array_bytes(type_text, last_only=op.endswith("-start"),
                                      second=op == "collective-permute-start")
                ops += 1
            called = _CALLS.findall(rest)
            if op == "while":
                body = re.search(r"body=%([\w.\-]+)", rest).group(1)
                cond = re.search(r"condition=%([\w.\-]+)", rest).group(1)
                n, early = trips(cond)
                known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
                if known:   # XLA proved the count: no early exit
                    n, early = int(known.group(1)), False
                parts = [walk(body), walk(cond)]
                one = sum(p[0] for p in parts)
                ops += sum(p[3] for p in parts)
                if early:
                    # The sampler's decode phases (one per attention window) are consecutive
                    # loops over one step counter, each bounded by its phase's end: a loop whose
                    # bound exceeds the last one's runs from there.
                    n, chain = (n - chain if n > chain else n), n
                    decode += n * one
                    tokens += n
                else:
                    decode += n * sum(p[1] for p in parts)
                    tokens += n * sum(p[2] for p in parts)
                total += n * one
                continue
            for child in called:
                t, d, k, o = walk(child)
                total, decode, tokens, ops = total + t, decode + d, tokens + k, ops + o
            for child in re.findall(r"branch_computations=\{([^}]*)\}", rest):
                branches = [walk(b) for b in re.findall(r"%([\w.\-]+)", child)]
                if branches:
                    t, d, k, o = max(branches)
                    total, decode, tokens, ops = total + t, decode + d, tokens + k, ops + o
        memo[name] = (total, decode, tokens, ops)
        return memo[name]

    if entry is None:
        raise ValueError("collective_bytes: no ENTRY computation in the HLO text")
    total, decode, tokens, ops = walk(entry)
    return CollectiveBytes(total, decode, decode / tokens if tokens else 0.0, ops)


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What the TPU compiler reports for one chip of a compiled SPMD program.

    argument / output / temp / alias bytes are `memory_analysis()`'s; `total` = argument +
    output + temp - alias (donated inputs alias outputs) + generated code. `flops` and
    `bytes_accessed` are `cost_analysis()`'s for the per-chip partitioned program. XLA's cost
    analysis counts a while loop's body once (a `lax.scan` over layers or decode steps is not
    multiplied by its trip count), so `flops` is a lower bound; see `step_time_s`.
    """

    topology: str
    chip: Chip
    num_chips: int
    num_devices: int      # = num_chips, except where libtpu shows each TensorCore (v4: 2 a chip)
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    compile_s: float
    collectives: CollectiveBytes | None = None   # None: the compiler could not print the HLO

    @property
    def hbm_bytes(self) -> float:
        """HBM of one device (a chip, or its share for a chip shown as several devices)."""
        return self.chip.hbm_bytes * self.num_chips / self.num_devices

    @property
    def peak_flops(self) -> float:
        """Peak bf16 FLOP/s of one device."""
        return self.chip.peak_bf16_flops * self.num_chips / self.num_devices

    @property
    def total_bytes(self) -> int:
        return (self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes
                + self.code_bytes)

    @property
    def headroom(self) -> float:
        """Fraction of the chip's HBM left free (negative: does not fit)."""
        return 1.0 - self.total_bytes / self.hbm_bytes

    def fits(self, min_headroom: float = 0.0) -> bool:
        return self.headroom >= min_headroom

    def step_time_s(self, flops: float | None = None, mfu: float = 1.0) -> float:
        """Roofline time of one step: per-device FLOPs / (mfu x the device's peak bf16 FLOP/s)."""
        return (self.flops if flops is None else flops) / (mfu * self.peak_flops)


def compile_report(compiled: Any, topology: str, num_devices: int, compile_s: float = 0.0
                   ) -> CompileReport:
    """A `CompileReport` from `jax.jit(f).lower(...).compile()` for `topology`, whose mesh had
    `num_devices` devices."""
    mem = compiled.memory_analysis()
    cost = _cost(compiled)
    try:
        text = compiled.as_text()
    except jax.errors.JaxRuntimeError:   # libtpu 0.0.52 cannot print some v5p modules
        text = None                      # (RET_CHECK on async-update operands)
    return CompileReport(
        collectives=collective_bytes(text) if text else None,
        topology=topology, chip=chip_of(topology), num_chips=chips_in(topology),
        num_devices=num_devices,
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
        code_bytes=int(getattr(mem, "generated_code_size_in_bytes", 0) or 0),
        flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        compile_s=compile_s)


def dump_flags(dump_dir: str, module: str) -> str:
    """XLA_FLAGS that make the compiler write its buffer assignment for jitted functions named
    `module` to `dump_dir` (read by `largest_buffers`). XLA reads them once per process, so put
    them in the environment before the first compile."""
    return (f"--xla_dump_to={dump_dir} --xla_dump_hlo_module_re=.*{module}.* "
            f"--xla_dump_hlo_pass_re=NONE")


def largest_buffers(dump_dir: str, module: str, n: int = 5) -> list[tuple[int, str]]:
    """The `n` largest allocations of a compiled module's buffer assignment, (bytes, the shapes
    of the values living in it), from the compiler's memory-usage report in `dump_dir`
    (`dump_flags`). Empty when no report was written."""
    import glob
    import os
    reports = sorted(glob.glob(os.path.join(
        dump_dir, f"*{module}*after_optimizations-memory-usage-report.txt")))
    units = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}
    found = []
    for line in (open(reports[-1]).read().splitlines() if reports else []):
        parts = [x.strip() for x in line.split(";")]
        if len(parts) < 5 or not parts[1][:1].isdigit():
            continue
        number = parts[1].rstrip("BKMGTi")
        unit = parts[1][len(number):]
        try:
            found.append((int(float(number) * units[unit]), parts[4]))
        except (KeyError, ValueError):
            continue
    return sorted(found, key=lambda x: -x[0])[:n]


def gib(n: float) -> str:
    """Bytes in GiB (MiB below 1 GiB, KiB below 1 MiB)."""
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2 ** 20:.2f} MiB" if abs(n) >= 2 ** 20 else f"{n / 1024:.1f} KiB"


def format_report(report: CompileReport, extra: Sequence[tuple[str, str]] = ()) -> str:
    """The report as aligned `name: value` lines."""
    c = report.chip
    rows = [
        ("topology", f"{report.topology} ({report.num_chips} x TPU {c.name}, "
                     f"{gib(c.hbm_bytes)} HBM each, {report.num_devices} devices)"),
        ("arguments / device", gib(report.argument_bytes)),
        ("outputs / device", gib(report.output_bytes)),
        ("temporaries / device", gib(report.temp_bytes)),
        ("aliased (donated) / device", gib(report.alias_bytes)),
        ("total / device", f"{gib(report.total_bytes)} of {gib(report.hbm_bytes)} "
                         f"({100 * report.headroom:.1f}% headroom)"),
        ("FLOPs / device (XLA, scans once)", f"{report.flops:.4g}"),
        ("compile time", f"{report.compile_s:.1f} s"),
        ("peak bf16 / device", f"{report.peak_flops / 1e12:.0f} TFLOP/s (chip: "
                               f"{c.peak_bf16_flops / 1e12:.0f}, {c.source})"),
        *extra,
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
