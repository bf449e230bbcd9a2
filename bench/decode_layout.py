"""Where a SmolLM2 decode step's time goes: the layer scan against unrolled layers, and the
response-cache length. Baseline: the library's `models.decode_step` (layers as one `nn.scan`),
measured in the same run as

  * the same step with the layers unrolled in Python over pre-split per-layer parameters,
  * the same with static slices of the stacked parameters inside the jitted step,
  * the library step with 8, 64 and 256 response-cache slots (the attention masks unused slots).

Prints ms per step, the ratios to the baseline and the logits' max |difference| (must be 0), with
the devices named. Usage: .venv/bin/python bench/decode_layout.py [--batch 32] [--prompt 64]
"""

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import models
from infalign_jax.models import gguf_import
from infalign_jax.models import transformer as T


def _ms(f, *args, n: int = 10) -> tuple[float, jax.Array]:
    out = f(*args)
    out.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    out.block_until_ready()
    return (time.perf_counter() - t0) / n * 1e3, out


def unrolled_logits(cfg, params, layers, tokens_B, cache):
    """One decode step with the decoder layers as a Python loop of `Block` applications."""
    x = jnp.take(params["embed"], tokens_B[:, None], axis=0)
    consts = T.layer_constants(cfg)
    for i in range(cfg.n_layers):
        kv = (cache["pk"][i], cache["pv"][i], cache["rk"][i], cache["rv"][i])
        x, _ = T.Block(cfg, return_kv=True).apply(
            {"params": layers[i]}, x, (kv, {k: jnp.asarray(v[i]) for k, v in consts.items()}),
            cache["next_pos"][:, None], None, (cache["pmask"], None), cache["index"])
    h = T.Norm(cfg).apply({"params": params["final_norm"]}, x)
    return jnp.einsum("bsd,dv->bsv", h, models.lm_head_kernel(params, cfg),
                      preferred_element_type=jnp.float32)[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cfg, params = gguf_import.load_gguf_checkpoint(gguf_import.smollm2_gguf_path())
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(10, 1000, (a.batch, a.prompt)), jnp.int32)
    pmask = jnp.ones(prompt.shape, bool)
    tokens = jnp.asarray(rng.integers(10, 1000, (a.batch,)), jnp.int32)
    step = jax.jit(lambda p, t, c: models.decode_step(p, t, cfg, c)[0])

    def cache_of(slots):
        _, cache = models.prefill(params, prompt, cfg, pmask, max_new_tokens=slots)
        return {**cache, "index": jnp.asarray(slots // 2, jnp.int32)}

    cache = cache_of(64)
    layers = [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(cfg.n_layers)]
    split = jax.jit(lambda p, ls, t, c: unrolled_logits(cfg, p, ls, t, c))
    sliced = jax.jit(lambda p, t, c: unrolled_logits(
        cfg, p, [jax.tree.map(lambda x, i=i: x[i], p["layers"]) for i in range(cfg.n_layers)],
        t, c))
    base, want = _ms(step, params, tokens, cache)
    rows = {"scan (library), 64 slots": (base, 0.0)}
    for name, f, args in (("unrolled, pre-split params", split, (params, layers, tokens, cache)),
                          ("unrolled, static slices", sliced, (params, tokens, cache))):
        ms, got = _ms(f, *args)
        rows[name] = (ms, float(jnp.abs(got - want).max()))
    for slots in (8, 256):
        ms, _ = _ms(step, params, tokens, cache_of(slots))
        rows[f"scan (library), {slots} slots"] = (ms, 0.0)
    print(f"devices: {jax.devices()}  host: {platform.processor() or platform.machine()}")
    print(f"SmolLM2-135M f32 decode step, batch {a.batch}, prompt {a.prompt}")
    print("| variant | ms / step | vs library | max abs diff |\n|---|---|---|---|")
    for name, (ms, diff) in rows.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x | {diff:.1e} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({k: {"ms": v[0], "max_abs_diff": v[1]} for k, v in rows.items()}, f,
                      indent=2)


if __name__ == "__main__":
    main()
