"""A sweep's results as a figure: every evaluated metric against the swept value.

`panels(rows, point_keys)` lays out what `plot` draws, as plain data:

* x is the swept key with the most distinct numeric values (`transform.t` in the paper's t
  sweep); a sweep of strings only (`transform.name`) puts its first varying key on a categorical
  axis. Every other key that varies between the points names a line (e.g. one line per
  `task.kl_budget`), labelled like a point's directory (`kl_budget=0.5`; `beta=base` for a
  point that does not set the key and keeps the base config's value).
* one panel per numeric `eval.*` column (the runs' final evaluation; the train metrics when
  there is none), in the table's order. Two kinds of column join another's panel instead:
  `target_<m>`, the exact task's optimum pi* of the same beta, drawn dashed beside the trained
  policy's `exact_<m>`; `<m>_stderr`, drawn as +-1 standard error bars on `<m>` (a real task's
  estimates). Counts of texts a judge cut (`*_cut`) are left to the table.
* a point without a value (a missing or non-numeric cell) is left out of its line, not drawn
  as 0; a NaN stays NaN (a gap in the line).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from infalign_jax.infra.config_utils import float_text
from infalign_jax.infra.files import save_figure


class Line(NamedTuple):
    label: str                    # the other swept keys' values ("" when only x varies)
    x: list[Any]                  # numbers, or strings on a categorical axis
    y: list[float]
    stderr: list[float] | None    # +-1 standard error per point (`<metric>_stderr`), or None
    target: list[float] | None    # the exact task's pi* value per point (`target_<m>`), or None


class Panel(NamedTuple):
    metric: str                   # the column, e.g. "eval.exact_bon4"
    lines: list[Line]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _text(v: Any) -> str:
    """A value in a label or on a categorical axis; "base" for a key a point does not set (it
    keeps the base config's value)."""
    if v is None:
        return "base"
    return float_text(v) if isinstance(v, float) else str(v)


def x_key(rows: Sequence[Mapping[str, Any]], point_keys: Sequence[str]) -> str | None:
    """The key on the x axis: the varying key with the most distinct values among those whose
    every value is a number, else the first varying key; None when no key varies."""
    varying = [k for k in point_keys if len({repr(r.get(k)) for r in rows}) > 1]
    numeric = [k for k in varying if all(_number(r.get(k)) for r in rows)]
    if numeric:
        return max(numeric, key=lambda k: (len({r[k] for r in rows}), -numeric.index(k)))
    return varying[0] if varying else None


def metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The columns that get a panel (see the module docstring), in the table's order."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    prefix = "eval." if any(c.startswith("eval.") for c in columns) else "train."
    numeric = [c for c in columns if c.startswith(prefix)
               and any(_number(r.get(c)) for r in rows)]
    joined = {c for c in numeric
              if c.endswith("_stderr") and c[:-len("_stderr")] in numeric
              or c.startswith(prefix + "target_")
              and prefix + "exact_" + c[len(prefix + "target_"):] in numeric}
    return [c for c in numeric if c not in joined and not c.endswith("_cut")]


def panels(rows: Sequence[Mapping[str, Any]], point_keys: Sequence[str]) -> list[Panel]:
    """What `plot` draws (see the module docstring); [] when no key varies."""
    xk = x_key(rows, point_keys)
    if xk is None:
        return []
    varying = [k for k in point_keys if k != xk and len({repr(r.get(k)) for r in rows}) > 1]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        label = ",".join(f"{k.rsplit('.', 1)[-1]}={_text(r.get(k))}" for k in varying)
        groups.setdefault(label, []).append(r)
    numeric_x = all(_number(r.get(xk)) for r in rows)
    out = []
    for metric in metrics(rows):
        prefix, name = metric.split(".", 1)
        err_col = metric + "_stderr"
        target_col = f"{prefix}.target_{name[len('exact_'):]}" if name.startswith("exact_") \
            else None
        lines = []
        for label, members in groups.items():
            members = [r for r in members if _number(r.get(metric))]
            if numeric_x:
                members = sorted(members, key=lambda r: float(r[xk]))
            if not members:
                continue

            def column(col):
                if col is None or not any(col in r for r in members):
                    return None
                return [float(r[col]) if _number(r.get(col)) else math.nan for r in members]

            lines.append(Line(label, [r[xk] if numeric_x else _text(r.get(xk)) for r in members],
                              [float(r[metric]) for r in members], column(err_col),
                              column(target_col)))
        if lines:
            out.append(Panel(metric, lines))
    return out


def plot(rows: Sequence[Mapping[str, Any]], point_keys: Sequence[str], path: str,
         columns: int = 4) -> str | None:
    """Draws `panels(rows, point_keys)` into `path` (written atomically); returns the path, or
    None (nothing written) when no key varies or no metric has a value."""
    layout = panels(rows, point_keys)
    if not layout:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xk = x_key(rows, point_keys)
    ncols = min(columns, len(layout))
    nrows = math.ceil(len(layout) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.7 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, layout):
        for i, line in enumerate(panel.lines):
            color = f"C{i % 10}"
            label = line.label or ("trained" if line.target is not None else None)
            ax.errorbar(line.x, line.y, yerr=line.stderr, color=color, marker="o", ms=3, lw=1,
                        capsize=2, label=label)
            if line.target is not None:
                ax.plot(line.x, line.target, color=color, ls="--", lw=1)
        if any(line.target is not None for line in panel.lines):
            ax.plot([], [], color="0.4", ls="--", lw=1, label="pi* of its beta (dashed)")
        bars = any(line.stderr is not None for line in panel.lines)
        ax.set_title(panel.metric + (" (bars: +-1 s.e.)" if bars else ""), fontsize=9)
        ax.set_xlabel(xk, fontsize=8)
        ax.tick_params(labelsize=7)
        if any(line.label or line.target is not None for line in panel.lines):
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(layout):]:
        ax.set_visible(False)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
