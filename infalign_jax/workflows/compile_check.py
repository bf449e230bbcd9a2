"""Does a CTRL step fit a TPU slice? Compile it for the slice on this machine and read the compiler.

    run(config) -> CompileCheck      for experiments/compile_check.py (configs/pod.py)

The step is the real one, `rl.make_rl_step` with the model's `decoder_fns`: rollout with the
KV-cache sampler (M samples per prompt), the reward-model forward, calibration against the
reference table + the transform, pi_ref log-probs, the update (Adam), the full-vocabulary KL
metric when `rl.full_kl`. Every input is a `jax.ShapeDtypeStruct` sharded over a mesh of the
slice's abstract devices (`infra.aot`), so nothing is materialised; the TPU compiler (libtpu)
partitions and schedules the program and reports per-chip bytes and FLOPs.

Layout (training mesh of `config.mesh`, rules of `infra.sharding`): the policy, its Adam moments,
pi_ref and the reward model are split by the parameter rules; the batch over ("data", "fsdp");
the reference table and the prompt table the reward model reads are replicated. pi_ref and the
reward model are `frozen_dtype` copies. The reward model is the policy's trunk with the single
head "reward" (`models.ModelConfig.heads`); its `RewardFn` takes the prompt table as part of its
frozen parameters (a jit argument, not a compile-time constant as in
`rewards.reward_models.reward_fn_from_model`), so a real-size table does not land in the program.

Not yet here (issue 17): a serving layout resharded once per step for decode (the rollout
samples from the training layout), the calibration pass, reward-model training, the critic of
advantage="gae".
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from infalign_jax import models, rl
from infalign_jax.core.transforms import transform_from_config
from infalign_jax.infra import aot, sharding
from infalign_jax.infra import validate as check
from infalign_jax.infra.config_utils import dataclass_from, section
from infalign_jax.rewards.reward_models import reward_fn_with_prompt_table

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One step's shapes: B prompts of P tokens, M (rl.samples_per_prompt) samples of L
    (rl.max_new_tokens) tokens each; X prompts in the reference table, K references each."""

    batch_size: int
    prompt_len: int
    num_prompts: int
    reference_k: int

    def __post_init__(self):
        check.ints(self, ("batch_size", "prompt_len", "num_prompts", "reference_k"))


@dataclasses.dataclass(frozen=True)
class CompileCheck:
    report: aot.CompileReport
    expected_argument_bytes: int   # what the input shardings imply per device
    flops_estimate: float          # per device, from the shapes (`step_flops`)
    model_cfg: models.ModelConfig
    rl_cfg: rl.RLConfig
    workload: Workload
    mesh_shape: dict[str, int]


class DoesNotFit(Exception):
    """The TPU compiler refused the program: its temporaries alone exceed a device's HBM."""


def _dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"config.frozen_dtype: {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def configs(config: Any) -> tuple[models.ModelConfig, rl.RLConfig, sharding.MeshConfig, Workload]:
    """The validated sections of a `configs/pod.py` config."""
    model_cfg = dataclass_from(models.ModelConfig, section(config, "model"), "model")
    name, params = transform_from_config(section(config, "transform"), strict=True)
    rl_cfg = dataclass_from(rl.RLConfig, section(config, "rl"), "rl", transform=name,
                            transform_params=params, eos_id=int(config.eos_id), pad_id=0)
    if rl_cfg.advantage == "gae":
        raise ValueError("config.rl.advantage='gae': the compile check has no critic yet; use "
                         "'rloo'")
    mesh_cfg = dataclass_from(sharding.MeshConfig, section(config, "mesh"), "mesh")
    work = Workload(int(config.batch_size), int(config.prompt_len), int(config.num_prompts),
                    int(config.reference_k))
    if work.prompt_len + rl_cfg.max_new_tokens > model_cfg.max_len:
        raise ValueError(f"config.prompt_len + config.rl.max_new_tokens = "
                         f"{work.prompt_len + rl_cfg.max_new_tokens} exceeds "
                         f"config.model.max_len={model_cfg.max_len}")
    return model_cfg, rl_cfg, mesh_cfg, work


def _abstract_params(cfg: models.ModelConfig, mesh: Any, dtype: Any = None) -> Any:
    shapes = jax.eval_shape(lambda r: models.init_params(cfg, r), jax.random.key(0))
    if dtype is not None:
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)
    shardings = sharding.logical_to_shardings(models.param_logical_axes(cfg), shapes, mesh)
    return aot.abstract(shapes, shardings)


def _abstract_opt_state(optimizer: optax.GradientTransformation, params: Any, mesh: Any) -> Any:
    """Like `sharding.sharded_optimizer_init`, abstract: moments take their parameter's sharding,
    every other leaf is replicated."""
    shapes = jax.eval_shape(optimizer.init, params)
    shardings = optax.tree_map_params(
        optimizer, lambda _, p: p.sharding, shapes, params,
        transform_non_params=lambda _: sharding.replicated(mesh))
    return aot.abstract(shapes, shardings)


def abstract_inputs(model_cfg: models.ModelConfig, rl_cfg: rl.RLConfig, work: Workload,
                    mesh: Any, frozen_dtype: Any, optimizer: optax.GradientTransformation
                    ) -> tuple[rl.RLState, rl.Frozen, dict[str, Any], Any]:
    """(state, frozen, batch, rng) of one step as sharded `ShapeDtypeStruct`s."""
    rep = sharding.replicated(mesh)

    def rep_struct(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

    params = _abstract_params(model_cfg, mesh)
    extra = jax.eval_shape(lambda: rl.init_extra_state(rl_cfg))
    state = rl.RLState(params, _abstract_opt_state(optimizer, params, mesh),
                       rep_struct((), jnp.int32),
                       **{k: rep_struct(v.shape, v.dtype) for k, v in extra.items()})
    rm_cfg = dataclasses.replace(model_cfg, heads=("reward",))
    x, p, k = work.num_prompts, work.prompt_len, work.reference_k
    reward_params = {"params": _abstract_params(rm_cfg, mesh, frozen_dtype),
                     "prompts_XxP": rep_struct((x, p), jnp.int32),
                     "prompt_mask_XxP": rep_struct((x, p), jnp.bool_)}
    frozen = rl.Frozen(_abstract_params(model_cfg, mesh, frozen_dtype), reward_params,
                       rep_struct((x, k), jnp.float32), rep_struct((x,), jnp.int32))
    b = work.batch_size

    def batch_struct(shape, dtype):
        split = sharding.batch_sharding(mesh, len(shape))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=split)

    batch = {"prompt_BxP": batch_struct((b, p), jnp.int32),
             "prompt_mask_BxP": batch_struct((b, p), jnp.bool_),
             "prompt_idx_B": batch_struct((b,), jnp.int32)}
    key = jax.eval_shape(lambda: jax.random.key(0))
    return state, frozen, batch, rep_struct(key.shape, key.dtype)


def step_flops(model_cfg: models.ModelConfig, rl_cfg: rl.RLConfig, work: Workload) -> float:
    """Matmul FLOPs of one step over the whole slice, from the shapes (attention scores and
    element-wise work left out): 2 FLOPs per weight per token forward, 4 more backward, 2 more
    for the recompute of a rematerialised trunk. The lm head is counted at the positions where
    logits exist: the last prompt token and each decode step in the rollout, the L response
    positions in the teacher-forced passes (`sampling.sequence_logprobs`)."""
    d, v = model_cfg.d_model, model_cfg.vocab_size
    head = d * v
    trunk = model_cfg.n_params - head * (1 if model_cfg.tie_embeddings else 2)
    b, p, m, l = work.batch_size, work.prompt_len, rl_cfg.samples_per_prompt, rl_cfg.max_new_tokens
    r, t = b * m, p + l
    rollout = 2 * trunk * b * p + 2 * head * b + 2 * (trunk + head) * r * l
    forward = 2 * trunk * r * t + 2 * head * r * l            # one teacher-forced pass
    reward = 2 * trunk * r * t
    epochs = 1 if rl_cfg.algorithm == "rloo" else rl_cfg.ppo_epochs
    update = epochs * (3 + (model_cfg.remat != "none")) * forward
    full_kl = 2 * forward if rl_cfg.full_kl else 0
    return float(rollout + forward + reward + update + full_kl)


def compile_step(model_cfg: models.ModelConfig, rl_cfg: rl.RLConfig, work: Workload,
                 mesh: Any, frozen_dtype: Any = jnp.bfloat16) -> tuple[Any, Any, float]:
    """(compiled step, abstract inputs, compile seconds) of the CTRL step on `mesh`."""
    optimizer = rl.make_optimizer(rl_cfg)
    inputs = abstract_inputs(model_cfg, rl_cfg, work, mesh, frozen_dtype, optimizer)
    rm_cfg = dataclasses.replace(model_cfg, heads=("reward",))
    step = rl.make_rl_step(rl_cfg, models.decoder_fns(model_cfg), reward_fn_with_prompt_table(rm_cfg),
                           optimizer)
    state_sh = jax.tree.map(lambda x: x.sharding, inputs[0])
    start = time.perf_counter()
    with sharding.axis_rules(mesh):
        jitted = jax.jit(step, out_shardings=(state_sh, sharding.replicated(mesh)),
                         donate_argnums=(0,))
        lowered = jitted.lower(*inputs)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e) and "HbmOom" not in str(e):
                raise
            raise DoesNotFit(str(e).splitlines()[0]) from None
    return compiled, inputs, time.perf_counter() - start


def run(config: Any) -> CompileCheck:
    """Compiles the CTRL step of `config` (configs/pod.py) for `config.topology`; raises
    `DoesNotFit` with the compiler's message when it refuses for lack of HBM."""
    model_cfg, rl_cfg, mesh_cfg, work = configs(config)
    topology = str(config.topology)
    mesh = aot.topology_mesh(topology, mesh_cfg)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if work.batch_size % shards:
        raise ValueError(f"config.batch_size={work.batch_size} is not divisible by the {shards} "
                         f"batch shards of the mesh {dict(mesh.shape)}")
    compiled, inputs, seconds = compile_step(model_cfg, rl_cfg, work, mesh,
                                             _dtype(str(config.frozen_dtype)))
    report = aot.compile_report(compiled, topology, mesh.devices.size, seconds)
    return CompileCheck(report, aot.sharded_bytes(inputs),
                        step_flops(model_cfg, rl_cfg, work) / report.num_devices,
                        model_cfg, rl_cfg, work, dict(mesh.shape))


def summary(check: CompileCheck, mfu: float = 0.4) -> str:
    """The report plus the expected argument bytes, the shape-based FLOPs and step times."""
    r, w = check.report, check.workload
    extra = [
        ("mesh", str(check.mesh_shape)),
        ("workload", f"B={w.batch_size} prompts x M={check.rl_cfg.samples_per_prompt} samples, "
                     f"P={w.prompt_len}, L={check.rl_cfg.max_new_tokens}, "
                     f"{check.rl_cfg.algorithm}, remat={check.model_cfg.remat}"),
        ("params (policy)", f"{check.model_cfg.n_params / 1e9:.3f} B"),
        ("arguments implied by shardings", aot.gib(check.expected_argument_bytes)),
        ("FLOPs / device (from shapes)", f"{check.flops_estimate:.4g}"),
        ("step time, roofline", f"{r.step_time_s(check.flops_estimate):.2f} s at 100% of peak, "
                                f"{r.step_time_s(check.flops_estimate, mfu):.2f} s at "
                                f"{100 * mfu:.0f}% MFU (matmul FLOPs only; decode is "
                                f"HBM-bound, so this is a lower bound)"),
    ]
    return aot.format_report(r, extra)
