"""Paper-table reproduction: analytic figures and the exact task's methods at matched KL.

`run_exact_stage` trains each method of the comparison on the enumerable exact task with the same
run loop (`train.run`), with each method's beta chosen so that its *exact target* policy
pi* ∝ pi_ref exp(Phi(C)/beta) has the same KL budget (vBoN's beta is fixed at 1/(N-1) by its
definition, and that fixes the budget for everyone). The table then reports, by enumeration, the
trained policy's KL and its standard / BoN_N / WoN_N win rates against pi_ref, next to its target's.
What the paper claims, in calibrated space (spec 1.4): at matched KL, exp(t C) with t > 0 beats the
identity and log for BoN_N, t < 0 wins for WoN_N, and the identity is best for the standard win
rate. The analytic solver's optimal transform is optimal in *continuous* calibrated space; on the
discrete task (64 responses, a finite reference table) it is one more transform, not a bound.
Every method is trained with several seeds (`SIZES`); the table gives mean ± sd and the exact
distance KL(pi || pi*) of each trained policy to its target, so "reaches its optimum" is measured.

Methods (name -> transform, beta rule): raw-reward RLHF (`raw`), calibrated RLHF (`identity`),
vBoN (`log`, beta = 1/(N-1)), CTRL exp t>0 (BoN) and t<0 (WoN), CTRL with the analytic
solver's optimal transform for BoN_N and WoN_N at the budget, and BoNBoN (`bonbon`: the exact
config's bonbon section at N, with samples_per_prompt / N pairs per prompt a step). BoNBoN has no
beta to match: its target is BoN_N(pi_ref), whose KL is close to vBoN's budget (vBoN's target is
BoN_N too in continuous calibrated space) but not equal to it on the discrete task, and the run's
own KL is where its loss takes it; a second row moves each BoNBoN run along its line from pi_ref
to the budget (`moved_to_kl`), as the real-task comparison matches KL.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from infalign_jax.analysis import analytic_solver
from infalign_jax.rl.bon_distillation import BoNBoNConfig
from infalign_jax.rl.tasks import exact as et
from infalign_jax.infra import provenance
from infalign_jax.infra.files import atomic_open, save_figure, write_json

from infalign_jax.workflows import kl_match, sweep
from infalign_jax.loops import skeleton, train
from infalign_jax.core.transforms import get_transform, transform_overrides
from infalign_jax.infra import validate as check
from infalign_jax.infra.config_utils import (UNUSED_OPTION_RULES, as_dict, comma_list,
                                             dataclass_from, refuse_unused_overrides)

SIZES = {"smoke": dict(steps=2, anneal=1, samples=8, k=64, seeds=(0,)),  # plumbing only
         # one seed, 64 samples per prompt: the `make demo` step (about a minute a method)
         "demo": dict(steps=1500, anneal=1000, samples=64, k=4096, seeds=(0,)),
         "tiny": dict(steps=1500, anneal=1000, samples=256, k=4096, seeds=(0, 1, 2)),
         "small": dict(steps=1500, anneal=1000, samples=256, k=4096, seeds=(0, 1, 2, 3, 4)),
         "full": dict(steps=3000, anneal=2000, samples=512, k=16384, seeds=(0, 1, 2, 3, 4))}


# The exact-config keys each exact-stage run sets itself: the size's schedule, samples and K
# (`sized_config`), and per method its beta, KL budget and transform.
EXACT_KEYS_SET = ("train.num_steps", "rl.decay_steps", "rl.beta_anneal_steps",
                  "rl.samples_per_prompt", "reference.k", "train.eval_every", "rl.beta",
                  "task.kl_budget", "task.eval_ns", "transform.", "method", "bonbon.n",
                  "bonbon.pairs_per_prompt")


def sized_config(base_config: Any, size: str, n: int = 4) -> Any:
    """The exact-task config with the size's schedule, samples and reference K (no evaluations
    during training: each run is evaluated once, at the end, at N = 1, 2, 4 and `n`, the tables'
    BoN_N / WoN_N). Its `seed` is set per run
    (`size_seeds`), so a base config that sets one is refused rather than ignored."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if int(base_config.seed) != 0:
        raise ValueError(f"exact_config.seed={base_config.seed} is not used: each run of the "
                         f"exact and convergence stages takes its seed from the size, starting "
                         f"at the reproduction's config.seed (set that instead)")
    if float(base_config.task.get("kl_budget", 0.0)):
        raise ValueError(f"exact_config.task.kl_budget={base_config.task.kl_budget} is not used: "
                         f"each method's beta is solved for the stage's own KL budget (vBoN's "
                         f"target, or the convergence stage's budgets)")
    knobs = SIZES[size]
    return sweep.apply_overrides(base_config, {
        "train.num_steps": knobs["steps"], "rl.decay_steps": knobs["steps"],
        "rl.beta_anneal_steps": knobs["anneal"], "rl.samples_per_prompt": knobs["samples"],
        "reference.k": knobs["k"], "train.eval_every": 0,
        "task.eval_ns": tuple(sorted({1, 2, 4, int(n)}))})


def size_seeds(size: str, first_seed: int = 0) -> tuple[int, ...]:
    """The training seeds of a size's exact and convergence stages: first_seed, first_seed + 1,
    ... (as many as SIZES[size] has)."""
    return tuple(first_seed + i for i in range(len(SIZES[size]["seeds"])))


def methods(n: int, t: float) -> list[dict[str, Any]]:
    """The comparison; `beta=None` means "solve beta for the shared KL budget"."""
    return [
        {"key": "raw", "method": "RLHF raw reward", "transform": {"name": "raw"}, "beta": None},
        {"key": "identity", "method": "calibrated identity", "transform": {"name": "identity"},
         "beta": None},
        {"key": "vbon", "method": f"vBoN (log, beta=1/(N-1), N={n})", "transform": {"name": "log"},
         "beta": 1.0 / (n - 1)},
        {"key": "exp_bon", "method": f"CTRL exp t={t:g} (BoN)", "transform": {"name": "exp", "t": t},
         "beta": None},
        {"key": "exp_won", "method": f"CTRL exp t={-t:g} (WoN)",
         "transform": {"name": "exp", "t": -t}, "beta": None},
        {"key": "optimal_bon", "method": f"CTRL optimal (BoN_{n})",
         "transform": {"name": "optimal", "procedure": "bon"}, "beta": None},
        {"key": "optimal_won", "method": f"CTRL optimal (WoN_{n})",
         "transform": {"name": "optimal", "procedure": "won"}, "beta": None},
        # BoN distillation: its target is BoN_N(pi_ref) itself, no beta to solve (`bonbon_run`)
        {"key": "bonbon", "method": f"BoNBoN (N={n})", "transform": None, "beta": None},
    ]


def bonbon_run(base: Any, n: int) -> tuple[dict[str, Any], str, float]:
    """The overrides, the table label and the preference beta of the exact stage's BoNBoN run:
    the base config's bonbon section (variant, alpha, ...) at N = n, with as many independent
    (best, worst) pairs per prompt as the CTRL runs' samples per prompt allow (samples / n), so
    that each step draws as many pi_ref responses as a CTRL step draws policy ones."""
    cfg = dataclass_from(BoNBoNConfig, {**as_dict(base.bonbon), "n": n}, "bonbon")
    pairs = max(1, int(base.rl.samples_per_prompt) // n)
    overrides = {"method": "bonbon", "bonbon.n": n, "bonbon.pairs_per_prompt": pairs}
    label = f"BoNBoN ({cfg.variant}, alpha={cfg.alpha:g}, N={n})"
    return overrides, label, cfg.pref_beta


def _transform_section(spec: dict[str, Any], kl: float, n: int, workdir: str) -> dict[str, Any]:
    """Config `transform` section; the optimal table is solved at the budget and saved."""
    if spec["name"] != "optimal":
        return dict(spec)
    u, phi = analytic_solver.optimal_transform_table(kl, spec["procedure"], n)
    path = analytic_solver.save_optimal_table(
        os.path.join(workdir, f"optimal_{spec['procedure']}{n}_kl{kl:.3f}.npz"), u, phi)
    return {"name": "optimal", "path": path}


def method_keys(spec: str) -> tuple[str, ...] | None:
    """The method keys of a comma-separated `spec` ("all": None, every method)."""
    if str(spec).strip() == "all":
        return None
    return comma_list(spec)


def check_method_keys(keys: Sequence[str], what: str) -> None:
    """Refuses keys that name no method of `methods` (or none at all), naming `what` and the
    known keys, before any training (they were refused at the exact stage, after the others)."""
    known = [m["key"] for m in methods(2, 1.0)]   # the keys do not depend on n or t
    if not keys or set(keys) - set(known):
        raise ValueError(f"{what} must name a non-empty subset of {known}, got "
                         f"{tuple(keys)}")


def run_exact_stage(base_config: Any, workdir: str, *, n: int = 4, t: float = 5.0,
                    size: str = "tiny", keys: tuple[str, ...] | None = None,
                    first_seed: int = 0, log: Callable[[str], None] = print,
                    devices: Any = None) -> list[dict[str, Any]]:
    """Trains every method (or those in `keys`) on the exact task at matched KL.

    Writes exact_table.{md,json}, exact_methods.png and a manifest into `workdir`.
    """
    code = provenance.code_state()   # of the run's start (the manifest is written at its end)
    base = sized_config(base_config, size, n)
    if keys is not None:
        check_method_keys(keys, "keys")
    chosen = [m for m in methods(n, t) if keys is None or m["key"] in keys]
    os.makedirs(workdir, exist_ok=True)
    task = et.task_from_section(base.task)
    table = et.sample_reference_table(task, int(base.reference.k), seed=int(base.reference.seed))
    ref_logp = et.policy_logprobs(task, task.ref_params)
    vbon = get_transform("log")
    vbon_cal = et.calibrated_table(task, table, vbon.smoothing)
    budget = et.exact_kl(et.target_policy(ref_logp, vbon_cal, vbon, 1.0 / (n - 1)),
                         np.exp(ref_logp))
    seeds = size_seeds(size, first_seed)
    log(f"exact stage: KL budget {budget:.4f} (vBoN's target at N={n}); {len(chosen)} methods x "
        f"{len(seeds)} seeds")
    rows = []
    for spec in chosen:
        name = spec["method"]
        if spec["key"] == "bonbon":
            overrides, name, beta = bonbon_run(base, n)
            exact_task = et.rl_task(base.task)   # its exact evaluation, for the moved runs
            log(f"  {name}: preference beta={beta:.4g}, {overrides['bonbon.pairs_per_prompt']} "
                f"pairs per prompt a step; its target is BoN_{n}(pi_ref)")
        else:
            section = _transform_section(spec["transform"], budget, n, workdir)
            transform = get_transform(section["name"], **{k: v for k, v in section.items()
                                                          if k != "name"})
            cal = et.calibrated_table(task, table, transform.smoothing)
            beta = spec["beta"] or et.beta_for_kl(ref_logp, cal, task.rewards_XxY, transform,
                                                  budget)
            overrides = {"rl.beta": float(beta), **transform_overrides(**section)}
            log(f"  {name}: beta={beta:.4g}")
        runs, moved = [], []
        for seed in seeds:
            run_dir = os.path.join(workdir, sweep.point_name({"m": spec["method"]}).replace(
                " ", "_"), f"seed={seed}")
            state, summary = _train(sweep.apply_overrides(base, {**overrides, "seed": seed}),
                                    run_dir, devices)
            runs.append(summary["eval"])
            _log_seed(log, seed, n, summary["eval"])
            if spec["key"] == "bonbon":
                moved.append(moved_to_kl(exact_task, jax.device_get(state.params), budget, n))
                if moved[-1] is not None:
                    _log_seed(log, seed, n, moved[-1], f" at weight {moved[-1]['weight']:.4f}")
        rows.append(seed_summary(name, beta, runs))
        if moved and all(m is not None for m in moved):
            w = np.array([m["weight"] for m in moved])
            rows.append(seed_summary(
                f"{name}, moved to the budget (weight {w.mean():.3f} ± "
                f"{w.std(ddof=1) if len(w) > 1 else 0.0:.3f})", beta, moved))
        elif moved:
            log(f"  {name}: not moved to the budget: a seed's KL stays below it up to weight "
                f"{kl_match.MAX_ALPHA:g}")
    write_exact_outputs(rows, workdir, n, budget)
    provenance.write_manifest(workdir, base, seeds={"seeds": list(seeds)}, code=code,
                              extra={"stage": "exact", "size": size, "n": n, "t": t,
                                     "kl_budget": budget})
    return rows


def _log_seed(log: Callable[[str], None], seed: int, n: int, ev: Mapping[str, float],
              extra: str = "") -> None:
    log("    seed {s}{x}: KL {exact_kl:.3f} (target {target_kl:.3f}) KL(pi||pi*) "
        "{exact_kl_to_target:.4f} std {exact_bon1:.3f} BoN_{n} {b:.3f} WoN_{n} {w:.3f}"
        .format(s=seed, x=extra, n=n, b=ev[f"exact_bon{n}"], w=ev[f"exact_won{n}"], **ev))


def moved_to_kl(rl_task: Any, params: Any, budget: float, n: int) -> dict[str, float] | None:
    """The exact evaluation (`rl_task.evaluate` of the exact task, against BoN_n(pi_ref), a
    BoNBoN run's target) of the trained `params` moved along their line from pi_ref,
    theta_ref + w (theta - theta_ref), to the weight w whose exact KL(pi || pi_ref) is `budget`
    (`kl_match.alpha_at_kl`), with "weight" added; None when no w up to kl_match.MAX_ALPHA
    reaches it. This is how the real-task comparison matches KL (`kl_match`), here without
    sampling noise."""
    def moved(w: float) -> Any:
        return kl_match.interpolate(rl_task.ref_params, params, w)

    w = kl_match.alpha_at_kl(lambda w: rl_task.evaluate(moved(w), None, 0.0, None, ns=(1,),
                                                        bon_n=n)["exact_kl"], budget)
    if w is None:
        return None
    return {**rl_task.evaluate(moved(w), None, 0.0, None, bon_n=n), "weight": w}


def _train(cfg: Any, run_dir: str, devices: Any) -> tuple[Any, dict[str, Any]]:
    """One stage run (`train.run`). A work dir whose run was trained under another config is
    refused with this command's flags: `train.init_from` is not one of them."""
    try:
        return train.run(cfg, run_dir, log=lambda line: None, devices=devices)
    except skeleton.ConfigMismatchError as e:
        raise e.with_advice(
            "this reproduction's work dir was filled under other options (--exact_config, or "
            "--config.size / n / t): rerun with the options it recorded (that run's "
            "manifest.json) or use another --workdir") from None


def seed_summary(method: str, beta: float, runs: list[dict[str, float]]) -> dict[str, Any]:
    """One table row from the runs of several seeds: mean and sd (ddof 1) of every exact_*
    quantity, the target's values, the worst seed's KL(pi || pi*) and how many converged."""
    row: dict[str, Any] = {"method": method, "beta": beta, "seeds": len(runs)}
    for key in sorted(runs[0]):
        values = np.array([r[key] for r in runs], np.float64)
        if key.startswith("target_") or key == "range_phi_over_beta":
            row[key] = float(values[0])
        else:
            row[key] = float(values.mean())
            row[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    dists = [r["exact_kl_to_target"] for r in runs]
    row["max_kl_to_target"] = float(max(dists))
    row["converged"] = f"{sum(d <= et.CONVERGED_KL for d in dists)}/{len(dists)}"
    return row


def _pm(row: dict[str, Any], key: str, digits: int = 3) -> str:
    return f"{row[key]:.{digits}f} ± {row.get(key + '_sd', 0.0):.{digits}f}"


def write_exact_outputs(rows: list[dict[str, Any]], workdir: str, n: int, budget: float) -> str:
    """exact_table.md (mean ± sd over seeds next to each target), .json and the plot."""
    head = ["method", "β", "range(Φ)/β", "KL target", "KL trained", "KL(π‖π*) mean / max",
            "converged", "std target", "std trained", f"BoN_{n} target", f"BoN_{n} trained",
            f"WoN_{n} target", f"WoN_{n} trained"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sharp = r.get("range_phi_over_beta")   # none for BoNBoN: its target is no tilt by Phi
        cells = [r["method"], f"{r['beta']:.4g}", "–" if sharp is None else f"{sharp:.1f}",
                 f"{r['target_kl']:.3f}", _pm(r, "exact_kl"),
                 f"{r['exact_kl_to_target']:.4f} / {r['max_kl_to_target']:.4f}", r["converged"],
                 f"{r['target_bon1']:.3f}", _pm(r, "exact_bon1"), f"{r[f'target_bon{n}']:.3f}",
                 _pm(r, f"exact_bon{n}"), f"{r[f'target_won{n}']:.3f}", _pm(r, f"exact_won{n}")]
        lines.append("| " + " | ".join(cells) + " |")
    path = os.path.join(workdir, "exact_table.md")
    seeds = rows[0]["seeds"] if rows else 0
    with atomic_open(path) as f:
        bonbon = ("; BoNBoN's β is its preference loss's and its π* is BoN_" + str(n)
                  + "(π_ref), which has a KL of its own" if any(
                      r["method"].startswith("BoNBoN") for r in rows) else "")
        f.write(f"KL budget {budget:.4f}; win rates against pi_ref by enumeration (exact); trained "
                f"columns are mean ± sd over {seeds} seeds; converged: KL(pi || pi*) <= "
                f"{et.CONVERGED_KL}{bonbon}.\n\n" + "\n".join(lines) + "\n")
    write_json(os.path.join(workdir, "exact_table.json"), {"kl_budget": budget, "n": n,
                                                          "rows": rows})
    _plot(rows, os.path.join(workdir, "exact_methods.png"), n)
    return path


def _plot(rows: list[dict[str, Any]], path: str, n: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in zip(axes, ("bon1", f"bon{n}", f"won{n}"),
                              ("standard win rate", f"BoN_{n} win rate", f"WoN_{n} win rate")):
        for i, r in enumerate(rows):
            ax.scatter(r["target_kl"], r[f"target_{key}"], marker="x", color=f"C{i}")
            ax.errorbar(r["exact_kl"], r[f"exact_{key}"], xerr=r.get("exact_kl_sd", 0.0),
                        yerr=r.get(f"exact_{key}_sd", 0.0), fmt="o", color=f"C{i}",
                        label=r["method"])
        ax.set_xlabel("KL(pi || pi_ref)")
        ax.set_title(f"{title} (o trained, mean ± sd over seeds; x exact target)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# The convergence grid: every transform of the registry at several KL budgets, 3+ seeds each.
CONVERGENCE_TRANSFORMS = (("exp", {"t": -10.0}), ("exp", {"t": -5.0}), ("exp", {"t": -1.0}),
                          ("exp", {"t": 1.0}), ("exp", {"t": 5.0}), ("exp", {"t": 10.0}),
                          ("identity", {}), ("log", {}), ("raw", {}),
                          ("optimal", {"procedure": "bon"}), ("optimal", {"procedure": "won"}))


def convergence_label(name: str, params: dict) -> str:
    """A convergence row's transform label, e.g. "exp t=-5", "log", "optimal bon"."""
    return name + "".join(f" {k}={v:g}" if isinstance(v, float) else f" {v}"
                          for k, v in params.items())


def select_transforms(labels: str) -> tuple[tuple[str, dict], ...]:
    """CONVERGENCE_TRANSFORMS, or those whose labels are in the comma-separated `labels`
    ("all" for every one); an unknown label is refused with the known ones."""
    if str(labels).strip() == "all":
        return CONVERGENCE_TRANSFORMS
    wanted = list(comma_list(labels))
    known = [convergence_label(*t) for t in CONVERGENCE_TRANSFORMS]
    unknown = [w for w in wanted if w not in known]
    if not wanted or unknown:
        raise ValueError(f"config.convergence_transforms: unknown transforms {unknown or wanted}"
                         f"; known: {known} (comma-separated, or 'all')")
    return tuple(t for t in CONVERGENCE_TRANSFORMS if convergence_label(*t) in wanted)


def convergence_markdown(rows: list[dict[str, Any]], n: int, knobs: dict[str, Any]) -> str:
    """The convergence table of `run_convergence_stage` as markdown."""
    head = ["KL budget", "transform", "β", "range(Φ)/β", "converged", "KL(π‖π*) mean / max",
            "KL trained / target", f"BoN_{n} trained − target", f"WoN_{n} trained − target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("unreachable"):
            lines.append(f"| {r['kl_budget']:g} | {r['transform']} | — | — | unreachable "
                         f"(the budget exceeds the transform's largest KL) | | | | |")
            continue
        lines.append("| " + " | ".join([
            f"{r['kl_budget']:g}", r["transform"], f"{r['beta']:.4g}",
            f"{r['range_phi_over_beta']:.1f}", r["converged"],
            f"{r['exact_kl_to_target']:.4f} / {r['max_kl_to_target']:.4f}",
            f"{r['exact_kl'] / r['target_kl']:.3f} ± {r['exact_kl_sd'] / r['target_kl']:.3f}",
            f"{r[f'exact_bon{n}'] - r[f'target_bon{n}']:+.4f}",
            f"{r[f'exact_won{n}'] - r[f'target_won{n}']:+.4f}"]) + " |")
    return (f"Seeds {list(knobs['seeds'])}, {knobs['steps']} steps, beta warm-up over "
            f"{knobs['anneal']}, {knobs['samples']} samples per prompt; converged: "
            f"KL(pi || pi*) <= {et.CONVERGED_KL}.\n\n" + "\n".join(lines) + "\n")


def run_convergence_stage(base_config: Any, workdir: str, *, kls: tuple[float, ...],
                          size: str = "tiny", n: int = 4,
                          transforms: tuple[tuple[str, dict], ...] = CONVERGENCE_TRANSFORMS,
                          first_seed: int = 0, log: Callable[[str], None] = print,
                          devices: Any = None) -> list[dict[str, Any]]:
    """Trains each transform at each KL budget (beta solved from the exact target) for every
    seed of the size with the config's schedule; writes convergence_table.{md,json}: how many
    seeds reached KL(pi || pi*) <= et.CONVERGED_KL, with the target's range(Phi)/beta."""
    code = provenance.code_state()   # of the run's start (the manifest is written at its end)
    base = sized_config(base_config, size, n)
    knobs, seeds = SIZES[size], size_seeds(size, first_seed)
    os.makedirs(workdir, exist_ok=True)
    rows = []
    for kl in kls:
        for name, params in transforms:
            label = convergence_label(name, params)
            spec = {"name": name, **params}
            section = _transform_section(spec, kl, n, workdir)
            overrides = {"task.kl_budget": float(kl), **transform_overrides(**section)}
            runs, beta, unreachable = [], math.nan, None
            for seed in seeds:
                run_dir = os.path.join(workdir, f"kl={kl:g}", label.replace(" ", "_"),
                                       f"seed={seed}")
                try:
                    _, summary = _train(sweep.apply_overrides(base, {**overrides,
                                                                     "seed": seed}),
                                        run_dir, devices)
                except ValueError as e:
                    if "outside the reachable range" not in str(e):
                        raise
                    unreachable = str(e)
                    break
                extra = json.load(open(os.path.join(run_dir, "manifest.json")))["extra"]
                beta = extra.get("end_beta", extra["beta"])   # the beta of the run's pi*
                runs.append(summary["eval"])
            if unreachable:
                log(f"  KL {kl:g} {label}: unreachable ({unreachable})")
                rows.append({"kl_budget": kl, "transform": label, "unreachable": True})
                continue
            row = {"kl_budget": kl, "transform": label, **seed_summary(label, beta, runs)}
            log(f"  KL {kl:g} {label}: beta {beta:.4g}, range(Phi)/beta "
                f"{row['range_phi_over_beta']:.1f}, converged {row['converged']}, KL(pi||pi*) "
                f"mean {row['exact_kl_to_target']:.4f} max {row['max_kl_to_target']:.4f}")
            rows.append(row)
    with atomic_open(os.path.join(workdir, "convergence_table.md")) as f:
        f.write(convergence_markdown(rows, n, {**knobs, "seeds": seeds}))
    write_json(os.path.join(workdir, "convergence_table.json"), rows)
    provenance.write_manifest(workdir, base, seeds={"seeds": list(seeds)}, code=code,
                              extra={"stage": "convergence", "size": size, "kls": list(kls)})
    return rows


STAGES = ("analytic", "exact", "convergence", "real")


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    """configs/reproduce.py's top level (its `analytic` section is an `AnalyticConfig`)."""

    _config_owner = "config"
    size: str = "tiny"
    n: int = 4                     # the N of BoN_N / WoN_N and of vBoN
    t: float = 5.0                 # CTRL exp's |t| (t for BoN, -t for WoN)
    seed: int = 0                  # the exact and convergence stages train seeds seed, seed + 1, ...
    stages: str = "analytic,exact"  # comma-separated, of STAGES
    methods: str = "all"           # "all" or comma-separated keys of `methods`
    convergence_kls: tuple[float, ...] = (0.25, 1.0, 2.0)
    convergence_transforms: str = "all"   # "all" or comma-separated labels, e.g. "log,exp t=-5"

    def __post_init__(self):
        check.choice(self, "size", tuple(SIZES))
        check.ints(self, ("n",), low=2)
        check.numbers(self, ("t",), strict=True)
        check.ints(self, ("seed",), low=0)
        unknown = sorted(set(self.stage_list) - set(STAGES))
        if unknown:
            raise ValueError(f"config.stages: unknown stages {unknown}; known: {list(STAGES)}")
        object.__setattr__(self, "convergence_kls", tuple(float(k) for k in self.convergence_kls))
        select_transforms(self.convergence_transforms)
        keys = method_keys(self.methods)
        if keys is not None:
            check_method_keys(keys, "config.methods")
            if "exact" not in self.stage_list:
                raise ValueError(f"config.methods={self.methods!r} is read by the exact stage "
                                 f"only, and config.stages={self.stages!r} does not run it")

    @property
    def stage_list(self) -> list[str]:
        return stage_names(self.stages)


def stage_names(stages: Any) -> list[str]:
    """The stages of a comma-separated `config.stages`."""
    return list(comma_list(stages))


# Which stages read each key of configs/reproduce.py's config (the analytic section: its own),
# and each of the other configs `run` takes.
STAGE_READS = {"n": ("exact", "convergence"), "t": ("exact",), "seed": ("exact", "convergence"),
               "convergence_kls": ("convergence",), "convergence_transforms": ("convergence",),
               "analytic": ("analytic",)}
CONFIG_READS = {"exact_config": ("exact", "convergence"), "real_config": ("real",)}


def unused_stage_options(config: Mapping[str, Any]) -> dict[str, str]:
    """The keys of a reproduce config that none of its `stages` reads (`UNUSED_OPTION_RULES`)."""
    if not {"stages", "convergence_kls"} <= set(config):
        return {}
    stages = set(stage_names(config["stages"]))
    unused = {}
    for key, readers in STAGE_READS.items():
        if not stages & set(readers):
            why = f"config.stages including {' or '.join(repr(s) for s in readers)}"
            inner = config.get(key)
            for name in ([f"{key}.{k}" for k in inner] if isinstance(inner, Mapping) else [key]):
                unused[name] = why
    return unused


UNUSED_OPTION_RULES.append(unused_stage_options)


def refuse_unread_exact_overrides(config: Any, exact_config: Any, keys: Sequence[str],
                                  source: str = "--exact_config.") -> None:
    """Refuses overrides of the exact stages' base config that no run of this reproduction reads
    (`config_utils.refuse_unused_overrides`). The bonbon section is read by the exact stage's
    BoNBoN row, under method="bonbon", so its keys are checked against that run's config, and
    refused when `config` (the reproduce config) trains no such row."""
    keys = list(keys)
    config = dataclass_from(ReproduceConfig, {k: v for k, v in as_dict(config).items()
                                              if k != "analytic"}, "reproduce")
    own = [k for k in keys if k.split(".")[0] == "bonbon"]
    if own:
        chosen = method_keys(config.methods)
        if "exact" not in config.stage_list or chosen is not None and "bonbon" not in chosen:
            raise ValueError(
                f"{source}{own[0]} is not used: the bonbon section is read by the exact stage's "
                f"BoNBoN row only (config.stages including 'exact' and config.methods including "
                f"'bonbon'; this reproduction has stages={config.stages!r}, "
                f"methods={config.methods!r})")
        refuse_unused_overrides(sweep.apply_overrides(exact_config, {"method": "bonbon"}), own,
                                source)
    refuse_unused_overrides(exact_config, [k for k in keys if k not in own], source)
def run(config: Any, workdir: str, *, exact_config: Any = None, real_config: Any = None,
        log: Callable[[str], None] = print) -> str:
    """Runs the configured stages into `workdir` and writes `workdir/results.md`; returns its path.

    `exact_config` (configs/ctrl_exact.py's config) is the base of the exact and convergence
    stages; `real_config` (configs/compare_real.py's config) is the real stage's comparison
    (`workflows.real_comparison`: every method at matched KL with several seeds).
    """
    from infalign_jax.workflows import analytic_report
    manifest_config = config
    values = as_dict(config)
    analytic_section = values.pop("analytic", {})
    config = dataclass_from(ReproduceConfig, values, "reproduce")
    stages = config.stage_list
    given = {"exact_config": exact_config, "real_config": real_config}
    for name, readers in CONFIG_READS.items():
        needing = [s for s in readers if s in stages]
        if needing and given[name] is None:
            raise ValueError(f"stage {needing[0]!r} needs {name}")
    started, code = provenance.now(), provenance.code_state()
    parts = [f"# Reproduction (size {config.size})\n"]
    if "analytic" in stages:
        out = os.path.join(workdir, "analytic")
        analytic_report.run(analytic_section, out, progress=log)
        with open(os.path.join(out, "tables.md")) as f:
            parts.append("## 1. Analytic tool\n\nPlots: analytic/frontier_bon.png, "
                         "analytic/frontier_won.png, analytic/best_t.png.\n\n" +
                         f.read().replace("# Analytic tool", "### Analytic tool"))
    if "exact" in stages:
        out = os.path.join(workdir, "exact")
        keys = method_keys(config.methods)
        run_exact_stage(exact_config, out, n=config.n, t=config.t, size=config.size,
                        keys=keys, first_seed=config.seed, log=log)
        with open(os.path.join(out, "exact_table.md")) as f:
            parts.append("## 2. Exact task: methods at matched KL\n\nPlot: exact/exact_methods.png"
                         "\n\n" + f.read())
    if "convergence" in stages:
        out = os.path.join(workdir, "convergence")
        run_convergence_stage(exact_config, out, kls=config.convergence_kls, size=config.size,
                              n=config.n,
                              transforms=select_transforms(config.convergence_transforms),
                              first_seed=config.seed, log=log)
        with open(os.path.join(out, "convergence_table.md")) as f:
            parts.append("## Exact task: convergence of every transform\n\n" + f.read())
    if "real" in stages:
        from infalign_jax.workflows import real_comparison
        out = real_comparison.run(real_comparison.task_configs(real_config),
                                  real_config.comparison, os.path.join(workdir, "real"), log)
        with open(out) as f:
            parts.append(f"## 3. Real tasks: methods at matched KL (configs/compare_real.py:"
                         f"size={real_config.size})\n\n" + f.read())
    path = os.path.join(workdir, "results.md")
    with atomic_open(path) as f:
        f.write("\n\n".join(parts) + "\n")
    seeds = {"exact_and_convergence": list(size_seeds(config.size, config.seed))}
    provenance.write_manifest(workdir, manifest_config, seeds=seeds, started=started, code=code,
                              extra={"exact_config": None if exact_config is None
                                     else exact_config.to_dict(),
                                     "real_config": None if real_config is None
                                     else real_config.to_dict()})
    log(f"results: {path}")
    return path
