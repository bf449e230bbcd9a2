"""Does a CTRL step fit a TPU slice? Compile it for the slice on this machine and read the compiler.

    plan(config) -> [(program, layout)]             what `config.check` asks to compile
    check_one(config, program, layout) -> CompileCheck
    run(config) -> [CompileCheck]                   for experiments/compile_check.py (configs/pod.py)

Programs (`config.check.programs`, comma-separated; `PROGRAMS`):
* "rl": the real step as the trainer runs it (`loops.train.guarded_rl_step`, under the
  non-finite guard) with the model's `decoder_fns`: rollout with the
  KV-cache sampler (M samples per prompt), the reward-model forward, calibration against the
  reference table + the transform, pi_ref log-probs, the update (Adam), the full-vocabulary KL
  metric when `rl.full_kl`.
* "calibration": one call of the calibration pass (`rl.calibration_pass`, InfAlign Algorithm 1
  step 1): `check.calibration_prompts` prompts prefilled once, `check.calibration_chunk`
  continuations each sampled from pi_ref over the shared prompt KV (`sampling.sample`), scored by
  the reward model, each prompt's rewards sorted (the rows of the reference table). A pass over
  the X prompts x K samples is ceil(X / prompts) x ceil(K / chunk) such calls.
* "reward": reward-model scoring, `reward_models.sequence_rewards` (the trunk with the head
  "reward") over `check.reward_batch` sequences of `check.reward_len` tokens.

Every input is a `jax.ShapeDtypeStruct` sharded over a mesh of the slice's abstract devices
(`infra.aot`), so nothing is materialised; the TPU compiler (libtpu) partitions and schedules the
program and reports per-chip bytes, FLOPs and (read from its HLO) the bytes its collectives move.

Layout (training mesh of `config.mesh`, rules of `infra.sharding`): the policy, its Adam moments,
pi_ref and the reward model are split by the parameter rules; the batch over ("data", "fsdp");
the reference table and the prompt table the reward model reads are replicated. pi_ref and the
reward model are `frozen_dtype` copies. The reward model is the policy's trunk with the single
head "reward" (`models.ModelConfig.heads`); its `RewardFn` takes the prompt table as part of its
frozen parameters (a jit argument, not a compile-time constant as in
`rewards.reward_models.reward_fn_from_model`), so a real-size table does not land in the program.
Rollout layouts (`config.check.layouts`, `sharding.ROLLOUT_LAYOUTS`): "train" decodes from the
training layout; "serve" reshards the policy once per step to `sharding.SERVE_RULES` (split
over "tensor" only) through `rl.make_rl_step`'s `rollout_params` hook. For "calibration" the
layout is that of pi_ref's input parameters.

Not here: reward-model training, the critic of advantage="gae".
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from infalign_jax import models, rl
from infalign_jax.loops import train
from infalign_jax.core.transforms import transform_from_config
from infalign_jax.infra import aot, sharding
from infalign_jax.infra import validate as check
from infalign_jax.infra.config_utils import (UNUSED_OPTION_RULES, comma_list, dataclass_from,
                                             section)
from infalign_jax.decoding.sampling import sample
from infalign_jax.rewards.reward_models import reward_fn_with_prompt_table, sequence_rewards

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
PROGRAMS = ("rl", "calibration", "reward")
MODULES = {"rl": "rl_step", "calibration": "calibration_chunk", "reward": "reward_scoring"}


def _names(where: str, text: str, known: Any) -> tuple[str, ...]:
    names = comma_list(text)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"config.check.{where}: {unknown or text!r} not among {sorted(known)} "
                         f"(comma-separated)")
    if len(set(names)) != len(names):
        raise ValueError(f"config.check.{where}: {text!r} names one twice")
    return names


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    """What the compile check compiles (`config.check`)."""

    programs: str = "rl"              # comma-separated among PROGRAMS
    layouts: str = "train"            # rollout layouts for rl / calibration (ROLLOUT_LAYOUTS)
    # The shapes of a calibration call and a reward call; 0 (the default) takes the step's
    # rollout's, resolved by `check_config` from the config's other flags.
    calibration_prompts: int = 0      # prompts per calibration call (its `batch_prompts`)
    calibration_chunk: int = 0        # samples per prompt per call (its `sampling.n`)
    reward_batch: int = 0             # sequences per reward-model call
    reward_len: int = 0               # tokens per scored sequence, [prompt | response]

    def __post_init__(self):
        check.ints(self, ("calibration_prompts", "calibration_chunk", "reward_batch",
                          "reward_len"), low=0)
        _names("programs", self.programs, PROGRAMS)
        _names("layouts", self.layouts, sharding.ROLLOUT_LAYOUTS)

    @property
    def program_list(self) -> tuple[str, ...]:
        return _names("programs", self.programs, PROGRAMS)

    @property
    def layout_list(self) -> tuple[str, ...]:
        return _names("layouts", self.layouts, sharding.ROLLOUT_LAYOUTS)


# The check options each program reads; an override of one whose programs are all left out
# of check.programs is refused (`UNUSED_OPTION_RULES`).
CHECK_READERS = {"calibration_prompts": ("calibration",), "calibration_chunk": ("calibration",),
                 "reward_batch": ("reward",), "reward_len": ("reward",),
                 "layouts": ("rl", "calibration")}


def unused_check_options(config: Any) -> dict[str, str]:
    check_section = config.get("check")
    if not isinstance(check_section, dict) or "programs" not in check_section:
        return {}
    programs = set(comma_list(check_section["programs"]))
    return {f"check.{key}": f"check.programs including {' or '.join(map(repr, readers))}"
            for key, readers in CHECK_READERS.items() if not programs & set(readers)}


UNUSED_OPTION_RULES.append(unused_check_options)


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
    program: str                   # one of PROGRAMS
    layout: str                    # the rollout layout ("train" for "reward")
    report: aot.CompileReport
    expected_argument_bytes: int   # what the input shardings imply per device
    flops_estimate: float          # per device, from the shapes (`step_flops`, ...)
    model_cfg: models.ModelConfig
    rl_cfg: rl.RLConfig
    workload: str                  # the program's shapes, one line
    mesh_shape: dict[str, int]
    calls: int = 1                 # calls of this program a unit of work takes (a calibration pass)

    @property
    def module(self) -> str:
        """The jitted function's name (the compiler's module, `aot.largest_buffers`)."""
        return MODULES[self.program]


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


def check_config(config: Any) -> CheckConfig:
    """The validated `config.check` section, its 0 shapes those of the step's rollout: B prompts
    x M samples per prompt, B * M sequences of P + L tokens (so `--config.batch_size` and the rl
    flags reach them; computed in configs/pod.py, they kept the file's values)."""
    cc = dataclass_from(CheckConfig, section(config, "check"), "check")
    _, rl_cfg, _, work = configs(config)
    m = rl_cfg.samples_per_prompt
    return dataclasses.replace(
        cc, calibration_prompts=cc.calibration_prompts or work.batch_size,
        calibration_chunk=cc.calibration_chunk or m,
        reward_batch=cc.reward_batch or work.batch_size * m,
        reward_len=cc.reward_len or work.prompt_len + rl_cfg.max_new_tokens)


def _abstract_params(cfg: models.ModelConfig, mesh: Any, dtype: Any = None,
                     rules: sharding.LogicalRules = sharding.DEFAULT_RULES) -> Any:
    shapes = jax.eval_shape(lambda r: models.init_params(cfg, r), jax.random.key(0))
    if dtype is not None:
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)
    shardings = sharding.logical_to_shardings(models.param_logical_axes(cfg), shapes, mesh, rules)
    return aot.abstract(shapes, shardings)


def _rep_struct(mesh: Any, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(mesh))


def _batch_struct(mesh: Any, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def _reward_params(model_cfg: models.ModelConfig, work: Workload, mesh: Any, frozen_dtype: Any
                   ) -> dict[str, Any]:
    """The reward model's frozen parameters with the prompt table it reads (replicated)."""
    rm_cfg = dataclasses.replace(model_cfg, heads=("reward",))
    x, p = work.num_prompts, work.prompt_len
    return {"params": _abstract_params(rm_cfg, mesh, frozen_dtype),
            "prompts_XxP": _rep_struct(mesh, (x, p), jnp.int32),
            "prompt_mask_XxP": _rep_struct(mesh, (x, p), jnp.bool_)}


def _prompt_batch(mesh: Any, b: int, p: int) -> dict[str, Any]:
    return {"prompt_BxP": _batch_struct(mesh, (b, p), jnp.int32),
            "prompt_mask_BxP": _batch_struct(mesh, (b, p), jnp.bool_),
            "prompt_idx_B": _batch_struct(mesh, (b,), jnp.int32)}


def _key_struct(mesh: Any) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return _rep_struct(mesh, key.shape, key.dtype)


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
    params = _abstract_params(model_cfg, mesh)
    extra = jax.eval_shape(lambda: rl.init_extra_state(rl_cfg))
    state = rl.RLState(params, _abstract_opt_state(optimizer, params, mesh),
                       _rep_struct(mesh, (), jnp.int32),
                       **{k: _rep_struct(mesh, v.shape, v.dtype) for k, v in extra.items()})
    x, k = work.num_prompts, work.reference_k
    frozen = rl.Frozen(_abstract_params(model_cfg, mesh, frozen_dtype),
                       _reward_params(model_cfg, work, mesh, frozen_dtype),
                       _rep_struct(mesh, (x, k), jnp.float32), _rep_struct(mesh, (x,), jnp.int32))
    return state, frozen, _prompt_batch(mesh, work.batch_size, work.prompt_len), _key_struct(mesh)


def _trunk_and_head(model_cfg: models.ModelConfig) -> tuple[int, int]:
    head = model_cfg.d_model * model_cfg.vocab_size
    return model_cfg.n_params - head * (1 if model_cfg.tie_embeddings else 2), head


def sampling_flops(model_cfg: models.ModelConfig, b: int, p: int, m: int, l: int) -> float:
    """Matmul FLOPs of sampling m continuations of l tokens for each of b prompts of p tokens:
    one prefill (logits at the last prompt token only), then l decode steps of b*m rows."""
    trunk, head = _trunk_and_head(model_cfg)
    return float(2 * trunk * b * p + 2 * head * b + 2 * (trunk + head) * b * m * l)


def step_flops(model_cfg: models.ModelConfig, rl_cfg: rl.RLConfig, work: Workload) -> float:
    """Matmul FLOPs of one step over the whole slice, from the shapes (attention scores and
    element-wise work left out): 2 FLOPs per weight per token forward, 4 more backward, 2 more
    for the recompute of a rematerialised trunk. The lm head is counted at the positions where
    logits exist: the last prompt token and each decode step in the rollout, the L response
    positions in the teacher-forced passes (`sampling.sequence_logprobs`)."""
    trunk, head = _trunk_and_head(model_cfg)
    b, p, m, l = work.batch_size, work.prompt_len, rl_cfg.samples_per_prompt, rl_cfg.max_new_tokens
    r, t = b * m, p + l
    rollout = sampling_flops(model_cfg, b, p, m, l)
    forward = 2 * trunk * r * t + 2 * head * r * l            # one teacher-forced pass
    reward = 2 * trunk * r * t
    epochs = 1 if rl_cfg.algorithm == "rloo" else rl_cfg.ppo_epochs
    update = epochs * (3 + (model_cfg.remat != "none")) * forward
    full_kl = 2 * forward if rl_cfg.full_kl else 0
    return float(rollout + forward + reward + update + full_kl)


def _compile(fn: Any, inputs: tuple, mesh: Any, program: str, **jit_kwargs: Any
             ) -> tuple[Any, float]:
    """(compiled, seconds) of `jax.jit(fn, **jit_kwargs)` on the abstract `inputs`; raises
    `DoesNotFit` when the compiler refuses for lack of HBM."""
    start = time.perf_counter()
    with sharding.axis_rules(mesh):
        lowered = jax.jit(fn, **jit_kwargs).lower(*inputs)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e) and "HbmOom" not in str(e):
                raise
            raise DoesNotFit(f"{program}: {str(e).splitlines()[0]}") from None
    return compiled, time.perf_counter() - start


def compile_step(model_cfg: models.ModelConfig, rl_cfg: rl.RLConfig, work: Workload,
                 mesh: Any, frozen_dtype: Any = jnp.bfloat16, layout: str = "train"
                 ) -> tuple[Any, Any, float]:
    """(compiled step, abstract inputs, compile seconds) of the CTRL step on `mesh`, its rollout
    decoding from the rollout `layout` (`sharding.ROLLOUT_LAYOUTS`)."""
    optimizer = rl.make_optimizer(rl_cfg)
    inputs = abstract_inputs(model_cfg, rl_cfg, work, mesh, frozen_dtype, optimizer)
    rm_cfg = dataclasses.replace(model_cfg, heads=("reward",))
    reshard = sharding.rollout_resharder(layout, models.param_logical_axes(model_cfg), mesh)
    # the step as the trainer runs it (guarded), which is what has to fit
    guarded = train.guarded_rl_step(rl_cfg, models.decoder_fns(model_cfg),
                                    reward_fn_with_prompt_table(rm_cfg), optimizer,
                                    None if layout == "train" else reshard)

    def rl_step(state, frozen, batch, rng):   # the compiler's module is named for it (MODULES)
        return guarded(state, frozen, batch, rng)

    state_sh = jax.tree.map(lambda x: x.sharding, inputs[0])
    compiled, seconds = _compile(rl_step, inputs, mesh, "rl", donate_argnums=(0,),
                                 out_shardings=(state_sh, sharding.replicated(mesh)))
    return compiled, inputs, seconds


def calibration_program(model_cfg: models.ModelConfig, sampling_cfg: Any) -> Any:
    """The device work of one calibration-pass call (`rl.calibration_pass.run_calibration`):
    prefill the B prompts once, sample `sampling_cfg.n` continuations of each from pi_ref over
    the shared prompt KV, score them with the reward model, sort each prompt's rewards (the
    rows of the reference table, `calibration.build_reference_table`)."""
    fns = models.decoder_fns(model_cfg)
    reward_fn = reward_fn_with_prompt_table(dataclasses.replace(model_cfg, heads=("reward",)))
    n = sampling_cfg.n

    def calibration_chunk(ref_params, reward_params, batch, rng):
        out = sample(fns, ref_params, batch["prompt_BxP"], batch["prompt_mask_BxP"], rng,
                     sampling_cfg)
        b, length = out.tokens_BxNxL.shape[0], sampling_cfg.max_new_tokens
        rewards_R = reward_fn(reward_params, jnp.repeat(batch["prompt_idx_B"], n),
                              out.tokens_BxNxL.reshape(b * n, length),
                              out.mask_BxNxL.reshape(b * n, length))
        return jnp.sort(rewards_R.astype(jnp.float32).reshape(b, n), axis=-1)

    return calibration_chunk


def compile_calibration(model_cfg: models.ModelConfig, rl_cfg: rl.RLConfig, work: Workload,
                        cc: CheckConfig, mesh: Any, frozen_dtype: Any, layout: str
                        ) -> tuple[Any, Any, float]:
    """(compiled, abstract inputs, seconds) of one calibration call, pi_ref in `layout`."""
    sampling_cfg = dataclasses.replace(rl_cfg.sampling(), n=cc.calibration_chunk)
    inputs = (_abstract_params(model_cfg, mesh, frozen_dtype, sharding.rollout_rules(layout)),
              _reward_params(model_cfg, work, mesh, frozen_dtype),
              _prompt_batch(mesh, cc.calibration_prompts, work.prompt_len), _key_struct(mesh))
    compiled, seconds = _compile(calibration_program(model_cfg, sampling_cfg), inputs, mesh,
                                 "calibration", out_shardings=sharding.batch_sharding(mesh, 2))
    return compiled, inputs, seconds


def compile_reward(model_cfg: models.ModelConfig, work: Workload, cc: CheckConfig, mesh: Any,
                   frozen_dtype: Any) -> tuple[Any, Any, float]:
    """(compiled, abstract inputs, seconds) of reward-model scoring: `check.reward_batch`
    sequences of `check.reward_len` tokens, [prompt_len prompt | the rest response]."""
    rm_cfg = dataclasses.replace(model_cfg, heads=("reward",))
    r, p, t = cc.reward_batch, work.prompt_len, cc.reward_len
    if t <= p:
        raise ValueError(f"config.check.reward_len={t} must exceed config.prompt_len={p} (the "
                         f"scored sequences are [prompt | response])")
    if t > model_cfg.max_len:
        raise ValueError(f"config.check.reward_len={t} exceeds config.model.max_len="
                         f"{model_cfg.max_len}")

    def reward_scoring(params, prompt_RxP, prompt_mask_RxP, response_RxL, response_mask_RxL):
        return sequence_rewards(rm_cfg, params, prompt_RxP, prompt_mask_RxP, response_RxL,
                                response_mask_RxL)

    inputs = (_abstract_params(rm_cfg, mesh, frozen_dtype),
              _batch_struct(mesh, (r, p), jnp.int32), _batch_struct(mesh, (r, p), jnp.bool_),
              _batch_struct(mesh, (r, t - p), jnp.int32), _batch_struct(mesh, (r, t - p), jnp.bool_))
    compiled, seconds = _compile(reward_scoring, inputs, mesh, "reward",
                                 out_shardings=sharding.batch_sharding(mesh, 1))
    return compiled, inputs, seconds


def plan(config: Any) -> list[tuple[str, str]]:
    """The (program, rollout layout) pairs `config.check` asks for, in order; "reward" does not
    decode, so it is compiled once, in the training layout."""
    cc = check_config(config)
    return [(program, layout) for program in cc.program_list
            for layout in (cc.layout_list if program != "reward" else ("train",))]


def _check_rows(mesh: Any, rows: int, key: str) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise ValueError(f"config.{key}={rows} is not divisible by the {shards} batch shards of "
                         f"the mesh {dict(mesh.shape)}")


def check_one(config: Any, program: str, layout: str = "train") -> CompileCheck:
    """Compiles one program of `config` (configs/pod.py) for `config.topology`; raises
    `DoesNotFit` with the compiler's message when it refuses for lack of HBM."""
    if program not in PROGRAMS:
        raise ValueError(f"program {program!r} is not one of {PROGRAMS}")
    model_cfg, rl_cfg, mesh_cfg, work = configs(config)
    cc = check_config(config)
    sharding.rollout_rules(layout)
    frozen_dtype = _dtype(str(config.frozen_dtype))
    topology = str(config.topology)
    mesh = aot.topology_mesh(topology, mesh_cfg)
    m, l = rl_cfg.samples_per_prompt, rl_cfg.max_new_tokens
    calls = 1
    if program == "rl":
        _check_rows(mesh, work.batch_size, "batch_size")
        compiled, inputs, seconds = compile_step(model_cfg, rl_cfg, work, mesh, frozen_dtype,
                                                 layout)
        flops = step_flops(model_cfg, rl_cfg, work)
        shapes = (f"B={work.batch_size} prompts x M={m} samples, P={work.prompt_len}, L={l}, "
                  f"{rl_cfg.algorithm}, remat={model_cfg.remat}")
    elif program == "calibration":
        b, n = cc.calibration_prompts, cc.calibration_chunk
        _check_rows(mesh, b, "check.calibration_prompts")
        compiled, inputs, seconds = compile_calibration(model_cfg, rl_cfg, work, cc, mesh,
                                                        frozen_dtype, layout)
        flops = sampling_flops(model_cfg, b, work.prompt_len, n, l) + \
            2 * _trunk_and_head(model_cfg)[0] * b * n * (work.prompt_len + l)
        calls = -(-work.num_prompts // b) * -(-work.reference_k // n)
        shapes = (f"{b} prompts x {n} samples a call, P={work.prompt_len}, L={l}; a pass over "
                  f"X={work.num_prompts} prompts x K={work.reference_k} = {calls} calls")
    else:
        _check_rows(mesh, cc.reward_batch, "check.reward_batch")
        compiled, inputs, seconds = compile_reward(model_cfg, work, cc, mesh, frozen_dtype)
        flops = 2.0 * _trunk_and_head(model_cfg)[0] * cc.reward_batch * cc.reward_len
        shapes = f"{cc.reward_batch} sequences x T={cc.reward_len} tokens, remat={model_cfg.remat}"
    report = aot.compile_report(compiled, topology, mesh.devices.size, seconds)
    return CompileCheck(program, layout, report, aot.sharded_bytes(inputs),
                        flops / report.num_devices, model_cfg, rl_cfg, shapes, dict(mesh.shape),
                        calls)


def run(config: Any) -> list[CompileCheck]:
    """`check_one` for each (program, layout) of `plan(config)`."""
    return [check_one(config, program, layout) for program, layout in plan(config)]


def summary(check: CompileCheck, mfu: float = 0.4) -> str:
    """The report plus the expected argument bytes, the shape-based FLOPs, step times and the
    collectives' bytes."""
    r = check.report
    time_100, time_mfu = r.step_time_s(check.flops_estimate), r.step_time_s(check.flops_estimate,
                                                                             mfu)
    extra = [
        ("program", f"{check.program} (rollout layout: {check.layout})"
                    if check.program != "reward" else check.program),
        ("mesh", str(check.mesh_shape)),
        ("workload", check.workload),
        ("params (policy)", f"{check.model_cfg.n_params / 1e9:.3f} B"),
        ("arguments implied by shardings", aot.gib(check.expected_argument_bytes)),
        ("FLOPs / device (from shapes)", f"{check.flops_estimate:.4g}"),
        ("time, roofline", f"{time_100:.2f} s at 100% of peak, {time_mfu:.2f} s at "
                           f"{100 * mfu:.0f}% MFU (matmul FLOPs only; decode is HBM-bound, so "
                           f"this is a lower bound)"),
    ]
    if check.calls > 1:
        extra.append(("whole pass, roofline", f"{check.calls} calls: {check.calls * time_100:.0f} "
                                              f"s at 100%, {check.calls * time_mfu:.0f} s at "
                                              f"{100 * mfu:.0f}% MFU"))
    if r.collectives is None:
        extra.append(("collectives / device", "not counted (the compiler could not print the "
                                              "optimised program)"))
    else:
        c = r.collectives
        extra.append(("collectives / device", f"{aot.gib(c.total)} a call; in decode loops "
                                              f"{aot.gib(c.decode)} ({aot.gib(c.decode_per_token)}"
                                              f" a token) (loops at their bound, {c.ops} ops)"))
    return aot.format_report(r, extra)
