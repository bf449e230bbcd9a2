"""All benchmarks in one run, each as a ratio against a baseline measured in the same run.

    .venv/bin/python bench/run_benchmarks.py [--quick] [--out docs/bench_latest.json]

Sections (the same script runs unchanged on CPU and GPU; the hardware is printed):
  peak       f32 (and bf16 on accelerators) matmul throughput: the roofline for MFU.
  bandwidth  memory bandwidth of a large reduction: the roofline for the calibration kernel.
  calibrate  calibration kernel vs a per-prompt numpy loop and vs the bandwidth bound.
  sampler    our KV-cache sampler vs transformers' PyTorch `generate` on the same weights.
  prefill    prefill-once for N samples vs N prefills (the ideal speed-up is measured too).
  train      model FLOP utilisation of a jitted fwd+bwd+AdamW step (d_model >= 512).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def timeit(fn, *, repeat: int = 5, warmup: int = 1) -> float:
    """Best wall time of `fn()` in seconds (blocks on JAX outputs)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def interleaved_times(calls: dict, rounds: int) -> dict:
    """Every call's wall time in each of `rounds` rounds that run every call once in turn, so a
    slow spell of the machine hits all of them alike: {name: [seconds per round]}."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
    return times


def hardware() -> dict:
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": d.device_kind, "devices": jax.device_count(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "jax": jax.__version__}


def bench_peak(quick: bool) -> dict:
    """Matmul throughput: f32 (full precision, not TF32), and bf16 on accelerators. There a
    product is 8192^2 (~1 ms at bf16 peak), so dispatch and synchronisation do not count."""
    accel = jax.default_backend() != "cpu"
    n = 8192 if accel else (1024 if quick else 2048)
    out = {}
    dtypes = [jnp.float32] + ([jnp.bfloat16] if accel else [])
    for dt in dtypes:
        a = jax.random.normal(jax.random.key(0), (n, n), dt)
        f = jax.jit(lambda x: jnp.matmul(x, x, precision="highest" if dt == jnp.float32 else None))
        s = timeit(lambda: f(a))
        out[jnp.dtype(dt).name] = 2 * n ** 3 / s / 1e9
    return {"matmul_gflops": out, "size": n}


def bench_bandwidth(quick: bool) -> dict:
    """Read bandwidth of a sum; 1 GiB on accelerators (a fraction of a millisecond at HBM speed)."""
    n = (1 << 28) if jax.default_backend() != "cpu" else (1 << 24) if quick else (1 << 26)
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda v: v.sum())
    s = timeit(lambda: f(x))
    return {"read_gb_s": 4 * n / s / 1e9, "bytes": 4 * n}


def bench_calibrate(quick: bool, bandwidth_gb_s: float) -> dict:
    from infalign_jax.core.calibration import calibrate
    b, k, m = (4096, 256, 16) if quick else (40960, 256, 16)   # B*K = 1e6 / 1e7
    rng = np.random.default_rng(0)
    ref = np.sort(rng.normal(size=(b, k)).astype(np.float32), axis=1)
    r = rng.normal(size=(b, m)).astype(np.float32)
    ref_j, r_j = jnp.asarray(ref), jnp.asarray(r)
    out = {"B": b, "K": k, "M": m}
    for method in ("search", "compare"):
        f = jax.jit(lambda x, y, method=method: calibrate(x, y, method=method))
        out[f"{method}_s"] = timeit(lambda: f(r_j, ref_j))

    def numpy_loop():
        c = np.empty_like(r)
        for i in range(b):
            lo = np.searchsorted(ref[i], r[i], "left")
            hi = np.searchsorted(ref[i], r[i], "right")
            c[i] = (lo + hi) / (2 * k)
        return c

    out["numpy_loop_s"] = timeit(numpy_loop)   # best of 5 after a warm-up, as ours
    bytes_moved = ref.nbytes + r.nbytes * 2  # read table and rewards, write C
    out["bound_s"] = bytes_moved / (bandwidth_gb_s * 1e9)
    best = min(out["search_s"], out["compare_s"])
    out["speedup_vs_numpy"] = out["numpy_loop_s"] / best
    out["fraction_of_bandwidth_bound"] = out["bound_s"] / best
    return out


def _tiny_llama(d: int, layers: int, vocab: int):
    from infalign_jax.models import ModelConfig
    return ModelConfig(family="llama", vocab_size=vocab, d_model=d, n_layers=layers,
                       n_heads=max(d // 64, 1), n_kv_heads=max(d // 64, 1), head_dim=64,
                       d_ff=4 * d, max_len=1024, tie_embeddings=True)


def bench_sampler(quick: bool) -> dict:
    import torch
    import transformers
    from infalign_jax import models
    from infalign_jax.decoding import sampling
    from infalign_jax.models import hf_import
    cfg = _tiny_llama(256, 4, 8192)
    params = models.init_params(cfg, jax.random.key(0))
    batch, prompt_len, new = (8, 32, 32) if quick else (16, 64, 64)
    prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, cfg.vocab_size)
    mask = jnp.ones_like(prompt, bool)
    scfg = sampling.SamplingConfig(n=1, max_new_tokens=new, eos_id=None)
    fns = models.decoder_fns(cfg)
    f = jax.jit(lambda p, r: sampling.sample(fns, p, prompt, mask, r, scfg))
    ours = timeit(lambda: f(params, jax.random.key(2)), repeat=3)
    with tempfile.TemporaryDirectory() as tmp:
        hf_import.save_hf_checkpoint(tmp, cfg, params)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
    # the baseline on the accelerator ours runs on, both in full f32 (as bench/real_model.py)
    cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        model = model.to("cuda")
    ids = torch.tensor(np.asarray(prompt), device="cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen_cfg = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=0, top_p=1.0,
                   pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **gen_cfg)
        sync()
        hf = float("inf")
        for _ in range(3):  # best of 3, as for ours: one call is at the mercy of the machine
            t = time.perf_counter(); model.generate(ids, **gen_cfg); sync()
            hf = min(hf, time.perf_counter() - t)
    tokens = batch * new
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new, "params": cfg.n_params,
            "ours_tokens_s": tokens / ours, "hf_generate_tokens_s": tokens / hf,
            "ratio_vs_hf": hf / ours, "torch_threads": torch.get_num_threads(),
            "torch_device": "cuda" if cuda else "cpu"}


def bench_prefill(quick: bool) -> dict:
    from infalign_jax import models
    from infalign_jax.decoding import sampling
    cfg = _tiny_llama(256, 4, 8192)
    params = models.init_params(cfg, jax.random.key(0))
    batch, prompt_len, new, n = (2, 256, 8, 8) if quick else (4, 512, 8, 8)
    prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, cfg.vocab_size)
    mask = jnp.ones_like(prompt, bool)
    fns = models.decoder_fns(cfg)
    once = jax.jit(lambda p, r: sampling.sample(
        fns, p, prompt, mask, r, sampling.SamplingConfig(n=n, max_new_tokens=new)))
    rep_prompt, rep_mask = jnp.repeat(prompt, n, 0), jnp.repeat(mask, n, 0)
    many = jax.jit(lambda p, r: sampling.sample(
        fns, p, rep_prompt, rep_mask, r, sampling.SamplingConfig(n=1, max_new_tokens=new)))
    # the whole prefill, its cache included (with the logits alone XLA drops the cache writes)
    pre = jax.jit(lambda p: fns.prefill(p, rep_prompt, rep_mask, prompt_len + new))
    pre1 = jax.jit(lambda p: fns.prefill(p, prompt, mask, prompt_len + new))
    t_once = timeit(lambda: once(params, jax.random.key(2)), repeat=3)
    t_many = timeit(lambda: many(params, jax.random.key(2)), repeat=3)
    t_pre_n = timeit(lambda: pre(params), repeat=3)
    t_pre_1 = timeit(lambda: pre1(params), repeat=3)
    # Ideal: the N-prefill run minus the prefill work that prefilling once saves.
    ideal_once = t_many - (t_pre_n - t_pre_1)
    return {"batch": batch, "prompt_len": prompt_len, "n": n, "new_tokens": new,
            "prefill_once_s": t_once, "n_prefills_s": t_many, "speedup": t_many / t_once,
            "ideal_speedup": t_many / ideal_once,
            "fraction_of_ideal": (t_many / t_once) / (t_many / ideal_once)}


def bench_train(quick: bool, peak_gflops: float) -> dict:
    import optax
    from infalign_jax import models
    cfg = _tiny_llama(512, 2 if quick else 4, 8192)
    batch, seq = (8, 128) if quick else (16, 256)
    params = models.init_params(cfg, jax.random.key(0))
    tx = optax.adamw(1e-4)
    opt = tx.init(params)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)

    def loss_fn(p):
        logits = models.apply(p, tokens, cfg).logits
        return -models.token_logprobs(logits[:, :-1], tokens[:, 1:]).mean()

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    s = timeit(lambda: step(params, opt), repeat=3)
    n_tok = batch * seq
    # 6 N per token for the matmuls (fwd+bwd) plus attention scores 12 L T d per token.
    flops = 6 * cfg.n_params * n_tok + 12 * cfg.n_layers * seq * cfg.d_model * n_tok
    achieved = flops / s / 1e9
    return {"d_model": cfg.d_model, "layers": cfg.n_layers, "params": cfg.n_params,
            "tokens": n_tok, "step_s": s, "tokens_s": n_tok / s, "gflops": achieved,
            "mfu_vs_measured_f32_peak": achieved / peak_gflops}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated sections")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    run = lambda name: not only or name in only  # noqa: E731
    if jax.default_backend() != "cpu":
        # f32 at full precision everywhere (the peak is measured so, and the PyTorch baseline
        # runs so): JAX would run f32 matmuls as TF32 on a GPU, and the MFU would be inflated
        jax.config.update("jax_default_matmul_precision", "highest")
    res = {"hardware": hardware()}
    print(json.dumps(res["hardware"]), flush=True)
    res["peak"] = bench_peak(args.quick); print("peak", res["peak"], flush=True)
    res["bandwidth"] = bench_bandwidth(args.quick); print("bandwidth", res["bandwidth"], flush=True)
    if run("calibrate"):
        res["calibrate"] = bench_calibrate(args.quick, res["bandwidth"]["read_gb_s"])
        print("calibrate", res["calibrate"], flush=True)
    if run("sampler"):
        res["sampler"] = bench_sampler(args.quick); print("sampler", res["sampler"], flush=True)
    if run("prefill"):
        res["prefill"] = bench_prefill(args.quick); print("prefill", res["prefill"], flush=True)
    if run("train"):
        res["train"] = bench_train(args.quick, res["peak"]["matmul_gflops"]["float32"])
        print("train", res["train"], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
