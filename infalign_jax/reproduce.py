"""Paper-table reproduction: analytic figures and the exact task's methods at matched KL.

`run_exact_stage` trains each method of the comparison on the enumerable exact task with the same
run loop (`train.run`), with each method's beta chosen so that its *exact target* policy
pi* ∝ pi_ref exp(Phi(C)/beta) has the same KL budget (vBoN's beta is fixed at 1/(N-1) by its
definition, and that fixes the budget for everyone). The table then reports, by enumeration, the
trained policy's KL and its standard / BoN_N / WoN_N win rates against pi_ref, next to its target's.
What the paper claims, in calibrated space (spec 1.4): at matched KL, exp(t C) with t > 0 beats the
identity and log for BoN_N, t < 0 wins for WoN_N, the identity is best for the standard win rate,
and the solver's optimal transform bounds them all.

Methods (name -> transform, beta rule): raw-reward RLHF (`raw`), calibrated RLHF (`identity`),
vBoN (`log`, beta = 1/(N-1)), CTRL exp t>0 (BoN) and t<0 (WoN), and CTRL with the analytic
solver's optimal transform for BoN_N and WoN_N at the budget.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import numpy as np

from infalign_jax import analytic_solver, exact_task as et, provenance, sweep, train
from infalign_jax.transforms import Transform, get_transform

SIZES = {"smoke": dict(steps=2, samples=8, k=64),   # plumbing only (tests)
         "tiny": dict(steps=300, samples=128, k=1024),
         "small": dict(steps=600, samples=256, k=4096),
         "full": dict(steps=2000, samples=512, k=16384)}


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
    ]


def beta_for_kl(ref_logp_PxY: np.ndarray, cal_PxY: np.ndarray, raw_PxY: np.ndarray,
                transform: Transform, kl: float, lo: float = 1e-3, hi: float = 1e3) -> float:
    """beta whose exact target has KL(pi* || pi_ref) = kl (bisection in log beta; KL falls with beta)."""
    ref = np.exp(ref_logp_PxY)

    def kl_at(beta: float) -> float:
        return et.exact_kl(et.target_policy(ref_logp_PxY, cal_PxY, transform, beta, raw_PxY), ref)

    if not kl_at(hi) < kl < kl_at(lo):
        raise ValueError(f"KL budget {kl} outside the reachable range ({kl_at(hi):.3g}, "
                         f"{kl_at(lo):.3g}) of transform {transform.name}")
    a, b = math.log(lo), math.log(hi)
    for _ in range(60):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if kl_at(math.exp(mid)) > kl else (a, mid)
    return math.exp(0.5 * (a + b))


def _transform_section(spec: dict[str, Any], kl: float, n: int, workdir: str) -> dict[str, Any]:
    """Config `transform` section; the optimal table is solved at the budget and saved."""
    if spec["name"] != "optimal":
        return dict(spec)
    u, phi = analytic_solver.optimal_transform_table(kl, spec["procedure"], n)
    path = analytic_solver.save_optimal_table(
        os.path.join(workdir, f"optimal_{spec['procedure']}{n}_kl{kl:.3f}.npz"), u, phi)
    return {"name": "optimal", "path": path}


def run_exact_stage(base_config: Any, workdir: str, *, n: int = 4, t: float = 5.0,
                    size: str = "tiny", keys: tuple[str, ...] | None = None,
                    log: Callable[[str], None] = print, devices: Any = None
                    ) -> list[dict[str, Any]]:
    """Trains every method (or those in `keys`) on the exact task at matched KL.

    Writes exact_table.{md,json}, exact_methods.png and a manifest into `workdir`.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    known = [m["key"] for m in methods(n, t)]
    if keys is not None and (not keys or set(keys) - set(known)):
        raise ValueError(f"keys must be a non-empty subset of {known}, got {keys}")
    chosen = [m for m in methods(n, t) if keys is None or m["key"] in keys]
    knobs = SIZES[size]
    os.makedirs(workdir, exist_ok=True)
    base = sweep.apply_overrides(base_config, {
        "train.num_steps": knobs["steps"], "rl.decay_steps": knobs["steps"],
        "rl.samples_per_prompt": knobs["samples"], "reference.k": knobs["k"],
        "train.eval_every": 0})
    s = base.task
    task = et.make_task(int(s.seed), vocab=int(s.vocab), length=int(s.length),
                        num_prompts=int(s.num_prompts), d_model=int(s.d_model))
    table = et.sample_reference_table(task, int(base.reference.k), seed=int(base.reference.seed))
    ref_logp = et.policy_logprobs(task, task.ref_params)
    vbon = get_transform("log")
    budget = et.exact_kl(et.target_policy(ref_logp, et.calibrated_table(task, table, True), vbon,
                                          1.0 / (n - 1)), np.exp(ref_logp))
    log(f"exact stage: KL budget {budget:.4f} (vBoN's target at N={n}); {len(chosen)} methods")
    rows = []
    for spec in chosen:
        section = _transform_section(spec["transform"], budget, n, workdir)
        transform = get_transform(section["name"], **{k: v for k, v in section.items()
                                                      if k != "name"})
        cal = et.calibrated_table(task, table, transform.smoothed)
        beta = spec["beta"] or beta_for_kl(ref_logp, cal, task.rewards_PxY, transform, budget)
        overrides = {"rl.beta": float(beta), "transform.name": section["name"]}
        overrides.update({f"transform.{k}": v for k, v in section.items() if k != "name"})
        run_dir = os.path.join(workdir, sweep.point_name({"m": spec["method"]}).replace(" ", "_"))
        log(f"  {spec['method']}: beta={beta:.4g}")
        _, summary = train.run(sweep.apply_overrides(base, overrides), run_dir,
                               log=lambda line: None, devices=devices)
        ev = summary["eval"]
        rows.append({"method": spec["method"], "beta": beta, **{k: ev[k] for k in sorted(ev)}})
        log("    trained: KL {exact_kl:.3f} std {exact_bon1:.3f} BoN_{n} {b:.3f} WoN_{n} {w:.3f}"
            " | target: KL {target_kl:.3f} std {target_bon1:.3f} BoN_{n} {tb:.3f} WoN_{n} {tw:.3f}"
            .format(n=n, b=ev[f"exact_bon{n}"], w=ev[f"exact_won{n}"], tb=ev[f"target_bon{n}"],
                    tw=ev[f"target_won{n}"], **ev))
    write_exact_outputs(rows, workdir, n, budget)
    provenance.write_manifest(workdir, base, seeds={"seed": int(base.seed)},
                              extra={"stage": "exact", "size": size, "n": n, "t": t,
                                     "kl_budget": budget})
    return rows


EXACT_COLUMNS = ("method", "beta", "target_kl", "exact_kl", "target_bon1", "exact_bon1")


def write_exact_outputs(rows: list[dict[str, Any]], workdir: str, n: int, budget: float) -> str:
    columns = [*EXACT_COLUMNS, f"target_bon{n}", f"exact_bon{n}", f"target_won{n}",
               f"exact_won{n}"]
    md = sweep.markdown_table(rows, columns)
    path = os.path.join(workdir, "exact_table.md")
    with open(path, "w") as f:
        f.write(f"KL budget {budget:.4f}; win rates against pi_ref by enumeration (exact).\n\n{md}\n")
    with open(os.path.join(workdir, "exact_table.json"), "w") as f:
        json.dump({"kl_budget": budget, "n": n, "rows": rows}, f, indent=2)
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
            ax.scatter(r["exact_kl"], r[f"exact_{key}"], marker="o", color=f"C{i}",
                       label=r["method"])
        ax.set_xlabel("KL(pi || pi_ref)")
        ax.set_title(f"{title} (o trained, x exact target)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


STAGES = ("analytic", "exact", "real")
REAL_CONFIG = "configs/ctrl_real.py"
# (task, method label, ctrl_real.py arg) of the real stage: calibrated identity vs CTRL exp-t
REAL_METHODS = (("helpfulness", "calibrated identity", "transform=identity"),
                ("helpfulness", "CTRL exp t=4 (BoN)", "transform=exp,t=4"),
                ("harmlessness", "calibrated identity", "transform=identity"),
                ("harmlessness", "CTRL exp t=-4 (WoN)", "transform=exp,t=-4"))


def run_real_stage(size: str, workdir: str, log: Callable[[str], None] = print) -> str:
    """SmolLM2 tasks judged by the offline gold judges: the paper's table shape (estimates with
    95% intervals = 1.96 standard errors over prompts); returns the markdown."""
    module = sweep.load_config_module(REAL_CONFIG)
    rows = []
    for task, method, arg in REAL_METHODS:
        cfg = module.get_config(f"task={task},size={size},{arg}")
        run_dir = os.path.join(workdir, f"{task}__{arg.replace('=', '-').replace(',', '_')}")
        log(f"  real: {task} / {method} ({run_dir})")
        _, summary = train.run(cfg, run_dir, log=lambda line: None)
        ev = summary["eval"]
        row = {"task": task, "method": method, "KL (k1)": ev.get("est_kl_k1", math.nan)}
        for key in ("standard", "bon_4", "won_4"):
            p, se = ev.get(f"est_{key}", math.nan), ev.get(f"est_{key}_stderr", math.nan)
            row[key] = f"{p:.3f} ± {1.96 * se:.3f}"
        rows.append(row)
    table = sweep.markdown_table(rows, ["task", "method", "KL (k1)", "standard", "bon_4", "won_4"])
    text = (f"## 3. Real offline tasks (size {size})\n\nWin rates of the trained policy against "
            f"pi_ref under the gold judge (VADER for helpfulness, 1 - P(offensive) for "
            f"harmlessness), estimated from fresh samples; ± is a 95% interval over prompts.\n\n"
            f"{table}\n")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "real_table.md"), "w") as f:
        f.write(text)
    return text


def run(config: Any, workdir: str, log: Callable[[str], None] = print) -> str:
    """Runs the configured stages into `workdir` and writes `workdir/results.md`; returns its path."""
    from infalign_jax import analytic_report
    stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"config.stages: unknown stages {unknown}; known: {list(STAGES)}")
    if config.size not in SIZES:
        raise ValueError(f"config.size must be one of {sorted(SIZES)}, got {config.size!r}")
    started = provenance.now()
    parts = [f"# Reproduction (size {config.size})\n"]
    if "analytic" in stages:
        a = config.analytic
        out = os.path.join(workdir, "analytic")
        analytic_report.run_report(out, ns=[int(n) for n in a.ns], kls=[float(k) for k in a.kls],
                                   grid_size=int(a.grid), reading=a.reading, progress=log)
        with open(os.path.join(out, "tables.md")) as f:
            parts.append("## 1. Analytic tool\n\nPlots: analytic/frontier_bon.png, "
                         "analytic/frontier_won.png, analytic/best_t.png.\n\n" +
                         f.read().replace("# Analytic tool", "### Analytic tool"))
    if "exact" in stages:
        out = os.path.join(workdir, "exact")
        base = sweep.load_config_module(config.exact_config).get_config()
        keys = None if config.methods == "all" else tuple(
            k.strip() for k in config.methods.split(",") if k.strip())
        run_exact_stage(base, out, n=int(config.n), t=float(config.t), size=config.size,
                        keys=keys, log=log)
        with open(os.path.join(out, "exact_table.md")) as f:
            parts.append("## 2. Exact task: methods at matched KL\n\nPlot: exact/exact_methods.png"
                         "\n\n" + f.read())
    if "real" in stages:
        size = "tiny" if config.size == "smoke" else config.size
        parts.append(run_real_stage(size, os.path.join(workdir, "real"), log))
    path = os.path.join(workdir, "results.md")
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n\n".join(parts) + "\n")
    provenance.write_manifest(workdir, config, seeds={"seed": int(config.seed)}, started=started)
    log(f"results: {path}")
    return path
