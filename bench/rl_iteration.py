"""A full CTRL iteration's time split, and how the step time scales with model size and batch.

    .venv/bin/python bench/rl_iteration.py [--quick]

Phases of one iteration (each jitted on its own, timed best-of-3 after a warm-up):
  rollout     sample M responses per prompt (prefill once, decode with the KV cache)
  reward      a reward model of the policy's size scores [prompt | response]
  calibrate   rank against K reference rewards per prompt + the exp transform
  ref_logp    teacher-forced log-probs of the responses under the frozen reference
  update      REINFORCE/RLOO loss, gradient and Adam update
and the whole `rl.make_rl_step` jitted end to end (with a table-lookup reward, so its reward
phase is nearly free: compare it with the sum of the other phases). The scaling table is the end to
end step time for a grid of model widths and prompt batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from run_benchmarks import _tiny_llama, hardware, timeit  # noqa: E402


def _setup(d: int, layers: int, batch: int, m: int, prompt_len: int, new: int, k: int = 128):
    from infalign_jax import models, rl
    cfg = _tiny_llama(d, layers, 4096)
    params = models.init_params(cfg, jax.random.key(0))
    prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, cfg.vocab_size)
    rcfg = rl.RLConfig(samples_per_prompt=m, max_new_tokens=new, full_kl=False)
    ref_sorted = jnp.sort(jax.random.uniform(jax.random.key(2), (batch, k)), axis=-1)
    return cfg, params, prompt, jnp.ones_like(prompt, bool), rcfg, ref_sorted


def time_split(d: int = 256, layers: int = 4, batch: int = 8, m: int = 4, prompt_len: int = 32,
               new: int = 32) -> dict:
    from infalign_jax.core import losses
    from infalign_jax import models, rl
    from infalign_jax.decoding import sampling
    from infalign_jax.core.advantages import rloo_advantages
    cfg, params, prompt, pmask, rcfg, ref_sorted = _setup(d, layers, batch, m, prompt_len, new)
    fns = models.decoder_fns(cfg)
    rm_cfg = models.ModelConfig(**{**cfg.__dict__, "heads": ("reward",)})
    rm_params = models.init_params(rm_cfg, jax.random.key(3))
    opt = rl.make_optimizer(rcfg)
    opt_state = opt.init(params)
    transform = rcfg.get_transform()

    roll = jax.jit(lambda p, r: sampling.sample(fns, p, prompt, pmask, r, rcfg.sampling()))
    samples = roll(params, jax.random.key(4))
    prompt_R, pmask_R, resp_R, rmask_R = sampling.flatten_samples(prompt, pmask, samples)
    tokens_R, mask_R = sampling.concat_prompt_response(prompt_R, pmask_R, resp_R, rmask_R)
    reward = jax.jit(lambda p: models.apply(p, tokens_R, rm_cfg, attention_mask_BxT=mask_R).reward)
    rewards = reward(rm_params).reshape(batch, m)
    cal = jax.jit(lambda r: rl.score_rollout(rcfg, transform, r, ref_sorted,
                                             jnp.full((batch,), ref_sorted.shape[1]))[1])
    ref_lp = jax.jit(lambda p: sampling.sequence_logprobs(fns, p, prompt_R, pmask_R, resp_R, rmask_R))
    adv = rloo_advantages(cal(rewards)).reshape(-1)

    @jax.jit
    def update(p, o):
        def loss_fn(q):
            lp = sampling.sequence_logprobs(fns, q, prompt_R, pmask_R, resp_R, rmask_R)
            return losses.reinforce_loss(lp, rmask_R, adv)
        g = jax.grad(loss_fn)(p)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o

    table = jax.random.uniform(jax.random.key(5), (batch, cfg.vocab_size))

    def lookup(params_, idx_R, resp, mask):  # a nearly free reward for the end-to-end step
        return jnp.sum(jnp.where(mask, jnp.take_along_axis(params_[idx_R], resp, axis=-1), 0), -1)

    step = jax.jit(rl.make_rl_step(rcfg, fns, lookup, opt))
    state = rl.init_state(params, opt)
    frozen = rl.Frozen(params, table, ref_sorted, jnp.full((batch,), ref_sorted.shape[1]))
    batch_d = {"prompt_BxP": prompt, "prompt_mask_BxP": pmask, "prompt_idx_B": jnp.arange(batch)}
    phases = {
        "rollout": timeit(lambda: roll(params, jax.random.key(4)), repeat=3),
        "reward": timeit(lambda: reward(rm_params), repeat=3),
        "calibrate": timeit(lambda: cal(rewards), repeat=3),
        "ref_logp": timeit(lambda: ref_lp(params), repeat=3),
        "update": timeit(lambda: update(params, opt_state), repeat=3),
    }
    total = sum(phases.values())
    whole = timeit(lambda: step(state, frozen, batch_d, jax.random.key(6)), repeat=3)
    return {"d_model": d, "layers": layers, "params": cfg.n_params, "prompts": batch,
            "samples_per_prompt": m, "prompt_len": prompt_len, "new_tokens": new,
            "phases_s": phases, "phases_fraction": {k: v / total for k, v in phases.items()},
            "sum_of_phases_s": total, "rl_step_end_to_end_s": whole}


def scaling(quick: bool) -> list[dict]:
    from infalign_jax import models, rl
    rows = []
    widths = (128, 256) if quick else (128, 256, 512)
    batches = (4, 8) if quick else (4, 8, 16)
    for d in widths:
        for b in batches:
            cfg, params, prompt, pmask, rcfg, ref_sorted = _setup(d, 2, b, 4, 32, 16)
            fns = models.decoder_fns(cfg)
            opt = rl.make_optimizer(rcfg)
            table = jax.random.uniform(jax.random.key(5), (b,))

            def reward_fn(t, idx_R, resp, mask):
                return t[idx_R] + 0.01 * jnp.sum(mask, -1)

            step = jax.jit(rl.make_rl_step(rcfg, fns, reward_fn, opt))
            state = rl.init_state(params, opt)
            frozen = rl.Frozen(params, table, ref_sorted, jnp.full((b,), ref_sorted.shape[1]))
            batch_d = {"prompt_BxP": prompt, "prompt_mask_BxP": pmask, "prompt_idx_B": jnp.arange(b)}
            s = timeit(lambda: step(state, frozen, batch_d, jax.random.key(6)), repeat=3)
            rows.append({"d_model": d, "params": cfg.n_params, "prompts": b, "samples": 4 * b,
                         "step_s": s, "sequences_per_s": 4 * b / s})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    result = {"hardware": hardware(), "split": time_split(), "scaling": scaling(args.quick)}
    split = result["split"]
    print(f"hardware: {result['hardware']}")
    print(f"RL iteration ({split['params'] / 1e6:.1f}M params, {split['prompts']} prompts x "
          f"{split['samples_per_prompt']} samples, {split['new_tokens']} new tokens):")
    for k, v in split["phases_s"].items():
        print(f"  {k:10s} {v * 1e3:8.1f} ms  {split['phases_fraction'][k]:6.1%}")
    print(f"  sum {split['sum_of_phases_s'] * 1e3:.1f} ms; rl_step end to end (table reward) "
          f"{split['rl_step_end_to_end_s'] * 1e3:.1f} ms")
    print("scaling (rl_step, 2 layers, 4 samples/prompt, 32+16 tokens):")
    print("| d_model | params | prompts | step s | sequences/s |\n|---|---|---|---|---|")
    for r in result["scaling"]:
        print(f"| {r['d_model']} | {r['params'] / 1e6:.2f}M | {r['prompts']} | {r['step_s']:.3f} "
              f"| {r['sequences_per_s']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
