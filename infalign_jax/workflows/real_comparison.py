"""The paper's comparison on a real language model: every method at matched KL, several seeds.

InfAlign's claims (spec 1.4, 1.7), on a real task (`configs/ctrl_real.py`: SmolLM2 as pi_ref,
helpfulness judged for Best-of-N, harmlessness for Worst-of-N), at matched KL:
  (a) CTRL exp(t C), t > 0, beats calibrated identity, which beats raw-reward RLHF, on BoN_N;
  (b) exp with t < 0 is best for WoN_N;
  (c) calibration is more robust to reward hacking (train on a proxy, judge with the gold judge);
  (d) calibrated identity is a strong baseline for the standard win rate.

`run` trains each method with each seed through the ordinary run loop (`loops.train.run`), all of
them on one reference table built once, then evaluates every trained policy on the same held-out
prompts against the same pi_ref samples, under the gold judge (the task's own) and under the
training reward (the proxy, when `config.task.reward` is a reward model):

* methods: raw-reward RLHF (`raw`), calibrated RLHF (`identity`), CTRL `exp` (t = +|t| for a BoN
  task, -|t| for a WoN task), the log transform (`vbon`: vBoN's beta = 1/(N - 1)), BoNBoN
  (`bonbon`, BoN distillation), and Best-of-N sampling from pi_ref itself (`bon_ref`, selected by
  the training reward; no training, KL = log N - (N - 1)/N).
* matched KL: vBoN is trained first at its own beta; its mean held-out KL becomes the target of
  the adaptive beta controller (`rl.beta_schedule="adaptive"`, Ziegler et al.) for the other
  CTRL methods (or `kl_target` when set, and then vBoN is controlled too), each started from the
  beta whose KL-RLHF optimum has that KL (`start_beta`: analytic in calibrated space; for the
  raw reward, tilting the reference table). BoNBoN has no beta. A short run's KL still scatters
  across seeds, so each trained run (all but the target-setting vBoN) whose held-out KL is more
  than kl_tolerance / 2 from the target is evaluated instead at theta_ref + alpha (theta -
  theta_ref), alpha from at most `kl_match_tries` interpolated evaluations
  (`kl_match.match_kl`; `kl_match="none"` turns it off); each row reports its mean alpha. Each
  row's KL is the full-vocabulary KL(pi || pi_ref) summed along the policy's samples on the
  evaluation prompts; a row is flagged when its mean, or any of its seeds (but for the
  target-setting vBoN's), is more than `kl_tolerance` from the target
  (`comparison_report.kl_match_status` names them), and a claim that rests on a flagged row is
  "unresolved".
* statistics: per prompt, the standard / BoN_N / WoN_N win rate against the shared pi_ref
  samples, by the unbiased subset estimator (`win_rates="unbiased"`, the default,
  `evaluation.subset_win_rates`: draws without replacement) or the plug-in (`"plugin"`,
  `evaluation.plugin_win_rates`: the empirical distributions' exact win rate, draws with
  replacement). The plug-in is biased when eval_samples is close to N, most for WoN_N, and not
  only towards 1/2: its bias differs between policies (two of equal WoN_4 differ by +0.018 in
  expectation at M = 4; with tied scores it moves WoN_4 away from 1/2), so it can move the
  differences the claims are decided on. A rerun into the same work dir with
  another `win_rates` re-estimates the saved evaluations from their judge scores (and saves
  them so), against the saved pi_ref samples, without training or sampling. A method's
  difference against calibrated identity with an interval over prompts (paired) and seeds
  (`evaluation.paired_difference`). A claim holds when
  its 95% interval lies on the claimed side of 0, does not hold when it lies on the other side,
  and is unresolved otherwise.

Outputs in the work dir: `<task>/<method>/seed=<s>/` (each a normal run directory),
`<task>/evaluation/<method>_seed<s>.npz` (per-prompt scores, win rates and KL),
`<task>/kl_target.json` (vBoN's target, kept by a rerun with other seeds), `comparison.json`,
`comparison.md` (tables, differences, claims; `comparison_report`) and
`<task>/win_rate_vs_kl.png`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import models
from infalign_jax.analysis import analytic, evaluation
from infalign_jax.core import kl as kl_lib
from infalign_jax.core.calibration import ReferenceTable
from infalign_jax.core.transforms import transform_from_config
from infalign_jax.decoding import sampling
from infalign_jax.decoding.sampling import SamplingConfig
from infalign_jax.infra import provenance
from infalign_jax.infra import validate as check
from infalign_jax.infra.config_utils import (UNUSED_OPTION_RULES, as_dict, comma_list,
                                             dataclass_from)
from infalign_jax.infra.files import atomic_open, write_json, write_npz
from infalign_jax.infra.memory import release_freed_memory
from infalign_jax.infra.metrics_io import duration
from infalign_jax.loops import skeleton, train
from infalign_jax.rewards import judges
from infalign_jax.rl.tasks import real, sources
from infalign_jax.workflows import comparison_report as report, kl_match, sweep

METHODS = ("raw", "identity", "exp", "vbon", "bonbon", "bon_ref")
TRAINED = ("raw", "identity", "exp", "vbon", "bonbon")


@dataclasses.dataclass(frozen=True)
class ComparisonConfig:
    """`config.comparison`: what is compared and how it is measured."""

    _config_owner = "config.comparison"
    methods: str = "all"           # "all" or comma-separated names of METHODS
    seeds: tuple = (0, 1, 2)
    n: int = 4                     # the N of BoN_N / WoN_N, of vBoN and of BoNBoN
    t: float = 4.0                 # |t| of CTRL exp; its sign is the task's procedure's
    kl_target: float = 0.0         # 0: vBoN's measured KL; > 0: every CTRL method's target
    kl_tolerance: float = 0.1      # relative KL mismatch (mean or a seed) that flags a row
    kl_match: str = "interpolate"  # "interpolate": each trained run moved to the target KL along
                                   # its line from pi_ref (workflows/kl_match.py); "none"
    kl_match_tries: int = 2        # interpolated evaluations at most per run
    eval_samples: int = 8          # samples per evaluation prompt, per policy and for pi_ref
    eval_batch_prompts: int = 16   # evaluation prompts per sampler call
    eval_seed: int = 1234
    win_rates: str = "unbiased"    # per-prompt estimator: "unbiased" or "plugin"
                                   # (evaluation.WIN_RATE_ESTIMATORS)

    def __post_init__(self):
        unknown = sorted(set(self.method_list) - set(METHODS))
        if unknown or not self.method_list:
            check.fail(self, "methods", f"'all' or a comma-separated subset of {METHODS} "
                                        f"(unknown: {unknown})")
        repeated = sorted({m for m in self.method_list if self.method_list.count(m) > 1})
        if repeated:
            check.fail(self, "methods", f"a list without repeats (given twice: {repeated})")
        check.int_tuple(self, "seeds", "a non-empty tuple of distinct integers >= 0", low=0,
                        distinct=True)
        check.ints(self, ("n",), low=2)
        check.ints(self, ("eval_samples", "eval_batch_prompts"))
        check.ints(self, ("kl_match_tries",), low=0)
        check.choice(self, "kl_match", ("interpolate", "none"))
        check.choice(self, "win_rates", tuple(evaluation.WIN_RATE_ESTIMATORS))
        check.ints(self, ("eval_seed",), low=0)
        check.numbers(self, ("t", "kl_tolerance"), strict=True)
        check.numbers(self, ("kl_target",))
        if self.eval_samples < self.n:
            check.fail(self, "eval_samples", f">= n = {self.n} (the unbiased estimator draws N of "
                                             f"them without replacement; the plug-in's bias "
                                             f"grows as M nears N)")

    @property
    def method_list(self) -> list[str]:
        if self.methods == "all":
            return list(METHODS)
        return list(comma_list(self.methods))


def parse_comparison(section: Any) -> ComparisonConfig:
    values = as_dict(section)
    if "seeds" in values:
        values["seeds"] = tuple(values["seeds"])
    return dataclass_from(ComparisonConfig, values, "comparison")


def unused_comparison_options(config: Mapping[str, Any]) -> dict[str, str]:
    """The `comparison` options its settings leave unread (`UNUSED_OPTION_RULES`): `t` when no
    compared method's run depends on it (only CTRL exp's does), `kl_match_tries` without
    matching."""
    c = config.get("comparison")
    if not isinstance(c, Mapping):
        return {}
    try:
        cc = parse_comparison(c)
    except ValueError:
        return {}   # refused with its own message where it is read
    unused = {}
    if not any(method_overrides(m, "bon", cc.n, 1.0) != method_overrides(m, "bon", cc.n, 2.0)
               for m in cc.method_list):
        unused["comparison.t"] = "comparison.methods including one that reads t ('exp')"
    if cc.kl_match == "none":
        unused["comparison.kl_match_tries"] = "comparison.kl_match='interpolate'"
    return unused


UNUSED_OPTION_RULES.append(unused_comparison_options)


def method_overrides(method: str, procedure: str, n: int, t: float) -> dict[str, Any]:
    """Config overrides (on configs/ctrl_real.py's config) that make `method`; the KL controller
    is added by `run`."""
    spec = report.calibrated_transform(method, procedure, t)
    if spec is not None:
        name, params = spec
        over = {"transform.name": name, **{f"transform.{k}": v for k, v in params.items()}}
        return {**over, "rl.beta": 1.0 / (n - 1)} if method == "vbon" else over
    return {"raw": {"transform.name": "raw"},
            "bonbon": {"method": "bonbon", "bonbon.n": n}}[method]


def _set_transform(base: Any, overrides: dict[str, Any]) -> Any:
    """`base` with its transform section replaced when the overrides name another transform (a
    transform's parameters are its own keys; `sweep.apply_overrides` refuses new keys)."""
    import ml_collections
    from infalign_jax.core.transforms import transform_section
    name = overrides.get("transform.name")
    if name is None:
        return base
    cfg = ml_collections.ConfigDict(base.to_dict())
    params = {k.split(".", 1)[1]: v for k, v in overrides.items()
              if k.startswith("transform.") and k != "transform.name"}
    cfg.transform = transform_section(name, **params)
    return cfg


def raw_beta_at_kl(table: ReferenceTable, kl: float, lo: float = 1e-4, hi: float = 1e4) -> float:
    """The beta at which tilting each prompt's reference samples by exp(r / beta) has mean
    KL(tilt || pi_ref) = kl over the table's prompts (the raw reward has no calibrated-space
    form; its tilt is measured on the K samples per prompt, so KL <= log K). Bisection in log
    beta (KL falls with beta)."""
    r_BxK = np.asarray(table.sorted_rewards_BxK, np.float64)
    counts_B = np.asarray(table.counts_B)
    valid_BxK = np.arange(r_BxK.shape[1]) < counts_B[:, None]

    def kl_at(beta: float) -> float:
        z_BxK = np.where(valid_BxK, r_BxK / beta, -np.inf)
        logp_BxK = z_BxK - np.logaddexp.reduce(z_BxK, axis=1, keepdims=True)
        p_BxK = np.exp(logp_BxK)
        terms = np.where(valid_BxK, p_BxK * (logp_BxK + np.log(counts_B)[:, None]), 0.0)
        return float(terms.sum(axis=1).mean())

    if not kl_at(hi) < kl < kl_at(lo):
        raise ValueError(f"KL target {kl:g} outside the range ({kl_at(hi):.3g}, {kl_at(lo):.3g}) "
                         f"that tilting the reference table's {r_BxK.shape[1]} raw rewards per "
                         f"prompt reaches")
    a, b = np.log(lo), np.log(hi)
    for _ in range(60):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if kl_at(float(np.exp(mid))) > kl else (a, mid)
    return float(np.exp(0.5 * (a + b)))


def start_beta(cfg: Any, kl_target: float, table: ReferenceTable | None) -> float:
    """The KL controller's first beta for the run config `cfg`: the beta at which the KL-RLHF
    optimum pi_ref exp(Phi / beta) has KL(pi* || pi_ref) = kl_target. Analytic in calibrated
    space for a calibrated transform (`analytic.beta_at_kl`); for the raw reward, from the
    reference table (`raw_beta_at_kl`). A short run moves beta by at most a factor
    (1 +- 0.2 rollouts / horizon) a step, so the start decides most of where its KL lands: from
    vBoN's 1/(N - 1), exp(4 C) is ~12x too sharp (docs/results.md section 5)."""
    name, params = transform_from_config(cfg.transform)
    if name != "raw":
        return analytic.beta_at_kl(name, kl_target, **params)
    if table is None:
        raise ValueError("the raw reward's starting beta needs the reference table")
    return raw_beta_at_kl(table, kl_target)


# Keys of the comparison's config that its runs set themselves (per method and seed: the seed,
# transform, beta and its schedule and target, BoNBoN's n) or that only label it (`size`, which
# takes effect in the config argument, `:size=...`).
KEYS_SET = ("size", "base.seed", "base.method", "base.rl.beta", "base.rl.beta_schedule",
            "base.rl.kl_target", "base.transform.", "base.bonbon.n")


def _method_config(base: Any, method: str, n: int, t: float, kl_target: float
                   ) -> tuple[Any, dict[str, Any]]:
    """`base` with `method`'s transform (and for BoNBoN its section) in place, and the overrides
    still to apply: the method's own and, for a KL-controlled method, the adaptive schedule aimed
    at `kl_target` (its start beta is `run_config`'s)."""
    procedure = real.get_real_task(base.task.name).procedure
    over = method_overrides(method, procedure, n, t)
    cfg = _set_transform(base, over)
    rest = {k: v for k, v in over.items() if not k.startswith("transform.")}
    if method == "bonbon":
        import ml_collections
        from infalign_jax.rl.bon_distillation import BoNBoNConfig
        from infalign_jax.infra.config_utils import config_section
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        if "bonbon" not in cfg:
            cfg.bonbon = config_section(BoNBoNConfig)
        if "method" not in cfg:
            cfg.method = "ctrl"
    if report.kl_controlled(method, kl_target):
        rest.update({"rl.beta_schedule": "adaptive", "rl.kl_target": float(kl_target)})
    return cfg, rest


def run_config(base: Any, method: str, seed: int, n: int, t: float, kl_target: float,
               table: ReferenceTable | None = None) -> Any:
    """The run config of one (method, seed): the method's overrides, the seed, and for the CTRL
    methods other than a fixed-beta vBoN the adaptive KL controller aimed at `kl_target`,
    started from `start_beta` (`table`: the shared reference table, needed for `raw`)."""
    cfg, rest = _method_config(base, method, n, t, kl_target)
    rest["seed"] = int(seed)
    if report.kl_controlled(method, kl_target):
        rest["rl.beta"] = start_beta(cfg, kl_target, table)
    return sweep.apply_overrides(cfg, rest)


def refuse_unread_base_overrides(config: Any, keys: Sequence[str], flag: str = "config") -> None:
    """Refuses a ``--<flag>.base.<key>`` override that no run of the comparison reads: each
    trained method's run config is checked as a training run's flags are
    (`config_utils.refuse_unused_overrides`; e.g. ``base.rl.ppo_clip`` under RLOO, or an RL option
    BoNBoN leaves unread when BoNBoN is the only method); one method reading it is enough."""
    from infalign_jax.infra.config_utils import refuse_unused_overrides
    cc = parse_comparison(config.comparison)
    methods = [m for m in cc.method_list if m in TRAINED]
    base_keys = [k[len("base."):] for k in keys if k.startswith("base.")]
    if not base_keys:
        return
    if not methods:   # pi_ref's evaluation reads the task; the shared table, reference.*
        unread = [k for k in base_keys if not k.startswith(("task.", "reference."))]
        if unread:
            raise ValueError(f"--{flag}.base.{unread[0]} is not used by this run: "
                             f"config.comparison.methods={cc.methods!r} trains no method, and "
                             f"the rest reads only base.task.* and base.reference.*")
        return
    base = task_configs(config)[0]
    run_cfgs = [sweep.apply_overrides(*_method_config(base, method, cc.n, cc.t, cc.kl_target))
                for method in methods]
    for key in base_keys:
        errors = []
        for cfg in run_cfgs:
            try:
                refuse_unused_overrides(cfg, [key], f"--{flag}.base.")
            except ValueError as e:
                errors.append(str(e))
            else:
                break
        if errors and len(errors) == len(methods):
            raise ValueError(f"{errors[0]} (under every trained method of the comparison: "
                             f"{', '.join(methods)})")


# ------------------------------------------------------------------------------ evaluation
CUT_KEYS = ("gold_texts_cut", "proxy_texts_cut")   # texts a judge cut, per saved evaluation


def cuts_said(ev: dict[str, Any]) -> str:
    """The texts an evaluation's judges cut at their length limits, for its log line ("" when
    none, or for an evaluation saved before they were counted)."""
    said = [f"{k.split('_')[0]} {int(ev[k])}" for k in CUT_KEYS if int(ev.get(k, 0))]
    return f"; texts cut at a judge's length limit: {', '.join(said)}" if said else ""


class Evaluator:
    """pi_ref's samples on the evaluation prompts, scored once by both judges; then any policy's.

    Every policy is compared with the *same* pi_ref samples (a paired comparison across methods).
    """

    def __init__(self, inputs: real.TaskInputs, gold: Any, cc: ComparisonConfig,
                 log: Callable[[str], None] = print, saved_ref: dict[str, Any] | None = None):
        self.inputs, self.gold, self.proxy, self.cc, self.log = inputs, gold, inputs.judge, cc, log
        self.fns = models.decoder_fns(inputs.policy.model_cfg)
        self.ref_params = inputs.policy.params
        s = inputs.section
        self.scfg = SamplingConfig(n=cc.eval_samples, max_new_tokens=s.max_new_tokens,
                                   temperature=float(s.temperature), eos_id=inputs.eos_id,
                                   pad_id=inputs.pad_id)
        self.texts = list(inputs.split.eval_texts)
        fns = self.fns
        self._sample = jax.jit(lambda p, x, m, r, c: sampling.sample(fns, p, x, m, r, c),
                               static_argnums=4)
        # each prompt prefilled once per model, its samples decoded over the shared prompt KV
        self._kl = jax.jit(lambda p, q, x, m, smp: jnp.sum(sampling.shared_prompt_path_terms(
            fns, p, fns, q, x, m, smp).kl_RxL, -1))
        if saved_ref is None:
            ref = self.sample_and_score(self.ref_params, cc.eval_seed, self.scfg)
            self.ref_texts = ref["texts"]
            self.ref_cuts = {k: ref[k] for k in CUT_KEYS}
        else:   # an earlier run's (`saved_ref`: its evaluation/pi_ref.npz), scored already
            ref, self.ref_texts = saved_ref, None
            self.ref_cuts = {k: ref[k] for k in CUT_KEYS if k in ref}
            want = (len(self.texts), cc.eval_samples)
            for key in ("gold_BxM", "proxy_BxM"):
                if ref[key].shape != want:
                    raise ValueError(f"the saved pi_ref evaluation's {key} has shape "
                                     f"{ref[key].shape}, this comparison needs {want}")
        self.ref_gold_BxM, self.ref_proxy_BxM = ref["gold_BxM"], ref["proxy_BxM"]
        self.same_judge = self.proxy.id == self.gold.id

    def sample_and_score(self, params: Any, seed: int, scfg: SamplingConfig,
                         kl: bool = False) -> dict[str, np.ndarray]:
        """M samples per evaluation prompt; their gold and proxy scores (B x M), response texts,
        with `kl` the full-vocabulary KL(pi || pi_ref) of each sample (B x M), and the count of
        texts each judge cut at its length limit (`gold_texts_cut`, `proxy_texts_cut`: a reward
        model scores only the kept part)."""
        inp, m = self.inputs, scfg.n
        step = self.cc.eval_batch_prompts
        out: dict[str, list] = {"gold_BxM": [], "proxy_BxM": [], "kl_BxM": [], "texts": []}
        cut = {"gold": 0, "proxy": 0}
        for start in range(0, len(self.texts), step):
            rows = slice(start, start + step)
            x, xm = jnp.asarray(inp.eval_BxP[rows]), jnp.asarray(inp.eval_mask_BxP[rows])
            key = jax.random.fold_in(jax.random.key(seed), start)
            smp = self._sample(params, x, xm, key, scfg)
            r_np = np.asarray(smp.tokens_BxNxL).reshape(-1, scfg.max_new_tokens)
            rm_np = np.asarray(smp.mask_BxNxL, bool).reshape(r_np.shape)
            texts = [inp.detokenize(r[k]) for r, k in zip(r_np, rm_np)]
            prompts = [t for t in self.texts[rows] for _ in range(m)]
            b = x.shape[0]
            out["texts"] += texts
            for name, judge in (("gold", self.gold), ("proxy", self.proxy)):
                cuts = judges.cuts_since(judges.cut_counter(judge))
                out[f"{name}_BxM"].append(np.asarray(judge(prompts, texts),
                                                     np.float64).reshape(b, m))
                cut[name] += cuts()
            if kl:
                out["kl_BxM"].append(np.asarray(self._kl(params, self.ref_params, x, xm, smp),
                                                np.float64).reshape(b, m))
        return {**{k: (np.concatenate(v) if v and k != "texts" else v) for k, v in out.items()},
                **{f"{name}_texts_cut": np.asarray(n) for name, n in cut.items()}}

    def win_rates(self, gold_BxM: np.ndarray, proxy_BxM: np.ndarray) -> dict[str, np.ndarray]:
        """Per-prompt win rates against the shared pi_ref samples, under each judge, by the
        estimator `cc.win_rates`."""
        n = self.cc.n
        estimate = evaluation.WIN_RATE_ESTIMATORS[self.cc.win_rates]
        out = {}
        for judge, pol, ref in (("gold", gold_BxM, self.ref_gold_BxM),
                                ("proxy", proxy_BxM, self.ref_proxy_BxM)):
            out[f"{judge}_standard_B"] = evaluation.standard_win_rate(pol, ref)
            for proc in ("bon", "won"):
                out[f"{judge}_{proc}{n}_B"] = estimate(pol, ref, n, proc)[:, 0]
        return out

    def evaluate_policy(self, params: Any, seed: int) -> dict[str, Any]:
        got = self.sample_and_score(params, seed, self.scfg, kl=True)
        return {**self.win_rates(got["gold_BxM"], got["proxy_BxM"]), "kl_B": got["kl_BxM"].mean(1),
                **{k: got[k] for k in ("gold_BxM", "proxy_BxM", "texts") + CUT_KEYS}}

    def evaluate_bon_ref(self, seed: int) -> dict[str, Any]:
        """Best-of-N sampling from pi_ref: N M samples per prompt, the best of each N by the
        training reward (what a deployment has), scored by both judges; KL is BoN's analytic
        log N - (N - 1)/N."""
        n, m = self.cc.n, self.cc.eval_samples
        got = self.sample_and_score(self.ref_params, seed,
                                    dataclasses.replace(self.scfg, n=n * m))
        b = got["gold_BxM"].shape[0]
        proxy = got["proxy_BxM"].reshape(b, m, n)
        pick = np.argmax(proxy, -1)[..., None]
        gold = np.take_along_axis(got["gold_BxM"].reshape(b, m, n), pick, -1)[..., 0]
        proxy = np.take_along_axis(proxy, pick, -1)[..., 0]
        texts = np.asarray(got["texts"], object).reshape(b, m, n)
        chosen = np.take_along_axis(texts, pick, -1)[..., 0].reshape(-1).tolist()
        return {**self.win_rates(gold, proxy), "kl_B": np.full(b, float(kl_lib.bon_kl_bound(n))),
                "gold_BxM": gold, "proxy_BxM": proxy, "texts": chosen,
                **{k: got[k] for k in CUT_KEYS}}   # of all N M samples scored


def _save_eval(path: str, ev: dict[str, Any], prompt_ids: Sequence[str], prompts: Sequence[str],
               m: int) -> None:
    """An evaluation's texts (`<stem>_texts.jsonl`, one row per sample) and then its arrays
    (`path`, npz). Each file appears whole or not at all, and the npz, which a rerun takes as the
    evaluation being done (`_load_eval`), last: a run killed while saving evaluates again."""
    with atomic_open(os.path.splitext(path)[0] + "_texts.jsonl") as f:
        for i, text in enumerate(ev["texts"]):
            b, j = divmod(i, m)
            f.write(json.dumps({"prompt_id": prompt_ids[b], "prompt": prompts[b], "sample": j,
                                "response": text, "gold": float(ev["gold_BxM"][b, j]),
                                "proxy": float(ev["proxy_BxM"][b, j])}) + "\n")
    write_npz(path, **{k: v for k, v in ev.items() if k != "texts"})


def _load_eval(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------ the run
# What a rerun into the same work dir may change: which methods and seeds are compared (each has
# its own files), the win-rate estimator (the saved scores are re-estimated), and the base run
# keys that change neither the samples nor the trained parameters (logging, checkpointing, the
# device layout). Anything else (the steps, the learning rate, the evaluation samples, the KL
# tolerance, which is also the band new runs are matched within...) would mix its evaluations
# with the saved ones.
COMPARISON_RESUMABLE = ("comparison.methods", "comparison.seeds", "comparison.win_rates") + tuple(
    k for k in skeleton.RESUMABLE_KEYS if k not in ("train.num_steps", "train.init_from"))


SPLIT_DIGEST_KEY = "prompts.split.sha256"


def split_digest(split: Any) -> str:
    """sha256 of a task's prompt split (`sources.Split`): its training and evaluation ids and
    texts, in order."""
    return hashlib.sha256(json.dumps([list(split.train_ids), list(split.train_texts),
                                      list(split.eval_ids), list(split.eval_texts)]).encode()
                          ).hexdigest()


def check_resume(task_dir: str, base: Any, cc: ComparisonConfig, split: Any = None) -> None:
    """Writes `<task_dir>/comparison_config.json` (the base run config and the comparison
    settings, flat) on the first run; on a rerun, refuses a config that differs from it in any key
    outside COMPARISON_RESUMABLE, naming the keys, unless the record is all the directory holds
    (a first run that stopped before any output, e.g. on a bad value: it is rewritten). With
    `split` (the task's `sources.Split`), the prompts' texts are recorded too (SPLIT_DIGEST_KEY):
    the generated sets are code, which another revision may word differently."""
    # the files the base config names, by content too: prompts edited in place were evaluated
    # beside the saved evaluations of the old ones
    now = {**skeleton.with_input_digests(skeleton.flat_record(base)),
           **skeleton.flat_record({"comparison": dataclasses.asdict(cc)}),
           **({SPLIT_DIGEST_KEY: split_digest(split)} if split is not None else {})}
    now = {k: v for k, v in now.items() if k not in COMPARISON_RESUMABLE}
    path = os.path.join(task_dir, "comparison_config.json")
    if not os.path.exists(path) or os.listdir(task_dir) == ["comparison_config.json"]:
        os.makedirs(task_dir, exist_ok=True)
        write_json(path, now)
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    # a record from before the data digests and the tolerance's check is compared without them
    now = skeleton.without_keys_added_since(saved, now, also=("comparison.kl_tolerance",
                                                              SPLIT_DIGEST_KEY))
    keys = skeleton.differing_keys(saved, now)
    if keys:
        diff = skeleton.describe_differences(keys, saved, now, "saved", "now")
        raise ValueError(f"{task_dir} holds a comparison of another config ({diff}); its "
                         f"evaluations would be mixed with this one's: use another work dir (only "
                         f"{', '.join(COMPARISON_RESUMABLE)} may change on a rerun)")

def _train(cfg: Any, run_dir: str, table_path: str, devices: Any = None) -> Any:
    """Trains (or resumes) one run on the shared reference table; returns its policy params."""
    os.makedirs(run_dir, exist_ok=True)
    train.share_reference_table(table_path, run_dir)   # a rerun trusts a table that is there
    state, _ = train.run(cfg, run_dir, log=lambda line: None, devices=devices)
    if not cfg.rl.get("lora", {}).get("rank", 0):
        return jax.device_get(state.params)   # the policy itself (LoRA: adapters, merged below)
    return sources.load_policy(sources.PolicyConfig(run_dir)).params


def run_task(base: Any, cc: ComparisonConfig, workdir: str,
             log: Callable[[str], None] = print, devices: Any = None) -> dict[str, Any]:
    """Every method x seed of one real task (configs/ctrl_real.py's config `base`); returns the
    per-method evaluations. `devices` restricts the training runs' mesh."""
    clock = time.perf_counter()
    inputs = real.task_inputs(base.task)
    task_name = inputs.section.name
    gold = judges.get_judge(inputs.task.judge)
    log(f"{task_name}: {len(inputs.split.train_ids)} training / {len(inputs.split.eval_ids)} "
        f"evaluation prompts; reward {inputs.judge.id!r}, gold judge {gold.id!r}")
    check_resume(workdir, base, cc, inputs.split)
    # One reference table for every run (it depends on the task, reward, K and seed only).
    table_path = os.path.join(workdir, train.REFERENCE_TABLE)
    rl_task = real.rl_task_from(inputs)   # the same loaded policy and reward, not a second load
    k, ref_seed = train.reference_settings(base)
    table = train.prepare_reference_table(rl_task, table_path, k, ref_seed, log)
    # A rerun compares with the pi_ref samples the saved evaluations were scored against.
    ref_path = os.path.join(workdir, "evaluation", "pi_ref.npz")
    saved_ref = _load_eval(ref_path)
    evaluator = Evaluator(inputs, gold, cc, log, saved_ref)
    ids, prompts, m = inputs.split.eval_ids, inputs.split.eval_texts, cc.eval_samples
    if saved_ref is None:
        log(f"  pi_ref sampled and scored on the evaluation prompts "
            f"({duration(time.perf_counter() - clock)} into the "
            f"task{cuts_said(evaluator.ref_cuts)})")
        _save_eval(ref_path, {"gold_BxM": evaluator.ref_gold_BxM,
                              "proxy_BxM": evaluator.ref_proxy_BxM,
                              "texts": evaluator.ref_texts, **evaluator.ref_cuts}, ids, prompts, m)
    else:
        log(f"  pi_ref's saved evaluation samples loaded from {ref_path}")
    evals: dict[str, list[dict[str, Any]]] = {}
    # vBoN's target from an earlier run (kl_target.json), so that runs evaluated now without
    # vBoN among the methods are matched to what the saved runs were matched to
    kl_target = cc.kl_target or _saved_kl_target(workdir, log)

    def matched(method: str) -> bool:
        """Whether `method`'s runs are moved to the target KL (every trained method but the
        vBoN that sets the target)."""
        return (cc.kl_match == "interpolate" and kl_target > 0 and method in TRAINED
                and not report.sets_kl_target(method, cc.kl_target))

    def evaluate(method: str, seed: int) -> dict[str, Any]:
        path = os.path.join(workdir, "evaluation", f"{method}_seed{seed}.npz")
        started = time.perf_counter()
        got = _load_eval(path)
        if got is None:
            if method == "bon_ref":
                got = evaluator.evaluate_bon_ref(cc.eval_seed + 1 + seed)
            else:
                # vBoN setting the target trains at its own beta, even when an earlier run's
                # target is already known
                cfg = run_config(base, method, seed, cc.n, cc.t,
                                 0.0 if report.sets_kl_target(method, cc.kl_target)
                                 else kl_target, table)
                if cfg.rl.beta_schedule == "adaptive":
                    log(f"  {method} seed {seed}: beta starts at {cfg.rl.beta:.4g} (the optimum "
                        f"at KL {kl_target:.4f})")
                log(f"  {method} seed {seed}: training ({int(cfg.train.num_steps)} steps) ...")
                params = _train(cfg, os.path.join(workdir, method, f"seed={seed}"), table_path,
                                devices)
                eval_seed = cc.eval_seed + 1 + seed
                if matched(method):
                    got = kl_match.match_kl(
                        lambda p: evaluator.evaluate_policy(p, eval_seed), evaluator.ref_params,
                        params, kl_target, cc.kl_tolerance / 2, cc.kl_match_tries,
                        log=lambda line: log(f"  {method} seed {seed}: {line}"))
                else:
                    got = evaluator.evaluate_policy(params, eval_seed)
                del params
                release_freed_memory()   # the next run's training starts from a trimmed heap
            got["win_rate_estimator"] = np.asarray(cc.win_rates)
            _save_eval(path, got, ids, prompts, m)
        elif str(got.get("win_rate_estimator", "plugin")) != cc.win_rates:
            # the saved scores, re-estimated by this run's estimator and saved again, so the
            # evaluation files agree with the report
            got.update(evaluator.win_rates(got["gold_BxM"], got["proxy_BxM"]),
                       win_rate_estimator=np.asarray(cc.win_rates))
            write_npz(path, **got)
        alpha = f" at alpha {float(got['alpha']):.3f}" if "alpha" in got else ""
        log(f"  {method} seed {seed}: KL {got['kl_B'].mean():.3f}{alpha}, gold BoN_{cc.n} "
            f"{got[f'gold_bon{cc.n}_B'].mean():.3f}, WoN_{cc.n} "
            f"{got[f'gold_won{cc.n}_B'].mean():.3f}, standard "
            f"{got['gold_standard_B'].mean():.3f} ({time.perf_counter() - started:.0f} s; "
            f"{duration(time.perf_counter() - clock)} into the task{cuts_said(got)})")
        return got

    order = [mth for mth in cc.method_list if report.sets_kl_target(mth, cc.kl_target)]
    order += [mth for mth in cc.method_list if mth not in order]
    for method in order:
        evals[method] = [evaluate(method, seed) for seed in cc.seeds]
        if report.sets_kl_target(method, cc.kl_target):
            measured = float(np.mean([e["kl_B"].mean() for e in evals[method]]))
            kl_target = _kl_target(workdir, measured, kl_target, log)
    return {"task": task_name, "procedure": inputs.task.procedure, "kl_target": kl_target,
            "evals": evals, "same_judge": evaluator.same_judge, "gold": gold.id,
            "proxy": inputs.judge.id, "ref_cuts": evaluator.ref_cuts}


def _saved_kl_target(workdir: str, log: Callable[[str], None]) -> float:
    """vBoN's target as an earlier run into `workdir` set it (0.0 if none did): from
    `kl_target.json`, or, in a work dir written before that file existed, from the run config
    of a KL-controlled training run (`rl.kl_target`), which is then written to the file."""
    path = os.path.join(workdir, "kl_target.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return float(json.load(f)["kl_target"])
    for method in TRAINED:
        for run_dir in sorted(glob.glob(os.path.join(workdir, method, "seed=*"))):
            manifest = os.path.join(run_dir, "manifest.json")
            if not os.path.exists(manifest):
                continue
            with open(manifest, encoding="utf-8") as f:
                rl = json.load(f)["config"]["rl"]
            if rl.get("beta_schedule") == "adaptive" and rl.get("kl_target", 0) > 0:
                target = float(rl["kl_target"])
                write_json(path, {"kl_target": target, "source": f"{manifest} rl.kl_target"})
                log(f"  KL target {target:.4f} recovered from {manifest}")
                return target
    return 0.0


def _kl_target(workdir: str, measured: float, saved: float,
               log: Callable[[str], None]) -> float:
    """The KL target vBoN's runs set: their mean held-out KL `measured`, written to
    `<task>/kl_target.json` the first time. A rerun with another seed set keeps the `saved`
    target (`_saved_kl_target`; 0.0: none), which the saved runs were matched to, so old and new
    runs share one target."""
    if saved > 0 and saved != measured:
        log(f"  KL target for the controlled methods: {saved:.4f}, kept from the first run "
            f"(the saved runs were matched to it; vBoN's mean over these seeds is "
            f"{measured:.4f})")
        return saved
    if saved == 0:
        write_json(os.path.join(workdir, "kl_target.json"),
                   {"kl_target": measured, "source": "vbon mean held-out KL"})
    log(f"  KL target for the controlled methods: {measured:.4f} (vBoN's, held out)")
    return measured


def task_configs(config: Any) -> list[Any]:
    """configs/compare_real.py's `base` run config once per task of `config.tasks`."""
    import ml_collections
    names = list(comma_list(config.tasks))
    unknown = sorted(set(names) - set(real.known_tasks()))
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"config.tasks must be a comma-separated list of {real.known_tasks()} "
                         f"without repeats, got {config.tasks!r}")
    temperature = float(config.base.task.get("temperature", 1.0))
    if temperature != 1.0:
        # The evaluation samples carry the KL(pi || pi_ref) each run is matched at: they must be
        # pi's own (the RL rollouts and the sampler's log-probs are at temperature 1).
        raise ValueError(f"config.base.task.temperature={temperature}: the comparison estimates "
                         f"KL(pi || pi_ref) on its evaluation samples, which must be drawn at "
                         f"temperature 1")
    if not config.base.task.data.get("prompts"):
        # a task's shipped prompts have no held-out split: the evaluation took the first
        # training prompts, reported as held out
        raise ValueError("config.base.task.data.prompts is empty (the task's shipped prompts): "
                         "the comparison evaluates on held-out prompts and these have no split "
                         "from the training prompts; use 'generated' or a prompt file")
    out = []
    for name in names:
        cfg = ml_collections.ConfigDict(config.base.to_dict())
        cfg.task.name = name
        cfg.lock()
        out.append(cfg)
    return out


def check_kl_target(cc: ComparisonConfig, task_dir: str, log: Callable[[str], None]) -> None:
    """Refuses a comparison whose KL-controlled methods would have no target: none given
    (`kl_target` 0), no vBoN among the methods to set one, and none saved in `task_dir` by an
    earlier run (`kl_target.json`)."""
    if cc.kl_target == 0 and "vbon" not in cc.method_list and any(
            report.kl_controlled(m, cc.kl_target) for m in cc.method_list) and \
            _saved_kl_target(task_dir, log) == 0:
        check.fail(cc, "kl_target", f"> 0 when 'vbon' is not among the methods (its KL is the "
                                    f"default target) and {task_dir} holds no kl_target.json "
                                    f"from an earlier run")


def run(base_configs: Sequence[Any], comparison: Any, workdir: str,
        log: Callable[[str], None] = print, devices: Any = None) -> str:
    """Runs the comparison for each real-task config in `base_configs`; writes comparison.md /
    .json and the plots into `workdir`; returns the markdown path."""
    cc = comparison if isinstance(comparison, ComparisonConfig) else \
        parse_comparison(comparison)
    for base in base_configs:   # before any task starts
        check_kl_target(cc, os.path.join(workdir, str(base.task.name)), log)
    started, code = provenance.now(), provenance.code_state()
    parts, summaries = [], []
    for base in base_configs:
        name = str(base.task.name)
        result = run_task(base, cc, os.path.join(workdir, name), log, devices)
        summary = report.summarise(result, cc)
        summaries.append(summary)
        report.plot(result, cc, os.path.join(workdir, name, "win_rate_vs_kl.png"))
        parts.append(report.markdown(summary, cc))
    write_json(os.path.join(workdir, "comparison.json"), summaries)
    path = os.path.join(workdir, "comparison.md")
    with atomic_open(path) as f:
        f.write("\n".join(parts))
    provenance.write_manifest(workdir, None, seeds={"seeds": list(cc.seeds),
                                                   "eval_seed": cc.eval_seed},
                              started=started, code=code,
                              extra={"comparison": dataclasses.asdict(cc),
                                     "configs": [b.to_dict() for b in base_configs]})
    log(f"comparison: {path}")
    return path
