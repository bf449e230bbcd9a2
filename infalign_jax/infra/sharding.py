"""Device mesh, logical-axis sharding rules and sharded initialisation: the one place they live.

Models name the dimensions of their parameters and activations with *logical* names ("embed",
"mlp", "batch", ...) through Flax's `nn.with_logical_partitioning` / `nn.with_logical_constraint`
and never mention devices. This module holds the other half:

* `MeshConfig` / `make_mesh`: a 3-axis device mesh ("data", "fsdp", "tensor").
  - "data": pure data parallelism (batch split, parameters replicated);
  - "fsdp": batch split *and* parameters split along their "embed" dimension (ZeRO-3 style);
  - "tensor": Megatron-style split of heads, MLP width and vocabulary.
* `DEFAULT_RULES`: logical name -> mesh axes, as plain data (a tuple of pairs, in Flax's format,
  earlier rules taking precedence), so a config can swap them without touching model code.
* `logical_to_shardings`: turns a tree of logical `PartitionSpec`s plus shapes into
  `NamedSharding`s, replicating any dimension the mesh axes do not divide.
* `axis_rules`: the context in which the model's `nn.with_logical_constraint` calls take effect.
* `sharded_init`: nanodo's pattern, `eval_shape` -> shardings -> `jit(init, out_shardings=...)`,
  so the full parameters never exist on one device; `sharded_abstract` gives the same tree as
  sharded `ShapeDtypeStruct`s (a checkpoint-restore target); `sharded_optimizer_init` lays the
  optimizer state out like the parameters.
* `batch_sharding` / `shard_batch`: host batches to global arrays split over ("data", "fsdp").
* `ROLLOUT_LAYOUTS` / `rollout_resharder`: the layout the rollout decodes from, "train" (the
  parameters as they are, FSDP) or "serve" (`SERVE_RULES`: split over "tensor" only, replicated
  over "data" and "fsdp"), applied once per step at the rollout's program boundary.

Design choices:

* Axis types are `AxisType.Auto` (classic GSPMD), not the `Explicit` default of `jax.make_mesh`
  in jax 0.10. With Auto the compiler propagates shardings and our only levers are `in_shardings`
  / `out_shardings` and sharding constraints, which is exactly how the Linen model is written.
  Explicit axes make shardings part of array types and demand explicit `out_sharding` /
  `reshard` at every ambiguous op, which the model does not do. `jax.make_mesh` is still used
  (with Auto axes) because it orders devices to follow the physical topology on TPU/GPU.
* Divisibility fallback: `jit` and `device_put` refuse a sharding whose tiling does not divide the
  dimension (e.g. 1 KV head over tensor=2), so `logical_to_shardings` replicates such a
  dimension instead, and logs a warning naming the arrays and the memory they then take on
  every device (once per distinct report). For a multi-axis rule such as "batch" -> ("data", "fsdp") the longest
  prefix of the axes that divides is used first (a batch of 2 then splits over "data" only).
  Inside jitted code, `with_sharding_constraint` accepts uneven splits (GSPMD pads), so the
  model's activation constraints need no such fallback.
* No mesh axis is used twice in one array: a rule whose mesh axes are already taken by an
  earlier-priority dimension is skipped (that dimension stays replicated), as in Flax.
* Unknown logical names raise instead of silently replicating, so a typo in a model annotation
  cannot quietly turn off sharding.
* `shard_batch` builds arrays with `jax.make_array_from_process_local_data`: on one process that
  is a `device_put`; on several, each process passes its own rows and no code changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
LogicalRules = tuple[tuple[str, MeshAxes], ...]

PARAM_RULES: LogicalRules = (
    ("layers", None),   # the stacked decoder layers' leading axis (scanned, never split)
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("pos", None),
    ("scalar", None),
)
ACTIVATION_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
# A reward-model ensemble's member axis (`ensemble_shardings`): members side by side on the batch
# devices. Not a parameter rule: the serving layout (below) never holds an ensemble.
ENSEMBLE_RULES: LogicalRules = (("ensemble", ("data", "fsdp")),)
DEFAULT_RULES: LogicalRules = PARAM_RULES + ACTIVATION_RULES + ENSEMBLE_RULES

# The serving layout of the rollout: no parameter is split over "fsdp" (nor "data"), only over
# "tensor". Decoding from the training layout all-gathers every FSDP-split weight at every decode
# step (once per token); resharded to this layout once per step, the weights are gathered once
# and every decode step reads them locally, at the price of holding params / tensor bytes per
# device during the rollout. Activations keep the training rules (batch over data x fsdp).
SERVE_PARAM_RULES: LogicalRules = tuple(
    (name, None if name == "embed" else axes) for name, axes in PARAM_RULES)
SERVE_RULES: LogicalRules = SERVE_PARAM_RULES + ACTIVATION_RULES
ROLLOUT_LAYOUTS: dict[str, LogicalRules] = {"train": DEFAULT_RULES, "serve": SERVE_RULES}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ("data", "fsdp", "tensor") mesh axes; at most one may be -1 (= the rest).
    `rollout`: the layout the CTRL rollout decodes from (`ROLLOUT_LAYOUTS`: "train" = the FSDP
    training layout, "serve" = resharded once per step to `SERVE_RULES`)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rollout: str = "train"

    def __post_init__(self) -> None:
        if self.rollout not in ROLLOUT_LAYOUTS:
            raise ValueError(f"config.mesh.rollout must be one of {sorted(ROLLOUT_LAYOUTS)}, got "
                             f"{self.rollout!r}")
        for name in MESH_AXES:
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
                raise ValueError(f"MeshConfig.{name} must be an int, got {size!r}")
            if size == 0 or size < -1:
                raise ValueError(f"MeshConfig.{name} must be >= 1 or -1 (fill), got {size}")
        fill = [name for name in MESH_AXES if getattr(self, name) == -1]
        if len(fill) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {fill}")

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Axis sizes with the -1 axis filled so that their product is `num_devices`."""
        sizes = [int(getattr(self, name)) for name in MESH_AXES]
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                fill = MESH_AXES[sizes.index(-1)]
                raise ValueError(
                    f"MeshConfig {self}: cannot fill axis {fill!r}: {num_devices} devices are not"
                    f" divisible by the other axes' product {fixed}"
                )
            sizes[sizes.index(-1)] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(
                f"MeshConfig {self}: axis sizes multiply to {fixed} but there are {num_devices}"
                " devices; change a size or set one axis to -1"
            )
        return tuple(sizes)  # type: ignore[return-value]


def mesh_config_from_dict(config: Mapping[str, Any] | Any) -> MeshConfig:
    """`MeshConfig` from a dict or `ml_collections.ConfigDict` with keys among data/fsdp/tensor
    and rollout."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(
            f"mesh config must be a mapping or ConfigDict, got {type(config).__name__}"
        )
    known = list(MESH_AXES) + ["rollout"]
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"mesh config has unknown keys {unknown}; known keys: {known}")
    return MeshConfig(**dict(config))


def make_mesh(cfg: MeshConfig | Mapping[str, Any], devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all global devices), Auto axes."""
    if not isinstance(cfg, MeshConfig):
        cfg = mesh_config_from_dict(cfg)
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: `devices` is empty")
    shape = cfg.resolve(len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def _as_axes(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _check_rules(rules: LogicalRules, mesh: Mesh) -> None:
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"rules: each rule must be (logical_name, mesh_axes), got {rule!r}")
        for axis in _as_axes(rule[1]):
            if axis not in mesh.shape:
                raise ValueError(
                    f"rules: rule {rule!r} names mesh axis {axis!r}; mesh axes are"
                    f" {tuple(mesh.axis_names)}"
                )


def logical_to_mesh_spec(
    logical_spec: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
) -> PartitionSpec:
    """Mesh `PartitionSpec` for an array of `shape` whose dimensions have logical names.

    Rules are applied in order (earlier = higher priority). A rule (name, axes) assigns to the
    dimension called `name` the longest prefix of `axes` that (a) uses no mesh axis already
    assigned in this array and (b) whose total size divides the dimension; if no non-empty prefix
    qualifies the dimension stays replicated. An empty spec (or None) means fully replicated.
    """
    return _mesh_spec(logical_spec, shape, mesh, rules)[0]


def _mesh_spec(
    logical_spec: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: LogicalRules,
) -> tuple[PartitionSpec, list[tuple[str, int, dict[str, int]]]]:
    """`logical_to_mesh_spec`'s spec, and the divisibility fallbacks it took: (logical name,
    size, {free mesh axis: size}) for each dimension left replicated only because no free prefix
    of its rule's axes (with more than one device) divides it."""
    shape = tuple(shape)
    names = tuple(logical_spec) if logical_spec is not None else ()
    if not names:
        return PartitionSpec(), []
    if len(names) != len(shape):
        raise ValueError(
            f"logical spec {names} has {len(names)} names but the array has shape {shape}"
        )
    known = {name for name, _ in rules}
    for name in names:
        if name is not None and name not in known:
            raise ValueError(
                f"logical axis name {name!r} (in spec {names}) has no rule; known names:"
                f" {sorted(known)}"
            )
        if name is not None and names.count(name) > 1:
            raise ValueError(f"logical axis name {name!r} occurs twice in spec {names}")
    assigned: list[tuple[str, ...] | None] = [None] * len(names)
    used: set[str] = set()
    fallbacks: list[tuple[Any, ...]] = []
    for rule_name, rule_axes in rules:
        if rule_name not in names:
            continue
        dim = names.index(rule_name)
        if assigned[dim] is not None:
            continue
        axes = _as_axes(rule_axes)
        tried: tuple[str, ...] = ()
        for end in range(len(axes), 0, -1):
            prefix = axes[:end]
            if used.intersection(prefix):
                continue
            tried = tried or prefix
            if shape[dim] % math.prod(mesh.shape[a] for a in prefix) == 0:
                assigned[dim] = prefix
                used.update(prefix)
                break
        free = {a: mesh.shape[a] for a in tried if mesh.shape[a] > 1}
        if free:   # its axes were free (not taken by another dimension) and had devices
            fallbacks.append((dim, rule_name, shape[dim], free))

    def unsplit(dim: int) -> bool:
        return assigned[dim] is None or math.prod(mesh.shape[a] for a in assigned[dim]) == 1

    spec = PartitionSpec(*(None if a is None else (a[0] if len(a) == 1 else a) for a in assigned))
    # a fallback is a dimension left whole (not split for divisibility, or "split" over axes of
    # size 1 only, e.g. "data" of 1 when "fsdp" of 4 does not divide), by this rule or a later
    # one for the same name
    return spec, [f[1:] for f in fallbacks if unsplit(f[0])]


def _is_spec_leaf(x: Any) -> bool:
    return (
        x is None
        or isinstance(x, PartitionSpec)
        or (isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x))
    )


def logical_to_shardings(
    logical_specs_tree: Any,
    shapes_tree: Any,
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
) -> Any:
    """Tree of `NamedSharding`s for a tree of logical specs and a matching tree of shapes.

    `shapes_tree` leaves are anything with `.shape` (arrays, `jax.ShapeDtypeStruct`s from
    `jax.eval_shape`). Spec leaves are `PartitionSpec`s (or tuples) of logical names, or None.
    See `logical_to_mesh_spec` for the mapping and its divisibility fallback.
    """
    _check_rules(rules, mesh)
    spec_paths, _ = jax.tree_util.tree_flatten_with_path(logical_specs_tree, is_leaf=_is_spec_leaf)
    path_leaves, shape_def = jax.tree_util.tree_flatten_with_path(shapes_tree)
    # Compared by key paths, not treedefs, so a dict of specs matches a FrozenDict of params.
    spec_keys = [jax.tree_util.keystr(p) for p, _ in spec_paths]
    shape_keys = [jax.tree_util.keystr(p) for p, _ in path_leaves]
    if spec_keys != shape_keys:
        only_specs = sorted(set(spec_keys) - set(shape_keys))[:5]
        only_shapes = sorted(set(shape_keys) - set(spec_keys))[:5]
        raise ValueError(
            "logical_specs_tree and shapes_tree must have the same structure; only in specs:"
            f" {only_specs}, only in shapes: {only_shapes}"
        )
    spec_leaves = [spec for _, spec in spec_paths]
    shardings, fallbacks = [], []
    for spec, (path, leaf) in zip(spec_leaves, path_leaves):
        try:
            mesh_spec, fell_back = _mesh_spec(spec, np.shape(leaf), mesh, rules)
        except ValueError as err:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)}: {err}") from None
        shardings.append(NamedSharding(mesh, mesh_spec))
        fallbacks += [(jax.tree_util.keystr(path), leaf, *f) for f in fell_back]
    if fallbacks:
        _report_fallbacks(fallbacks, mesh)
    return jax.tree.unflatten(shape_def, shardings)


_REPORTED: set[str] = set()


def _report_fallbacks(fallbacks: list[tuple[Any, ...]], mesh: Mesh) -> None:
    """Logs (once per distinct report) the arrays a dimension of which the mesh could not split:
    they are held whole on every device of those axes, a memory cost the user should see."""
    by_dim: dict[tuple[str, int, tuple[tuple[str, int], ...]], list[tuple[str, Any]]] = {}
    for path, leaf, name, size, free in fallbacks:
        by_dim.setdefault((name, size, tuple(free.items())), []).append((path, leaf))
    lines = []
    for (name, size, free), leaves in sorted(by_dim.items()):
        nbytes = sum(math.prod(np.shape(x)) * np.dtype(getattr(x, "dtype", np.float32)).itemsize
                     for _, x in leaves)
        axes = ", ".join(f"{a}={n}" for a, n in free)
        paths = ", ".join(p for p, _ in leaves[:3]) + (", ..." if len(leaves) > 3 else "")
        lines.append(f"  '{name}' of size {size} is not divisible by {axes}: {len(leaves)} arrays "
                     f"({nbytes / 2**20:.1f} MiB) replicated along that dimension ({paths})")
    report = (f"sharding on mesh {dict(mesh.shape)}: some dimensions stay whole on every device "
              f"of their axes (each device holds the full size):\n" + "\n".join(lines))
    if report not in _REPORTED:
        _REPORTED.add(report)
        logger.warning(report)


def ensemble_shardings(tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """Shardings of a tree whose every leaf stacks ensemble members on its leading axis (the
    vmapped parameters, optimiser state and step of a reward-model ensemble): that axis split over
    the "ensemble" rule's mesh axes (members side by side on the batch devices, each whole on its
    own), the rest replicated; a leaf without the axis (a scalar) is replicated."""
    _check_rules(rules, mesh)
    fallbacks = []

    def one(path: Any, x: Any) -> NamedSharding:
        names = ("ensemble",) + (None,) * (np.ndim(x) - 1) if np.ndim(x) else ()
        spec, fell_back = _mesh_spec(names, np.shape(x), mesh, rules)
        fallbacks.extend((jax.tree_util.keystr(path), x, *f) for f in fell_back)
        return NamedSharding(mesh, spec)

    out = jax.tree_util.tree_map_with_path(one, tree)
    if fallbacks:
        _report_fallbacks(fallbacks, mesh)
    return out


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[Mesh]:
    """Context in which `nn.with_logical_constraint` constrains activations on `mesh`.

    Flax (0.12) applies logical constraints only when its rules are set *and* JAX's abstract
    mesh is non-empty; `jax.set_mesh` sets the latter (the old `with mesh:` no longer does, and
    is deprecated). Enter it before tracing: jit reads both while tracing.
    """
    _check_rules(rules, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


@contextlib.contextmanager
def no_mesh() -> Iterator[None]:
    """Leaves `axis_rules`' mesh for host-side work inside a sharded loop (an evaluation on
    gathered parameters): arrays stay on this process's default device, so they can be fetched
    on every process; without it the model's constraints would spread them over every process's
    devices, which no process can read back alone."""
    with jax.set_mesh(None), nn.logical_axis_rules(()):
        yield


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an `ndim`-array whose leading dim is the batch: split by the "batch" rule."""
    if ndim < 1:
        raise ValueError(f"batch_sharding: ndim must be >= 1, got {ndim}")
    batch_axes = next((axes for name, axes in rules if name == "batch"), None)
    return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))


def shard_batch(batch_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES,
                global_rows: int | None = None) -> Any:
    """Global arrays from host arrays, leading dim split by `batch_sharding`; scalars replicated.

    Each leaf holds this process's rows (on one process: the whole batch). With `global_rows`
    (the trainers': rows from `distributed.host_local_batch`) the global batch has that many rows
    and JAX checks each process's rows against the mesh; without, it is `rows *
    jax.process_count()`, which holds only when the batch axes span the processes (else the
    processes' different rows would be taken for copies of one array). It must be divisible by
    the number of batch shards — pad it.
    """

    def put(path: Any, x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(replicated(mesh), x)
        sharding = batch_sharding(mesh, x.ndim, rules)
        shards = math.prod(mesh.shape[a] for a in _as_axes(sharding.spec[0]))
        rows = x.shape[0] * jax.process_count() if global_rows is None else global_rows
        if rows % shards:
            raise ValueError(
                f"shard_batch: batch leaf {jax.tree_util.keystr(path)} has {rows} global"
                f" rows, not divisible by the {shards} batch shards of mesh {dict(mesh.shape)};"
                " pad the batch"
            )
        return jax.make_array_from_process_local_data(
            sharding, x, None if global_rows is None else (rows, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(put, batch_tree)


def _strip_boxes(tree: Any) -> Any:
    # Not `nn.unbox`: under a global mesh it adds sharding constraints, which fails on the
    # ShapeDtypeStructs of `eval_shape` and is redundant with `out_shardings` inside the jit.
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def _unboxed(init_fn: Callable[[jax.Array], Any]) -> Callable[[jax.Array], Any]:
    return lambda key: _strip_boxes(init_fn(key))


def sharded_abstract(
    init_fn: Callable[[jax.Array], Any],
    rng: jax.Array,
    mesh: Mesh,
    logical_specs_tree: Any = None,
    rules: LogicalRules = DEFAULT_RULES,
) -> Any:
    """`jax.ShapeDtypeStruct`s (with `.sharding`) of what `sharded_init` would return.

    Nothing is computed; this is the target tree for restoring a checkpoint straight into the
    sharded layout. See `sharded_init` for the arguments.
    """
    abstract = jax.eval_shape(init_fn, rng)
    if logical_specs_tree is None:
        logical_specs_tree = nn.get_partition_spec(abstract)
        abstract = _strip_boxes(abstract)
    shardings = logical_to_shardings(logical_specs_tree, abstract, mesh, rules)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def sharded_init(
    init_fn: Callable[[jax.Array], Any],
    rng: jax.Array,
    mesh: Mesh,
    logical_specs_tree: Any = None,
    rules: LogicalRules = DEFAULT_RULES,
) -> Any:
    """Parameters created directly in their sharded layout (nanodo's pattern).

    `jax.eval_shape(init_fn, rng)` gives shapes without computing anything; the shardings from
    `logical_to_shardings` become the `out_shardings` of `jax.jit(init_fn)`, so each device only
    ever computes and holds its own shard. `init_fn(rng)` returns the parameter tree;
    `logical_specs_tree` mirrors it with `PartitionSpec`s of logical names. With
    `logical_specs_tree=None` the specs are read from Flax `nn.LogicallyPartitioned` boxes in
    `init_fn`'s output, which is then returned unboxed.
    """
    abstract = sharded_abstract(init_fn, rng, mesh, logical_specs_tree, rules)
    fn = _unboxed(init_fn) if logical_specs_tree is None else init_fn
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    return jax.jit(fn, out_shardings=shardings)(rng)


def sharded_optimizer_init(
    tx: optax.GradientTransformation, params: Any, mesh: Mesh
) -> optax.OptState:
    """`tx.init(params)` laid out like `params`: moments share each parameter's sharding.

    A plain `jit(tx.init)` leaves scalars such as Adam's step count on one device, which a jit
    over the whole mesh then rejects; here every copy of the parameter tree inside the state
    takes the parameters' shardings and every other leaf is replicated. A masked copy
    (`optax.masked`, `multi_transform`) keeps its `MaskedNode`s, which hold no array.
    """
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    abstract = jax.eval_shape(tx.init, params)
    shardings = optax.tree_map_params(
        tx,
        lambda leaf, sharding: leaf if isinstance(leaf, optax.MaskedNode) else sharding,
        abstract,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda leaf: isinstance(leaf, optax.MaskedNode),
    )
    return jax.jit(tx.init, out_shardings=shardings)(params)


def rollout_rules(layout: str) -> LogicalRules:
    """The logical rules of a rollout layout ("train" or "serve", `ROLLOUT_LAYOUTS`)."""
    if layout not in ROLLOUT_LAYOUTS:
        raise ValueError(f"rollout layout {layout!r} is not one of {sorted(ROLLOUT_LAYOUTS)}")
    return ROLLOUT_LAYOUTS[layout]


def rollout_resharder(layout: str, logical_specs_tree: Any, mesh: Mesh
                      ) -> Callable[[Any], Any]:
    """params -> params in the rollout layout, for use inside the jitted step (the `rollout_params`
    hook of `rl.make_rl_programs`): the identity for "train"; for "serve" a sharding constraint
    to the `SERVE_RULES` shardings of `logical_specs_tree` (e.g. `models.param_logical_axes`), so
    the compiler gathers the FSDP shards once per step, before the decode loop."""
    rules = rollout_rules(layout)
    if layout == "train":
        return lambda params: params

    def reshard(params: Any) -> Any:
        shardings = logical_to_shardings(logical_specs_tree, params, mesh, rules)
        return jax.lax.with_sharding_constraint(params, shardings)

    return reshard
