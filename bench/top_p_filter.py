"""The top-p head's cost at SmolLM2's vocabulary, on [B, V] random normal logits times a scale
(flat rows for small scales, peaked for large): `sampling_head.filter_logits` against no filter
(and how many rows its candidate buffer serves; the others take the full-vocabulary search), and
a top-p token draw as the sampler makes it (`draw_filtered`, by rejection) against the filter
then `draw`, and against the unfiltered `draw`.

    .venv/bin/python bench/top_p_filter.py [--batch 32 --vocab 49152 --top_p 0.9 --calls 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--top_p", type=float, default=0.9)
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from infalign_jax.decoding import sampling_head as head
    from run_benchmarks import hardware

    def ms(fn, x):
        jax.block_until_ready(fn(x))
        t0 = time.perf_counter()
        for _ in range(args.calls):
            jax.block_until_ready(fn(x))
        return (time.perf_counter() - t0) / args.calls * 1e3

    rng = np.random.default_rng(0)
    plain = jax.jit(lambda x: head.filter_logits(x, 1.0, 0, 1.0))
    top_p = jax.jit(lambda x: head.filter_logits(x, 1.0, 0, args.top_p))
    key = jax.random.key(0)
    draw = jax.jit(lambda x: head.draw(key, x))
    filter_draw = jax.jit(lambda x: head.draw(key, head.filter_logits(x, 1.0, 0, args.top_p)))
    rejection = jax.jit(lambda x: head.draw_filtered(key, x, 1.0, 0, args.top_p))
    print(f"hardware: {hardware()}; [{args.batch}, {args.vocab}], top_p {args.top_p}, "
          f"rejection rounds at most {head.rejection_rounds(args.top_p)}")
    for scale in (1.0, 3.0, 6.0, 10.0):
        x = jnp.asarray(rng.normal(size=(args.batch, args.vocab)).astype(np.float32) * scale)
        p = jnp.exp(x - x.max(-1, keepdims=True))
        served = int(head._buffer_suffices(p, args.top_p, head.TOP_P_GROUPS, head.GROUP)[3].sum())
        none_ms, p_ms = ms(plain, x), ms(top_p, x)
        draw_ms, fd_ms, rej_ms = ms(draw, x), ms(filter_draw, x), ms(rejection, x)
        print(f"  scale {scale:4.1f}: buffer serves {served}/{args.batch} rows; no filter "
              f"{none_ms:.2f} ms, top-p {p_ms:.2f} ms ({p_ms / none_ms:.1f}x); draw {draw_ms:.2f} "
              f"ms, filter then draw {fd_ms:.2f} ms, draw_filtered {rej_ms:.2f} ms "
              f"({rej_ms - draw_ms:+.2f} ms over the draw)")


if __name__ == "__main__":
    main()
