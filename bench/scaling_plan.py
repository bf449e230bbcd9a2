"""Back-of-envelope scaling plan for InfAlign-CTRL: memory, FLOPs and step times (docs/scaling.md).

    python bench/scaling_plan.py            # prints every table of docs/scaling.md as markdown

Pure Python (no JAX): every number in docs/scaling.md comes from the formulas below and the
assumptions in `HARDWARE`, `MODELS`, `DATASETS` and `Assume`, each marked with its source there.
Units: bytes, FLOPs, seconds; GB = 1e9 bytes, GiB = 2**30 bytes.

What it models (one CTRL step of `infalign_jax.rl.make_rl_step`):
  rollout   prefill B prompts once, decode M samples each for L steps (memory-bound roofline)
  scoring   reward-model forward over the B*M (prompt + response) rows
  reference frozen pi_ref forward over the same rows (log-probs for the KL term)
  update    policy forward + backward, 1 epoch (RLOO) or `ppo_epochs` epochs (PPO)
  full_kl   the optional exact-KL metric: one more policy and one more pi_ref forward
and the offline calibration pass (K base samples per prompt, scored once: InfAlign Alg. 1 step 1).
"""

from __future__ import annotations

import dataclasses
import math

GB, GiB = 1e9, 2.0 ** 30


# --------------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class Model:
    """Llama-family decoder shapes (the fields of `infalign_jax.models.ModelConfig`)."""

    name: str
    vocab: int
    d_model: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    d_ff: int
    tied: bool

    @property
    def n_params(self) -> int:
        """Same formula as `ModelConfig.n_params` (llama family; norms, < 0.01%, left out)."""
        d, h = self.d_model, self.head_dim
        attn = d * h * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * d * self.d_ff
        emb = self.vocab * d * (1 if self.tied else 2)
        return emb + self.layers * (attn + mlp)

    @property
    def n_rm_params(self) -> int:
        """Same trunk with a scalar reward head instead of an (untied) lm head."""
        return self.n_params - (0 if self.tied else self.vocab * self.d_model) + self.d_model + 1

    @property
    def n_matmul(self) -> int:
        """Parameters that take part in a matmul per token (the input embedding is a gather,
        but with tied embeddings the same matrix is the lm head)."""
        return self.n_params - (0 if self.tied else self.vocab * self.d_model)

    @property
    def n_head(self) -> int:
        """The lm head's parameters (vocab x d, tied or not): the library computes logits only
        where they are read (a prefill's last position, the response positions)."""
        return self.vocab * self.d_model

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V for every layer: layers * 2 * kv_heads * head_dim * bytes."""
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes

    def attn_flops_per_token(self, ctx: int, backward: bool = False) -> float:
        """QK^T and PV over `ctx` keys: 2 matmuls * 2 FLOPs * ctx * heads * head_dim per layer
        (x3 with the backward pass). Our attention is the plain einsum over the whole mask, so no
        causal halving."""
        f = 4 * self.layers * ctx * self.heads * self.head_dim
        return 3 * f if backward else f

    def act_bytes_per_token_layer(self, ctx: int, tensor: int) -> float:
        """Bytes one token leaves saved for the backward pass in one block (no remat), from
        `models/transformer.py`: bf16 activations, f32 norm statistics, f32 attention scores
        plus bf16 probabilities over `ctx` keys (no flash attention), gated MLP. Head and MLP
        parts are split by the tensor axis. An estimate, +-30% (XLA fuses some, copies others)."""
        d, h, kv, dh, f = self.d_model, self.heads, self.kv_heads, self.head_dim, self.d_ff
        replicated = 2 * 4 * d + 4 * 2 * d                      # x, norm outs, residual; f32 norms
        split = (2 * 2 * (h + 2 * kv) * dh                      # q, k, v before and after rope
                 + 2 * h * dh                                   # attention output
                 + 6 * h * ctx                                  # scores f32 + probs bf16
                 + 2 * 3 * f)                                   # gate, up, act(gate) * up
        return replicated + split / tensor


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    devices: int
    hbm: float          # bytes per device
    peak: float         # dense bf16 FLOP/s per device
    hbm_bw: float       # bytes/s per device
    link_bw: float      # one-way collective bandwidth per device, bytes/s
    alpha: float        # latency of one small collective, s (rough, unsourced: see docs)
    max_tensor: int     # largest tensor-parallel group considered for serving


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train_prompts: int
    prompt_len: int     # P: left-padded prompt budget (tokens)
    response_len: int   # L: max_new_tokens


@dataclasses.dataclass(frozen=True)
class Assume:
    """Efficiency assumptions (docs/scaling.md, "Assumptions", says why each)."""

    usable_hbm: float = 0.90      # fraction of HBM left after runtime reserve and fragmentation
    mfu_train: float = 0.40       # fwd+bwd model-FLOP utilisation
    mfu_fwd: float = 0.40         # forward-only (prefill, scoring, reference log-probs)
    mfu_decode: float = 0.40      # compute-bound decode steps (large batches)
    hbm_eff: float = 0.70         # achieved / peak HBM bandwidth in decode
    link_eff: float = 0.70        # achieved / peak collective bandwidth
    logit_copies: int = 3         # f32 logits, log-softmax, its gradient (update phase)


MODELS = (
    # google/gemma-2b config.json (Gemma v1): MQA, 256k vocab, GeGLU, tied embeddings.
    Model("Gemma-2B-like", 256_000, 2048, 18, 8, 1, 256, 16_384, tied=True),
    # meta-llama/Llama-2-7b-hf config.json: MHA, 32k vocab, SwiGLU, untied lm head.
    Model("Llama-2-7B-like", 32_000, 4096, 32, 32, 32, 128, 11_008, tied=False),
)

HARDWARE = (
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 1600 Gbps
    # (= 400 GB/s bidirectional, 200 GB/s one way) per chip, 256 chips in a 16x16 2D torus.
    Hardware("TPU v5e-256", 256, 16 * GiB, 197e12, 819e9, 200e9, 10e-6, 8),
    # H100 SXM5 80GB: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink 4 900 GB/s bidirectional
    # (450 GB/s one way) through NVSwitch.
    Hardware("8x H100 80GB", 8, 80 * GB, 989e12, 3.35e12, 450e9, 20e-6, 8),
)

DATASETS = (
    # Split sizes from the Hugging Face dataset cards (see docs/scaling.md); P and L assumed.
    Dataset("HH helpful-base (BoN)", 43_835, 512, 256),
    Dataset("HH harmless-base (WoN)", 42_537, 512, 256),
    Dataset("TL;DR filtered (BoN)", 116_722, 512, 64),
)


@dataclasses.dataclass(frozen=True)
class Step:
    """One CTRL step's workload on one machine."""

    prompts: int        # B
    samples: int        # M (samples_per_prompt)
    prompt_len: int     # P
    response_len: int   # L
    ppo_epochs: int = 4

    @property
    def rows(self) -> int:
        return self.prompts * self.samples

    @property
    def seq(self) -> int:
        return self.prompt_len + self.response_len


STEPS = {"TPU v5e-256": Step(512, 4, 512, 256), "8x H100 80GB": Step(128, 4, 512, 256)}
# Training mesh (data, fsdp, tensor) per machine: full FSDP, see docs/scaling.md section 2.
TRAIN_MESH = {"TPU v5e-256": (1, 256, 1), "8x H100 80GB": (1, 8, 1)}
K_CALIB = (100, 300)
A = Assume()


# ------------------------------------------------------------------------------- formulas
def fmt_bytes(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if x >= 0.1 * GiB else f"{x / 2 ** 20:.0f} MiB"


def fmt_s(x: float) -> str:
    if x >= 3600:
        return f"{x / 3600:.1f} h"
    if x >= 60:
        return f"{x / 60:.1f} min"
    return f"{x:.2f} s" if x >= 0.1 else f"{x * 1e3:.1f} ms"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def persistent_bytes(m: Model, hw: Hardware) -> dict[str, float]:
    """State that lives for the whole run, FSDP-sharded over every device: trainable policy in
    f32 (params, Adam mu and nu, gradients) and the frozen reference and reward model in bf16."""
    n = hw.devices
    return {"params f32": 4 * m.n_params / n,
            "Adam mu+nu f32": 8 * m.n_params / n,
            "grads f32": 4 * m.n_params / n,
            "pi_ref bf16": 2 * m.n_params / n,
            "reward model bf16": 2 * m.n_rm_params / n}


def train_activation_bytes(m: Model, hw: Hardware, step: Step, micro: int, remat: bool,
                           logits_len: int) -> dict[str, float]:
    """Per-device activation memory of one update micro-batch (1/micro of the rollout rows)."""
    data, fsdp, tensor = TRAIN_MESH[hw.name]
    tokens = step.rows * step.seq / micro / (data * fsdp)      # tokens per device
    per_layer = m.act_bytes_per_token_layer(step.seq, tensor)
    if remat:
        blocks = m.layers * tokens * 2 * m.d_model + tokens * per_layer
    else:
        blocks = m.layers * tokens * per_layer
    logit_tokens = tokens * logits_len / step.seq
    logits = logit_tokens * m.vocab / tensor * 4 * A.logit_copies
    return {"blocks": blocks, "logits": logits}


def decode_time(m: Model, hw: Hardware, rows: int, tensor: int, prompt_len: int,
                steps: int, share: int = 1) -> float:
    """Seconds for `steps` decode steps of `rows` sequences on one tensor group of `tensor`
    devices: per step max(bytes / HBM bw, FLOPs / peak) plus two all-reduces per layer.
    `share` rows read one copy of their common prompt's KV (1: each row its own copy, the
    sampler before it kept the prompt's KV once per prompt; the tables keep 1, an upper bound
    on the rollout's KV reads: the sampler now shares it among a prompt's samples)."""
    kv_shard = tensor if m.kv_heads % tensor == 0 else 1      # MQA: the cache is replicated
    total = 0.0
    for s in range(steps):
        ctx = prompt_len + s + 1
        kv_tokens = rows * (prompt_len / share + s + 1)
        bytes_dev = (2 * m.n_params / tensor + kv_tokens * m.kv_bytes_per_token() / kv_shard
                     + rows * m.vocab * 4 / tensor)
        flops_dev = rows * (2 * m.n_matmul + m.attn_flops_per_token(ctx)) / tensor
        t = max(bytes_dev / (hw.hbm_bw * A.hbm_eff), flops_dev / (hw.peak * A.mfu_decode))
        if tensor > 1:
            msg = rows * m.d_model * 2 * 2 * (tensor - 1) / tensor
            t += 2 * m.layers * (hw.alpha + msg / (hw.link_bw * A.link_eff))
        total += t
    return total


def rollout_memory(m: Model, hw: Hardware, rows: int, tensor: int, seq: int,
                   with_train_state: bool, prompt_len: int = 0,
                   share: int = 1) -> dict[str, float]:
    """Per-device memory while sampling: a bf16 serving copy of the policy split `tensor` ways,
    the KV cache of `rows` sequences (`share` as in `decode_time`: 1, the tables' upper
    bound), and the step's f32 logits (x3: raw, filtered, log-softmax); plus the persistent
    training state when sampling inside the RL step."""
    kv_shard = tensor if m.kv_heads % tensor == 0 else 1
    out = {"serving weights bf16": 2 * m.n_params / tensor,
           "KV cache": rows * (seq - prompt_len + prompt_len / share)
                       * m.kv_bytes_per_token() / kv_shard,
           "decode logits": rows * m.vocab * 4 * 3 / tensor}
    if with_train_state:
        out["persistent state"] = sum(persistent_bytes(m, hw).values())
    return out


def serving_options(m: Model, hw: Hardware) -> list[int]:
    return [g for g in (1, 2, 4, 8, 16) if g <= hw.max_tensor and m.heads % g == 0
            and hw.devices % g == 0]


def best_rollout(m: Model, hw: Hardware, step: Step) -> tuple[int, float, dict[str, float]]:
    """Serving tensor size with the shortest decode that fits (rows split over the replicas)."""
    best = None
    for g in serving_options(m, hw):
        rows = step.rows * g / hw.devices
        mem = rollout_memory(m, hw, rows, g, step.seq, True)
        if sum(mem.values()) > A.usable_hbm * hw.hbm:
            continue
        t = decode_time(m, hw, rows, g, step.prompt_len, step.response_len)
        if best is None or t < best[1]:
            best = (g, t, mem)
    assert best is not None, f"no serving layout fits for {m.name} on {hw.name}"
    return best


def fwd_flops(m: Model, n_matmul: int, tokens: float, ctx: int) -> float:
    return tokens * (2 * n_matmul + m.attn_flops_per_token(ctx))


def policy_fwd_flops(m: Model, tokens: float, head_tokens: float, ctx: int) -> float:
    """A policy forward over `tokens` whose lm head runs at `head_tokens` of them only."""
    return fwd_flops(m, m.n_matmul - m.n_head, tokens, ctx) + 2 * m.n_head * head_tokens


def rl_step_times(m: Model, hw: Hardware, step: Step) -> dict[str, float]:
    n = hw.devices
    g, decode, _ = best_rollout(m, hw, step)
    pool = n * hw.peak
    # logits at each prompt's last position (prefill) and at the response positions (the
    # teacher-forced passes), as `models.prefill(last_logits_only=True)` and the step compute them
    prefill = policy_fwd_flops(m, step.prompts * step.prompt_len, step.prompts, step.prompt_len)
    tokens = step.rows * step.seq
    head_tokens = step.rows * step.response_len
    rm_matmul = m.n_rm_params - m.vocab * m.d_model   # reward model: no lm head at all
    fwd = policy_fwd_flops(m, tokens, head_tokens, step.seq)
    train = (tokens * (6 * (m.n_matmul - m.n_head) + m.attn_flops_per_token(step.seq,
                                                                           backward=True))
             + 6 * m.n_head * head_tokens)
    # Gathering the FSDP-sharded f32 policy into the bf16 serving layout: each device receives
    # about its serving shard (2N/g bytes).
    reshard = 2 * m.n_params / g / (hw.link_bw * A.link_eff)
    return {"serving tensor g": g,
            "reshard": reshard,
            "prefill": prefill / (pool * A.mfu_fwd),
            "decode": decode,
            "scoring": fwd_flops(m, rm_matmul, tokens, step.seq) / (pool * A.mfu_fwd),
            "ref logp": fwd / (pool * A.mfu_fwd),
            "update (1 epoch)": train / (pool * A.mfu_train),
            "full_kl metric": 2 * fwd / (pool * A.mfu_fwd),
            "train FLOPs/epoch": train}


def fsdp_comm_time(m: Model, hw: Hardware) -> float:
    """Per update pass: all-gather f32 params for forward and for backward (re-gathered under
    remat) and reduce-scatter f32 gradients, each moving ~4N (n-1)/n bytes per device."""
    n = hw.devices
    return 3 * 4 * m.n_params * (n - 1) / n / (hw.link_bw * A.link_eff)


def calib_pass(m: Model, hw: Hardware, ds: Dataset, k: int,
               shared_prefix: bool = False) -> dict[str, float]:
    """Offline calibration pass on the whole machine in a pure serving layout (no train state):
    pick the tensor size g and rows per group (a multiple of K, whole prompts) that fit and
    minimise time; then reward-score every sample (compute-bound forward). With
    `shared_prefix` (not implemented in the library) the K samples of a prompt read one copy
    of its KV cache, and the reward model scores the prompt once and the K responses against
    its cached KV."""
    seq = ds.prompt_len + ds.response_len
    best = None
    for g in serving_options(m, hw):
        groups = hw.devices // g
        # Memory is linear in the rows: fixed (weights) + rows * per-row (KV cache, logits).
        share = k if shared_prefix else 1
        mem = lambda r: sum(rollout_memory(m, hw, r, g, seq, False, ds.prompt_len,  # noqa: E731
                                           min(share, max(r, 1))).values())
        fixed = mem(0)
        per_row = mem(k) / k - fixed / k if shared_prefix else mem(1) - fixed
        rows = int((A.usable_hbm * hw.hbm - fixed) // per_row)
        if rows < 1:
            continue
        # Whole prompts (K rows each) when they fit; otherwise a prompt's K samples are drawn
        # in chunks of `rows`, each chunk paying its own prefill.
        rows = rows // k * k if rows >= k else rows
        prefills_per_prompt = math.ceil(k / min(rows, k))
        dec = decode_time(m, hw, rows, g, ds.prompt_len, ds.response_len, min(share, rows))
        waves = math.ceil(ds.train_prompts * k / (groups * rows))
        prefills = ds.train_prompts * prefills_per_prompt
        pre_total = policy_fwd_flops(m, prefills * ds.prompt_len, prefills, ds.prompt_len) / (
            hw.devices * hw.peak * A.mfu_fwd)
        t = waves * dec + pre_total
        if best is None or t < best["sample_s"]:
            best = {"g": g, "rows_per_group": rows, "sample_s": t, "waves": waves,
                    "tok_per_s": ds.train_prompts * k * ds.response_len / t}
    assert best is not None
    samples = ds.train_prompts * k
    rm_matmul = m.n_rm_params - m.vocab * m.d_model
    score_tokens = (ds.train_prompts * (ds.prompt_len + k * ds.response_len) if shared_prefix
                    else samples * seq)
    score_flops = fwd_flops(m, rm_matmul, score_tokens, seq)
    gen_flops = samples * ds.response_len * (2 * m.n_matmul) + policy_fwd_flops(
        m, ds.train_prompts * ds.prompt_len, ds.train_prompts, ds.prompt_len)
    best.update({"gen_flops": gen_flops, "score_flops": score_flops,
                 "score_s": score_flops / (hw.devices * hw.peak * A.mfu_fwd),
                 "table_bytes": ds.train_prompts * k * 4})
    return best


# ------------------------------------------------------------------------------- tables
def t_models() -> str:
    rows = []
    for m in MODELS:
        rows.append([m.name, m.layers, m.d_model, m.heads, m.kv_heads, m.head_dim, m.d_ff,
                     f"{m.vocab:,}", "yes" if m.tied else "no", f"{m.n_params / 1e9:.3f} B",
                     f"{m.n_rm_params / 1e9:.3f} B",
                     f"{m.kv_bytes_per_token() / 1024:.0f} KiB"])
    return table(["model", "layers", "d_model", "heads", "kv heads", "head_dim", "d_ff", "vocab",
                  "tied", "N (policy)", "N (reward model)", "KV bf16 / token"], rows)


def t_hardware() -> str:
    rows = [[hw.name, hw.devices, fmt_bytes(hw.hbm), f"{fmt_bytes(A.usable_hbm * hw.hbm)}",
             f"{hw.peak / 1e12:.0f}", f"{hw.hbm_bw / 1e9:,.0f}", f"{hw.link_bw / 1e9:.0f}",
             f"{hw.peak / hw.hbm_bw:.0f}", f"{hw.devices * hw.peak / 1e15:.2f}"]
            for hw in HARDWARE]
    return table(["machine", "devices", "HBM / device", "usable (x0.9)", "bf16 TFLOP/s",
                  "HBM GB/s", "link GB/s (one way)", "ridge FLOP/byte", "total PFLOP/s"], rows)


def t_persistent() -> str:
    rows = []
    for hw in HARDWARE:
        for m in MODELS:
            p = persistent_bytes(m, hw)
            total = sum(p.values())
            rows.append([hw.name, m.name, *(fmt_bytes(v) for v in p.values()), fmt_bytes(total),
                         fmt_bytes(total * hw.devices)])
    return table(["machine", "model", *persistent_bytes(MODELS[0], HARDWARE[0]).keys(),
                  "per device", "whole machine"], rows)


def t_train_memory() -> str:
    rows = []
    for hw in HARDWARE:
        step = STEPS[hw.name]
        for m in MODELS:
            base = sum(persistent_bytes(m, hw).values())
            for label, remat, logits_len in (("as written: no remat, logits over P+L", False,
                                              step.seq),
                                             ("remat per block, logits over L only", True,
                                              step.response_len)):
                for micro in (1, 2, 4, 8, 16):
                    act = train_activation_bytes(m, hw, step, micro, remat, logits_len)
                    total = base + sum(act.values())
                    if total <= A.usable_hbm * hw.hbm or micro == 16:
                        break
                fits = "fits" if total <= A.usable_hbm * hw.hbm else "**does not fit**"
                act1 = train_activation_bytes(m, hw, step, 1, remat, logits_len)
                rows.append([hw.name, m.name, label, fmt_bytes(act1["blocks"]),
                             fmt_bytes(act1["logits"]), micro, fmt_bytes(act["blocks"]),
                             fmt_bytes(act["logits"]), fmt_bytes(total), fits])
    return table(["machine", "model", "update pass", "blocks (1 micro-batch)",
                  "logits (1 micro-batch)", "micro-batches needed", "blocks", "logits",
                  "peak / device", "vs usable"], rows)


def t_rollout_memory() -> str:
    rows = []
    for hw in HARDWARE:
        step = STEPS[hw.name]
        for m in MODELS:
            for g in serving_options(m, hw):
                rows_g = step.rows * g / hw.devices
                mem = rollout_memory(m, hw, rows_g, g, step.seq, True)
                total = sum(mem.values())
                t = decode_time(m, hw, rows_g, g, step.prompt_len, step.response_len)
                fits = total <= A.usable_hbm * hw.hbm
                rows.append([hw.name, m.name, f"{hw.devices // g} x {g}", f"{rows_g:.0f}",
                             fmt_bytes(mem["serving weights bf16"]), fmt_bytes(mem["KV cache"]),
                             fmt_bytes(mem["decode logits"]), fmt_bytes(total),
                             "yes" if fits else "**no**", fmt_s(t) if fits else "-"])
    return table(["machine", "model", "replicas x tensor", "rows / group",
                  "weights / dev", "KV / dev", "logits / dev", "total / dev", "fits",
                  f"decode {STEPS['TPU v5e-256'].response_len} steps"], rows)


def t_calibration() -> str:
    rows = []
    for hw in HARDWARE:
        for m in MODELS:
            for ds, k in [(d, K_CALIB[0]) for d in DATASETS] + [(DATASETS[0], K_CALIB[1])]:
                c = calib_pass(m, hw, ds, k)
                sh = calib_pass(m, hw, ds, k, shared_prefix=True)
                rows.append([hw.name, m.name, ds.name, k,
                             f"{ds.train_prompts * k * ds.response_len / 1e9:.2f} G",
                             f"{c['gen_flops']:.2e}", f"{c['score_flops']:.2e}",
                             f"{hw.devices // c['g']} x {c['g']}", c["rows_per_group"],
                             fmt_s(c["sample_s"]), fmt_s(c["score_s"]),
                             fmt_s(c["sample_s"] + c["score_s"]),
                             fmt_s(sh["sample_s"] + sh["score_s"]),
                             f"{c['table_bytes'] / 1e6:.0f} MB"])
    return table(["machine", "model", "prompts", "K", "tokens sampled", "sampling FLOPs",
                  "scoring FLOPs", "replicas x tensor", "rows / group", "sampling time",
                  "scoring time", "total", "total, shared prompt KV",
                  "table (P x K x 4 B)"], rows)


def t_forward_memory() -> str:
    """Forward-only phases as written: reference log-probs (f32 logits over P+L, then a
    log-softmax copy) and the full-vocabulary KL metric (policy and reference logits over P+L,
    then log-softmax of both over L), for the whole rollout batch at once."""
    rows = []
    for hw in HARDWARE:
        step = STEPS[hw.name]
        data, fsdp, tensor = TRAIN_MESH[hw.name]
        budget = A.usable_hbm * hw.hbm
        for m in MODELS:
            base = sum(persistent_bytes(m, hw).values())
            tokens = step.rows * step.seq / (data * fsdp)
            layer = tokens * m.act_bytes_per_token_layer(step.seq, tensor)  # one live block
            per_token_logit = m.vocab / tensor * 4
            ref = tokens * per_token_logit * 2
            kl = tokens * per_token_logit * (2 + 2 * step.response_len / step.seq)
            cells = []
            for need in (ref, kl):
                micro = next((k for k in (1, 2, 4, 8, 16, 32, 64)
                              if base + (need + layer) / k <= budget), None)
                cells += [fmt_bytes(base + need + layer), str(micro)]
            rows.append([hw.name, m.name, f"{tokens:,.0f}", *cells])
    return table(["machine", "model", "tokens / device", "ref log-probs peak (full batch)",
                  "chunks to fit", "full_kl metric peak (full batch)", "chunks to fit"], rows)


def t_amortise(sweep: int = 15) -> str:
    """Calibration pass (HH helpful, K=100) against RL runs of one epoch over its prompts."""
    rows = []
    ds = DATASETS[0]
    for hw in HARDWARE:
        step = STEPS[hw.name]
        for m in MODELS:
            c = calib_pass(m, hw, ds, K_CALIB[0])
            calib = c["sample_s"] + c["score_s"]
            t = rl_step_times(m, hw, step)
            run = math.ceil(ds.train_prompts / step.prompts) * (
                t["reshard"] + t["prefill"] + t["decode"] + t["scoring"] + t["ref logp"]
                + t["update (1 epoch)"])
            rows.append([hw.name, m.name, fmt_s(calib), fmt_s(run), f"{calib / run:.1f}x",
                         f"{calib / (calib + run):.0%}",
                         f"{calib / (calib + sweep * run):.0%}",
                         f"{K_CALIB[0] / step.samples:.0f}x"])
    return table(["machine", "model", "calibration pass (K=100)", "one RLOO run (1 epoch)",
                  "pass / run", "share of 1 run + pass", f"share of {sweep}-run sweep + pass",
                  "samples: pass / run (K / M)"], rows)


def t_step_times() -> str:
    rows = []
    for hw in HARDWARE:
        step = STEPS[hw.name]
        for m in MODELS:
            t = rl_step_times(m, hw, step)
            common = t["reshard"] + t["prefill"] + t["decode"] + t["scoring"] + t["ref logp"]
            rloo = common + t["update (1 epoch)"]
            ppo = common + step.ppo_epochs * t["update (1 epoch)"]
            steps_epoch = math.ceil(DATASETS[0].train_prompts / step.prompts)
            rows.append([hw.name, m.name, f"{step.prompts} x {step.samples}",
                         t["serving tensor g"], fmt_s(t["reshard"]), fmt_s(t["prefill"]),
                         fmt_s(t["decode"]), fmt_s(t["scoring"]), fmt_s(t["ref logp"]),
                         fmt_s(t["update (1 epoch)"]), fmt_s(t["full_kl metric"]),
                         fmt_s(rloo), fmt_s(ppo),
                         f"{t['decode'] / rloo:.0%}",
                         f"{fmt_s(steps_epoch * rloo)} / {fmt_s(steps_epoch * ppo)}"])
    return table(["machine", "model", "B x M", "serving g", "reshard", "prefill", "decode",
                  "RM scoring", "ref log-probs", "update / epoch", "(+ full_kl)",
                  "step RLOO", "step PPO x4", "decode share (RLOO)",
                  "1 HH epoch RLOO / PPO"], rows)


def t_sensitivity() -> str:
    rows = []
    global A
    saved = A
    for hw in HARDWARE:
        step = STEPS[hw.name]
        for m in MODELS:
            cells = []
            for mfu, eff in ((0.25, 0.5), (0.40, 0.7), (0.55, 0.85)):
                A = dataclasses.replace(saved, mfu_train=mfu, mfu_fwd=mfu, mfu_decode=mfu,
                                        hbm_eff=eff)
                t = rl_step_times(m, hw, step)
                cells.append(fmt_s(t["reshard"] + t["prefill"] + t["decode"] + t["scoring"]
                                   + t["ref logp"] + t["update (1 epoch)"]))
            A = saved
            rows.append([hw.name, m.name, *cells])
    return table(["machine", "model", "MFU 25%, HBM 50%", "MFU 40%, HBM 70% (default)",
                  "MFU 55%, HBM 85%"], rows)


def t_fsdp() -> str:
    rows = []
    for hw in HARDWARE:
        step = STEPS[hw.name]
        for m in MODELS:
            comm = fsdp_comm_time(m, hw)
            train = rl_step_times(m, hw, step)["update (1 epoch)"]
            # Tokens per device at which one micro-batch's compute equals its FSDP traffic.
            flops_per_token = 6 * m.n_matmul + m.attn_flops_per_token(step.seq, backward=True)
            crit = comm * hw.peak * A.mfu_train / flops_per_token
            tokens_dev = step.rows * step.seq / hw.devices
            rows.append([hw.name, m.name, fmt_s(comm), fmt_s(train), f"{comm / train:.0%}",
                         f"{tokens_dev:,.0f}", f"{crit:,.0f}",
                         f"{crit / step.seq:.1f}"])
    return table(["machine", "model", "FSDP traffic / pass (f32)", "update compute / epoch",
                  "traffic / compute", "tokens / device / step", "break-even tokens / device",
                  "= sequences / device"], rows)


def main() -> None:
    sections = [
        ("Table 1: model shapes and parameter counts", t_models),
        ("Table 2: hardware (assumed public specs)", t_hardware),
        ("Table 3: persistent state per device (training mesh, full FSDP)", t_persistent),
        ("Table 4: update-phase peak memory per device", t_train_memory),
        ("Table 4b: forward-only phases as written (whole rollout batch in one call)",
         t_forward_memory),
        ("Table 5: rollout-phase memory and decode time per serving layout", t_rollout_memory),
        ("Table 6: calibration pass (K base samples per prompt, once per (pi_ref, r, prompts))",
         t_calibration),
        ("Table 7: one CTRL step, phase by phase", t_step_times),
        ("Table 7b: the calibration pass amortised over RL runs (HH helpful)", t_amortise),
        ("Table 8: FSDP traffic vs compute in the update", t_fsdp),
        ("Table 9: step time (RLOO) under other efficiency assumptions", t_sensitivity),
    ]
    for name, step in STEPS.items():
        data, fsdp, _ = TRAIN_MESH[name]
        # `sharding.shard_batch` refuses a prompt batch the (data, fsdp) shards do not divide.
        assert step.prompts % (data * fsdp) == 0, (name, step)
    for title, fn in sections:
        print(f"### {title}\n\n{fn()}\n")


if __name__ == "__main__":
    main()
