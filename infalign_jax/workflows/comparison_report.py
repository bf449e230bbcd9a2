"""Tables, claims and plots of the real-task comparison (`workflows.real_comparison`).

`summarise(result, cc)` turns the per-prompt evaluations of every method x seed into rows (mean and
sd over seeds, and for the calibrated transforms the analytic optimum at the row's KL: how far
training is from converged), each method's gain over pi_ref (win rate - 1/2 under the gold judge
and under the training reward, with an interval over prompts and seeds: with a proxy reward, what
the policy gained under the proxy and under the gold judge), differences against calibrated
identity (`evaluation.paired_difference`: prompts, paired, and seeds as variance components) and the
paper's claims, each decided holds / does not hold / unresolved from its 95% interval;
`markdown` and `plot` render them (the plot with the optimum's win rate against KL as a line per
transform).
`cc` is the run's `real_comparison.ComparisonConfig`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from infalign_jax.analysis import analytic, evaluation
from infalign_jax.infra.files import save_figure
from infalign_jax.workflows import sweep


_NAMES = {"bon": "BoN", "won": "WoN"}   # how the tables and plots write each procedure


def _interval(est: evaluation.Estimate) -> dict[str, float]:
    return {"point": float(est.point), "lower": float(est.lower), "upper": float(est.upper)}


def _verdict(diff: dict[str, float], sign: float, flagged: bool, one_seed: bool = False) -> str:
    if flagged:
        return "unresolved (KL not matched)"
    if one_seed:   # paired_difference's seed term is 0 there: the interval holds prompts only
        return "unresolved (one seed: no seed spread)"
    lo, hi = sign * diff["lower"], sign * diff["upper"]
    lo, hi = min(lo, hi), max(lo, hi)
    if lo > 0:
        return "holds"
    if hi < 0:
        return "does not hold"
    return "unresolved"


def calibrated_transform(method: str, procedure: str, t: float
                         ) -> tuple[str, dict[str, float]] | None:
    """The calibrated transform (name, parameters) `method` trains with: exp's t takes the
    procedure's sign (t > 0 for BoN, t < 0 for WoN); None for the methods without one (raw,
    BoNBoN, BoN sampling)."""
    return {"identity": ("identity", {}), "vbon": ("log", {}),
            "exp": ("exp", {"t": (1.0 if procedure == "bon" else -1.0) * abs(t)})}.get(method)


def sets_kl_target(method: str, kl_target: float) -> bool:
    """Whether `method` is trained at its own beta and its held-out KL becomes the target of the
    others (vBoN when the comparison's `kl_target` is 0)."""
    return method == "vbon" and kl_target == 0


def kl_controlled(method: str, kl_target: float) -> bool:
    """Whether `method` trains under the adaptive KL controller aimed at the target (raw and the
    calibrated transforms; vBoN too unless it sets the target). `kl_target`: the comparison's."""
    return method in ("raw", "identity", "exp") or (
        method == "vbon" and not sets_kl_target(method, kl_target))


def optimum(method: str, procedure: str, n: int, t: float, kl: float) -> dict[str, float] | None:
    """The standard and procedure-N win rates (under the training reward) of the KL-RLHF optimum
    of `method`'s calibrated transform at `kl` (analytic, calibrated space): what the trained
    policy would reach at its KL if training had converged. None for the methods without a
    calibrated transform (raw, BoNBoN, BoN sampling)."""
    spec = calibrated_transform(method, procedure, t)
    if spec is None or not analytic.MIN_KL <= kl < analytic.max_resolved_kl(analytic.DEFAULT_GRID):
        return None
    name, params = spec
    return {"standard": analytic.win_rate_at_kl(name, kl, "standard", 1, **params),
            f"{procedure}{n}": analytic.win_rate_at_kl(name, kl, procedure, n, **params)}


def kl_match_status(kls: np.ndarray, target: float, tolerance: float, seeds: tuple,
                    per_seed: bool = True) -> str:
    """"yes" when the runs' KLs (one per seed) sit within `tolerance` x `target` of the target:
    their mean, and with `per_seed` each of them (a mean matched by one seed above and one below
    compares the other methods at two KLs); else "no", naming the seeds off the target. vBoN
    setting the target is checked on its mean only (its seeds' spread is the target's).
    No target (0): "yes"."""
    if target <= 0:
        return "yes"
    band = tolerance * target
    # `not <=`: a NaN KL is off the target too
    off = [f"seed {s}: {kl:.3f}" for s, kl in zip(seeds, kls) if not abs(kl - target) <= band]
    if not abs(float(np.mean(kls)) - target) <= band:
        return "no (mean)" if not (per_seed and off) else f"no (mean; {', '.join(off)})"
    return f"no ({', '.join(off)})" if per_seed and off else "yes"


def summarise(result: dict[str, Any], cc: Any) -> dict[str, Any]:
    """Per-method rows (mean +- sd over seeds), gains over pi_ref, differences against calibrated
    identity, claims."""
    n, evals, target = cc.n, result["evals"], result["kl_target"]
    metrics = ["gold_standard_B", f"gold_bon{n}_B", f"gold_won{n}_B", "proxy_standard_B",
               f"proxy_bon{n}_B", f"proxy_won{n}_B"]
    rows, flagged = [], {}
    for method, runs in evals.items():
        kls = np.array([r["kl_B"].mean() for r in runs])
        status = kl_match_status(kls, target, cc.kl_tolerance, tuple(cc.seeds)[:len(kls)],
                                 per_seed=not sets_kl_target(method, cc.kl_target))
        flagged[method] = status != "yes" and method != "bon_ref"
        row = {"method": method, "seeds": len(runs), "kl": float(kls.mean()),
               "kl_sd": float(kls.std(ddof=1)) if len(kls) > 1 else 0.0,
               "kl_matched": "n/a" if method == "bon_ref" else status,
               "controlled": kl_controlled(method, cc.kl_target),
               "alpha": (float(np.mean([float(r["alpha"]) for r in runs]))
                         if all("alpha" in r for r in runs) else None)}
        for key in metrics:
            per_seed = np.array([r[key].mean() for r in runs])
            row[key[:-2]] = float(per_seed.mean())
            row[key[:-2] + "_sd"] = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0
        row["optimum"] = optimum(method, result["procedure"], n, cc.t, row["kl"])
        rows.append(row)
    # Win rates are against pi_ref's samples: 1/2 is pi_ref itself.
    gains = {method: {key[:-2]: _interval(evaluation.paired_difference(
        np.stack([r[key] for r in runs]), np.full((1, runs[0][key].shape[0]), 0.5),
        what=f"{method}'s {key[:-2]} - 1/2"))
        for key in metrics} for method, runs in evals.items()}
    diffs = {}
    if "identity" in evals:
        base = evals["identity"]
        for method, runs in evals.items():
            if method == "identity":
                continue
            diffs[method] = {key[:-2]: _interval(evaluation.paired_difference(
                np.stack([r[key] for r in runs]), np.stack([r[key] for r in base]),
                what=f"{method} - identity, {key[:-2]}"))
                for key in metrics}
    claims = _claims(result, diffs, flagged, n, {m: len(runs) for m, runs in evals.items()})
    return {"task": result["task"], "procedure": result["procedure"], "kl_target": target,
            "rows": rows, "gain_over_ref": gains, "differences_vs_identity": diffs,
            "claims": claims, "win_rates": cc.win_rates, "texts_cut": texts_cut(result),
            "gold": result["gold"], "proxy": result["proxy"], "same_judge": result["same_judge"]}


def texts_cut(result: dict[str, Any]) -> dict[str, int]:
    """Per judge ("gold", "proxy"), the texts it cut at its length limit over pi_ref's and every
    method's evaluations (a reward model scores only the kept part); evaluations saved before
    the count was kept add 0."""
    runs = [result.get("ref_cuts", {})] + [r for rs in result["evals"].values() for r in rs]
    return {j: sum(int(r.get(f"{j}_texts_cut", 0)) for r in runs) for j in ("gold", "proxy")}


def _claims(result: dict[str, Any], diffs: dict[str, Any], flagged: dict[str, bool], n: int,
            seeds: dict[str, int] | None = None) -> list[dict[str, str]]:
    """The paper's claims from the differences against identity; a claim whose method or
    identity has a single seed (`seeds`: per method) is unresolved: its interval carries no
    seed-to-seed spread (equal methods read "holds" 12% of the time at nominal 2.5%)."""
    proc = result["procedure"]
    seeds = seeds or {}
    metric = f"gold_{proc}{n}"
    out = []

    def claim(name: str, text: str, method: str, key: str, sign: float, also: str = "") -> None:
        """`diffs` hold method - identity; a claim's interval is oriented so that positive is
        the claimed side (sign -1: identity - method), and `difference` names it."""
        if method not in diffs:
            return
        d = diffs[method][key]
        if sign < 0:
            d = {"point": -d["point"], "lower": -d["upper"], "upper": -d["lower"]}
        bad = flagged.get(method, False) or flagged.get("identity", False)
        one = min(seeds.get(method, 2), seeds.get("identity", 2)) < 2
        out.append({"claim": name, "statement": text, "interval": d,
                    "difference": f"{method} - identity" if sign > 0 else f"identity - {method}",
                    "verdict": _verdict(d, 1.0, bad, one), "note": also})

    if proc == "bon":
        claim("a", f"CTRL exp t>0 beats calibrated identity on BoN_{n} (gold)", "exp", metric, 1)
        claim("a", f"calibrated identity beats raw-reward RLHF on BoN_{n} (gold)", "raw", metric,
              -1)
    else:
        claim("b", f"CTRL exp t<0 beats calibrated identity on WoN_{n} (gold)", "exp", metric, 1)
    claim("d", "calibrated identity beats raw RLHF on the standard win rate (gold)", "raw",
          "gold_standard", -1,
          "the paper: a strong baseline; an interval across 0 is consistent with 'as good as' "
          "and reads unresolved here")
    if not result["same_judge"]:
        claim("c", "calibrated identity beats raw RLHF under the gold judge when both train on "
                   "the proxy", "raw", metric, -1,
              "the same difference as (a)'s identity - raw: one piece of evidence, not two"
              if proc == "bon" else "")
    return out


_ESTIMATORS = {"plugin": "plug-in: the empirical distributions' exact win rate",
               "unbiased": "unbiased: N of the M samples drawn without replacement"}


def markdown(summary: dict[str, Any], cc: Any) -> str:
    n = cc.n
    cols = ["method", "seeds", "kl", "kl_matched", "alpha", "gold_standard", f"gold_bon{n}",
            f"gold_won{n}", "proxy_standard", f"proxy_bon{n}", f"proxy_won{n}"]
    rows = []
    for r in summary["rows"]:
        row = {"method": r["method"], "seeds": r["seeds"], "kl_matched": r["kl_matched"],
               "kl": f"{r['kl']:.3f} ± {r['kl_sd']:.3f}",
               "alpha": "—" if r.get("alpha") is None else f"{r['alpha']:.2f}"}
        for c in cols[5:]:
            row[c] = f"{r[c]:.3f} ± {r[c + '_sd']:.3f}"
        rows.append(row)
    lines = [f"### {summary['task']} ({_NAMES[summary['procedure']]}_{n})", "",
             f"Reward (proxy) `{summary['proxy']}`, gold judge `{summary['gold']}`; KL target "
             f"{summary['kl_target']:.4f}. Win rates ({_ESTIMATORS[cc.win_rates]}) against "
             f"pi_ref's samples on the held-out prompts, mean ± sd over seeds; KL = "
             f"full-vocabulary KL(pi || pi_ref) per response; alpha = mean weight of the trained "
             f"policy on its line from pi_ref (1: as trained).",
             "", sweep.markdown_table(rows, cols), ""]
    cut = {j: c for j, c in summary.get("texts_cut", {}).items() if c}
    if cut:
        lines += ["Texts cut at a judge's length limit and scored on their kept part only, over "
                  "pi_ref's and every method's evaluations: "
                  + ", ".join(f"{j} {c}" for j, c in cut.items()) + ".", ""]
    proc = f"{summary['procedure']}{n}"
    conv = [r for r in summary["rows"] if r.get("optimum")]
    if conv:
        ccols = ["method", "kl", "proxy_standard", "optimum_standard", "gain_fraction_standard",
                 f"proxy_{proc}", f"optimum_{proc}", f"gain_fraction_{proc}"]
        crows = []
        for r in conv:
            row = {"method": r["method"], "kl": f"{r['kl']:.3f}"}
            for key in ("standard", proc):
                got, best = r[f"proxy_{key}"], r["optimum"][key]
                row.update({f"proxy_{key}": f"{got:.3f}", f"optimum_{key}": f"{best:.3f}",
                            f"gain_fraction_{key}": f"{(got - 0.5) / (best - 0.5):.2f}"})
            crows.append(row)
        lines += ["Convergence: each calibrated method against the KL-RLHF optimum of its own "
                  "transform at the same KL (analytic, calibrated space; under the training "
                  "reward), gain fraction = (win rate - 1/2) / (optimum - 1/2):", "",
                  sweep.markdown_table(crows, ccols), ""]
    gcols = ["method", "gold_standard", f"gold_{proc}"] + (
        [] if summary["same_judge"] else ["proxy_standard", f"proxy_{proc}"])
    seeds = {r["method"]: r["seeds"] for r in summary["rows"]}

    def label(*methods):   # one seed: paired_difference has no seed term, prompts alone
        return methods[0] + (" (1 seed: interval over prompts only)"
                             if min(seeds.get(m, 2) for m in methods) < 2 else "")
    grows = [{"method": label(m), **{c: "{point:+.3f} [{lower:+.3f}, {upper:+.3f}]".format(**g[c])
                                     for c in gcols[1:]}}
             for m, g in summary["gain_over_ref"].items()]
    if grows:
        lines += ["Gain over pi_ref (win rate - 1/2, 95% interval over prompts and seeds"
                  + ("" if summary["same_judge"] else
                     "; with a proxy reward: what the policy gained under the proxy and under "
                     "the gold judge") + "):", "",
                  sweep.markdown_table(grows, gcols), ""]
    if summary["differences_vs_identity"]:
        dcols = ["method", "gold_standard", f"gold_{summary['procedure']}{n}",
                 f"proxy_{summary['procedure']}{n}"]
        drows = [{"method": label(m, "identity"),
                  **{c: "{point:+.3f} [{lower:+.3f}, {upper:+.3f}]".format(**d[c])
                     for c in dcols[1:]}}
                 for m, d in summary["differences_vs_identity"].items()]
        lines += ["Difference against calibrated identity (95% interval over prompts and seeds):",
                  "", sweep.markdown_table(drows, dcols), ""]
    if summary["claims"]:
        lines += ["Claims: each difference is oriented so that a positive value is on the claimed "
                  "side.", "",
                  "| claim | statement | difference | [95%] | verdict |", "|---|---|---|---|---|"]
        for c in summary["claims"]:
            i = c["interval"]
            note = f" ({c['note']})" if c.get("note") else ""
            lines.append(f"| ({c['claim']}) | {c['statement']}{note} | {c['difference']} = "
                         f"{i['point']:+.3f} | [{i['lower']:+.3f}, {i['upper']:+.3f}] | "
                         f"{c['verdict']} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], cc: Any, path: str) -> str:
    """Gold BoN_N / WoN_N win rate (the task's procedure) against KL, one point per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = f"gold_{result['procedure']}{cc.n}_B"
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {}
    for method, runs in result["evals"].items():
        dots = ax.scatter([r["kl_B"].mean() for r in runs], [r[key].mean() for r in runs],
                          label=method)
        colours[method] = dots.get_facecolor()[0]
    kls = [r["kl_B"].mean() for runs in result["evals"].values() for r in runs]
    if result["same_judge"] and kls:   # the optimum is the training reward's (here the gold's)
        grid = np.linspace(0.02, 1.2 * max(kls), 25)
        for method in ("identity", "exp", "vbon"):
            best = [optimum(method, result["procedure"], cc.n, cc.t, k) for k in grid]
            if method in result["evals"] and all(best):
                ax.plot(grid, [b[f"{result['procedure']}{cc.n}"] for b in best], lw=0.8,
                        ls="--", color=colours[method], label=f"{method}: optimum")
    if result["kl_target"] > 0:
        ax.axvline(result["kl_target"], color="grey", lw=0.5, ls="--")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xlabel("KL(pi || pi_ref), held-out prompts")
    ax.set_ylabel(f"{_NAMES[result['procedure']]}_{cc.n} win rate (gold judge)")
    ax.set_title(f"{result['task']}: one point per seed ({cc.win_rates} win-rate estimate)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
