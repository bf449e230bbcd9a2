"""Tables and plots of the analytic tool (spec 1.4, 1.6 "analytical counterparts", 4 BoNBoN).

`run` computes, for BoN_N and WoN_N (by default T(pi) against T(pi_ref)) and each KL
budget, the win rates of the identity (calibrated RLHF), log (BoN distillation), best exp-t and
optimal transforms; the best t per N and budget; and the BoNBoN comparison (optimal exponential
tilt minus BoN_N(pi_ref) in standard win rate at KL = log N - (N-1)/N). It writes CSV, markdown,
PNG plots and a manifest. Where the optimal solver cannot converge (the frontier saturates at a
win rate within ~1e-6 of 1, e.g. WoN_32 at KL >= 0.5), the optimum is written as NaN and the
reason kept in the `note` column.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
import warnings
from typing import Any, Callable, Sequence


from infalign_jax.analysis import analytic as A
from infalign_jax.analysis import analytic_solver as S
from infalign_jax.core.selection import AGAINST
from infalign_jax.infra import provenance
from infalign_jax.infra import validate as check
from infalign_jax.infra.files import atomic_open, save_figure
from infalign_jax.infra.config_utils import as_dict, dataclass_from

FRONTIER_COLUMNS = ("procedure", "n", "kl", "w_identity", "w_log", "best_t", "w_best_exp",
                    "w_optimal", "gap_optimal_minus_exp", "optimal_method", "note")
BONBON_COLUMNS = ("n", "kl", "w_bon_ref", "w_exp_tilt", "difference")


def frontier_rows(ns: Sequence[int], kls: Sequence[float], *, procedures=("bon", "won"),
                  against: str = "transformed", grid_size: int = A.DEFAULT_GRID,
                  progress: Callable[[str], None] = print) -> list[dict]:
    rows = []
    for procedure in procedures:
        for n in ns:
            for kl in kls:
                row = {"procedure": procedure, "n": int(n), "kl": float(kl), "note": ""}
                kw = dict(against=against, grid_size=grid_size)
                row["w_identity"] = A.win_rate_at_kl("identity", kl, procedure, n, **kw)
                row["w_log"] = A.win_rate_at_kl("log", kl, procedure, n, **kw)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    row["best_t"], row["w_best_exp"] = A.best_t(procedure, n, kl, **kw)
                if caught:
                    row["note"] = "best t at the grid's resolution limit; "
                try:
                    sol = S.optimal_at_kl(kl, procedure, n, **kw)
                    row["w_optimal"], row["optimal_method"] = sol.win_rate, sol.method
                except RuntimeError as e:
                    row["w_optimal"], row["optimal_method"] = math.nan, "failed"
                    row["note"] += str(e)
                row["gap_optimal_minus_exp"] = row["w_optimal"] - row["w_best_exp"]
                rows.append(row)
                progress(f"{procedure} n={n} kl={kl}: identity {row['w_identity']:.4f} "
                         f"log {row['w_log']:.4f} exp(t={row['best_t']:.2f}) "
                         f"{row['w_best_exp']:.4f} optimal {row['w_optimal']:.4f}")
    return rows


def bonbon_rows(ns: Sequence[int], grid_size: int = A.DEFAULT_GRID) -> list[dict]:
    """Optimal exponential tilt minus BoN_n(pi_ref), standard win rate at KL(BoN_n) (BoNBoN Fig 2)."""
    rows = []
    for n in ns:
        if n < 2:
            continue
        kl = math.log(n) - (n - 1) / n
        w_bon = A.kl_and_win_rate("log", 1.0 / (n - 1), "standard", grid_size=grid_size)[1]
        w_tilt = A.win_rate_at_kl("identity", kl, "standard", grid_size=grid_size)
        rows.append({"n": n, "kl": kl, "w_bon_ref": w_bon, "w_exp_tilt": w_tilt,
                     "difference": w_tilt - w_bon})
    return rows


def write_csv(path: str, rows: list[dict], columns: Sequence[str]) -> None:
    with atomic_open(path) as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows([{c: r.get(c, "") for c in columns} for r in rows])


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}" if abs(v) < 100 else f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_frontiers(path: str, rows: list[dict], procedure: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = sorted({r["n"] for r in rows if r["procedure"] == procedure})
    fig, axes = plt.subplots(1, len(ns), figsize=(3.2 * len(ns), 3.2), squeeze=False)
    for ax, n in zip(axes[0], ns):
        sub = sorted((r for r in rows if r["procedure"] == procedure and r["n"] == n),
                     key=lambda r: r["kl"])
        kls = [r["kl"] for r in sub]
        for key, label in (("w_identity", "identity"), ("w_log", "log"),
                           ("w_best_exp", "best exp-t"), ("w_optimal", "optimal")):
            ax.plot(kls, [r[key] for r in sub], marker="o", ms=3, label=label)
        ax.set_title(f"{procedure.upper()}_{n}")
        ax.set_xlabel("KL(pi || pi_ref)")
    axes[0][0].set_ylabel("inference-time win rate")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_best_t(path: str, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for procedure in sorted({r["procedure"] for r in rows}):
        for kl in sorted({r["kl"] for r in rows}):
            sub = sorted((r for r in rows if r["procedure"] == procedure and r["kl"] == kl),
                         key=lambda r: r["n"])
            ax.plot([r["n"] for r in sub], [r["best_t"] for r in sub], marker="o", ms=3,
                    label=f"{procedure} KL={kl:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N")
    ax.set_ylabel("best t")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class AnalyticConfig:
    """The report's grid: procedure sizes N, KL budgets, calibrated-space grid, reading."""

    _config_owner = "config"
    ns: tuple[int, ...] = (1, 2, 4, 8, 32)
    kls: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    grid: int = 8000               # |t| <= grid / 10 resolved: BoN_32 wants t of 200-400
    against: str = "transformed"

    def __post_init__(self):
        object.__setattr__(self, "ns", tuple(A.check_n(n) for n in self.ns))
        object.__setattr__(self, "kls", tuple(A.check_kl(k) for k in self.kls))
        A.check_grid(self.grid)
        past = [k for k in self.kls if k > A.max_resolved_kl(self.grid)]
        if past:   # refused here, not at the first such row after the others were computed
            check.fail(self, "kls", f"<= {A.max_resolved_kl(self.grid):.2f}, the largest KL grid "
                                    f"{self.grid} resolves (got {past}; raise config.grid)")
        check.choice(self, "against", AGAINST)


def run(config: Any, out_dir: str, progress: Callable[[str], None] = print) -> dict:
    """Computes every table, writes CSV/markdown/PNG/manifest into out_dir, returns the rows.

    `config` is an `AnalyticConfig` or a config section with its fields.
    """
    if not isinstance(config, AnalyticConfig):
        config = dataclass_from(AnalyticConfig, as_dict(config), "analytic")
    ns, kls, grid_size, against = list(config.ns), list(config.kls), config.grid, config.against
    started, code = provenance.now(), provenance.code_state()
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    rows = frontier_rows(ns, kls, against=against, grid_size=grid_size, progress=progress)
    bonbon = bonbon_rows(ns, grid_size)
    write_csv(os.path.join(out_dir, "frontier.csv"), rows, FRONTIER_COLUMNS)
    write_csv(os.path.join(out_dir, "bonbon.csv"), bonbon, BONBON_COLUMNS)
    best_t_rows = [{k: r[k] for k in ("procedure", "n", "kl", "best_t", "w_best_exp",
                                      "w_optimal", "gap_optimal_minus_exp")} for r in rows]
    with atomic_open(os.path.join(out_dir, "tables.md")) as f:
        f.write(f"# Analytic tool (grid {grid_size}, against {against!r})\n\n## Win rate at KL\n\n")
        f.write(markdown_table(rows, FRONTIER_COLUMNS[:-1]) + "\n\n## Best t\n\n")
        f.write(markdown_table(best_t_rows, list(best_t_rows[0])) + "\n\n")
        f.write("## BoNBoN: optimal exponential tilt minus BoN_n(ref), standard win rate\n\n")
        f.write(markdown_table(bonbon, BONBON_COLUMNS) + "\n")
    for procedure in ("bon", "won"):
        plot_frontiers(os.path.join(out_dir, f"frontier_{procedure}.png"), rows, procedure)
    plot_best_t(os.path.join(out_dir, "best_t.png"), rows)
    seconds = time.time() - t0
    provenance.write_manifest(out_dir, {"ns": ns, "kls": kls, "grid": grid_size,
                                        "against": against}, started=started, code=code,
                              extra={"seconds": seconds}, with_devices=False)
    progress(f"wrote {out_dir} in {seconds:.1f}s")
    return {"frontier": rows, "bonbon": bonbon, "seconds": seconds}
