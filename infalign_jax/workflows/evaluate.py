"""A policy checkpoint against pi_ref under inference-time procedures, for `experiments/evaluate.py`.

Sections of the config (`configs/evaluate.py`; the dataclasses in `workflows.evaluate_config`):
  * `policy`, `reference`: `sources.PolicyConfig` (transformers dir | GGUF file | CTRL run dir;
    "" = SmolLM2-135M-Instruct from the wheel). Both must encode the prompts identically.
  * `reward`: `sources.RewardConfig`, turned into the judge by `sources.make_judge`.
  * `data`: `sources.PromptsConfig`; "" = the shipped prompts of `eval.task`. The file is split by
    prompt text (`data.split_seed`) into `eval.num_prompts` evaluation prompts and, when a
    controlled decoder runs, `cd.scorer_prompts` disjoint prompts to train its prefix scorer on.
    When the policy is a real-task CTRL run, the prompts it trained on (re-split from its
    manifest's config.task) are passed over, counted in results.json (`prompts.held_out`); a
    run whose record cannot say (its prompt file is gone) is evaluated with a warning.
  * `eval` (`EvalConfig`): which procedures, M samples a prompt, the N grid, budget, seed.
  * `select` (`SelectConfig`): RBoN-KL / RBoN-WD betas, the uncertainty penalty k.
  * `cd` (`CDConfig`): the decoders and their prefix scorer.

Procedures (`PROCEDURES`; unknown names are refused by name). Every BoN_N / WoN_N win rate is
the unbiased subset estimate (N of the M samples without replacement; the plug-in's bias at N
near M does not shrink with more prompts) with a bootstrap 95% CI over prompts, ties 1/2
(`analysis.evaluation`):
  * always, "policy": M samples of the policy and M of pi_ref per prompt; the standard win rate
    and KL(pi || pi_ref) (k1, k3, full-vocabulary) of `eval_harness.evaluate_policy`.
  * "bon" / "won": BoN_N(pi) vs BoN_N(pi_ref) (WoN_N) for N in `eval.ns`, from those samples;
    with `eval.against="base"` (the spec's alternative reading) BoN_N(pi) vs pi_ref, as are the
    decoders' rows.
  * "rbon_kl", "rbon_wd", "uncertainty_bon": selections from a second pool of M pi_ref samples a
    prompt (seed `eval.seed + 1`), in M // N disjoint groups of N (`core.selection`): RBoN-KL
    (r + beta log pi_ref(y)), RBoN-WD (r + beta mean cosine of pi_ref's mean-pooled response
    hidden states), uncertainty-penalised BoN (mean - k std over the ensemble members' scores;
    needs a reward with members, i.e. kind "ensemble"). Plain BoN selection ("bon_selection")
    runs beside them. Each is compared with pi_ref's samples of the "policy" step (standard win
    rate) and with BoN_N(pi_ref) (1 - W(BoN_N(pi_ref) > selection)). KL: log N, the bound of any
    one-of-N selection (BoN: log N - (N - 1) / N).
  * "cd_tokenwise", "cd_blockwise": controlled decoding of pi_ref (`decoding.controlled_decoding`)
    with a prefix scorer trained in the run: a fresh small value model, trained by CD-FUDGE or
    CD-Q (`rewards.prefix_scorers.make_scorer_step`) on `cd.scorer_samples` pi_ref samples of
    each training prompt scored by the judge. `eval_harness.evaluate_decoder` gives the standard
    and BoN_N / WoN_N win rates of the decoder and its KL (tokenwise exact, blockwise CD's bound).
Outputs in the work dir: manifest.json (resolved config, seeds, prompt ids, provenance),
results.json (every row and record), win_rates.csv, samples.jsonl (every generated text: prompt id,
prompt, method, sample index, response, score; selections also n and the candidate index, the
candidate pool its pi_ref log-probability), <record>.json/.csv (`write_record`), and the plots
win_rate_vs_n.png and win_rate_vs_kl.png.
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Any, Callable, Collection

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infalign_jax import models
from infalign_jax.analysis import eval_harness, evaluation
from infalign_jax.core import kl, selection
from infalign_jax.core.types import init_train_state
from infalign_jax.data import readers
from infalign_jax.data.tokenize import detokenizer, encode_prompts, special_ids
from infalign_jax.decoding import controlled_decoding as cd_lib
from infalign_jax.decoding import sampling
from infalign_jax.decoding.sampling import SamplingConfig
from infalign_jax.infra import files, provenance
from infalign_jax.rewards import judges, prefix_scorers
from infalign_jax.rl.tasks import real, sources

from infalign_jax.workflows.evaluate_config import (  # noqa: F401  (configs/evaluate.py)
    DECODERS, PROCEDURES, SECTIONS, SELECTIONS, CDConfig, EvalConfig, SelectConfig, parse_config,
    renamed_errors)


# --------------------------------------------------------------------------- the samples log
class SampleLog:
    """Every generated text with its prompt, method, sample index and score (samples.jsonl)."""

    def __init__(self, detokenize: Callable, prompt_ids: list[str], prompts: list[str]):
        self.detokenize, self.ids, self.prompts = detokenize, prompt_ids, prompts
        self.rows: list[dict[str, Any]] = []
        self.scores: dict[str, np.ndarray] = {}

    def texts(self, resp_RxL: np.ndarray, mask_RxL: np.ndarray) -> list[str]:
        return [self.detokenize(r[m]) for r, m in zip(resp_RxL, mask_RxL.astype(bool))]

    def add(self, method: str, resp_RxL, mask_RxL, scores, ids=None, prompts=None,
            **columns: Any) -> list[str]:
        """Rows b*M + j of the responses: sample j of prompt b; `columns` hold one value a row."""
        ids, prompts = ids or self.ids, prompts or self.prompts
        scores = np.asarray(scores, np.float64).reshape(-1)
        m = scores.size // len(ids)
        self.scores[method] = scores.reshape(len(ids), m)
        texts = self.texts(np.asarray(resp_RxL), np.asarray(mask_RxL))
        for r, (text, score) in enumerate(zip(texts, scores)):
            row = {"prompt_id": ids[r // m], "prompt": prompts[r // m], "method": method,
                   "sample": r % m, "response": text, "score": float(score)}
            row.update({k: v[r] for k, v in columns.items()})
            self.rows.append(row)
        return texts

    def hook(self, policy_method: str, reference_method: str) -> eval_harness.OnScored:
        names = {"policy": policy_method, "reference": reference_method}
        return lambda side, resp, mask, scores: self.add(names[side], resp, mask, scores)


# --------------------------------------------------------------------------- rows
def _row(procedure: str, n: int, against: str, est: Any, kl_kind: str | None = None,
         kl_mean: float | None = None, kl_stderr: float | None = None) -> dict[str, Any]:
    if isinstance(est, evaluation.Estimate):
        est = {"point": float(est.point[0]), "lower": float(est.lower[0]),
               "upper": float(est.upper[0]), "stderr": float(est.stderr[0])}
    return {"procedure": procedure, "n": int(n), "against": against, "win_rate": dict(est),
            "kl": None if kl_kind is None else
            {"kind": kl_kind, "mean": kl_mean, "stderr": kl_stderr}}


def _record_rows(record: dict[str, Any], name: str, procs: tuple, kl_kind: str) -> list[dict]:
    """The standard win rate with its KL, then BoN_N / WoN_N of `procs` from a harness record
    (against the same procedure on pi_ref or plain pi_ref: its `win_rate_against`)."""
    base = record["win_rate_against"] == "base"
    est = record["kl"][kl_kind]
    rows = [_row(name, 1, "pi_ref", record["win_rate"]["standard"], kl_kind, est["mean"],
                 est["stderr"])]
    for proc in procs:
        tag = {"bon": "BoN", "won": "WoN"}[proc]
        rows += [_row(f"{name}:{proc}", n, "pi_ref" if base else f"{tag}_N(pi_ref)",
                      record["win_rate"][f"{proc}_{n}"]) for n in record["ns"]]
    return rows


def _selection_rows(name: str, n: int, chosen_BxR: np.ndarray, ref_BxM: np.ndarray,
                    e: EvalConfig) -> list[dict[str, Any]]:
    vs_ref = evaluation.win_rate(chosen_BxR, ref_BxM, 1, "bon", num_resamples=e.num_resamples,
                                 seed=e.seed)
    # W(selection > BoN_N(pi_ref)) = 1 - W(BoN_N(pi_ref) > selection), ties 1/2 on both sides.
    # BoN_N(pi_ref) from N of the M samples without replacement (`subset_win_rates`): the
    # plug-in's draws with replacement weaken it, and a plain BoN selection scored 0.61 at N = M = 8
    # where the truth is 1/2.
    per_prompt = 1.0 - evaluation.subset_win_rates(ref_BxM, chosen_BxR, n, "bon", "base")
    vs_bon = evaluation.bootstrap_mean(per_prompt, e.num_resamples, e.seed, value_range=(0.0, 1.0))
    bound = (("bon_bound", float(kl.bon_kl_bound(n))) if name == "bon_selection"
             else ("selection_bound", float(np.log(n))))
    return [_row(name, n, "pi_ref", vs_ref, bound[0], bound[1]),
            _row(name, n, "BoN_N(pi_ref)", vs_bon)]


# --------------------------------------------------------------------------- steps
def _load(p: sources.PolicyConfig, key: str) -> sources.Policy:
    with renamed_errors(config__task__policy=f"config.{key}"):
        return sources.load_policy(p)


def _split(s: dict[str, Any], num_train: int, exclude: Collection[str] = ()
           ) -> tuple[str, sources.Split]:
    d, e = s["data"], s["eval"]
    if d.prompts == getattr(sources, "GENERATED", None):
        from infalign_jax.rl.tasks import prompt_sets
        train, evals = prompt_sets.split(e.task, num_train, e.num_prompts, d.split_seed, exclude)
        return "generated", sources.Split([p.id for p in train], [p.text for p in train],
                                          [p.id for p in evals], [p.text for p in evals])
    path = d.prompts or real.get_real_task(e.task).prompts_path
    with renamed_errors(config__task__data="config.data", config__task__num_prompts="config.cd."
                  "scorer_prompts", config__task__eval_prompts="config.eval.num_prompts"):
        return path, sources.split_prompts(path, num_train, e.num_prompts, d.split_seed, d.format,
                                           exclude)


def _held_out_split(s: dict[str, Any], num_train: int, say: Callable[[str], None]
                    ) -> tuple[str, sources.Split, dict[str, Any]]:
    """`_split` passing over the prompts the policy trained on, when it is a real-task CTRL run
    (re-split from its manifest's config.task): the evaluation is on prompts it never saw. Also
    what was checked, for results.json."""
    path = s["policy"].checkpoint
    manifest = sources.run_manifest(path) if path else ""
    trained: list[str] = []
    check = {"policy_training_prompts": "unknown (not a CTRL run)", "left_out": 0}
    if manifest:
        try:
            trained = real.run_training_prompts(manifest)
            check["policy_training_prompts"] = len(trained)
        except (ValueError, OSError) as err:
            check["policy_training_prompts"] = f"unknown ({err})"
            say(f"evaluate: warning: cannot tell which prompts {path} trained on ({err}); the "
                f"evaluation prompts may include some of them")
    prompts_path, split = _split(s, num_train, trained)
    check["merged"] = split.merged
    if split.merged:
        say(f"evaluate: {split.merged} records of {prompts_path} repeat an earlier prompt (up to "
            f"spacing and case) and were merged into it")
    if trained:
        _, plain = _split(s, num_train)
        check["left_out"] = len({readers.prompt_key(t) for t in plain.eval_texts
                                 + plain.train_texts} & {readers.prompt_key(t) for t in trained})
        if check["left_out"]:
            say(f"evaluate: passed over {check['left_out']} prompts of {prompts_path} that the "
                f"policy's run trained on ({len(trained)} training prompts)")
    return prompts_path, split, check


def _candidate_features(ref_fns, ref_params, prompt_BxP, mask_BxP, resp, rmask, m: int):
    """(log pi_ref(y) per candidate [B, M], mean-pooled response hidden states [B, M, D]).

    The embedding pools the final hidden states at the response tokens themselves (not at the
    positions predicting them, which hold the prompt's last state, alike for every candidate,
    and leave out the response's last token: two responses differing in it had cosine 1)."""
    @jax.jit
    def features(params, p, pm, r, rm):
        logp = sampling.sequence_logprobs(ref_fns, params, p, pm, r, rm).sum(-1)
        tokens, mask = sampling.concat_prompt_response(p, pm, r, rm)
        hidden = ref_fns.hidden(params, tokens, mask)[:, p.shape[1]:]
        return logp, selection.mean_pool(hidden, rm)
    p_rep, pm_rep = np.repeat(prompt_BxP, m, 0), np.repeat(mask_BxP, m, 0)
    logp, emb = features(ref_params, p_rep, pm_rep, resp, rmask)
    batch = prompt_BxP.shape[0]
    return np.asarray(logp).reshape(batch, m), np.asarray(emb).reshape(batch, m, -1)


def _select(name: str, sc_GxN, logp_GxN, emb_GxNxD, members_ExGxN, sel: SelectConfig):
    if name == "bon_selection":
        return selection.best_of_n(sc_GxN)
    if name == "rbon_kl":
        return selection.rbon_kl(sc_GxN, logp_GxN, sel.rbon_kl_beta)
    if name == "rbon_wd":
        return selection.rbon_wd(sc_GxN, emb_GxNxD, sel.rbon_wd_beta)
    return selection.uncertainty_bon(members_ExGxN, sel.uncertainty_k, sel.uncertainty_penalty)


def run_selections(s, ctx, log: SampleLog, progress) -> list[dict[str, Any]]:
    """RBoN-KL / RBoN-WD / uncertainty BoN (and plain BoN) selections from a pi_ref pool."""
    e, sel = s["eval"], s["select"]
    names = ("bon_selection",) + tuple(p for p in e.procedures if p in SELECTIONS)
    m, batch = e.samples, len(ctx.eval_ids)
    resp, rmask, scores_BxM = eval_harness.sample_scored(
        ctx.ref_fns, ctx.reference.params, ctx.eval_BxP, ctx.eval_mask, ctx.judge,
        ctx.scfg(m), e.seed + 1, ctx.detokenize)
    if np.isnan(scores_BxM).any():
        # select_by_score passes NaN over: a group of N with one would be a best-of-(N - 1)
        # reported as N (the policy rows' win rates refuse NaN scores too)
        bad = np.flatnonzero(np.isnan(scores_BxM).any(1))
        raise ValueError(f"evaluate: the judge gave NaN for {int(np.isnan(scores_BxM).sum())} "
                         f"of pi_ref's {scores_BxM.size} selection candidates (prompts "
                         f"{[ctx.eval_ids[i] for i in bad[:10]]}); a selection needs every "
                         f"candidate scored")
    logp_BxM, emb_BxMxD = _candidate_features(ctx.ref_fns, ctx.reference.params, ctx.eval_BxP,
                                              ctx.eval_mask, resp, rmask, m)
    texts = log.add("pi_ref_candidates", resp, rmask, scores_BxM,
                    ref_logprob=[float(x) for x in logp_BxM.reshape(-1)])
    members_ExBxM = None
    if "uncertainty_bon" in names:
        prompts = [ctx.eval_texts[r // m] for r in range(batch * m)]
        before = ctx.cut()
        members_ExBxM = np.stack([np.asarray(j(prompts, texts), np.float64).reshape(batch, m)
                                  for j in ctx.members])
        # the members score again texts the ensemble scored above: their cuts count once
        ctx.rescored_cuts += ctx.cut() - before
    ref_BxM = log.scores["pi_ref"]
    rows = []
    for n in e.ns:
        g = m // n            # disjoint groups of n candidates per prompt
        cut = lambda a: jnp.asarray(a[:, :g * n].reshape((batch * g, n) + a.shape[2:]))
        members = None if members_ExBxM is None else jnp.asarray(
            members_ExBxM[:, :, :g * n].reshape(-1, batch * g, n))
        groups = [f"{pid} candidates {n * j}-{n * j + n - 1}" for pid in ctx.eval_ids
                  for j in range(g)]
        for name in names:
            choice = selection.checked(_select(name, cut(scores_BxM), cut(logp_BxM),
                                               cut(emb_BxMxD), members, sel),
                                       f"{name} at N={n}", groups)
            index_BxG = np.asarray(choice.index_B).reshape(batch, g)
            cand_BxG = index_BxG + n * np.arange(g)[None]
            chosen = np.take_along_axis(scores_BxM, cand_BxG, 1)
            flat = (cand_BxG + m * np.arange(batch)[:, None]).reshape(-1)
            log.add(f"{name}@N={n}", resp[flat], rmask[flat], chosen, n=[n] * flat.size,
                    candidate=[int(c) for c in cand_BxG.reshape(-1)])
            rows += _selection_rows(name, n, chosen, ref_BxM, e)
        progress(f"evaluate: selections at N={n}: " + ", ".join(
            f"{r['procedure']} {r['win_rate']['point']:.3f}" for r in rows[-2 * len(names)::2]))
    return rows


def train_scorer(s, ctx, log: SampleLog, progress) -> tuple[Any, Any, dict[str, Any]]:
    """A fresh value model trained by CD-FUDGE / CD-Q on judged pi_ref samples of the training
    prompts: (model config, params, training summary)."""
    e, c = s["eval"], s["cd"]
    n = c.scorer_samples
    progress(f"evaluate: prefix scorer: sampling pi_ref on {len(ctx.train_ids)} training prompts")
    resp, rmask, scores_BxN = eval_harness.sample_scored(
        ctx.ref_fns, ctx.reference.params, ctx.train_BxP, ctx.train_mask, ctx.judge,
        ctx.scfg(n, temperature=1.0), e.seed + 2, ctx.detokenize)
    log.add("scorer_training/pi_ref", resp, rmask, scores_BxN, ids=ctx.train_ids,
            prompts=ctx.train_texts)
    batch = {"prompt_BxP": np.repeat(ctx.train_BxP, n, 0),
             "prompt_mask_BxP": np.repeat(ctx.train_mask, n, 0), "response_BxL": resp,
             "response_mask_BxL": rmask, "final_reward_B": scores_BxN.reshape(-1).astype(np.float32)}
    if c.scorer_method == "cdq":
        ids, logp = jax.jit(prefix_scorers.ref_next_token_logprobs, static_argnums=(0,),
                            static_argnames="top_k")(
            ctx.ref_fns, ctx.reference.params, *(batch[k] for k in prefix_scorers.BATCH_KEYS[:4]),
            top_k=c.top_k)
        batch.update(next_ids_BxLxJ=ids, ref_next_logprobs_BxLxJ=logp)
    d = c.scorer_d_model
    vcfg = models.ModelConfig(
        vocab_size=ctx.reference.model_cfg.vocab_size, d_model=d, n_layers=c.scorer_layers,
        n_heads=2, n_kv_heads=2, head_dim=d // 2, d_ff=2 * d, heads=("value",),
        max_len=ctx.eval_BxP.shape[1] + e.max_new_tokens + 1)
    progress(f"evaluate: prefix scorer: {c.scorer_method} training of a {c.scorer_layers}-layer "
             f"d={d} value model")
    opt = optax.adam(c.scorer_learning_rate)
    params = jax.jit(models.init_params, static_argnums=0)(vcfg, jax.random.key(e.seed + 3))
    state = init_train_state(params, opt)
    step = jax.jit(prefix_scorers.make_scorer_step(vcfg, c.scorer_method, opt))
    losses = []
    for i in range(c.scorer_steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if i == 0 or (i + 1) % max(1, c.scorer_steps // 4) == 0:
            progress(f"evaluate: prefix scorer ({c.scorer_method}) step {i + 1}/{c.scorer_steps}"
                     f" loss {losses[-1]:.4f}")
    summary = {"method": c.scorer_method, "steps": c.scorer_steps, "first_loss": losses[0],
               "last_loss": losses[-1], "train_prompts": len(ctx.train_ids),
               "samples_per_prompt": n, "reward_mean": float(scores_BxN.mean()),
               "reward_std": float(scores_BxN.std())}
    return vcfg, state.params, summary


def refuse_unscored(name: str, unscored_R, scorer: dict) -> None:
    """Controlled decoding whose prefix scorer could not rank a step's candidates is refused
    (blockwise: every value NaN, so an unguided block was kept; tokenwise: NaN or infinite values
    that leave no softmax), so its win rates would be reported for another procedure."""
    unscored_R = np.asarray(unscored_R)
    rows = int(np.count_nonzero(unscored_R))
    if rows:
        raise ValueError(
            f"evaluate: {name}: the prefix scorer's values (NaN or infinite) could not rank the "
            f"candidates at {int(unscored_R.sum())} decoding steps of {rows} of "
            f"{unscored_R.size} sequences "
            f"(the scorer's training ended at loss {scorer.get('last_loss')}); nothing is "
            f"reported for a decoder that could not rank its candidates")


def run_decoders(s, ctx, log: SampleLog, progress) -> tuple[list, dict, dict]:
    e, c = s["eval"], s["cd"]
    vcfg, vparams, scorer = train_scorer(s, ctx, log, progress)
    kw = dict(max_new_tokens=e.max_new_tokens, eos_id=ctx.eos_id, pad_id=ctx.pad_id)

    @jax.jit
    def tokenwise(rp, vp, p, pm, rng):
        out = cd_lib.tokenwise_decode(ctx.ref_fns, rp, prefix_scorers.scorer_from_params(vcfg, vp),
                                      p, pm, rng, lam=c.lam, top_k=c.top_k, **kw)
        return out.tokens_BxL, out.mask_BxL, out.kl_B, out.unscored_B

    @jax.jit
    def blockwise(rp, vp, p, pm, rng):
        out = cd_lib.blockwise_decode(ctx.ref_fns, rp, prefix_scorers.scorer_from_params(vcfg, vp),
                                      p, pm, rng, num_candidates=c.num_candidates,
                                      block_size=c.block_size, **kw)
        return out.tokens_BxL, out.mask_BxL, out.kl_bound_B, out.unscored_B

    rows, records = [], {}
    for name in (p for p in e.procedures if p in DECODERS):
        fn, kl_kind = (tokenwise, "exact") if name == "cd_tokenwise" else (blockwise, "bound")

        def decode(p, pm, rng, fn=fn, name=name):
            tokens, mask, kl, unscored = fn(ctx.reference.params, vparams, p, pm, rng)
            refuse_unscored(name, unscored, scorer)
            return tokens, mask, kl

        record = eval_harness.evaluate_decoder(
            decode, ctx.ref_fns,
            ctx.reference.params, ctx.eval_BxP, ctx.eval_mask, ctx.judge, m=e.samples, ns=e.ns,
            seed=e.seed, detokenize=ctx.detokenize, num_resamples=e.num_resamples,
            kl_kind=kl_kind, name=name, on_scored=log.hook(name, f"{name}/pi_ref"),
            against=e.against, reference=ctx.reference_samples(e, 1.0), **kw)
        records[name] = record
        rows += _record_rows(record, name, ("bon", "won"), kl_kind)
        progress(f"evaluate: {name} standard win rate "
                 f"{record['win_rate']['standard']['point']:.3f}, KL ({kl_kind}) "
                 f"{record['kl'][kl_kind]['mean']:.3f}")
    return rows, records, scorer


class _Context:
    """What the steps share: models, judge, encoded prompts, sampler settings."""

    def __init__(self, s: dict[str, Any], split: sources.Split):
        e = s["eval"]
        self.policy = _load(s["policy"], "policy")
        same = s["reference"].checkpoint == s["policy"].checkpoint
        self.reference = self.policy if same else _load(s["reference"], "reference")
        task = real.get_real_task(e.task)
        with renamed_errors(config__task__reward="config.reward"):
            judge = sources.make_judge(s["reward"], task.judge)
        if "uncertainty_bon" in e.procedures and not getattr(judge, "members", None):
            raise ValueError(f"config.eval.procedures: 'uncertainty_bon' needs a reward with "
                             f"ensemble members (config.reward.kind='ensemble'), got "
                             f"config.reward.kind={s['reward'].kind!r}")
        tok = self.policy.tokenizer
        chat = task.use_chat_template and sources.use_chat_template(s["data"], tok)
        self.eval_ids, self.eval_texts = split.eval_ids, split.eval_texts
        self.train_ids, self.train_texts = split.train_ids, split.train_texts
        # One width for evaluation and scorer-training prompts: one sampler program serves both.
        texts = split.eval_texts + split.train_texts
        all_BxP, all_mask = encode_prompts(tok, texts, chat)
        if not same:
            ref_BxP, _ = encode_prompts(self.reference.tokenizer, texts, chat)
            if ref_BxP.shape != all_BxP.shape or (ref_BxP != all_BxP).any() or \
                    self.reference.model_cfg.vocab_size != self.policy.model_cfg.vocab_size:
                raise ValueError("config.reference.checkpoint: its tokenizer or vocabulary differs "
                                 "from config.policy.checkpoint's (win rates on shared prompts "
                                 "and KL need one tokenizer)")
        num_eval = len(split.eval_texts)
        self.eval_BxP, self.eval_mask = all_BxP[:num_eval], all_mask[:num_eval]
        self.train_BxP, self.train_mask = all_BxP[num_eval:], all_mask[num_eval:]
        self.eos_id, self.pad_id = special_ids(tok)
        self.detokenize = detokenizer(tok)
        self.pol_fns = models.decoder_fns(self.policy.model_cfg)
        self.ref_fns = self.pol_fns if same else models.decoder_fns(self.reference.model_cfg)
        # The judge sees the raw prompt texts, not the chat-formatted ones the sampler decodes.
        raw = {self.detokenize(row[m]): t for row, m, t in zip(all_BxP, all_mask, texts)}
        self.judge = real.PromptTextJudge(judge, raw)
        self.cut = judges.cuts_since(judges.cut_counter(judge))   # 0 for a judge that cuts none
        self.rescored_cuts = 0   # cuts of texts scored a second time (counted once)
        self.members = getattr(judge, "members", None)   # an ensemble's reward models
        self.judge_id = getattr(judge, "id", judge.name)
        self.temperature, self.max_new_tokens = e.temperature, e.max_new_tokens
        self._references: dict[float, eval_harness.ReferenceSamples] = {}

    def reference_samples(self, e: Any, temperature: float) -> eval_harness.ReferenceSamples:
        """pi_ref's evaluation samples at `temperature`, drawn and judged once for the policy's
        evaluation and the decoders' (which sample at 1)."""
        if temperature not in self._references:
            self._references[temperature] = eval_harness.reference_samples(
                self.ref_fns, self.reference.params, self.eval_BxP, self.eval_mask, self.judge,
                m=e.samples, seed=e.seed, max_new_tokens=e.max_new_tokens, eos_id=self.eos_id,
                pad_id=self.pad_id, temperature=temperature, detokenize=self.detokenize)
        return self._references[temperature]

    def scfg(self, n: int, temperature: float | None = None) -> SamplingConfig:
        return SamplingConfig(n=n, max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature if temperature is None else temperature,
                              eos_id=self.eos_id, pad_id=self.pad_id)


# --------------------------------------------------------------------------- outputs
def _remove_stale_records(workdir: str, records: dict) -> list[str]:
    """Removes the <record>.json/.csv an earlier evaluation in `workdir` wrote (named in its
    results.json) that this one does not (fewer procedures): they would sit beside this run's
    manifest as if they were its own. Returns the removed names."""
    try:
        with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
            earlier = set(json.load(f).get("records") or {})
    except (OSError, ValueError, AttributeError):
        return []
    removed = sorted(earlier - set(records))
    for name in removed:
        for ext in (".json", ".csv"):
            path = os.path.join(workdir, name + ext)
            if os.path.isfile(path):
                os.remove(path)
    return removed


def _write_outputs(workdir: str, rows: list, records: dict, log: SampleLog) -> dict[str, Any]:
    paths = {"samples": os.path.join(workdir, "samples.jsonl"),
             "win_rates": os.path.join(workdir, "win_rates.csv"),
             "plot_n": os.path.join(workdir, "win_rate_vs_n.png"),
             "plot_kl": os.path.join(workdir, "win_rate_vs_kl.png")}
    with files.atomic_open(paths["samples"]) as f:
        for row in log.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with files.atomic_open(paths["win_rates"]) as f:
        writer = csv.writer(f)
        writer.writerow(["procedure", "n", "against", "point", "lower", "upper", "stderr",
                         "kl_kind", "kl"])
        for r in rows:
            w, k = r["win_rate"], r["kl"] or {}
            writer.writerow([r["procedure"], r["n"], r["against"], w["point"], w["lower"],
                             w["upper"], w["stderr"], k.get("kind", ""), k.get("mean", "")])
    for name, record in records.items():
        eval_harness.write_record(workdir, record, stem=name)
    paths["stale_records_removed"] = _remove_stale_records(workdir, records)
    by_n: dict[str, list] = {}
    by_kl: dict[str, list] = {}
    for r in rows:
        label = f"{r['procedure']} vs {r['against']}"
        by_n.setdefault(label, []).append((r["n"], r["win_rate"]))
        if r["kl"] is not None and r["against"] == "pi_ref":
            by_kl.setdefault(f"{r['procedure']} [{r['kl']['kind']}]", []).append(
                (r["kl"]["mean"], r["win_rate"]))
    eval_harness.plot_win_rate_series(by_n, paths["plot_n"], "N")
    eval_harness.plot_win_rate_series(by_kl, paths["plot_kl"], "KL(. || pi_ref)", log2_x=False)
    return paths


def run(config: Any, workdir: str, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluates `config.policy` against `config.reference` into `workdir`; returns the results
    (also in workdir/results.json). See the module docstring."""
    started, t0, code = provenance.now(), time.time(), provenance.code_state()
    s = parse_config(config)
    e = s["eval"]
    say = lambda msg: progress(f"[{time.time() - t0:6.1f}s] {msg}")
    decoders = any(p in DECODERS for p in e.procedures)
    with files.no_empty_dirs_left(workdir):
        prompts_path, split, held_out = _held_out_split(
            s, s["cd"].scorer_prompts if decoders else 0, say)
        ctx = _Context(s, split)
        say(f"evaluate: {ctx.policy.source} vs pi_ref {ctx.reference.source}, judge "
            f"{ctx.judge_id}, {len(split.eval_ids)} prompts x {e.samples} samples")
        os.makedirs(workdir, exist_ok=True)
        log = SampleLog(ctx.detokenize, split.eval_ids, split.eval_texts)
        record = eval_harness.evaluate_policy(
            ctx.pol_fns, ctx.policy.params, ctx.ref_fns, ctx.reference.params, ctx.eval_BxP,
            ctx.eval_mask, ctx.judge, m=e.samples, ns=e.ns, seed=e.seed,
            max_new_tokens=e.max_new_tokens, eos_id=ctx.eos_id, pad_id=ctx.pad_id,
            temperature=float(e.temperature), detokenize=ctx.detokenize,
            num_resamples=e.num_resamples, name="policy", on_scored=log.hook("policy", "pi_ref"),
            against=e.against, reference=ctx.reference_samples(e, float(e.temperature)))
        records = {"policy": record}
        rows = _record_rows(record, "policy", tuple(p for p in ("bon", "won")
                                                   if p in e.procedures), "full_vocab")
        say(f"evaluate: policy standard win rate {record['win_rate']['standard']['point']:.3f} "
            f"(KL full-vocab {record['kl']['full_vocab']['mean']:.3f})")
        if any(p in SELECTIONS for p in e.procedures):
            rows += run_selections(s, ctx, log, say)
        scorer = None
        if decoders:
            cd_rows, cd_records, scorer = run_decoders(s, ctx, log, say)
            rows += cd_rows
            records.update(cd_records)
        paths = _write_outputs(workdir, rows, records, log)
        cut = ctx.cut() - ctx.rescored_cuts   # every text this evaluation scored, once
        if cut:
            say(f"evaluate: the reward model cut {cut} scored texts at its length limit (it "
                f"scores only the kept part); results.json: reward_texts_cut")
        results = {"rows": rows, "records": records, "scorer": scorer, "judge": ctx.judge_id,
                   "reward_texts_cut": cut,
                   "policy": ctx.policy.source, "reference": ctx.reference.source,
                   "prompts": {"source": prompts_path, "eval_ids": split.eval_ids,
                               "scorer_train_ids": split.train_ids, "held_out": held_out}}
        paths["results"] = files.write_json(os.path.join(workdir, "results.json"), results)
        inputs = {"prompts": prompts_path} if os.path.isfile(prompts_path) else {}
        provenance.write_manifest(
            workdir, config, started=started, code=code, inputs=inputs,
            seeds={"eval": e.seed, "candidates": e.seed + 1, "scorer_samples": e.seed + 2,
                   "scorer_init": e.seed + 3, "split": s["data"].split_seed},
            extra={"prompts": results["prompts"], "judge": ctx.judge_id,
                   "policy": ctx.policy.source, "reference": ctx.reference.source,
                   "outputs": paths})
    if paths["stale_records_removed"]:
        say(f"evaluate: removed the records an earlier evaluation here wrote and this one does "
            f"not: {paths['stale_records_removed']}")
    say(f"evaluate: wrote {len(log.rows)} samples and {len(rows)} win rates to {workdir}")
    return results
