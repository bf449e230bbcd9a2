"""The CTRL step of a 2B-8B model on a TPU slice, for the compile check (no TPU needed).

Command (needs libtpu: `make venv-tpu` once):
    .venv-tpu/bin/python experiments/compile_check.py \
        --config=configs/pod.py:model=gemma_2b,topology=v5e:16x16
Variants: `model=llama2_7b|llama3_8b|tiny`, `topology=v5p:4x4x4` (any of
`infra.aot.TOPOLOGIES`), `batch_size=256`, `prompt_len=1024`, `samples=8`, `new_tokens=128`;
any value with flags such as `--config.model.remat=save_dots --config.mesh.tensor=4
--config.rl.full_kl=false`.
Programs: `--config.check.programs=rl,calibration,reward` (the step, one calibration-pass call,
reward-model scoring); rollout layouts: `--config.check.layouts=train,serve` (decode from the
FSDP training layout, or from the serving layout resharded once per step; `infra.sharding`).

Expected: the TPU compiler's per-chip bytes (arguments, outputs, temporaries, total) against the
chip's HBM, FLOPs per step and a roofline step time; exit status 1 when the step leaves less
than `min_headroom` of HBM free. Measured numbers and compile times: docs/scaling.md ("Compiler
numbers"). `model=tiny,topology=v5e:2x2` compiles in a few seconds (the CI test,
`make test-tpu`).

Shapes (Hugging Face config.json of google/gemma-2b, meta-llama/Llama-2-7b-hf,
meta-llama/Meta-Llama-3-8B): bf16 parameters and activations, every decoder layer
rematerialised (`remat=full`). Workload (docs/scaling.md): 512 prompts x 4 samples a step,
512 prompt tokens, 256 new tokens, RLOO, reference table of 43,835 prompts (HH-RLHF
helpful-base) x K=100.
"""

from infalign_jax.core.transforms import transform_section
from infalign_jax.infra.config_utils import config_section, parse_arg
from infalign_jax.infra.sharding import MeshConfig
from infalign_jax.models import ModelConfig
from infalign_jax.rl import RLConfig
from infalign_jax.workflows.compile_check import CheckConfig

_BF16 = dict(dtype="bfloat16", param_dtype="bfloat16", remat="full")
MODELS = {
    "gemma_2b": dict(vocab_size=256000, d_model=2048, n_layers=18, n_heads=8, n_kv_heads=1,
                     head_dim=256, d_ff=16384, max_len=8192, norm_eps=1e-6,
                     tie_embeddings=True, activation="gelu_tanh", embed_scale=True,
                     rmsnorm_unit_offset=True, **_BF16),
    "llama2_7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      head_dim=128, d_ff=11008, max_len=4096, norm_eps=1e-5,
                      tie_embeddings=False, **_BF16),
    "llama3_8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, d_ff=14336, max_len=8192, norm_eps=1e-5,
                      rope_theta=500000.0, tie_embeddings=False, **_BF16),
    # For the CI test: every dimension a multiple of 128, so TPU tiling adds no padding.
    "tiny": dict(vocab_size=1024, d_model=256, n_layers=2, n_heads=2, n_kv_heads=2,
                 head_dim=128, d_ff=512, max_len=256, **_BF16),
}
WORKLOADS = {  # batch_size, prompt_len, samples, new_tokens, num_prompts, reference_k
    "tiny": (8, 16, 2, 8, 16, 8),
    "pod": (512, 512, 4, 256, 43835, 100),
}


def get_config(arg=None):
    a = parse_arg(arg, model="gemma_2b", topology="v5e:16x16", batch_size=0, prompt_len=0,
                  samples=0, new_tokens=0)
    if a.model not in MODELS:
        raise ValueError(f"config arg model: {a.model!r} is not one of {', '.join(MODELS)}")
    b, p, m, l, x, k = WORKLOADS["tiny" if a.model == "tiny" else "pod"]
    c = parse_arg(None, topology=a.topology, batch_size=a.batch_size or b,
                  prompt_len=a.prompt_len or p, num_prompts=x, reference_k=k, eos_id=1,
                  frozen_dtype="bfloat16", min_headroom=0.2, mfu=0.4)
    c.model = config_section(ModelConfig, **MODELS[a.model])
    c.transform = transform_section("exp", t=4.0)
    c.rl = config_section(RLConfig, samples_per_prompt=a.samples or m,
                          max_new_tokens=a.new_tokens or l, learning_rate=1e-6,
                          max_grad_norm=1.0)
    # Full FSDP over the slice (docs/scaling.md section 2).
    c.mesh = config_section(MeshConfig, data=1, fsdp=-1, tensor=1)
    # What to compile: programs among rl, calibration, reward; rollout layouts among train, serve.
    # A calibration call and a reward call take the shapes of the step's rollout where their
    # check.* shape is 0 (resolved after the flags: --config.batch_size reaches them).
    c.check = config_section(CheckConfig, programs="rl", layouts="train")
    c.lock()
    return c
